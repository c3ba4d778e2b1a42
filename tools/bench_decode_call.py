"""Python -> Numba call overhead of the whole-model decode step's signature (kernels.cpu_model.forward).

    python tools/bench_decode_call.py

Times trivial-bodied njit functions taking what `forward` takes now (a plain `tuple(Weights)` and a plain tiling
tuple) against the old 21 positional arguments and against a NamedTuple argument, with TinyLlama-shaped arrays,
interleaved rounds, medians: the cost of the signature itself, per decoded token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from bitnet_fast.kernels.cpu_model import Weights
from numba import njit

CALLS, ROUNDS = 20_000, 9


@njit(cache=False)
def _old(x, pos, n_head, eps, swiglu, na, nm, nf, ptrs, shapes, gammas, so, sd, se, kc, vc, cos, sin, th, pb, gr):
    return pos + th


@njit(cache=False)
def _new(x, pos, weights, kc, vc, tiling):
    return pos + tiling[0]


def main() -> None:
    layers, c, t, d = 22, 2048, 512, 64

    def a(*shape):
        return np.zeros(shape, np.float32)

    w = Weights(32, 1e-5, True, a(layers, c), a(layers, c), a(c), np.zeros((7, layers), np.int64),
                np.zeros((7, 2), np.int64), a(layers, 7), a(layers, 0), a(layers, 0), 1e-6, a(t, d // 2), a(t, d // 2))
    x, kc, vc = a(1, c), a(layers, 4, t, d), a(layers, 4, t, d)
    flat, tiling = tuple(w), (2, 1 << 18, False)
    old_args = (x, 3, w.n_head, w.eps, w.swiglu, w.norm_attn, w.norm_mlp, w.norm_final, w.ptrs, w.shapes, w.gammas,
                w.sub_o, w.sub_d, w.sub_eps, kc, vc, w.cos, w.sin, *tiling)
    cases: dict[str, Callable[[], object]] = {
        "old: 21 positional arguments": lambda: _old(*old_args),
        "now: tuple(Weights), tiling tuple": lambda: _new(x, 3, flat, kc, vc, (2, 1 << 18, False)),
        "NamedTuple Weights (not used)": lambda: _new(x, 3, w, kc, vc, tiling),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # compile
    for _ in range(ROUNDS):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            times[name].append((time.perf_counter() - t0) / CALLS * 1e6)
    for name, v in times.items():
        print(f"{name:36s} median {statistics.median(v):6.2f} us/call, min {min(v):6.2f}")


if __name__ == "__main__":
    main()
