"""A whole Llama-family decoder as one Numba call per step: the CPU inference runtime's arrays-in, arrays-out core.

`forward(x, pos, weights, k_cache, v_cache, tiling)` runs M new tokens (a prompt, or one token when decoding) at
positions pos.. through every layer against a static KV cache and returns the final-normed hidden state of the last
token. Per layer:

    h = rmsnorm(x)                          -> int8 per row -> q, k, v (packed i2 GEMV/GEMM, `cpu_engine._mm`)
    rope(q, k); cache[pos..] = k, v; attention over the cache (grouped-query heads)   [optional SubLN]
    x += o_proj(attn)
    h = rmsnorm(x) -> int8 -> gate, up -> silu(gate) * up (or relu(up)^2)            [optional SubLN]
    x += down(.)

Every projection runs on the packed engine of `kernels.cpu` with the epilogue acc * (gamma / s) of
`kernels.bitlinear`, so a layer computes what the torch model computes with BitLinear; only the small ops
(norms, RoPE, softmax) are reordered float code. The static arrays travel in one `Weights` named tuple; the packed
weights in it as their addresses, an int64 array (7, L) for q, k, v, o, gate, up, down, with one (rows, bytes per
row) shape per projection: a fixed signature whatever the depth (compiled once) and no copy of the model's tensors,
which the caller keeps alive. Layers without SubLN pass 0-size norm weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import carray, njit, prange

from . import numba_cache
from .cpu_dot import address_as, fetch_add, make_i8_dot
from .cpu_engine import DECODE_NR, _dot_one, _dot_row, _mm, _quant_row

numba_cache.install()  # before the first @njit(cache=True): keyed on all kernel sources and the ISA

__all__ = ["Weights", "forward", "int8_gemv", "pad_rows"]


@njit(cache=True, inline="always")
def _weight(ptrs, shapes, p, layer):
    """Projection p of `layer` as a (rows, bytes per row) uint8 array over the caller's memory."""
    return carray(address_as(ptrs[p, layer], np.uint8(0)), (shapes[p, 0], shapes[p, 1]))


@njit(cache=True)
def _rmsnorm(x, w, eps, out) -> None:
    """out (M, C) = x * rsqrt(mean(x^2) + eps) * w, per row (as F.rms_norm in fp32)."""
    m, c = x.shape
    for r in range(m):
        ss = np.float32(0.0)
        for j in range(c):
            ss += x[r, j] * x[r, j]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(c) + np.float32(eps))
        for j in range(c):
            out[r, j] = x[r, j] * inv * w[j]


@njit(cache=True)
def _project(h, wp, gamma, out, tiling) -> None:
    """out (M, N) = BitLinear(h (M, K) fp32) with the packed weight wp and scale gamma: per-row int8 quant, exact
    int32 product, epilogue acc * (gamma / s)."""
    m, kp = h.shape[0], wp.shape[1] * 4
    xq = np.zeros((m, kp), np.int8)
    s = np.empty(m, np.float32)
    xsum = np.empty(m, np.int32)
    for r in range(m):
        _quant_row(h, r, xq, s, xsum)
    _mm(xq, xsum, np.float32(gamma) / s, wp, np.empty(0, np.float32), out, *tiling)


@njit(cache=True)
def _project_many(h, ws, gammas, outs, tiling) -> None:
    """outs[i] = BitLinear(h, ws[i]) for weights sharing the input h (tuples of 2 or 3): one parallel region when
    decoding (M = 1), one projection after another otherwise."""
    if h.shape[0] > 1:
        for i in range(len(ws)):
            _project(h, ws[i], gammas[i], outs[i], tiling)
        return
    xq = np.zeros((1, ws[0].shape[1] * 4), np.int8)
    s = np.empty(1, np.float32)
    xsum = np.empty(1, np.int32)
    _quant_row(h, 0, xq, s, xsum)
    scales = np.empty(len(ws), np.float32)
    for i in range(len(ws)):
        scales[i] = np.float32(gammas[i]) / s[0]
    _gemv_many(xq, xsum, ws, scales, outs, tiling[0])


@njit(cache=True, parallel=True)
def _gemv_many(xq, xsum, ws, scales, outs, threads) -> None:
    """Decode (M = 1): outs[i] (1, N_i) = (ws[i] . x - xsum) * scales[i] for weights sharing one quantized input x,
    in ONE parallel region: tasks split the concatenated rows."""
    ends = np.empty(len(ws), np.int64)
    total = 0
    for i in range(len(ws)):
        total += ws[i].shape[0]
        ends[i] = total
    nblk, tasks = ws[0].shape[1] // 32, 8 * threads
    counter = np.zeros(1, np.int64)
    for _worker in prange(threads):  # threads take tasks as they become free (cpu_dot.fetch_add)
        acc = np.empty((1, DECODE_NR), np.int32)
        t = fetch_add(counter, 1)
        while t < tasks:
            _gemv_task(xq, xsum, ws, scales, outs, ends, t * total // tasks, (t + 1) * total // tasks, nblk, acc)
            t = fetch_add(counter, 1)


@njit(cache=True)
def _gemv_task(xq, xsum, ws, scales, outs, ends, lo, hi, nblk, acc) -> None:
    """Rows lo..hi of the concatenated weights of _gemv_many, on the engine's decode tile (DECODE_NR rows at a time,
    then single rows), as `_mm` runs the other projections."""
    i, j = lo, 0
    while i < hi:
        while ends[j] <= i:
            j += 1
        w, o, sc = ws[j], outs[j], scales[j]
        base = ends[j] - w.shape[0]
        end = min(hi, ends[j])
        r, stop = i - base, end - base
        while r < stop:
            nc = DECODE_NR if stop - r >= DECODE_NR else 1
            if nc == DECODE_NR:
                _dot_row(w, r, xq, 0, nblk, acc, 0)
            else:
                _dot_one(w, r, xq, 0, nblk, acc, 0)
            for c in range(nc):
                o[0, r + c] = np.float32(acc[0, c] - xsum[0]) * sc
            r += nc
        i = end


# Cephes expf: 2**k * e**r with k = round(x / ln 2), r = x - k ln 2 in two parts, degree-5 polynomial for e**r.
_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.44269504), np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                          1.6666665459e-1, 5.0000001201e-1))


@njit(cache=True, fastmath={"contract"})
def _exp_shifted(x, n, shift, bits) -> np.float32:
    """x[:n] = exp(x[:n] - shift), returning their sum; arguments are clamped to [-87, 88] (~1e-38 below, ~1.7e38
    above). Plain float and integer arithmetic, so both loops vectorize, unlike a libm call per element: relative
    error < 1e-7 against float64 exp; bits (n,) int32 is scratch for the 2**k factors."""
    scale = bits.view(np.float32)
    c0, c1, c2, c3, c4, c5 = _EXP_POLY
    for t in range(n):
        a = min(max(x[t] - shift, np.float32(-87.0)), np.float32(88.0))
        k = np.floor(a * _LOG2E + np.float32(0.5))
        r = a - k * _LN2_HI - k * _LN2_LO
        x[t] = ((((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5) * r * r + r) + np.float32(1.0)
        bits[t] = (np.int32(k) + np.int32(127)) << 23
    total = np.float32(0.0)
    for t in range(n):
        x[t] *= scale[t]
        total += x[t]
    return total


@njit(cache=True, parallel=True)
def _activate(gate, up, swiglu, threads) -> None:
    """up = silu(gate) * up (SwiGLU) or relu(up)^2, in place, the M x F elements split over the threads; silu's exp
    is the vectorized `_exp_shifted` over L1-sized blocks (22 TinyLlama layers: 1.42x at M=1, 1.79x at M=128 against
    a libm call per element, values within 3e-7)."""
    n = up.size
    g, u = gate.reshape(n), up.reshape(n)
    for c in prange(threads):
        lo, hi = c * n // threads, (c + 1) * n // threads
        if swiglu:
            e, bits = np.empty(512, np.float32), np.empty(512, np.int32)
            for b0 in range(lo, hi, 512):
                w = min(512, hi - b0)
                for i in range(w):
                    e[i] = -g[b0 + i]
                _exp_shifted(e, w, np.float32(0.0), bits)
                for i in range(w):
                    u[b0 + i] = g[b0 + i] / (np.float32(1.0) + e[i]) * u[b0 + i]
        else:
            for i in range(lo, hi):
                u[i] = max(u[i], np.float32(0.0)) ** 2


@njit(cache=True)
def _rope(t, heads, d, cos, sin, pos) -> None:
    """Rotate (x[:d/2], x[d/2:]) of each head of t (M, heads * d) by the angles of positions pos.. (rotate-half)."""
    half = d // 2
    for r in range(t.shape[0]):
        for h in range(heads):
            b = h * d
            for j in range(half):
                x1, x2 = t[r, b + j], t[r, b + half + j]
                c, s = cos[pos + r, j], sin[pos + r, j]
                t[r, b + j] = x1 * c - x2 * s
                t[r, b + half + j] = x1 * s + x2 * c


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _attention(q, kt, vc, pos, n_head, out) -> None:
    """Causal attention of q (M, H * D) at positions pos.. over the cache: keys transposed kt (H_kv, D, T), values
    vc (H_kv, T, D) -> out (M, H * D). A query's scores accumulate as whole rows over the positions (scores +=
    q_j * kt_j: SIMD without a horizontal sum per position, 3x faster than a dot per position), the softmax
    numerators come from a vectorized exp (1.1-1.2x the attention against a libm call per position, 22 TinyLlama
    layers at positions 140-2000), and the values accumulate as rows too (out += p_t * v_t); sums may reassociate.
    Each pass over a row takes four dims (scores) or four positions (values), so the row is loaded and stored a
    quarter as often (TinyLlama's 32 heads, positions 140 and 1000, 1 and 2 threads, in-process A/B against one at a
    time, three runs: 1.08-1.15x)."""
    m = q.shape[0]
    hkv, d, _ = kt.shape
    group = n_head // hkv
    scale = np.float32(1.0 / math.sqrt(d))
    for task in prange(m * n_head):
        r, h = task // n_head, task % n_head
        g, n = h // group, pos + r + 1  # this query sees positions 0..pos + r
        b = h * d
        scores = np.zeros(n, np.float32)
        j = 0
        while j + 4 <= d:  # four dims per pass over the scores: 1/4 of the stores of a dim per pass
            q0, q1 = q[r, b + j] * scale, q[r, b + j + 1] * scale
            q2, q3 = q[r, b + j + 2] * scale, q[r, b + j + 3] * scale
            k0, k1, k2, k3 = kt[g, j], kt[g, j + 1], kt[g, j + 2], kt[g, j + 3]
            for t in range(n):
                scores[t] += q0 * k0[t] + q1 * k1[t] + q2 * k2[t] + q3 * k3[t]
            j += 4
        for jr in range(j, d):
            qj = q[r, b + jr] * scale
            for t in range(n):
                scores[t] += qj * kt[g, jr, t]
        top = np.float32(-np.inf)
        for t in range(n):
            top = max(top, scores[t])
        total = _exp_shifted(scores, n, top, np.empty(n, np.int32))  # scores -> exp(scores - top)
        acc = np.zeros(d, np.float32)
        t = 0
        while t + 4 <= n:  # four positions per pass over acc, likewise
            p0, p1, p2, p3 = scores[t], scores[t + 1], scores[t + 2], scores[t + 3]
            v0, v1, v2, v3 = vc[g, t], vc[g, t + 1], vc[g, t + 2], vc[g, t + 3]
            for i in range(d):
                acc[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i]
            t += 4
        for tr in range(t, n):
            p = scores[tr]
            for i in range(d):
                acc[i] += p * vc[g, tr, i]
        for j in range(d):
            out[r, b + j] = acc[j] / total


class Weights(NamedTuple):
    """A decoder's static arrays, built once by the caller (which keeps the packed weights alive). `forward` takes
    it as a plain tuple (`tuple(weights)`): Numba types a plain tuple in C, a named one in Python (~10 us a call)."""

    n_head: int
    eps: float  # RMSNorm epsilon of the block and final norms
    swiglu: bool  # SwiGLU MLP (else ReLU^2)
    norm_attn: np.ndarray  # (L, C) fp32
    norm_mlp: np.ndarray  # (L, C) fp32
    norm_final: np.ndarray  # (C,) fp32
    ptrs: np.ndarray  # (7, L) int64 addresses of the packed q, k, v, o, gate, up, down weights
    shapes: np.ndarray  # (7, 2) int64: rows, bytes per row of each projection
    gammas: np.ndarray  # (L, 7) fp32 weight scales
    sub_o: np.ndarray  # (L, C) SubLN weights before o, or (L, 0): none
    sub_d: np.ndarray  # (L, F) SubLN weights before down, or (L, 0): none
    sub_eps: float
    cos: np.ndarray  # (T, D / 2) RoPE tables
    sin: np.ndarray


@njit(cache=True)
def forward(x, pos, weights, k_cache, v_cache, tiling):
    """Run x (M, C) fp32 (the embedded new tokens; updated in place) through every layer at positions pos.. with
    caches of keys (L, H_kv, D, T) (transposed: see _attention) and values (L, H_kv, T, D); return the final-normed
    hidden state of the last token (1, C). weights: tuple(Weights); tiling: the kernels.cpu tiling parameters
    (threads, panel_bytes, gemm_rows, outer_rows) of cpu.tiling()."""
    n_head, eps, swiglu, norm_attn, norm_mlp, norm_final, ptrs, shapes, gammas, sub_o, sub_d, sub_eps, cos, sin = \
        weights
    m, c = x.shape
    n_layer, hkv, d, _ = k_cache.shape
    h = np.empty_like(x)
    for layer in range(n_layer):
        g = gammas[layer]
        wq, wk, wv = _weight(ptrs, shapes, 0, layer), _weight(ptrs, shapes, 1, layer), \
            _weight(ptrs, shapes, 2, layer)
        _rmsnorm(x, norm_attn[layer], eps, h)
        q = np.empty((m, n_head * d), np.float32)
        k = np.empty((m, hkv * d), np.float32)
        v = np.empty((m, hkv * d), np.float32)
        _project_many(h, (wq, wk, wv), (g[0], g[1], g[2]), (q, k, v), tiling)
        _rope(q, n_head, d, cos, sin, pos)
        _rope(k, hkv, d, cos, sin, pos)
        for r in range(m):
            for hh in range(hkv):
                for j in range(d):
                    k_cache[layer, hh, j, pos + r] = k[r, hh * d + j]
                    v_cache[layer, hh, pos + r, j] = v[r, hh * d + j]
        a = np.empty((m, n_head * d), np.float32)
        _attention(q, k_cache[layer], v_cache[layer], pos, n_head, a)
        if sub_o.shape[1]:
            _rmsnorm(a, sub_o[layer], sub_eps, a)
        o = np.empty_like(x)
        _project(a, _weight(ptrs, shapes, 3, layer), g[3], o, tiling)
        x += o
        _rmsnorm(x, norm_mlp[layer], eps, h)
        wg, wu = _weight(ptrs, shapes, 4, layer), _weight(ptrs, shapes, 5, layer)
        f = wu.shape[0]
        up = np.empty((m, f), np.float32)
        if swiglu:
            gate = np.empty((m, f), np.float32)
            _project_many(h, (wg, wu), (g[4], g[5]), (gate, up), tiling)
        else:
            gate = up
            _project(h, wu, g[5], up, tiling)
        _activate(gate, up, swiglu, tiling[0])
        if sub_d.shape[1]:
            _rmsnorm(up, sub_d[layer], sub_eps, up)
        _project(up, _weight(ptrs, shapes, 6, layer), g[6], o, tiling)
        x += o
    out = np.empty((1, c), np.float32)
    _rmsnorm(x[m - 1 :], norm_final, eps, out)
    return out


_i8_dot = make_i8_dot(1)


def pad_rows(w: np.ndarray) -> np.ndarray:
    """(N, K) int8 -> (N, Kp) with Kp a multiple of 32, zero-padded (the layout int8_gemv reads)."""
    n, k = w.shape
    out = np.zeros((n, -(-k // 32) * 32), np.int8)
    out[:, :k] = w
    return out


@njit(cache=True, parallel=True)
def int8_gemv(x, w, w_scale, threads):
    """The int8 output head, bit-exact with reference.int8_linear: x (K,) fp32 quantized to [-127, 127] by its
    absmax, exact int32 dot products with w (N, Kp) int8 (pad_rows), epilogue acc * (w_scale / s); non-finite x
    gives NaN logits."""
    k, (n, kp) = x.shape[0], w.shape
    amax = np.float32(1e-5)
    for j in range(k):
        v = abs(x[j])
        if v > amax or v != v:  # NaN propagates
            amax = v
    if not np.isfinite(amax):
        return np.full(n, np.nan, np.float32)
    s = (np.float32(1.0) / amax) * np.float32(127.0)  # what torch's 127.0 / tensor computes (two roundings)
    xq = np.zeros(kp, np.int8)
    for j in range(k):
        xq[j] = np.int8(np.rint(x[j] * s))
    out = np.empty(n, np.float32)
    tasks = 8 * threads
    counter = np.zeros(1, np.int64)
    for _worker in prange(threads):  # threads take tasks as they become free (cpu_dot.fetch_add)
        acc = np.empty(1, np.int32)
        t = fetch_add(counter, 1)
        while t < tasks:
            for i in range(t * n // tasks, (t + 1) * n // tasks):  # one row at a time: sequential DRAM streams
                _i8_dot(w, i, xq, kp // 32, acc)
                out[i] = np.float32(acc[0]) * (w_scale[i] / s)
            t = fetch_add(counter, 1)
    return out
