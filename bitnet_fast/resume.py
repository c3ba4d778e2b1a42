"""Opening a run folder for training: start fresh, resume exactly, or refuse, before anything is deleted.

    fresh start   OUT must hold no checkpoints (an earlier run's are refused unless `overwrite`, which deletes
                  them); a writable OUT/checkpoints is checked now, not at the first save.
    --resume      the newest checkpoint that verifies is the starting point; newer ones that fail verification are
                  renamed to `*.bad` (kept, never deleted). If none verifies the run is refused (nothing is
                  deleted); if there are none at all it starts fresh, saying so (a torchrun restart can keep
                  `--resume` in its command from the first launch on).

A resumed run continues with the checkpoint's settings: every TrainConfig field but this launch's INVOCATION
settings is taken from the checkpoint. RESUME_SAFE ones (how long, how often to write) may be changed
explicitly; any other value that the caller set explicitly and that differs is an error naming it. The CLI
passes the flags given on the command line as `explicit` (defaults never conflict); a library call without
`explicit` counts every field as explicit.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .checkpoint import list_checkpoints, newest_checkpoint, remove_checkpoints, set_aside
from .plumbing import UserError, warn

# Settings of this launch, never taken from the checkpoint: where it reads and writes, how it shows progress.
INVOCATION = frozenset({"resume", "overwrite", "out", "data_dir", "offline", "progress", "distributed"})
# Settings a resumed run may change when asked explicitly (else the checkpoint's are kept): how long it runs and
# how often it writes. Changing epochs/max_steps re-plans the lr schedule's remaining steps; changes are recorded.
# batch_size and grad_accum may change with the number of ranks as long as the global batch stays the same, which
# distributed.Comm.load_state checks (a resume at another world size).
RESUME_SAFE = INVOCATION | {"epochs", "max_steps", "ckpt_every", "keep_last", "log_every", "eval_batch_size",
                            "batch_size", "grad_accum"}


class ResumeError(UserError):
    """A run folder that cannot be started or resumed as asked; the message says what to do."""


@dataclass
class Opening:
    """What `open_run` decided: the config to train with, the checkpoint to resume from (None: fresh), the run's
    id, and the settings changed on resume ({field: (old, new)})."""

    cfg: Any
    ckpt: dict | None
    run_id: str
    changed: dict[str, tuple]


def flag(name: str, cfg: Any) -> str:
    """How the user spells field `name`: its CLI flag when it has one, else `name=` (library-only fields)."""
    f = next(f for f in fields(cfg) if f.name == name)
    return "--" + name.replace("_", "-") if f.metadata.get("help") else f"{name}="


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def resume_config(cfg: Any, saved: dict, explicit: Collection[str] | None = None) -> tuple[Any, dict[str, tuple]]:
    """`cfg` with the fields of the checkpoint's train_config `saved`, except this launch's INVOCATION settings and
    the RESUME_SAFE ones given explicitly; ResumeError naming each other explicit field that differs. Returns
    (config, {safe field changed: (old, new)})."""
    given = {f.name for f in fields(cfg)} if explicit is None else set(explicit)
    taken, conflicts, changed = {}, [], {}
    for f in fields(cfg):
        if f.name not in saved or _plain(saved[f.name]) == _plain(getattr(cfg, f.name)):
            continue
        old, new = saved[f.name], getattr(cfg, f.name)
        if f.name in INVOCATION:
            continue
        if f.name in RESUME_SAFE and f.name in given:
            changed[f.name] = (old, new)
        elif f.name in given:
            conflicts.append(f"{flag(f.name, cfg)} {new!r} (the run has {old!r})")
        else:
            taken[f.name] = tuple(old) if isinstance(f.default, tuple) else old
    if conflicts:
        raise ResumeError(f"--resume continues the run exactly as it was trained, but {'; '.join(conflicts)}. Drop "
                          f"{'this flag' if len(conflicts) == 1 else 'these flags'} to continue the run, or train "
                          "with the new settings into another --out")
    return replace(cfg, **taken), changed


def open_run(cfg: Any, rank: int = 0, explicit: Collection[str] | None = None) -> Opening:
    """Decide how the run in cfg.out starts (see the module docstring). Only rank 0 renames or deletes files."""
    out = Path(cfg.out)
    if cfg.resume:
        path, ckpt, bad = newest_checkpoint(out)
        if ckpt is None and bad:
            raise ResumeError(
                f"--resume: none of the {len(bad)} checkpoint(s) in {out}/checkpoints verifies (newest: {bad[0][1]});"
                " nothing was deleted. Move them away to start over, or pass --overwrite instead of --resume")
        for p, reason in bad:
            if rank == 0:
                warn(f"{reason}; kept as {set_aside(p).name}, resuming from {path.name}")
        if ckpt is None:
            warn(f"--resume: no checkpoint in {out}/checkpoints to resume from; starting a new run")
        else:
            new_cfg, changed = resume_config(cfg, ckpt["train_config"], explicit)
            return Opening(new_cfg, ckpt, ckpt.get("run_id") or uuid.uuid4().hex, changed)
    elif list_checkpoints(out) and rank == 0:
        if not cfg.overwrite:
            ckpts = list_checkpoints(out)
            raise ResumeError(f"{out} holds {len(ckpts)} checkpoint(s) of an earlier run (newest {ckpts[-1].name}); "
                              "pass --resume to continue it, --overwrite to delete them and start over, or choose "
                              "another --out")
        warn(f"--overwrite: deleted {remove_checkpoints(out)} checkpoint(s) of the earlier run in {out}")
    if rank == 0:
        _check_writable(out / "checkpoints")
    return Opening(cfg, None, uuid.uuid4().hex, {})


def _check_writable(folder: Path) -> None:
    """Fail now, not at the first checkpoint minutes later, when checkpoints cannot be written to `folder`."""
    probe = folder / f".write-test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ResumeError(f"cannot write checkpoints to {folder}: {e.strerror}; choose a writable --out") from None
