"""Training report: read `bitnet-fast train` run dirs and write one self-contained HTML file (inline SVG) + JSON.

No JavaScript, no CDN, no plotting library: the charts are SVG strings (charts.py), so the file opens anywhere
and diffs as text. Bad input (missing dir, no report.json, corrupt JSON) raises `ReportError` with one line.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .charts import bar_chart, line_chart
from .plumbing import atomic_write, describe_machine, fmt, write_json

COLORS = {"bitnet": "#d9480f", "fp": "#1c7ed6"}
PALETTE = ["#2b8a3e", "#862e9c", "#e67700", "#0b7285", "#5c940d", "#c2255c"]
REQUIRED = ("model", "epochs")
RATIO_KEYS = ("final_valid_ppl", "final_valid_word_ppl", "final_test_ppl", "final_test_word_ppl", "mean_tokens_per_sec",
              "total_seconds", "peak_rss_bytes")

# Published figures we quote next to our measurements; never mixed with them.
PUBLISHED = [
    {"what": "BitNet b1.58 3B vs LLaMA 3B (GPU, FasterTransformer): memory", "value": "2.22 GB vs 7.89 GB (3.55x less)",
     "source": "Ma et al. 2024, The Era of 1-bit LLMs, arXiv:2402.17764, Table 1"},
    {"what": "BitNet b1.58 3B vs LLaMA 3B: latency", "value": "1.87 ms vs 5.07 ms (2.71x faster)",
     "source": "arXiv:2402.17764, Table 1"},
    {"what": "BitNet b1.58 3B vs LLaMA 3B: perplexity", "value": "9.91 vs 10.04",
     "source": "arXiv:2402.17764, Table 1"},
    {"what": "bitnet.cpp vs llama.cpp fp16 on x86 CPUs: speedup", "value": "2.37x to 6.17x",
     "source": "Wang et al. 2024, 1-bit AI Infra, arXiv:2410.16144 / microsoft/BitNet README"},
    {"what": "llama.cpp ternary formats: bits per weight", "value": "TQ1_0 1.69 bpw, TQ2_0 2.06 bpw",
     "source": "llama.cpp PR #8151 (ggml-quants TQ1_0/TQ2_0)"},
]


class ReportError(ValueError):
    """Bad report input: the message is one line that says what is wrong and how to fix it."""


@dataclass
class Run:
    """One training run: its report.json and the (step, train loss) curve from its metrics log."""

    label: str
    path: Path
    report: dict
    steps: list[tuple[float, float]] = field(default_factory=list)

    @property
    def model(self) -> str:
        return str(self.report.get("model", "?"))


# ------------------------------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        msg = f"{path}: not valid JSON ({e.msg}, line {e.lineno}); was the run interrupted while writing it?"
        raise ReportError(msg) from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_steps(run_dir: Path) -> list[tuple[float, float]]:
    """(step, train loss) from the run's metrics JSONL ("step" events); a truncated last line (killed run) is
    skipped and a step logged twice (resumed run) keeps its last value."""
    points: dict[float, float] = {}
    for log in sorted(run_dir.glob("*.jsonl")):
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    continue
                raise ReportError(f"{log}: line {i + 1} is not valid JSON ({e.msg}); fix or delete that line") from None
            if not isinstance(rec, dict) or rec.get("event", "step") != "step":
                continue
            loss, step = rec.get("loss", rec.get("train_loss")), rec.get("step")
            if isinstance(loss, (int, float)) and isinstance(step, (int, float)) and math.isfinite(loss):
                points[float(step)] = float(loss)
    return sorted(points.items())


def _load_one(run_dir: Path) -> Run:
    report = _read_json(run_dir / "report.json")
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        where = run_dir / "report.json"
        raise ReportError(f"{where}: missing {missing}; is it a report written by `bitnet-fast train`?")
    if not isinstance(report["epochs"], list) or not all(isinstance(e, dict) for e in report["epochs"]):
        raise ReportError(f"{run_dir / 'report.json'}: 'epochs' must be a list of objects")
    return Run(label="", path=run_dir, report=report, steps=_read_steps(run_dir))


def load_runs(dirs: list[str | Path]) -> list[Run]:
    """Every run under `dirs`: a dir with report.json, or a `--model both` dir holding bitnet/ and fp/ run dirs."""
    if not dirs:
        raise ReportError("no run dirs given; pass the directories written by `bitnet-fast train`")
    runs: list[Run] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory; pass a run dir written by `bitnet-fast train`")
        if (d / "report.json").is_file():
            runs.append(_load_one(d))
            continue
        subs = sorted(s for s in d.iterdir() if (s / "report.json").is_file())
        if not subs:
            raise ReportError(f"{d}: no report.json here or in its subdirs (bitnet/, fp/); did training finish?")
        runs.extend(_load_one(s) for s in subs)
    for run in runs:
        base = f"{run.model} {run.report.get('preset', '')}".strip()
        twins = [r for r in runs if f"{r.model} {r.report.get('preset', '')}".strip() == base]
        run.label = base if len(twins) == 1 else f"{base} ({run.path.parent.name}/{run.path.name})"
    return runs


# ------------------------------------------------------------------------------------------------ numbers
def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def summarize(run: Run) -> dict:
    """The headline numbers of one run (None where the report lacks them)."""
    r, eps = run.report, run.report["epochs"]
    tps = [v for e in eps if (v := _num(e.get("tokens_per_sec"))) is not None]
    secs = [v for e in eps if (v := _num(e.get("seconds"))) is not None]
    last = eps[-1] if eps else {}
    return {
        "label": run.label, "dir": str(run.path), "model": run.model, "preset": r.get("preset"),
        "parameters": r.get("parameters"), "epochs": len(eps),
        "initial_valid_ppl": _num(r.get("initial_valid_ppl")),
        "final_valid_ppl": _num(r.get("final_valid_ppl", last.get("valid_ppl"))),
        "final_valid_word_ppl": _num(r.get("final_valid_word_ppl", last.get("valid_word_ppl"))),
        "final_test_ppl": _num(r.get("final_test_ppl")),  # only when the data has a test split
        "final_test_word_ppl": _num(r.get("final_test_word_ppl")),
        "mean_tokens_per_sec": sum(tps) / len(tps) if tps else None,
        "total_seconds": sum(secs) if secs else None,
        "peak_rss_bytes": _num(r.get("peak_rss_bytes")),
        "status": f"interrupted at step {r.get('steps', '?')}" if r.get("interrupted") else "complete",
    }


def compare(summaries: list[dict]) -> list[dict]:
    """BitNet / fp ratios for every preset that has both."""
    out = []
    for preset in sorted({str(s["preset"]) for s in summaries}):
        b = next((s for s in summaries if str(s["preset"]) == preset and s["model"] == "bitnet"), None)
        f = next((s for s in summaries if str(s["preset"]) == preset and s["model"] == "fp"), None)
        if not (b and f):
            continue
        row = {"preset": preset}
        for key in RATIO_KEYS:
            row[f"{key}_bitnet_over_fp"] = b[key] / f[key] if b[key] and f[key] else None
        out.append(row)
    return out


def build_report(runs: list[Run], tinyllama: dict | None = None) -> dict:
    """Everything the HTML shows, as plain JSON."""
    summaries = [summarize(r) for r in runs]
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": [{**s, "epochs_detail": r.report["epochs"], "train_loss_steps": r.steps}
                 for s, r in zip(summaries, runs, strict=True)],
        "comparison": compare(summaries),
        "tinyllama": tinyllama,
        "published": PUBLISHED,
    }


# --------------------------------------------------------------------------------------------------- HTML
CSS = """body{font:14px/1.45 system-ui,sans-serif;max-width:1180px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:24px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #e4e4e4}.t{font-weight:600;text-anchor:middle;font-size:13px}
.yl{text-anchor:end;font-size:11px;fill:#444}.xl{text-anchor:middle;font-size:11px;fill:#444}
.al{text-anchor:middle;font-size:12px;fill:#222}.lg,.v{font-size:11px;fill:#222}.g{stroke:#eee}
.note{color:#666}.warn{background:#fff4e6;border:1px solid #ffa94d;padding:6px 10px}
code{background:#f4f4f4;padding:1px 4px}table.text td,table.text th{text-align:left}"""


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _colors(runs: list[dict]) -> list[str]:
    seen: set[str] = set()
    out, extra = [], iter(PALETTE * 4)
    for r in runs:
        first = r["model"] in COLORS and r["model"] not in seen
        seen.add(r["model"])
        out.append(COLORS[r["model"]] if first else next(extra))
    return out


def _epoch_series(runs: list[dict], colors: list[str], key: str, initial: str | None = None) -> list[dict]:
    """One series per run of epochs_detail[key]; `initial` names a run field plotted at epoch 0."""
    out = []
    for r, c in zip(runs, colors, strict=True):
        pts = [(e["epoch"], e[key]) for e in r["epochs_detail"]
               if _num(e.get(key)) is not None and _num(e.get("epoch")) is not None]
        if initial and r.get(initial) is not None:
            pts.insert(0, (0, r[initial]))
        out.append({"label": r["label"], "color": c, "points": pts})
    return out


def _training_html(rep: dict) -> str:
    runs = rep["runs"]
    colors = _colors(runs)
    pairs = list(zip(runs, colors, strict=True))
    rows = [[r["label"], r["status"], r["preset"], fmt(r["parameters"]), r["epochs"], fmt(r["initial_valid_ppl"]),
             fmt(r["final_valid_ppl"]), fmt(r["final_valid_word_ppl"]), fmt(r["final_test_ppl"]),
             fmt(r["final_test_word_ppl"]), fmt(r["mean_tokens_per_sec"]),
             fmt(r["total_seconds"], "s"), fmt(r["peak_rss_bytes"], "B")] for r in runs]
    parts = ["<h2>Training runs</h2>",
             _table(["run", "status", "preset", "params", "epochs", "initial valid ppl", "final valid ppl",
                     "final word ppl", "test ppl", "test word ppl", "tokens/s (mean)", "train time", "peak RSS"], rows)]
    if rep["comparison"]:
        parts += ["<h3>BitNet / fp ratios (same preset)</h3>",
                  _table(["preset", "valid ppl", "word ppl", "test ppl", "test word ppl", "tokens/s", "train time",
                          "peak RSS"],
                         [[c["preset"], *(f"{c[k + '_bitnet_over_fp']:.3f}x" if c[k + "_bitnet_over_fp"] else "—"
                                          for k in RATIO_KEYS)] for c in rep["comparison"]])]
    step_series = [{"label": r["label"], "color": c, "points": r["train_loss_steps"]} for r, c in pairs]
    if any(s["points"] for s in step_series):
        loss = line_chart("Training loss", step_series, "step", "train loss")
    else:
        loss = line_chart("Training loss (per epoch)", _epoch_series(runs, colors, "train_loss"), "epoch", "train loss")
    charts = [
        loss,
        line_chart("Validation perplexity (epoch 0 = before training)",
                   _epoch_series(runs, colors, "valid_ppl", "initial_valid_ppl"), "epoch", "valid ppl", logy=True),
        line_chart("Training throughput", _epoch_series(runs, colors, "tokens_per_sec"), "epoch", "tokens / s",
                   zero=True),
        line_chart("Time per epoch", _epoch_series(runs, colors, "seconds"), "epoch", "seconds", zero=True),
        bar_chart("Peak memory (RSS)", [(r["label"], r["peak_rss_bytes"], c) for r, c in pairs], "B"),
        bar_chart("Mean training tokens / s", [(r["label"], r["mean_tokens_per_sec"], c) for r, c in pairs]),
    ]
    return "\n".join([*parts, '<div class="grid">', *charts, "</div>"])


def _tinyllama_html(tl: dict) -> str:
    c = tl["config"]
    parts = ["<h2>TinyLlama-1.1B architecture: BitNet-packed vs fp32 vs bf16 (measured here)</h2>",
             f'<p>hidden {c["hidden_size"]}, {c["num_hidden_layers"]} layers, {c["num_attention_heads"]} heads / '
             f'{c["num_key_value_heads"]} KV heads, FFN {c["intermediate_size"]}, vocab {c["vocab_size"]}; random '
             f"weights (speed and memory do not depend on their values). Measured {html.escape(tl['measured_at'])} "
             f"on {html.escape(describe_machine(tl['machine']))}, by "
             f"<code>{html.escape(tl['command'])}</code>{' (cached)' if tl.get('cached') else ''}.</p>"]
    load, cpus = tl["machine"].get("load_average_1m"), tl["machine"].get("torch_threads") or 1
    if load is not None and load > cpus:
        parts.append(f'<p class="warn">The machine was busy while measuring (1-min load average {load:.1f} with '
                     f"{cpus} threads): these numbers are pessimistic, and ratios between variants are only "
                     "indicative.</p>")
    if tl["quick"]:
        parts.append(f'<p class="warn">QUICK MODE: only {tl["layers"]} of {tl["total_layers"]} decoder layers were '
                     "built; these numbers are not TinyLlama-1.1B throughput.</p>")
    vs = tl["variants"]
    col = {"bitnet": COLORS["bitnet"], "fp32": COLORS["fp"], "bf16": "#74c0fc"}
    rows = [[v["name"], fmt(v["decode_tokens_per_sec"]), fmt(v["prefill_tokens_per_sec"]), fmt(v["param_bytes"], "B"),
             fmt(v["rss_after_load_bytes"], "B"), fmt(v["peak_rss_bytes"], "B")] for v in vs]
    parts.append(_table(["variant", f"decode tok/s (M=1, {vs[0]['decode_tokens']} steps, KV cache)",
                         f"prefill tok/s ({vs[0]['prefill_tokens']} tokens)", "parameter bytes", "RSS after load",
                         "peak RSS"], rows))
    base = next((v for v in vs if v["key"] == "fp32"), None)
    if base:
        ratio = [[v["name"], *(f"{v[k] / base[k]:.2f}x" if v.get(k) and base.get(k) else "—"
                               for k in ("decode_tokens_per_sec", "prefill_tokens_per_sec", "param_bytes"))]
                 for v in vs if v is not base]
        parts += ["<p>Relative to fp32 (same process order, same machine):</p>",
                  _table(["variant", "decode speed", "prefill speed", "parameter bytes"], ratio)]
    parts.append(_llamacpp_html(tl))
    bars = lambda k, u="": [(v["name"], _num(v.get(k)), col.get(v["key"], "#888")) for v in vs]  # noqa: E731
    parts += ['<div class="grid">', bar_chart("Decode tokens / s (M=1)", bars("decode_tokens_per_sec")),
              bar_chart("Prefill tokens / s", bars("prefill_tokens_per_sec")),
              bar_chart("Parameter bytes", bars("param_bytes"), "B"),
              bar_chart("Peak RSS", bars("peak_rss_bytes"), "B"),
              "</div>"]
    return "\n".join(parts)


def _llamacpp_html(tl: dict) -> str:
    """The decoder variant next to llama.cpp's llama-bench on the same shape (tinyllama.measure_llamacpp), or one
    line saying why llama.cpp's numbers are absent; empty when the decoder variant was not measured."""
    ours = next((v for v in tl["variants"] if v["key"] == "decoder"), None)
    peer = tl.get("llama_cpp")
    if ours is None or peer is None:
        return ""
    head = "<h3>Whole-model decode: bitnet-fast PackedDecoder vs llama.cpp (same shape, same threads)</h3>"
    if not peer["available"]:
        return f'{head}<p class="note">{html.escape(peer["reason"])}</p>'
    pp, tg = f"pp{peer['n_prompt']}", f"tg{peer['n_gen']}"
    added = ours["peak_rss_bytes"] - ours["rss_before_bytes"]
    rows = [[ours["name"], fmt(ours["decode_tokens_per_sec"]), fmt(ours["prefill_tokens_per_sec"]),
             f"{fmt(added, 'B')} added to the Python process"],
            [f"llama.cpp {peer['build_commit']} llama-bench, {peer['weights'].upper()} projections, "
             f"{peer['head'].upper()} embedding + head", f"{fmt(peer[tg + '_tok_s'])} ± {fmt(peer[tg + '_std'])}",
             f"{fmt(peer[pp + '_tok_s'])} ± {fmt(peer[pp + '_std'])}", f"{fmt(peer['peak_rss_bytes'], 'B')} peak"],
            ["ours / llama.cpp", f"{ours['decode_tokens_per_sec'] / peer[tg + '_tok_s']:.2f}x",
             f"{ours['prefill_tokens_per_sec'] / peer[pp + '_tok_s']:.2f}x", f"{added / peer['peak_rss_bytes']:.2f}x"]]
    return "\n".join([head, _table(["engine", f"decode tok/s ({peer['n_gen']} tokens)",
                                     f"prefill tok/s ({peer['n_prompt']} tokens)", "memory"], rows),
                       f'<p class="note">llama.cpp: <code>{html.escape(peer["command"])}</code>; mean ± std of its '
                       "repetitions. Memory: the RSS our model adds to a process that has imported torch and "
                       "bitnet_fast, against llama-bench's whole-process peak RSS (its weights are mmapped).</p>"])


def render_html(rep: dict) -> str:
    """The whole report as one HTML string (inline CSS + SVG, nothing fetched)."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>bitnet-fast report</title>',
             f"<style>{CSS}</style></head><body>", "<h1>bitnet-fast report</h1>",
             f'<p class="note">Generated {html.escape(rep["generated_at"])} from '
             f'{html.escape(", ".join(sorted({r["dir"] for r in rep["runs"]})))}.</p>']
    if rep["runs"]:
        parts.append(_training_html(rep))
    if rep.get("tinyllama"):
        parts.append(_tinyllama_html(rep["tinyllama"]))
    parts += ["<h2>Published figures (not measured here)</h2>",
              _table(["what", "published value", "source"], [[p["what"], p["value"], p["source"]] for p in PUBLISHED],
                     "text"),
              "</body></html>"]
    return "\n".join(parts)


def write_report(dirs: list[str | Path], out: str | Path, tinyllama: dict | None = None) -> tuple[Path, Path]:
    """Load the runs in `dirs`, write `out` (HTML) and `out` with a .json suffix; return both paths."""
    out = _check_out(out)
    rep = build_report(load_runs(dirs), tinyllama)
    atomic_write(out, render_html(rep))
    return out, write_json(out.with_suffix(".json"), rep, indent=2)


def _check_out(out: str | Path) -> Path:
    """--out as a path for the HTML whose JSON twin (.json beside it) is a different file."""
    out = Path(out)
    if out.is_dir():
        raise ReportError(f"--out {out} is a directory; give a file path such as {out / 'report.html'}")
    if out.suffix.lower() == ".json":
        raise ReportError(f"--out {out} would be overwritten by the report's JSON; give the HTML path, such as "
                          f"{out.with_suffix('.html')} (the JSON goes beside it)")
    return out


def make_report(dirs: list[str | Path], out: str | Path, tinyllama: bool = True, quick: bool = False,
                remeasure: bool = False, echo=print) -> tuple[Path, Path]:
    """What `bitnet-fast report` does: check the run dirs first (fast), then measure (or reuse) TinyLlama, then
    write the HTML and JSON. Failures are ReportError with one line."""
    _check_out(out)
    load_runs(dirs)
    tl = None
    if tinyllama:
        from . import tinyllama as tl_bench

        try:
            tl = tl_bench.measure(quick=quick, remeasure=remeasure, echo=echo)
        except RuntimeError as e:
            raise ReportError(str(e)) from None
    return write_report(dirs, out, tl)
