"""bitnet_fast.peers: finding llama.cpp's llama-bench, running and parsing it, with a fake llama-bench (a shell
script printing output captured once from the real binary, tests/data/llama_bench_0c1e570.json), so that no test
needs the real build. Also what calibrate and the report show next to our decoder."""

from __future__ import annotations

import html
import json
import stat
import sys
from pathlib import Path

import pytest

from bitnet_fast import calibrate, peers, report, tinyllama

CAPTURED = Path(__file__).parent / "data" / "llama_bench_0c1e570.json"  # llama-bench -p 16 -n 4 -r 2 -o json


def _fake(root: Path, isa: str = "avx2", body: str | None = None) -> Path:
    """A fake llama-bench in the peers dir `root`: records its arguments, prints the captured JSON."""
    exe = peers.build_dir(isa, root) / "bin" / "llama-bench"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n" + (body or f'echo "$@" > "{exe}.args"\n'
                                    f'case " $* " in *" -o json "*) cat "{CAPTURED}";; *) exit 3;; esac\n'))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_find_llama_bench_never_builds_and_prefers_native(tmp_path):
    assert peers.find_llama_bench(root=tmp_path) is None
    assert "python tools/llamacpp_build.py --isa native" in peers.not_built_message(root=tmp_path)
    avx2 = _fake(tmp_path, "avx2")
    assert peers.find_llama_bench(root=tmp_path) == avx2
    assert peers.find_llama_bench("native", tmp_path) is None
    native = _fake(tmp_path, "native")
    assert peers.find_llama_bench(root=tmp_path) == native
    native.chmod(0o644)  # not executable: not a build
    assert peers.find_llama_bench(root=tmp_path) == avx2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build-avx2-0.3.36", "build-native-0.3.36"]


def test_parse_captured_output():
    r = peers.parse_llama_bench(CAPTURED.read_text())
    assert r["pp16_tok_s"] == pytest.approx(5129.022254) and r["tg4_tok_s"] == pytest.approx(0.179614)
    assert r["pp16_best"] == pytest.approx(10255.3) and r["tg4_std"] == pytest.approx(0.000388)
    assert r["build_commit"] == "0c1e570" and r["n_threads"] == 2 and len(r["records"]) == 2
    for bad in ("", "not json", "[]", '[{"n_prompt": 16}]', '{"avg_ts": 1}'):
        with pytest.raises(ValueError, match="unexpected llama-bench output"):
            peers.parse_llama_bench(bad)


@pytest.mark.parametrize(("weights", "head"), [("tq2_0", "q8_0"), ("tq1_0", "f16")])
def test_write_gguf_reads_back_as_the_llama_it_describes(tmp_path, weights, head):
    """The GGUF llama.cpp's whole-model comparison runs: every tensor of the shape, in the asked types, with the
    hyperparameters llama.cpp reads (gguf is pinned in requirements/tested.txt; its reader checks the file)."""
    gguf = pytest.importorskip("gguf")
    shape = peers.Shape(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=300)
    path = peers.write_gguf(tmp_path / "m.gguf", shape, weights, head)
    reader = gguf.GGUFReader(path)
    got = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}
    assert len(got) == 3 + 9 * shape.layers
    assert got["token_embd.weight"] == (head.upper(), (256, 300)) and got["output.weight"] == (head.upper(), (256, 300))
    for i in range(shape.layers):
        assert got[f"blk.{i}.attn_k.weight"] == (weights.upper(), (256, 128))  # (in, out): ggml's order
        assert got[f"blk.{i}.ffn_down.weight"] == (weights.upper(), (512, 256))
        assert got[f"blk.{i}.attn_norm.weight"][0] == "F32"
    def field(name: str) -> int:
        f = reader.fields[name]
        return int(f.parts[f.data[0]][0])

    assert (field("llama.block_count"), field("llama.attention.head_count"), field("llama.attention.head_count_kv"),
            field("llama.feed_forward_length")) == (2, 4, 2, 512)


def test_measure_runs_the_binary_on_the_cached_gguf(tmp_path):
    exe = _fake(tmp_path)
    shape = peers.Shape(hidden=256, layers=1, heads=4, kv_heads=2, ffn=512, vocab=300)
    gguf = peers.model_path(shape, "tq2_0", "q8_0", tmp_path)
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")  # cached: nothing is written, so the gguf package is not needed
    r = peers.measure(shape, 16, 4, threads=2, reps=2, root=tmp_path, echo=lambda m: None)
    assert r["available"] and r["tg4_tok_s"] == pytest.approx(0.179614) and r["peak_rss_bytes"] > 0
    assert r["gguf"] == str(gguf) and r["gguf_bytes"] == 4 and r["llama_bench"] == str(exe)
    assert Path(f"{exe}.args").read_text().split() == ["-m", str(gguf), "-t", "2", "-p", "16", "-n", "4", "-r", "2",
                                                       "-o", "json"]


def test_measure_says_what_is_missing(tmp_path, monkeypatch):
    shape = peers.Shape(hidden=256, layers=1, heads=4, kv_heads=2, ffn=512, vocab=300)
    r = peers.measure(shape, 16, 4, threads=2, root=tmp_path, echo=lambda m: None)
    assert not r["available"] and "tools/llamacpp_build.py" in r["reason"]
    _fake(tmp_path)
    monkeypatch.setitem(sys.modules, "gguf", None)  # the optional gguf package is not installed
    r = peers.measure(shape, 16, 4, threads=2, root=tmp_path, echo=lambda m: None)
    assert r == {"available": False, "reason": peers.GGUF_MISSING} and "pip install gguf" in r["reason"]
    assert not peers.model_path(shape, "tq2_0", "q8_0", tmp_path).exists()


def test_a_failing_llama_bench_is_reported_not_fatal(tmp_path, monkeypatch):
    _fake(tmp_path, body='echo "llama_bench: error: failed to load model" >&2\nexit 1\n')
    monkeypatch.setenv("BITNET_FAST_PEERS", str(tmp_path))
    shape = tinyllama.CONFIG
    gguf = peers.model_path(peers.Shape(shape["hidden_size"], 1, shape["num_attention_heads"],
                                        shape["num_key_value_heads"], shape["intermediate_size"],
                                        shape["vocab_size"]), "tq2_0", "q8_0")
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    r = tinyllama.measure_llamacpp(1, 16, 4, echo=lambda m: None)
    assert r == {"available": False, "reason": "llama-bench failed: llama-bench failed (exit 1): "
                                               "llama_bench: error: failed to load model"}


def test_bad_shape_is_clear():
    with pytest.raises(ValueError, match="multiples of 256"):
        peers.Shape(hidden=200, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="divisible"):
        peers.Shape(hidden=2048, heads=30)


def test_write_gguf_small(tmp_path):
    pytest.importorskip("gguf")
    shape = peers.Shape(hidden=256, layers=1, heads=4, kv_heads=2, ffn=512, vocab=300)
    path = peers.write_gguf(tmp_path / "m.gguf", shape)
    assert path.read_bytes()[:4] == b"GGUF" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ----------------------------------------------------------------------------- shown by calibrate and report
OURS = {"key": "decoder", "name": tinyllama.VARIANTS["decoder"], "decode_tokens_per_sec": 50.0,
        "prefill_tokens_per_sec": 100.0, "prefill_tokens": 16, "decode_tokens": 4, "param_bytes": 1,
        "rss_before_bytes": 100 * 2**20, "peak_rss_bytes": 300 * 2**20, "rss_after_load_bytes": 1}


def _peer() -> dict:
    return {"available": True, **peers.parse_llama_bench(CAPTURED.read_text()), "peak_rss_bytes": 400 * 2**20,
            "weights": "tq2_0", "head": "q8_0", "n_prompt": 16, "n_gen": 4, "command": "llama-bench -m x -o json"}


def test_compare_lines_give_ratios_or_the_reason():
    lines = tinyllama.compare_lines({"variants": [OURS], "llama_cpp": _peer()})
    assert "RSS added 200 MiB" in lines[0] and "TQ2_0 + Q8_0 head" in lines[1]
    assert f"decode {50 / 0.179614:.2f}x" in lines[2] and "memory (our RSS added / their peak RSS) 0.50x" in lines[2]
    missing = {"available": False, "reason": peers.not_built_message()}
    assert tinyllama.compare_lines({"variants": [OURS], "llama_cpp": missing})[1] == f"llama.cpp: {missing['reason']}"
    assert tinyllama.compare_lines({"variants": [OURS]}) == []  # cached before llama.cpp was compared


def test_report_and_calibrate_show_llamacpp(monkeypatch):
    tl = {"variants": [OURS], "llama_cpp": _peer()}
    page = report._llamacpp_html(tl)
    assert "llama.cpp 0c1e570" in page and f"{100 / 5129.022254:.2f}x" in page and "0.50x" in page
    reason = {"available": False, "reason": peers.GGUF_MISSING}
    assert html.escape(peers.GGUF_MISSING) in report._llamacpp_html({**tl, "llama_cpp": reason})
    assert report._llamacpp_html({"variants": [OURS]}) == ""
    whole = {"variants": [OURS], "llama_cpp": reason, "quick": True, "layers": 2, "total_layers": 22}
    monkeypatch.setattr(tinyllama, "measure", lambda **kw: whole)  # the kernel and model timing: not under test
    monkeypatch.setattr(calibrate, "available_backends", lambda: ["reference"])
    monkeypatch.setattr(calibrate, "time_kernels", lambda *a: [])
    monkeypatch.setattr(calibrate, "model_throughput", lambda preset, linear, seq_len, *a: {
        "preset": preset, "linear": linear, "parameters": 1, "seq_len": seq_len, "decode_tokens_per_sec": 1.0,
        "prefill_tokens_per_sec": 1.0, "train_tokens_per_sec": 1.0,
        "recommended": {"batch_size": 1, "seq_len": seq_len, "tokens_per_step": seq_len, "predicted_step_seconds": 1}})
    r = calibrate.calibrate(quick=True, presets=("tiny",), save=False, echo=lambda m: None, whole_model=True)
    text = calibrate.format_table(r)
    assert "whole model (TinyLlama-1.1B shape, 2 of 22 layers: QUICK" in text
    assert f"llama.cpp: {peers.GGUF_MISSING}" in text
    assert "whole_model" not in calibrate.calibrate(quick=True, presets=("tiny",), save=False, echo=lambda m: None)
    assert json.loads(json.dumps(r))["whole_model"] == whole
