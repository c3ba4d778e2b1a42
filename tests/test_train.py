"""Training loop: real (tiny) training on a WikiText-2 slice, exact resume after Ctrl-C, NaN stop, checkpoints,
schedules, grad accumulation and the torch.distributed path at world size 1."""

from __future__ import annotations

import io
import json
import math
import signal

import pytest
import torch

from bitnet_fast.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from bitnet_fast.config import TrainConfig
from bitnet_fast.plumbing import BitnetFastWarning
from bitnet_fast.train import TrainingError, TrainState, side_by_side, train, train_pair


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITNET_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cfg(wikitext_dir, out, **kw) -> TrainConfig:
    base = dict(preset="tiny", linear="bitnet", out=str(out), epochs=3, batch_size=8, seq_len=32, lr=3e-3,
                max_lines=60, vocab_size=256, data_dir=str(wikitext_dir), progress=False, ckpt_every=1000)
    return TrainConfig(**{**base, **kw})


def _weights(out) -> dict[str, torch.Tensor]:
    return latest_checkpoint(out)["model"]


@pytest.fixture(scope="module")
def full_run(wikitext_dir, tmp_path_factory):
    """An uninterrupted 3-epoch tiny BitNet run (shared by the tests below)."""
    out = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITNET_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        return out, train(_cfg(wikitext_dir, out))


@pytest.mark.slow
def test_tiny_bitnet_learns_and_reports(full_run):
    out, report = full_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in ("model", "preset", "parameters", "initial_valid_ppl", "final_valid_ppl", "peak_rss_bytes", "config",
                "tokenizer", "git_commit"):
        assert key in report, key
    assert report["model"] == "bitnet" and report["preset"] == "tiny" and report["peak_rss_bytes"] > 0
    eps = report["epochs"]
    assert [e["epoch"] for e in eps] == [1, 2, 3]
    losses, ppls = [e["train_loss"] for e in eps], [e["valid_ppl"] for e in eps]
    assert losses[0] > losses[1] > losses[2], losses  # loss falls every epoch
    assert report["initial_valid_ppl"] > ppls[0] > ppls[1] > ppls[2], ppls
    for e in eps:
        assert e["valid_word_ppl"] > e["valid_ppl"] > 1 and e["tokens_per_sec"] > 0 and e["seconds"] > 0
    assert report["initial_valid_ppl"] == pytest.approx(256, rel=0.5)  # untrained: ~uniform over the vocab
    assert len(list((out / "checkpoints").glob("*.pt"))) == 2  # keep_last
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 3 and "step" in events


@pytest.mark.slow
@pytest.mark.parametrize("extra", [7, 0], ids=["mid-epoch", "last-step-of-epoch"])
def test_resume_after_ctrl_c_is_bit_identical(full_run, wikitext_dir, tmp_path, extra):
    out_full, report_full = full_run
    stop_at = report_full["steps_per_epoch"] + extra  # 7 steps into epoch 2, or epoch 1's last (before its eval)

    def ctrl_c(step: int, loss: float) -> None:
        if step == stop_at:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, delivered to this thread

    part = train(_cfg(wikitext_dir, tmp_path), on_step=ctrl_c)
    assert part["interrupted"] and part["steps"] == stop_at and len(part["epochs"]) == (1 if extra else 0)
    assert load_checkpoint(sorted((tmp_path / "checkpoints").glob("*.pt"))[-1])["step"] == stop_at
    resumed = train(_cfg(wikitext_dir, tmp_path, resume=True))
    assert not resumed["interrupted"], f"resumed run stopped by {resumed['stop_signal']}"
    assert resumed["steps"] == report_full["steps"]
    a, b = _weights(out_full), _weights(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for ea, eb in zip(report_full["epochs"], resumed["epochs"], strict=True):
        assert ea["train_loss"] == eb["train_loss"] and ea["valid_ppl"] == eb["valid_ppl"]


def test_checkpoints_hold_only_tensors_and_plain_types(full_run):
    out, report = full_run
    path = sorted((out / "checkpoints").glob("*.pt"))[-1]
    envelope = torch.load(path, weights_only=True)  # no pickled classes: loadable without executing code
    ckpt = torch.load(io.BytesIO(envelope["payload"].numpy().tobytes()), weights_only=True)
    assert ckpt.keys() == load_checkpoint(path).keys()
    state = TrainState(**ckpt["state"])
    assert state.step == ckpt["step"] == report["steps"] and state.epoch == 3 and state.batch == 0
    assert state.epochs == report["epochs"] and state.initial_eval["ppl"] == report["initial_valid_ppl"]


def test_state_of_a_checkpoint_from_before_train_state():
    legacy = {"pos": {"step": 7, "epoch": 1, "batch": 3}, "acc": {"loss": 2.5, "n": 2, "tokens": 64, "seconds": 0.5},
              "report": {"epochs": [{"epoch": 1}], "initial_valid_loss": 5.0, "initial_valid_ppl": 148.4,
                         "initial_valid_word_ppl": 300.0}}
    assert TrainState.from_checkpoint(legacy) == TrainState(
        7, 1, 3, 2.5, 2, 64, 0.5, {"loss": 5.0, "ppl": 148.4, "word_ppl": 300.0}, [{"epoch": 1}])


def test_corrupt_checkpoint_falls_back_to_the_previous_one(full_run, tmp_path):
    import shutil

    out, _ = full_run
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    newest, older = sorted((tmp_path / "checkpoints").glob("*.pt"))[::-1]
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(newest)
    with pytest.warns(BitnetFastWarning, match="skipping"):
        assert latest_checkpoint(tmp_path)["step"] == load_checkpoint(older)["step"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.pt")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(wikitext_dir, tmp_path, monkeypatch):
    import bitnet_fast.model

    real_loss, calls = bitnet_fast.model.linear_cross_entropy, {"n": 0}

    def poisoned(*args, **kw):
        loss = real_loss(*args, **kw)
        if torch.is_grad_enabled():  # a training step's loss, not an evaluation's
            calls["n"] += 1
            if calls["n"] > 12:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(bitnet_fast.model, "linear_cross_entropy", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 12 .*step-0000010\.pt"):
        train(_cfg(wikitext_dir, tmp_path, linear="fp", epochs=1, ckpt_every=5))
    assert load_checkpoint(tmp_path / "checkpoints" / "step-0000010.pt")["step"] == 10


def test_int8_grad_input_trains_and_is_recorded(wikitext_dir, tmp_path):
    """--grad-input int8 reaches every BitLinear (the run differs from the exact one after the first update) and is
    stored in the report, so a resume continues with the same input gradient."""
    exact = train(_cfg(wikitext_dir, tmp_path / "exact", epochs=1, max_steps=3))
    int8 = train(_cfg(wikitext_dir, tmp_path / "int8", epochs=1, max_steps=3, grad_input="int8"))
    assert int8["train_config"]["grad_input"] == "int8" and exact["train_config"]["grad_input"] == "exact"
    assert int8["initial_valid_ppl"] == exact["initial_valid_ppl"]  # same model before any update
    assert int8["final_valid_ppl"] != exact["final_valid_ppl"]
    assert math.isfinite(int8["final_valid_ppl"]) and int8["final_valid_ppl"] < int8["initial_valid_ppl"]


def test_grad_accumulation_matches_a_bigger_batch(wikitext_dir, tmp_path):
    one = train(_cfg(wikitext_dir, tmp_path / "a", linear="fp", epochs=1, max_steps=4))
    two = train(_cfg(wikitext_dir, tmp_path / "b", linear="fp", epochs=1, max_steps=4, batch_size=4, grad_accum=2))
    assert one["epochs"][0]["train_loss"] == pytest.approx(two["epochs"][0]["train_loss"], rel=1e-5)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def test_distributed_world_size_one_matches_plain(wikitext_dir, tmp_path, monkeypatch):
    import torch.distributed as dist

    plain = train(_cfg(wikitext_dir, tmp_path / "plain", epochs=1, max_steps=3))
    # MASTER_PORT=0: rank 0's TCPStore binds a free port itself, no pick-close-reuse race with other processes
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="0").items():
        monkeypatch.setenv(k, v)
    try:
        ddp = train(_cfg(wikitext_dir, tmp_path / "ddp", epochs=1, max_steps=3, distributed=True))
        assert dist.is_initialized() and ddp["world_size"] == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert ddp["epochs"][0]["train_loss"] == plain["epochs"][0]["train_loss"]
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ddp")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pair_trains_in_turn_each_run_as_it_would_alone(wikitext_dir, tmp_path):
    """train_pair takes one step of each model in turn; each run draws from its own random state, so a draw in one
    run's step (as sampling or dropout would make) leaves the other's weights, losses and stored RNG as a solo run's."""
    seen = []

    def on_step(linear: str, step: int, loss: float) -> None:
        seen.append((linear, step))
        if linear == "bitnet":
            torch.rand(3)

    pair = train_pair(_cfg(wikitext_dir, tmp_path / "pair", epochs=1, max_steps=3), on_step=on_step)
    assert seen == [(m, s) for s in (1, 2, 3) for m in ("bitnet", "fp")]
    solo = train(_cfg(wikitext_dir, tmp_path / "solo", linear="fp", epochs=1, max_steps=3))
    assert pair["fp"]["final_valid_ppl"] == solo["final_valid_ppl"]
    assert pair["fp"]["epochs"][0]["train_loss"] == solo["epochs"][0]["train_loss"]
    a, b = latest_checkpoint(tmp_path / "pair" / "fp"), latest_checkpoint(tmp_path / "solo")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert json.loads((tmp_path / "pair" / "summary.json").read_text()).keys() == {"bitnet", "fp"}
    assert "tokens/s bitnet / fp" in side_by_side(pair)


def test_pair_ctrl_c_stops_both_and_resume_finishes_both(wikitext_dir, tmp_path):
    def ctrl_c(linear: str, step: int, loss: float) -> None:
        if (linear, step) == ("bitnet", 2):
            signal.raise_signal(signal.SIGINT)

    cfg = _cfg(wikitext_dir, tmp_path, epochs=1, max_steps=4)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under a shell's background job
    part = train_pair(cfg, on_step=ctrl_c)
    # bitnet's step 2 raised it; fp's next turn saw it before its step 2: both checkpointed where they stopped
    assert all(r["interrupted"] for r in part.values()) and [r["steps"] for r in part.values()] == [2, 1]
    assert [load_checkpoint(sorted((tmp_path / m / "checkpoints").glob("*.pt"))[-1])["step"] for m in part] == [2, 1]
    assert not (tmp_path / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
    done = train_pair(TrainConfig(**{**cfg.__dict__, "resume": True}))
    assert [r["steps"] for r in done.values()] == [4, 4] and not any(r["interrupted"] for r in done.values())
    assert (tmp_path / "summary.json").is_file()
