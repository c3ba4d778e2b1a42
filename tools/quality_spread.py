"""Can the quality benchmark catch a broken straight-through estimator? Runs bench/bench_quality.py's training
(BitNet and fp twin, same budget) for several seeds, optionally with the STE broken on purpose, and prints the
BitNet/fp valid-perplexity ratio of each: a healthy run must sit inside the seeds' spread, a broken one far outside.

    python tools/quality_spread.py --seeds 1234 1 2            # the spread across seeds
    python tools/quality_spread.py --seeds 1234 --break weight # no gradient reaches the latent weights
    python tools/quality_spread.py --seeds 1234 --break input  # no gradient flows back through BitLinear's input
    python tools/quality_spread.py --seeds 1234 --break weight --models bitnet   # the fp twin is unaffected by a break
    python tools/quality_spread.py --seeds 1234 1 2 --models bitnet --grad-input int8   # the int8 input gradient

The breaks patch the kernels that the autograd Function calls (in this process only).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import bench_quality
from bench.common import pin_threads
from bitnet_fast.nn import GRAD_INPUTS


def break_ste(kind: str) -> None:
    """Replace the gradient of the weight (or the input) with zeros: an STE that passes nothing through."""
    from bitnet_fast import autograd

    name = {"weight": "grad_weight", "input": "grad_input"}[kind]
    real = getattr(autograd.kernels, name)

    def zero(*args, **kwargs):
        return torch.zeros_like(real(*args, **kwargs))

    setattr(autograd.kernels, name, zero)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[bench_quality.SEED])
    ap.add_argument("--break", dest="broken", choices=("weight", "input"), default=None)
    ap.add_argument("--models", nargs="+", choices=("bitnet", "fp"), default=["bitnet", "fp"])
    ap.add_argument("--grad-input", choices=GRAD_INPUTS, default=None, help="BitLinear's input gradient")
    ap.add_argument("--steps", type=int, default=bench_quality.STEPS, help="try another budget than the bench's")
    ap.add_argument("--max-lines", type=int, default=bench_quality.MAX_LINES)
    ap.add_argument("--lr", type=float, default=bench_quality.LR, help="try another peak learning rate")
    args = ap.parse_args()
    if args.broken == "input" and args.grad_input == "int8":  # int8 dx runs kernels.bitlinear, which the break misses
        ap.error("--break input zeros the exact input gradient (kernels.grad_input); it has no effect with "
                 "--grad-input int8")
    pin_threads()
    bench_quality.STEPS, bench_quality.MAX_LINES, bench_quality.LR = args.steps, args.max_lines, args.lr
    if args.broken:
        break_ste(args.broken)
    print(f"preset {bench_quality.PRESET}, {bench_quality.STEPS} steps x ({bench_quality.BATCH}, {bench_quality.SEQ}), "
          f"first {bench_quality.MAX_LINES} lines,"
          f" lr {bench_quality.LR}, STE {'broken: ' + args.broken if args.broken else 'intact'}, grad_input "
          f"{args.grad_input or 'default'}")
    for seed in args.seeds:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            r = bench_quality._train_both(seed, tmp, tuple(args.models), args.grad_input)
        if r["skip"]:
            sys.exit(r["skip"])
        ppl = {m: r[m]["final_valid_ppl"] for m in args.models}
        ratio = f", ratio {ppl['bitnet'] / ppl['fp']:.4f}" if len(ppl) == 2 else ""
        print(f"seed {seed}: " + ", ".join(f"{m} ppl {v:.2f}" for m, v in ppl.items()) + ratio
              + f" ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
