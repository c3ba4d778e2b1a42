"""Make Triton's CPU interpreter (TRITON_INTERPRET=1) compute what an NVIDIA GPU computes for the operations the
Triton kernels in gpu.py use and the interpreter gets wrong or lacks, so the tests run the CUDA kernel source.

Triton 3.9's interpreter (measured): it stores bf16 as uint16 and (1) `tl.dot` on bf16 multiplies those raw bit
patterns, (2) casts fp32 -> bf16 by truncation and int -> bf16 by writing the integer into the bits, and (3) raises
NotImplementedError on `tl.inline_asm_elementwise`. `install()` patches its builder so that (1) bf16 dots
multiply the values in fp32 (exact: a bf16 x bf16 product fits fp32, as on tensor cores), (2) conversions to bf16
round to nearest even like `cvt.rn.bf16.f32` (and torch), and (3) exactly one inline-asm string, the
`dp4a.u32.s32` of gpu.py, runs as the PTX ISA defines it: d = c + sum over the 4 bytes of zext(a_i) * sext(b_i),
mod 2**32. Any other inline asm still raises. tests/test_kernels_gpu.py checks each against its definition.
Only gpu.py calls `install()`, and only when the interpreter is on.
"""

from __future__ import annotations

import numpy as np

DP4A_ASM = "dp4a.u32.s32 $0, $1, $2, $3;"
_installed = False


def dp4a_u32_s32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PTX dp4a.u32.s32 on int32 arrays: c + sum_i (unsigned byte i of a) * (signed byte i of b), wrapping."""
    a8 = np.ascontiguousarray(a, np.int32).view(np.uint8).reshape(*np.shape(a), 4).astype(np.int64)
    b8 = np.ascontiguousarray(b, np.int32).view(np.int8).reshape(*np.shape(b), 4).astype(np.int64)
    total = (np.asarray(c, np.int64) + (a8 * b8).sum(axis=-1)) & 0xFFFFFFFF
    return np.asarray(total.astype(np.uint32)).view(np.int32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays a (quiet) NaN with its sign."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, np.float32))
    return np.where(nan, ((u >> 16).astype(np.uint16) | np.uint16(0x0040)), rounded).astype(np.uint16)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def install() -> None:
    """Patch triton.runtime.interpreter's builder (idempotent)."""
    global _installed
    if _installed:
        return
    import triton.language as tl
    from triton.runtime import interpreter as ti

    builder = ti.InterpreterBuilder
    cast_impl, create_dot = builder.cast_impl, builder.create_dot

    def cast(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if d == tl.bfloat16 and s != tl.bfloat16:  # any source -> fp32 (exact below 2**24) -> bf16 RNE
            f32 = src.data.astype(np.float32) if s != tl.float32 else src.data
            return ti.TensorHandle(f32_to_bf16_bits(f32), tl.bfloat16)
        if s == tl.bfloat16 and d != tl.bfloat16 and d != tl.float32:  # bf16 -> exact fp32 -> the target type
            return ti.TensorHandle(_bf16_to_f32(src.data).astype(ti._get_np_dtype(dst_type)), d)
        return cast_impl(self, src, dst_type)

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a32 = _bf16_to_f32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
            b32 = _bf16_to_f32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
            return ti.TensorHandle(np.matmul(a32, b32, dtype=d.data.dtype) + d.data, d.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    class _Call:
        def __init__(self, result):
            self._result = result

        def get_result(self, i: int):
            return self._result

    def inline_asm(self, asm, constraints, values, type, is_pure, pack):
        if asm.strip() != DP4A_ASM or len(values) != 3 or pack != 1:
            raise NotImplementedError(f"inline_asm not supported in interpreter mode (only {DP4A_ASM!r} is emulated)")
        a, b, c = (np.broadcast_to(v.data, np.broadcast_shapes(*(w.data.shape for w in values))) for v in values)
        return _Call(ti.TensorHandle(dp4a_u32_s32(a, b, c), tl.int32))

    builder.cast_impl, builder.create_dot, builder.create_inline_asm = cast, dot, inline_asm
    _installed = True
