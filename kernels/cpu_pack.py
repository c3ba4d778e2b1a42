"""Numba CPU kernels for absmean weight quantization and ternary packing (i2 compute, tq1 storage).

Bit-exact with `reference.weight_quant`, `reference.pack_i2/pack_tq1` and their unpackers. Every kernel
runs `prange` over rows of a flat 1-D view (row i starts at i * row_stride), so contiguous and row-sliced
inputs cost no copy; fp16/bf16 are read as raw 16-bit codes and widened to fp32 in registers. Kernels
compile on first call (nothing at import) and are cached on disk.

The quantizer compares instead of rounding: clip(rint(q), -1, 1) with q = fl32(w / gamma) is +-1 exactly when
|q| > 0.5 (0.5 itself rounds half-to-even to 0), and a NaN q gives 0, as torch's float -> int8 cast does.
`transcode` converts i2 <-> tq1 row by row through a small codes buffer, never building the int8 matrix.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from . import numba_cache, reference
from .cpu_convert import bf16_bits_to_f32, f16_bits_to_f32
from .packing import FORMATS, PackedWeight
from .tuning import SERIAL_WORK

numba_cache.install()  # before the first @njit(cache=True): keyed on all kernel sources and the ISA

__all__ = ["pack", "quantize_and_pack", "quantize_weight", "transcode", "transpose", "unpack"]

_EPS32 = np.float32(reference.EPS)
_BLOCK = reference.I2_BLOCK  # 128 weights -> 32 bytes
_TRITS = reference.TQ1_TRITS  # 5 trits -> 1 byte
PACK_FORMATS = ("i2", "tq1")


# ----------------------------------------------------------------------------------------------- element access
def _code(src, idx, gamma):
    """Ternary code c = wt + 1 in {0, 1, 2} of src[idx]. The array dtype says what src holds: fp32 values,
    bf16 codes (uint16), fp16 codes (int16), int8 ternary weights (see _rows) or uint8 codes."""


@overload(_code, inline="never")
def _code_impl(src, idx, gamma):
    dt = src.dtype
    if dt == types.int8:  # already ternary; out-of-range values land above 2 and the caller reports them
        return lambda src, idx, gamma: np.uint8(src[idx] + 1)
    if dt == types.uint8:  # codes decoded from another packed format
        return lambda src, idx, gamma: src[idx]
    load = {types.float32: np.float32, types.uint16: bf16_bits_to_f32, types.int16: f16_bits_to_f32}[dt]

    def quantize(src, idx, gamma):
        q = load(src[idx]) / gamma  # fp32 / fp32 -> fp32, as in the reference
        return np.uint8(1 + (q > 0.5) - (q < -0.5))

    return quantize


def _top(mx, c, src):
    """Running max of the codes, tracked only for integer input (float input cannot go out of range)."""


@overload(_top)
def _top_impl(mx, c, src):
    if src.dtype in (types.int8, types.uint8):
        return lambda mx, c, src: max(mx, c)
    return lambda mx, c, src: mx


def _absf(src, idx):
    """|src[idx]| as fp32 for a float source."""


@overload(_absf)
def _absf_impl(src, idx):
    load = {types.float32: np.float32, types.uint16: bf16_bits_to_f32, types.int16: f16_bits_to_f32}[src.dtype]
    return lambda src, idx: abs(load(src[idx]))


# ------------------------------------------------------------------------------------------------------ kernels
@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _abs_row_sums(src, n, k, rs):
    """(N,) fp64 sums of |w| per row; the caller adds them up for gamma. Reassociated (vector lanes), which moves
    the fp64 sum by a few ulps at most: gamma is rounded to fp32, and the reference's own order differs again."""
    out = np.empty(n, np.float64)
    for i in prange(n):
        row = src[i * rs : i * rs + k]  # a view indexed from 0: no wraparound test, so the loop vectorizes
        acc = 0.0
        for j in range(k):
            acc += _absf(row, j)
        out[i] = acc
    return out


@njit(parallel=True, cache=True)
def _quantize_rows(src, n, k, rs, gamma):
    """(N, K) int8 ternary weights."""
    out = np.empty((n, k), np.int8)
    for i in prange(n):
        row, o = src[i * rs : i * rs + k], out[i]
        for j in range(k):
            o[j] = np.int8(_code(row, j, gamma)) - 1
    return out


# The row packers index a view of their row from 0: an index with an offset of unknown sign keeps Numba's
# negative-index test in the loop, which stops LLVM from vectorizing it (whole i2 blocks: 3.3 -> ~1 ns per weight).
@njit
def _pack_i2_row(src, base, k, gamma, out):
    """Weights src[base : base + K] -> one i2 row `out`; returns the largest int8/uint8 code (> 2: invalid).

    Byte j of a whole block holds weights j, 32 + j, 64 + j and 96 + j in its 2-bit slots 0-3. The last, partial
    block starts as 0x55 (four codes 1 = padding weight 0) and XORs (c ^ 1) into slot q of byte j.
    """
    row = src[base : base + k]
    mx = np.uint8(0)
    full = k // _BLOCK
    for b in range(full):
        w = row[_BLOCK * b : _BLOCK * (b + 1)]
        w0, w1, w2, w3, ob = w[:32], w[32:64], w[64:96], w[96:], out[32 * b : 32 * (b + 1)]
        for j in range(32):
            c0, c1, c2, c3 = _code(w0, j, gamma), _code(w1, j, gamma), _code(w2, j, gamma), _code(w3, j, gamma)
            mx = _top(mx, max(max(c0, c1), max(c2, c3)), src)
            ob[j] = c0 | (c1 << np.uint8(2)) | (c2 << np.uint8(4)) | (c3 << np.uint8(6))
    for b in range(full, out.size // 32):
        out[32 * b : 32 * b + 32] = 0x55
        for q in range(4):
            kq = b * _BLOCK + 32 * q
            for j in range(min(32, k - kq)):
                c = _code(row, kq + j, gamma)
                mx = _top(mx, c, src)
                out[32 * b + j] ^= (c ^ np.uint8(1)) << np.uint8(2 * q)
    return mx


@njit
def _pack_tq1_row(src, base, k, gamma, out):
    """Weights src[base : base + K] -> one tq1 row `out` (byte t = sum_q c[5t + q] * 3**q); returns the max code.

    Bytes start at 121 (five codes 1 = padding weight 0); trit q of byte t adds (c - 1) * 3**q.
    """
    row = src[base : base + k]
    mx = np.uint8(0)
    out[:] = 121
    mul = 1
    for q in range(_TRITS):
        for t in range(-(-(k - q) // _TRITS)):  # bytes whose trit q is a real weight
            c = _code(row, _TRITS * t + q, gamma)
            mx = _top(mx, c, src)
            out[t] = np.uint8(out[t] + c * mul - mul)
        mul *= 3
    return mx


@njit
def _i2_codes(row, codes):
    """One i2 row (Kp / 4 bytes) -> codes[:Kp], each (byte >> 2q) & 3 (3 only in corrupt data)."""
    for b in range(row.size // 32):
        for q in range(4):
            for j in range(32):
                codes[_BLOCK * b + 32 * q + j] = (row[32 * b + j] >> np.uint8(2 * q)) & np.uint8(3)


@njit
def _tq1_codes(row, codes):
    """One tq1 row (ceil(K / 5) bytes) -> codes[:5 * bytes], trit q of a byte = (byte // 3**q) % 3."""
    for t in range(row.size):
        v = row[t]
        for q in range(_TRITS):
            codes[_TRITS * t + q] = v % np.uint8(3)
            v //= np.uint8(3)


@njit(parallel=True, cache=True)
def _pack_rows(src, n, k, rs, gamma, i2):
    """Rows of `src` (row i at i * rs) -> (N, bytes) i2 or tq1 data, and the (N,) largest int8 code per row."""
    out = np.empty((n, -(-k // _BLOCK) * (_BLOCK // 4) if i2 else -(-k // _TRITS)), np.uint8)
    top = np.empty(n, np.uint8)
    for i in prange(n):
        if i2:
            top[i] = _pack_i2_row(src, i * rs, k, gamma, out[i])
        else:
            top[i] = _pack_tq1_row(src, i * rs, k, gamma, out[i])
    return out, top


@njit(parallel=True, cache=True)
def _unpack_rows(data, k, i2):
    """(N, bytes) i2 or tq1 data -> (N, K) int8 ternary."""
    n, nbytes = data.shape
    out = np.empty((n, k), np.int8)
    for i in prange(n):
        codes = np.empty(nbytes * (4 if i2 else _TRITS), np.uint8)
        if i2:
            _i2_codes(data[i], codes)
        else:
            _tq1_codes(data[i], codes)
        for j in range(k):
            out[i, j] = np.int8(codes[j]) - 1
    return out


@njit(parallel=True, cache=True)
def _transcode_rows(data, k, i2_in):
    """i2 -> tq1 (i2_in) or tq1 -> i2 row by row through a codes buffer; never builds the int8 matrix."""
    n, nbytes = data.shape
    nout = -(-k // _TRITS) if i2_in else -(-k // _BLOCK) * (_BLOCK // 4)
    out = np.empty((n, nout), np.uint8)
    top = np.empty(n, np.uint8)
    for i in prange(n):
        if i2_in:
            codes = np.empty(nbytes * 4, np.uint8)
            _i2_codes(data[i], codes)
            top[i] = _pack_tq1_row(codes, 0, k, np.float32(0), out[i])
        else:
            codes = np.empty(nbytes * _TRITS, np.uint8)
            _tq1_codes(data[i], codes)
            top[i] = _pack_i2_row(codes, 0, k, np.float32(0), out[i])
    return out, top


@njit(parallel=True, cache=True)
def _transpose_i2(data, n, k):
    """(N, Kp / 4) i2 data of an (N, K) matrix -> (K, Np / 4) i2 data of its transpose, in one pass: each input
    byte's four codes go to four output rows. Threads own 128-column blocks of the output (disjoint bytes);
    pad columns (n >= N) get code 1 (weight 0), as the packer writes them."""
    nbytes_out = -(-n // _BLOCK) * (_BLOCK // 4)
    out = np.zeros((k, nbytes_out), np.uint8)
    for nb in prange(nbytes_out // 32):
        for i in range(nb * _BLOCK, min(n, (nb + 1) * _BLOCK)):
            ob, shift = nb * 32 + i % 32, 2 * ((i % _BLOCK) // 32)  # output byte and bits of column i
            for col in range(data.shape[1]):
                byte = data[i, col]
                kbase = col // 32 * _BLOCK + col % 32
                for q in range(4):
                    kk = kbase + 32 * q
                    if kk < k:
                        out[kk, ob] |= ((byte >> (2 * q)) & 3) << shift
        for i in range(max(n, nb * _BLOCK), (nb + 1) * _BLOCK):
            ob, shift = nb * 32 + i % 32, 2 * ((i % _BLOCK) // 32)
            for kk in range(k):
                out[kk, ob] |= 1 << shift
    return out


# ---------------------------------------------------------------------------------------------------- wrappers
_applied = threading.local()  # numba's thread count is per Python thread; remember what this module set


def set_threads(n: int) -> None:
    """numba.set_num_threads(n) for this Python thread, skipped when it is already n (saves ~1 us per kernel
    call). Every kernel of the numba backend sets its count through here (a direct numba.set_num_threads
    elsewhere goes unnoticed until the wanted count changes)."""
    if getattr(_applied, "n", None) != n:
        numba.set_num_threads(n)
        _applied.n = n


def _set_threads(work: int) -> None:
    """torch's thread count (capped by NUMBA_NUM_THREADS), or one thread below tuning.SERIAL_WORK elements."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    set_threads(1 if work < SERIAL_WORK else n)


def _rows(w: torch.Tensor, name: str, dtypes: tuple) -> tuple[np.ndarray, int, int, int]:
    """Check `w` and give a flat NumPy view over its rows: (src, N, K, row_stride). Copies only when the
    last dim is strided (e.g. a transposed weight), where a row-major copy is what the kernels need."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {w.dtype}; expected one of {list(dtypes)} (convert with .to(...))")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {tuple(w.shape)}")
    if w.device.type != "cpu":
        raise ValueError(f"{name} is on {w.device}; the numba kernels take CPU tensors (use .cpu())")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"{name} has shape {(n, k)}; N and K must be positive")
    w = w.detach()
    if k > 1 and w.stride(1) != 1:
        w = w.contiguous()
    dtype = w.dtype
    if dtype in (torch.bfloat16, torch.float16):
        w = w.view(torch.int16)  # raw codes, widened to fp32 in the kernels
    rs = w.stride(0) if n > 1 else k
    flat = torch.as_strided(w, ((n - 1) * rs + k,), (1,), w.storage_offset()).numpy()
    return (flat.view(np.uint16) if dtype == torch.bfloat16 else flat), n, k, rs


def _float_rows(w: torch.Tensor) -> tuple[np.ndarray, int, int, int]:
    return _rows(w, "w", (torch.float32, torch.bfloat16, torch.float16))


def _gamma(src: np.ndarray, n: int, k: int, rs: int) -> np.float32:
    """gamma = max(fp32(mean |w|), 1e-5) with the mean accumulated in fp64 (NaN stays NaN)."""
    g = np.float32(_abs_row_sums(src, n, k, rs).sum() / (n * k))
    return _EPS32 if g < _EPS32 else g


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) fp32/bf16/fp16 -> (Wt int8 ternary (N, K), gamma fp32 0-d), bit-exact with reference.weight_quant."""
    src, n, k, rs = _float_rows(w)
    _set_threads(n * k)
    gamma = _gamma(src, n, k, rs)
    wt = _quantize_rows(src, n, k, rs, gamma)
    return torch.from_numpy(wt), torch.tensor(gamma, dtype=torch.float32)


def _check_format(fmt: str) -> None:
    if fmt not in PACK_FORMATS:
        raise ValueError(f"fmt={fmt!r}: the numba backend packs {PACK_FORMATS}; use one of them")


def _scale(gamma) -> torch.Tensor:
    g = torch.as_tensor(gamma, dtype=torch.float32).detach().cpu()
    if g.numel() != 1:
        raise ValueError(f"gamma must be a single scale, got shape {tuple(g.shape)}")
    return g.reshape(()).clone()


_NOT_TERNARY = "holds values outside {-1, 0, 1}"


def pack(wt: torch.Tensor, gamma: torch.Tensor | float, fmt: str = "i2") -> PackedWeight:
    """Pack an (N, K) int8 ternary matrix into `fmt` ("i2" or "tq1"), bit-exact with reference.pack_*."""
    if fmt not in PACK_FORMATS and fmt in FORMATS:  # e.g. the GPU's i2g: reference codec (kernels.repack on CPU)
        return PackedWeight(FORMATS[fmt].pack(wt.cpu()), _scale(gamma), tuple(wt.shape), fmt)
    _check_format(fmt)
    scale = _scale(gamma)
    src, n, k, rs = _rows(wt, "wt", (torch.int8,))
    _set_threads(n * k)
    data, top = _pack_rows(src, n, k, rs, np.float32(0), fmt == "i2")
    if top.max() > 2:
        raise ValueError(f"wt {_NOT_TERNARY}; quantize it first (kernels.quantize_weight)")
    return PackedWeight(torch.from_numpy(data), scale, (n, k), fmt)


def quantize_and_pack(w: torch.Tensor, fmt: str = "i2") -> PackedWeight:
    """Fused quantize_weight + pack: reads w twice (gamma, then codes) and never builds the int8 matrix."""
    _check_format(fmt)
    src, n, k, rs = _float_rows(w)
    _set_threads(n * k)
    gamma = _gamma(src, n, k, rs)
    data, _ = _pack_rows(src, n, k, rs, gamma, fmt == "i2")
    return PackedWeight(torch.from_numpy(data), torch.tensor(gamma, dtype=torch.float32), (n, k), fmt)


def _cpu_data(pw: PackedWeight) -> np.ndarray:
    if not isinstance(pw, PackedWeight):
        raise TypeError(f"pw must be a PackedWeight, got {type(pw).__name__}")
    _check_format(pw.format)
    if pw.device.type != "cpu":
        raise ValueError(f"pw is on {pw.device}; the numba kernels take CPU tensors (use pw.to('cpu'))")
    return pw.data.contiguous().numpy()


def unpack(pw: PackedWeight) -> torch.Tensor:
    """PackedWeight (i2 or tq1, CPU) -> (N, K) int8 ternary, bit-exact with reference.unpack_*."""
    if isinstance(pw, PackedWeight) and pw.format not in PACK_FORMATS and pw.format in FORMATS:
        return FORMATS[pw.format].unpack(pw.data.cpu(), pw.in_features)  # e.g. a GPU-packed i2g weight on CPU
    data = _cpu_data(pw)
    _set_threads(pw.shape[0] * pw.shape[1])
    return torch.from_numpy(_unpack_rows(data, pw.in_features, pw.format == "i2"))


def transcode(pw: PackedWeight, fmt: str) -> PackedWeight:
    """i2 <-> tq1 on CPU without the int8 matrix (e.g. tq1 storage -> i2 compute at load); same result as
    pack(unpack(pw), pw.gamma, fmt)."""
    data = _cpu_data(pw)
    _check_format(fmt)
    if fmt == pw.format:
        return pw
    _set_threads(pw.shape[0] * pw.shape[1])
    out, top = _transcode_rows(data, pw.in_features, pw.format == "i2")
    if top.max() > 2:
        raise ValueError(f"pw {_NOT_TERNARY}: its i2 data has code 3, so the buffer is corrupt")
    return PackedWeight(torch.from_numpy(out), pw.gamma.clone(), pw.shape, fmt)


def transpose(pw: PackedWeight) -> PackedWeight:
    """The packed (K, N) transpose of an i2 (N, K) weight, same gamma: the weight of the STE's int8 input
    gradient (dX = dY @ Wt is a BitLinear of dY by Wt^T). Bit-exact with pack(unpack(pw).T, gamma)."""
    data = _cpu_data(pw)
    if pw.format != "i2":
        raise ValueError(f"transpose takes an i2 weight, got {pw.format!r}; use kernels.repack(pw, 'i2')")
    n, k = pw.shape
    _set_threads(n * k)
    return PackedWeight(torch.from_numpy(_transpose_i2(data, n, k)), pw.gamma.clone(), (k, n), "i2")
