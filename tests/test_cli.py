"""The `bitnet-fast` CLI: prepare/train/eval end to end on tiny inputs; user errors are one line, no traceback."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from bitnet_fast.cli import main
from bitnet_fast.config import TrainConfig
from bitnet_fast.recipe import RECIPES, SCHEDULES


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _fails_cleanly(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for needle in needles:
        assert needle in result.output, result.output


TINY_TRAIN = ("--preset", "tiny", "--max-steps", "2", "--batch-size", "4", "--seq-len", "16", "--max-lines", "40",
              "--vocab-size", "128", "--no-progress")


def test_help_lists_the_commands():
    result = _run("--help")
    assert result.exit_code == 0
    for cmd in ("prepare", "train", "eval"):
        assert cmd in result.output


def test_train_options_come_from_train_config():
    cmd = main.commands["train"]
    flags = {opt for p in cmd.params for opt in p.opts}
    assert flags == {"--preset", "--model", "--epochs", "--max-steps", "--batch-size", "--seq-len", "--grad-accum",
                     "--lr", "--schedule", "--tokenizer", "--vocab-size", "--max-lines", "--data-dir", "--out",
                     "--ckpt-every", "--keep-last", "--resume", "--overwrite", "--seed", "--device", "--distributed",
                     "--no-progress", "--data", "--offline", "--log-every", "--grad-compression", "--sync-every",
                     "--lr-bitnet", "--lr-fp", "--schedule-bitnet", "--schedule-fp", "--warmup-frac",
                     "--batch-from", "--grad-input"}
    with cmd.make_context("train", []) as ctx:  # no flags: every default is TrainConfig's
        params = dict(ctx.params)
    assert params.pop("which") == "both" and params.pop("out") is None and params.pop("batch_from") is None
    assert TrainConfig(**params) == TrainConfig()
    user_facing = [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("help")]
    assert {f.name for f in user_facing} == set(params)
    by_name = {p.name: p for p in cmd.params}
    for f in user_facing:
        assert by_name[f.name].default == f.default and by_name[f.name].help == f.metadata["help"], f.name
    assert tuple(by_name["schedule"].type.choices) == SCHEDULES
    with cmd.make_context("train", ["--no-progress", "--resume", "--lr", "0.01", "--max-steps", "3"]) as ctx:
        assert ctx.params["progress"] is False and ctx.params["resume"] is True
        assert ctx.params["lr"] == 0.01 and ctx.params["max_steps"] == 3


def test_bad_flags_and_presets(tmp_path):
    _fails_cleanly(_run("train", "--preset", "huge"), 2, "Invalid value for '--preset'")
    _fails_cleanly(_run("train", "--epochs", "0"), 2, "--epochs")
    _fails_cleanly(_run("train", "--lr", "0"), 2, "--lr")
    _fails_cleanly(_run("train", "--seq-len", "1"), 2, "--seq-len")
    _fails_cleanly(_run("train", "--model", "int4"), 2, "--model")
    _fails_cleanly(_run("train", "--model", "bitnet", "--lr-fp", "1e-3"), 2, "--lr-fp", "--model both")
    _fails_cleanly(_run("train", "--model", "fp", "--schedule-bitnet", "cosine"), 2, "--schedule-bitnet")
    _fails_cleanly(_run("eval"), 2, "Missing argument")


def test_missing_data_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("BITNET_FAST_DATA", raising=False)
    result = _run("train", *TINY_TRAIN, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run")
    _fails_cleanly(result, 1, "Error: WikiText-2 not found", "--data-dir")
    assert len(result.output.strip().splitlines()) == 1


def test_bad_checkpoints(tmp_path):
    _fails_cleanly(_run("eval", tmp_path / "missing.pt"), 1, "cannot read checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    _fails_cleanly(_run("eval", tmp_path / "junk.pt"), 1, "not a readable bitnet-fast checkpoint")


def test_prepare_writes_verified_shards(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("the cat sat on the mat .\n\nthe dog sat on the log .\n" * 30)
    result = _run("prepare", src, "--out", tmp_path / "out", "--vocab-size", "60", "--shard-tokens", "100")
    assert result.exit_code == 0, result.output
    assert "train: " in result.output and "valid: " in result.output
    assert (tmp_path / "out" / "train-00000.bin").is_file()
    shard = tmp_path / "out" / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    from bitnet_fast.data import load_prepared

    with pytest.raises(Exception, match="truncated"):
        load_prepared(tmp_path / "out")
    _fails_cleanly(_run("prepare", tmp_path / "none.txt", "--out", tmp_path / "o"), 2, "does not exist")
    test = tmp_path / "t.txt"
    test.write_text("the cat sat on the log .\n" * 5)
    result = _run("prepare", src, "--test", test, "--out", tmp_path / "with_test", "--vocab-size", "60")
    assert result.exit_code == 0 and "test: " in result.output and "(40 words)" in result.output, result.output


def test_train_both_then_eval(wikitext_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    result = _run("train", *TINY_TRAIN, "--data-dir", wikitext_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert "valid word ppl after" in result.output  # the side-by-side summary
    for model in ("bitnet", "fp"):
        report = json.loads((out / model / "report.json").read_text())
        assert report["model"] == model and report["steps"] == 2 and report["final_valid_ppl"] > 1
    assert set(json.loads((out / "summary.json").read_text())) == {"bitnet", "fp"}
    ckpt = sorted((out / "fp" / "checkpoints").glob("*.pt"))[-1]
    _fails_cleanly(_run("eval", ckpt, "--data-dir", wikitext_dir, "--split", "test"), 1, "test.txt")
    # A data dir with a (small) test split: train/valid linked to the real files, test.txt of any content.
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.txt", "valid.txt"):
        (data / name).symlink_to(wikitext_dir / name)
    lines = (wikitext_dir / "valid.txt").read_text().splitlines(keepends=True)[:60]
    (data / "test.txt").write_text("".join(lines))
    _fails_cleanly(_run("eval", ckpt, "--data-dir", data, "--split", "test"), 1, "not the WikiText-2 v1 test split")
    from bitnet_fast import wikitext  # the real test.txt is not on this machine: teach the check this one's hash

    sha = wikitext.fingerprint("".join(lines).encode()).sha256
    monkeypatch.setitem(wikitext.EXACT_SHA256, "test", frozenset({sha}))
    result = _run("eval", ckpt, "--data-dir", data, "--split", "test", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["model"] == "fp" and r["split"] == "test" and r["words"] == sum(len(ln.split()) + 1 for ln in lines)
    assert r["word_ppl"] > r["ppl"] > 1
    # Training on a data dir with a test split reports it after training, next to valid (summary, reports).
    result = _run("train", *TINY_TRAIN, "--data-dir", data, "--out", tmp_path / "with_test", "--lr-bitnet", "4e-3")
    assert result.exit_code == 0, result.output
    assert "test word ppl after" in result.output and "test word ppl after" not in _run(
        "train", *TINY_TRAIN, "--model", "fp", "--data-dir", wikitext_dir, "--out", tmp_path / "no_test").output
    for model in ("bitnet", "fp"):
        report = json.loads((tmp_path / "with_test" / model / "report.json").read_text())
        assert report["final_test_word_ppl"] > report["final_test_ppl"] > 1
        assert report["train_config"]["lr"] == (4e-3 if model == "bitnet" else RECIPES["fp"]["lr"])
    summary = json.loads((tmp_path / "with_test" / "summary.json").read_text())
    assert summary["fp"]["final_test_ppl"] == json.loads((tmp_path / "with_test/fp/report.json").read_text())[
        "final_test_ppl"]
