"""TinyLlama-1.1B-shaped model with random weights: decode/prefill tokens/sec and memory, BitNet vs fp32 vs bf16.

Speed and memory do not depend on weight values, so the architecture is built from a transformers
LlamaConfig with random weights (nothing is downloaded). Each variant runs in its own subprocess so that its
peak RSS is its own. Results are cached as JSON next to the kernel tuning file, keyed by what they depend on. The
PackedDecoder variant is written once to a decoder file (bitnet_fast.decoder_file) and measured loaded from it by
memory map, as llama.cpp's side maps its GGUF.

    python -m bitnet_fast.tinyllama                  # all variants, full 22 layers (a few minutes)
    python -m bitnet_fast.tinyllama --variant fp32   # one variant in this process, JSON on stdout
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .plumbing import machine_info, peak_rss_bytes, python_module_command, write_json

# TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json).
CONFIG = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
VARIANTS = {"decoder": "BitNet b1.58 (PackedDecoder: i2, int8 head + embedding)",
            "bitnet": "BitNet b1.58 (i2 BitLinear in transformers)", "fp32": "fp32 (torch)", "bf16": "bf16 (torch)"}
FULL = {"layers": 22, "prefill": 128, "decode": 8}
QUICK = {"layers": 2, "prefill": 32, "decode": 4}


def build_decoder(layers: int, max_len: int, shape: dict | None = None):
    """A random-weight TinyLlama (or `shape`: CONFIG's keys) as a PackedDecoder, never holding fp32 weights:
    bitnet_fast's own LM (no transformers import) with the projections initialised and packed one at a time,
    embedding and head drawn directly in int8 (the speed of the kernels does not depend on the values)."""
    from .decode import PackedDecoder
    from .model import LM, ModelConfig, RMSNorm
    from .nn import convert, meta_parameters

    torch.manual_seed(0)
    c = {**CONFIG, **(shape or {})}
    cfg = ModelConfig(vocab_size=c["vocab_size"], n_layer=layers, n_head=c["num_attention_heads"],
                      n_kv_head=c["num_key_value_heads"], n_embd=c["hidden_size"], hidden=c["intermediate_size"],
                      max_seq_len=max_len, linear="fp", tie_embeddings=False, norm_eps=c["rms_norm_eps"])
    with meta_parameters():
        model = LM(cfg)
    convert(model, pack=True, skip=("head",))
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.to_empty(device="cpu", recurse=False)
            torch.nn.init.ones_(module.weight)
    v, d = c["vocab_size"], c["hidden_size"]
    scales = torch.full((v,), 0.08 / 127)  # ~N(0, 0.02) quantized per row: absmax ~ 4 sigma
    head = (torch.randint(-127, 128, (v, d), dtype=torch.int8), scales)
    return PackedDecoder.from_model(model, "int8", True, max_len, embedding=(_file_backed_int8(v, d), scales),
                                    head_weight=head)


def _file_backed_int8(rows: int, cols: int) -> np.ndarray:
    """Random int8 rows in a memory-mapped (deleted) temporary file: an embedding as a model file provides it, on
    disk but for the rows a prompt touches (as llama.cpp's mmapped GGUF embedding is)."""
    import tempfile

    gen = np.random.default_rng(0)
    with tempfile.TemporaryFile() as f:
        for start in range(0, rows, 1024):  # written in chunks: the table is never resident as a whole
            f.write(gen.integers(-127, 128, (min(1024, rows - start), cols), dtype=np.int8).tobytes())
        f.flush()
        return np.memmap(f, dtype=np.int8, mode="r", shape=(rows, cols))


def decoder_file(layers: int, max_len: int, shape: dict | None = None) -> Path:
    """The random-weight decoder (build_decoder) saved as a decoder file, as llama.cpp's side writes its GGUF once:
    written by a child process (the build's memory is not the measured process's) and cached beside the tuning file,
    keyed by what it depends on."""
    from . import __version__
    from .kernels import LAYOUT_VERSION

    key = json.dumps([layers, max_len, {**CONFIG, **(shape or {})}, LAYOUT_VERSION, __version__], sort_keys=True)
    path = cache_path().with_name(f"tinyllama_decoder_{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors")
    if not path.is_file():
        cmd = python_module_command("bitnet_fast.tinyllama", "--write-decoder", str(path), "--layers", str(layers),
                                    "--max-len", str(max_len), *(["--shape", json.dumps(shape)] if shape else []))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"writing the decoder file failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return path


def _warm_kernels(path: Path) -> None:
    """Run a few tokens of the decoder file in a child, so the Numba cache holds the decode kernels: compiling them
    in the measuring process would put the compiler's memory into the RSS compared with llama.cpp's (1.37x instead
    of 1.05x on a cold cache)."""
    proc = subprocess.run(python_module_command("bitnet_fast.tinyllama", "--warm-kernels", str(path)),
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"warming the decode kernels failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def measure_decoder(layers: int, prefill: int, decode: int, reps: int = 1, shape: dict | None = None) -> dict:
    """Load the PackedDecoder variant here from its file (decoder_file: mapped, as llama.cpp maps its GGUF) and
    time, `reps` times, a prefill of `prefill` tokens and `decode` single-token steps (medians reported, all runs
    listed); the RSS it adds counts from this process after importing torch and bitnet_fast."""
    import psutil

    from .decoder_file import load_decoder

    path = decoder_file(layers, prefill + decode + 8, shape)
    _warm_kernels(path)
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    dec = load_decoder(path)
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, dec.config.vocab_size, (prefill,), generator=torch.Generator().manual_seed(0)).tolist()
    dec.forward(ids[:8])  # warm-up: kernels loaded for both paths
    dec.forward(ids[8:9])
    def greedy(n: int) -> None:
        tok = int(dec.forward([ids[-1]]).argmax())
        for _ in range(n):
            tok = int(dec.forward([tok]).argmax())

    runs = []
    for _ in range(reps):
        dec.reset()
        prefill_s = _timed(lambda: dec.forward(ids))
        decode_s = _timed(lambda: greedy(decode)) * decode / (decode + 1)  # the first step follows the prompt
        runs.append({"prefill_tokens_per_sec": prefill / prefill_s, "decode_tokens_per_sec": decode / decode_s})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {
        "key": "decoder", "name": VARIANTS["decoder"], "layers": layers, "prefill_tokens": prefill,
        "prefill_seconds": prefill / med["prefill_tokens_per_sec"], "decode_tokens": decode,
        "decode_seconds": decode / med["decode_tokens_per_sec"], **med, "runs": runs,
        "param_bytes": dec.nbytes, "rss_before_bytes": rss0, "rss_after_load_bytes": psutil.Process().memory_info().rss,
        "peak_rss_bytes": peak_rss_bytes(), "load_seconds": load_s, "file_bytes": path.stat().st_size,
        "torch_threads": torch.get_num_threads(),
    }


def build(variant: str, layers: int) -> torch.nn.Module:
    """A random-weight TinyLlama with `layers` decoder layers; `bitnet` packs every decoder projection (i2)."""
    if variant not in VARIANTS or variant == "decoder":
        raise ValueError(f"variant={variant!r}; use one of {sorted(VARIANTS)}")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**CONFIG, "num_hidden_layers": layers})
    if variant != "bitnet":
        return LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16 if variant == "bf16" else torch.float32).eval()
    from .nn import convert, materialize, meta_parameters

    with meta_parameters():  # no fp32 model: projections are initialised and packed one at a time
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.float32)
    convert(model, pack=True)  # every nn.Linear but lm_head; embeddings + lm_head stay fp, as in BitNet
    return materialize(model, model._init_weights).eval()  # embeddings, norms, head: as HF initialises them


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor the model holds (parameters, buffers, packed weights), counted once."""
    seen: dict[int, int] = {}
    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_variant(variant: str, layers: int, prefill: int, decode: int) -> dict:
    """Build one variant in this process and time a prefill of `prefill` tokens and `decode` M=1 KV-cache steps."""
    import psutil

    if variant == "decoder":
        return measure_decoder(layers, prefill, decode)

    t0 = time.perf_counter()
    model = build(variant, layers)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss_load = psutil.Process().memory_info().rss
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, prefill), generator=gen)  # (1, T)
    with torch.inference_mode():
        # Warm-up: compile kernels on both the GEMM (prefill) and the GEMV (decode) paths.
        out = model(ids[:, : min(prefill, 40)], use_cache=True)
        model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        state: dict = {}

        def run_prefill() -> None:
            state["out"] = model(ids, use_cache=True)

        prefill_s = _timed(run_prefill)
        cache, nxt = state["out"].past_key_values, state["out"].logits[:, -1:].argmax(-1)  # (1, 1)

        def run_decode() -> None:
            nonlocal cache, nxt
            for _ in range(decode):
                o = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)

        decode_s = _timed(run_decode)
    return {
        "key": variant, "name": VARIANTS[variant], "layers": layers,
        "prefill_tokens": prefill, "prefill_seconds": prefill_s, "prefill_tokens_per_sec": prefill / prefill_s,
        "decode_tokens": decode, "decode_seconds": decode_s, "decode_tokens_per_sec": decode / decode_s,
        "param_bytes": parameter_bytes(model), "rss_after_load_bytes": rss_load,
        "peak_rss_bytes": peak_rss_bytes(), "build_seconds": build_s,
        "torch_threads": torch.get_num_threads(),
    }


def cache_path() -> Path:
    """Cached measurements live next to the kernel tuning file (honours $BITNET_FAST_TUNING)."""
    from .kernels import tuning

    return tuning.path().with_name("tinyllama_bench.json")


def _cache_key(quick: bool, sizes: dict) -> dict:
    """What the measurements depend on: machine, versions, tuning, and whether llama.cpp's peer can be run."""
    import importlib.util

    from . import __version__, decode, nn, peers
    from .kernels import numba_cache, tuning

    m = machine_info()
    exe = peers.find_llama_bench()
    # what the variants run: every kernel source (the hash that keys the Numba cache) and the Python engines
    code = hashlib.sha256(numba_cache.sources_hash().encode()
                          + b"".join(Path(mod.__file__).read_bytes() for mod in (decode, nn, peers)))
    return {"quick": quick, **sizes, "cpu": m["cpu"], "isa": m["isa"], "threads": m["torch_threads"],
            "torch": torch.__version__, "bitnet_fast": __version__, "tuning": tuning.load(),
            "llama_bench": str(exe) if exe else None, "gguf": importlib.util.find_spec("gguf") is not None,
            "code": code.hexdigest()[:16]}  # a change to the engines makes numbers measured before it stale


def measure_llamacpp(layers: int, prefill: int, decode: int, echo: Callable[[str], None] = print) -> dict:
    """llama.cpp (llama-bench, TQ2_0 projections, Q8_0 embedding and head: the class of the decoder's int8 head) on
    the same shape, token counts and thread count as the decoder variant; peers.measure's result. A peer that is
    absent or fails is reported (available False, reason), never fatal: it is a comparison, not our measurement."""
    from . import peers
    from .kernels import cpu

    shape = peers.Shape(CONFIG["hidden_size"], layers, CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"],
                        CONFIG["intermediate_size"], CONFIG["vocab_size"])
    try:
        return peers.measure(shape, prefill, decode, threads=cpu.threads(1 << 30), echo=echo)
    except (RuntimeError, ValueError, OSError) as e:
        return {"available": False, "reason": f"llama-bench failed: {e}"}


def compare_lines(result: dict) -> list[str]:
    """Plain-text lines: the decoder variant next to llama.cpp (ratios), or why llama.cpp's numbers are absent."""
    ours = next((v for v in result.get("variants", []) if v["key"] == "decoder"), None)
    peer = result.get("llama_cpp")
    if ours is None or peer is None:
        return []
    lines = [f"bitnet-fast PackedDecoder: decode {ours['decode_tokens_per_sec']:.1f} tok/s, prefill "
             f"{ours['prefill_tokens_per_sec']:.1f} tok/s ({ours['prefill_tokens']} tokens), RSS added "
             f"{(ours['peak_rss_bytes'] - ours['rss_before_bytes']) / 2**20:.0f} MiB"]
    if not peer["available"]:
        return [*lines, f"llama.cpp: {peer['reason']}"]
    pp, tg = f"pp{peer['n_prompt']}", f"tg{peer['n_gen']}"
    return [*lines,
            f"llama.cpp {peer['build_commit']} ({peer['weights'].upper()} + {peer['head'].upper()} head): decode "
            f"{peer[tg + '_tok_s']:.1f} tok/s, prefill {peer[pp + '_tok_s']:.1f} tok/s, peak RSS "
            f"{peer['peak_rss_bytes'] / 2**20:.0f} MiB",
            f"ours / llama.cpp: decode {ours['decode_tokens_per_sec'] / peer[tg + '_tok_s']:.2f}x, prefill "
            f"{ours['prefill_tokens_per_sec'] / peer[pp + '_tok_s']:.2f}x, memory (our RSS added / their peak RSS) "
            f"{(ours['peak_rss_bytes'] - ours['rss_before_bytes']) / peer['peak_rss_bytes']:.2f}x"]


def measure(quick: bool = False, remeasure: bool = False, variants: tuple[str, ...] = tuple(VARIANTS),
            echo: Callable[[str], None] = print, layers: int | None = None) -> dict:
    """Every variant in its own subprocess (so peak RSS is per variant), and llama.cpp next to the decoder variant
    when its llama-bench is built (tinyllama.measure_llamacpp); reuse the cached result when it matches."""
    sizes = {**(QUICK if quick else FULL), **({"layers": layers} if layers else {})}
    key = _cache_key(quick, sizes) | {"variants": list(variants)}
    path = cache_path()
    if not remeasure and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                echo(f"tinyllama: reusing measurements cached in {path} (--remeasure to redo)")
                return {**cached["result"], "cached": True}
        except (OSError, ValueError, AttributeError):
            echo(f"tinyllama: ignoring unreadable cache {path}")
    results = []
    for i, v in enumerate(variants, 1):
        echo(f"tinyllama [{i}/{len(variants)}] {VARIANTS[v]}: {sizes['layers']} layers, prefill {sizes['prefill']}, "
             f"decode {sizes['decode']} ...")
        cmd = python_module_command("bitnet_fast.tinyllama", "--variant", v, "--layers", str(sizes["layers"]),
                                    "--prefill", str(sizes["prefill"]), "--decode", str(sizes["decode"]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"TinyLlama {v} measurement failed (exit {proc.returncode}): {tail}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        echo(f"    decode {r['decode_tokens_per_sec']:.2f} tok/s, prefill {r['prefill_tokens_per_sec']:.1f} tok/s, "
             f"params {r['param_bytes'] / 2**20:.0f} MiB, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    peer = None
    if "decoder" in variants:
        peer = measure_llamacpp(sizes["layers"], sizes["prefill"], sizes["decode"], echo)
        echo("    " + "\n    ".join(compare_lines({"variants": results, "llama_cpp": peer})[1:]))
    result = {
        "config": {**CONFIG, "num_hidden_layers": sizes["layers"]}, "quick": sizes["layers"] < FULL["layers"],
        "layers": sizes["layers"], "total_layers": FULL["layers"], "variants": results, "llama_cpp": peer,
        "machine": machine_info(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python -m bitnet_fast.tinyllama" + (" --quick" if quick else ""),
    }
    write_json(path, {"key": key, "result": result}, indent=2)
    return {**result, "cached": False}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="measure one variant here and print its JSON")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prefill", type=int, default=FULL["prefill"])
    ap.add_argument("--decode", type=int, default=FULL["decode"])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['layers']} layers: fast, NOT TinyLlama throughput")
    ap.add_argument("--remeasure", action="store_true", help="ignore the cache")
    ap.add_argument("--reps", type=int, default=1, help="decoder variant: timed repetitions (medians reported)")
    ap.add_argument("--shape", type=json.loads, default=None,
                    help='decoder variant: JSON overrides of CONFIG, e.g. \'{"hidden_size": 4096}\'')
    ap.add_argument("--write-decoder", metavar="PATH", help="save the random-weight decoder (--layers, --max-len, "
                    "--shape) to PATH and exit (what the decoder variant loads)")
    ap.add_argument("--max-len", type=int, default=FULL["prefill"] + FULL["decode"] + 8)
    ap.add_argument("--warm-kernels", metavar="PATH", help="run a few tokens of the decoder file at PATH and exit "
                    "(fills the Numba cache before the decoder variant measures)")
    a = ap.parse_args(argv)
    if a.warm_kernels:
        from .decoder_file import load_decoder

        dec = load_decoder(a.warm_kernels)
        dec.forward(list(range(8)))  # a prefill (GEMM tiles) and a decode step (GEMV), as measure_decoder warms up
        dec.forward([8])
    elif a.write_decoder:
        from .decoder_file import save_decoder

        save_decoder(build_decoder(a.layers or FULL["layers"], a.max_len, a.shape), a.write_decoder)
    elif a.variant == "decoder":
        print(json.dumps(measure_decoder(a.layers or FULL["layers"], a.prefill, a.decode, a.reps, a.shape)))
    elif a.variant:
        print(json.dumps(measure_variant(a.variant, a.layers or FULL["layers"], a.prefill, a.decode)))
    else:
        print(json.dumps(measure(quick=a.quick, remeasure=a.remeasure, layers=a.layers,
                                 echo=lambda m: print(m, file=sys.stderr)), indent=2))


if __name__ == "__main__":
    main()
