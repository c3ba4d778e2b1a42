"""Whole-model peer benchmark: llama.cpp's llama-bench on a TinyLlama-1.1B-shaped ternary GGUF.

What the CPU speed to beat is for a BitNet model of our shape: a llama-architecture GGUF (default TinyLlama-1.1B:
hidden 2048, 22 layers, 32 heads / 4 KV heads, FFN 5632, vocab 32000) whose seven projections per layer are random
ternary {-1, 0, 1} * scale stored as TQ2_0 (or TQ1_0), token embedding and output head in Q8_0 (or F16), norms F32,
written with the `gguf` package (pip install gguf; its numpy quantizers cover TQ1_0/TQ2_0, so llama-quantize is not
needed). Random weights run at the speed of trained ones: the kernels are data-independent. The vocab is a minimal
SentencePiece-style one (<unk>, <s>, </s>, 256 byte tokens, dummy pieces) that llama.cpp loads like LLaMA's.

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
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

try:  # run from tools/ (python tools/x.py puts tools/ on sys.path) or imported as tools.bench_llamacpp
    from llamacpp_build import cache_dir, find_build
except ImportError:  # pragma: no cover
    from tools.llamacpp_build import cache_dir, find_build

UNIT = 256  # elements per generated chunk: one TQ/K-quant block, eight Q8_0 blocks


@dataclass(frozen=True)
class Shape:
    """A llama-architecture model shape (TinyLlama-1.1B by default)."""

    hidden: int = 2048
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    ffn: int = 5632
    vocab: int = 32000

    @property
    def tag(self) -> str:
        return f"h{self.hidden}-l{self.layers}-a{self.heads}x{self.kv_heads}-f{self.ffn}-v{self.vocab}"


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover
        raise SystemExit("the gguf package is missing: pip install gguf (>=0.17 for TQ1_0/TQ2_0)") from e
    return gguf


def _pool(qtype, rng: np.random.Generator, ternary: bool, units: int = 8192) -> np.ndarray:
    """`units` chunks of UNIT random values quantized with gguf-py, as a (units, bytes per chunk) uint8 array.
    Tensors are drawn from it chunk by chunk, so a 1B-weight model takes seconds, not minutes of numpy quantizing."""
    gguf = _gguf()
    vals = rng.integers(-1, 2, (units, UNIT)) if ternary else rng.standard_normal((units, UNIT))
    vals = vals.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return vals.astype(np.float16).view(np.uint8)
    q = gguf.quants.quantize(vals, qtype)
    return np.ascontiguousarray(q).view(np.uint8).reshape(units, -1)


def _draw(pool: np.ndarray, rows: int, cols: int, rng: np.random.Generator, scale: float | None) -> np.ndarray:
    """A rows x cols tensor as bytes (rows, bytes per row) made of random pool chunks; `scale` overwrites the
    fp16 block scale `d`, the last 2 bytes of every TQ1_0/TQ2_0 block (ternary * scale keeps activations O(1))."""
    if cols % UNIT:
        raise ValueError(f"row length {cols} must be a multiple of {UNIT} (the TQ/K-quant block size)")
    chunks = pool[rng.integers(0, len(pool), rows * cols // UNIT)]
    if scale is not None:
        chunks[:, -2:] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return chunks.reshape(rows, -1)


def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """LLaMA-like SentencePiece vocab: <unk>, <s>, </s>, <0x00>..<0xFF>, then dummy pieces up to n tokens."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE (gguf.TokenType)
    toks += [f"\u2581t{i}" for i in range(n - len(toks))]
    types += [1] * (n - len(types))  # NORMAL
    return toks, [-float(i) for i in range(n)], types


def write_gguf(path: Path, shape: Shape, weights: str = "tq2_0", head: str = "q8_0", seed: int = 0) -> Path:
    """Write the random-ternary llama GGUF to `path` (streamed tensor by tensor: peak memory ~ one tensor)."""
    gguf = _gguf()
    qt = gguf.GGMLQuantizationType
    wq, hq = qt[weights.upper()], qt[head.upper()]
    hd = shape.hidden // shape.heads
    kv = hd * shape.kv_heads
    rng = np.random.default_rng(seed)
    pools = {wq: _pool(wq, rng, ternary=True), hq: _pool(hq, rng, ternary=False)}
    h, f = shape.hidden, shape.ffn
    # name, (rows, cols) = (out features, in features), type
    plan: list[tuple[str, tuple[int, int], object]] = [("token_embd.weight", (shape.vocab, h), hq)]
    for i in range(shape.layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (1, h), qt.F32)]
        plan += [(b + n, rc, wq) for n, rc in (("attn_q.weight", (h, h)), ("attn_k.weight", (kv, h)),
                                               ("attn_v.weight", (kv, h)), ("attn_output.weight", (h, h)))]
        plan += [(b + "ffn_norm.weight", (1, h), qt.F32)]
        plan += [(b + n, rc, wq) for n, rc in (("ffn_gate.weight", (f, h)), ("ffn_up.weight", (f, h)),
                                               ("ffn_down.weight", (h, f)))]
    plan += [("output_norm.weight", (1, h), qt.F32), ("output.weight", (shape.vocab, h), hq)]

    w = gguf.GGUFWriter(None, "llama")
    w.add_name(f"bitnet-fast random ternary {shape.tag} {weights} head {head}")
    w.add_context_length(2048)
    w.add_embedding_length(h)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(f)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{weights.upper()}"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("llama")
    toks, scores, types = _vocab(shape.vocab)
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, (r, c), t in plan:
        if t == qt.F32:
            w.add_tensor_info(name, (c,), np.dtype(np.float32), 4 * c)
        else:
            nbytes = r * c // UNIT * pools[t].shape[1]
            w.add_tensor_info(name, (r, nbytes // r), np.dtype(np.uint8), nbytes, raw_dtype=t)
    tmp = path.with_suffix(".tmp")
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, (r, c), t in plan:
        if t == qt.F32:
            w.write_tensor_data(np.ones(c, dtype=np.float32))
        else:
            scale = 1.0 / np.sqrt(2 / 3 * c) if t == wq else None  # unit-variance outputs from unit inputs
            w.write_tensor_data(_draw(pools[t], r, c, rng, scale))
    w.close()
    tmp.rename(path)
    return path


def model_path(shape: Shape, weights: str, head: str, root: str | None = None) -> Path:
    """Cached GGUF path for this shape/weights/head (written once, reused)."""
    return cache_dir(root) / "gguf" / f"random-ternary-{shape.tag}-{weights}-{head}.gguf"


def run_llama_bench(model: Path, isa: str, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict:
    """llama-bench on `model`; returns pp/tg tok/s (mean and stddev), peak RSS and the raw JSON records."""
    bdir = find_build(isa)
    if bdir is None:
        raise SystemExit(f"ggml build not found ({isa}): run python tools/llamacpp_build.py --isa {isa}")
    cmd = [str(bdir / "bin" / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(n_prompt),
           "-n", str(n_gen), "-r", str(reps), "-o", "json"]
    print("$ " + " ".join(cmd), flush=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)  # rusage of exactly this child (ru_maxrss in KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    records = json.loads(stdout)
    res: dict = {"peak_rss_mib": ru.ru_maxrss / 1024, "wall_s": wall, "records": records}
    for r in records:
        key = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        res[f"{key}_tok_s"], res[f"{key}_std"] = r["avg_ts"], r["stddev_ts"]
        res[f"{key}_best"] = max(r.get("samples_ts") or [r["avg_ts"]])  # least disturbed by other load
    rec = records[0]
    res.update({k: rec.get(k) for k in ("build_commit", "build_number", "cpu_info", "model_type", "model_size",
                                        "model_n_params", "n_threads", "type_k", "n_batch", "n_ubatch")})
    return res


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
    shape = Shape(args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab)
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise SystemExit("--hidden must be divisible by --heads, and --heads by --kv-heads")
    if find_build(args.isa) is None:
        raise SystemExit(f"ggml build not found ({args.isa}): run python tools/llamacpp_build.py --isa {args.isa}")
    results, ours = [], []
    combos = list(itertools.product(args.weights.split(","), args.head.split(",")))
    for _round in range(args.rounds if args.ours else 1):
        for weights, head in combos:
            path = model_path(shape, weights, head, args.dir)
            if args.regen or not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                write_gguf(path, shape, weights, head)
                print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
            res = run_llama_bench(path, args.isa, args.threads, args.n_prompt, args.n_gen, args.reps)
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
