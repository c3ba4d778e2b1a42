"""Triton backend: activation quant, i2g weight packing, int8 x ternary GEMV/GEMM, backward products.

Same contracts as `reference.py` (integer results bit-exact, round-half-even, fp32 float math). The weight
format is `i2g` (16 two-bit codes per int32 along K, natural order; see reference.pack_i2g): one load of a
(BLOCK_N, BLOCK_KW) word tile plus a shift and a mask rebuilds a (BLOCK_N, 16 * BLOCK_KW) ternary tile in
registers, which feeds `tl.dot` (int8 -> int32) or, for M = 1, a multiply-reduce on the CUDA cores.

Kernels run on CUDA tensors. When TRITON_INTERPRET=1 is set before this module is imported, `@triton.jit`
builds interpreted kernels and CPU tensors are accepted too: that is how the tests run without a GPU. The
interpreter then runs the same kernel source, configs and flags as CUDA: `triton_interp.install()` makes it
compute bf16 dots and casts as the GPU does and execute the one PTX instruction used (dp4a), and autotuning picks
each kernel's first config (the interpreter cannot time them; the tests force every config in turn).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import reference, triton_interp
from .packing import PackedWeight, get_format

name = "triton"
default_format = "i2g"
bitlinear_takes_nd = False  # kernels.bitlinear flattens leading dims first
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
# 0: each kernel's first (default) config; the default under the interpreter, which has no clock to tune by.
AUTOTUNE = os.environ.get("BITNET_FAST_TRITON_AUTOTUNE", "0" if INTERPRET else "1") != "0"
GEMV_MAX_M = 16  # M <= this takes the bandwidth-bound GEMV kernel (decode); larger M the tiled GEMM
CODES = reference.I2G_CODES  # 2-bit codes per int32 word
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
USE_DP4A = torch.version.hip is None  # PTX dp4a on NVIDIA (and the interpreter); an exact emulation on ROCm
if INTERPRET:
    triton_interp.install()
_EXACT = {"enable_fp_fusion": False}  # no FMA in the epilogue: acc * (gamma / s) + bias rounds like the reference


# ----------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _rne(v):
    """Round half to even, exactly (floor-based: no reliance on libdevice, which the interpreter lacks)."""
    f = tl.floor(v)
    d = v - f  # exact in fp32
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _quant(x, s):
    """fp32 x, fp32 row scale s -> int8 clip(round(x * s)); a NaN scale (non-finite row) gives 0."""
    q = tl.minimum(tl.maximum(_rne(x * s), -128.0), 127.0)
    return tl.where(s == s, q, 0.0).to(tl.int8)


@triton.jit
def _unpack_codes(words, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """(BLOCK_N, BLOCK_KW) int32 i2g words -> (BLOCK_N, 16 * BLOCK_KW) int32 codes c = w + 1 in {0, 1, 2}."""
    shifts = 2 * tl.arange(0, 16)
    codes = (words[:, :, None] >> shifts[None, None, :]) & 3  # (BN, BKW, 16)
    return tl.reshape(codes, (BLOCK_N, BLOCK_KW * 16))


@triton.jit
def _unpack_tile(words, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """(BLOCK_N, BLOCK_KW) int32 i2g words -> (BLOCK_N, 16 * BLOCK_KW) int32 weights in {-1, 0, 1}."""
    return _unpack_codes(words, BLOCK_N, BLOCK_KW) - 1


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum over the 4 bytes of (unsigned a[i]) * (signed b[i]): PTX dp4a, or an exact emulation."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return c


@triton.jit
def _store_epilogue(acc, offs_m, offs_n, M, N, s_ptr, gamma_ptr, bias_ptr, out_ptr, stride_om,
                    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store (BM, BN) int32 acc as is, or as acc * (gamma / s) (+ bias) in out's dtype."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    if EPILOGUE:
        s = tl.load(s_ptr + offs_m, mask=offs_m < M, other=1.0)
        y = acc.to(tl.float32) * tl.div_rn(tl.load(gamma_ptr), s)[:, None]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


# ----------------------------------------------------------------------------------------------- quantization
@triton.jit
def _row_scale(x_row, K, stride_xk, BLOCK_K: tl.constexpr):
    """s = 127 / max(max|x|, 1e-5) for one row, NaN when the row holds NaN or +-Inf."""
    amax = tl.zeros((BLOCK_K,), tl.float32)
    bad = tl.zeros((BLOCK_K,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        ax = tl.abs(tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32))
        bad = tl.maximum(bad, ((ax != ax) | (ax > 3.4028234663852886e38)).to(tl.int32))
        amax = tl.maximum(amax, ax)
    s = tl.div_rn(1.0, tl.maximum(tl.max(amax, 0), 1e-5)) * 127.0  # torch's 127 / t is reciprocal(t) * 127
    return tl.where(tl.max(bad, 0) > 0, float("nan"), s)


@triton.jit
def _act_quant_kernel(x_ptr, xq_ptr, s_ptr, xsum_ptr, K, stride_xm, stride_xk, stride_qm, BLOCK_K: tl.constexpr):
    """One row per program: absmax -> s -> xq, plus sum(xq) (the GEMM's correction for unsigned codes)."""
    x_row = x_ptr + tl.program_id(0).to(tl.int64) * stride_xm
    s = _row_scale(x_row, K, stride_xk, BLOCK_K)
    tl.store(s_ptr + tl.program_id(0), s)
    q_row = xq_ptr + tl.program_id(0).to(tl.int64) * stride_qm
    total = tl.zeros((BLOCK_K,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        q = _quant(tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32), s)
        tl.store(q_row + offs, q, mask=offs < K)
        total += q.to(tl.int32)
    tl.store(xsum_ptr + tl.program_id(0), tl.sum(total, 0))


@triton.jit
def _pack_x_kernel(x_ptr, s_ptr, xp_ptr, K, KW, stride_xk, QUANT: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_W: tl.constexpr):
    """The M = 1 GEMV's prologue (one program): optionally quantize (storing s), then pack x into dp4a order,
    xp[4t + j] = bytes x[16t + j + 4i] for i = 0..3 (zeros past K), and store sum(x) at xp[4 * KW]."""
    if QUANT:
        s = _row_scale(x_ptr, K, stride_xk, BLOCK_K)
        tl.store(s_ptr, s)
    j = tl.arange(0, 4)
    xsum = tl.zeros((BLOCK_W, 4, 4), tl.int32)
    for w0 in range(0, KW, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        offs_k = offs_w[:, None, None] * 16 + j[None, :, None] + 4 * j[None, None, :]  # (BW, j, i)
        x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0)
        if QUANT:
            x = _quant(x.to(tl.float32), s)
        x = x.to(tl.int32)
        xsum += x
        xp = tl.sum((x & 0xFF) << (8 * j)[None, None, :], axis=2)  # (BW, j): disjoint bytes, sum == or
        tl.store(xp_ptr + offs_w[:, None] * 4 + j[None, :], xp, mask=(offs_w < KW)[:, None])
    tl.store(xp_ptr + 4 * KW, tl.sum(tl.sum(tl.sum(xsum, axis=2), axis=1), axis=0))


@triton.jit
def _abs_sum_kernel(w_ptr, part_ptr, numel, BLOCK: tl.constexpr):
    """Per-program fp64 partial sums of |w| (the reference accumulates gamma's mean in fp64)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.abs(w).to(tl.float64), 0))


@triton.jit
def _ternarize_kernel(w_ptr, gamma_ptr, wt_ptr, numel, BLOCK: tl.constexpr):
    """wt = clip(round(w / gamma), -1, 1) as int8, with IEEE division like the reference."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    v = tl.div_rn(w, tl.load(gamma_ptr))
    q = tl.where(v != v, 0.0, tl.minimum(tl.maximum(_rne(v), -1.0), 1.0))  # NaN -> 0, as torch's int8 cast
    tl.store(wt_ptr + offs, q.to(tl.int8), mask=offs < numel)


@triton.jit
def _pack_kernel(wt_ptr, out_ptr, K, KW, stride_wn, stride_wk, BLOCK_W: tl.constexpr):
    """(N, K) int8 ternary -> (N, KW) int32 i2g words; K beyond the matrix packs as code 1 (weight 0)."""
    n = tl.program_id(0).to(tl.int64)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    j = tl.arange(0, 16)
    k = offs_w[:, None] * 16 + j[None, :]  # (BW, 16)
    c = tl.load(wt_ptr + n * stride_wn + k * stride_wk, mask=k < K, other=0).to(tl.int32) + 1
    words = tl.sum(c << (2 * j)[None, :], axis=1)  # disjoint bit fields: sum == or (wraps into the sign bit)
    tl.store(out_ptr + n * KW + offs_w, words, mask=offs_w < KW)


@triton.jit
def _unpack_kernel(w_ptr, wt_ptr, K, KW, stride_wn, stride_ww, BLOCK_W: tl.constexpr):
    """(N, KW) int32 i2g words -> (N, K) int8 ternary (contiguous)."""
    n = tl.program_id(0).to(tl.int64)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    words = tl.load(w_ptr + n * stride_wn + offs_w * stride_ww, mask=offs_w < KW, other=0)
    j = tl.arange(0, 16)
    k = offs_w[:, None] * 16 + j[None, :]  # (BW, 16)
    c = (words[:, None] >> (2 * j)[None, :]) & 3
    tl.store(wt_ptr + n * K + k, (c - 1).to(tl.int8), mask=k < K)


# ----------------------------------------------------------------------------------------------- matmul kernels
# Every autotune config of each kernel (the first is the default). The autotuners get all of them, or only the first
# when AUTOTUNE is off; tests/test_kernels_gpu.py runs each one (interpreter or GPU) and compiles each for sm_90.
GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw}, num_warps=w, num_stages=3)  # none spill on sm_90
                for bn, bkw, w in [(64, 8, 4), (16, 16, 4), (32, 8, 4), (32, 16, 4), (32, 16, 8), (64, 16, 8),
                                   (128, 8, 8)]]
GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": bkw, "GROUP_M": 8}, num_stages=st, num_warps=w)
                for bm, bn, bkw, st, w in [(128, 128, 8, 3, 8), (128, 256, 4, 3, 8), (256, 128, 4, 3, 8),
                                           (128, 128, 8, 4, 8), (64, 128, 8, 4, 4), (128, 64, 8, 4, 4),
                                           (128, 128, 4, 4, 4), (64, 64, 8, 4, 4)]]  # none spill on sm_90
# Backward: tensor-core tiles for bf16/fp16 grads, small tiles for IEEE fp32 (FMA dots spill on big tiles;
# (64, 32, 4) spills on sm_90). _prune_grad_input keeps the right group per call.
_GRAD_BIG = [(128, 128, 8, 3, 8), (128, 64, 8, 4, 4), (64, 128, 8, 4, 4), (128, 128, 4, 4, 4)]
_GRAD_IEEE = [(32, 32, 4, 2, 4), (64, 16, 4, 2, 4), (32, 16, 4, 2, 4)]
GRAD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": bkw, "GROUP_M": 8}, num_stages=st, num_warps=w)
                for bm, bn, bkw, st, w in _GRAD_BIG + _GRAD_IEEE]


def _tuned(configs: list[triton.Config]) -> list[triton.Config]:
    return configs if AUTOTUNE else configs[:1]


@triton.autotune(configs=_tuned(GEMV_CONFIGS), key=["N", "KW", "SPLIT_K"], reset_to_zero=["acc_ptr"])
@triton.jit
def _gemv1_kernel(xp_ptr, s_ptr, w_ptr, gamma_ptr, bias_ptr, out_ptr, acc_ptr, N, KW, stride_wn, stride_ww, stride_om,
                  SPLIT_K: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DP4A: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Decode M = 1 on the CUDA cores at ~2 integer instructions per 4 weights, so HBM stays the bottleneck.

    `word & (0x03030303 << 2j)` leaves 4**j times the codes of k = 16t + j + 4i (i = 0..3) in the four bytes
    of one register (no shift), and dp4a multiplies them by the four x bytes packed in that order by
    _pack_x_kernel: one LOP3 + one dp4a per 4 weights. Each j keeps its own accumulator, divided by 4**j (a
    shift) after the loop; |acc| < 2**31 for K < 2**18. Codes are w + 1, so sum(c * x) - sum(x) = sum(w * x):
    the first split subtracts sum(x). Grid and split-K as in _gemv_kernel.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 4)
    per_split = tl.cdiv(tl.cdiv(KW, SPLIT_K), BLOCK_KW) * BLOCK_KW
    w_lo = tl.program_id(1) * per_split
    acc = tl.zeros((BLOCK_N, BLOCK_KW, 4), tl.int32)  # per (row, word, j) partial sums of 4**j * c * x
    for w0 in range(w_lo, tl.minimum(w_lo + per_split, KW), BLOCK_KW):
        offs_w = w0 + tl.arange(0, BLOCK_KW)
        words = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_w[None, :] * stride_ww,
                        mask=(offs_n < N)[:, None] & (offs_w < KW)[None, :], other=0)
        # x loaded straight into the (BN, BKW, j) layout (L1 hits across rows) instead of a shared-memory broadcast
        xp_offs = offs_w[None, :, None] * 4 + j[None, None, :] + 0 * offs_n[:, None, None]
        xp = tl.load(xp_ptr + xp_offs, mask=xp_offs < 4 * KW, other=0)
        codes = words[:, :, None] & (0x03030303 << (2 * j))[None, None, :]  # (BN, BKW, j): bytes c * 4**j
        acc = _dp4a(codes, xp, acc, USE_DP4A)
    acc = acc >> (2 * j)[None, None, :]  # exact: every term was a multiple of 4**j
    dot = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.where(tl.program_id(1) == 0, tl.load(xp_ptr + 4 * KW), 0)
    if SPLIT_K == 1:
        _store_epilogue(dot[None, :], tl.arange(0, 1), offs_n, 1, N, s_ptr, gamma_ptr, bias_ptr, out_ptr, stride_om,
                        EPILOGUE, HAS_BIAS)
    else:
        tl.atomic_add(acc_ptr + offs_n, dot, mask=offs_n < N, sem="relaxed")


@triton.autotune(configs=_tuned(GEMV_CONFIGS), key=["N", "KW", "SPLIT_K"], reset_to_zero=["acc_ptr"])
@triton.jit
def _gemv_kernel(x_ptr, s_ptr, w_ptr, gamma_ptr, bias_ptr, out_ptr, acc_ptr, M, N, K, KW,
                 stride_xm, stride_xk, stride_wn, stride_ww, stride_om,
                 SPLIT_K: tl.constexpr, EPILOGUE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Decode 2 <= M <= 16: grid (N tiles, SPLIT_K); each program streams its K range of BLOCK_N weight rows once
    into one 16-row int8 tl.dot. With SPLIT_K > 1 the int32 partials are atomically added into acc (exact,
    order-free) and the epilogue runs as a second kernel. (Quantizing float x in this loop was measured in SASS
    at 27-90 instructions per weight, re-done for every N tile: bitlinear writes int8 xq first instead.)
    """
    BLOCK_M: tl.constexpr = 16
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per_split = tl.cdiv(tl.cdiv(KW, SPLIT_K), BLOCK_KW) * BLOCK_KW  # words per split, a multiple of BLOCK_KW
    w_lo = tl.program_id(1) * per_split
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    xsum = tl.zeros((BLOCK_M, BLOCK_KW * 16), tl.int32)  # this split's row sums of x, reduced after the loop
    for w0 in range(w_lo, tl.minimum(w_lo + per_split, KW), BLOCK_KW):
        offs_w = w0 + tl.arange(0, BLOCK_KW)
        w_mask = (offs_n < N)[:, None] & (offs_w < KW)[None, :]
        words = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_w[None, :] * stride_ww,
                        mask=w_mask, other=0)
        codes = _unpack_codes(words, BLOCK_N, BLOCK_KW).to(tl.int8)  # (BN, BK) unsigned codes c = w + 1
        offs_k = w0 * 16 + tl.arange(0, BLOCK_KW * 16)
        x_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask, other=0)
        xsum += x.to(tl.int32)
        acc += tl.dot(x, tl.trans(codes), out_dtype=tl.int32)
    acc -= tl.sum(xsum, axis=1)[:, None]  # x . w = x . c - sum(x)
    if SPLIT_K == 1:
        _store_epilogue(acc, offs_m, offs_n, M, N, s_ptr, gamma_ptr, bias_ptr, out_ptr, stride_om, EPILOGUE, HAS_BIAS)
    else:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.atomic_add(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask, sem="relaxed")


@triton.jit
def _epilogue_kernel(acc_ptr, s_ptr, gamma_ptr, bias_ptr, out_ptr, M, N, stride_om,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The split-K GEMV's epilogue: one row tile of the (M, N) int32 accumulator per program."""
    offs_m = tl.program_id(0) + tl.arange(0, 1)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.load(acc_ptr + offs_m[:, None] * N + offs_n[None, :], mask=(offs_n < N)[None, :], other=0)
    _store_epilogue(acc, offs_m, offs_n, M, N, s_ptr, gamma_ptr, bias_ptr, out_ptr, stride_om, True, HAS_BIAS)


@triton.autotune(configs=_tuned(GEMM_CONFIGS), key=["M_BUCKET", "N", "KW"])
@triton.jit
def _gemm_kernel(x_ptr, xsum_ptr, s_ptr, w_ptr, gamma_ptr, bias_ptr, out_ptr, M, N, K, KW, M_BUCKET,
                 stride_xm, stride_xk, stride_wn, stride_ww, stride_om,
                 EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GROUP_M: tl.constexpr):
    """Prefill/training (M > 16): grouped-order tiles, int8 tl.dot on weights unpacked in registers.

    The dot takes the unsigned codes c = w + 1 and the epilogue subtracts the row sums of x (x . w = x . c -
    sum(x)): one instruction less per unpacked weight (6.5 -> 5.5 SASS instr/weight at 128x128x128, sm_90)."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for w0 in range(0, KW, BLOCK_KW):
        offs_w = w0 + tl.arange(0, BLOCK_KW)
        offs_k = w0 * 16 + tl.arange(0, BLOCK_KW * 16)
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0)
        words = tl.load(w_rows + offs_w[None, :] * stride_ww, mask=(offs_n < N)[:, None] & (offs_w < KW)[None, :],
                        other=0)
        codes = _unpack_codes(words, BLOCK_N, BLOCK_KW).to(tl.int8)  # (BN, BK)
        acc += tl.dot(x, tl.trans(codes), out_dtype=tl.int32)
    acc -= tl.load(xsum_ptr + offs_m, mask=offs_m < M, other=0)[:, None]
    _store_epilogue(acc, offs_m, offs_n, M, N, s_ptr, gamma_ptr, bias_ptr, out_ptr, stride_om, EPILOGUE, HAS_BIAS)


def _grad_configs() -> list[triton.Config]:
    """GRAD_CONFIGS, or the first of each group (one per IEEE flag) when AUTOTUNE is off."""
    return GRAD_CONFIGS if AUTOTUNE else [GRAD_CONFIGS[0], GRAD_CONFIGS[len(_GRAD_BIG)]]


def _prune_grad_input(configs, named_args, **kwargs):
    return [c for c in configs if (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_KW"] <= 256) == bool(kwargs["IEEE"])]


@triton.autotune(configs=_grad_configs(), key=["M_BUCKET", "N", "KW", "IEEE"],
                 prune_configs_by={"early_config_prune": _prune_grad_input})
@triton.jit
def _grad_input_kernel(g_ptr, w_ptr, gamma_ptr, out_ptr, M, N, K, KW, M_BUCKET,
                       stride_gm, stride_gn, stride_wn, stride_ww, stride_om, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GROUP_M: tl.constexpr):
    """dX (M, K) fp32 = grad_y (M, N) @ Wt (N, K) * gamma, Wt unpacked from i2g in registers (never in HBM)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    offs_k = tl.program_id(1) * BLOCK_KW * 16 + tl.arange(0, BLOCK_KW * 16)
    acc = tl.zeros((BLOCK_M, BLOCK_KW * 16), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=(offs_m < M)[:, None] & (offs_n < N)[None, :], other=0.0)
        words = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_w[None, :] * stride_ww,
                        mask=(offs_n < N)[:, None] & (offs_w < KW)[None, :], other=0)
        wt = _unpack_tile(words, BLOCK_N, BLOCK_KW)  # (BN, BK), exact in any float dtype
        if IEEE:
            acc += tl.dot(g.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(g, wt.to(g.dtype))
    y = acc * tl.load(gamma_ptr)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :], y, mask=mask)


@triton.autotune(configs=_tuned(GRAD_CONFIGS[: len(_GRAD_BIG)]), key=["M_BUCKET", "N", "K"])
@triton.jit
def _grad_weight_kernel(g_ptr, xq_ptr, s_ptr, out_ptr, M, N, K, M_BUCKET, stride_gm, stride_gn, stride_xm, stride_xk,
                        stride_on, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_KW: tl.constexpr, GROUP_M: tl.constexpr):
    """dW (N, K) fp32 = sum_m (grad_y[m, :] / s[m])^T xq[m, :]: grad_y / s is formed in fp32 and rounded once to
    grad_y's dtype so the product runs on tensor cores; xq is exact in bf16/fp16 (fp32 grads never come here:
    grad_weight sends them to cuBLAS). Tiles: BLOCK_M output rows
    (over N), 16 * BLOCK_KW output columns (over K), BLOCK_N rows of the M reduction per step."""
    offs_n = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_KW * 16 + tl.arange(0, BLOCK_KW * 16)
    acc = tl.zeros((BLOCK_M, BLOCK_KW * 16), tl.float32)
    for m0 in range(0, M, BLOCK_N):
        offs_m = m0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + offs_m.to(tl.int64)[None, :] * stride_gm + offs_n[:, None] * stride_gn,
                    mask=(offs_n < N)[:, None] & (offs_m < M)[None, :], other=0.0)  # (BM over N, BN over M)
        s = tl.load(s_ptr + offs_m, mask=offs_m < M, other=1.0)
        a = (g.to(tl.float32) / s[None, :]).to(g.dtype)
        x = tl.load(xq_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0)  # (BN over M, BK)
        acc += tl.dot(a, x.to(g.dtype))
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_k[None, :], acc, mask=mask)


# ----------------------------------------------------------------------------------------------- host checks
def _check(arg: str, t, dtypes=None) -> None:
    """TypeError for a non-tensor or wrong dtype; ValueError for a tensor this backend cannot run on."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
        raise ValueError(
            f"{arg} is on {t.device}; the triton backend needs CUDA tensors (move it with .to('cuda')), "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU for testing"
        )
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{arg} has dtype {t.dtype}; expected one of {list(dtypes)} (convert with .to(...))")


def _check_i2g(pw) -> None:
    if not isinstance(pw, PackedWeight):
        raise TypeError(f"pw must be a PackedWeight (from kernels.pack), got {type(pw).__name__}")
    _check("pw.data", pw.data)
    _check("pw.gamma", pw.gamma)
    if pw.format != "i2g":
        raise ValueError(
            f"pw is in format {pw.format!r}; the triton kernels compute on 'i2g': convert it once with "
            "bitnet_fast.kernels.repack(pw, 'i2g')"
        )


def _gamma(pw: PackedWeight) -> torch.Tensor:
    return pw.gamma.to(device=pw.data.device, dtype=torch.float32).reshape(1)


# ----------------------------------------------------------------------------------------------- backend API
def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (xq int8 (M, K), s fp32 (M,)): per-row absmax; non-finite rows get xq = 0, s = NaN."""
    _check("x", x2d, FLOAT_DTYPES)
    return _act_quant(x2d)[:2]


def _act_block(k: int) -> int:
    return min(triton.next_power_of_2(k), 4096)


def _act_quant(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (xq, s, row sums of xq as int32)."""
    m, k = x2d.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    s = torch.empty(m, dtype=torch.float32, device=x2d.device)
    xsum = torch.empty(m, dtype=torch.int32, device=x2d.device)
    if m > 0:
        block = _act_block(k)
        _act_quant_kernel[(m,)](x2d, xq, s, xsum, k, x2d.stride(0), x2d.stride(1), xq.stride(0),
                                BLOCK_K=block, num_warps=4 if block <= 1024 else 8)
    return xq, s, xsum


def quantize_weight(w2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (Wt int8 ternary (N, K), gamma fp32 0-d): absmean, mean accumulated in fp64."""
    _check("w", w2d, FLOAT_DTYPES)
    w = w2d.contiguous()
    numel, block = w.numel(), 4096
    if numel == 0:  # like the reference: the mean of nothing is NaN
        return torch.empty(w.shape, dtype=torch.int8, device=w.device), torch.tensor(float("nan"), device=w.device)
    parts = torch.empty(triton.cdiv(numel, block), dtype=torch.float64, device=w.device)
    _abs_sum_kernel[(parts.numel(),)](w, parts, numel, BLOCK=block)
    gamma = (parts.sum() / numel).float().clamp(min=reference.EPS)
    wt = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    _ternarize_kernel[(parts.numel(),)](w, gamma, wt, numel, BLOCK=block)
    return wt, gamma


def pack(wt: torch.Tensor, gamma: torch.Tensor, fmt: str) -> PackedWeight:
    """(N, K) int8 ternary + scale -> PackedWeight; i2g packs on the GPU, other formats via the reference."""
    _check("wt", wt, (torch.int8,))
    _check("gamma", gamma, (torch.float32,))
    n, k = wt.shape
    if fmt != "i2g":
        data = get_format(fmt).pack(wt.cpu()).to(wt.device)
        return PackedWeight(data, gamma.reshape(()), (n, k), fmt)
    kw = reference.padded_k(k) // CODES
    data = torch.empty((n, kw), dtype=torch.int32, device=wt.device)
    _pack_kernel[(n, triton.cdiv(kw, 64))](wt, data, k, kw, wt.stride(0), wt.stride(1), BLOCK_W=64)
    return PackedWeight(data, gamma.reshape(()), (n, k), fmt)


def unpack(pw: PackedWeight) -> torch.Tensor:
    """PackedWeight -> (N, K) int8 ternary on the packed weight's device."""
    if isinstance(pw, PackedWeight) and pw.format != "i2g":
        _check("pw.data", pw.data)
        return get_format(pw.format).unpack(pw.data.cpu(), pw.in_features).to(pw.device)
    _check_i2g(pw)
    (n, k), kw = pw.shape, pw.data.shape[1]
    wt = torch.empty((n, k), dtype=torch.int8, device=pw.device)
    _unpack_kernel[(n, triton.cdiv(kw, 64))](pw.data, wt, k, kw, pw.data.stride(0), pw.data.stride(1), BLOCK_W=64)
    return wt


def _split_k(n: int, kw: int, device: torch.device) -> int:
    """Split K until the GEMV has ~2 programs per SM (nominal 32-row tiles), keeping >= 64 words per split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split, tiles = 1, triton.cdiv(n, 32)
    while tiles * split < 2 * sms and kw // (2 * split) >= 64:
        split *= 2
    return split


def _matmul(x, s, pw, bias, out_dtype, quant_x: bool, epilogue: bool, split_k: int | None = None, xsum=None):
    """Shared driver: GEMV for M <= 16 (optionally split-K), tiled GEMM otherwise. x is int8, or float with
    quant_x (M = 1 only: the GEMV prologue quantizes it and stores s)."""
    m, k = x.shape
    n, kw = pw.out_features, pw.data.shape[1]
    dev = x.device
    out = torch.empty((m, n), dtype=out_dtype if epilogue else torch.int32, device=dev)
    if m == 0:
        return out
    gamma = _gamma(pw)
    if quant_x:
        assert m == 1, "float x is quantized in the M = 1 prologue only"
        s = torch.empty(1, dtype=torch.float32, device=dev)
    s = s if s is not None else gamma  # an unused pointer when there is no epilogue
    bias_t = bias if bias is not None else gamma
    common = (x.stride(0), x.stride(1), pw.data.stride(0), pw.data.stride(1), out.stride(0))
    if m <= GEMV_MAX_M:
        split = split_k or _split_k(n, kw, dev)
        acc = out if split == 1 or not epilogue else torch.empty((m, n), dtype=torch.int32, device=dev)
        if split > 1:
            acc.zero_()
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
        flags = dict(SPLIT_K=split, EPILOGUE=epilogue, HAS_BIAS=bias is not None, **_EXACT)
        if m == 1:
            xp = torch.empty(4 * kw + 1, dtype=torch.int32, device=dev)  # dp4a-ordered x, then sum(x)
            _pack_x_kernel[(1,)](x, s, xp, k, kw, x.stride(1), QUANT=quant_x, BLOCK_K=_act_block(k), BLOCK_W=64,
                                 num_warps=8)
            _gemv1_kernel[grid](xp, s, pw.data, gamma, bias_t, out, acc, n, kw, *common[2:], USE_DP4A=USE_DP4A,
                                **flags)
        else:
            _gemv_kernel[grid](x, s, pw.data, gamma, bias_t, out, acc, m, n, k, kw, *common, **flags)
        if split > 1 and epilogue:
            _epilogue_kernel[(m, triton.cdiv(n, 1024))](acc, s, gamma, bias_t, out, m, n, out.stride(0),
                                                        HAS_BIAS=bias is not None, BLOCK_N=1024, **_EXACT)
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if xsum is None:  # row sums for the unsigned-code correction (bitlinear gets them from the act-quant kernel)
        xsum = x.sum(dim=1, dtype=torch.int32)
    _gemm_kernel[grid](x, xsum, s, pw.data, gamma, bias_t, out, m, n, k, kw, triton.next_power_of_2(m), *common,
                       EPILOGUE=epilogue, HAS_BIAS=bias is not None, **_EXACT)
    return out


def _check_mm(xq, pw, s=None, bias=None) -> None:
    _check("xq", xq, (torch.int8,))
    _check_i2g(pw)
    if s is not None:
        _check("s", s, (torch.float32,))
    if bias is not None:
        _check("bias", bias, FLOAT_DTYPES)


def matmul_int(xq: torch.Tensor, pw: PackedWeight, split_k: int | None = None) -> torch.Tensor:
    """(M, K) int8 x packed (N, K) -> (M, N) int32, exact. split_k overrides the GEMV's heuristic."""
    _check_mm(xq, pw)
    return _matmul(xq, None, pw, None, None, quant_x=False, epilogue=False, split_k=split_k)


def matmul(xq, s, pw, bias=None, out_dtype=torch.float32, split_k: int | None = None) -> torch.Tensor:
    """(M, K) int8, (M,) scales x packed (N, K) -> (M, N) out_dtype: acc * gamma / s (+ bias), fused epilogue."""
    _check_mm(xq, pw, s, bias)
    return _matmul(xq, s, pw, bias, out_dtype, quant_x=False, epilogue=True, split_k=split_k)


def bitlinear(x2d, pw, bias=None, out_dtype=torch.float32, split_k: int | None = None) -> torch.Tensor:
    """(M, K) float -> (M, N) in two launches. M = 1: the GEMV's prologue kernel quantizes x and packs it in dp4a
    order (xq never reaches memory). M > 1: int8 xq is written once, then read by the GEMV / GEMM (each x tile
    is read N / BLOCK_N times, so re-quantizing it per tile would cost more than the M * K byte round trip)."""
    _check("x", x2d, FLOAT_DTYPES)
    _check_i2g(pw)
    if bias is not None:
        _check("bias", bias, FLOAT_DTYPES)
    if x2d.shape[0] == 1:
        return _matmul(x2d, None, pw, bias, out_dtype, quant_x=True, epilogue=True, split_k=split_k)
    xq, s, xsum = _act_quant(x2d)
    return _matmul(xq, s, pw, bias, out_dtype, quant_x=False, epilogue=True, split_k=split_k, xsum=xsum)


def grad_input(grad_y2d: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """(M, N) float grad x ternary (N, K) * gamma -> (M, K) fp32; fp32 grads use IEEE fp32 dots (no TF32)."""
    _check("grad_y", grad_y2d, FLOAT_DTYPES)
    _check_i2g(pw)
    (m, n), (k, kw) = grad_y2d.shape, (pw.in_features, pw.data.shape[1])
    out = torch.empty((m, k), dtype=torch.float32, device=grad_y2d.device)
    if m == 0:
        return out
    ieee = grad_y2d.dtype == torch.float32
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(kw, meta["BLOCK_KW"]))  # noqa: E731
    _grad_input_kernel[grid](grad_y2d, pw.data, _gamma(pw), out, m, n, k, kw, triton.next_power_of_2(m),
                             grad_y2d.stride(0), grad_y2d.stride(1), pw.data.stride(0), pw.data.stride(1),
                             out.stride(0), IEEE=ieee)
    return out


def grad_weight(grad_y2d: torch.Tensor, xq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """grad_y^T (N, M) x (xq / s) (M, K) -> (N, K) fp32.

    fp32 grads: the reference's fp32 GEMM (cuBLAS; honours torch.backends.cuda.matmul.allow_tf32). bf16/fp16
    grads: a tensor-core kernel on grad_y / s rounded once to grad_y's dtype (<= 2**-9 relative per term for
    bf16, the precision bf16 training has anyway) with fp32 accumulation and output."""
    _check("grad_y", grad_y2d, FLOAT_DTYPES)
    _check("xq", xq, (torch.int8,))
    _check("s", s, (torch.float32,))
    if grad_y2d.dtype == torch.float32:
        return reference.grad_weight(grad_y2d, xq, s)
    (m, n), k = grad_y2d.shape, xq.shape[1]
    out = torch.empty((n, k), dtype=torch.float32, device=xq.device)
    if m == 0:
        return out.zero_()
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(k, 16 * meta["BLOCK_KW"]))  # noqa: E731
    _grad_weight_kernel[grid](grad_y2d, xq, s, out, m, n, k, triton.next_power_of_2(m), grad_y2d.stride(0),
                              grad_y2d.stride(1), xq.stride(0), xq.stride(1), out.stride(0))
    return out
