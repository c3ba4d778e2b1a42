"""Training checkpoints: save, verify, list, load and prune them, and build a model from one.

A run keeps its checkpoints in `OUT/checkpoints/step-NNNNNNN.pt`, each with a `step-NNNNNNN.pt.sha256` sidecar
(`sha256sum -c` format). Both are written atomically (plumbing.atomic_write), the checkpoint first.

Nothing loaded from a checkpoint can run code: files are read with `torch.load(weights_only=True)`, which
rebuilds only tensors and plain Python types (dict, list, tuple, str, int, float, bool, None); a file that needs
anything else is refused. The file is an envelope `{"format", "version", "sha256", "payload"}` whose payload
(a uint8 tensor) is the `torch.save` of the checkpoint dict and `sha256` its digest, so a checkpoint verifies
without its sidecar (which is checked too when present). Files from before the envelope (the dict itself) still
load, with a warning when no sidecar vouches for them. The checkpoint dict:

    model, optimizer, scheduler    state_dicts
    model_config, train_config     dicts (ModelConfig.to_dict(), dataclasses.asdict(TrainConfig))
    tokenizer                      the tokenizer as its JSON string
    state                          the trainer's TrainState as a dict (position, running statistics, history)
    rng                            rng_state(): {"torch": uint8 tensor, "python": random.getstate() tuple}
    step                           optimizer steps taken (= state["step"]), for tools that want only that
    run_id                         the run the checkpoint belongs to (pruning deletes only its own run's files)
    distributed                    the ranks' part (distributed.Comm.state_dict: world size, global batch, residuals)
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
import warnings
from pathlib import Path

import torch

from .model import LM, ModelConfig, build_model
from .plumbing import UserError, atomic_write, warn

REQUIRED = ("model", "model_config", "train_config", "tokenizer", "step")
ENVELOPE, ENVELOPE_VERSION = "bitnet-fast-checkpoint", 2


class CheckpointError(UserError):
    """A checkpoint that cannot be read, fails its checksum or is not a bitnet-fast training checkpoint."""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """The checkpoints of the run in `out`, oldest first (unverified)."""
    return sorted((Path(out) / "checkpoints").glob("step-*.pt"))


def encode_checkpoint(ckpt: dict) -> bytes:
    """The bytes of a checkpoint file: the envelope around `torch.save(ckpt)` and its sha256."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    payload = buf.getvalue()
    envelope = {"format": ENVELOPE, "version": ENVELOPE_VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    buf = io.BytesIO()
    torch.save(envelope, buf)
    return buf.getvalue()


def save_checkpoint(out: str | os.PathLike, ckpt: dict, keep_last: int, known: dict | None = None) -> Path:
    """Write `ckpt` as OUT/checkpoints/step-<ckpt["step"]>.pt with its sha256 sidecar, read it back to verify it,
    then prune the run's older checkpoints to `keep_last` (`prune_checkpoints`, with `known` as its cache).
    Returns the path written."""
    path = Path(out) / "checkpoints" / f"step-{ckpt['step']:07d}.pt"
    data = encode_checkpoint(ckpt)
    digest = hashlib.sha256(data).hexdigest()
    _sidecar(path).unlink(missing_ok=True)  # a re-saved step: never leave a sidecar vouching for replaced bytes
    atomic_write(path, data)
    atomic_write(_sidecar(path), f"{digest}  {path.name}\n")
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise CheckpointError(f"{path} reads back different from what was written (failing disk?); older "
                              "checkpoints were kept")
    known = {} if known is None else known
    known[path] = ckpt.get("run_id")
    prune_checkpoints(out, keep_last, ckpt.get("run_id"), known)
    return path


def prune_checkpoints(out: str | os.PathLike, keep_last: int, run_id: str | None, known: dict) -> None:
    """Delete the oldest checkpoints of run `run_id` in `out` (and their sidecars) so that `keep_last` of them
    remain. Only a checkpoint that loads, verifies and names `run_id` is ever deleted: another run's, a
    corrupt or a legacy (run-less) checkpoint is kept. `known` caches {path: run id} between calls, so each
    older file is read once per process."""
    if run_id is None:
        return
    ours = []
    for path in list_checkpoints(out):
        if path not in known:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    known[path] = load_checkpoint(path).get("run_id")
            except CheckpointError:
                known[path] = None
        if known[path] == run_id:
            ours.append(path)
    for old in ours[: max(0, len(ours) - keep_last)]:
        old.unlink()
        _sidecar(old).unlink(missing_ok=True)
        known.pop(old, None)


def remove_checkpoints(out: str | os.PathLike) -> int:
    """Delete every checkpoint in `out` (what `--overwrite` asks for), set-aside `.bad` ones and sidecars included.
    Returns how many checkpoints were deleted."""
    folder = Path(out) / "checkpoints"
    paths = [*folder.glob("step-*.pt"), *folder.glob("step-*.pt.bad")]
    for p in paths:
        p.unlink()
        _sidecar(p).unlink(missing_ok=True)
        p.with_name(p.name.removesuffix(".bad") + ".sha256.bad").unlink(missing_ok=True)
    return len(paths)


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that failed verification (and its sidecar) to `*.bad`, out of the way of the run but
    kept for the user to inspect; returns the new path."""
    bad = path.with_name(path.name + ".bad")
    path.replace(bad)
    if _sidecar(path).exists():
        _sidecar(path).replace(_sidecar(path).with_name(_sidecar(path).name + ".bad"))
    return bad


def _unpickle(data: bytes, path: Path, what: str = "checkpoint") -> object:
    """torch.load(weights_only=True) of `data`: tensors and plain types only, never code."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the callable it blocked
        if needs:
            raise CheckpointError(
                f"{what} {path} holds pickled objects other than tensors and plain types (it needs "
                f"{needs.group(1)}); refused, because loading it could run code") from None
        raise CheckpointError(f"{what} {path} is not a readable bitnet-fast checkpoint (not a torch.save file of "
                              "tensors and plain types)") from None
    except Exception as e:  # zip/format errors come in many types
        raise CheckpointError(f"{what} {path} is not a readable bitnet-fast checkpoint ({type(e).__name__})") from e


def _sidecar_digest(path: Path) -> str | None:
    """The digest in `path`'s sidecar, None without one; CheckpointError when it is empty or not a sha256 line."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        digest = sidecar.read_bytes().decode("ascii").split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        digest = ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise CheckpointError(f"{sidecar} is empty or not a sha256 line; checkpoint {path.name} is unverifiable")
    return digest


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """Load a checkpoint: sidecar (if any) and embedded sha256 checked, tensors and plain types only.

    CheckpointError when it is unreadable, corrupt, needs code to unpickle or is not a training checkpoint.
    `verify=False` skips the checksums. A legacy checkpoint (no embedded checksum) without a sidecar loads
    with a warning that it is unverified."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from e
    sidecar = _sidecar_digest(path) if verify else None
    if sidecar is not None and sidecar != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} does not match its sha256 sidecar (corrupt or truncated)")
    obj = _unpickle(data, path)
    if isinstance(obj, dict) and obj.get("format") == ENVELOPE:
        payload = obj.get("payload")
        if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
            raise CheckpointError(f"checkpoint {path} has no payload; it is damaged")
        inner = payload.numpy().tobytes()
        if verify and hashlib.sha256(inner).hexdigest() != obj.get("sha256"):
            raise CheckpointError(f"checkpoint {path} fails its embedded sha256 (corrupt)")
        ckpt = _unpickle(inner, path)
    else:
        ckpt = obj
        if verify and sidecar is None:
            warn(f"checkpoint {path} has no embedded checksum and no .sha256 sidecar: loaded unverified")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise CheckpointError(f"{path} is not a bitnet-fast training checkpoint")
    return ckpt


def newest_checkpoint(out: str | os.PathLike) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """(path, checkpoint) of the newest checkpoint in `out` that loads and verifies, or (None, None), and the
    newer ones that failed as [(path, reason)]."""
    bad = []
    for path in reversed(list_checkpoints(out)):
        try:
            return path, load_checkpoint(path), bad
        except CheckpointError as e:
            bad.append((path, str(e)))
    return None, None, bad


def latest_checkpoint(out: str | os.PathLike) -> dict | None:
    """The newest checkpoint of the run in `out` that loads and verifies (older ones are the fallback; each one
    skipped is a warning)."""
    _, ckpt, bad = newest_checkpoint(out)
    for _, reason in bad:
        warn(f"skipping {reason}")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> LM:
    """The LM a checkpoint holds, with its weights, on `device`; CheckpointError when its config and weights
    do not fit together."""
    try:
        model = build_model(ModelConfig(**ckpt["model_config"]), device)
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"the checkpoint's model_config does not match its weights ({why})") from None
    return model


def rng_state() -> dict:
    """The random state training draws from: torch's CPU generator (init; sampling/dropout if added) and Python's
    `random`. Stored in checkpoints so that a resumed run continues bit-identically."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
