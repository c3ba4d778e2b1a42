"""The "numba" backend: int8 activations x ternary i2 weights on CPU, exact in int32, multi-threaded.

Two engines, chosen per call by `kernels.tuning` (a plan derived from this CPU's capabilities, refined by
`bitnet-fast calibrate`):
  * packed: Numba drivers around the dot-product tiles of `cpu_dot.py`, reading the i2 bytes directly. Work is
    split into tasks of (weight panel that fits L2) x (block of activation rows); inside a task, a tile of
    activation rows stays in L1 while it sweeps the panel. Decode (M small) reads one weight row at a time
    (sequential streams from DRAM: 11-16 GB/s against 8.5-10 for 1 x 4 tiles here), larger M uses the ISA's
    GEMM tile. Codes c = w + 1 are unsigned, so x.w = x.c - sum(x): sum(x) is subtracted per row.
  * int_mm: i2 tiles unpacked to int8 and multiplied by `torch._int_mm` (oneDNN). Fast only where oneDNN has
    VNNI (ATen picks its plain loop elsewhere: 30x slower than fp32 on AVX2), so the plan uses it only there.
The epilogue acc * (gamma / s) (+ bias) is fused into the packed engine. Everything compiles lazily on first
call (`cache=True`).
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch
from numba import carray, njit, prange

from . import numba_cache, reference, tuning
from .cpu_dot import DOT_LAYOUT_PAIRS, ISA, ISAS, OUTER_LANES, address_as, fetch_add, make_dot, make_outer_dot
from .cpu_pack import pack, quantize_weight, set_threads, unpack
from .packing import PackedWeight

numba_cache.install()  # before the first @njit(cache=True): keyed on all kernel sources and the ISA

__all__ = ["ISA", "ISAS", "bitlinear", "bitlinear_train", "configure", "grad_input", "grad_weight", "matmul",
           "matmul_int", "pack", "params", "quantize_activations", "quantize_weight", "threads", "unpack"]

name = "numba"
default_format = "i2"
bitlinear_takes_nd = True  # bitlinear accepts (..., K) itself
BLOCK = reference.I2_BLOCK
# The GEMM register tile (activation rows, weight rows) per ISA class. Defined here, where it is compiled in, so
# that Numba's cache (keyed on this file) never serves a kernel built with another tile. avx2 takes 4 x 1: its
# 4 x 2 tile holds 8 int16 accumulators plus decoded codes in 16 ymm registers and LLVM spilled 7 of them per
# block; 4 x 1 folds each activation load into vpmaddubsw (K=256, M=2048, N=512: 3.4-4.0 vs 4.5-4.6 ms, 3 runs).
GEMM_TILES = {"vnni512": (4, 2), "vnni": (4, 2), "avx2": (4, 1), "portable": (4, 2)}
MR, NR = GEMM_TILES[ISA]
_dot_gemm, _dot_gemm_col, _dot_one = (make_dot(r, c) for r, c in ((MR, NR), (MR, 1), (1, 1)))
# avx2 runs its GEMM on the outer-product tile (cpu_dot.make_outer_dot: OUTER_MR rows x 2 x 8 outputs) over a
# panel interleaved per task; a task takes it from `outer_rows` activation rows on (tuning: outer_min_rows).
OUTER = ISA == "avx2"
OUTER_MR = 4
_outer_wide, _outer_one, _outer_row_wide, _outer_row_one = (make_outer_dot(r, v)
                                                            for r, v in ((OUTER_MR, 2), (OUTER_MR, 1), (1, 2), (1, 1)))


# --------------------------------------------------------------------------------------- activation quant
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
    amax = np.int32(top).view(np.float32)  # the bits back as a float, without an array per row
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
    """(M, Kp) int8 -> the order the dot tiles load: with 64-byte vectors, each pair of 128-blocks is
    interleaved by quarter (q, block, j) so that one load meets the codes of two blocks; else unchanged."""
    if not DOT_LAYOUT_PAIRS:
        return xp
    out = xp.copy()
    for r in range(xp.shape[0]):
        for p in range(xp.shape[1] // (2 * BLOCK)):
            for h in range(2):
                for q in range(4):
                    for j in range(32):
                        out[r, 2 * BLOCK * p + 64 * q + 32 * h + j] = xp[r, 2 * BLOCK * p + BLOCK * h + 32 * q + j]
    return out


# --------------------------------------------------------------------------------------------- the engine
@njit(cache=True)
def _epilogue_strip(acc, r, nr, p0, xsum, scale, bias, out) -> None:
    """out[r:r+nr, p0:p0+w] = acc[:nr, :w] - sum(x) (int32 out when scale is None), else * scale (+ bias) in fp32."""
    w = acc.shape[1]
    for t in range(nr):
        xs = xsum[r + t]
        if scale is None:
            for i in range(w):
                out[r + t, p0 + i] = acc[t, i] - xs
        else:
            sc = scale[r + t]
            if bias is None:
                for i in range(w):
                    out[r + t, p0 + i] = np.float32(acc[t, i] - xs) * sc
            else:
                for i in range(w):
                    out[r + t, p0 + i] = np.float32(acc[t, i] - xs) * sc + bias[p0 + i]


@njit(cache=True)
def _mm(xq, xsum, scale, wp, bias, out, threads, panel_bytes, gemm_rows, outer_rows) -> None:
    """out (M, N) = xq (M, Kp) int8 [dot layout] x i2 wp (N, Kp/4), exact in int32, then the epilogue.

    About 8 tasks per thread: weight panels of at most `panel_bytes` (L2-resident, as many per thread) times
    blocks of activation rows (when there are fewer panels than tasks). A tile of activation rows (MR with the
    GEMM tile when `gemm_rows`, else one with the 1 x 1 decode tile) sweeps its panel into an int32 strip, and the
    epilogue runs over the strip (vectorized). On avx2, a GEMM task of at least `outer_rows` rows interleaves its
    panel and runs the outer-product tile instead. One thread runs the tasks in place: a parallel region costs
    more than a small GEMV itself, and on a busy machine it can wait on the pool's other workers.
    """
    m, n, kb = xq.shape[0], wp.shape[0], wp.shape[1]
    if m == 0:
        return
    tasks = 8 * threads
    panel = min(n, max(4 * NR, panel_bytes // kb))
    npanels = ((n + panel - 1) // panel + threads - 1) // threads * threads  # every thread gets as many panels
    npanels = min(npanels, max(1, n // (4 * NR)))
    mtiles = (m + MR - 1) // MR
    mblocks = min(mtiles, max(1, (tasks + npanels - 1) // npanels))
    rows_per_block = (mtiles + mblocks - 1) // mblocks * MR
    outer = OUTER and gemm_rows and rows_per_block >= outer_rows  # some task takes the outer-product tile
    outer_groups = (n // npanels + 1 + OUTER_LANES - 1) // OUTER_LANES if outer else 0
    counter = np.zeros(1, np.int64)
    if threads == 1:
        _mm_worker(xq, xsum, scale, wp, bias, out, counter, npanels, mblocks, rows_per_block, gemm_rows, outer_rows,
                   outer_groups)
    else:
        _mm_parallel(xq, xsum, scale, wp, bias, out, threads, counter, npanels, mblocks, rows_per_block, gemm_rows,
                     outer_rows, outer_groups)


@njit(cache=True, parallel=True)
def _mm_parallel(xq, xsum, scale, wp, bias, out, threads, counter, npanels, mblocks, rows_per_block, gemm_rows,
                 outer_rows, outer_groups) -> None:
    """_mm's tasks on `threads` workers, each taking the next task until none is left (fetch_add)."""
    for _worker in prange(threads):
        _mm_worker(xq, xsum, scale, wp, bias, out, counter, npanels, mblocks, rows_per_block, gemm_rows, outer_rows,
                   outer_groups)


@njit(cache=True)
def _mm_worker(xq, xsum, scale, wp, bias, out, counter, npanels, mblocks, rows_per_block, gemm_rows, outer_rows,
               outer_groups) -> None:
    """Take _mm's tasks from the shared counter until none is left, with this worker's interleaved-panel buffer."""
    kb = wp.shape[1]
    nblk, ntasks = kb // 32, npanels * mblocks
    wi = np.empty((outer_groups, kb * OUTER_LANES), np.uint8)  # this worker's interleaved panel (OUTER)
    task = fetch_add(counter, 1)
    while task < ntasks:
        _mm_task(xq, xsum, scale, wp, bias, out, task, npanels, rows_per_block, nblk, gemm_rows, outer_rows, wi)
        task = fetch_add(counter, 1)


@njit(cache=True)
def interleave_panel(wp, p0, p1, wi) -> None:
    """Weight rows p0..p1 of i2 wp (N, Kb) in the outer-product tile's layout: wi[g] holds, for each dword column c
    of the rows, the dwords of rows p0 + 8g .. p0 + 8g + 7 side by side (dword 8c + i = dword c of wp[p0 + 8g + i]),
    zero past p1. One pass over the panel's bytes, amortized over the task's activation rows."""
    cols = wp.shape[1] // 4
    for g in range((p1 - p0 + OUTER_LANES - 1) // OUTER_LANES):
        dst = wi[g].view(np.uint32)
        for i in range(OUTER_LANES):
            row = p0 + OUTER_LANES * g + i
            if row < p1:
                src = wp[row].view(np.uint32)
                for c in range(cols):
                    dst[OUTER_LANES * c + i] = src[c]
            else:
                for c in range(cols):
                    dst[OUTER_LANES * c + i] = 0


@njit(cache=True)
def _outer_strips(xq, xsum, scale, bias, out, wi, p0, p1, r, m1, nblk) -> None:
    """Activation rows r..m1 times weight rows p0..p1 (interleaved in wi) on the outer-product tiles, then the
    epilogue per strip of OUTER_MR rows."""
    w = p1 - p0
    groups = (w + OUTER_LANES - 1) // OUTER_LANES
    acc = np.empty((OUTER_MR, groups * OUTER_LANES), np.int32)
    while r < m1:
        nr = OUTER_MR if m1 - r >= OUTER_MR else 1
        g = 0
        while g < groups:
            wide = groups - g >= 2
            if nr == OUTER_MR:
                if wide:
                    _outer_wide(wi, g, xq, r, nblk, acc, OUTER_LANES * g)
                else:
                    _outer_one(wi, g, xq, r, nblk, acc, OUTER_LANES * g)
            elif wide:
                _outer_row_wide(wi, g, xq, r, nblk, acc, OUTER_LANES * g)
            else:
                _outer_row_one(wi, g, xq, r, nblk, acc, OUTER_LANES * g)
            g += 2 if wide else 1
        _epilogue_strip(acc[:, :w], r, nr, p0, xsum, scale, bias, out)
        r += nr


@njit(cache=True)
def _mm_task(xq, xsum, scale, wp, bias, out, task, npanels, rows_per_block, nblk, gemm_rows, outer_rows,
             wi) -> None:
    """One task of _mm: weight panel task % npanels x the block of activation rows task // npanels."""
    m, n = xq.shape[0], wp.shape[0]
    p0 = task % npanels * n // npanels  # balanced panels
    p1 = (task % npanels + 1) * n // npanels
    r, m1 = task // npanels * rows_per_block, min(m, (task // npanels + 1) * rows_per_block)
    if wi.shape[0] and m1 - r >= outer_rows:  # a panel buffer exists only when the outer-product tile is in play
        interleave_panel(wp, p0, p1, wi)
        _outer_strips(xq, xsum, scale, bias, out, wi, p0, p1, r, m1, nblk)
        return
    acc = np.empty((MR, p1 - p0), np.int32)
    while r < m1:
        nr = MR if gemm_rows and m1 - r >= MR else 1
        i = p0
        while i < p1:
            if nr == MR:
                nc = NR if p1 - i >= NR else 1
                if nc == NR:
                    _dot_gemm(wp, i, xq, r, nblk, acc, i - p0)
                else:
                    _dot_gemm_col(wp, i, xq, r, nblk, acc, i - p0)
            else:  # one row at a time: a purely sequential stream, which DRAM prefetching serves best
                nc = 1
                _dot_one(wp, i, xq, r, nblk, acc, i - p0)
            i += nc
        _epilogue_strip(acc, r, nr, p0, xsum, scale, bias, out)
        r += nr


@njit(cache=True, parallel=True)
def _prepare_q(xq, kp):
    """(M, K) int8 -> (zero-padded (M, Kp) in the dot layout, row sums (M,) int32)."""
    m, k = xq.shape
    xp = np.zeros((m, kp), np.int8)
    xsum = np.zeros(m, np.int32)
    for r in prange(m):
        total = np.int32(0)
        for j in range(k):
            xp[r, j] = xq[r, j]
            total += np.int32(xq[r, j])
        xsum[r] = total
    return _dot_layout(xp), xsum


@njit(cache=True)
def _prepare_f(x, kp, threads):
    """(M, K) fp32 -> (quantized (M, Kp) int8 zero-padded, the same in the dot layout, row sums, scales s)."""
    m = x.shape[0]
    xq = np.zeros((m, kp), np.int8)
    s = np.empty(m, np.float32)
    xsum = np.empty(m, np.int32)
    if threads == 1 or m * kp < 65536:  # decode or a one-thread call: no parallel region
        for r in range(m):
            _quant_row(x, r, xq, s, xsum)
    else:
        _quantize(x, xq, s, xsum)
    return xq, _dot_layout(xq), xsum, s


# Entry points from Python: one dispatch per call.
@njit(cache=True)
def _bitlinear_packed(x_addr, out_addr, w_addr, m, k, n, gamma, bias, threads, panel_bytes, gemm_rows, outer_rows):
    """Fused forward on the packed engine: x (M, K) fp32 -> out (M, N) fp32, both contiguous, and the i2 weight
    (N, Kp / 4), all passed by address (0.1 us each, where unboxing an array costs ~0.5 us and returning one ~3 us
    with torch.from_numpy): the caller keeps the three buffers alive for the call."""
    kb = (k + BLOCK - 1) // BLOCK * (BLOCK // 4)  # i2 bytes per weight row: reference.padded_k(k) / 4
    x = carray(address_as(x_addr, np.float32(0)), (m, k))
    out = carray(address_as(out_addr, np.float32(0)), (m, n))
    wp = carray(address_as(w_addr, np.uint8(0)), (n, kb))
    _, xl, xsum, s = _prepare_f(x, kb * 4, threads)
    _mm(xl, xsum, np.float32(gamma) / s, wp, bias, out, threads, panel_bytes, gemm_rows, outer_rows)


@njit(cache=True)
def _bitlinear_train_packed(x, gamma, wp, bias, threads, panel_bytes, gemm_rows, outer_rows):
    """Training forward: (y (M, N) fp32, xq (M, Kp) int8 zero-padded, s (M,)) in one quantization pass."""
    out = np.empty((x.shape[0], wp.shape[0]), np.float32)
    xq, xl, xsum, s = _prepare_f(x, wp.shape[1] * 4, threads)
    _mm(xl, xsum, np.float32(gamma) / s, wp, bias, out, threads, panel_bytes, gemm_rows, outer_rows)
    return out, xq, s


@njit(cache=True)
def _matmul_packed(xq, s, gamma, wp, bias, threads, panel_bytes, gemm_rows, outer_rows):
    """Quantized activations (M, K) int8 times i2 on the packed engine -> (M, N) fp32, epilogue
    acc * (gamma / s) (+ bias)."""
    xp, xsum = _prepare_q(xq, wp.shape[1] * 4)
    out = np.empty((xq.shape[0], wp.shape[0]), np.float32)
    _mm(xp, xsum, np.float32(gamma) / s, wp, bias, out, threads, panel_bytes, gemm_rows, outer_rows)
    return out


@njit(cache=True)
def _matmul_int_packed(xq, wp, threads, panel_bytes, gemm_rows, outer_rows):
    """(M, K) int8 times i2 on the packed engine -> the exact (M, N) int32 product."""
    xp, xsum = _prepare_q(xq, wp.shape[1] * 4)
    out = np.empty((xq.shape[0], wp.shape[0]), np.int32)
    _mm(xp, xsum, None, wp, None, out, threads, panel_bytes, gemm_rows, outer_rows)
    return out


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
def _dequant_weight(wp, n0, n1, k, gamma):
    """i2 rows n0..n1 -> (n1 - n0, k) fp32 Wt * gamma, as reference.grad_input forms it (one fp32 rounding)."""
    out = np.empty((n1 - n0, k), np.float32)
    g = np.float32(gamma)
    for i in prange(n1 - n0):
        for blk in range((k + BLOCK - 1) // BLOCK):
            for q in range(4):
                base = blk * BLOCK + 32 * q
                for j in range(min(32, k - base)):
                    out[i, base + j] = np.float32(np.int32((wp[n0 + i, blk * 32 + j] >> (2 * q)) & 3) - 1) * g
    return out


@njit(cache=True, parallel=True)
def _dequant_x(xq, s, out):
    """out (M, K) fp32 = (M, K) int8 xq / s (M,), as reference.grad_weight forms it."""
    for r in prange(xq.shape[0]):
        for j in range(xq.shape[1]):
            out[r, j] = np.float32(xq[r, j]) / s[r]


@njit(cache=True, parallel=True)
def _epilogue(acc, n0, scale, bias, out) -> None:
    """out[:, n0:n0 + t] = acc (M, t) int32 * scale[:, None] (+ bias[n0:n0 + t]), in fp32."""
    for r in prange(out.shape[0]):
        for i in range(acc.shape[1]):
            if bias is None:
                out[r, n0 + i] = np.float32(acc[r, i]) * scale[r]
            else:
                out[r, n0 + i] = np.float32(acc[r, i]) * scale[r] + bias[n0 + i]


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


def _bias(bias: torch.Tensor | None) -> np.ndarray | None:
    return None if bias is None else _f32(bias)


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
    _bitlinear_packed(x.data_ptr(), out.data_ptr(), w_addr, m, k, n, gamma, _bias(bias), *_launch(p, m, m * n * k))
    return out if out_dtype is _F32 else out.to(out_dtype)


def bitlinear_fp32(x: torch.Tensor, pw: PackedWeight, view: tuple, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`bitlinear` for the decode hot path, whose arguments kernels.bitlinear has checked but for x's shape and the
    bias: x fp32, contiguous, on the CPU; view = `_i2(pw)` (so pw is an i2 CPU weight); fp32 out. None when x is
    not (..., K) or the bias is not an fp32 CPU vector of N (the general path then converts or says what is wrong).
    The kernel's arguments for x's shape are planned once per shape (`_decode_plan`) and the bias's view kept
    (`_bias_view`), so a call is the output's allocation and one Numba dispatch (a 256 x 256 call at M=1: ~11 us,
    was ~16; a 1024 x 1024 one on 2 threads: ~39 us, was ~42; docs/kernels.md)."""
    if bias is not None:
        bias_np = _bias_view(view, bias, pw.shape[0])
        if bias_np is False:
            return None
    shape = x.shape
    plan = view[3].get(shape)
    if plan is None or plan[0] != _epoch:
        plan = _decode_plan(pw, view, shape)
    if not plan[1]:  # x is not (..., K) (None), or the int_mm engine serves this M (): the general path
        return None if plan[1] is None else bitlinear(x, pw, bias, _F32)
    out = x.new_empty(*plan[1])
    if bias is None and plan[2]:  # one thread, no bias: the arguments as planned
        _bitlinear_packed(x.data_ptr(), out.data_ptr(), *plan[2])
        return out
    work = plan[5]
    threads = 1 if work < tuning.SERIAL_WORK else _threads(_params, work)  # torch's count may change between calls
    if threads > 1:
        set_threads(threads)
    _bitlinear_packed(x.data_ptr(), out.data_ptr(), *plan[3], None if bias is None else bias_np, threads, *plan[4])
    return out


def _bias_view(view: tuple, bias: torch.Tensor, n: int) -> np.ndarray | bool:
    """The NumPy view of an fp32 CPU bias of n, or False when it is not one. The last bias seen is kept in view
    (a layer passes the same Parameter every call): a hit is the same object at the same address (a tensor given
    new storage, `.data = ...`, has another address, as the kept view holds the old one alive)."""
    hit = view[3].get("bias")
    if hit is not None and hit[0] is bias and bias.data_ptr() == hit[2]:
        return hit[1]
    if not (type(bias) is torch.Tensor or type(bias) is torch.nn.Parameter) or not (
            bias.dtype is _F32 and bias.is_cpu and bias.dim() == 1 and bias.shape[0] == n and bias.is_contiguous()):
        return False
    b = bias.detach().numpy()
    view[3]["bias"] = (bias, b, b.ctypes.data)
    return b


def _decode_plan(pw: PackedWeight, view: tuple, shape: torch.Size) -> tuple:
    """(epoch, output sizes, a one-thread no-bias call's arguments after the two addresses (or ()), the arguments
    before the bias, those after the thread count, the work in multiply-adds) for fp32 x of `shape` against pw,
    cached in view. Sizes are None when x is not (..., K) and () when the int_mm engine serves this M."""
    n, k = pw.shape
    p = _params or params()
    sizes, serial, head, rest, work = None, (), (), (), 0
    if len(shape) and shape[-1] == k:
        m = math.prod(shape[:-1])
        work = m * n * k
        sizes = () if _int_mm_engine(m, p) else (*shape[:-1], n)
        head, rest = (view[2], m, k, n, view[1]), (p["panel_bytes"], m >= p["gemm_min_m"], p["outer_min_rows"])
        if work < tuning.SERIAL_WORK:
            serial = (*head, None, 1, *rest)
    plans = view[3]
    if len(plans) >= 64:  # prefill shapes vary with the sequence length: keep the cache small
        plans.clear()
    plans[shape] = plan = (_epoch, sizes, serial, head, rest, work)
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
