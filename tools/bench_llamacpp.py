"""Whole-model peer benchmark: llama.cpp's llama-bench on a TinyLlama-1.1B-shaped ternary GGUF.

What the CPU speed to beat is for a BitNet model of our shape: a llama-architecture GGUF (default TinyLlama-1.1B:
hidden 2048, 22 layers, 32 heads / 4 KV heads, FFN 5632, vocab 32000) whose seven projections per layer are random
ternary stored as TQ2_0 (or TQ1_0), embedding and head in Q8_0 (or F16), written with the `gguf` package (pip
install gguf; pinned in requirements/tested.txt). Writing the GGUF, running llama-bench and parsing its output
live in bitnet_fast/peers.py (shared with `bitnet-fast calibrate` and `bitnet-fast report`); this script adds the
sweep, the alternation with our decoder and the tables.

It then runs `llama-bench -t T -p 128 -n 32 -m FILE -o json` (from `python tools/llamacpp_build.py`) and reports
prefill (pp) and decode (tg) tok/s (mean ± std over the repetitions, and the best repetition: on a shared machine
the one least slowed by other processes), the peak RSS of the llama-bench process (wait4 rusage; the weights are
mmapped, so resident file pages count) and the GGUF size. GGUF files are cached in <peers dir>/gguf, never in the
repo.

On a shared machine run it in its own autogroup at nice -15 (as docs/kernels.md does for bench_kernels):
setsid bash -c 'echo -15 > /proc/self/autogroup; exec python tools/bench_llamacpp.py ...'; decode (many small
multi-threaded ops per token) is the first to suffer from other processes on the cores.

    python tools/bench_llamacpp.py [--weights tq2_0,tq1_0] [--head q8_0,f16] [--layers 22] [--threads 2]
        [--hidden 2048 --ffn 5632 --heads 32 --kv-heads 4 --vocab 32000] [--isa native|avx2] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bitnet_fast.peers import GGUF_MISSING, Shape, find_llama_bench, model_path, not_built_message, run_llama_bench
from bitnet_fast.peers import write_gguf as _write_gguf


def run_ours(shape: Shape, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict:
    """bitnet-fast's PackedDecoder on the same shape (int8 head: the Q8_0 class), in a fresh process so that its
    RSS is its own: `python -m bitnet_fast.tinyllama --variant decoder`. The RSS it adds is counted from that
    process after importing torch and bitnet_fast; the peak RSS is the whole process's."""
    over = {"hidden_size": shape.hidden, "intermediate_size": shape.ffn, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab}
    cmd = [sys.executable, "-m", "bitnet_fast.tinyllama", "--variant", "decoder", "--layers", str(shape.layers),
           "--prefill", str(n_prompt), "--decode", str(n_gen), "--reps", str(reps), "--shape", json.dumps(over)]
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"bitnet-fast decoder run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {f"pp{n_prompt}_tok_s": r["prefill_tokens_per_sec"], f"tg{n_gen}_tok_s": r["decode_tokens_per_sec"],
            f"pp{n_prompt}_best": max(x["prefill_tokens_per_sec"] for x in r["runs"]),
            f"tg{n_gen}_best": max(x["decode_tokens_per_sec"] for x in r["runs"]),
            "peak_rss_mib": r["peak_rss_bytes"] / 2**20,
            "rss_added_mib": (r["peak_rss_bytes"] - r["rss_before_bytes"]) / 2**20,
            "weights_mib": r["param_bytes"] / 2**20, "raw": r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Shape()
    ap.add_argument("--weights", default="tq2_0", help="projection type(s): tq2_0, tq1_0 or a comma list")
    ap.add_argument("--head", default="q8_0", help="embedding/output head type(s): q8_0, f16 or a comma list")
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--ffn", type=int, default=d.ffn)
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--kv-heads", type=int, default=d.kv_heads)
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=128, help="prefill tokens (default 128)")
    ap.add_argument("-n", "--n-gen", type=int, default=32, help="decoded tokens (default 32)")
    ap.add_argument("-r", "--reps", type=int, default=5, help="llama-bench repetitions (default 5)")
    ap.add_argument("--isa", default="native", choices=("native", "avx2"))
    ap.add_argument("--dir", help="peers cache folder (default $BITNET_FAST_PEERS or ~/.cache/bitnet-fast/peers)")
    ap.add_argument("--regen", action="store_true", help="rewrite the GGUF even if cached")
    ap.add_argument("--json", metavar="OUT", help="also write all results as JSON")
    ap.add_argument("--ours", action="store_true",
                    help="also run bitnet-fast's PackedDecoder (int8 head) on the same shape, alternating with "
                         "llama-bench for --rounds rounds, and print the ratios against the q8_0-head rows")
    ap.add_argument("--rounds", type=int, default=2, help="with --ours: alternations (default 2)")
    args = ap.parse_args()
    try:
        shape = Shape(args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab)
    except ValueError as e:
        raise SystemExit(f"bad shape: {e}") from None
    exe = find_llama_bench(args.isa, args.dir)
    if exe is None:
        raise SystemExit(not_built_message(args.isa, args.dir))
    results, ours = [], []
    combos = list(itertools.product(args.weights.split(","), args.head.split(",")))
    for _round in range(args.rounds if args.ours else 1):
        for weights, head in combos:
            path = model_path(shape, weights, head, args.dir)
            if args.regen or not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                try:
                    _write_gguf(path, shape, weights, head)
                except ImportError:
                    raise SystemExit(GGUF_MISSING) from None
                print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
            print(f"$ {exe} -m {path} -t {args.threads} -p {args.n_prompt} -n {args.n_gen} -r {args.reps} -o json",
                  flush=True)
            res = run_llama_bench(exe, path, args.threads, args.n_prompt, args.n_gen, args.reps)
            res["peak_rss_mib"] = res.pop("peak_rss_bytes") / 2**20
            res.update(weights=weights, head=head, gguf=str(path), gguf_mib=path.stat().st_size / 2**20,
                       isa=args.isa, shape=asdict(shape))
            results.append(res)
        if args.ours:
            ours.append(run_ours(shape, args.threads, args.n_prompt, args.n_gen, args.reps))
    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    print(f"\nllama.cpp {results[0]['build_commit']} ({args.isa}), {results[0]['cpu_info']}, {args.threads} threads, "
          f"shape {shape.tag}")
    print(f"| weights | head | GGUF MiB | {pp} tok/s | {pp} best | {tg} tok/s | {tg} best | peak RSS MiB |")
    print("|---" * 8 + "|")
    for r in results:
        print(f"| {r['weights']} | {r['head']} | {r['gguf_mib']:.0f} | {r[pp + '_tok_s']:.1f} ± {r[pp + '_std']:.1f} "
              f"| {r[pp + '_best']:.1f} | {r[tg + '_tok_s']:.2f} ± {r[tg + '_std']:.2f} | {r[tg + '_best']:.2f} "
              f"| {r['peak_rss_mib']:.0f} |")
    if ours:
        _print_ours(results, ours, pp, tg)
    if args.json:
        Path(args.json).write_text(json.dumps({"llama_cpp": results, "ours": ours}, indent=2) + "\n")


def _print_ours(results: list[dict], ours: list[dict], pp: str, tg: str) -> None:
    """bitnet-fast's decoder next to each llama.cpp q8_0-head configuration: medians over the rounds, ratios."""
    med = {k: statistics.median(o[k] for o in ours) for k in (f"{pp}_tok_s", f"{tg}_tok_s", "rss_added_mib",
                                                               "peak_rss_mib", "weights_mib")}
    print(f"\nbitnet-fast PackedDecoder (i2 projections, int8 head + embedding), median of {len(ours)} runs: "
          f"{pp} {med[pp + '_tok_s']:.1f} tok/s, {tg} {med[tg + '_tok_s']:.2f} tok/s, weights "
          f"{med['weights_mib']:.0f} MiB, RSS added {med['rss_added_mib']:.0f} MiB (process peak "
          f"{med['peak_rss_mib']:.0f} MiB)")
    print(f"| vs llama.cpp | {pp} ours / theirs | {tg} ours / theirs | RSS added / their peak RSS |")
    print("|---|---|---|---|")
    for weights in dict.fromkeys(r["weights"] for r in results):
        rows = [r for r in results if r["weights"] == weights and r["head"] == "q8_0"]
        if rows:
            theirs = {k: statistics.median(r[k] for r in rows) for k in (f"{pp}_tok_s", f"{tg}_tok_s", "peak_rss_mib")}
            print(f"| {weights} + q8_0 head | {med[pp + '_tok_s'] / theirs[pp + '_tok_s']:.2f}x | "
                  f"{med[tg + '_tok_s'] / theirs[tg + '_tok_s']:.2f}x | "
                  f"{med['rss_added_mib'] / theirs['peak_rss_mib']:.2f}x |")


if __name__ == "__main__":
    main()
