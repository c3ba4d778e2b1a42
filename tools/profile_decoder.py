"""Where the whole-model CPU decoder's time goes: a prefill and a decode step timed whole, then their parts alone.

    python tools/profile_decoder.py [--layers 22] [--prefill 128] [--pos 140]

Loads the TinyLlama-shaped random-weight decoder file that `tinyllama --variant decoder` measures (written once by
a child, cached), times `PackedDecoder.forward` over a `--prefill`-token prompt and one decode step at `--pos`, then
the same shapes' projections (the packed GEMM/GEMV), attention, MLP activation, norms and the int8 head alone on the
same arrays. Medians of interleaved repetitions; the parts are not expected to add up exactly (the whole step also
quantizes, applies RoPE, writes the cache and allocates). Run it at high priority on a shared machine (docs/kernels.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from bitnet_fast.kernels import cpu, cpu_model

from bitnet_fast.decoder_file import load_decoder
from bitnet_fast.tinyllama import decoder_file

NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def profile(dec, m: int, pos: int, prompt: list[int], reps: int) -> None:
    """Print the whole forward of m tokens at pos, then each part alone over all layers, with its share."""
    cfg, w = dec.config, dec._weights
    p, threads = cpu.params(), cpu.threads(1 << 30)
    tiling = cpu.tiling(p, m, threads)
    rng = np.random.default_rng(1)

    def whole() -> None:
        dec.pos = pos
        dec.forward(prompt[:m])

    total = median_ms(whole, reps)
    print(f"{m} token(s) at position {pos}: {total:.1f} ms ({m / total * 1e3:.1f} tok/s), {threads} threads")
    parts: dict[str, Callable[[], object]] = {}
    for i, name in enumerate(NAMES):
        ws = dec._projections[name]
        h = rng.standard_normal((m, ws[0].shape[1] * 4)).astype(np.float32)
        out = np.empty((m, ws[0].shape[0]), np.float32)
        parts[f"{name} projections"] = lambda ws=ws, h=h, out=out, i=i: [
            cpu_model._project(h, ws[n], np.float32(w.gammas[n, i]), out, tiling) for n in range(cfg.n_layer)]
    q = rng.standard_normal((m, cfg.n_head * cfg.head_dim)).astype(np.float32)
    att = np.empty_like(q)
    parts["attention"] = lambda: [cpu_model._attention(q, dec._k[n], dec._v[n], pos, cfg.n_head, att)
                                  for n in range(cfg.n_layer)]
    gate = rng.standard_normal((m, cfg.hidden)).astype(np.float32)
    parts["MLP activation (+ a copy)"] = lambda: [cpu_model._activate(gate, gate.copy(), cfg.swiglu, threads)
                                       for _ in range(cfg.n_layer)]
    parts["norms"] = lambda: [cpu_model._rmsnorm(q, w.norm_final, 1e-5, att) for _ in range(2 * cfg.n_layer)]
    if dec.head_kind == "int8":
        parts["int8 head (last token)"] = lambda: cpu_model.int8_gemv(q[0], dec._head_q, dec._head_scale, threads)
    for name, fn in parts.items():
        ms = median_ms(fn, reps)
        print(f"  {name:<24} {ms:8.2f} ms  {ms / total:6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--pos", type=int, default=140, help="position of the profiled decode step")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    # the file `tinyllama --variant decoder` (and so bench_llamacpp) measures: context prefill + 32 decoded + 8
    dec = load_decoder(decoder_file(a.layers, max(a.prefill + 40, a.pos + 1)))
    prompt = np.random.default_rng(0).integers(0, dec.config.vocab_size, a.prefill).tolist()
    profile(dec, a.prefill, 0, prompt, a.reps)
    profile(dec, 1, a.pos, prompt, a.reps)


if __name__ == "__main__":
    main()
