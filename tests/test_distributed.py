"""Multi-rank training for real: torchrun with 2 gloo ranks on 127.0.0.1 (1 thread each) against 1 rank with the
same global batch, the int8 error-feedback hook (its residual, convergence, bytes, exact resume), a worker killed
with kill -9 under `torchrun --max-restarts`, SIGTERM, local SGD, and the refusals. Every launch is bounded in
time and its whole process group is killed if it overruns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bitnet_fast.distributed import Comm, DistributedError, Int8ErrorFeedback, int8_ef_hook, quantize_int8
from bitnet_fast.train import TrainConfig, train

TINY = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--max-lines", "60",
        "--vocab-size", "256", "--no-progress", "--log-every", "1", "--ckpt-every", "1000"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, wikitext_dir) -> dict[str, str]:
    """Environment of the launched ranks: one thread each, loopback only, a cache shared by the module."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    return {**os.environ, "BITNET_FAST_CACHE": str(cache), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1", "DATA": str(wikitext_dir)}


def launch(env: dict, out: Path, *args: str, nproc: int = 2, restarts: int = 0) -> subprocess.Popen:
    """`torchrun ... -m bitnet_fast.cli train` on 127.0.0.1; port 0: the rendezvous store binds a free port itself
    (no pick-then-bind race). In its own session, so that `finish` can kill everything it started."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", str(restarts),
           "-m", "bitnet_fast.cli", "train", "--distributed", "--data-dir", env["DATA"], "--out", str(out),
           *TINY, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 50) -> tuple[int, str]:
    """Wait for a launch; past `timeout` kill its whole process group and fail."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch overran {timeout} s and was killed; output:\n{out[-3000:]}")


def run(env: dict, out: Path, *args: str, **kw) -> dict:
    rc, text = finish(launch(env, out, *args, **kw))
    assert rc == 0, text[-3000:]
    return json.loads((out / "report.json").read_text())


def step_losses(out: Path) -> dict[int, float]:
    """Step -> logged loss (the last one logged for a step, after a restart replayed it)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["event"] == "step"}


def weights(out: Path) -> dict[str, torch.Tensor]:
    from bitnet_fast.checkpoint import latest_checkpoint

    return latest_checkpoint(out)["model"]


def wait_for(pred, timeout: float, proc: subprocess.Popen) -> None:
    stop = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None or time.monotonic() > stop:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"condition not reached (rc {proc.poll()}): {proc.communicate()[0][-3000:]}")
        time.sleep(0.02)


def logged_step(out: Path, n: int) -> bool:
    p = out / "metrics.jsonl"
    return p.is_file() and any(f'"step": {n},' in line for line in p.read_text().splitlines())


# ------------------------------------------------------------------------------------------------ in-process units
@pytest.fixture
def group():
    """A world-size-1 gloo group on an in-memory store: the hook's collectives run for real, without a port."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_quantize_int8_error_is_within_half_a_step():
    x = torch.randn(1000) * 3
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert (x - q.float() * s).abs().max() <= s / 2 + 1e-6
    assert quantize_int8(torch.zeros(5))[0].eq(0).all()


def test_int8_hook_carries_the_residual(group, one_thread):
    """Same gradient G every step: what DDP hands the optimizer differs from G (it was quantized), but what was
    sent over k steps plus the residual kept is exactly k*G: nothing is lost, it is sent later."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = Int8ErrorFeedback(model, world=1)
    ddp.register_comm_hook(state, int8_ef_hook)
    x = torch.randn(64, 16)
    true = [g.detach().clone() for g in torch.autograd.grad(model(x).square().mean(), list(model.parameters()))]
    sent = [torch.zeros_like(g) for g in true]
    k = 5
    for step in range(k):
        ddp(x).square().mean().backward()
        for acc, p, g in zip(sent, model.parameters(), true, strict=True):
            if step == 0:
                assert not torch.equal(p.grad, g)  # quantized, not the fp32 gradient
            acc += p.grad
        model.zero_grad()
    names = [n for n, _ in model.named_parameters()]
    for n, acc, g in zip(names, sent, true, strict=True):
        r = state.residuals[n]
        assert r.abs().max() > 0
        torch.testing.assert_close(acc + r, k * g, rtol=1e-5, atol=1e-6)
    assert state.payload_bytes * 4 == pytest.approx(state.dense_bytes, rel=0.01)
    flat = state.flat_residual()  # the checkpointed form round-trips
    state.set_flat_residual(flat * 2)
    assert torch.equal(state.residuals[names[0]], 2 * flat[: model[0].weight.numel()].reshape(32, 16))


def test_compression_and_local_sgd_are_refused_together():
    with pytest.raises(DistributedError, match="do not combine"):
        Comm(torch.nn.Linear(2, 2), 0, 1, grad_compression="int8", sync_every=4)
    with pytest.raises(ValueError, match="sync_every"):
        TrainConfig(sync_every=0)


# ------------------------------------------------------------------------------------------------ 2 ranks vs 1 rank
@pytest.mark.slow
def test_two_ranks_match_one_rank(env, tmp_path, monkeypatch, capsys):
    """20 steps at global batch 8: 2 ranks x 4 under torchrun vs 1 process x 8, per-step losses of both models."""
    two = tmp_path / "two"
    proc = launch(env, two, "--model", "both", "--max-steps", "20")
    monkeypatch.setenv("BITNET_FAST_CACHE", env["BITNET_FAST_CACHE"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = {m: train(TrainConfig(preset="tiny", linear=m, out=str(tmp_path / "one" / m), batch_size=8, seq_len=32,
                                lr=3e-3, max_lines=60, vocab_size=256, data_dir=env["DATA"], progress=False,
                                log_every=1, ckpt_every=1000, max_steps=20)) for m in ("bitnet", "fp")}
    rc, text = finish(proc)
    assert rc == 0, text[-3000:]
    for model, tol in (("fp", 1e-4), ("bitnet", 1e-2)):
        report = json.loads((two / model / "report.json").read_text())
        assert report["world_size"] == 2 and report["steps"] == 20
        assert report["global_batch"] == {"batch_size": 4, "grad_accum": 1, "world_size": 2, "sequences": 8,
                                          "tokens": 256}
        a, b = step_losses(two / model), step_losses(tmp_path / "one" / model)
        assert sorted(a) == sorted(b) == list(range(1, 21))
        worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in a)
        print(f"{model}: largest relative step-loss difference 2 ranks vs 1 rank over 20 steps: {worst:.2e}")
        assert worst <= tol, (model, worst)
        assert report["final_valid_ppl"] == pytest.approx(one[model]["final_valid_ppl"], rel=tol)
    # rank 0 alone prints, evaluates and writes: one banner and one epoch line per model, one run folder each
    assert text.count("global batch 4 x 1 accum x 2 ranks = 8 sequences") == 2, text
    assert text.count("epoch 1: train loss") == 2, text
    assert sorted(p.name for p in (two / "fp" / "checkpoints").iterdir()) == ["step-0000020.pt",
                                                                             "step-0000020.pt.sha256"]
