"""Work per rank (issue 14 item 5): the sizing rule, the calibration file `train --batch-from` reads (round trip
and refusals), and a short `train --batch-from` through the CLI. `bitnet-fast calibrate` writing the plan into its
JSON is checked in test_calibrate.py (test_json_schema)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bitnet_fast.cli import main
from bitnet_fast.sizing import CALIBRATION_SCHEMA, CalibrationError, from_file, per_rank, plan_work


# ------------------------------------------------------------------------------------------------ the rule
def test_without_a_global_batch_one_micro_batch_fills_the_target():
    p = plan_work(tokens_per_sec=1000, seq_len=128, target_seconds=2.0)
    assert (p["batch_size"], p["grad_accum"], p["global_batch"]) == (15, 1, 15)  # floor(2000 / 128)
    assert p["predicted_step_seconds"] == pytest.approx(15 * 128 / 1000)
    assert p["tokens_per_step"] == 15 * 128 and p["steps_per_interval"] is None
    assert plan_work(1000, 128, 2.0, world_size=3)["global_batch"] == 45  # every rank takes a full micro-batch
    assert plan_work(10, 128, 1.0)["batch_size"] == 1  # a rank too slow for one sequence still takes one


@pytest.mark.parametrize("rate, world, wish, want", [
    (1000, 2, 32, (4, 4)),  # share 16, 7 fit: 3 micro-batches would not split 16 evenly, 4 x 4 does
    (1000, 2, 34, (6, 3)),  # share 17 (prime): no accum in [3, 6] divides it; 3 x 6 = 18, the share rounded up
    (1000, 4, 8, (2, 1)),  # the share fits in one micro-batch
    (128, 1, 5, (1, 5)),  # one sequence per target: five micro-batches
])
def test_a_global_batch_is_split_into_micro_batches_no_larger_than_the_target(rate, world, wish, want):
    p = plan_work(rate, 128, 1.0, world_size=world, global_batch=wish)
    assert (p["batch_size"], p["grad_accum"]) == want
    fits = max(1, rate // 128)
    assert p["batch_size"] <= fits and p["global_batch"] == p["batch_size"] * p["grad_accum"] * world >= wish
    assert p["predicted_step_seconds"] == pytest.approx(p["batch_size"] * p["grad_accum"] * 128 / rate)


def test_steps_per_checkpoint_interval():
    p = plan_work(1000, 100, 1.0, target_minutes=10)  # 10 sequences = 1.0 s per step
    assert p["steps_per_interval"] == 600
    assert plan_work(1000, 100, 1.0, global_batch=40, target_minutes=10)["steps_per_interval"] == 150  # 4 s steps
    assert plan_work(1, 100, 1.0, target_minutes=0.5)["steps_per_interval"] == 1  # a step longer than the interval


@pytest.mark.parametrize("kw, name", [({"tokens_per_sec": 0}, "tokens_per_sec"), ({"seq_len": 1.5}, "seq_len"),
                                      ({"target_seconds": float("nan")}, "target_seconds"),
                                      ({"world_size": 0}, "world_size"), ({"global_batch": True}, "global_batch"),
                                      ({"target_minutes": -1}, "target_minutes")])
def test_bad_arguments_name_themselves(kw, name):
    with pytest.raises(ValueError, match=name):
        plan_work(**{"tokens_per_sec": 1000, "seq_len": 64, "target_seconds": 1.0, **kw})


# ------------------------------------------------------------------------------------------------ the file
def calibration(tmp_path, rows=(("tiny", "fp"),), name="cal.json", **kw) -> str:
    """A calibration file as `bitnet-fast calibrate --json` writes it, reduced to what --batch-from reads: at
    seq 16, 96 tokens/s and a 0.5 s target fit 3 sequences; a global batch of 6 on one rank is 3 x 2 (1 s steps),
    and a 3 s checkpoint interval holds 3 steps."""
    args = {"tokens_per_sec": 96.0, "threads": torch.get_num_threads(), "seq_len": 16, "target_seconds": 0.5,
            "world_size": 1, "global_batch": 6, "target_minutes": 0.05, **kw}
    data = {"schema": CALIBRATION_SCHEMA, "models": [{"preset": p, "linear": m, "seq_len": 16, "per_rank": per_rank(
        **args)} for p, m in rows]}
    (tmp_path / name).write_text(json.dumps(data))
    return str(tmp_path / name)


def test_the_file_round_trips_and_is_planned_again_for_the_world_size(tmp_path):
    path = calibration(tmp_path)
    got = from_file(path, "tiny", "fp", None, 1)
    assert got["plan"] == json.loads((tmp_path / "cal.json").read_text())["models"][0]["per_rank"]["plan"]
    assert (got["plan"]["batch_size"], got["plan"]["grad_accum"], got["plan"]["steps_per_interval"]) == (3, 2, 3)
    assert got["seq_len"] == 16 and got["threads"] == torch.get_num_threads()
    two = from_file(path, "tiny", "fp", 16, 2)["plan"]  # 2 ranks share the global batch of 6: 3 each, one micro-batch
    assert two == plan_work(96.0, 16, 0.5, 2, 6, 0.05) and (two["batch_size"], two["grad_accum"]) == (3, 1)
    with pytest.raises(CalibrationError, match=r"--batch-from .* was measured for tiny/fp, not preset small"):
        from_file(path, "small", "fp", None, 1)  # a UserError: the CLI prints it as one line


# ------------------------------------------------------------------------------------------------ the CLI
TINY = ("--preset", "tiny", "--model", "fp", "--max-lines", "40", "--vocab-size", "128", "--no-progress")


@pytest.fixture
def cli_env(tmp_path_factory, monkeypatch, wikitext_dir):
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return str(wikitext_dir)


def test_train_takes_batch_accum_seq_len_and_ckpt_every_from_the_file(tmp_path, cli_env):
    out = str(tmp_path / "run")
    args = ["train", *TINY, "--data-dir", cli_env, "--batch-from", calibration(tmp_path), "--out", out]
    res = CliRunner().invoke(main, [*args, "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    assert "took --seq-len 16 --batch-size 3 --grad-accum 2 --ckpt-every 3" in res.stderr
    # what a torchrun --max-restarts restart does: the same command with --resume; the file's values match the run's
    res = CliRunner().invoke(main, [*args, "--max-steps", "1", "--resume"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["changed"] for e in events if e["event"] == "resume"] == [{}]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 1 and report["train_config"]["ckpt_every"] == 3
    assert report["global_batch"] == {"batch_size": 3, "grad_accum": 2, "world_size": 1, "sequences": 6,
                                      "tokens": 96}


def test_flags_on_the_command_line_win_over_the_file(tmp_path, cli_env):
    path = calibration(tmp_path, threads=torch.get_num_threads() + 7)
    res = CliRunner().invoke(main, ["train", *TINY, "--data-dir", cli_env, "--max-steps", "1", "--batch-size", "2",
                                    "--ckpt-every", "50", "--batch-from", path, "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "took --seq-len 16 --grad-accum 2;" in res.stderr
    assert f"measured with {torch.get_num_threads() + 7} thread(s)" in res.stderr  # a warning, not an error
    cfg = json.loads((tmp_path / "run" / "report.json").read_text())["train_config"]
    assert (cfg["batch_size"], cfg["grad_accum"], cfg["seq_len"], cfg["ckpt_every"]) == (2, 2, 16, 50)


def _refused(args, code, *needles):
    res = CliRunner().invoke(main, ["train", *TINY, "--max-steps", "1", *args])
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, res.output
    for needle in needles:
        assert needle in res.output, res.output


def test_unusable_files_are_refused_with_the_option_and_the_fix(tmp_path, cli_env):
    fix = "bitnet-fast calibrate --preset tiny --json >"
    _refused(["--batch-from", str(tmp_path / "none.json")], 1, "--batch-from", "no such file", fix)
    (tmp_path / "bad.json").write_text('{"schema": "bitnet-fast/cal')
    _refused(["--batch-from", str(tmp_path / "bad.json")], 1, "--batch-from", "not a readable calibration", fix)
    (tmp_path / "old.json").write_text(json.dumps({"schema": "bitnet-fast/calibrate/1", "models": []}))
    _refused(["--batch-from", str(tmp_path / "old.json")], 1, "schema 'bitnet-fast/calibrate/1'", fix)
    other = calibration(tmp_path, rows=(("small", "fp"), ("tiny", "bitnet")), name="other.json")
    _refused(["--batch-from", other], 1, "measured for small/fp, tiny/bitnet, not preset tiny with --model fp", fix)
    damaged = json.loads((tmp_path / "other.json").read_text())
    damaged["models"][1] |= {"linear": "fp", "per_rank": {"seq_len": 16}}
    (tmp_path / "damaged.json").write_text(json.dumps(damaged))
    _refused(["--batch-from", str(tmp_path / "damaged.json")], 1, "tiny/fp entry is damaged", fix)
    _refused(["--seq-len", "32", "--batch-from", calibration(tmp_path)], 1,
             "measured at --seq-len 16, not 32; drop --seq-len, or calibrate with --seq-len 32")
    res = CliRunner().invoke(main, ["train", "--preset", "tiny", "--batch-from", calibration(tmp_path)])
    assert res.exit_code == 2 and "--batch-from sizes one model; add --model bitnet or --model fp" in res.output
