"""llama.cpp as the whole-model peer: find its `llama-bench`, write a ternary GGUF of a model shape, run, parse.

One place for what `bitnet-fast calibrate`, `bitnet-fast report` and tools/bench_llamacpp.py need to put
llama.cpp's numbers next to our PackedDecoder's. Nothing here builds or downloads: llama-bench comes from
`python tools/llamacpp_build.py` (llama.cpp vendored in the pinned llama-cpp-python sdist), built into the peers
cache folder ($BITNET_FAST_PEERS, else ~/.cache/bitnet-fast/peers) as build-<isa>-<version>/bin/llama-bench.

The GGUF is a llama-architecture model of the requested shape (default TinyLlama-1.1B) whose seven projections
per layer are random ternary {-1, 0, 1} * scale in TQ2_0 (or TQ1_0), embedding and head in Q8_0 (or F16), norms
F32, written with the optional `gguf` package (pip install gguf; pinned with the tested versions in
requirements/tested.txt, not a dependency of the bitnet-fast package: without it, `measure` says so instead of
failing). Random weights run at the speed of trained ones: the kernels are
data-independent. The vocab is a minimal SentencePiece-style one that llama.cpp loads like LLaMA's. Files are
cached in <peers dir>/gguf, never in a repository.

    r = measure(Shape(layers=22), n_prompt=128, n_gen=32, threads=2)   # {"available": False, "reason"} or numbers
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ISAS", "LLAMA_CPP_PYTHON", "Shape", "cache_dir", "find_llama_bench", "measure", "model_path",
           "not_built_message", "parse_llama_bench", "run_llama_bench", "write_gguf"]

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is the peer
ISAS = ("native", "avx2")  # build flavours (tools/llamacpp_build.py --isa)
GGUF_MISSING = "llama.cpp's numbers need the gguf package to write the model file: pip install gguf"
UNIT = 256  # elements per generated chunk: one TQ/K-quant block, eight Q8_0 blocks


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The peers cache folder: `override`, else $BITNET_FAST_PEERS, else ~/.cache/bitnet-fast/peers."""
    d = override or os.environ.get("BITNET_FAST_PEERS") or Path.home() / ".cache" / "bitnet-fast" / "peers"
    return Path(d).expanduser().resolve()


def build_dir(isa: str = "native", root: str | os.PathLike | None = None) -> Path:
    """Where flavour `isa` is (or would be) built; the version is in the name so a bump never reuses a stale build."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    return cache_dir(root) / f"build-{isa}-{LLAMA_CPP_PYTHON}"


def find_llama_bench(isa: str | None = None, root: str | os.PathLike | None = None) -> Path | None:
    """The built llama-bench executable of flavour `isa` (None: native, else avx2), or None. Never builds."""
    for flavour in (isa,) if isa else ISAS:
        exe = build_dir(flavour, root) / "bin" / "llama-bench"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


def not_built_message(isa: str | None = None, root: str | os.PathLike | None = None) -> str:
    """One line: llama-bench is not built here, and the command that builds it."""
    return (f"llama.cpp's llama-bench is not built in {cache_dir(root)} (no llama.cpp numbers); build it with "
            f"`python tools/llamacpp_build.py --isa {isa or 'native'}` (a few minutes, downloads the llama-cpp-python "
            f"{LLAMA_CPP_PYTHON} sdist)")


@dataclass(frozen=True)
class Shape:
    """A llama-architecture model shape (TinyLlama-1.1B by default)."""

    hidden: int = 2048
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    ffn: int = 5632
    vocab: int = 32000

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}, and heads by "
                             f"kv_heads={self.kv_heads}")
        if self.hidden % UNIT or self.ffn % UNIT:
            raise ValueError(f"hidden={self.hidden} and ffn={self.ffn} must be multiples of {UNIT} (GGUF blocks)")

    @property
    def tag(self) -> str:
        return f"h{self.hidden}-l{self.layers}-a{self.heads}x{self.kv_heads}-f{self.ffn}-v{self.vocab}"


# ------------------------------------------------------------------------------------------------ the GGUF
def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(GGUF_MISSING) from None
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
    """Write the random-ternary llama GGUF to `path` (streamed tensor by tensor: peak memory ~ one tensor;
    the file appears only when complete). ImportError (GGUF_MISSING) without the gguf package."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
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


def model_path(shape: Shape, weights: str, head: str, root: str | os.PathLike | None = None) -> Path:
    """Cached GGUF path for this shape/weights/head (written once, reused)."""
    return cache_dir(root) / "gguf" / f"random-ternary-{shape.tag}-{weights}-{head}.gguf"


# ------------------------------------------------------------------------------------------ running it
def parse_llama_bench(stdout: str) -> dict:
    """The `llama-bench -o json` records as {ppN_tok_s, ppN_std, ppN_best, tgN_...: float, records, build info}.
    `best` is the fastest repetition: on a shared machine the one least slowed by other processes."""
    try:
        records = json.loads(stdout)
        if not isinstance(records, list) or not records:
            raise ValueError("expected a non-empty JSON list of test records")
        res: dict = {"records": records}
        for r in records:
            key = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
            res[f"{key}_tok_s"], res[f"{key}_std"] = float(r["avg_ts"]), float(r["stddev_ts"])
            res[f"{key}_best"] = float(max(r.get("samples_ts") or [r["avg_ts"]]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unexpected llama-bench output ({e}); it should be `llama-bench -o json` records: "
                         f"{stdout[:200]!r}") from None
    rec = records[0]
    res.update({k: rec.get(k) for k in ("build_commit", "build_number", "cpu_info", "model_type", "model_size",
                                        "model_n_params", "n_threads", "type_k", "n_batch", "n_ubatch")})
    return res


def run_llama_bench(exe: Path, model: Path, threads: int, n_prompt: int, n_gen: int, reps: int) -> dict:
    """`exe -m model -t threads -p n_prompt -n n_gen -r reps -o json`: parse_llama_bench's result plus the peak
    RSS of exactly that process (wait4 rusage; the weights are mmapped, so resident file pages count), the wall
    time and the command. RuntimeError with the tail of its stderr when it fails."""
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps),
           "-o", "json"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)  # ru_maxrss in KiB on Linux
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"llama-bench failed (exit {proc.returncode}): {tail}")
    return {**parse_llama_bench(stdout), "peak_rss_bytes": ru.ru_maxrss * 1024, "wall_s": wall,
            "command": " ".join(cmd)}


def measure(shape: Shape, n_prompt: int, n_gen: int, threads: int, reps: int = 3, weights: str = "tq2_0",
            head: str = "q8_0", isa: str | None = None, root: str | os.PathLike | None = None,
            echo=print) -> dict:
    """llama.cpp's prefill/decode tok/s and peak RSS on `shape`, writing (once) and caching the GGUF.

    Returns {"available": True, ...run_llama_bench's result, weights, head, gguf, gguf_bytes} or, when llama-bench
    is not built or the gguf package is missing, {"available": False, "reason": one line saying how to fix it}.
    """
    exe = find_llama_bench(isa, root)
    if exe is None:
        return {"available": False, "reason": not_built_message(isa, root)}
    path = model_path(shape, weights, head, root)
    if not path.exists():
        try:
            _gguf()
        except ImportError:
            return {"available": False, "reason": GGUF_MISSING}
        echo(f"llama.cpp: writing {path.name} (once) ...")
        write_gguf(path, shape, weights, head)
    echo(f"llama.cpp: llama-bench -t {threads} -p {n_prompt} -n {n_gen} -r {reps} on {path.name} ...")
    res = run_llama_bench(exe, path, threads, n_prompt, n_gen, reps)
    return {"available": True, **res, "weights": weights, "head": head, "gguf": str(path),
            "gguf_bytes": path.stat().st_size, "llama_bench": str(exe),
            "n_prompt": n_prompt, "n_gen": n_gen, "shape": shape.tag}
