"""A/B the CPU kernels of another commit against this checkout's, in one process.

    python tools/ab_kernels.py --base HEAD~1 [--threads 2] [--shapes 1x256x256,1x4096x4096] [--rounds 21]
                               [--dtype bfloat16] [--bias]

Checks out `--base` into a temporary git worktree, imports its `kernels/` package beside ours (as "base_kernels"),
and times `kernels.bitlinear(x, pw)` of both, interleaved round by round (which goes first alternates), on **one
weight buffer shared by both**: two packs of the same weight are two allocations, and at M=1 their physical
placement alone moved large shapes 10-30% on a 2-vCPU VM. Prints medians, the median of per-round ratios and their
interquartile range (a wide one says the host was too noisy for a few percent to mean anything)
(base / ours: > 1 means this checkout is faster). Both must compute bit-identical outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
from bitnet_fast.kernels import cpu

from bitnet_fast import kernels

ROOT = Path(__file__).resolve().parents[1]


def load_base(rev: str, into: Path) -> ModuleType:
    """`kernels/` as of `rev`, imported under the name base_kernels (its Numba cache is keyed on its sources)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(into), rev], check=True)
    spec = importlib.util.spec_from_file_location("base_kernels", into / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(into / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["base_kernels"] = module
    spec.loader.exec_module(module)
    return module


def per_call_us(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def compare(base: ModuleType, m: int, k: int, n: int, rounds: int, dtype: torch.dtype = torch.float32,
            bias: bool = False) -> tuple[float, float, float, float, float]:
    """(base us, ours us, median per-round base / ours, its 25th and 75th percentiles) for bitlinear on one (M, K)
    input of `dtype` and (N, K) weight, with an nn.Parameter bias of `dtype` if `bias`."""
    x, ours = torch.randn(m, k).to(dtype), kernels.pack(torch.randn(n, k))
    b = torch.nn.Parameter(torch.randn(n).to(dtype)) if bias else None
    theirs = base.PackedWeight(ours.data, ours.gamma, ours.shape, ours.format)  # the same buffer
    if not torch.equal(kernels.bitlinear(x, ours, b), base.bitlinear(x, theirs, b)):
        raise SystemExit(f"{m}x{k}x{n}: outputs differ between the base and this checkout")
    calls = max(20, int(2e6 // (n * k)))
    times: dict[str, list[float]] = {"base": [], "ours": []}
    cases = [("base", lambda: base.bitlinear(x, theirs, b)), ("ours", lambda: kernels.bitlinear(x, ours, b))]
    for r in range(rounds):
        for name, fn in cases if r % 2 else cases[::-1]:
            times[name].append(per_call_us(fn, calls))
    ratios = [b / o for b, o in zip(times["base"], times["ours"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(times["base"]), statistics.median(times["ours"]), statistics.median(ratios), q1, q3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="1x256x256,1x256x688,4x256x256,1x2048x2048,1x4096x4096",
                    help="MxKxN,MxKxN,...")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="x's dtype")
    ap.add_argument("--bias", action="store_true", help="an nn.Parameter bias of x's dtype")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base = load_base(args.base, Path(tmp) / "base")
            base_cpu = importlib.import_module("base_kernels.cpu")
            torch.set_num_threads(args.threads)
            cpu.configure(threads=args.threads)
            base_cpu.configure(threads=args.threads)
            print(f"threads {args.threads}; x {args.dtype}{', bias' if args.bias else ''}; base {args.base}; "
                  "ratio = base / ours (> 1: ours faster)")
            print("| M | K | N | base us | ours us | base / ours | p25-p75 |\n|---|---|---|---|---|---|---|")
            for shape in args.shapes.split(","):
                m, k, n = (int(v) for v in shape.split("x"))
                b, o, ratio, q1, q3 = compare(base, m, k, n, args.rounds, dtype, args.bias)
                print(f"| {m} | {k} | {n} | {b:.1f} | {o:.1f} | {ratio:.3f}x | {q1:.3f}-{q3:.3f} |")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "base")],
                           check=False, capture_output=True)


if __name__ == "__main__":
    main()
