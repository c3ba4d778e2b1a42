"""The packed engine's Numba drivers: activation quantization, the task split over weight panels and activation
rows, the tiles of `cpu_dot.py` and the fused epilogue. Arrays in, arrays out; `cpu.py` is the torch backend on top.

Codes c = w + 1 are unsigned, so x.w = x.c - sum(x): sum(x) is subtracted per row in the epilogue. Decode (M small)
reads one weight row at a time (sequential streams, which DRAM prefetching serves best); larger M uses the ISA's
GEMM tile, or on avx2 the outer-product tile over an interleaved panel. Everything compiles lazily on first call
(`cache=True`, keyed by `numba_cache` on every kernel source and the ISA).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange

from . import numba_cache, reference
from .cpu_convert import f32_to_bf16, f32_to_f16, widen_16
from .cpu_dot import (
    DOT_LAYOUT_PAIRS,
    ISA,
    OUTER_LANES,
    address_as,
    ensure_threads,
    fetch_add,
    make_dot,
    make_outer_dot,
    swap_num_threads,
)

numba_cache.install()  # before the first @njit(cache=True): keyed on all kernel sources and the ISA
ensure_threads()  # _bitlinear_packed calls the threading layer's symbols (cpu_dot.swap_num_threads)

BLOCK = reference.I2_BLOCK
# The GEMM register tile (activation rows, weight rows) per ISA class, compiled into the drivers below (Numba's
# cache is keyed on every kernel source and the ISA, so it never serves another tile). avx2 takes 4 x 1: its
# 4 x 2 tile holds 8 int16 accumulators plus decoded codes in 16 ymm registers and LLVM spilled 7 of them per
# block; 4 x 1 folds each activation load into vpmaddubsw (K=256, M=2048, N=512: 3.4-4.0 vs 4.5-4.6 ms, 3 runs).
GEMM_TILES = {"vnni512": (4, 2), "vnni": (4, 2), "avx2": (4, 1), "portable": (4, 2)}
MR, NR = GEMM_TILES[ISA]
# Weight rows per decode tile (one activation row: M = 1 and the GEMM's remainder rows). avx2 takes 1 x 4: it shares
# the activation loads and amortizes the per-row reduction (alone, one thread, Zen 3: 1.17-1.41x the 1 x 1 tile
# at K = 1024-5632), prefetching the next tile's rows as one linear stream (cpu_dot._Tile.block_vectors). Whole
# calls on 2 threads, in-process A/B against 1 x 1: warm 1.08-1.19x, weights from DRAM 1.00-1.02x. The other
# classes keep 1 x 1 until measured on their CPUs.
DECODE_NR = {"vnni512": 1, "vnni": 1, "avx2": 4, "portable": 1}[ISA]
_dot_gemm, _dot_gemm_col, _dot_row, _dot_one = (make_dot(r, c) for r, c in ((MR, NR), (MR, 1), (1, DECODE_NR),
                                                                            (1, 1)))
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
def _epilogue_strip(acc, w, r, nr, p0, xsum, scale, bias, out) -> None:
    """out[r:r+nr, p0:p0+w] = acc[:nr, :w] - sum(x) * scale (+ bias unless it is empty) in fp32, or when scale is
    empty the exact int32 acc - sum(x) into out's bytes (an fp32 view of an int32 array). Scale and bias are always
    fp32 arrays and out always fp32: another type (None, an int32 out) would compile the engine's drivers again
    (~20 s per ISA and type combination). acc is C-contiguous and every loop indexes row views from 0 with int32
    arithmetic, so LLVM can drop Numba's negative-index wraparound and vectorize (scalar before: 3.4x slower, ~1 ms
    of a 4096 x 256 -> 688 forward on 2 threads)."""
    out_int = out.view(np.int32)  # the int32 output's own type (used when scale is empty)
    for t in range(nr):
        xs, a = xsum[r + t], acc[t]
        if scale.shape[0] == 0:
            oi = out_int[r + t, p0:p0 + w]
            for i in range(w):
                oi[i] = np.int32(a[i] - xs)
            continue
        sc, o = scale[r + t], out[r + t, p0:p0 + w]
        if bias.shape[0] == 0:
            for i in range(w):
                o[i] = np.float32(np.int32(a[i] - xs)) * sc
        else:
            b = bias[p0:p0 + w]
            for i in range(w):
                o[i] = np.float32(np.int32(a[i] - xs)) * sc + b[i]


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
    if threads > 1 and not gemm_rows:  # a GEMV streams its panels once: small ones balance the threads
        npanels = max(npanels, 4 * threads)
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
        _epilogue_strip(acc, w, r, nr, p0, xsum, scale, bias, out)
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
            else:  # one activation row: DECODE_NR weight rows at a time, then single rows
                nc = DECODE_NR if p1 - i >= DECODE_NR else 1
                if nc == DECODE_NR:
                    _dot_row(wp, i, xq, r, nblk, acc, i - p0)
                else:
                    _dot_one(wp, i, xq, r, nblk, acc, i - p0)
            i += nc
        _epilogue_strip(acc, p1 - p0, r, nr, p0, xsum, scale, bias, out)
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
def _bitlinear_packed(x_addr, out_addr, kinds, w_addr, m, k, n, gamma, bias_addr, threads, panel_bytes, gemm_rows,
                      outer_rows):
    """Fused forward on the packed engine: x (M, K) -> out (M, N), both contiguous, each fp32, bf16 or fp16 (kinds:
    1 when x is bf16, 4 when fp16, 2 when out is bf16, 8 when fp16; cpu_convert converts as torch does), the i2
    weight (N, Kp / 4) and the bias (N,) (0: none; fp32, or bf16 when kinds & 16, fp16 when kinds & 32), all passed
    by address (0.1 us each, where unboxing an array costs ~0.5 us and returning one ~3 us with torch.from_numpy; a
    torch dtype conversion each way costs 5-8 us at M=1): the caller keeps the four buffers alive for the call.
    The call runs on `threads` and leaves this thread's Numba thread count as it found it (set here, not with a
    Python call before: ~2 us per call on the decode path, where the previous layer's weights have just evicted the
    interpreter from L2)."""
    before = swap_num_threads(threads if threads > 1 else 0)
    kb = (k + BLOCK - 1) // BLOCK * (BLOCK // 4)  # i2 bytes per weight row: reference.padded_k(k) / 4
    if kinds & 5:
        x = widen_16(carray(address_as(x_addr, np.uint16(0)), (m, k)), kinds & 4 != 0)
    else:
        x = carray(address_as(x_addr, np.float32(0)), (m, k))
    if kinds & 10:
        out = np.empty((m, n), np.float32)
    else:
        out = carray(address_as(out_addr, np.float32(0)), (m, n))
    wp = carray(address_as(w_addr, np.uint8(0)), (n, kb))
    if bias_addr == 0:
        bias = np.empty(0, np.float32)
    elif kinds & 48:
        bias = widen_16(carray(address_as(bias_addr, np.uint16(0)), (1, n)), kinds & 32 != 0)[0]
    else:
        bias = carray(address_as(bias_addr, np.float32(0)), (n,))
    _, xl, xsum, s = _prepare_f(x, kb * 4, threads)
    _mm(xl, xsum, np.float32(gamma) / s, wp, bias, out, threads, panel_bytes, gemm_rows, outer_rows)
    if kinds & 2:
        f32_to_bf16(out, carray(address_as(out_addr, np.uint16(0)), (m, n)))
    elif kinds & 8:
        f32_to_f16(out, carray(address_as(out_addr, np.uint16(0)), (m, n)))
    if threads > 1 and threads != before:
        swap_num_threads(before)


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
    """(M, K) int8 times i2 on the packed engine -> the exact (M, N) int32 product (written through an fp32 view by
    the engine that serves the float entry points: no second compile)."""
    xp, xsum = _prepare_q(xq, wp.shape[1] * 4)
    out = np.empty((xq.shape[0], wp.shape[0]), np.int32)
    _mm(xp, xsum, np.empty(0, np.float32), wp, np.empty(0, np.float32), out.view(np.float32), threads, panel_bytes,
        gemm_rows, outer_rows)
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
    """out[:, n0:n0 + t] = acc (M, t) int32 * scale[:, None] (+ bias[n0:n0 + t] unless bias is empty), in fp32.
    Row views indexed from 0, as in _epilogue_strip, so the loops vectorize."""
    t = acc.shape[1]
    for r in prange(out.shape[0]):
        a, o, sc = acc[r], out[r, n0:n0 + t], scale[r]
        if bias.shape[0] == 0:
            for i in range(t):
                o[i] = np.float32(a[i]) * sc
        else:
            b = bias[n0:n0 + t]
            for i in range(t):
                o[i] = np.float32(a[i]) * sc + b[i]
