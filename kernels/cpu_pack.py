"""Numba CPU kernels for absmean weight quantization and ternary packing (i2 compute, tq1 storage).

Bit-exact with `reference.weight_quant`, `reference.pack_i2/pack_tq1` and their unpackers. Every kernel
runs `prange` over rows of a flat 1-D view (row i starts at i * row_stride), so contiguous and row-sliced
inputs cost no copy; fp16/bf16 are read as raw 16-bit codes and widened to fp32 in registers. Kernels
compile on first call (nothing at import) and are cached on disk.

Why the quantizer is a comparison: clip(rint(w / gamma), -1, 1) is +-1 exactly when |fl32(w / gamma)| > 0.5
(0.5 itself rounds half-to-even to 0), and NaN -> 0 as torch's float -> int8 cast does.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import reference
from .packing import FORMATS, PackedWeight

__all__ = ["pack", "quantize_and_pack", "quantize_weight", "unpack"]

_EPS32 = np.float32(reference.EPS)
_BLOCK = reference.I2_BLOCK  # 128 weights -> 32 bytes
_TRITS = reference.TQ1_TRITS  # 5 trits -> 1 byte
PACK_FORMATS = ("i2", "tq1")


# ----------------------------------------------------------------------------------------------- element access
@intrinsic
def _as_f32(typingctx, bits):
    """Reinterpret uint32 bits as an fp32 value (a register move, no conversion)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit
def _bf16_to_f32(h):
    return _as_f32(np.uint32(np.uint32(h) << np.uint32(16)))


@njit
def _f16_to_f32(h):
    """Exact fp16 -> fp32 from the raw code: shift into place and rebias the exponent by 2**112."""
    h = np.uint32(h) & np.uint32(0xFFFF)
    mag = np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13))
    if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):  # inf / nan: all-ones fp32 exponent
        v = _as_f32(np.uint32(mag | np.uint32(0x7F800000)))
    else:
        v = _as_f32(mag) * np.float32(2.0**112)  # exact, covers subnormals
    return -v if h & np.uint32(0x8000) else v


def _code(src, idx, gamma):
    """Ternary code c = wt + 1 in {0, 1, 2} of src[idx]. The array dtype says what src holds: fp32 values,
    bf16 codes (uint16), fp16 codes (int16) or int8 ternary weights (see _rows)."""


@overload(_code, inline="never")
def _code_impl(src, idx, gamma):
    dt = src.dtype
    if dt == types.int8:  # already ternary; out-of-range values land above 2 and the caller reports them
        return lambda src, idx, gamma: np.uint8(src[idx] + 1)
    load = {types.float32: np.float32, types.uint16: _bf16_to_f32, types.int16: _f16_to_f32}[dt]

    def quantize(src, idx, gamma):
        q = load(src[idx]) / gamma  # fp32 / fp32 -> fp32, as in the reference
        return np.uint8(1 + (q > 0.5) - (q < -0.5))

    return quantize


def _top(mx, c, src):
    """Running max of the codes, tracked only for int8 input (float input cannot go out of range)."""


@overload(_top)
def _top_impl(mx, c, src):
    if src.dtype == types.int8:
        return lambda mx, c, src: max(mx, c)
    return lambda mx, c, src: mx


def _absf(src, idx):
    """|src[idx]| as fp32 for a float source."""


@overload(_absf)
def _absf_impl(src, idx):
    load = {types.float32: np.float32, types.uint16: _bf16_to_f32, types.int16: _f16_to_f32}[src.dtype]
    return lambda src, idx: abs(load(src[idx]))


# ------------------------------------------------------------------------------------------------------ kernels
@njit(parallel=True, cache=True)
def _abs_row_sums(src, n, k, rs):
    """(N,) fp64 sums of |w| per row; the caller adds them up for gamma."""
    out = np.empty(n, np.float64)
    for i in prange(n):
        base = i * rs
        acc = 0.0
        for j in range(k):
            acc += _absf(src, base + j)
        out[i] = acc
    return out


@njit(parallel=True, cache=True)
def _quantize_rows(src, n, k, rs, gamma):
    """(N, K) int8 ternary weights."""
    out = np.empty((n, k), np.int8)
    for i in prange(n):
        base = i * rs
        for j in range(k):
            out[i, j] = np.int8(_code(src, base + j, gamma)) - 1
    return out


@njit(parallel=True, cache=True)
def _pack_i2_rows(src, n, k, rs, gamma):
    """(N, Kp // 4) uint8 i2 bytes and the (N,) largest int8 code per row (> 2 means a non-ternary input).

    Bytes start as 0x55 (four codes 1 = padding weight 0); slot q of byte j takes weight 32q + j of the
    block by XOR-ing (c ^ 1) into it, so the loop over j is branch-free and contiguous.
    """
    nblk = -(-k // _BLOCK)
    out = np.empty((n, nblk * (_BLOCK // 4)), np.uint8)
    top = np.empty(n, np.uint8)
    for i in prange(n):
        base = i * rs
        mx = np.uint8(0)
        for b in range(nblk):
            o = b * 32
            out[i, o : o + 32] = 0x55
            for q in range(4):
                kq = b * _BLOCK + 32 * q
                for j in range(min(32, k - kq)):
                    c = _code(src, base + kq + j, gamma)
                    mx = _top(mx, c, src)
                    out[i, o + j] ^= (c ^ np.uint8(1)) << np.uint8(2 * q)
        top[i] = mx
    return out, top


@njit(parallel=True, cache=True)
def _pack_tq1_rows(src, n, k, rs, gamma):
    """(N, ceil(K / 5)) uint8 tq1 bytes (sum_q c[5t + q] * 3**q) and the (N,) largest int8 code per row.

    Bytes start at 121 (five codes 1 = padding weight 0); trit q of byte t adds (c - 1) * 3**q.
    """
    nbytes = -(-k // _TRITS)
    out = np.empty((n, nbytes), np.uint8)
    top = np.empty(n, np.uint8)
    for i in prange(n):
        base = i * rs
        mx = np.uint8(0)
        out[i, :] = 121
        mul = 1
        for q in range(_TRITS):
            for t in range(-(-(k - q) // _TRITS)):  # bytes whose trit q is a real weight
                c = _code(src, base + _TRITS * t + q, gamma)
                mx = _top(mx, c, src)
                out[i, t] = np.uint8(out[i, t] + c * mul - mul)
            mul *= 3
        top[i] = mx
    return out, top


@njit(parallel=True, cache=True)
def _unpack_i2_rows(data, k):
    """(N, Kp // 4) uint8 i2 -> (N, K) int8."""
    n = data.shape[0]
    out = np.empty((n, k), np.int8)
    for i in prange(n):
        for kk in range(k):
            b, r = divmod(kk, _BLOCK)
            q, j = divmod(r, 32)
            out[i, kk] = np.int8((data[i, b * 32 + j] >> (2 * q)) & 3) - 1
    return out


@njit(parallel=True, cache=True)
def _unpack_tq1_rows(data, k):
    """(N, ceil(K / 5)) uint8 tq1 -> (N, K) int8, trit q of a byte = (byte // 3**q) % 3."""
    n, nbytes = data.shape
    out = np.empty((n, k), np.int8)
    for i in prange(n):
        for t in range(nbytes):
            v = np.int32(data[i, t])
            for q in range(_TRITS):
                kk = _TRITS * t + q
                if kk < k:
                    out[i, kk] = np.int8(v % 3) - 1
                v //= 3
    return out


# ---------------------------------------------------------------------------------------------------- wrappers
def _set_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


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
    _set_threads()
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


def _packer(fmt: str):
    _check_format(fmt)
    return _pack_i2_rows if fmt == "i2" else _pack_tq1_rows


def pack(wt: torch.Tensor, gamma: torch.Tensor | float, fmt: str = "i2") -> PackedWeight:
    """Pack an (N, K) int8 ternary matrix into `fmt` ("i2" or "tq1"), bit-exact with reference.pack_*."""
    if fmt not in PACK_FORMATS and fmt in FORMATS:  # e.g. the GPU's i2g: reference codec (kernels.repack on CPU)
        return PackedWeight(FORMATS[fmt].pack(wt.cpu()), _scale(gamma), tuple(wt.shape), fmt)
    kernel = _packer(fmt)
    scale = _scale(gamma)
    src, n, k, rs = _rows(wt, "wt", (torch.int8,))
    _set_threads()
    data, top = kernel(src, n, k, rs, np.float32(0))
    if top.max() > 2:
        raise ValueError("wt holds values outside {-1, 0, 1}; quantize it first (kernels.quantize_weight)")
    return PackedWeight(torch.from_numpy(data), scale, (n, k), fmt)


def quantize_and_pack(w: torch.Tensor, fmt: str = "i2") -> PackedWeight:
    """Fused quantize_weight + pack: reads w twice (gamma, then codes) and never builds the int8 matrix."""
    kernel = _packer(fmt)
    src, n, k, rs = _float_rows(w)
    _set_threads()
    gamma = _gamma(src, n, k, rs)
    data, _ = kernel(src, n, k, rs, gamma)
    return PackedWeight(torch.from_numpy(data), torch.tensor(gamma, dtype=torch.float32), (n, k), fmt)


def unpack(pw: PackedWeight) -> torch.Tensor:
    """PackedWeight (i2 or tq1, CPU) -> (N, K) int8 ternary, bit-exact with reference.unpack_*."""
    if not isinstance(pw, PackedWeight):
        raise TypeError(f"pw must be a PackedWeight, got {type(pw).__name__}")
    if pw.format not in PACK_FORMATS and pw.format in FORMATS:  # e.g. a GPU-packed i2g weight loading on CPU
        return FORMATS[pw.format].unpack(pw.data.cpu(), pw.in_features)
    _check_format(pw.format)
    if pw.device.type != "cpu":
        raise ValueError(f"pw is on {pw.device}; the numba kernels take CPU tensors (use pw.to('cpu'))")
    data = pw.data.contiguous().numpy()
    _set_threads()
    kernel = _unpack_i2_rows if pw.format == "i2" else _unpack_tq1_rows
    return torch.from_numpy(kernel(data, pw.in_features))
