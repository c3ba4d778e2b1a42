"""Work per rank from a measured speed: how many sequences each rank takes per micro-batch and per optimizer step,
and how many steps fit in a checkpoint interval. `bitnet-fast calibrate` writes the measurement and this plan into
its JSON (`models[].per_rank`); `bitnet-fast train --batch-from CALIBRATION.json` reads them back (`from_file`),
checks that they were measured for the model it is about to train, and plans again for the world size it runs at.

The rule (`plan_work`), for one rank that trains `tokens_per_sec` tokens a second at sequence length `seq_len`:

* a micro-batch (one forward + backward) should take about `target_seconds`: batch = max(1, floor(rate x target /
  seq_len)) sequences;
* with a wished global batch G (sequences per optimizer step over all ranks) each rank needs share = ceil(G / W)
  sequences per step, in grad_accum micro-batches of at most that batch: at least a = ceil(share / batch) of them.
  grad_accum is the smallest value in [a, 2a] that divides the share exactly (the global batch is then G when W
  divides G); when none does, a micro-batches of ceil(share / a) sequences (the share rounded up). The step then
  takes about grad_accum times the target;
* steps per checkpoint interval = max(1, floor(60 x target_minutes / predicted step seconds)).

It is a throughput model (the step time is the rank's compute at its measured rate): communication, evaluation and
checkpoint writing come on top, and the slowest rank sets everyone's pace under DDP.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .plumbing import UserError

CALIBRATION_SCHEMA = "bitnet-fast/calibrate/2"  # calibrate.SCHEMA; 2: models[].per_rank


class CalibrationError(UserError):
    """A --batch-from file that cannot size this run; the message names the option and the fix."""


def check_positive(name: str, value: float | None, integer: bool = False) -> None:
    """ValueError naming `name` unless `value` is None or a positive finite number (integer: a positive int)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name}={value!r} must be {kind}")


def plan_work(tokens_per_sec: float, seq_len: int, target_seconds: float, world_size: int = 1,
              global_batch: int | None = None, target_minutes: float | None = None) -> dict[str, Any]:
    """Per-rank batch and grad-accum for a rank measured at `tokens_per_sec` (see the module docstring for the rule).

    Returns {batch_size, grad_accum, world_size, global_batch (sequences per optimizer step, all ranks),
    tokens_per_step (all ranks), predicted_step_seconds, steps_per_interval (None without target_minutes)}.
    """
    check_positive("tokens_per_sec", tokens_per_sec)
    check_positive("seq_len", seq_len, integer=True)
    check_positive("target_seconds", target_seconds)
    check_positive("world_size", world_size, integer=True)
    check_positive("global_batch", global_batch, integer=True)
    check_positive("target_minutes", target_minutes)
    fits = max(1, math.floor(tokens_per_sec * target_seconds / seq_len))  # sequences per target_seconds
    if global_batch is None:
        batch, accum = fits, 1
    else:
        share = -(-global_batch // world_size)
        least = -(-share // fits)
        accum = next((a for a in range(least, 2 * least + 1) if share % a == 0), least)
        batch = -(-share // accum)
    step_s = batch * accum * seq_len / tokens_per_sec
    steps = None if target_minutes is None else max(1, math.floor(60 * target_minutes / step_s))
    return {"batch_size": batch, "grad_accum": accum, "world_size": world_size,
            "global_batch": batch * accum * world_size, "tokens_per_step": batch * accum * world_size * seq_len,
            "predicted_step_seconds": step_s, "steps_per_interval": steps}


def per_rank(tokens_per_sec: float, threads: int, seq_len: int, target_seconds: float, world_size: int,
             global_batch: int | None, target_minutes: float | None) -> dict[str, Any]:
    """The `per_rank` entry of a calibrate model row: the measurement, the wishes it was planned for, and the plan."""
    return {"tokens_per_sec": tokens_per_sec, "threads": threads, "seq_len": seq_len,
            "target_seconds": target_seconds, "target_minutes": target_minutes, "global_batch_wish": global_batch,
            "plan": plan_work(tokens_per_sec, seq_len, target_seconds, world_size, global_batch, target_minutes)}


def from_file(path: str | Path, preset: str, linear: str, seq_len: int | None, world_size: int) -> dict[str, Any]:
    """The row of calibration file `path` measured for `preset`/`linear`, planned again at `world_size`.

    `seq_len` is the --seq-len given on the command line (None: take the calibration's). Returns
    {"measured": the row's per_rank entry, "plan": plan_work(...) at world_size, "seq_len", "threads"}.
    Raises CalibrationError (missing, unreadable, not a calibration, another preset, model or sequence length).
    """
    path = Path(path)
    fix = f"write it with `bitnet-fast calibrate --preset {preset} --json > {path}`"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"--batch-from {path}: no such file; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"--batch-from {path} is not a readable calibration ({e}); {fix}") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != CALIBRATION_SCHEMA:
        what = f"has schema {schema!r}" if schema else "is not a calibration file"
        raise CalibrationError(f"--batch-from {path} {what}, not {CALIBRATION_SCHEMA!r}; {fix}")
    rows = [m for m in data.get("models", []) if isinstance(m, dict)]
    row = next((m for m in rows if m.get("preset") == preset and m.get("linear") == linear), None)
    if row is None:
        have = ", ".join(f"{m.get('preset')}/{m.get('linear')}" for m in rows) or "nothing"
        raise CalibrationError(f"--batch-from {path} was measured for {have}, not preset {preset} with --model "
                               f"{linear}; {fix}")
    measured = row.get("per_rank")
    try:
        cal_len = int(measured["seq_len"])
        plan = plan_work(float(measured["tokens_per_sec"]), cal_len, float(measured["target_seconds"]),
                         world_size, measured["global_batch_wish"], measured["target_minutes"])
    except (TypeError, KeyError, ValueError) as e:
        raise CalibrationError(f"--batch-from {path}: the {preset}/{linear} entry is damaged ({e}); {fix}") from None
    if seq_len is not None and seq_len != cal_len:
        raise CalibrationError(f"--batch-from {path} was measured at --seq-len {cal_len}, not {seq_len}; drop "
                               f"--seq-len, or calibrate with --seq-len {seq_len}")
    return {"measured": measured, "plan": plan, "seq_len": cal_len, "threads": measured.get("threads")}
