"""Ctrl-C on a real `bitnet-fast train` process: the first SIGINT finishes the step, writes a checkpoint and exits
130; a second SIGINT aborts at once (130, no checkpoint, no traceback).

The child is the real CLI with two observers patched in: every optimizer step prints IN-STEP and then sleeps, so
the test can signal while a step is running, and the stop handler prints HANDLED after it ran, so the second
signal is sent only after the first was taken (two SIGINTs sent back to back can merge into one). Signals,
handlers, checkpointing and exit codes are the product's own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from bitnet_fast.checkpoint import list_checkpoints, load_checkpoint

CHILD = r"""
import sys, time, torch
from bitnet_fast import distributed
real_clip, real_handler = torch.nn.utils.clip_grad_norm_, distributed.StopSignals.__call__

def in_step(*args, **kwargs):
    print("IN-STEP", flush=True)
    time.sleep(float(sys.argv[1]))  # a signal handler runs during the sleep, which then resumes
    return real_clip(*args, **kwargs)

def handled(self, signum, frame):
    real_handler(self, signum, frame)
    print("HANDLED", flush=True)

torch.nn.utils.clip_grad_norm_ = in_step
distributed.StopSignals.__call__ = handled
from bitnet_fast.cli import main
main(sys.argv[2:], prog_name="bitnet-fast")
"""
WAIT = 300  # generous bound on every wait: the box may be busy; a hang fails instead of blocking CI


def _start(wikitext_dir, folder, step_seconds: float) -> tuple[subprocess.Popen, object]:
    """The child training into folder/run; killed after WAIT seconds whatever happens (a hang fails the test)."""
    args = ["train", "--model", "bitnet", "--preset", "tiny", "--max-steps", "50", "--batch-size", "4",
            "--seq-len", "16", "--max-lines", "40", "--vocab-size", "128", "--no-progress",
            "--data-dir", str(wikitext_dir), "--out", str(folder / "run")]
    folder.mkdir()
    env = {**os.environ, "BITNET_FAST_CACHE": str(folder / "cache")}
    err = open(folder / "stderr.txt", "w+")  # a file: a full stderr pipe could block the child
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(step_seconds), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=err)
    watchdog = threading.Timer(WAIT, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    return proc, err


def _wait_for(proc: subprocess.Popen, err, line: str) -> None:
    while True:
        got = proc.stdout.readline()
        if got.strip() == line:
            return
        if not got:
            proc.wait(WAIT)
            err.seek(0)
            pytest.fail(f"child exited {proc.returncode} before printing {line}:\n{err.read()[-3000:]}")


def _finish(proc: subprocess.Popen, err) -> tuple[int, str]:
    try:
        code = proc.wait(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.stdout.close()
    err.seek(0)
    text = err.read()
    err.close()
    return code, text


def test_ctrl_c_once_checkpoints_and_twice_aborts(wikitext_dir, tmp_path):
    """Two runs side by side (their start-up, mostly imports, overlaps): one gets one SIGINT, the other two."""
    once, once_err = _start(wikitext_dir, tmp_path / "once", step_seconds=1.0)
    twice, twice_err = _start(wikitext_dir, tmp_path / "twice", step_seconds=3600.0)  # would never end by itself
    try:
        _wait_for(once, once_err, "IN-STEP")
        once.send_signal(signal.SIGINT)
        _wait_for(twice, twice_err, "IN-STEP")
        twice.send_signal(signal.SIGINT)
        _wait_for(twice, twice_err, "HANDLED")
        twice.send_signal(signal.SIGINT)
    except BaseException:
        once.kill(), twice.kill()  # no waiting out a 3600 s step when the test already failed
        raise
    finally:
        (code1, text1), (code2, text2) = _finish(once, once_err), _finish(twice, twice_err)

    assert code1 == 130, text1  # one Ctrl-C: the step in flight finished, was checkpointed, then it stopped
    assert "Traceback" not in text1 and "interrupted (SIGINT): checkpoint saved in" in text1, text1
    ckpts = list_checkpoints(tmp_path / "once" / "run")
    assert [p.name for p in ckpts] == ["step-0000001.pt"], text1
    assert load_checkpoint(ckpts[0])["step"] == 1

    assert code2 == 130, text2  # two: aborted inside the step, nothing written
    assert "Traceback" not in text2 and text2.strip().splitlines()[-1] == "interrupted", text2
    assert list_checkpoints(tmp_path / "twice" / "run") == []
