"""Side-by-side CPU benchmark: bitnet-fast packed i2 (numba) vs torch fp32 / bf16 F.linear and fbgemm int8.

All contenders run in one process, in rounds: each round times a burst of consecutive calls of every
contender, after 10 ms of untimed calls (torch's and Numba's OpenMP pools are separate and each spins for a
while after its last task; see docs/kernels.md), and rounds repeat so that background load hits all
contenders alike. The table shows the median ms over all timed calls, GOPS = 2*M*N*K / t, and the
speed ratios of ours over each baseline (>1: ours is faster).

    python tools/bench_kernels.py [--quick] [--threads 2] [--json out.json] [--compile-times]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from bitnet_fast.kernels import cpu

from bitnet_fast import kernels

SHAPES = [(2048, 2048), (4096, 4096), (2048, 5632), (5632, 2048)]  # (K, N)
MS = [1, 8, 512]


def _fbgemm(w: torch.Tensor) -> torch.nn.Module:
    """torch.ao dynamic int8 Linear (fbgemm): per-tensor int8 weights, dynamic per-tensor activations."""
    n, k = w.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = torch.ao.nn.quantized.dynamic.Linear(k, n, bias_=False, dtype=torch.qint8)
        scale = float(w.abs().max()) / 127
        lin.set_weight_bias(torch.quantize_per_tensor(w, scale, 0, torch.qint8), None)
    return lin


def _contenders(m: int, k: int, n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    pw = kernels.pack(w)
    wb, xb, q = w.bfloat16(), x.bfloat16(), _fbgemm(w)
    return {
        "ours": lambda: kernels.bitlinear(x, pw),
        "fp32": lambda: F.linear(x, w),
        "bf16": lambda: F.linear(xb, wb),
        "fbgemm": lambda: q(x),
    }


def _time(fns: dict, budget_s: float, burst: int) -> dict[str, float]:
    """Median seconds per call for each fn: rounds of `burst` calls per fn, for about `budget_s` in all."""
    for f in fns.values():  # warm up (JIT, oneDNN primitive caches)
        f(), f()
    times = {name: [] for name in fns}
    start = time.perf_counter()
    while not times["ours"] or (time.perf_counter() - start < budget_s and len(times["ours"]) < 2000):
        for name, f in fns.items():
            t_end = time.perf_counter() + 0.01  # untimed: let the previous contender's OpenMP pool stop spinning
            while time.perf_counter() < t_end:
                f()
            for _ in range(burst):
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(quick: bool, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    cpu.configure(threads=threads)
    shapes = [(4096, 4096)] if quick else SHAPES
    rows = []
    for m in MS:
        for k, n in shapes:
            budget = (1.5 if quick else 3.0) * (1 + (m > 8))
            med = _time(_contenders(m, k, n), budget_s=budget, burst=20 if m < 512 else 2)
            row = {"M": m, "K": k, "N": n, **{f"{c}_ms": t * 1e3 for c, t in med.items()}}
            row["ours_gops"] = 2 * m * n * k / med["ours"] / 1e9
            row.update({f"x_vs_{c}": med[c] / med["ours"] for c in med if c != "ours"})
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


_FIRST_CALLS = """
import time
t0 = time.perf_counter()
import torch
from bitnet_fast import kernels
from bitnet_fast.kernels import reference
wt = torch.randint(-1, 2, (256, 512), dtype=torch.int8)
pw = kernels.PackedWeight(reference.pack_i2(wt), torch.tensor(0.5), (256, 512), "i2")  # no cpu_pack compile
res = [f"import {time.perf_counter() - t0:.2f}s"]
for name, f in [("bitlinear M=1 (packed)", lambda: kernels.bitlinear(torch.randn(1, 512), pw)),
                ("bitlinear M=300 (int_mm)", lambda: kernels.bitlinear(torch.randn(300, 512), pw)),
                ("matmul_int", lambda: kernels.matmul_int(torch.zeros(3, 512, dtype=torch.int8), pw)),
                ("grad_input", lambda: kernels.grad_input(torch.randn(4, 256), pw))]:
    t = time.perf_counter()
    f()
    res.append(f"{name} {time.perf_counter() - t:.2f}s")
print("; ".join(res))
"""


def compile_times() -> None:
    """First-call times in fresh processes: a cold Numba cache, then the same cache warm."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold cache", "warm cache"):
            out = subprocess.run([sys.executable, "-c", _FIRST_CALLS], env=env, capture_output=True, text=True)
            print(f"{label}: {out.stdout.strip() or out.stderr[-2000:]}")


HEADER = "| M | K | N | ours ms | GOPS | fp32 ms | bf16 ms | fbgemm ms | vs fp32 | vs bf16 | vs fbgemm |"


def _fmt(r: dict) -> str:
    return (
        f"| {r['M']} | {r['K']} | {r['N']} | {r['ours_ms']:.3f} | {r['ours_gops']:.0f} | {r['fp32_ms']:.3f} | "
        f"{r['bf16_ms']:.3f} | {r['fbgemm_ms']:.3f} | {r['x_vs_fp32']:.1f}x | {r['x_vs_bf16']:.1f}x | "
        f"{r['x_vs_fbgemm']:.2f}x |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only K=N=4096, shorter timing budget")
    ap.add_argument("--threads", type=int, default=2, help="torch and numba threads (default 2)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--compile-times", action="store_true", help="only measure first-call (JIT) times")
    args = ap.parse_args()
    if args.compile_times:
        compile_times()
        return
    print(f"bitnet-fast kernels: numba ISA={cpu.ISA}, params={cpu.params()}, torch {torch.__version__}")
    print(HEADER + "\n" + "|---" * 11 + "|")
    rows = run(args.quick, args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"isa": cpu.ISA, "params": cpu.params(), "threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
