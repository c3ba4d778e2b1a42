"""bf16 / fp16 <-> fp32 conversions for the CPU kernels, bit for bit as torch converts on the CPU: the packer reads
bf16 / fp16 weights through them, and a bf16 or fp16 layer's decode call converts x and its output inside the kernel
(a torch conversion costs 5-8 us each way at M=1). Numba has no 16-bit float type: these work on the raw 16-bit
patterns (uint16 arrays; the packer's fp16 weights arrive as int16).

Widening is exact. Narrowing rounds to nearest even, overflows to infinity and keeps subnormals, as torch's
vectorized and scalar conversions do; a NaN becomes a quiet NaN without payload (fp16: with its sign, as c10 does;
bf16: 0x7FC0, as torch's scalar code does -- its vector code may differ in sign and payload bits, which a kernel's
output NaN, made by arithmetic, does not carry). tests/test_kernels_cpu.py compares with torch: all 65536 patterns
widened; every value of the type, every tie between neighbours and random fp32 patterns narrowed.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import numba_cache

numba_cache.install()


@intrinsic
def as_f32(typingctx, bits):
    """Reinterpret uint32 bits as an fp32 value (a register move, no conversion)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def as_u32(typingctx, value):
    """Reinterpret an fp32 value as its uint32 bits."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always")
def bf16_bits_to_f32(h):
    """One bf16 pattern -> fp32, exactly (bf16 is fp32's top half)."""
    return as_f32(np.uint32(np.uint32(h) << np.uint32(16)))


@njit(inline="always")
def f16_bits_to_f32(h):
    """One fp16 pattern -> fp32, exactly: shift into place and rebias the exponent by 2**112 (a multiply, exact
    for subnormals too); infinities and NaNs keep their payload."""
    h = np.uint32(h) & np.uint32(0xFFFF)
    mag = np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13))
    if (h & np.uint32(0x7C00)) == np.uint32(0x7C00):  # inf / nan: all-ones fp32 exponent
        v = as_f32(np.uint32(mag | np.uint32(0x7F800000)))
    else:
        v = as_f32(mag) * np.float32(2.0**112)
    return -v if h & np.uint32(0x8000) else v


@njit(cache=True)
def widen_16(xh, fp16: bool):
    """(M, K) fp16 patterns when `fp16`, else bf16 patterns (uint16) -> (M, K) fp32. One function for both types:
    the flag is loop-invariant (timed against two separate loops: 0.98-1.01x at M=1)."""
    x = np.empty(xh.shape, np.float32)
    for r in range(xh.shape[0]):
        for j in range(xh.shape[1]):
            x[r, j] = f16_bits_to_f32(xh[r, j]) if fp16 else bf16_bits_to_f32(xh[r, j])
    return x


@njit(cache=True)
def f32_to_bf16(y, yb) -> None:
    """yb (M, N) bf16 patterns = y (M, N) fp32 rounded to nearest even (NaN -> 0x7FC0)."""
    for r in range(y.shape[0]):
        for j in range(y.shape[1]):
            u = as_u32(y[r, j])
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                yb[r, j] = np.uint16(0x7FC0)
            else:
                yb[r, j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True)
def f32_to_f16(y, yh) -> None:
    """yh (M, N) fp16 patterns = y (M, N) fp32 rounded to nearest even, by c10's fp16_ieee_from_fp32_value: fp32
    arithmetic does the rounding, the overflow to infinity and the subnormals (NaN -> sign | 0x7E00). Every step is
    uint32 as in c10 (Numba widens integer arithmetic to 64 bits; each result is cut back), so the loop vectorizes."""
    u32 = np.uint32
    for r in range(y.shape[0]):
        yr, hr = y[r], yh[r]
        for j in range(y.shape[1]):
            w = as_u32(yr[j])
            base = (abs(yr[j]) * np.float32(2.0**112)) * np.float32(2.0**-110)
            shl1 = u32(w + w)
            bias = max(u32(shl1 & u32(0xFF000000)), u32(0x71000000))
            b = as_u32(as_f32(u32((bias >> u32(1)) + u32(0x07800000))) + base)
            half = u32(0x7E00) if shl1 > u32(0xFF000000) else u32(((b >> u32(13)) & u32(0x7C00)) + (b & u32(0x0FFF)))
            hr[j] = np.uint16(u32((w >> u32(16)) & u32(0x8000)) | half)
