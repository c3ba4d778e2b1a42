"""The "numba" backend: int8 activations x ternary i2 weights on CPU, exact in int32, multi-threaded.

Two engines, chosen per call by `kernels.tuning` (a plan derived from this CPU's capabilities, refined by
`bitnet-fast calibrate`):
  * packed: the Numba drivers of `cpu_engine.py` around the dot-product tiles of `cpu_dot.py`, reading the i2
    bytes directly. Work is split into tasks of (weight panel that fits L2) x (block of activation rows); inside a
    task, a tile of activation rows stays in L1 while it sweeps the panel. Decode (M small) reads one weight row
    at a time (sequential streams from DRAM: 11-16 GB/s against 8.5-10 for 1 x 4 tiles here), larger M uses the
    ISA's GEMM tile. The epilogue acc * (gamma / s) (+ bias) is fused in.
  * int_mm: i2 tiles unpacked to int8 and multiplied by `torch._int_mm` (oneDNN). Fast only where oneDNN has
    VNNI (ATen picks its plain loop elsewhere: 30x slower than fp32 on AVX2), so the plan uses it only there.
This module is the torch side: parameters and threads, the per-shape decode plans, and the backend's functions
(kernels/__init__.py checks their arguments). The STE backward runs fp32 GEMMs (oneDNN) on dequantized operands.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch

from . import FLOAT_DTYPES, tuning
from .cpu_dot import ISA, ISAS
from .cpu_engine import (
    _bitlinear_packed,
    _bitlinear_train_packed,
    _dequant_weight,
    _dequant_x,
    _epilogue,
    _matmul_int_packed,
    _matmul_packed,
    _quantize,
    _unpack_i2,
)
from .cpu_pack import pack, quantize_weight, set_threads, unpack
from .packing import PackedWeight

__all__ = ["ISA", "ISAS", "bitlinear", "bitlinear_train", "configure", "grad_input", "grad_weight", "matmul",
           "matmul_int", "pack", "params", "quantize_activations", "quantize_weight", "threads", "unpack"]

name = "numba"
default_format = "i2"
bitlinear_takes_nd = True  # bitlinear accepts (..., K) itself


# ------------------------------------------------------------------------------------------------- params
_params: dict | None = None
_epoch = 0  # bumped by configure()


def params() -> dict:
    """The current kernel parameters: the capability plan, the tuning file over it, then `configure` overrides."""
    global _params
    if _params is None:
        _params = tuning.load(ISA)
    return dict(_params)


def configure(**kw) -> dict:
    """Change kernel parameters at runtime (names/values as in tuning.CPU_DEFAULTS); returns them all."""
    global _epoch
    params()
    _params.update(tuning.validate(kw))
    _epoch += 1  # plans cached by bitlinear_fp32 were made with the old parameters
    return params()


def threads(work: int) -> int:
    """Apply and return the thread count the kernels use for a call of `work` multiply-adds (see _threads)."""
    n = _threads(_params or params(), work)
    set_threads(n)
    return n


def _threads(p: dict, work: int) -> int:
    """Threads for a call doing `work` multiply-adds: the tuned value, else torch's, capped by NUMBA_NUM_THREADS;
    one thread below tuning.SERIAL_WORK, where a parallel region costs more than it saves."""
    if work < tuning.SERIAL_WORK:
        return 1
    return max(1, min(p["threads"] or torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


# ------------------------------------------------------------------------------------------- torch glue
_F32 = torch.float32  # dtypes are singletons: `x.dtype is _F32` is 0.1 us cheaper than `== torch.float32`


def _f32(x: torch.Tensor) -> np.ndarray:
    if x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad:
        return x.numpy()
    return x.detach().float().contiguous().numpy()


def tiling(p: dict, m: int, threads: int) -> tuple[int, int, bool, int]:
    """The packed engine's tiling arguments for M = m rows under kernel parameters p:
    (threads, panel_bytes, gemm_rows, outer_rows)."""
    return threads, p["panel_bytes"], m >= p["gemm_min_m"], p["outer_min_rows"]


def _launch(p: dict, m: int, work: int) -> tuple[int, int, bool, int]:
    """Apply the thread count for a call of `work` multiply-adds on M = m rows and return its tiling arguments:
    one helper per kernel call (each Python call costs ~0.2 us on the decode path)."""
    threads = _threads(p, work)
    set_threads(threads)
    return tiling(p, m, threads)


def _i2(pw: PackedWeight) -> tuple[np.ndarray, float, int, dict]:
    """(i2 data as a NumPy array, gamma as a float, the array's address, bitlinear_fp32's cache: its plans by x's
    shape and, under "bias", the last bias's view), made once per PackedWeight (~4 us saved per call); the view
    holds the array, so the address stays valid as long as pw."""
    view = pw.views.get("numba")
    if view is None:
        if pw.format != "i2":
            raise ValueError(f"the numba kernels compute on format 'i2', got {pw.format!r}; "
                             "use kernels.repack(pw, 'i2')")
        wp = pw.data.contiguous().numpy()
        view = pw.views["numba"] = (wp, pw.gamma.item(), wp.ctypes.data, {})
    return view


_NO_BIAS = np.empty(0, np.float32)  # the engine's "no bias" (an empty array: one compiled engine for both)


def _bias(bias: torch.Tensor | None) -> np.ndarray:
    return _NO_BIAS if bias is None else _f32(bias)


def _int_mm_engine(m: int, p: dict) -> bool:
    return p["gemm_impl"] == "int_mm" and m > p["gemv_max_m"]


def _dequant_tiles(pw: PackedWeight, tile_n: int):
    """Yield (n0, n1, int8 tile (n1 - n0, K)) over the weight rows, reusing one scratch buffer."""
    wp, (n, k) = _i2(pw)[0], pw.shape
    tile = min(n, tile_n)
    w8 = torch.empty((tile, k), dtype=torch.int8)
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        _unpack_i2(wp, n0, n1, k, w8.numpy())
        yield n0, n1, w8[: n1 - n0]


def _gemm_int_mm(xq: torch.Tensor, pw: PackedWeight, scale: np.ndarray | None, bias, out: torch.Tensor,
                 tile_n: int) -> None:
    """int_mm engine: oneDNN int8 GEMM per unpacked weight tile, Numba epilogue (none if scale is None)."""
    for n0, n1, w8 in _dequant_tiles(pw, tile_n):
        wt = w8.t() if pw.in_features > 1 else w8.t().clone(memory_format=torch.contiguous_format)  # (K, t)
        acc = torch._int_mm(xq, wt)
        if scale is None:
            out[:, n0:n1] = acc
        else:
            _epilogue(acc.numpy(), n0, scale, _bias(bias), out.numpy())


def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (xq int8 (M, K), s fp32 (M,)), bit-exact with reference.act_quant."""
    set_threads(_threads(_params or params(), x2d.numel()))
    m, k = x2d.shape
    xq = torch.empty((m, k), dtype=torch.int8)
    s = torch.empty(m, dtype=torch.float32)
    _quantize(_f32(x2d), xq.numpy(), s.numpy(), np.empty(m, np.int32))
    return xq, s


def _matmul(xq: torch.Tensor, s: torch.Tensor | None, pw: PackedWeight, bias) -> torch.Tensor:
    """int32 product (s None) or fp32 epilogue, on the engine the plan picks for this M."""
    m, (n, k) = xq.shape[0], pw.shape
    p = _params or params()
    args = _launch(p, m, m * n * k)
    s_np = None if s is None else s.detach().contiguous().numpy()
    wp, gamma = _i2(pw)[:2]
    if not _int_mm_engine(m, p):
        if s is None:
            return torch.from_numpy(_matmul_int_packed(xq.contiguous().numpy(), wp, *args))
        return torch.from_numpy(_matmul_packed(xq.contiguous().numpy(), s_np, gamma, wp, _bias(bias), *args))
    out = torch.empty((m, n), dtype=torch.int32 if s is None else torch.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = None if s is None else np.float32(gamma) / s_np
    _gemm_int_mm(xq.contiguous(), pw, scale, bias, out, p["gemm_tile_n"])
    return out


def matmul_int(xq: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """(M, K) int8 x i2 (N, K) -> (M, N) int32, exact."""
    return _matmul(xq, None, pw, None)


def matmul(xq: torch.Tensor, s: torch.Tensor, pw: PackedWeight, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """(M, K) int8, (M,) fp32 x i2 -> (M, N) out_dtype: exact int32 product, epilogue acc * (gamma / s) + bias."""
    out = _matmul(xq, s, pw, bias)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


def bitlinear(x: torch.Tensor, pw: PackedWeight, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """Fused forward: quantize activations and multiply, (..., K) float -> (..., N) out_dtype. The decode path of
    every layer: x, the output (allocated in its final shape) and the weight go to Numba by address, with no torch
    reshape (a 256 x 256 layer at M=1 is ~3 us of arithmetic in a ~11 us call; docs/kernels.md)."""
    (n, k), shape = pw.shape, x.shape
    if x.dtype is not _F32 or not x.is_contiguous():
        x = x.detach().float().contiguous()
    m = x.numel() // k
    p = _params or params()
    if _int_mm_engine(m, p):
        xq, s = quantize_activations(x.detach().reshape(m, k))
        return matmul(xq, s, pw, bias, out_dtype).reshape(*shape[:-1], n)
    _, gamma, w_addr, _ = _i2(pw)
    # fp32 like x now; integer sizes, as new_empty(tuple) and torch.empty(..., dtype=) cost ~1.5 us more
    out = x.new_empty(m, n) if len(shape) == 2 else x.new_empty(*shape[:-1], n)
    b = _bias(bias)
    _bitlinear_packed(x.data_ptr(), out.data_ptr(), 0, w_addr, m, k, n, gamma, b.ctypes.data if b.size else 0,
                      *_launch(p, m, m * n * k))
    return out if out_dtype is _F32 else out.to(out_dtype)


def bitlinear_fp32(x: torch.Tensor, pw: PackedWeight, view: tuple, bias: torch.Tensor | None, kinds: int = 0,
                   out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """`bitlinear` for the decode hot path, whose arguments kernels.bitlinear has checked but for x's shape, the
    bias and out: x fp32 (bf16 when kinds & 1, fp16 when kinds & 4), contiguous, on the CPU; view = `_i2(pw)` (so pw
    is an i2 CPU weight); the result in x's dtype unless out_dtype says (bf16 when kinds & 2, fp16 when kinds & 8,
    else fp32), converted inside the kernel (cpu_engine._bitlinear_packed), written into `out` when given. None when
    x is not (..., K), the bias is not a float CPU vector of N, or out is not a contiguous CPU tensor of the result's
    shape and dtype outside autograd (the general path then says what is wrong, or copies into a strided out).
    The kernel's arguments for x's shape are planned once per shape (`_decode_plan`) and the bias's address kept
    (`_bias_arg`), so a call is the output's allocation and one Numba dispatch (a 256 x 256 call at M=1: ~11 us,
    was ~16; a 1024 x 1024 one on 2 threads: ~39 us, was ~42; docs/kernels.md)."""
    if bias is not None:
        b = _bias_arg(view, bias, pw.shape[0])
        if b is None:
            return None
        kinds |= b[1]
    shape = x.shape
    plan = view[3].get(shape)
    if plan is None or plan[0] != _epoch:
        plan = _decode_plan(pw, view, shape)
    if not plan[1] or (out is not None and not (  # x is not (..., K) (None) or the int_mm engine serves this M ()
            type(out) is torch.Tensor and out.shape == plan[1] and out.dtype is (out_dtype or _F32) and out.is_cpu
            and out.is_contiguous() and not out.requires_grad)):
        return None
    if kinds & 15 and not plan[6]:  # a large bf16 / fp16 call: torch's threaded, vectorized conversions win
        y = bitlinear_fp32(x.float() if kinds & 5 else x, pw, view, bias)
        if kinds & 10:
            y = y.to(out_dtype)
        return y if out is None else out.copy_(y)
    if out is None:
        out = x.new_empty(*plan[1]) if out_dtype is None else x.new_empty(*plan[1], dtype=out_dtype)
    if bias is None and plan[2]:  # no bias, a thread count known when planned: the arguments as planned
        _bitlinear_packed(x.data_ptr(), out.data_ptr(), kinds, *plan[2])
        return out
    # torch's thread count may change between calls; the engine applies the count itself
    threads = plan[7] or _threads(_params, plan[5])
    _bitlinear_packed(x.data_ptr(), out.data_ptr(), kinds, *plan[3], 0 if bias is None else b[0], threads, *plan[4])
    return out


_BF16, _F16 = torch.bfloat16, torch.float16
# Elements of x or out (the larger) up to which bf16 / fp16 are converted inside the kernel (cpu_convert, one
# thread) rather than by torch (Zen 1: cpu_convert ahead up to ~4-16k elements; from ~64k torch's threaded F16C
# conversions are 2-4x faster for fp16, and even for bf16).
CAST_IN_KERNEL_MAX = 1 << 15


def bitlinear_cast(x: torch.Tensor, pw: PackedWeight, view: tuple, bias: torch.Tensor | None,
                   out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """`bitlinear_fp32` for kernels.bitlinear's other float cases (bf16 / fp16 or non-contiguous x, an out_dtype),
    with the same bits as the general path, which converts to fp32 and back with torch: contiguous bf16 / fp16 x and
    a bf16 / fp16 output are converted inside the kernel (cpu_convert: as torch converts) in a call of at most
    CAST_IN_KERNEL_MAX elements (decode), with torch in larger ones (bitlinear_fp32 decides from its plan), and a
    strided x with torch here. The general path's checks cost ~16 us at M=1, torch's conversions 5-8 us each way."""
    kinds = 0
    if x.dtype is not _F32 or not x.is_contiguous():
        if x.dtype is _BF16 and x.is_contiguous():
            kinds = 1
        elif x.dtype is _F16 and x.is_contiguous():
            kinds = 4
        else:
            x = x.detach().float().contiguous()
    if out_dtype is _F32:
        return bitlinear_fp32(x, pw, view, bias, kinds, _F32, out)
    return bitlinear_fp32(x, pw, view, bias, kinds | (2 if out_dtype is _BF16 else 8), out_dtype, out)


def _bias_arg(view: tuple, bias: torch.Tensor, n: int) -> tuple | None:
    """(address, kinds bit, what holds the memory[, its detached storage]) of a float CPU bias vector of n for the
    engine, or None when it is not one. A contiguous bias is read where it lives (bf16 / fp16 widened inside the
    kernel as torch widens: kinds 16 / 32), so an in-place change through `.data` is always seen; a strided one is
    copied to fp32 every call. The argument of a contiguous bias is kept in view (a layer passes the same Parameter
    every call): a hit is the same object at the same address (a tensor given new storage, `.data = ...`, has
    another address, as the kept detached tensor holds the old storage alive)."""
    hit = view[3].get("bias")
    if hit is not None and hit[2] is bias and bias.data_ptr() == hit[0]:
        return hit
    if not (type(bias) is torch.Tensor or type(bias) is torch.nn.Parameter) or not (
            bias.dtype in FLOAT_DTYPES and bias.is_cpu and bias.dim() == 1 and bias.shape[0] == n):
        return None
    if not bias.is_contiguous():
        b = _f32(bias)
        return b.ctypes.data, 0, b
    arg = view[3]["bias"] = (bias.data_ptr(), _BIAS_KINDS[bias.dtype], bias, bias.detach())
    return arg


_BIAS_KINDS = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 32}


def _decode_plan(pw: PackedWeight, view: tuple, shape: torch.Size) -> tuple:
    """(epoch, output sizes, a no-bias call's arguments after the kinds when its thread count is known now (or ()),
    the arguments before the bias, those after the thread count, the work in multiply-adds, whether bf16 / fp16 x
    and out are converted inside the kernel, the thread count when known now (else 0: torch's, read per call)) for
    x of `shape` against pw, cached in view. Sizes are None when x is not (..., K) and () when the int_mm engine
    serves this M. The count is known now below tuning.SERIAL_WORK (one) and when `configure` set it."""
    n, k = pw.shape
    p = _params or params()
    sizes, fixed, head, rest, work, cast_inside, threads = None, (), (), (), 0, False, 0
    if len(shape) and shape[-1] == k:
        m = math.prod(shape[:-1])
        cast_inside = m * max(k, n) <= CAST_IN_KERNEL_MAX
        work = m * n * k
        sizes = () if _int_mm_engine(m, p) else (*shape[:-1], n)
        head, rest = (view[2], m, k, n, view[1]), (p["panel_bytes"], m >= p["gemm_min_m"], p["outer_min_rows"])
        if work < tuning.SERIAL_WORK or p["threads"]:
            threads = _threads(p, work)
            fixed = (*head, 0, threads, *rest)
    plans = view[3]
    if len(plans) >= 64:  # prefill shapes vary with the sequence length: keep the cache small
        plans.clear()
    plans[shape] = plan = (_epoch, sizes, fixed, head, rest, work, cast_inside, threads)
    return plan


def bitlinear_train(x2d: torch.Tensor, pw: PackedWeight, bias, out_dtype: torch.dtype):
    """Training forward: (y (M, N) out_dtype, xq (M, K) int8, s (M,)) with one quantization pass, straight into
    the kernels' zero-padded buffer (no second pass to copy xq there)."""
    m, (n, k) = x2d.shape[0], pw.shape
    p = _params or params()
    if _int_mm_engine(m, p):
        xq, s = quantize_activations(x2d)
        return matmul(xq, s, pw, bias, out_dtype), xq, s
    wp, gamma = _i2(pw)[:2]
    out, xq, s = _bitlinear_train_packed(_f32(x2d), gamma, wp, _bias(bias), *_launch(p, m, m * n * k))
    y, xq = torch.from_numpy(out), torch.from_numpy(xq)
    xq = xq if xq.shape[1] == k else xq[:, :k].contiguous()  # K not a multiple of 128: M x K bytes copied
    return y if out_dtype == torch.float32 else y.to(out_dtype), xq, torch.from_numpy(s)


# ------------------------------------------------------------------------------------------ backward
def grad_input(grad_y2d: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """(M, N) float -> (M, K) fp32 = grad_y @ (Wt * gamma): fp32 GEMM (oneDNN) over dequantized weight tiles of
    gemm_tile_n rows (one GEMM, bit-identical to the reference, when the weight fits one tile)."""
    p = _params or params()
    (n, k), (wp, gamma) = pw.shape, _i2(pw)[:2]
    set_threads(_threads(p, n * k))
    gy = grad_y2d.detach().float()
    tile = min(n, p["gemm_tile_n"])
    gx = gy[:, :tile] @ torch.from_numpy(_dequant_weight(wp, 0, tile, k, gamma))
    for n0 in range(tile, n, tile):
        n1 = min(n, n0 + tile)
        gx.addmm_(gy[:, n0:n1], torch.from_numpy(_dequant_weight(wp, n0, n1, k, gamma)))
    return gx


# grad_weight's dequantized activations live only until its GEMM returns, so each Python thread reuses one buffer
# (up to this size; larger ones are allocated per call): a fresh 4-11 MB array each step page-faults in a VM once
# glibc has returned the memory, 1.4-1.8 ms per 4096 x 256 layer here against 0.3-0.4 ms for the pass itself.
SCRATCH_MAX_BYTES = 64 << 20
_scratch = threading.local()


def _x_dq_buffer(shape: tuple[int, int]) -> np.ndarray:
    size = shape[0] * shape[1]
    if 4 * size > SCRATCH_MAX_BYTES:
        return np.empty(shape, np.float32)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < size:
        buf = _scratch.buf = np.empty(size, np.float32)
    return buf[:size].reshape(shape)


def grad_weight(grad_y2d: torch.Tensor, xq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(M, N), (M, K) int8, (M,) -> (N, K) fp32 = grad_y^T @ (xq / s): one fused dequantizing pass into a reused
    buffer, one fp32 GEMM."""
    set_threads(_threads(_params or params(), xq.numel()))
    x_dq = _x_dq_buffer(tuple(xq.shape))
    _dequant_x(xq.contiguous().numpy(), s.detach().float().contiguous().numpy(), x_dq)
    return grad_y2d.detach().float().T @ torch.from_numpy(x_dq)
