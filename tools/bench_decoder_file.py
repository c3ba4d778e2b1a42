"""Side by side in one process: the TinyLlama-shaped PackedDecoder built in memory vs the same decoder mapped from its
decoder file (bitnet_fast.decoder_file), alternating rounds; prints medians and mapped / built.

    python tools/bench_decoder_file.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from bitnet_fast import tinyllama
from bitnet_fast.decoder_file import load_decoder


def run(dec, ids: list[int], decode: int = 16) -> tuple[float, float]:
    """(prefill tok/s of `ids`, decode tok/s of `decode` single-token steps) from a fresh context."""
    dec.reset()
    t0 = time.perf_counter()
    dec.forward(ids)
    t1 = time.perf_counter()
    for tok in ids[:decode]:
        dec.forward([tok])
    return len(ids) / (t1 - t0), decode / (time.perf_counter() - t1)


def main(rounds: int = 4) -> None:
    layers, max_len = tinyllama.FULL["layers"], 168
    engines = {"built": tinyllama.build_decoder(layers, max_len),
               "mapped": load_decoder(tinyllama.decoder_file(layers, max_len))}
    ids = torch.randint(0, tinyllama.CONFIG["vocab_size"], (128,), generator=torch.Generator().manual_seed(0)).tolist()
    for dec in engines.values():
        run(dec, ids)  # warm-up: kernels compiled or loaded, pages faulted in
    res: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(reversed(engines))):
            res[name].append(run(engines[name], ids))
    for k, what in enumerate(("prefill 128", "decode 16")):
        b, m = (statistics.median(x[k] for x in res[n]) for n in ("built", "mapped"))
        print(f"{what}: built {b:.2f} tok/s, mapped {m:.2f} tok/s, mapped / built {m / b:.3f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
