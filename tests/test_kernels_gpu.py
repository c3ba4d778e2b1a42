"""Triton backend (kernels/gpu.py) against kernels/reference.py on random and edge-case shapes: integer and
quantized results and forward epilogues compared with torch.equal, backward products to float tolerance.

Why a subprocess: `@triton.jit` decides between compiled and interpreted kernels when the decorator runs,
i.e. when gpu.py is imported, from TRITON_INTERPRET. Other test files may import bitnet_fast.kernels (or
triton) first, and setting the variable in-process would leak interpreted kernels into them. So on a
machine without CUDA one driver test (`test_interpreter_suite`) re-runs this file in a fresh Python with
TRITON_INTERPRET=1, where the tests call gpu.py's functions directly on small CPU tensors. With CUDA the
same tests run natively on CUDA tensors through the public dispatch (`bitnet_fast.kernels`). The interpreter
runs the CUDA kernel source (kernels/triton_interp.py supplies dp4a and GPU-exact bf16 dots and casts, each tested
here against its definition), each kernel's default config in the hypothesis tests and every config in
`test_every_autotune_config_runs`; `test_kernels_compile_for_sm90` compiles every config for Hopper.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import bitnet_fast.kernels as K
import pytest
import torch
from bitnet_fast.kernels import reference as R
from hypothesis import given, settings
from hypothesis import strategies as st

INNER_FLAG = "_BITNET_FAST_GPU_INTERPRET_RUN"
CUDA = torch.cuda.is_available()
INNER = os.environ.get(INNER_FLAG) == "1"
MODE = "cuda" if CUDA else ("interpret" if INNER else "outer")
DEV = "cuda" if CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[1]

if CUDA:  # hypothesis draws many shapes: one default config per kernel instead of autotuning each (set before
    os.environ.setdefault("BITNET_FAST_TRITON_AUTOTUNE", "0")  # the backend's lazy import, when this file runs alone)
KERNEL_TESTS: list[str] = []  # what the interpreter subprocess must pass, every one of them


def kernel_test(fn):
    """A test of the kernels themselves: native on CUDA, else in the TRITON_INTERPRET=1 subprocess."""
    KERNEL_TESTS.append(fn.__name__)
    return pytest.mark.skipif(MODE == "outer", reason="runs in the TRITON_INTERPRET=1 subprocess (module doc)")(fn)


if MODE != "outer":
    import triton
    import triton.language as tl
    from bitnet_fast.kernels import gpu as G

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------- ops under test
def q_act(x):
    return K.quantize_activations(x) if MODE == "cuda" else G.quantize_activations(x)


def q_weight(w):
    return K.quantize_weight(w) if MODE == "cuda" else G.quantize_weight(w)


def pack(wt, gamma, fmt="i2g"):
    return K.pack_ternary(wt, gamma, fmt) if MODE == "cuda" else G.pack(wt, gamma, fmt)


def unpack(pw):
    return K.unpack(pw)[0] if MODE == "cuda" else G.unpack(pw)


def mm_int(xq, pw, split_k=None):
    return K.matmul_int(xq, pw) if MODE == "cuda" and split_k is None else G.matmul_int(xq, pw, split_k=split_k)


def mm(xq, s, pw, bias, out_dtype, split_k=None):
    if MODE == "cuda" and split_k is None:
        return K.matmul(xq, s, pw, bias, out_dtype)
    return G.matmul(xq, s, pw, bias, out_dtype, split_k=split_k)


def bitlinear(x, pw, bias, out_dtype, split_k=None):
    if MODE == "cuda" and split_k is None:
        return K.bitlinear(x, pw, bias, out_dtype)
    return G.bitlinear(x, pw, bias, out_dtype, split_k=split_k)


def grad_in(gy, pw):
    return K.grad_input(gy, pw) if MODE == "cuda" else G.grad_input(gy, pw)


def grad_w(gy, xq, s):
    return K.grad_weight(gy, xq, s) if MODE == "cuda" else G.grad_weight(gy, xq, s)


def cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def i2g_by_hand(wt):
    """The i2g layout from its definition, one Python int at a time: weight 16t + j of a row (padded to a multiple
    of 128 with weight 0) in bits 2j..2j+1 of int32 word t, as code w + 1."""
    rows = []
    for row in wt.tolist():
        codes = [w + 1 for w in row] + [1] * (-len(row) % 128)
        words = [sum(c << (2 * j) for j, c in enumerate(codes[t : t + 16])) for t in range(0, len(codes), 16)]
        rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return torch.tensor(rows, dtype=torch.int32)


def rand_ternary(g, n, k):
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


def rand_int8(g, m, k):
    return torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)


def assert_epilogue_equal(y, yr):
    """Equal under torch.equal (div_rn, no FMA contraction, RNE casts), NaN where the reference has NaN."""
    assert y.dtype == yr.dtype and y.shape == yr.shape
    nan = yr.isnan()
    assert torch.equal(y.isnan(), nan) and torch.equal(y[~nan], yr[~nan])


# M covers the M = 1 GEMV, the 16-row tl.dot GEMV (2..16) and the tiled GEMM (17+); K crosses block edges.
Ms = st.sampled_from([1, 1, 2, 5, 16, 17, 33])
Ns = st.integers(1, 70)
Ks = st.integers(1, 300)
SPLITS = st.sampled_from([None, 1, 2, 3])


# ----------------------------------------------------------------------------------------- quantization
@kernel_test
@settings(max_examples=15)
@given(m=st.integers(1, 6), k=Ks, dtype=st.sampled_from(FLOATS), scale=st.sampled_from([1e-7, 1e-3, 1.0, 300.0]),
       seed=st.integers(0, 2**31 - 1))
def test_act_quant_bit_exact(m, k, dtype, scale, seed):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    xq, s = q_act(x.to(DEV))
    xr, sr = R.act_quant(x)
    assert torch.equal(cpu(xq), xr)
    assert torch.equal(cpu(s), sr)


@kernel_test
def test_act_quant_edge_rows():
    """Zero rows, exact .5 ties (s == 1 when amax == 127), non-finite rows (xq = 0, s = NaN), a strided view."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[0.0] * 6, [127.0, 0.5, 1.5, 2.5, -0.5, -2.5], [1.0, nan, 2.0, 0, 0, 0],
                      [inf, 1.0, 0, 0, 0, 0], [-inf, 0, 0, 0, 0, 3.0], [1e-30, -1e-30, 0, 0, 0, 0]])
    xd = torch.stack([x, x], dim=-1).reshape(6, 12).to(DEV)[:, ::2]  # a strided view of the same values
    for arg in (x.to(DEV), xd):
        xq, s = q_act(arg)
        xr, sr = R.act_quant(x)
        assert torch.equal(cpu(xq), xr)
        torch.testing.assert_close(cpu(s), sr, rtol=0, atol=0, equal_nan=True)
    assert xr[1].tolist() == [127, 0, 2, 2, 0, -2]  # half to even
    assert torch.isnan(sr[2:5]).all() and (xr[2:5] == 0).all()


@kernel_test
@settings(max_examples=15)
@given(n=st.integers(1, 40), k=st.integers(1, 200), dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1))
def test_weight_quant_bit_exact(n, k, dtype, seed):
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)
    wt, gamma = q_weight(w.to(DEV))
    wr, gr = R.weight_quant(w)
    assert torch.equal(cpu(gamma), gr)
    assert torch.equal(cpu(wt), wr)


@kernel_test
def test_weight_quant_ties_and_tiny():
    w = torch.tensor([[0.5, 1.5, -0.5, -1.5]])  # gamma = 1: w / gamma hits .5 ties exactly
    wt, gamma = q_weight(w.to(DEV))
    assert cpu(gamma).item() == 1.0 and cpu(wt).tolist() == [[0, 1, 0, -1]]
    z = torch.zeros(3, 5)  # gamma clamps to 1e-5
    wt, gamma = q_weight(z.to(DEV))
    assert torch.equal(cpu(gamma), R.weight_quant(z)[1]) and not cpu(wt).any()


# ----------------------------------------------------------------------------------------- packing
@kernel_test
@settings(max_examples=15)
@given(n=st.integers(1, 40), k=Ks, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(n, k, seed):
    wt = rand_ternary(torch.Generator().manual_seed(seed), n, k)
    pw = pack(wt.to(DEV), torch.tensor(0.25, device=DEV))
    assert pw.format == "i2g" and pw.data.dtype == torch.int32
    assert torch.equal(cpu(pw.data), R.pack_i2g(wt))  # GPU packing == the documented layout
    assert torch.equal(cpu(unpack(pw)), wt)
    strided = torch.stack([wt, wt], dim=-1).reshape(n, 2 * k)[:, ::2]  # a strided view packs the same
    assert torch.equal(cpu(pack(strided.to(DEV), torch.tensor(0.25, device=DEV)).data), R.pack_i2g(wt))


@kernel_test
def test_backend_packs_cpu_formats():
    """gpu.pack/unpack also take the CPU formats (reference codecs), so repack works on a CUDA device."""
    wt = rand_ternary(torch.Generator().manual_seed(1), 7, 300)
    for fmt in ("i2", "tq1"):
        p = pack(wt.to(DEV), torch.tensor(0.5, device=DEV), fmt)
        assert p.format == fmt and torch.equal(cpu(unpack(p)), wt)


@pytest.mark.skipif(MODE == "interpret", reason="CPU dispatch: covered by the driver process")
def test_i2g_loads_on_cpu_and_back():
    """A GPU-packed (i2g) model loads on CPU (i2) and back through kernels.repack and PackedWeight.state().

    The i2g words are checked against (and, outside CUDA, built by) `i2g_by_hand`, which shares no code with
    kernels/reference.py, so the CPU round trip does not compare the reference with itself."""
    wt = rand_ternary(torch.Generator().manual_seed(1), 7, 300)
    gamma = torch.tensor(0.03)
    words = i2g_by_hand(wt)
    if CUDA:
        pw_g = K.pack_ternary(wt.cuda(), gamma.cuda(), "i2g")
        assert torch.equal(cpu(pw_g.data), words)
    else:
        pw_g = K.PackedWeight(words, gamma, (7, 300), "i2g")
    loaded = K.PackedWeight.from_state(pw_g.state())  # a checkpoint written on the GPU box
    assert loaded.format == "i2g" and torch.equal(loaded.data, cpu(pw_g.data)) and loaded.shape == (7, 300)
    pw_i2 = K.repack(loaded, "i2")
    assert torch.equal(pw_i2.data, R.pack_i2(wt)) and torch.equal(pw_i2.gamma, gamma)
    back = K.repack(pw_i2, "i2g", device=DEV)
    assert torch.equal(cpu(back.data), cpu(pw_g.data)) and back.device.type == DEV


# ----------------------------------------------------------------------------------------- matmul
@kernel_test
@settings(max_examples=20)
@given(m=Ms, n=Ns, k=Ks, split_k=SPLITS, seed=st.integers(0, 2**31 - 1))
def test_matmul_int_bit_exact(m, n, k, split_k, seed):
    g = torch.Generator().manual_seed(seed)
    xq, wt = rand_int8(g, m, k), rand_ternary(g, n, k)
    xq[0, : min(k, 3)] = -128  # the asymmetric end of int8
    pw = pack(wt.to(DEV), torch.tensor(1.0, device=DEV))
    acc = mm_int(xq.to(DEV), pw, split_k)
    assert acc.dtype == torch.int32
    assert torch.equal(cpu(acc), R.matmul_int(xq, wt))


@kernel_test
def test_matmul_int_extremes_and_strides():
    """All -128 against all +-1 at K = 1000 (|acc| = 128000), a transposed (non-contiguous) xq, and M = 0."""
    k, n = 1000, 9
    wt = torch.ones(n, k, dtype=torch.int8)
    wt[1::2] = -1
    pw = pack(wt.to(DEV), torch.tensor(1.0, device=DEV))
    for m in (1, 3, 20):
        xq = torch.full((m, k), -128, dtype=torch.int8)
        assert torch.equal(cpu(mm_int(xq.to(DEV), pw)), R.matmul_int(xq, wt))
    xt = rand_int8(torch.Generator().manual_seed(3), k, 18).to(DEV).T  # (18, k) with stride (1, 18)
    for rows in (xt, xt[:5], xt[:1]):  # GEMM, 16-row GEMV and the M = 1 dp4a path on strided input
        assert torch.equal(cpu(mm_int(rows, pw)), R.matmul_int(cpu(rows), wt))
    xf = torch.randn(k, 3).to(DEV).T[:1]  # strided float row through the quantizing M = 1 prologue
    yr = R.matmul(*R.act_quant(cpu(xf)), wt, torch.tensor(1.0))
    assert_epilogue_equal(cpu(bitlinear(xf, pw, None, torch.float32)), yr)
    assert mm_int(torch.empty(0, k, dtype=torch.int8, device=DEV), pw).shape == (0, n)


@kernel_test
@settings(max_examples=15)
@given(m=Ms, n=Ns, k=Ks, split_k=SPLITS, out_dtype=st.sampled_from(FLOATS), has_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_matmul_epilogue(m, n, k, split_k, out_dtype, has_bias, seed):
    g = torch.Generator().manual_seed(seed)
    xq, wt = rand_int8(g, m, k), rand_ternary(g, n, k)
    s = torch.rand(m, generator=g) * 50 + 0.5
    s[-1] = float("nan")  # a non-finite input row stays NaN
    gamma = torch.tensor(0.0123)
    bias = torch.randn(n, generator=g).to(out_dtype) if has_bias else None
    pw = pack(wt.to(DEV), gamma.to(DEV))
    y = mm(xq.to(DEV), s.to(DEV), pw, None if bias is None else bias.to(DEV), out_dtype, split_k)
    yr = R.matmul(xq, s, wt, gamma, bias, out_dtype)
    assert y.dtype == out_dtype
    assert_epilogue_equal(cpu(y), yr)
    assert torch.isnan(cpu(y)[-1]).all()


@kernel_test
@settings(max_examples=15)
@given(m=Ms, n=Ns, k=Ks, split_k=SPLITS, dtype=st.sampled_from(FLOATS), has_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_bitlinear_fused(m, n, k, split_k, dtype, has_bias, seed):
    """Decode quantizes x inside the GEMV, prefill goes through int8 xq: both must equal quantize-then-matmul."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    if m > 1:
        x[1, 0] = float("inf")
    wt = rand_ternary(g, n, k)
    gamma = torch.tensor(0.07)
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    pw = pack(wt.to(DEV), gamma.to(DEV))
    y = bitlinear(x.to(DEV), pw, None if bias is None else bias.to(DEV), dtype, split_k)
    yr = R.matmul(*R.act_quant(x), wt, gamma, bias, dtype)
    assert_epilogue_equal(cpu(y), yr)


# ----------------------------------------------------------------------------------------- backward
@kernel_test
@settings(max_examples=12)
@given(m=Ms, n=Ns, k=Ks, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1))
def test_grad_input(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gy, wt, gamma = torch.randn(m, n, generator=g).to(dtype), rand_ternary(g, n, k), torch.tensor(0.02)
    gi = grad_in(gy.to(DEV), pack(wt.to(DEV), gamma.to(DEV)))
    assert gi.dtype == torch.float32 and gi.shape == (m, k)
    tol = 1e-5 if dtype == torch.float32 or MODE != "cuda" else 1e-3
    torch.testing.assert_close(cpu(gi), R.grad_input(gy, wt, gamma), rtol=tol, atol=tol)


@kernel_test
@settings(max_examples=10)
@given(m=Ms, n=Ns, k=Ks, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1))
def test_int8_grad_input(m, n, k, dtype, seed):
    """BitLinear grad_input="int8" on this backend: the packed transpose (kernels.transpose_packed, i2g) through the
    fused bitlinear kernel equals reference.grad_input_int8 bit for bit."""
    g = torch.Generator().manual_seed(seed)
    gy, wt, gamma = torch.randn(m, n, generator=g).to(dtype), rand_ternary(g, n, k), torch.tensor(0.02)
    pw_t = K.transpose_packed(pack(wt.to(DEV), gamma.to(DEV)))
    assert pw_t.format == "i2g" and pw_t.shape == (k, n) and torch.equal(cpu(unpack(pw_t)), wt.t())
    gi = bitlinear(gy.to(DEV), pw_t, None, torch.float32)
    assert_epilogue_equal(cpu(gi), R.grad_input_int8(gy, wt, gamma))


@kernel_test
@settings(max_examples=10)
@given(m=Ms, n=Ns, k=Ks, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1))
def test_grad_weight(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gy, xq = torch.randn(m, n, generator=g).to(dtype), rand_int8(g, m, k)
    s = torch.rand(m, generator=g) * 50 + 0.5
    gw = grad_w(gy.to(DEV), xq.to(DEV), s.to(DEV))
    assert gw.dtype == torch.float32 and gw.shape == (n, k)
    # The oracle is the float64 product, not reference.grad_weight: gpu.grad_weight returns that very function
    # for fp32 grads, so comparing with it could not fail.
    g64, x64 = gy.double(), xq.double() / s.double()[:, None]
    exact, size = g64.T @ x64, g64.abs().T @ x64.abs()
    if dtype == torch.float32:  # an fp32 GEMM: m + 2 roundings per term at most
        assert ((cpu(gw).double() - exact).abs() <= (m + 2) * 2.0**-23 * size).all()
    else:  # grad_y / s is rounded once to grad_y's dtype (documented), then accumulated in fp32
        ref = R.grad_weight((gy.float() / s[:, None]).to(dtype), xq, torch.ones_like(s))
        torch.testing.assert_close(cpu(gw), ref, rtol=1e-4, atol=1e-4)
        assert ((cpu(gw).double() - exact).abs() <= 2**-7 * size + 1e-6).all()  # one rounding per term


# ----------------------------------------------------------------------------------------- every config
def _forced(kernel, config, monkeypatch):
    """Make an autotuned kernel run `config` alone (a single config is launched without timing)."""
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})


def _config_cases():
    if MODE == "outer":
        return []
    cases = [("gemv1", i) for i in range(len(G.GEMV_CONFIGS))] + [("gemv", i) for i in range(len(G.GEMV_CONFIGS))]
    cases += [("gemm", i) for i in range(len(G.GEMM_CONFIGS))] + [("grad", i) for i in range(len(G.GRAD_CONFIGS))]
    return cases


@kernel_test
@pytest.mark.parametrize(("kernel", "index"), _config_cases())
def test_every_autotune_config_runs(kernel, index, monkeypatch):
    """Each autotune config of each kernel (the ones a GPU chooses among) on small shapes: integer products and
    epilogues equal to the reference, with and without split-K where the kernel has it."""
    g = torch.Generator().manual_seed(index)
    n, k = 37, 200
    wt, gamma = rand_ternary(g, n, k), torch.tensor(0.07)
    pw = pack(wt.to(DEV), gamma.to(DEV))
    if kernel == "grad":
        config = G.GRAD_CONFIGS[index]
        ieee = G._prune_grad_input([config], {}, IEEE=True) == [config]
        _forced(G._grad_input_kernel, config, monkeypatch)
        m = 21
        gy = torch.randn(m, n, generator=g).to(torch.float32 if ieee else torch.bfloat16)
        torch.testing.assert_close(cpu(G.grad_input(gy.to(DEV), pw)), R.grad_input(gy, wt, gamma), rtol=1e-5, atol=1e-5)
        if not ieee:  # grad_weight's configs are the tensor-core group
            _forced(G._grad_weight_kernel, config, monkeypatch)
            xq, s = rand_int8(g, m, k), torch.rand(m, generator=g) * 50 + 0.5
            ref = R.grad_weight((gy.float() / s[:, None]).to(gy.dtype), xq, torch.ones_like(s))
            torch.testing.assert_close(cpu(G.grad_weight(gy.to(DEV), xq.to(DEV), s.to(DEV))), ref, rtol=1e-5, atol=1e-5)
        return
    configs = G.GEMM_CONFIGS if kernel == "gemm" else G.GEMV_CONFIGS
    target = {"gemv1": G._gemv1_kernel, "gemv": G._gemv_kernel, "gemm": G._gemm_kernel}[kernel]
    _forced(target, configs[index], monkeypatch)
    m = {"gemv1": 1, "gemv": 5, "gemm": 33}[kernel]
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    y = G.bitlinear(x.to(DEV), pw, None, torch.bfloat16, split_k=1)  # quantize, product, fused epilogue
    assert_epilogue_equal(cpu(y), R.matmul(*R.act_quant(x), wt, gamma, None, torch.bfloat16))
    if kernel != "gemm":  # the split-K variant: int32 partials added atomically
        xq = rand_int8(g, m, k)
        assert torch.equal(cpu(G.matmul_int(xq.to(DEV), pw, split_k=2)), R.matmul_int(xq, wt))


# ----------------------------------------------------------------------------------------- interpreter fidelity
if MODE != "outer":
    @triton.jit
    def _dp4a_probe(a_ptr, b_ptr, c_ptr, out_ptr, USE_ASM: tl.constexpr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, G._dp4a(tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i), USE_ASM))

    @triton.jit
    def _bf16_probe(x_ptr, i_ptr, a_ptr, b_ptr, xo_ptr, io_ptr, do_ptr, N: tl.constexpr, D: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(xo_ptr + r, tl.load(x_ptr + r).to(tl.bfloat16))
        tl.store(io_ptr + r, tl.load(i_ptr + r).to(tl.bfloat16))
        d = tl.arange(0, D)
        a = tl.load(a_ptr + d[:, None] * D + d[None, :])
        b = tl.load(b_ptr + d[:, None] * D + d[None, :])
        tl.store(do_ptr + d[:, None] * D + d[None, :], tl.dot(a, b))


def _dp4a_definition(a: int, b: int, c: int) -> int:
    """PTX ISA, dp4a.u32.s32: d = c + sum_i zext(a.byte[i]) * sext(b.byte[i]), in 32-bit two's complement."""
    total = c
    for i in range(4):
        ua, sb = (a >> 8 * i) & 0xFF, (b >> 8 * i) & 0xFF
        total += ua * (sb - 256 if sb >= 128 else sb)
    return (total + 2**31) % 2**32 - 2**31


@kernel_test
def test_dp4a_matches_the_ptx_definition():
    """Both dp4a paths of gpu._dp4a against the instruction's definition: the inline PTX (hardware on CUDA,
    triton_interp's emulation under the interpreter) and the in-kernel emulation that ROCm runs."""
    g = torch.Generator().manual_seed(7)
    edge = [0, -1, 2**31 - 1, -(2**31), 0x7F7F7F7F, -0x7F7F7F80, 0x80808080 - 2**32, 0x00FF00FF, 0x01020304]
    n = 256
    a, b = (torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32) for _ in "ab")
    c = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    pairs = torch.tensor([(ea, eb) for ea in edge for eb in edge], dtype=torch.int64).to(torch.int32)  # every pair
    a[: len(pairs)], b[: len(pairs)] = pairs[:, 0], pairs[:, 1]
    c[:4] = torch.tensor([2**31 - 1, -(2**31), 0, -1])  # wrap-around in both directions
    want = torch.tensor([_dp4a_definition(*v) for v in zip(a.tolist(), b.tolist(), c.tolist(), strict=True)],
                        dtype=torch.int32)
    for use_asm in (True, False):
        if use_asm and torch.version.hip is not None:
            continue
        out = torch.empty(n, dtype=torch.int32, device=DEV)
        _dp4a_probe[(1,)](a.to(DEV), b.to(DEV), c.to(DEV), out, USE_ASM=use_asm, N=n)
        assert torch.equal(cpu(out), want), use_asm


@kernel_test
def test_bf16_casts_and_dots_match_the_gpu():
    """fp32 and int32 -> bf16 round to nearest even as on the GPU (and torch), and a bf16 tl.dot multiplies
    values, exactly, with fp32 accumulation: on CUDA this checks the hardware, under the interpreter triton_interp."""
    one = 1.0 + 2**-8  # halfway between two bf16 neighbours of 1.0: a tie to even (down)
    x = torch.tensor([one, 1.0 + 3 * 2**-8, -one, 3.4e38, -3.4e38, float("inf"), float("-inf"), float("nan"),
                      -0.0, 1e-40, -1e-40, 1.0 + 2**-8 + 2**-20, 65505.0, 0.1, 2.5, 7.0 - 2**-6])
    x = torch.cat([x, torch.randn(48, generator=torch.Generator().manual_seed(3)) * 1e3])
    ints = torch.cat([torch.arange(-8, 8), torch.tensor([257, 259, -513, 2**24 - 1, 127, -128] * 8)[:48]]).int()
    d = 16
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randn(d, d, generator=g).bfloat16() for _ in "ab")
    xo, io = (torch.empty(64, dtype=torch.bfloat16, device=DEV) for _ in "xi")
    do = torch.empty(d, d, dtype=torch.float32, device=DEV)
    _bf16_probe[(1,)](x.to(DEV), ints.to(DEV), a.to(DEV), b.to(DEV), xo, io, do, N=64, D=d)
    want = x.bfloat16()
    assert torch.equal(cpu(xo).isnan(), want.isnan())
    assert torch.equal(cpu(xo)[~want.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))
    assert torch.equal(cpu(io), ints.bfloat16())
    torch.testing.assert_close(cpu(do), a.float() @ b.float(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- bad input
@kernel_test
def test_bad_inputs_raise_clear_errors():
    wt = rand_ternary(torch.Generator().manual_seed(0), 4, 40).to(DEV)
    pw = G.pack(wt, torch.tensor(1.0, device=DEV), "i2g")
    xq = torch.zeros(2, 40, dtype=torch.int8, device=DEV)
    meta = torch.empty(2, 40, device="meta")  # neither CUDA nor (interpreted) CPU
    with pytest.raises(ValueError, match=r"x is on meta.*CUDA"):
        G.quantize_activations(meta)
    with pytest.raises(ValueError, match=r"^w is on"):
        G.quantize_weight(meta)
    with pytest.raises(TypeError, match=r"x has dtype torch.int32"):
        G.quantize_activations(torch.zeros(2, 3, dtype=torch.int32, device=DEV))
    with pytest.raises(TypeError, match=r"xq has dtype torch.float32"):
        G.matmul_int(xq.float(), pw)
    with pytest.raises(TypeError, match=r"s has dtype torch.float16"):
        G.matmul(xq, torch.ones(2, dtype=torch.float16, device=DEV), pw, None, torch.float32)
    with pytest.raises(TypeError, match=r"wt has dtype"):
        G.pack(wt.float(), torch.tensor(1.0, device=DEV), "i2g")
    with pytest.raises(TypeError, match=r"PackedWeight"):
        G.matmul_int(xq, wt)
    with pytest.raises(ValueError, match=r"repack\(pw, 'i2g'\)"):
        G.matmul_int(xq, G.pack(wt, torch.tensor(1.0, device=DEV), "i2"))
    with pytest.raises(ValueError, match=r"^grad_y is on"):
        G.grad_input(meta, pw)
    if CUDA:
        with pytest.raises(ValueError, match=r"xq is on cpu.*CUDA"):
            G.matmul_int(xq.cpu(), pw)


# ----------------------------------------------------------------------------------------- process-level
@pytest.mark.skipif(MODE != "outer", reason="only the CPU driver process runs the interpreter subprocess")
def test_interpreter_suite():
    """Run this file under TRITON_INTERPRET=1 in a fresh process (see the module doc for why)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", INNER_FLAG: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", __file__],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreted GPU-kernel tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    ran = set(re.findall(r"^PASSED \S+::(\w+)", proc.stdout, re.M))
    assert KERNEL_TESTS and ran >= set(KERNEL_TESTS), f"not run or not passed: {set(KERNEL_TESTS) - ran}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_dispatch_uses_triton():
    assert K.backend_for("cuda") == "triton"
    assert K.pack(torch.randn(8, 64, device="cuda")).format == "i2g"


@pytest.mark.skipif(MODE == "interpret", reason="needs compiled (not interpreted) kernels: runs in the driver")
def test_kernels_compile_for_sm90():
    """Every kernel variant, in every autotune config, compiles for Hopper with Triton's bundled ptxas (no GPU
    needed), and the M = 1 GEMV's PTX holds dp4a: this catches what the interpreter cannot (shape/type rules of
    compiled tl.dot, reshape, div_rn, register spills...)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "tools" / "bench_gpu.py"), "--compile-check", "90", "--all-configs"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    assert "FAILED" not in proc.stdout and "sm_90: 0 failures" in proc.stdout
    gpu = importlib.import_module("bitnet_fast.kernels.gpu")  # compiled (not interpreted) here: TRITON_INTERPRET unset
    compiled = proc.stdout.splitlines()
    for label, configs in (("gemv M=1 dp4a ", gpu.GEMV_CONFIGS), ("gemm ", gpu.GEMM_CONFIGS)):
        assert sum(line.startswith(label + "{") for line in compiled) == len(configs), (label, proc.stdout[-3000:])


@kernel_test
def test_bench_interpret_smoke(capsys):
    """tools/bench_gpu.py's measuring and reporting logic, on tiny shapes under the interpreter."""
    if MODE == "cuda":
        pytest.skip("on a GPU run the real benchmark instead")
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "tools" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--interpret-smoke"]) == 0
    out = capsys.readouterr().out
    assert "ours/bf16" in out and "M=1" in out
