"""The numba CPU kernels against the pure-torch oracle (kernels/reference.py), through the public API.

Integer products are compared bit-exactly; float epilogues to float tolerance. Both the packed (decode) path
and the GEMM (int_mm) path are forced with `cpu.configure`, and the other instruction sets run in a
subprocess (the ISA is fixed at import).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from bitnet_fast.kernels import cpu, cpu_convert, cpu_engine, reference, tuning
from hypothesis import given
from hypothesis import strategies as st

from bitnet_fast import kernels

PATHS = {  # name -> cpu.configure(...) that forces it
    "packed-decode": dict(gemm_impl="numba", gemm_min_m=1 << 20),  # 1 x 4 tiles for every row
    "packed-gemm": dict(gemm_impl="numba", gemm_min_m=1, outer_min_rows=1 << 30),  # the row-dot GEMM tile
    "packed-outer": dict(gemm_impl="numba", gemm_min_m=1, outer_min_rows=1),  # avx2: the outer-product tile
    "packed-panels": dict(gemm_impl="numba", gemm_min_m=2, panel_bytes=64, outer_min_rows=1 << 30),  # many tasks
    "packed-outer-panels": dict(gemm_impl="numba", gemm_min_m=2, panel_bytes=64, outer_min_rows=2),
    "int_mm": dict(gemv_max_m=0, gemm_impl="int_mm", gemm_tile_n=16),
}


@pytest.fixture(autouse=True)
def _restore_params():
    saved = cpu.params()
    yield
    cpu.configure(**saved)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _ternary(rng, n: int, k: int, kind: str) -> torch.Tensor:
    if kind == "zero":
        return torch.zeros((n, k), dtype=torch.int8)
    if kind == "ones":
        return torch.full((n, k), int(rng.choice([-1, 1])), dtype=torch.int8)
    return torch.from_numpy(rng.integers(-1, 2, (n, k), dtype=np.int8))


def _int8(rng, m: int, k: int, kind: str) -> torch.Tensor:
    if kind == "extreme":  # only -128, 127 and 0: the largest partial sums
        return torch.from_numpy(rng.choice(np.array([-128, 127, 0], np.int8), (m, k)))
    return torch.from_numpy(rng.integers(-128, 128, (m, k), dtype=np.int8))


def _floats(rng, m: int, k: int) -> torch.Tensor:
    """Rows with widely varying scales, exact .5 ties after scaling, zero rows, tiny and huge values."""
    x = rng.standard_normal((m, k)).astype(np.float32) * (10.0 ** rng.uniform(-6, 6, (m, 1))).astype(np.float32)
    for r in range(m):
        kind = rng.integers(0, 6)
        if kind == 0:
            x[r] = 0.0
        elif kind == 1:  # values that land on .5 after x * (127 / 127)
            x[r] = rng.integers(-254, 255, k) / 2.0
            x[r, 0] = 127.0
        elif kind == 2:
            x[r] *= np.float32(1e-30)
    return torch.from_numpy(x)


# K up to 1100 reaches every loop of the vnni dots (4-block wide steps, 2-block pairs, single blocks); K above
# 1024 crosses the avx2 decode dot's int16 widening every cpu_dot.SPLIT_CHUNK = 8 blocks (2048: the GEMM tile's 16).
shapes = st.tuples(st.integers(1, 20), st.one_of(st.integers(1, 300), st.integers(300, 1100), st.integers(1900, 4400)),
                   st.integers(1, 40))


def test_numba_serves_cpu():
    assert kernels.backend_for("cpu") == "numba"
    assert cpu.name == "numba" and cpu.default_format == "i2" and cpu.ISA in cpu.ISAS


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), wkind=st.sampled_from(["rand", "zero", "ones"]),
       xkind=st.sampled_from(["rand", "extreme"]), path=st.sampled_from(sorted(PATHS)))
def test_matmul_int_exact(shape, seed, wkind, xkind, path):
    m, k, n = shape
    rng = _rng(seed)
    cpu.configure(**PATHS[path])
    wt, xq = _ternary(rng, n, k, wkind), _int8(rng, m, k, xkind)
    pw = kernels.pack_ternary(wt, 0.5)
    got = kernels.matmul_int(xq, pw)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, reference.matmul_int(xq, wt))


@given(m=st.integers(1, 24), k=st.integers(1, 600), seed=st.integers(0, 2**32 - 1))
def test_quantize_activations_bit_exact(m, k, seed):
    x = _floats(_rng(seed), m, k)
    xq, s = kernels.quantize_activations(x)
    xq_ref, s_ref = reference.act_quant(x)
    assert torch.equal(xq, xq_ref)
    assert torch.equal(s, s_ref)


def test_quantize_activations_nonfinite_rows_and_views():
    x = torch.randn(6, 33)
    x[1, 3], x[2, 0], x[3, 32], x[4] = float("nan"), float("inf"), float("-inf"), 0.0
    for inp in (x, x.t().contiguous().t(), x.bfloat16(), x.half(), x[:, ::2]):
        xq, s = kernels.quantize_activations(inp)
        xq_ref, s_ref = reference.act_quant(inp)
        assert torch.equal(xq, xq_ref) and torch.equal(s.isnan(), s_ref.isnan())
        assert torch.equal(s[~s.isnan()], s_ref[~s_ref.isnan()])
    xq, s = kernels.quantize_activations(x)
    assert s[1:4].isnan().all() and (xq[1:4] == 0).all() and s[4] == 127.0 / 1e-5


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), path=st.sampled_from(sorted(PATHS)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), use_bias=st.booleans(),
       transposed=st.booleans())
def test_bitlinear_and_matmul_vs_reference(shape, seed, path, dtype, use_bias, transposed):
    m, k, n = shape
    rng = _rng(seed)
    cpu.configure(**PATHS[path])
    x = _floats(rng, m, k).clamp(-1e4, 1e4).to(dtype)
    if transposed:  # a non-contiguous (M, K) view
        x = x.t().contiguous().t()
    wt = _ternary(rng, n, k, "rand")
    gamma = torch.tensor(float(rng.uniform(0.01, 2.0)))
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype) if use_bias else None
    pw = kernels.pack_ternary(wt, gamma)
    xq, s = reference.act_quant(x)
    want = reference.matmul(xq, s, wt, gamma, bias, dtype)
    got = kernels.bitlinear(x, pw, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else None, atol=1e-4 if dtype ==
                               torch.float32 else None)
    for out_dtype in (torch.float32, torch.bfloat16):
        got = kernels.matmul(xq, s, pw, bias, out_dtype)
        torch.testing.assert_close(got, reference.matmul(xq, s, wt, gamma, bias, out_dtype), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_nonfinite_rows_never_finite(path):
    cpu.configure(**PATHS[path])
    x = torch.randn(5, 130)
    x[0, 7], x[3, 129] = float("nan"), float("-inf")
    y = kernels.bitlinear(x, kernels.pack(torch.randn(9, 130)))
    assert not y[[0, 3]].isfinite().any() and y[[1, 2, 4]].isfinite().all()


def test_gemv_leading_dims_and_large_k():
    x = torch.randn(2, 3, 1000)
    w = torch.randn(17, 1000)
    got = kernels.bitlinear(x, kernels.pack(w))
    assert got.shape == (2, 3, 17)
    torch.testing.assert_close(got, reference.bitlinear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_leading_dims_equal_the_flattened_call(path):
    """The backend flattens (..., K) itself (in NumPy): every layout gives exactly the 2-D call's rows."""
    cpu.configure(**PATHS[path])
    pw, bias = kernels.pack(torch.randn(9, 130)), torch.randn(9)
    x = torch.randn(4, 6, 130)
    flat = kernels.bitlinear(x.reshape(-1, 130), pw, bias)
    assert torch.equal(kernels.bitlinear(x, pw, bias), flat.reshape(4, 6, 9))
    assert torch.equal(kernels.bitlinear(x[1, 2], pw, bias), flat[8])  # 1-D in, 1-D out
    xt = x.transpose(0, 1)  # non-contiguous
    assert torch.equal(kernels.bitlinear(xt, pw, bias), flat.reshape(4, 6, 9).transpose(0, 1))
    y16 = kernels.bitlinear(x.bfloat16(), pw, bias)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, kernels.bitlinear(x.bfloat16().reshape(-1, 130), pw,
                                                                                bias).reshape(4, 6, 9))
    assert kernels.bitlinear(x[:, :0], pw).shape == (4, 0, 9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_conversions_match_torch_bit_for_bit(dtype):
    """cpu_convert's widening of all 65536 patterns and narrowing of every value of the type, the midpoints between
    neighbours (ties to even) and one fp32 step either side, random fp32 patterns and edge values: the bits torch
    gives, NaN for NaN."""
    to_16 = cpu_convert.f32_to_f16 if dtype == torch.float16 else cpu_convert.f32_to_bf16
    patterns = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = cpu_convert.widen_16(patterns, dtype == torch.float16)
    want = torch.from_numpy(patterns.view(np.int16)).view(dtype).float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan) and np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    values = np.unique(want[np.isfinite(want)])
    mids = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)  # exact in fp32: ties
    edges = np.array([65504, 65519.99, 65520, 65536, 3.4e38, np.inf, -np.inf, np.nan, 2.0**-24, 2.0**-25,
                      2.0**-25 * 1.0000001, 2.0**-26, 0.0, -0.0, 1e-45, -1e-45, 2.0**-126, 2.0**-133], np.float32)
    rng = np.random.default_rng(0)
    y = np.concatenate([values, mids, (mids.view(np.uint32) + 1).view(np.float32),
                        (mids.view(np.uint32) - 1).view(np.float32), edges,
                        rng.integers(0, 2**32, 500_000, dtype=np.uint64).astype(np.uint32).view(np.float32)])[None]
    out = np.empty(y.shape, np.uint16)
    to_16(y, out)
    want = torch.from_numpy(y).to(dtype).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(y)
    assert np.array_equal(out[~nan], want[~nan])
    assert np.isnan(torch.from_numpy(out[nan].view(np.int16)).view(dtype).float().numpy()).all()


def test_decode_fast_path_equals_the_general_path_and_follows_its_settings(monkeypatch):
    """kernels.bitlinear(x, pw) on a CPU x skips the checks once the numba backend has served pw (cpu.bitlinear_fp32
    for fp32 x, cpu.bitlinear_cast for bf16 / fp16 / strided x or an out_dtype; planned per x shape): the same bits
    as the general path (BITNET_FAST_BACKEND set), the same errors, and it follows cpu.configure and
    BITNET_FAST_BACKEND changed between calls."""
    calls = []
    packed = cpu_engine._bitlinear_packed
    monkeypatch.setattr(cpu, "_bitlinear_packed", lambda *a: calls.append(a[2:]) or packed(*a))

    def general(*args, **kw):
        with monkeypatch.context() as m:
            m.setenv("BITNET_FAST_BACKEND", "numba")
            return kernels.bitlinear(*args, **kw)

    w = torch.randn(9, 130)
    pw = kernels.pack(w)
    biases = (None, torch.randn(9), torch.nn.Parameter(torch.randn(9)), torch.randn(9, dtype=torch.bfloat16),
              torch.randn(18)[::2])
    for x in (torch.randn(130), torch.randn(3, 130), torch.randn(2, 4, 130), torch.randn(0, 130)):
        for bias in biases:
            want = general(x, pw, bias)
            for _ in range(2):  # the call that makes the shape's plan, then the planned one
                got = kernels.bitlinear(x, pw, bias)
                assert got.shape == (*x.shape[:-1], 9) and torch.equal(got, want)
            if bias is None or bias.dtype == torch.float32:
                ref = reference.bitlinear(x, w, None if bias is None else bias.detach())
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    x = torch.randn(5, 130)
    x[3, 7] = float("nan")  # NaN rows: NaN out (bf16 NaN bits may differ: torch's vector and scalar code differ)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for xd in (x.to(dtype), x.to(dtype).t().contiguous().t()):
            for out_dtype in (None, torch.float32, torch.bfloat16, torch.float16):
                for bias in biases[:4]:
                    got, want = kernels.bitlinear(xd, pw, bias, out_dtype), general(xd, pw, bias, out_dtype)
                    assert got.dtype == want.dtype == (out_dtype or dtype)
                    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    n_calls = len(calls)
    for xd, out_dtype, kinds in ((x.bfloat16(), torch.bfloat16, 3), (x.half(), torch.float16, 12),
                                 (x.bfloat16(), torch.float16, 9), (x.half(), torch.float32, 4)):
        kernels.bitlinear(xd, pw, None, out_dtype)
        n_calls += 1
        assert len(calls) == n_calls and calls[-1][0] == kinds  # bf16 / fp16 in and out: converted inside the kernel
    for bias, kinds in ((biases[3], 16), (biases[3].half(), 32), (biases[1], 0)):  # a bias read where it lives
        got = kernels.bitlinear(x, pw, bias)
        assert calls[-1][0] == kinds and calls[-1][6] == bias.data_ptr()
        torch.testing.assert_close(got, general(x, pw, bias), rtol=0, atol=0, equal_nan=True)
    big = torch.randn(cpu.CAST_IN_KERNEL_MAX // 130 + 1, 130)  # past the in-kernel limit: torch converts
    for dtype in (torch.bfloat16, torch.float16):
        got, want = kernels.bitlinear(big.to(dtype), pw), general(big.to(dtype), pw)
        assert got.dtype == dtype and torch.equal(got, want) and calls[-1][0] == 0
    with pytest.raises(ValueError, match="bias has 8 elements; expected out_features=9"):
        kernels.bitlinear(torch.randn(2, 130), pw, torch.randn(8))
    with pytest.raises(ValueError, match="bias has 8 elements; expected out_features=9"):
        kernels.bitlinear(torch.randn(2, 130).bfloat16(), pw, torch.randn(8))
    with pytest.raises(TypeError, match=r"out_dtype=torch\.int32 is not supported"):
        kernels.bitlinear(torch.randn(2, 130), pw, None, torch.int32)
    x, bias = torch.randn(2, 130), torch.nn.Parameter(torch.randn(9))
    half = torch.nn.Parameter(torch.randn(9).bfloat16())
    for change in (lambda: None, lambda: bias.data.add_(1.0), lambda: setattr(bias, "data", torch.randn(9)),
                   lambda: setattr(bias, "data", torch.randn(9).half()), lambda: half.data.add_(1.0)):
        change()  # the kept bias view follows each change; a converted bias is converted every call
        for b in (bias, half):
            assert torch.equal(kernels.bitlinear(x, pw, b), general(x, pw, b.detach().clone()))
    x = torch.randn(3, 130)
    cpu.configure(gemm_min_m=4)
    kernels.bitlinear(x, pw)
    assert calls[-1][-2] is False  # M = 3 is below gemm_min_m: the decode tile
    cpu.configure(gemm_min_m=2)
    kernels.bitlinear(x, pw)
    assert calls[-1][-2] is True  # the plan was remade with the new setting
    cpu.configure(gemm_impl="int_mm", gemv_max_m=0)
    before = len(calls)
    torch.testing.assert_close(kernels.bitlinear(x, pw), reference.bitlinear(x, w), rtol=1e-5, atol=1e-4)
    assert len(calls) == before  # the int_mm engine now serves this M
    cpu.configure(gemm_impl="numba")
    monkeypatch.setenv("BITNET_FAST_BACKEND", "reference")
    torch.testing.assert_close(kernels.bitlinear(x, pw), reference.bitlinear(x, w), rtol=1e-5, atol=1e-4)
    assert len(calls) == before  # the forced backend, read on every call
    monkeypatch.delenv("BITNET_FAST_BACKEND")
    with pytest.raises(ValueError, match="K=131 columns but the packed weight has in_features=130"):
        kernels.bitlinear(torch.randn(2, 131), pw)
    with pytest.raises(ValueError, match="at least 1 dim"):
        kernels.bitlinear(torch.tensor(1.0), pw)


def test_out_argument_writes_the_same_bits_into_the_given_tensor(monkeypatch):
    """bitlinear(..., out=t) returns t holding exactly the bits of the call without it: on the decode fast path
    (contiguous CPU out: written by the kernel, no allocation), on the general path (a forced backend, a strided out:
    computed, then copied) and in each dtype combination; a wrong out is named and nothing is written."""
    calls = []
    packed = cpu_engine._bitlinear_packed
    monkeypatch.setattr(cpu, "_bitlinear_packed", lambda *a: calls.append(a[1]) or packed(*a))
    pw, bias = kernels.pack(torch.randn(9, 130)), torch.randn(9)
    for x in (torch.randn(130), torch.randn(3, 130), torch.randn(2, 4, 130)):
        for dtype, out_dtype in ((torch.float32, None), (torch.bfloat16, None), (torch.float16, torch.float32),
                                 (torch.float32, torch.bfloat16)):
            xd, want_dtype = x.to(dtype), out_dtype or dtype
            want = kernels.bitlinear(xd, pw, bias, out_dtype)
            out = torch.full(want.shape, 7.0, dtype=want_dtype)
            assert kernels.bitlinear(xd, pw, bias, out_dtype, out=out) is out and torch.equal(out, want)
            assert calls[-1] == out.data_ptr()  # the kernel wrote into out itself
            strided = torch.full((*want.shape[:-1], 18), 7.0, dtype=want_dtype)[..., ::2]
            assert kernels.bitlinear(xd, pw, bias, out_dtype, out=strided) is strided
            assert torch.equal(strided, want)
            with monkeypatch.context() as m:
                m.setenv("BITNET_FAST_BACKEND", "reference")
                out.fill_(7.0)
                assert kernels.bitlinear(xd, pw, bias, out_dtype, out=out) is out
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-3)
    x, out = torch.randn(3, 130), torch.full((3, 9), 7.0)
    bad = [(torch.empty(3, 8), ValueError, r"out has shape \(3, 8\); the result is \(3, 9\)"),
           (torch.empty(9), ValueError, r"out has shape \(9,\)"),
           (torch.empty(3, 9, dtype=torch.bfloat16), TypeError, "out has dtype torch.bfloat16; the result is "
                                                                 "torch.float32"),
           (torch.empty(3, 9, device="meta"), ValueError, "out is on meta but x is on cpu"),
           (torch.empty(3, 9, requires_grad=True), RuntimeError, "out requires grad"),
           (out.numpy(), TypeError, "out must be a torch.Tensor")]
    for t, err, match in bad:
        for _ in range(2):  # a new plan, then the planned path
            with pytest.raises(err, match=match):
                kernels.bitlinear(x, pw, out=t)
    assert (out == 7.0).all()


def test_copies_and_pickles_of_a_packed_weight_compute_on_their_own_buffer():
    """The numba backend caches the weight's address in pw.views: a deep copy or an unpickled weight (a copied or
    torch.save'd model) must not inherit it, or it would read the original's buffer, freed or changed later."""
    import copy
    import gc
    import pickle

    w, x = torch.randn(24, 256), torch.randn(3, 256)
    pw = kernels.pack(w)
    want = kernels.bitlinear(x, pw)  # fills pw.views
    for clone in (copy.deepcopy(pw), pickle.loads(pickle.dumps(pw)), copy.deepcopy({"layer": pw})["layer"]):
        assert not clone.views and clone.data.data_ptr() != pw.data.data_ptr()
        assert torch.equal(kernels.bitlinear(x, clone), want)
        assert clone.views["numba"][2] == clone.data.data_ptr()
    clone = copy.deepcopy(pw)
    pw.data.zero_()  # the original's codes change (and then it is freed): the copy keeps computing on its own
    assert not torch.equal(kernels.bitlinear(x, pw, out_dtype=torch.float32), want)
    del pw
    gc.collect()
    assert torch.equal(kernels.bitlinear(x, clone), want)


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_backward_products(shape, seed, dtype):
    m, k, n = shape
    rng = _rng(seed)
    cpu.configure(gemm_tile_n=8)  # several tiles
    wt = _ternary(rng, n, k, "rand")
    gamma = torch.tensor(0.37)
    gy = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32)).to(dtype)
    got = kernels.grad_input(gy, kernels.pack_ternary(wt, gamma))
    assert got.dtype == torch.float32 and got.shape == (m, k)
    torch.testing.assert_close(got, reference.grad_input(gy, wt, gamma), rtol=1e-5, atol=1e-5)
    xq, s = reference.act_quant(_floats(rng, m, k))
    s = torch.where(s.isnan(), torch.ones_like(s), s)
    gw = kernels.grad_weight(gy, xq, s)
    assert gw.dtype == torch.float32 and gw.shape == (n, k)
    # Oracle independent of reference.grad_weight (which is the same fp32 formula): the float64 product of the
    # float64-dequantized operands, with the fp32 error bound of an m-term dot product (m + 2 roundings).
    g64, x64 = gy.double(), xq.double() / s.double()[:, None]
    bound = (m + 2) * 2.0**-23 * (g64.abs().T @ x64.abs())
    assert ((gw.double() - g64.T @ x64).abs() <= bound).all()


def test_grad_weight_scratch_buffer(monkeypatch):
    """grad_weight reuses one dequantization buffer per thread: consecutive calls of other shapes (smaller, larger,
    and over the size cap, allocated per call) each equal the fresh-buffer result, and no result aliases the buffer."""
    rng = _rng(7)
    cases = [(64, 300, 5), (8, 40, 3), (200, 512, 9), (64, 300, 5)]
    runs = {}
    for cap in (0, cpu.SCRATCH_MAX_BYTES, 200 * 512 * 4 - 1):  # never, always, all but the largest
        monkeypatch.setattr(cpu, "SCRATCH_MAX_BYTES", cap)
        rng = _rng(7)
        runs[cap] = []
        for m, k, n in cases:
            xq, s = reference.act_quant(_floats(rng, m, k))
            gy = torch.from_numpy(rng.standard_normal((m, n)).astype(np.float32))
            runs[cap].append(kernels.grad_weight(gy, xq, s))
    for got in runs.values():
        for a, b in zip(got, runs[0], strict=True):
            assert torch.equal(a, b)  # compared after all calls: a result aliasing the buffer would have changed


def test_bad_inputs_name_the_argument(monkeypatch):
    pw = kernels.pack(torch.randn(8, 64))
    with pytest.raises(TypeError, match="xq"):
        kernels.matmul_int(torch.zeros(2, 64), pw)
    with pytest.raises(ValueError, match="xq"):
        kernels.matmul_int(torch.zeros(2, 3, 64, dtype=torch.int8), pw)
    with pytest.raises(ValueError, match="in_features"):
        kernels.matmul_int(torch.zeros(2, 65, dtype=torch.int8), pw)
    with pytest.raises(TypeError, match="x has dtype"):
        kernels.bitlinear(torch.zeros(2, 64, dtype=torch.float64), pw)
    on_meta = torch.zeros(2, 64, device="meta")  # a device every host has: the mismatch checks, not a backend
    for call in (lambda: kernels.bitlinear(on_meta, pw), lambda: kernels.bitlinear_train(on_meta, pw),
                 lambda: kernels.matmul_int(on_meta.to(torch.int8), pw)):
        with pytest.raises(ValueError, match="is on meta but the packed weight is on cpu"):
            call()
    with pytest.raises(ValueError, match="bias is on meta but the inputs are on cpu"):
        kernels.bitlinear(torch.zeros(2, 64), pw, torch.zeros(8, device="meta"))
    with pytest.raises(ValueError, match="'i2'"):
        cpu.matmul_int(torch.zeros(2, 64, dtype=torch.int8), kernels.pack(torch.randn(8, 64), "tq1"))
    with pytest.raises(ValueError, match="gemv_max_m"):
        cpu.configure(gemv_max_m=-1)
    with pytest.raises(ValueError, match="unknown"):
        cpu.configure(tile=3)
    monkeypatch.setenv("BITNET_FAST_BACKEND", "numba")
    with pytest.raises(ValueError, match="numba"):
        kernels.quantize_activations(torch.zeros(2, 64, device="meta"))


def test_tuning_file_roundtrip_and_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_FAST_TUNING", str(tmp_path / "t.json"))
    plan = tuning.plan(tuning.capabilities())
    assert tuning.load() == plan
    saved = {"capabilities": tuning.capabilities(), "params": {**plan, "gemm_min_m": 8}}
    (tmp_path / "t.json").write_text(json.dumps(saved))  # as bitnet_fast.calibrate.save_tuning writes it
    assert tuning.load()["gemm_min_m"] == 8
    assert set(tuning.CPU_SEARCH_SPACE) == set(tuning.CPU_DEFAULTS)
    (tmp_path / "t.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert tuning.load() == plan
    saved = {"capabilities": tuning.capabilities(), "params": {"gemm_min_m": "big", "threads": 1}}
    (tmp_path / "t.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="gemm_min_m"):
        assert tuning.load() == {**plan, "threads": 1}


def test_tuning_file_from_another_cpu_class_is_ignored(tmp_path, monkeypatch):
    """A file calibrated where int_mm is fast (VNNI) must not send this machine's GEMMs to it, and vice versa."""
    monkeypatch.setenv("BITNET_FAST_TUNING", str(tmp_path / "t.json"))
    caps = tuning.capabilities()
    other = {**caps, "isa": "vnni512" if caps["isa"] != "vnni512" else "avx2", "int_mm_vnni": not caps["int_mm_vnni"]}
    (tmp_path / "t.json").write_text(json.dumps({"capabilities": other, "params": {"gemm_impl": "int_mm"}}))
    with pytest.warns(UserWarning, match="re-run `bitnet-fast calibrate`"):
        assert tuning.load() == tuning.plan(caps)


@pytest.mark.parametrize(("isa", "torch_vnni", "engine"), [
    ("vnni512", True, "int_mm"),  # oneDNN's VNNI int8 GEMM for large M
    ("vnni512", False, "numba"),  # a torch build without mkldnn / VNNI detection
    ("vnni", True, "numba"),  # AVX-VNNI only (or a forced class below vnni512): ATen's _int_mm is a plain loop
    ("avx2", True, "numba"),  # forced avx2 on a VNNI host reproduces an AVX2 host's dispatch
    ("avx2", False, "numba"),
    ("portable", False, "numba"),
])
def test_dispatch_plan_per_isa_class(isa, torch_vnni, engine, monkeypatch):
    """The plan is a pure function of the capabilities: each ISA class gets its engine without its hardware."""
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: torch_vnni)
    caps = tuning.capabilities(isa)
    assert caps == {"isa": isa, "int_mm_vnni": torch_vnni and isa == "vnni512"}
    plan = tuning.plan(caps)
    assert plan["gemm_impl"] == engine and tuning.validate(dict(plan)) == plan


@pytest.mark.parametrize("k", [256, 257, 2048, 2049, 2 * 2048 + 128, 3 * 2048 + 1])
def test_int16_accumulation_extremes(k):
    """Every lane of the avx2 int16 accumulators at its bound for whole chunks (decode tiles: -2048 per vpmaddubsw
    on quarters 1 and 3, code 2 decoded as 8, x -128, twice, for 8 blocks = -32768; GEMM row-dot tile: -512 four
    times for 16 blocks; outer-product tile: 2 blocks), across chunk boundaries; also the positive bound and
    alternating signs."""
    m, n = 5, 6
    wt = torch.ones((n, k), dtype=torch.int8)
    wt[3] = -1
    wt[4, ::2] = 0
    for fill in (-128, 127):
        xq = torch.full((m, k), fill, dtype=torch.int8)
        xq[4, 1::2] = 127 if fill < 0 else -128
        pw = kernels.pack_ternary(wt, 1.0)
        for path in ("packed-decode", "packed-gemm", "packed-outer"):
            cpu.configure(**PATHS[path])
            assert torch.equal(kernels.matmul_int(xq, pw), reference.matmul_int(xq, wt)), (k, fill, path)


@given(n=st.integers(1, 70), k=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
def test_interleave_panel_layout(n, k, seed):
    """The outer-product tile's panel copy: dword 8c + i of group g is dword c of weight row p0 + 8g + i, zero
    past the panel (reference built with torch views)."""
    rng = _rng(seed)
    wp = reference.pack_i2(_ternary(rng, n, k, "rand")).numpy()
    p0 = int(rng.integers(0, n))
    p1 = int(rng.integers(p0 + 1, n + 1))
    groups = -(-(p1 - p0) // 8)
    wi = np.full((groups, wp.shape[1] * 8), 0xAB, np.uint8)  # junk: every byte must be written
    cpu_engine.interleave_panel(wp, p0, p1, wi)
    rows = np.zeros((groups * 8, wp.shape[1]), np.uint8)
    rows[: p1 - p0] = wp[p0:p1]
    want = rows.view(np.uint32).reshape(groups, 8, -1).transpose(0, 2, 1).reshape(groups, -1)
    assert np.array_equal(wi.view(np.uint32), want)


def test_small_work_runs_on_one_thread_and_large_work_on_the_configured_count(monkeypatch):
    """Below tuning.SERIAL_WORK multiply-adds a parallel region costs more than it saves: one thread (the kernel is
    told so, and runs in place), while larger calls use the configured count. The forward engine applies its count
    itself and gives the caller's back."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    calls = []
    packed = cpu_engine._bitlinear_packed
    monkeypatch.setattr(cpu, "_bitlinear_packed", lambda *a: calls.append(a[9]) or packed(*a))
    old = cpu.params()["threads"]
    try:
        cpu.configure(threads=2)
        small, large = kernels.pack(torch.randn(8, 64)), kernels.pack(torch.randn(1024, 1024))
        for _ in range(2):  # the general path, then the planned one
            kernels.bitlinear(torch.randn(2, 64), small)
            assert calls[-1] == 1
        kernels.bitlinear(torch.randn(2, 1024), large)
        assert calls[-1] == 2
        kernels.pack(torch.randn(8, 64))  # the packer follows the same rule
        assert numba.get_num_threads() == 1
        for _ in range(2):  # a new shape (planned by this call), then its plan: told 2, the caller's count kept
            kernels.bitlinear(torch.randn(3, 1024), large)
            assert calls[-1] == 2 and numba.get_num_threads() == 1
        kernels.grad_input(torch.randn(64, 1024), large)  # the other kernels set their count from Python
        assert numba.get_num_threads() == 2
    finally:
        cpu.configure(threads=old)


@pytest.mark.parametrize("how", ["torch.set_num_threads(1)", "OMP_NUM_THREADS=1"])
def test_the_first_kernel_call_keeps_torch_thread_count(how):
    """Numba's OpenMP layer starts by calling omp_set_num_threads(NUMBA_NUM_THREADS) in the runtime torch shares;
    the user's count (set in code, or torchrun's OMP_NUM_THREADS=1 per rank) must survive the first kernel call,
    for torch's ops and for ours, which follow it."""
    code = textwrap.dedent(f"""
        import json, numba, torch
        if {how.startswith("torch")}:
            torch.set_num_threads(1)
        torch.get_num_threads()  # torch's per-thread lazy init done: nothing of torch's would restore the count
        from bitnet_fast import kernels
        x, pw = torch.randn(64, 1024), kernels.pack(torch.randn(1024, 1024))
        kernels.bitlinear(x, pw)
        print(json.dumps([torch.get_num_threads(), numba.get_num_threads()]))
    """)
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"} | ({"OMP_NUM_THREADS": "1"} if how.startswith("OMP") else {})
    env.pop("BITNET_FAST_TUNING", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1, 1]


@pytest.mark.parametrize("path", ["packed-decode", "packed-panels", "packed-outer-panels"])
def test_one_thread_runs_in_place_and_agrees_with_the_pool(path):
    """With one thread _mm runs its tasks in place (no parallel region); both forms take every task exactly once."""
    rng = _rng(7)
    wt, xq = _ternary(rng, 700, 1100, "rand"), _int8(rng, 9, 1100, "extreme")  # 6.9M MACs: above SERIAL_WORK
    pw = kernels.pack_ternary(wt, 1.0)
    want = reference.matmul_int(xq, wt)
    for threads in (1, 2):
        cpu.configure(**PATHS[path], threads=threads)
        assert torch.equal(kernels.matmul_int(xq, pw), want), threads
        assert torch.equal(kernels.matmul_int(xq[:1], pw), want[:1]), threads


_ISA_RUN = """
import json, re, sys, numba, numpy as np, torch
from bitnet_fast import kernels
from bitnet_fast.kernels import cpu, cpu_engine, reference
assert cpu.ISA == {isa!r}
g = torch.Generator().manual_seed(0)
run = {run}
# The packed engine's entry points: the fused quantizing forward (inference and training), the quantized-input
# matmul with its epilogue, and the exact int32 product. All of them call cpu_engine._mm with the same argument
# types, so it compiles once (~20 s on a 2-vCPU Zen 1 per type combination).
E = cpu_engine
ENTRIES = (E._bitlinear_packed, E._bitlinear_train_packed, E._matmul_packed, E._matmul_int_packed)
for m, k, n in [(1, 300, 7), (6, 128, 5), (9, 700, 13), (5, 2100, 9)]:
    wt = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    x = torch.randn(m, k, generator=g)
    pw = kernels.PackedWeight(reference.pack_i2(wt), torch.tensor(0.5), (n, k), "i2")  # no cpu_pack compile
    if not run:  # compile for the target CPU only (it may not be this one): never call compiled code
        wp, tiling = pw.data.numpy(), (2, 1 << 18, True, 1)
        s, bias = np.ones(m, np.float32), np.zeros(n, np.float32)
        for fn, args in zip(ENTRIES, [(x.data_ptr(), x.data_ptr(), 0, wp.ctypes.data, m, k, n, 0.5, bias, *tiling),
                                      (x.numpy(), 0.5, wp, bias, *tiling),
                                      (xq.numpy(), s, 0.5, wp, bias, *tiling), (xq.numpy(), wp, *tiling)]):
            fn.compile(tuple(numba.typeof(a) for a in args))
        continue
    for gemm_min_m, outer in ((1, 1 << 30), (1 << 20, 1), (1, 1)):
        cpu.configure(gemm_impl="numba", gemm_min_m=gemm_min_m, outer_min_rows=outer)
        assert torch.equal(kernels.matmul_int(xq, pw), reference.matmul_int(xq, wt))
        xq_f, s_f = reference.act_quant(x)
        want = reference.matmul(xq_f, s_f, wt, torch.tensor(0.5))
        assert torch.equal(kernels.bitlinear(x, pw), want)
        y, xq_t, s_t = kernels.bitlinear_train(x, pw, None)
        assert torch.equal(y, want) and torch.equal(xq_t, xq_f) and torch.equal(s_t, s_f)
        assert torch.equal(kernels.matmul(xq_f, s_f, pw, None, torch.float32), want)
pat = r"\\b(vpdpbusd|vpmaddubsw|vpmaddwd|vpmulld|vpmovsxbd)\\b"
per_mm = [sorted(set(re.findall(pat, E._mm.inspect_asm(sig)))) for sig in E._mm.signatures]
every = sorted(set(re.findall(pat, "".join(f.inspect_asm(sig) for f in (E._mm, *ENTRIES) for sig in f.signatures))))
print(json.dumps({{"mm_signatures": per_mm, "entries": [len(f.signatures) for f in ENTRIES], "all": every}}))
"""

# The instructions each ISA path must contain: its multiply, and none of the slower class's (vnni paths must not
# fall back to vpmaddubsw; portable is generic IR that LLVM lowers with widening multiplies).
_ISA_ASM = {"vnni512": ({"vpdpbusd"}, {"vpmaddubsw"}), "vnni": ({"vpdpbusd"}, {"vpmaddubsw"}),
            "avx2": ({"vpmaddubsw", "vpmaddwd"}, {"vpdpbusd"}), "portable": ({"vpmaddwd"}, {"vpdpbusd", "vpmaddubsw"})}
# A CPU LLVM can target for each class, to compile (and read the assembly of) paths this host cannot run.
_ISA_TARGET = {"vnni512": ("znver4", "+avx2,+fma,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni"),
               "vnni": ("alderlake", "+avx2,+fma,+avxvnni"), "avx2": ("znver3", "+avx2,+fma"),
               "portable": ("x86-64", "+sse2")}


def _host_runs(isa: str) -> bool:
    f = __import__("llvmlite.binding", fromlist=["x"]).get_host_cpu_features()
    return {"vnni512": bool(f.get("avx512vnni") and f.get("avx512bw")),
            "vnni": bool(f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl"))),
            "avx2": bool(f.get("avx2")), "portable": True}[isa]


@pytest.fixture(scope="module")
def isa_compiles(tmp_path_factory):
    """One subprocess per ISA class, all started at once: each is a single-threaded LLVM compile of every entry
    point (1-3 minutes on a 2-core CI box), so on two cores they finish in about half the time of one after another.
    Output goes to files (an unread pipe could block a child); whatever is still running at teardown is killed."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the ISA classes are x86 classes")
    procs = {}
    for isa in _ISA_ASM:
        folder = tmp_path_factory.mktemp(f"isa-{isa}")
        env = {**os.environ, "BITNET_FAST_CPU_ISA": isa, "NUMBA_CACHE_DIR": str(folder), "NUMBA_NUM_THREADS": "1"}
        run = _host_runs(isa)  # fresh cache above: the assembly is there to read
        if not run:
            env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = _ISA_TARGET[isa]
        code = textwrap.dedent(_ISA_RUN.format(isa=isa, run=run))
        with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
            procs[isa] = (subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=err), folder)
    yield procs
    for proc, _ in procs.values():
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("isa", list(_ISA_ASM))
def test_each_isa_compiles_to_its_instruction_and_runs_exact_where_possible(isa, isa_compiles):
    """Every ISA path is compiled on any x86 host (for a CPU of its class when the host is not one) through every
    packed-engine entry point, the fused quantizing bitlinear included, and its assembly checked; where the host
    can execute it, it also runs against the reference (torch.equal)."""
    proc, folder = isa_compiles[isa]
    rc = proc.wait(timeout=1200)
    assert rc == 0, (folder / "err.txt").read_text()[-3000:]
    got = json.loads((folder / "out.txt").read_text().strip().splitlines()[-1])
    must, must_not = _ISA_ASM[isa]
    assert len(got["mm_signatures"]) == 1 and all(got["entries"]), got  # one engine serves every entry point
    for found in got["mm_signatures"]:  # each compiled variant of the engine uses this ISA's multiply...
        assert must <= set(found), (isa, got)
    assert not (must_not & set(got["all"])), (isa, got)  # ...and no entry point uses the slower class's


@given(shape=shapes, seed=st.integers(0, 2**32 - 1), path=st.sampled_from(sorted(PATHS)), use_bias=st.booleans())
def test_bitlinear_train_returns_the_forward_and_its_quantized_activations(shape, seed, path, use_bias):
    """The training forward is bitlinear's output (bit for bit) plus act_quant's xq and s, in one pass."""
    m, k, n = shape
    rng = _rng(seed)
    cpu.configure(**PATHS[path])
    x = _floats(rng, m, k).clamp(-1e4, 1e4)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if use_bias else None
    pw = kernels.pack(torch.randn(n, k))
    y, xq, s = kernels.bitlinear_train(x, pw, bias)
    xq_ref, s_ref = reference.act_quant(x)
    assert torch.equal(y, kernels.bitlinear(x, pw, bias)) and xq.is_contiguous() and xq.shape == (m, k)
    assert torch.equal(xq, xq_ref) and torch.equal(s.isnan(), s_ref.isnan())
    assert torch.equal(s[~s.isnan()], s_ref[~s_ref.isnan()])
