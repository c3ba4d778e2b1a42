"""Side-by-side CPU benchmark: bitnet-fast packed i2 (numba) vs torch fp32 / bf16 F.linear, fbgemm int8 and ggml.

All contenders run in one process, in rounds: each round times a burst of consecutive calls of every
contender, after 10 ms of untimed calls (torch's, Numba's and ggml's OpenMP pools are separate and each spins for a
while after its last task; see docs/kernels.md), and rounds repeat so that background load hits all
contenders alike. The table shows the median ms over all timed calls, GOPS = 2*M*N*K / t, and the
speed ratios of ours over each baseline (>1: ours is faster). Two ways to take the weights out of the caches:
`--stream` gives every contender enough copies of its weight (3x the L3 in all) to cycle through back to back, so
each call reads its weight from DRAM as the layers of a model decoding token after token do; `--cold` flushes
the caches (64 MiB written and read, untimed) before every timed call, so each call also starts with a cold
interpreter, cold thread pools and idle cores (the first call after a pause).

When the llama.cpp peer is built (python tools/llamacpp_build.py), ggml's TQ2_0 and TQ1_0 mul_mat (activation
quantized to q8_K inside, as in llama.cpp; tools/ggml_peer.py) run in the same rounds: columns `vs ggml tq2_0`,
`vs ggml tq1_0`. Without that build the table is the same as before, minus those columns.

    python tools/bench_kernels.py [--quick] [--threads 2] [--ms 1,8,32,128,512] [--shapes 4096x4096,2048x5632]
        [--stream | --cold] [--isa native|avx2] [--no-ggml] [--json out.json] [--compile-times] [--breakdown]

`--breakdown` times, at M=1, the public call (with a fresh output, and writing a reused one with `out=`, as ggml's
graph writes its preallocated dst) next to the Numba engine call alone (planned arguments, a reused output) on the
given threads and on one, and ggml TQ2_0 on both: what the Python and the output allocation cost, and how each
engine scales from one thread to two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import ggml_peer
import torch
import torch.nn.functional as F
from bitnet_fast.kernels import cpu

from bitnet_fast import kernels

SHAPES = [(2048, 2048), (4096, 4096), (2048, 5632), (5632, 2048)]  # (K, N)
MS = [1, 8, 32, 128, 512]
BASELINES = ["fp32", "bf16", "fbgemm"]
GGML = ["ggml_tq2_0", "ggml_tq1_0"]


def _fbgemm(w: torch.Tensor) -> torch.nn.Module:
    """torch.ao dynamic int8 Linear (fbgemm): per-tensor int8 weights, dynamic per-tensor activations."""
    n, k = w.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = torch.ao.nn.quantized.dynamic.Linear(k, n, bias_=False, dtype=torch.qint8)
        scale = float(w.abs().max()) / 127
        lin.set_weight_bias(torch.quantize_per_tensor(w, scale, 0, torch.qint8), None)
    return lin


STREAM_BYTES = 96 << 20  # --stream: each contender cycles through weight copies totalling 3x this L3


def _cycle(fns: list) -> Callable[[], object]:
    """One callable that runs the next of `fns` on every call (round robin)."""
    state = [0]

    def call() -> object:
        state[0] = (state[0] + 1) % len(fns)
        return fns[state[0]]()

    return call


def _contenders(m: int, k: int, n: int, threads: int, ggml_isa: str | None, stream: bool = False) -> dict:
    """name -> a zero-argument call of y = x @ W^T. With `stream`, every contender cycles through enough copies
    of its weight (different data, same shape) that each call reads its weight from DRAM, back to back, as the
    layers of a model too big for the L3 do."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    xb = x.bfloat16()
    makers: dict[str, tuple[int, Callable[[], Callable[[], object]]]] = {  # (weight bytes, make one call)
        "ours": (n * k // 4, lambda: (lambda pw: lambda: kernels.bitlinear(x, pw))(kernels.pack(torch.randn(n, k)))),
        "fp32": (n * k * 4, lambda: (lambda w: lambda: F.linear(x, w))(torch.randn(n, k))),
        "bf16": (n * k * 2, lambda: (lambda w: lambda: F.linear(xb, w))(torch.randn(n, k).bfloat16())),
        "fbgemm": (n * k, lambda: (lambda q: lambda: q(x))(_fbgemm(torch.randn(n, k)))),
    }
    if ggml_isa:  # its own seeded x and random ternary W of the same shape: the kernels are data-independent
        for name in GGML:
            qtype = name.removeprefix("ggml_")
            makers[name] = (n * k // 4, lambda q=qtype: ggml_peer.GgmlMulMat(m, k, n, q, threads, ggml_isa))
    fns = {}
    for name, (nbytes, make) in makers.items():
        copies = max(1, -(-STREAM_BYTES // nbytes)) if stream else 1
        calls = [make() for _ in range(copies)]
        fns[name] = _cycle(calls) if stream else calls[0]
        fns[name].handles = [c for c in calls if isinstance(c, ggml_peer.GgmlMulMat)]
    return fns


def run(
    ms: list[int], shapes: list[tuple[int, int]], quick: bool, threads: int, cold: bool, ggml_isa: str | None,
    stream: bool = False,
) -> list[dict]:
    """Time every contender at every (M, K, N), print a table row each and return the rows."""
    torch.set_num_threads(threads)
    cpu.configure(threads=threads)
    rows = []
    for m in ms:
        for k, n in shapes:
            budget = (1.5 if quick else 3.0) * (1 + (m > 8))
            burst = 5 if cold else (20 if m < 512 else 2)
            fns = _contenders(m, k, n, threads, ggml_isa, stream)
            times = ggml_peer.time_rounds(fns, budget_s=budget, burst=burst, cold=cold)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            row = {"M": m, "K": k, "N": n, **{f"{c}_ms": t * 1e3 for c, t in med.items()}}
            row.update({f"{c}_min_ms": min(ts) * 1e3 for c, ts in times.items()})  # least disturbed call
            row["ours_gops"] = 2 * m * n * k / med["ours"] / 1e9
            row.update({f"x_vs_{c}": med[c] / med["ours"] for c in med if c != "ours"})
            rows.append(row)
            print(_fmt(row, ggml_isa is not None), flush=True)
            for f in fns.values():
                for h in f.handles:
                    h.close()
    return rows


def _engine_call(k: int, n: int, threads: int) -> Callable[[], object]:
    """M=1 straight into the Numba engine (cpu_engine._bitlinear_packed) with the arguments bitlinear_fp32 plans,
    writing one reused output: the public call minus its Python and its fresh output tensor."""
    from bitnet_fast.kernels import cpu_engine

    x, pw, out = torch.randn(1, k), kernels.pack(torch.randn(n, k)), torch.empty(1, n)
    plan = cpu._decode_plan(pw, cpu._i2(pw), x.shape)
    args = (x.data_ptr(), out.data_ptr(), 0, *plan[3], 0, threads, *plan[4])  # 0: no bias

    def call() -> object:
        cpu_engine._bitlinear_packed(*args)
        return x, pw, out  # holds the buffers the addresses point into

    call()
    if not torch.equal(out, kernels.bitlinear(x, pw)):  # the plan's layout changed: this would time something else
        raise SystemExit(f"--breakdown: the engine call at {k}x{n} differs from kernels.bitlinear; update _engine_call")
    return call


def breakdown(shapes: list[tuple[int, int]], threads: int, ggml_isa: str | None) -> None:
    """Where an M=1 call goes, side by side: the public `kernels.bitlinear` (a fresh output; `out=` a reused one), the
    engine call alone on `threads` and on one thread, and ggml TQ2_0 on both (its whole ggml_mul_mat, into its
    graph's preallocated dst): per-call medians in us and the ratios."""
    torch.set_num_threads(threads)
    cpu.configure(threads=threads)
    print("| K | N | ours us | ours out= us | engine us | engine 1t us | ggml us | ggml 1t us | ggml / ours | "
          "ggml / ours out= | ggml / engine | ggml 1t / engine 1t | threads scale: engine, ggml |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n in shapes:
        x, pw, out = torch.randn(1, k), kernels.pack(torch.randn(n, k)), torch.empty(1, n)
        fns = {"ours": lambda x=x, pw=pw: kernels.bitlinear(x, pw),
               "ours_out": lambda x=x, pw=pw, out=out: kernels.bitlinear(x, pw, out=out),
               "engine": _engine_call(k, n, threads), "engine_1t": _engine_call(k, n, 1)}
        handles = []
        if ggml_isa:
            handles = [ggml_peer.GgmlMulMat(1, k, n, "tq2_0", t, ggml_isa) for t in (threads, 1)]
            fns["ggml"], fns["ggml_1t"] = handles
        times = ggml_peer.time_rounds(fns, budget_s=6.0, burst=20)
        us = {name: statistics.median(ts) * 1e6 for name, ts in times.items()}
        g, g1 = us.get("ggml", float("nan")), us.get("ggml_1t", float("nan"))
        print(f"| {k} | {n} | {us['ours']:.1f} | {us['ours_out']:.1f} | {us['engine']:.1f} | {us['engine_1t']:.1f} | "
              f"{g:.1f} | {g1:.1f} | {g / us['ours']:.2f}x | {g / us['ours_out']:.2f}x | {g / us['engine']:.2f}x | "
              f"{g1 / us['engine_1t']:.2f}x | "
              f"{us['engine_1t'] / us['engine']:.2f}x, {g1 / g:.2f}x |", flush=True)
        for h in handles:
            h.close()


_FIRST_CALLS = """
import time
t0 = time.perf_counter()
import torch
from bitnet_fast import kernels
from bitnet_fast.kernels import reference
wt = torch.randint(-1, 2, (256, 512), dtype=torch.int8)
pw = kernels.PackedWeight(reference.pack_i2(wt), torch.tensor(0.5), (256, 512), "i2")  # no cpu_pack compile
res = [f"import {time.perf_counter() - t0:.2f}s"]
xq, s = torch.zeros(3, 512, dtype=torch.int8), torch.ones(3)
for name, f in [("bitlinear M=1", lambda: kernels.bitlinear(torch.randn(1, 512), pw)),
                ("bitlinear M=300", lambda: kernels.bitlinear(torch.randn(300, 512), pw)),
                ("bitlinear_train", lambda: kernels.bitlinear_train(torch.randn(4, 512), pw)),
                ("matmul", lambda: kernels.matmul(xq, s, pw)),
                ("matmul_int", lambda: kernels.matmul_int(xq, pw)),
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


def _header(with_ggml: bool) -> str:
    cols = ["M", "K", "N", "ours ms", "GOPS", *(f"{c} ms" for c in BASELINES)]
    cols += [f"{c.replace('_', ' ', 1)} ms" for c in GGML] if with_ggml else []
    cols += [f"vs {c}" for c in BASELINES] + ([f"vs {c.replace('_', ' ', 1)}" for c in GGML] if with_ggml else [])
    return "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|"


def _fmt(r: dict, with_ggml: bool) -> str:
    others = BASELINES + (GGML if with_ggml else [])
    cells = [str(r["M"]), str(r["K"]), str(r["N"]), f"{r['ours_ms']:.3f}", f"{r['ours_gops']:.0f}"]
    cells += [f"{r[c + '_ms']:.3f}" for c in others]
    cells += [f"{r['x_vs_' + c]:.2f}x" for c in others]
    return "| " + " | ".join(cells) + " |"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _parse_shapes(s: str) -> list[tuple[int, int]]:
    try:
        return [(int(k), int(n)) for k, n in (p.lower().split("x") for p in s.split(","))]
    except ValueError as e:
        raise SystemExit(f"--shapes wants KxN[,KxN...], e.g. 4096x4096,2048x5632; got {s!r}") from e


def dram_bandwidth(threads: int, nbytes: int = 256 << 20) -> float:
    """GB/s of a plain streaming read with `threads` threads now (torch sum of a buffer 8x the L3): the ceiling of
    every contender when the weights come from DRAM, printed because a shared machine's varies with its load."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(5))
    return nbytes / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only K=N=4096 (unless --shapes), shorter timing budget")
    ap.add_argument("--threads", type=int, default=2, help="torch, numba and ggml threads (default 2)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values (default 1,8,32,128,512)")
    ap.add_argument("--shapes", help="KxN,KxN,... (default 2048x2048,4096x4096,2048x5632,5632x2048)")
    ap.add_argument("--cold", action="store_true", help="flush the caches (64 MiB) before every timed call")
    ap.add_argument("--stream", action="store_true", help="cycle through weight copies (3x L3): weights from DRAM")
    ap.add_argument("--isa", default="native", choices=("native", "avx2"), help="ggml build flavour (default native)")
    ap.add_argument("--no-ggml", action="store_true", help="leave ggml out even if it is built")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--compile-times", action="store_true", help="only measure first-call (JIT) times")
    ap.add_argument("--breakdown", action="store_true",
                    help="M=1 only: the public call vs the engine call alone, on N and on 1 threads, next to ggml")
    args = ap.parse_args()
    if args.compile_times:
        compile_times()
        return
    ms = [int(v) for v in args.ms.split(",")]
    shapes = _parse_shapes(args.shapes) if args.shapes else ([(4096, 4096)] if args.quick else SHAPES)
    ggml_isa = None if args.no_ggml or not ggml_peer.available(args.isa) else args.isa
    if args.breakdown:
        print(f"CPU: {cpu_model()}, numba {cpu.ISA}, torch {torch.backends.cpu.get_cpu_capability()}, M=1, warm")
        breakdown(shapes, args.threads, ggml_isa)
        return
    params = cpu.params() if hasattr(cpu, "params") else {}
    info = {
        "cpu": cpu_model(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "numba_isa": cpu.ISA,
        "params": params,
        "threads": args.threads,
        "cold": args.cold,
        "stream": args.stream,
        "torch": torch.__version__,
    }
    regime = "cold (caches flushed)" if args.cold else "stream (weights from DRAM)" if args.stream else "warm"
    torch.set_num_threads(args.threads)
    info["dram_gbps"] = dram_bandwidth(args.threads)
    print(f"CPU: {info['cpu']}, {args.threads} threads, {regime}; DRAM streaming read now: "
          f"{info['dram_gbps']:.1f} GB/s")
    print(f"ISA: torch {info['torch_capability']}, bitnet-fast numba {cpu.ISA} {params}, torch {torch.__version__}")
    if ggml_isa:
        gi = ggml_peer.build_info(ggml_isa)
        feats = [f for f, v in gi["ggml_cpu_features"].items() if v == 1]
        info["ggml"] = {k: gi[k] for k in ("llama_cpp_python", "llama_cpp_describe", "ggml_version", "isa")}
        info["ggml"]["features"] = feats
        print(
            f"ggml {gi['ggml_version']} (llama.cpp {gi['llama_cpp_describe']} from llama-cpp-python "
            f"{gi['llama_cpp_python']}), flavour {ggml_isa}: {', '.join(feats)}"
        )
    elif not args.no_ggml:
        print(f"(ggml peer not built, no ggml columns: python tools/llamacpp_build.py --isa {args.isa})")
    print(_header(ggml_isa is not None))
    rows = run(ms, shapes, args.quick, args.threads, args.cold, ggml_isa, args.stream)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "isa": cpu.ISA, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
