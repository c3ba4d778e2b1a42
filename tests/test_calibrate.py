"""bitnet-fast calibrate: quick path on the tiny preset writes a tuning file the kernels read; JSON schema; decode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from bitnet_fast.kernels import cpu, tuning
from click.testing import CliRunner

from bitnet_fast import calibrate as cal
from bitnet_fast.cli import main
from bitnet_fast.model import build_model, preset_config
from bitnet_fast.sizing import from_file, plan_work


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `bitnet-fast calibrate --quick --preset tiny --json` with the tuning file in a temp dir (the process's
    kernel parameters are restored afterwards so later tests see the defaults)."""
    path = tmp_path_factory.mktemp("tuning") / "kernel_tuning.json"
    old_env, old_params = os.environ.get("BITNET_FAST_TUNING"), cpu.params()
    os.environ["BITNET_FAST_TUNING"] = str(path)
    try:
        res = CliRunner().invoke(main, ["calibrate", "--quick", "--preset", "tiny", "--target-seconds", "0.5",
                                        "--global-batch", "12", "--world-size", "2", "--target-minutes", "5",
                                        "--json"])
        saved = tuning.load()
    finally:
        if old_env is None:
            del os.environ["BITNET_FAST_TUNING"]
        else:
            os.environ["BITNET_FAST_TUNING"] = old_env
        cpu.configure(**old_params)
    assert res.exit_code == 0, res.output
    return {"result": json.loads(res.stdout), "path": path, "saved": saved, "log": res.stderr.splitlines()}


def test_tuning_file_is_written_read_back_and_honoured_by_the_kernels(run) -> None:
    r = run["result"]
    assert r["tuning"]["path"] == str(run["path"]) and run["path"].is_file()
    assert run["saved"] == r["tuning"]["params"]
    for name, value in r["tuning"]["params"].items():
        assert value in tuning.CPU_SEARCH_SPACE[name] or (name == "gemv_max_m" and value == 0)
    # A fresh process reads the file on first kernel use and runs with those parameters.
    code = (
        "import json, numba, torch\n"
        "from bitnet_fast import kernels\nfrom bitnet_fast.kernels import cpu\n"
        "kernels.bitlinear(torch.randn(4, 512), kernels.pack(torch.randn(1024, 512)))\n"  # > SERIAL_WORK MACs
        "print(json.dumps({'params': cpu.params(), 'numba_threads': numba.get_num_threads(),"
        " 'torch_threads': torch.get_num_threads(), 'max': numba.config.NUMBA_NUM_THREADS}))\n"
    )
    env = {**os.environ, "BITNET_FAST_TUNING": str(run["path"])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["params"] == r["tuning"]["params"]
    want = r["tuning"]["params"]["threads"] or min(got["torch_threads"], got["max"])
    assert got["numba_threads"] == max(1, min(want, got["max"]))


def test_json_schema(run, tmp_path) -> None:
    r = json.loads(json.dumps(run["result"]))  # JSON-serialisable as a whole
    assert r["schema"] == cal.SCHEMA and r["quick"] is True and r["presets"] == ["tiny"]
    m = r["machine"]
    assert m["logical_cpus"] >= 1 and m["memory_total_bytes"] > 0 and m["cpu"]
    assert "numba" in r["backends"] and "reference" in r["backends"]
    assert ("triton" in r["backends"]) == torch.cuda.is_available()
    shapes = {(64, 64), (176, 64), (64, 176)}
    for backend in ("numba", "reference"):
        rows = [k for k in r["kernels"] if k["backend"] == backend]
        assert {(k["n"], k["k"]) for k in rows} == shapes and {k["m"] for k in rows} == {1, 32}
        assert all(k["seconds"] > 0 and k["gops"] > 0 for k in rows), rows
    t = r["tuning"]
    assert set(t["params"]) == set(tuning.CPU_DEFAULTS)
    # A sweep result slower than the start in the final check is never kept (the speedup is >= 1 by its formula).
    assert t["kept_start"] == (t["tuned_seconds"] > t["start_seconds"])
    if t["kept_start"]:
        assert t["params"] == t["start"]
    assert {x["param"] for x in t["trials"]} >= {"threads", "gemm_min_m", "panel_bytes"}
    models = {(x["preset"], x["linear"]): x for x in r["models"]}
    assert set(models) == {("tiny", "bitnet"), ("tiny", "fp")}
    for x in models.values():
        assert x["decode_tokens_per_sec"] > 0 and x["prefill_tokens_per_sec"] > 0 and x["train_tokens_per_sec"] > 0
        rec = x["recommended"]
        assert rec["tokens_per_step"] == rec["batch_size"] * rec["seq_len"] and rec["target_seconds"] == 0.5
        assert rec["batch_size"] == 1 or rec["predicted_step_seconds"] <= 0.5 + 1e-9
        # per rank (sizing.py): this process's speed and threads, planned for the wishes given on the command line
        pr = x["per_rank"]
        assert pr["tokens_per_sec"] == x["train_tokens_per_sec"] and pr["threads"] == torch.get_num_threads()
        assert (pr["seq_len"], pr["target_seconds"], pr["global_batch_wish"], pr["target_minutes"]) == (64, 0.5, 12, 5)
        assert pr["plan"] == plan_work(pr["tokens_per_sec"], 64, 0.5, 2, 12, 5)
        assert pr["plan"]["global_batch"] >= 12 and pr["plan"]["world_size"] == 2
    # what `train --batch-from` reads back is what was written
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(run["result"]))
    assert from_file(path, "tiny", "bitnet", None, 2)["plan"] == models["tiny", "bitnet"]["per_rank"]["plan"]


def test_table_and_progress(run) -> None:
    text = cal.format_table(run["result"])
    for part in ("machine:", run["result"]["machine"]["cpu"], "kernel timings", "tuned CPU kernel parameters",
                 "tiny", "bitnet", "batch x seq", str(run["path"]), "work per rank", "a global batch of 12",
                 "5 min", "batch x accum"):
        assert part in text
    assert any("tune:" in line for line in run["log"]) and any("models:" in line for line in run["log"])


def test_decode_timing_uses_the_model_cache() -> None:
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", linear="fp", vocab_size=97)).eval()
    prompt = torch.randint(0, 97, (1, 5))
    want = model.generate(prompt, 6, temperature=0)[:, 5:]  # (1, 6)
    tokens, seconds = cal._decode(model, prompt, 6)
    assert torch.equal(tokens, want) and seconds > 0
    assert all(b.attn.cache is None for b in model.blocks)  # the cache is released afterwards


def test_save_tuning_validates_before_writing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BITNET_FAST_TUNING", str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="gemv_max_m"):
        cal.save_tuning({"gemv_max_m": -1})
    assert not list(tmp_path.iterdir())
    assert cal.save_tuning({**tuning.CPU_DEFAULTS, "gemv_max_m": 4}) == tmp_path / "t.json"
    assert tuning.load()["gemv_max_m"] == 4


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="target_seconds"):
        cal.calibrate(target_seconds=0)
    with pytest.raises(ValueError, match="global_batch"):
        cal.calibrate(global_batch=0)
    with pytest.raises(ValueError, match="not presets"):
        cal.calibrate(presets=("huge",))
    for args, msg in ((["--target-seconds", "0"], "x>0"), (["--preset", "huge"], "huge"),
                      (["--seq-len", "2"], "x>=8"), (["--target-minutes", "0"], "x>0"),
                      (["--global-batch", "0"], "x>=1"), (["--world-size", "0"], "x>=1")):
        res = CliRunner().invoke(main, ["calibrate", *args])
        assert res.exit_code == 2 and msg in res.output and isinstance(res.exception, SystemExit), res.exception


# ----------------------------------------------------------------------------- the tuner's rules, without a clock
@pytest.fixture
def scripted(monkeypatch):
    """tune_cpu on a cost model instead of a clock: each timed call costs `model(params, m)`, from the kernel
    parameters in force and the M of the call; no kernel runs. Returns a function (model, vnni) -> result."""
    seen: dict[str, int] = {}
    monkeypatch.setattr(cal.kernels, "bitlinear", lambda x, pw, *a, **k: seen.__setitem__("m", x.shape[0]))
    saved = cpu.params()

    def tune(model, vnni: bool = False) -> dict:
        monkeypatch.setattr(cal, "bench", lambda fn, repeats, budget_s=0.0, device=None: fn() or model(
            cpu.params(), seen["m"]))
        caps = {"isa": "vnni512" if vnni else "avx2", "int_mm_vnni": vnni}
        monkeypatch.setattr(cal.tuning, "capabilities", lambda: caps)
        cpu.configure(**tuning.plan(caps))  # the start: this capability class's plan
        return cal.tune_cpu([(64, 64)], prefill_m=128, repeats=1, budget_s=0.0, echo=lambda _: None)

    yield tune
    cpu.configure(**saved)


def test_tuner_keeps_the_fastest_value_of_each_parameter(scripted) -> None:
    want = {"threads": 1, "gemm_min_m": 8, "panel_bytes": 1 << 16, "outer_min_rows": 64}  # avx2 caps
    r = scripted(lambda p, m: 1.0 + 0.1 * sum(p[k] != v for k, v in want.items()))
    assert r["params"] == {**r["start"], **want} and not r["kept_start"]
    assert r["start_seconds"] == pytest.approx(3 * 1.4) and r["speedup"] == pytest.approx(1.4)  # M = 1, 8, 128
    assert {t["value"] for t in r["trials"] if t["param"] == "threads"} <= set(tuning.CPU_SEARCH_SPACE["threads"])


def test_tuner_keeps_the_start_when_nothing_beats_it(scripted) -> None:
    flat = scripted(lambda p, m: 1.0)  # no parameter matters: every tie keeps the start's value
    assert flat["params"] == flat["start"] and flat["speedup"] == 1.0 and not flat["kept_start"]

    def misleading(p, m):  # gemm_min_m = 16 wins its stage (M = 2, 4, 16) but loses at M = 8 in the final check
        return 1.0 + (0.0 if p["gemm_min_m"] != 16 else -1.0 if m in (2, 4, 16) else 2.0 if m == 8 else 0.0)

    r = scripted(misleading)
    assert any(t["param"] == "gemm_min_m" and t["value"] == 16 for t in r["trials"])
    assert r["kept_start"] and r["params"] == r["start"] and r["speedup"] == 1.0
    assert r["tuned_seconds"] > r["start_seconds"]


def test_tuner_cuts_over_to_int_mm_where_packed_stops_winning(scripted) -> None:
    def cost(p, m):  # packed: m; int_mm: 20 + m / 2, so packed wins up to M = 39
        return float(m) if m <= p["gemv_max_m"] or p["gemm_impl"] == "numba" else 20 + m / 2

    r = scripted(cost, vnni=True)
    assert r["start"]["gemm_impl"] == "int_mm" and r["params"]["gemm_impl"] == "int_mm"
    assert r["params"]["gemv_max_m"] == 32 and not r["kept_start"]  # 64 is the first candidate int_mm wins
    assert [t["value"] for t in r["trials"] if t["param"] == "gemv_max_m"] == [1, 4, 8, 16, 32, 64]
