"""bitnet-fast report: run dirs -> one self-contained HTML (inline SVG) + JSON; bad input -> one clear line."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from bitnet_fast import charts, report, tinyllama
from bitnet_fast.cli import main

VOID = {"meta", "br", "img", "input", "link", "hr", "rect", "line", "circle", "polyline", "path"}


def _run_dir(path: Path, model: str, ppl: list[float], tps: float, rss: int, steps: int = 6) -> Path:
    """A run dir as `bitnet-fast train` writes it: report.json + a metrics JSONL log."""
    path.mkdir(parents=True)
    epochs = [{"epoch": i + 1, "train_loss": 6.0 - i, "valid_ppl": p, "valid_word_ppl": p * 1.4,
               "tokens_per_sec": tps + i, "seconds": 10.0 + i} for i, p in enumerate(ppl)]
    rep = {"model": model, "preset": "tiny", "parameters": 625_000, "initial_valid_ppl": 8000.0,
           "final_valid_ppl": ppl[-1], "peak_rss_bytes": rss, "epochs": epochs}
    (path / "report.json").write_text(json.dumps(rep))
    lines = [json.dumps({"event": "step", "step": s, "epoch": 1, "loss": 7.0 - 0.5 * s, "lr": 1e-3})
             for s in [*range(steps), steps - 1]]  # the last step logged twice, as after a resume
    lines.append(json.dumps({"event": "epoch", **epochs[0], "steps": steps}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 99, "lo')  # killed mid-write
    return path


@pytest.fixture
def both(tmp_path: Path) -> Path:
    """A `--model both` run: DIR/bitnet and DIR/fp."""
    _run_dir(tmp_path / "run" / "bitnet", "bitnet", [900.0, 400.0, 250.0], 1000.0, 300 * 2**20)
    _run_dir(tmp_path / "run" / "fp", "fp", [700.0, 300.0, 200.0], 2000.0, 500 * 2**20)
    return tmp_path / "run"


class _Checker(HTMLParser):
    """Fails on mismatched tags; collects tag names and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.external += [v for k, v in attrs if k in ("src", "href") and v and "://" in v]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def _check_html(text: str) -> _Checker:
    c = _Checker()
    c.feed(text)
    assert c.stack == ["html"] or c.stack == [], f"unclosed tags {c.stack}"
    assert "script" not in c.tags and not c.external, "the report must be self-contained"
    for svg in re.findall(r"<svg .*?</svg>", text, flags=re.S):
        ET.fromstring(svg)  # every chart is well-formed XML
    return c


def test_report_from_both_run_has_charts_numbers_and_ratios(both: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "r.html"
    html_path, json_path = report.write_report([both], out)
    text = html_path.read_text()
    c = _check_html(text)
    assert c.tags.count("svg") == 6
    for title in ("Training loss", "Validation perplexity", "Training throughput", "Time per epoch", "Peak memory"):
        assert title in text
    assert text.count("<polyline") == 2 * 4  # two runs on four line charts (loss per step from the JSONL)
    assert "250" in text and "200" in text and "300.00 MiB" in text and "500.00 MiB" in text
    assert "Published figures" in text and "arXiv:2402.17764" in text
    data = json.loads(json_path.read_text())
    by_model = {r["model"]: r for r in data["runs"]}
    assert by_model["bitnet"]["final_valid_ppl"] == 250.0 and by_model["fp"]["mean_tokens_per_sec"] == 2001.0
    assert len(by_model["bitnet"]["train_loss_steps"]) == 6  # the truncated last line is skipped
    (cmp,) = data["comparison"]
    assert cmp["final_valid_ppl_bitnet_over_fp"] == pytest.approx(1.25)
    assert cmp["peak_rss_bytes_bitnet_over_fp"] == pytest.approx(0.6)
    assert "1.250x" in text


def test_epoch_loss_used_without_metrics_log_and_twins_get_distinct_labels(tmp_path: Path) -> None:
    a = _run_dir(tmp_path / "a", "bitnet", [500.0, 300.0], 100.0, 2**30)
    b = _run_dir(tmp_path / "b", "bitnet", [450.0, 280.0], 90.0, 2**30)
    for d in (a, b):
        (d / "metrics.jsonl").unlink()
    runs = report.load_runs([a, b])
    assert len({r.label for r in runs}) == 2
    text = report.render_html(report.build_report(runs))
    _check_html(text)
    assert "Training loss (per epoch)" in text and "1.00 GiB" in text
    assert report.build_report(runs)["comparison"] == []


def test_interrupted_run_without_epochs_is_reported_as_such(tmp_path: Path) -> None:
    d = _run_dir(tmp_path / "cut", "bitnet", [500.0], 100.0, 2**30)
    rep = json.loads((d / "report.json").read_text())
    rep.update(epochs=[], interrupted=True, steps=7)
    del rep["final_valid_ppl"]
    (d / "report.json").write_text(json.dumps(rep))
    text = report.render_html(report.build_report(report.load_runs([d])))
    _check_html(text)
    assert "interrupted at step 7" in text and "no data" in text
    assert text.count("<polyline") == 2  # loss per step + the initial (epoch 0) perplexity


def test_line_chart_log_axis_and_ticks() -> None:
    svg = charts.line_chart("ppl", [{"label": "x", "color": "#000", "points": [(1, 10.0), (2, 1000.0)]}],
                            "epoch", "ppl", logy=True)
    ET.fromstring(svg)
    assert ">10<" in svg and ">100<" in svg and ">1000<" in svg and "(log)" in svg
    assert charts._ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert "no data" in charts.line_chart("empty", [], "x", "y")


def test_tinyllama_section_rendered_and_quick_is_labelled(both: Path) -> None:
    variants = [{"key": k, "name": tinyllama.VARIANTS[k], "decode_tokens_per_sec": d, "prefill_tokens_per_sec": p,
                 "param_bytes": b, "rss_after_load_bytes": b * 2, "peak_rss_bytes": b * 3, "decode_tokens": 4,
                 "prefill_tokens": 32} for k, d, p, b in (("bitnet", 9.0, 40.0, 600e6), ("fp32", 3.0, 30.0, 4.4e9),
                                                            ("bf16", 2.0, 20.0, 2.2e9))]
    tl = {"config": {**tinyllama.CONFIG, "num_hidden_layers": 2}, "quick": True, "layers": 2, "total_layers": 22,
          "variants": variants, "machine": {"cpu": "test cpu", "arch": "x86_64", "isa": "avx2", "torch_threads": 2},
          "measured_at": "now", "command": "python -m bitnet_fast.tinyllama --quick"}
    text = report.render_html(report.build_report(report.load_runs([both]), tl))
    _check_html(text)
    assert "QUICK MODE: only 2 of 22" in text and "hidden 2048" in text and "5632" in text
    assert "test cpu (x86_64, avx2), 2 torch threads" in text  # the machine is named with its ISA
    assert "3.00x" in text  # BitNet decode vs fp32
    assert text.count("<svg") == 6 + 4


def test_tinyllama_bitnet_one_layer_measured_in_a_subprocess_then_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BITNET_FAST_TUNING", str(tmp_path / "kernel_tuning.json"))
    log: list[str] = []
    r = tinyllama.measure(quick=True, layers=1, variants=("bitnet",), echo=log.append)
    assert r["quick"] and not r["cached"] and r["layers"] == 1 and any("decode" in m for m in log)
    (v,) = r["variants"]
    assert v["decode_tokens_per_sec"] > 0 and v["prefill_tokens_per_sec"] > 0 and v["layers"] == 1
    fp_embed_head = 2 * 32000 * 2048 * 4
    fp_layer = 4 * (2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 2048 * 5632)
    assert fp_embed_head < v["param_bytes"] < fp_embed_head + fp_layer / 8  # ~2-bit projections
    assert v["peak_rss_bytes"] >= v["rss_after_load_bytes"] > v["param_bytes"]
    assert tinyllama.cache_path() == tmp_path / "tinyllama_bench.json"
    again = tinyllama.measure(quick=True, layers=1, variants=("bitnet",), echo=log.append)
    assert again["cached"] and again["variants"] == r["variants"]
    # A cache made under another torch version (or CPU, tuning, ...) is not reused.
    cached = json.loads(tinyllama.cache_path().read_text())
    cached["key"]["torch"] = "0.0"
    tinyllama.cache_path().write_text(json.dumps(cached))
    monkeypatch.setattr(tinyllama.subprocess, "run", lambda *a, **k: pytest.fail("remeasures"))
    with pytest.raises(pytest.fail.Exception, match="remeasures"):
        tinyllama.measure(quick=True, layers=1, variants=("bitnet",), echo=log.append)


# ------------------------------------------------------------------------------------------------ CLI errors
@pytest.fixture
def cli():
    return lambda *args: CliRunner().invoke(main, ["report", *map(str, args)])


def _one_line_error(res) -> str:
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return res.output


def test_cli_report_writes_html_and_json(cli, both: Path, tmp_path: Path) -> None:
    res = cli(both, "--out", tmp_path / "r.html", "--no-tinyllama")
    assert res.exit_code == 0, res.output
    _check_html((tmp_path / "r.html").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["runs"]


def test_cli_report_missing_dir(cli, tmp_path: Path) -> None:
    assert "no such directory" in _one_line_error(cli(tmp_path / "nope", "--no-tinyllama"))


def test_cli_report_dir_without_report_json(cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no report.json" in _one_line_error(cli(tmp_path / "empty", "--no-tinyllama"))


def test_cli_report_corrupt_json(cli, tmp_path: Path) -> None:
    d = _run_dir(tmp_path / "bad", "fp", [1.0], 1.0, 1)
    (d / "report.json").write_text('{"model": "fp", "epochs": [')
    assert "not valid JSON" in _one_line_error(cli(d, "--no-tinyllama"))
    (d / "report.json").write_text('{"epochs": []}')
    assert "missing ['model']" in _one_line_error(cli(d, "--no-tinyllama"))


def test_cli_report_includes_cached_tinyllama(cli, both: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BITNET_FAST_TUNING", str(tmp_path / "kernel_tuning.json"))
    key = tinyllama._cache_key(True, tinyllama.QUICK) | {"variants": list(tinyllama.VARIANTS)}
    variants = [{"key": k, "name": n, "decode_tokens_per_sec": 1.0 + i, "prefill_tokens_per_sec": 10.0 + i,
                 "param_bytes": 1e9, "rss_after_load_bytes": 2e9, "peak_rss_bytes": 3e9, "decode_tokens": 4,
                 "prefill_tokens": 32} for i, (k, n) in enumerate(tinyllama.VARIANTS.items())]
    result = {"config": {**tinyllama.CONFIG, "num_hidden_layers": 2}, "quick": True, "layers": 2,
              "total_layers": 22, "variants": variants, "machine": {"cpu": "c", "torch_threads": 2}, "measured_at": "t",
              "command": "python -m bitnet_fast.tinyllama --quick"}
    tinyllama.cache_path().write_text(json.dumps({"key": key, "result": result}))
    res = cli(both, "--quick", "--out", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    assert "reusing measurements cached" in res.stderr
    text = (tmp_path / "r.html").read_text()
    _check_html(text)
    assert "QUICK MODE: only 2 of 22" in text and "(cached)" in text
    assert json.loads((tmp_path / "r.json").read_text())["tinyllama"]["variants"] == variants
