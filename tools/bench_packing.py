"""Time quantize+pack of a TinyLlama-1.1B-sized model (its linear weights) with the numba kernels, side by side
with the unfused path and the pure-torch reference, plus tq1 -> i2 repack at load.

    python tools/bench_packing.py            # all 22 layers (~0.97B weights)
    python tools/bench_packing.py --quick    # 2 layers, whole-model time extrapolated
    python tools/bench_packing.py --passes   # single-thread CPU time of each kernel pass on one layer

Layers are generated one at a time (random fp32, untimed) to bound memory; only the kernels are timed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import bitnet_fast.kernels as K
import numba
import numpy as np
import torch
from bitnet_fast.kernels import cpu_pack, reference

LAYERS = 22
# TinyLlama-1.1B linear shapes (N, K) per decoder layer; embeddings and lm_head are not packed.
SHAPES = {
    "q": (2048, 2048),
    "k": (256, 2048),
    "v": (256, 2048),
    "o": (2048, 2048),
    "gate": (5632, 2048),
    "up": (5632, 2048),
    "down": (2048, 5632),
}


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def numba_paths(w: torch.Tensor) -> dict[str, tuple[object, float]]:
    """Every numba path on one weight: fused and unfused quantize+pack, unpack, and tq1 -> i2 repack."""
    res = {}
    res["fused i2 (quantize_and_pack)"] = timed(cpu_pack.quantize_and_pack, w, "i2")
    res["fused tq1 (quantize_and_pack)"] = timed(cpu_pack.quantize_and_pack, w, "tq1")
    for fmt in ("i2", "tq1"):  # kernels.pack itself takes the fused path on CPU
        res[f"unfused {fmt} (quantize_weight, then pack)"] = timed(
            lambda f=fmt: cpu_pack.pack(*cpu_pack.quantize_weight(w), f))
    tq1 = res["fused tq1 (quantize_and_pack)"][0]
    res["unpack tq1 -> int8"] = timed(cpu_pack.unpack, tq1)
    res["unpack i2 -> int8"] = timed(cpu_pack.unpack, res["fused i2 (quantize_and_pack)"][0])
    res["repack tq1 -> i2 (load)"] = timed(K.repack, tq1, "i2")
    res["transcode tq1 -> i2 (load)"] = timed(cpu_pack.transcode, tq1, "i2")
    return res


def reference_paths(w: torch.Tensor) -> dict[str, tuple[object, float]]:
    """The pure-torch oracle for the same steps."""
    res = {}
    res["fused i2 (quantize_and_pack)"] = timed(lambda: reference.pack_i2(reference.weight_quant(w)[0]))
    res["fused tq1 (quantize_and_pack)"] = timed(lambda: reference.pack_tq1(reference.weight_quant(w)[0]))
    tq1 = res["fused tq1 (quantize_and_pack)"][0]
    k = w.shape[1]
    res["unpack tq1 -> int8"] = timed(reference.unpack_tq1, tq1, k)
    res["repack tq1 -> i2 (load)"] = timed(lambda: reference.pack_i2(reference.unpack_tq1(tq1, k)))
    res["transcode tq1 -> i2 (load)"] = res["repack tq1 -> i2 (load)"]
    return res


def passes(reps: int = 5) -> None:
    """Single-thread CPU time of each kernel pass on one 5632x2048 fp32 layer (best of `reps`)."""
    numba.set_num_threads(1)
    w = torch.randn(5632, 2048)
    src, n, k, rs = cpu_pack._float_rows(w)
    gamma = cpu_pack._gamma(src, n, k, rs)
    wt = cpu_pack._quantize_rows(src, n, k, rs, gamma).reshape(-1)
    zero = np.float32(0)
    i2 = cpu_pack._pack_rows(src, n, k, rs, gamma, True)[0]
    tq1 = cpu_pack._pack_rows(src, n, k, rs, gamma, False)[0]
    steps = {
        "gamma (read-only pass over w)": lambda: cpu_pack._abs_row_sums(src, n, k, rs),
        "int8 codes (quantize_weight pass 2)": lambda: cpu_pack._quantize_rows(src, n, k, rs, gamma),
        "fused i2 pack pass": lambda: cpu_pack._pack_rows(src, n, k, rs, gamma, True),
        "fused tq1 pack pass": lambda: cpu_pack._pack_rows(src, n, k, rs, gamma, False),
        "int8 -> i2": lambda: cpu_pack._pack_rows(wt, n, k, k, zero, True),
        "int8 -> tq1": lambda: cpu_pack._pack_rows(wt, n, k, k, zero, False),
        "tq1 -> i2 (transcode)": lambda: cpu_pack._transcode_rows(tq1, k, False),
        "tq1 -> int8 (unpack)": lambda: cpu_pack._unpack_rows(tq1, k, False),
        "i2 -> int8 (unpack)": lambda: cpu_pack._unpack_rows(i2, k, True),
    }
    print(f"single-thread CPU ms per 5632x2048 layer (best of {reps}):")
    for name, fn in steps.items():
        fn()
        best = float("inf")
        for _ in range(reps):
            t = time.process_time()
            fn()
            best = min(best, time.process_time() - t)
        print(f"  {name:38s} {best * 1e3:6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers; extrapolate the whole-model time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passes", action="store_true", help="only: single-thread CPU time of each kernel pass")
    args = ap.parse_args()
    if args.passes:
        return passes()
    layers = 2 if args.quick else LAYERS
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch threads {torch.get_num_threads()}, numba threads {numba.get_num_threads()}, load average {load}")

    per_layer = sum(n * k for n, k in SHAPES.values())
    total = per_layer * LAYERS
    print(f"model: {LAYERS} layers x {len(SHAPES)} linears = {total:,} weights ({per_layer:,} per layer)")

    t0 = time.perf_counter()
    numba_paths(torch.randn(8, 300))  # compile (or load the on-disk cache) outside the timings
    print(f"compile / cache load: {time.perf_counter() - t0:.1f} s")

    gen = torch.Generator().manual_seed(args.seed)
    secs: dict[str, float] = defaultdict(float)
    ref_secs: dict[str, float] = defaultdict(float)
    ref_ok = True
    buffers = {shape: torch.empty(shape) for shape in set(SHAPES.values())}
    for layer in range(layers):
        for shape in SHAPES.values():
            w = buffers[shape].normal_(generator=gen)  # fresh values, reused memory
            res = numba_paths(w)
            for name, (_, dt) in res.items():
                secs[name] += dt
            if layer == 0:  # the reference, on one layer, on the same weights
                ref = reference_paths(w)
                for name, (out, dt) in ref.items():
                    ref_secs[name] += dt
                    mine = res[name][0]
                    mine = mine.data if isinstance(mine, K.PackedWeight) else mine
                    ref_ok &= torch.equal(mine, out.data if isinstance(out, K.PackedWeight) else out)
    done = per_layer * layers
    print(f"timed {layers} layers = {done:,} weights; numba output == reference on layer 0: {ref_ok}")
    print(f"{'path':40s} {'Mweights/s':>11s} {'model s':>9s} {'ref Mw/s':>9s} {'x ref':>7s}")
    for name, s in secs.items():
        rate = done / s
        line = f"{name:40s} {rate / 1e6:11.0f} {total / rate:9.2f}"
        if name in ref_secs:
            ref_rate = per_layer / ref_secs[name]
            line += f" {ref_rate / 1e6:9.1f} {rate / ref_rate:7.1f}"
        print(line)
    est = "extrapolated " if args.quick else ""
    print(f"quantize+pack fp32 -> i2 of the whole model: {est}{total / (done / secs[next(iter(secs))]):.2f} s")


if __name__ == "__main__":
    main()
