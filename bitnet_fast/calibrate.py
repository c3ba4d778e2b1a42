"""Calibrate this machine: time the kernels per backend over every preset's linear shapes, tune the CPU kernel
parameters (threads, tiles, GEMV/GEMM cut-over) and cache the best, then measure model tokens/sec.

The tuned parameters go to `save_tuning()`, the file the Numba kernels read on first use (`kernels.tuning.path()`;
the kernels only read it, so the kernels layer needs nothing from the rest of the package). Model
throughput (decode, prefill, training) is measured per preset for BitNet and its fp twin, and turned into a
batch size per training step for a target step time: the numbers a worker needs to size its tasks. Each model row
also carries `per_rank` (sizing.py): the per-rank batch and gradient accumulation for a wished global batch at a
world size, and the steps per checkpoint interval, which `bitnet-fast train --batch-from` reads.
Times are best-of-n wall clock (the least disturbed run on a shared machine).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import kernels, tinyllama
from .kernels import tuning
from .model import LM, PRESETS, build_model, count_parameters, preset_config
from .plumbing import describe_machine, fmt, machine_info, write_json
from .sizing import CALIBRATION_SCHEMA, check_positive, per_rank
from .tinyllama import CONFIG as TINYLLAMA

SCHEMA = CALIBRATION_SCHEMA
QUICK_PRESETS = ("tiny", "small")
Echo = Callable[[str], None]


def save_tuning(params: dict[str, Any]) -> Path:
    """Validate the CPU kernel parameters and write them, with this machine's capabilities (the kernels apply the
    file only on a machine with the same ones), atomically to the tuning file; returns its path."""
    return write_json(tuning.path(), {"capabilities": tuning.capabilities(), "params": tuning.validate(params)},
                      indent=2, sort_keys=True)


def linear_shapes(presets: tuple[str, ...], tinyllama: bool) -> dict[str, list[tuple[int, int]]]:
    """Distinct (N, K) = (out, in) of the projections in each preset (and TinyLlama-1.1B)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for name in presets:
        c = preset_config(name)
        out[name] = sorted({(c.n_embd, c.n_embd), (c.hidden, c.n_embd), (c.n_embd, c.hidden)})
    if tinyllama:
        d, f = TINYLLAMA["hidden_size"], TINYLLAMA["intermediate_size"]
        kv = d // TINYLLAMA["num_attention_heads"] * TINYLLAMA["num_key_value_heads"]
        out["tinyllama-1.1b"] = sorted({(d, d), (kv, d), (f, d), (d, f)})
    return out


def available_backends() -> list[str]:
    """numba (if it imports), reference, and triton only where CUDA is present."""
    names = []
    try:
        importlib.import_module("bitnet_fast.kernels.cpu")
        names.append("numba")
    except ImportError:
        pass
    names.append("reference")
    if torch.cuda.is_available():
        names.append("triton")
    return names


@contextmanager
def forced_backend(name: str) -> Iterator[torch.device]:
    """Route kernel calls to backend `name` (via BITNET_FAST_BACKEND); yields the device its tensors live on."""
    old = os.environ.get("BITNET_FAST_BACKEND")
    os.environ["BITNET_FAST_BACKEND"] = name
    try:
        yield torch.device("cuda" if name == "triton" else "cpu")
    finally:
        if old is None:
            del os.environ["BITNET_FAST_BACKEND"]
        else:
            os.environ["BITNET_FAST_BACKEND"] = old


def bench(fn: Callable[[], object], repeats: int, budget_s: float = 0.0, device: torch.device | None = None) -> float:
    """Best-of-n seconds of `fn()` after one warm-up call: at least `repeats` runs, more while within budget_s."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(times) < repeats or (time.perf_counter() < stop and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


# ------------------------------------------------------------------------------------------- kernel timing
def time_kernels(backends: list[str], shapes: dict[str, list[tuple[int, int]]], ms: tuple[int, ...], repeats: int,
                 budget_s: float, echo: Echo) -> list[dict]:
    """BitLinear forward (quantize + int8 x ternary + epilogue) per backend, shape and M."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for backend in backends:
        echo(f"kernels: timing backend {backend} ...")
        with forced_backend(backend) as dev:
            for preset, shape_list in shapes.items():
                for n, k in shape_list:
                    pw = kernels.pack(torch.randn(n, k, generator=gen).to(dev))
                    for m in ms:
                        x = torch.randn(m, k, generator=gen).to(dev)  # (M, K)
                        row = {"backend": backend, "preset": preset, "n": n, "k": k, "m": m}
                        try:
                            t = bench(lambda x=x, pw=pw: kernels.bitlinear(x, pw), repeats, budget_s, dev)
                            row |= {"seconds": t, "gops": 2 * m * n * k / t / 1e9}
                        except Exception as e:  # a broken backend is reported, not fatal to calibration
                            row |= {"seconds": None, "gops": None, "error": f"{type(e).__name__}: {e}"[:300]}
                            echo(f"    {backend} {n}x{k} M={m}: {row['error'][:120]}")
                        rows.append(row)
    return rows


def _stages(space: dict[str, list], prefill_m: int, caps: dict) -> list[tuple[str, list, dict, tuple[int, ...]]]:
    """(parameter, values, fixed overrides, M values that exercise it), in sweep order. Candidates come from the
    capability plan: the int_mm engine is timed only where oneDNN has VNNI (elsewhere it is a plain loop)."""
    packed = {"gemm_impl": "numba"}
    stages = [
        ("threads", space["threads"], {}, (1, prefill_m)),
        ("gemm_min_m", space["gemm_min_m"], packed, (2, 4, 8, 16)),
        ("panel_bytes", space["panel_bytes"], packed, (1, prefill_m)),
    ]
    if caps["isa"] == "avx2":  # only avx2 has the outer-product GEMM tile
        stages.append(("outer_min_rows", space["outer_min_rows"], packed, (prefill_m,)))
    if caps["int_mm_vnni"]:
        stages += [("gemm_impl", space["gemm_impl"], {"gemv_max_m": 0}, (prefill_m,)),
                   ("gemm_tile_n", space["gemm_tile_n"], {"gemv_max_m": 0, "gemm_impl": "int_mm"}, (prefill_m,))]
    return stages


def tune_cpu(shapes: list[tuple[int, int]], prefill_m: int, repeats: int, budget_s: float, echo: Echo) -> dict:
    """Coordinate-descent sweep of tuning.CPU_SEARCH_SPACE on the Numba kernels, starting from the capability
    plan; returns the best and all trials.

    Each stage times the M values its parameter affects, summed over `shapes`, and keeps the fastest value (the
    current one on a tie). With the int_mm engine, the packed/int_mm cut-over is the largest M (from a prefix of
    the candidates) where the packed engine wins. A final interleaved check keeps the start unless the sweep's
    result is faster (tests/test_calibrate.py checks these rules on a scripted cost model).
    """
    from .kernels import cpu

    caps = tuning.capabilities()
    space = dict(tuning.CPU_SEARCH_SPACE)
    space["threads"] = [t for t in space["threads"] if t <= (os.cpu_count() or 1)]
    gen = torch.Generator().manual_seed(1)
    weights = [kernels.pack(torch.randn(n, k, generator=gen)) for n, k in shapes]
    inputs = {m: [torch.randn(m, k, generator=gen) for _, k in shapes] for m in {1, 2, 4, 8, 16, prefill_m,
                                                                               *space["gemv_max_m"]}}
    start = cpu.params()
    best = dict(start)
    trials: list[dict] = []

    def cost(params: dict, ms: tuple[int, ...]) -> float:
        cpu.configure(**params)
        return sum(bench(lambda x=x, w=w: kernels.bitlinear(x, w), repeats, budget_s)
                   for m in ms for x, w in zip(inputs[m], weights, strict=True))

    with forced_backend("numba"):
        cost(start, (1, prefill_m))  # warm-up: thread pool, JIT, caches
        for name, values, fixed, ms in _stages(space, prefill_m, caps):
            if name == "gemm_tile_n" and best["gemm_impl"] != "int_mm":
                continue
            echo(f"tune: {name} over {values} (M={list(ms)}) ...")
            scores = {}
            for v in values:
                scores[v] = cost({**best, **fixed, name: v}, ms)
                trials.append({"param": name, "value": v, "m": list(ms), "seconds": scores[v]})
            best[name] = min(scores, key=lambda v, cur=best[name]: (scores[v], v != cur))  # a tie keeps the value
        if best["gemm_impl"] == "int_mm":
            echo(f"tune: gemv_max_m over {space['gemv_max_m']} (packed vs int_mm per M) ...")
            cut = 0
            for m in sorted(space["gemv_max_m"]):
                packed, int_mm = cost({**best, "gemv_max_m": m}, (m,)), cost({**best, "gemv_max_m": 0}, (m,))
                trials.append({"param": "gemv_max_m", "value": m, "m": [m], "packed_seconds": packed,
                               "int_mm_seconds": int_mm})
                if packed > int_mm:
                    break
                cut = m
            best["gemv_max_m"] = cut
        # Final check, interleaved so drift hits both alike: never keep a sweep result slower than the start.
        ms = tuple(sorted({1, 8, prefill_m}))
        baseline, tuned = zip(*[(cost(start, ms), cost(best, ms)) for _ in range(3)], strict=True)
        baseline, tuned = min(baseline), min(tuned)
    kept_start = tuned > baseline
    best = dict(start) if kept_start else best
    cpu.configure(**best)
    return {"params": best, "start": start, "plan": tuning.plan(caps), "capabilities": caps, "trials": trials,
            "shapes": [list(s) for s in shapes], "prefill_m": prefill_m, "check_m": list(ms),
            "start_seconds": baseline, "tuned_seconds": tuned, "speedup": baseline / min(tuned, baseline),
            "kept_start": kept_start}


# ----------------------------------------------------------------------------------------- model throughput
@torch.inference_mode()
def _decode(model: LM, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Greedy decode `steps` tokens after `prompt` (1, T) on the model's KV cache: one prompt pass, then M=1
    steps. Returns the new tokens (1, steps) and the seconds spent in the M=1 steps."""
    model.setup_cache(1)
    try:
        tok = model(prompt, pos=0, last_logits=True)[0].argmax(-1)  # (1, 1)
        out, pos = [tok], prompt.shape[1]
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            tok = model(tok, pos=pos, last_logits=True)[0].argmax(-1)
            out.append(tok)
            pos += 1
        return torch.cat(out, dim=1), time.perf_counter() - t0 if steps > 1 else 0.0
    finally:
        model.clear_cache()


def model_throughput(preset: str, linear: str, seq_len: int, batches: tuple[int, int], decode_steps: int,
                     repeats: int, budget_s: float, target_s: float) -> dict:
    """Decode / prefill tokens/sec (packed for BitNet) and training tokens/sec with a batch-size recommendation.

    Training time per step is fitted as t(B) = a + b*B from two batch sizes; the recommended batch is the
    largest B with t(B) <= target_s (at least 1).
    """
    torch.manual_seed(0)
    model = build_model(preset_config(preset, linear=linear))
    cfg, params = model.config, count_parameters(model)
    seq_len = min(seq_len, cfg.max_seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_s = {}
    for b in batches:
        x = torch.randint(0, cfg.vocab_size, (b, seq_len))  # (B, T)

        def train_step(x=x) -> None:
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step_s[b] = bench(train_step, repeats, budget_s)
    (b1, t1), (b2, t2) = sorted(step_s.items())
    slope = (t2 - t1) / (b2 - b1)
    if slope <= 0:  # noise: fall back to a proportional model
        slope, fixed = t2 / b2, 0.0
    else:
        fixed = t1 - slope * b1
    rec_b = max(1, int((target_s - fixed) // slope))
    model.eval()
    if linear == "bitnet":
        from .nn import pack_model

        pack_model(model)
    prompt = torch.randint(0, cfg.vocab_size, (1, seq_len))
    with torch.inference_mode():
        prefill = bench(lambda: model(prompt), repeats, budget_s)
    _decode(model, prompt[:, :8], 2)  # warm-up
    decode = min(_decode(model, prompt[:, :8], decode_steps + 1)[1] for _ in range(repeats))
    return {
        "preset": preset, "linear": linear, "parameters": params, "seq_len": seq_len,
        "decode_tokens_per_sec": decode_steps / decode, "prefill_tokens_per_sec": seq_len / prefill,
        "train_step_seconds": {str(b): t for b, t in step_s.items()},
        "train_tokens_per_sec": max(b * seq_len / t for b, t in step_s.items()),
        "recommended": {"batch_size": rec_b, "seq_len": seq_len, "tokens_per_step": rec_b * seq_len,
                        "predicted_step_seconds": fixed + slope * rec_b, "target_seconds": target_s},
    }


# ---------------------------------------------------------------------------------------------- the command
def calibrate(quick: bool = False, target_seconds: float = 1.0, presets: tuple[str, ...] | None = None,
              seq_len: int | None = None, save: bool = True, echo: Echo = print,
              whole_model: bool | None = None, world_size: int = 1, global_batch: int | None = None,
              target_minutes: float | None = None) -> dict:
    """Run everything and return the full result (see SCHEMA); saves the tuned CPU parameters when `save`.

    `quick` keeps to the tiny/small presets with few repeats (under a minute); `presets` narrows the presets;
    `seq_len` is the training sequence length to size steps for (default 128, as `bitnet-fast train`; quick 64).
    `whole_model` (default: not quick) also times the TinyLlama-shaped PackedDecoder with the tuned kernels, next
    to llama.cpp's llama-bench when it is built (tinyllama.measure; 2 of 22 layers when quick).
    `world_size`, `global_batch` and `target_minutes` are the run each model row's `per_rank` plan is made for
    (sizing.plan_work, at this process's torch threads: one rank's).
    """
    if not target_seconds > 0:
        raise ValueError(f"target_seconds={target_seconds} must be > 0 (the wanted training step time in seconds)")
    check_positive("world_size", world_size, integer=True)
    check_positive("global_batch", global_batch, integer=True)
    check_positive("target_minutes", target_minutes)
    presets = tuple(presets or (QUICK_PRESETS if quick else PRESETS))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"presets={unknown} are not presets; choose from {sorted(PRESETS)}")
    seq_len = seq_len or (64 if quick else 128)
    if seq_len < 8:
        raise ValueError(f"seq_len={seq_len} must be >= 8 (the decode benchmark uses an 8-token prompt)")
    t0 = time.perf_counter()
    say = echo
    echo = lambda msg: say(f"[{time.perf_counter() - t0:5.1f}s] {msg}")  # noqa: E731
    shapes = linear_shapes(presets, tinyllama=not quick)
    prefill_m = 32 if quick else 128
    repeats, budget = (3, 0.02) if quick else (5, 0.2)
    backends = available_backends()
    result: dict[str, Any] = {"schema": SCHEMA, "quick": quick, "presets": list(presets),
                              "target_seconds": target_seconds, "target_minutes": target_minutes,
                              "world_size": world_size, "global_batch": global_batch, "machine": machine_info(),
                              "backends": backends}
    ref_shapes = shapes if quick else {k: v for k, v in shapes.items() if k in (presets[0], "tinyllama-1.1b")}
    result["kernels"] = time_kernels([b for b in backends if b != "reference"], shapes, (1, prefill_m), repeats,
                                     budget, echo)
    result["kernels"] += time_kernels(["reference"], ref_shapes, (1, prefill_m), 1, 0.0, echo)  # slow: best of 1
    if "numba" in backends:
        tune_on = [s for p in (presets[-1:] if quick else [presets[-1], "tinyllama-1.1b"]) for s in shapes[p]]
        result["tuning"] = tune_cpu(tune_on, prefill_m, repeats, budget, echo)
        if save:
            result["tuning"]["path"] = str(save_tuning(result["tuning"]["params"]))
            echo(f"tune: saved {result['tuning']['params']} to {result['tuning']['path']}")
    result["models"] = []
    for preset in presets:
        for linear in ("bitnet", "fp"):
            echo(f"models: {preset}/{linear}: training, prefill and decode ...")
            batches = (1, 4) if preset in QUICK_PRESETS else (1, 2)
            row = model_throughput(preset, linear, seq_len, batches, 4 if quick else 8, 2, 0.1 if quick else 0.0,
                                   target_seconds)
            row["per_rank"] = per_rank(row["train_tokens_per_sec"], torch.get_num_threads(), row["seq_len"],
                                       target_seconds, world_size, global_batch, target_minutes)
            result["models"].append(row)
    if not quick if whole_model is None else whole_model:
        echo("whole model: TinyLlama-1.1B-shaped PackedDecoder, and llama.cpp where built ...")
        try:
            result["whole_model"] = tinyllama.measure(quick=quick, variants=("decoder",), echo=echo)
        except RuntimeError as e:  # the subprocess failed: report it, keep the kernel calibration
            result["whole_model"] = {"error": str(e)}
    result["seconds"] = time.perf_counter() - t0
    return result


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def format_table(r: dict) -> str:
    """The human summary printed by `bitnet-fast calibrate`."""
    m = r["machine"]
    out = [f"machine: {describe_machine(m)}, {m['logical_cpus']} logical CPUs / {m['physical_cores']} cores, "
           f"memory {fmt(m['memory_total_bytes'], 'B')} "
           f"({fmt(m['memory_available_bytes'], 'B')} free){', CUDA ' + m['cuda'] if m['cuda'] else ''}",
           *([f"WARNING: the machine was busy (1-min load average {m['load_average_1m']:.1f} on "
              f"{m['logical_cpus']} CPUs): timings are pessimistic and the tuning reflects that contention"]
             if (m.get("load_average_1m") or 0) > (m["logical_cpus"] or 1) else []),
           f"backends: {', '.join(r['backends'])}{'   (QUICK: tiny/small shapes, few repeats)' if r['quick'] else ''}",
           ""]
    ref = {(k["preset"], k["n"], k["k"], k["m"]): k["seconds"] for k in r["kernels"] if k["backend"] == "reference"}
    rows = []
    for k in r["kernels"]:
        if k["backend"] == "reference":
            continue
        base = ref.get((k["preset"], k["n"], k["k"], k["m"]))
        speed = f"{base / k['seconds']:.1f}x" if base and k["seconds"] else "—"
        rows.append([k["backend"], k["preset"], f"{k['n']}x{k['k']}", k["m"],
                     f"{k['seconds'] * 1e6:.0f}" if k["seconds"] else k.get("error", "error")[:40],
                     f"{k['gops']:.1f}" if k["gops"] else "—", speed])
    out += ["kernel timings (BitLinear forward, best of n):",
            _table(["backend", "preset", "N x K", "M", "us", "GOPS", "vs reference"], rows), ""]
    if "tuning" in r:
        t = r["tuning"]
        rows = [[k, v, t["plan"].get(k), t["start"].get(k)] for k, v in t["params"].items()]
        out += [f"tuned CPU kernel parameters ({t['speedup']:.2f}x vs the starting parameters on the tuning shapes; "
                f"saved to {t.get('path', 'not saved')}):", _table(["param", "tuned", "plan", "was"], rows), ""]
    rows = [[x["preset"], x["linear"], fmt(x["parameters"]), f"{x['decode_tokens_per_sec']:.1f}",
             f"{x['prefill_tokens_per_sec']:.0f}", f"{x['train_tokens_per_sec']:.0f}",
             f"{x['recommended']['batch_size']} x {x['recommended']['seq_len']}",
             x["recommended"]["tokens_per_step"], f"{x['recommended']['predicted_step_seconds']:.2f}"]
            for x in r["models"]]
    out += [f"model throughput (tokens/s) and training step sizing for a {r['target_seconds']:g} s step:",
            _table(["preset", "linear", "params", "decode", "prefill", "train", "batch x seq", "tokens/step",
                    "step s"], rows), ""]
    rows = [[x["preset"], x["linear"], f"{x['per_rank']['tokens_per_sec']:.0f} ({x['per_rank']['threads']})",
             f"{p['batch_size']} x {p['grad_accum']}", f"{p['global_batch']} ({p['world_size']} ranks)",
             f"{p['predicted_step_seconds']:.2f}", p["steps_per_interval"] or "-"]
            for x in r["models"] for p in [x["per_rank"]["plan"]]]
    wish = f"a global batch of {r['global_batch']}" if r["global_batch"] else "no global batch wish"
    every = f"{r['target_minutes']:g} min" if r["target_minutes"] else "no --target-minutes"
    out += [f"work per rank (bitnet-fast train --batch-from; {wish}, {every}):",
            _table(["preset", "linear", "train tok/s (threads)", "batch x accum", "global batch", "step s",
                    "steps/interval"], rows), ""]
    if "whole_model" in r:
        w = r["whole_model"]
        what = (f"{w['layers']} of {w['total_layers']} layers: QUICK, not TinyLlama throughput" if w.get("quick")
                else f"{w.get('layers')} layers") if "error" not in w else "failed"
        out += [f"whole model (TinyLlama-1.1B shape, {what}):",
                *(["  " + line for line in tinyllama.compare_lines(w)] if "error" not in w else [f"  {w['error']}"]),
                ""]
    out += [f"calibration took {r['seconds']:.0f} s"]
    return "\n".join(out)
