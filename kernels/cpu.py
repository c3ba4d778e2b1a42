"""The "numba" backend: int8 activations x ternary i2 weights on CPU, exact in int32, multi-threaded.

Two paths, picked by `gemv_max_m` (kernels/tuning.py):
  * packed (M small: decode): a Numba kernel reads the i2 bytes directly. Codes c = w + 1 are unsigned, so
    x.w = x.c - sum(x); the inner loop is an LLVM-IR intrinsic doing u8 x s8 dot products
    (AVX-512-VNNI 512-bit or AVX-VNNI 256-bit `vpdpbusd`, else AVX2 `vpmaddubsw`, else generic IR).
  * GEMM (M large: prefill/training): i2 tiles are unpacked to int8 and multiplied by oneDNN's
    `torch._int_mm` (VNNI int8 GEMM); the epilogue acc * gamma / s (+ bias) runs in Numba.
Everything compiles lazily on first call (`cache=True`); the ISA is read once from the host CPU and can be
forced with BITNET_FAST_CPU_ISA=vnni512|vnni|avx2|portable (use a fresh NUMBA_CACHE_DIR when you change it).
"""

from __future__ import annotations

import os
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import reference, tuning
from .cpu_pack import pack, quantize_weight, unpack
from .packing import PackedWeight

__all__ = ["bitlinear", "configure", "grad_input", "grad_weight", "matmul", "matmul_int", "pack", "params",
           "quantize_activations", "quantize_weight", "unpack"]

name = "numba"
default_format = "i2"
ISAS = ("vnni512", "vnni", "avx2", "portable")


def _detect_isa() -> str:
    forced = os.environ.get("BITNET_FAST_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"BITNET_FAST_CPU_ISA={forced!r} is not one of {ISAS}")
        return forced
    f = llvm_binding.get_host_cpu_features()
    if f.get("avx512vnni") and f.get("avx512bw"):
        return "vnni512"
    if f.get("avxvnni") or (f.get("avx512vnni") and f.get("avx512vl")):
        return "vnni"
    return "avx2" if f.get("avx2") else "portable"


ISA = _detect_isa()
WIDE = 64 if ISA == "vnni512" else 32  # packed bytes per vector load: 512-bit vpdpbusd, else 256-bit
ACCS = 16 if ISA == "vnni512" else 8  # vector accumulators per dot call (32 zmm vs 16 ymm registers)
BLOCK = reference.I2_BLOCK  # 128 weights = 32 packed bytes

# ---------------------------------------------------------------------------------------- the dot intrinsic
_I8x32 = ir.VectorType(ir.IntType(8), 32)
_I16x16 = ir.VectorType(ir.IntType(16), 16)
_I32x8 = ir.VectorType(ir.IntType(32), 8)
_I64 = ir.IntType(64)


def _fn(builder, fname: str, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), fname)


def _generic_dot(builder, acc, codes, xv):
    """Target-independent IR for acc + dot4(u8 codes, s8 x): LLVM lowers it to whatever SIMD the CPU has."""
    i32x32 = ir.VectorType(ir.IntType(32), 32)
    p = builder.mul(builder.zext(codes, i32x32), builder.sext(xv, i32x32))
    for h in range(4):
        acc = builder.add(acc, builder.shuffle_vector(p, p, ir.Constant(_I32x8, list(range(8 * h, 8 * h + 8)))))
    return acc


def _row_addr(context, builder, typ, val):
    """(address of element 0, row stride in bytes) of an array argument; (value, None) for an integer."""
    if not isinstance(typ, types.Array):
        return val, None
    ary = cgutils.create_struct_proxy(typ)(context, builder, value=val)
    return builder.ptrtoint(ary.data, _I64), cgutils.unpack_tuple(builder, ary.strides)[0]


def _emit_loop(builder, start, stop, step: int, inits: list, body) -> list:
    """IR for `for b in range(start, stop, step)` carrying `inits` through `body(b, values) -> values`."""
    pre = builder.block
    loop, after = builder.append_basic_block("i2loop"), builder.append_basic_block("i2after")
    builder.cbranch(builder.icmp_signed("<", start, stop), loop, after)
    builder.position_at_end(loop)
    b = builder.phi(_I64)
    carried = [builder.phi(v.type) for v in inits]
    new = body(b, carried)
    bn = builder.add(b, ir.Constant(_I64, step))
    end = builder.block
    b.add_incoming(start, pre)
    b.add_incoming(bn, end)
    for phi, v0, v1 in zip(carried, inits, new, strict=True):
        phi.add_incoming(v0, pre)
        phi.add_incoming(v1, end)
    builder.cbranch(builder.icmp_signed("<", bn, stop), loop, after)
    builder.position_at_end(after)
    final = [builder.phi(v.type) for v in inits]
    for phi, v0, v1 in zip(final, inits, new, strict=True):
        phi.add_incoming(v0, pre)
        phi.add_incoming(v1, end)
    return final


def _dot_step(builder, w_addrs, x_addrs, b, nbytes: int, unroll: int, accs: list) -> list:
    """One loop step: `unroll` vectors of `nbytes` packed bytes from block b of every weight row, times every
    activation row. Codes are decoded once (shift + mask) per weight row and reused for all activation rows;
    activations are loaded once and reused for all weight rows. With 64-byte vectors the activations are
    stored pair-interleaved (see _dot_layout) so that a plain load matches the code lanes.
    """
    i8v = ir.VectorType(ir.IntType(8), nbytes)
    i32v = ir.VectorType(ir.IntType(32), nbytes // 4)
    rows, g = len(x_addrs), len(w_addrs)
    per_row = len(accs) // (rows * g)
    new = list(accs)
    mask = ir.Constant(i8v, [3] * nbytes)
    for u in range(unroll):
        blk = builder.add(b, ir.Constant(_I64, u * nbytes // 32))
        codes = []
        for w_addr in w_addrs:  # codes[s][q][j] = c[row s, 128 blk + 32 q + j] (per 32-byte half)
            wv = builder.load(builder.inttoptr(builder.add(w_addr, builder.mul(blk, ir.Constant(_I64, 32))),
                                               i8v.as_pointer()), align=1)
            if per_row % 4 == 0 and ISA != "avx2":  # masks only: code q scaled by 4**q, unscaled at the end
                codes.append([builder.and_(wv, ir.Constant(i8v, [3 << 2 * q] * nbytes)) for q in range(4)])
            else:
                codes.append([builder.and_(builder.lshr(wv, ir.Constant(i8v, [2 * q] * nbytes)) if q else wv, mask)
                              for q in range(4)])
        for t, sw in ((t, sw) for t in range(rows) for sw in range(g)):
            r = t * g + sw
            if sw == 0:
                xblk = builder.add(x_addrs[t], builder.mul(blk, ir.Constant(_I64, BLOCK)))
                xs = [builder.load(builder.inttoptr(builder.add(xblk, ir.Constant(_I64, nbytes * q)),
                                                    i8v.as_pointer()), align=1) for q in range(4)]
            codes_r = codes[sw]
            if ISA == "avx2":  # |sum of 4 maddubs| <= 4 * 2 * 2 * 128: no int16 saturation
                maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_I8x32, _I8x32])
                maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
                s16 = builder.call(maddubs, [codes_r[0], xs[0]])
                for q in range(1, 4):
                    s16 = builder.add(s16, builder.call(maddubs, [codes_r[q], xs[q]]))
                j = r * per_row + u % per_row
                new[j] = builder.add(new[j], builder.call(maddwd, [s16, ir.Constant(_I16x16, [1] * 16)]))
                continue
            for q in range(4):
                j = r * per_row + (u * 4 + q) % per_row
                if ISA == "portable":
                    new[j] = _generic_dot(builder, new[j], codes_r[q], xs[q])
                else:
                    dpbusd = _fn(builder, f"llvm.x86.avx512.vpdpbusd.{nbytes * 8}", i32v, [i32v] * 3)
                    new[j] = builder.call(dpbusd, [new[j], builder.bitcast(codes_r[q], i32v),
                                                   builder.bitcast(xs[q], i32v)])
    return new


def _make_dot(rows: int, g: int):
    """dot(wp, i, xq, r0, nblk, out): out[t * g + s] = sum_k c[i + s, k] * xq[r0 + t, k] over nblk i2 blocks,
    for t < rows activation rows and s < g weight rows.

    Loops: 'wide' steps of WIDE bytes x unroll, then single WIDE vectors, then single 32-byte blocks; each
    keeps ~8 independent vector accumulators (latency hiding) that are reduced to one int32 per row at the end.
    """
    unroll = 2 if rows * g < 4 else 1
    per_row = max(1, ACCS // (rows * g)) if ISA != "avx2" else unroll
    scaled = per_row % 4 == 0 and ISA != "avx2"  # see _dot_step: exact, |acc| < 64 * 2 * 128 * K / 4

    @intrinsic
    def dot(typingctx, wp, i, xq, r0, nblk, out):
        sig = types.void(wp, types.intp, xq, types.intp, types.intp, out)

        def codegen(context, builder, signature, args):
            addr = [_row_addr(context, builder, t, v) for t, v in zip(signature.args, args, strict=True)]
            wp, i, xq, r0, nblk, out = addr
            w0, x_stride = builder.add(wp[0], builder.mul(i[0], wp[1])), xq[1]
            w_addrs = [builder.add(w0, builder.mul(wp[1], ir.Constant(_I64, s))) for s in range(g)]
            x0 = builder.add(xq[0], builder.mul(r0[0], x_stride))
            x_addrs = [builder.add(x0, builder.mul(x_stride, ir.Constant(_I64, r))) for r in range(rows)]
            nblk = nblk[0]
            total = [ir.Constant(ir.IntType(32), 0)] * (rows * g)
            start = ir.Constant(_I64, 0)
            for nbytes, u in dict.fromkeys([(WIDE, unroll), (WIDE, 1), (32, 1)]):
                step = u * nbytes // 32
                stop = builder.sub(nblk, builder.srem(nblk, ir.Constant(_I64, step)))
                i32v = ir.VectorType(ir.IntType(32), nbytes // 4)
                zero = [ir.Constant(i32v, None)] * (rows * g * per_row)
                accs = _emit_loop(builder, start, stop, step, zero,
                                  lambda b, a, n=nbytes, u=u: _dot_step(builder, w_addrs, x_addrs, b, n, u, a))
                reduce = _fn(builder, f"llvm.vector.reduce.add.v{nbytes // 4}i32", ir.IntType(32), [i32v])
                for r in range(rows * g):
                    for q in range(4 if scaled else 1):  # accumulator j holds quarter q = j % 4, times 4**q
                        v = accs[r * per_row + q]
                        for j in range(q + (4 if scaled else 1), per_row, 4 if scaled else 1):
                            v = builder.add(v, accs[r * per_row + j])
                        part = builder.call(reduce, [v])
                        part = builder.ashr(part, ir.Constant(ir.IntType(32), 2 * q)) if q else part
                        total[r] = builder.add(total[r], part)
                start = stop
            for r in range(rows * g):
                ptr = builder.inttoptr(builder.add(out[0], ir.Constant(_I64, 4 * r)), ir.IntType(32).as_pointer())
                builder.store(total[r], ptr)
            return context.get_dummy_value()

        return sig, codegen

    return dot


_dot_1x4, _dot_1x1, _dot_4x2, _dot_4x1 = (_make_dot(r, g) for r, g in ((1, 4), (1, 1), (4, 2), (4, 1)))


# ----------------------------------------------------------------------------------------- Numba kernels
@njit(cache=True, inline="always")
def _quant_row(x, r, xq, s, xsum) -> None:
    """reference.act_quant for one row, bit-exact: s = (1 / amax) * 127 as torch's 127.0 / t computes it.

    amax and the finiteness test use the int32 bits (|x| orders like its bits; NaN/Inf have the top
    exponent), so both loops vectorize.
    """
    k = x.shape[1]
    bits = x[r].view(np.int32)
    top = np.int32(0)
    for j in range(k):
        top = max(top, bits[j] & np.int32(0x7FFFFFFF))
    if top >= np.int32(0x7F800000):  # a NaN or an Inf in the row
        s[r] = np.float32(np.nan)
        xsum[r] = 0
        xq[r, :k] = 0
        return
    amax = np.full(1, top, np.int32).view(np.float32)[0]
    sc = (np.float32(1.0) / max(amax, np.float32(1e-5))) * np.float32(127.0)
    s[r] = sc
    total = np.int32(0)
    for j in range(k):
        qv = np.int32(min(max(np.rint(x[r, j] * sc), np.float32(-128.0)), np.float32(127.0)))
        xq[r, j] = np.int8(qv)
        total += qv
    xsum[r] = total


@njit(cache=True, parallel=True)
def _quantize(x, xq, s, xsum) -> None:
    """(M, K) fp32 -> xq (M, >=K) int8 (pad columns left as given), s (M,) fp32, xsum (M,) int32."""
    for r in prange(x.shape[0]):
        _quant_row(x, r, xq, s, xsum)


@njit(cache=True)
def _dot_layout(xp):
    """(M, Kp) int8 -> the order the dot intrinsic loads: with 64-byte vectors, each pair of 128-blocks is
    interleaved by quarter (q, block, j) so that one load meets the codes of two blocks; else unchanged."""
    if WIDE == 32:
        return xp
    out = xp.copy()
    for r in range(xp.shape[0]):
        for p in range(xp.shape[1] // (2 * BLOCK)):
            for h in range(2):
                for q in range(4):
                    for j in range(32):
                        out[r, 2 * BLOCK * p + 64 * q + 32 * h + j] = xp[r, 2 * BLOCK * p + BLOCK * h + 32 * q + j]
    return out


@njit(cache=True, inline="always")
def _store(r, i, v, scale, bias, fused, has_bias, outi, outf) -> None:
    if fused:
        y = np.float32(v) * scale[r]
        outf[r, i] = y + bias[i] if has_bias else y
    else:
        outi[r, i] = v


@njit(cache=True)
def _quantize_small(x, kp, gamma):
    """Decode-path prologue: quantize the few rows of x serially into the dot's layout; returns
    (xq (M, Kp) int8, row sums (M,) int32, epilogue scale gamma / s (M,) fp32)."""
    m = x.shape[0]
    xq = np.zeros((m, kp), np.int8)
    s = np.empty(m, np.float32)
    xsum = np.empty(m, np.int32)
    for r in range(m):
        _quant_row(x, r, xq, s, xsum)
    return _dot_layout(xq), xsum, gamma / s


@njit(cache=True, parallel=True)
def _packed_mm(x, gamma, xq, xsum, scale, wp, rows, nchunks, bias, fused, has_bias, outi, outf) -> None:
    """(M, Kp) int8 x i2 (N, Kp/4) -> int32 outi, or (fused) fp32 outf = acc * scale[r] (+ bias).

    If x (M, K) fp32 has columns, it is quantized here first (one dispatch for the decode path) and
    xq, xsum, scale are replaced by its quantization and gamma / s.
    """
    if x.shape[1] > 0:
        xq, xsum, scale = _quantize_small(x, wp.shape[1] * 4, gamma)
    m, n, nblk = xq.shape[0], wp.shape[0], wp.shape[1] // 32
    nchunks = min(n, nchunks)
    g = 4 if min(rows, m) < 4 else 2  # weight rows per pass: 1 x 4 or 4 x 2 dot products per call
    for c in prange(nchunks):
        acc = np.zeros(8, np.int32)  # acc[t * gi + s]: activation row r + t, weight row i + s
        i, hi = c * n // nchunks, (c + 1) * n // nchunks
        while i < hi:
            gi = g if i + g <= hi else 1
            r = 0
            while r < m:
                nr = 4 if rows >= 4 and m - r >= 4 else 1
                if nr == 4 and gi == 2:
                    _dot_4x2(wp, i, xq, r, nblk, acc)
                elif nr == 4:
                    _dot_4x1(wp, i, xq, r, nblk, acc)
                elif gi == 4:
                    _dot_1x4(wp, i, xq, r, nblk, acc)
                else:  # gi in (1, 2): the leftover rows of a 4 x 2 pass
                    for sw in range(gi):
                        _dot_1x1(wp, i + sw, xq, r, nblk, acc[sw:])
                for t in range(nr):
                    for sw in range(gi):
                        _store(r + t, i + sw, acc[t * gi + sw] - xsum[r + t], scale, bias, fused, has_bias, outi, outf)
                r += nr
            i += gi


@njit(cache=True, parallel=True)
def _unpack_i2(wp, n0, n1, k, out) -> None:
    """i2 rows n0..n1 -> out (n1 - n0, k) int8 in {-1, 0, 1}."""
    for i in prange(n1 - n0):
        for blk in range((k + BLOCK - 1) // BLOCK):
            for q in range(4):
                shift = 2 * q
                base = blk * BLOCK + 32 * q
                for j in range(min(32, k - base)):
                    out[i, base + j] = np.int8((wp[n0 + i, blk * 32 + j] >> shift) & 3) - np.int8(1)


@njit(cache=True, parallel=True)
def _epilogue(acc, n0, scale, bias, has_bias, out) -> None:
    """out[:, n0:n0 + t] = acc (M, t) int32 * scale[:, None] (+ bias[n0:n0 + t]), in fp32."""
    for r in prange(out.shape[0]):
        for i in range(acc.shape[1]):
            y = np.float32(acc[r, i]) * scale[r]
            out[r, n0 + i] = y + bias[n0 + i] if has_bias else y


# ------------------------------------------------------------------------------------------------- params
_params: dict[str, Any] | None = None
_EMPTY_F32 = np.empty(0, np.float32)
_EMPTY_I32, _EMPTY_F32_2D = np.empty((0, 0), np.int32), np.empty((0, 0), np.float32)
_EMPTY_I8, _EMPTY_I32_1D = np.empty((0, 0), np.int8), np.empty(0, np.int32)


def params() -> dict[str, Any]:
    """The current kernel parameters (tuning file merged over defaults, then `configure` overrides)."""
    global _params
    if _params is None:
        _params = tuning.load()
    return {k: v for k, v in _params.items() if not k.startswith("_")}


def configure(**kw: Any) -> dict[str, Any]:
    """Change kernel parameters at runtime (names/values as in tuning.CPU_DEFAULTS); returns them all."""
    params()
    _params.update(tuning.validate(kw))
    return params()


def _threads(work: int) -> int:
    """Apply the thread count (tuned value, else torch's, capped by NUMBA_NUM_THREADS; one thread for less
    than tuning.SERIAL_WORK multiply-adds, where a parallel region costs more than it saves); returns it."""
    n = max(1, min(_params["threads"] or torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    n = 1 if work < tuning.SERIAL_WORK else n
    if numba.get_num_threads() != n:  # per Python thread; cpu_pack sets it too, so compare, don't cache
        numba.set_num_threads(n)
    return n


def _setup(work: int) -> dict[str, Any]:
    """Parameters for a call doing `work` multiply-adds (sets the thread count and chunking)."""
    if _params is None:
        params()
    _params["_nchunks"] = 8 * _threads(work)  # a few chunks per thread: balance when a core is busy elsewhere
    return _params


# ------------------------------------------------------------------------------------------- torch glue
def _np(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy()


def _f32(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad:
        return x.numpy()
    return _np(x.detach().float())


def _i2(pw: PackedWeight) -> np.ndarray:
    if pw.format != "i2":
        raise ValueError(f"the numba kernels compute on format 'i2', got {pw.format!r}; use kernels.repack(pw, 'i2')")
    return pw.data.numpy() if pw.data.is_contiguous() else _np(pw.data)


def _gamma(pw: PackedWeight) -> np.float32:
    return np.float32(pw.gamma.item())


def _bias(bias: torch.Tensor | None) -> tuple[np.ndarray, bool]:
    return (_EMPTY_F32, False) if bias is None else (_f32(bias), True)


def _padded(xq: torch.Tensor, kp: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, K) int8 -> zero-padded (M, Kp) int8 in the dot's layout, and row sums (M,) int32."""
    m, k = xq.shape
    xp = np.zeros((m, kp), np.int8)
    xp[:, :k] = xq.numpy()
    return _dot_layout(xp), xp.sum(axis=1, dtype=np.int32)


def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (xq int8 (M, K), s fp32 (M,)), bit-exact with reference.act_quant."""
    _setup(x2d.numel())
    m, k = x2d.shape
    xq = torch.empty((m, k), dtype=torch.int8)
    s = torch.empty(m, dtype=torch.float32)
    _quantize(_f32(x2d), xq.numpy(), s.numpy(), np.empty(m, np.int32))
    return xq, s


def _gemm_int_mm(xq: torch.Tensor, pw: PackedWeight, scale: np.ndarray | None, bias, out: torch.Tensor) -> None:
    """GEMM path: unpack i2 tiles of weight rows to int8 and let oneDNN multiply; Numba epilogue (none if
    scale is None: out is then the int32 product)."""
    wp, (n, k), m = _i2(pw), pw.shape, xq.shape[0]
    tile = min(n, _params["gemm_tile_n"])
    w8 = torch.empty((tile, k), dtype=torch.int8)
    acc = torch.empty((m, tile), dtype=torch.int32)
    b, has_bias = _bias(bias)
    for n0 in range(0, n, tile):
        t = min(n, n0 + tile) - n0
        _unpack_i2(wp, n0, n0 + t, k, w8.numpy())
        wt = w8[:t].t() if k > 1 else w8[:t].t().clone(memory_format=torch.contiguous_format)  # (K, t)
        acc_t = torch._int_mm(xq, wt, out=acc if t == tile else torch.empty((m, t), dtype=torch.int32))
        if scale is None:
            out[:, n0 : n0 + t] = acc_t
        else:
            _epilogue(acc_t.numpy(), n0, scale, b, has_bias, out.numpy())


def _use_packed(m: int) -> bool:
    return m <= _params["gemv_max_m"] or _params["gemm_impl"] == "numba"


def matmul_int(xq: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """(M, K) int8 x i2 (N, K) -> (M, N) int32, exact."""
    p = _setup(xq.shape[0] * pw.out_features * pw.in_features)
    m, (n, k) = xq.shape[0], pw.shape
    out = torch.empty((m, n), dtype=torch.int32)
    if not _use_packed(m):
        _gemm_int_mm(xq.contiguous(), pw, None, None, out)
        return out
    xp, xsum = _padded(xq, reference.padded_k(k))
    _packed_mm(_EMPTY_F32_2D, np.float32(0), xp, xsum, _EMPTY_F32, _i2(pw), p["rows_per_pass"], p["_nchunks"],
               _EMPTY_F32, False, False, out.numpy(), _EMPTY_F32_2D)
    return out


def matmul(xq: torch.Tensor, s: torch.Tensor, pw: PackedWeight, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) int8, (M,) fp32 x i2 -> (M, N) out_dtype: exact int32 product, epilogue acc * (gamma / s) + bias."""
    p = _setup(xq.shape[0] * pw.out_features * pw.in_features)
    m, (n, k) = xq.shape[0], pw.shape
    out = torch.empty((m, n), dtype=torch.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = _gamma(pw) / _np(s.detach())
    if _use_packed(m):
        xp, xsum = _padded(xq, reference.padded_k(k))
        b, has_bias = _bias(bias)
        _packed_mm(_EMPTY_F32_2D, np.float32(0), xp, xsum, scale, _i2(pw), p["rows_per_pass"], p["_nchunks"], b,
                   True, has_bias, _EMPTY_I32, out.numpy())
    else:
        _gemm_int_mm(xq.contiguous(), pw, scale, bias, out)
    return out.to(out_dtype)


def bitlinear(x2d: torch.Tensor, pw: PackedWeight, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """Fused forward: quantize activations and multiply, (M, K) float -> (M, N) out_dtype."""
    p = _setup(x2d.shape[0] * pw.out_features * pw.in_features)
    m, n = x2d.shape[0], pw.out_features
    if m <= p["gemv_max_m"]:
        out = torch.empty((m, n), dtype=torch.float32)
        b, has_bias = _bias(bias)
        _packed_mm(_f32(x2d), _gamma(pw), _EMPTY_I8, _EMPTY_I32_1D, _EMPTY_F32, _i2(pw), p["rows_per_pass"],
                   p["_nchunks"], b, True, has_bias, _EMPTY_I32, out.numpy())
        return out if out_dtype == torch.float32 else out.to(out_dtype)
    xq, s = quantize_activations(x2d)
    return matmul(xq, s, pw, bias, out_dtype)


# ------------------------------------------------------------------------------------------ backward
def _dequant_tiles(pw: PackedWeight):
    """Yield (n0, n1, int8 tile (n1 - n0, K)) over the weight rows, reusing one scratch buffer."""
    wp, (n, k) = _i2(pw), pw.shape
    tile = min(n, _params["gemm_tile_n"])
    w8 = torch.empty((tile, k), dtype=torch.int8)
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        _unpack_i2(wp, n0, n1, k, w8.numpy())
        yield n0, n1, w8[: n1 - n0]


def grad_input(grad_y2d: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """(M, N) float -> (M, K) fp32 = grad_y @ (Wt * gamma): fp32 GEMM (oneDNN) over unpacked weight tiles."""
    _setup(grad_y2d.shape[0] * pw.out_features * pw.in_features)
    gy = grad_y2d.detach().float()
    gx = torch.zeros((gy.shape[0], pw.in_features), dtype=torch.float32)
    for n0, n1, w8 in _dequant_tiles(pw):
        gx.addmm_(gy[:, n0:n1], w8.float())
    return gx.mul_(pw.gamma.float())


def grad_weight(grad_y2d: torch.Tensor, xq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(M, N), (M, K) int8, (M,) -> (N, K) fp32 = grad_y^T @ (xq / s): one fp32 GEMM, as optimal as torch gets."""
    return reference.grad_weight(grad_y2d.detach(), xq, s.detach())
