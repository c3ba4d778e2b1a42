"""Training checkpoints: save, verify, list, load and prune them, and build a model from one.

A run keeps its checkpoints in `OUT/checkpoints/step-NNNNNNN.pt`, each with a `step-NNNNNNN.pt.sha256` sidecar.
Both are written atomically (plumbing.atomic_write), the checkpoint first, so a crash between the two leaves a
sidecar that does not match and `latest_checkpoint` falls back to the previous checkpoint.

A checkpoint is a dict holding only tensors and plain Python types (dict, list, tuple, str, int, float, bool,
None), so that it also loads with `torch.load(weights_only=True)`:

    model, optimizer, scheduler    state_dicts
    model_config, train_config     dicts (ModelConfig.to_dict(), dataclasses.asdict(TrainConfig))
    tokenizer                      the tokenizer as its JSON string
    state                          the trainer's TrainState as a dict (position, running statistics, history)
    rng                            rng_state(): {"torch": uint8 tensor, "python": random.getstate() tuple}
    step                           optimizer steps taken (= state["step"]), for tools that want only that
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import torch

from .model import LM, ModelConfig, build_model
from .plumbing import UserError, atomic_write

REQUIRED = ("model", "model_config", "train_config", "tokenizer", "step")


class CheckpointError(UserError):
    """A checkpoint that cannot be read, fails its checksum or is not a bitnet-fast training checkpoint."""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """The checkpoints of the run in `out`, oldest first (unverified)."""
    return sorted((Path(out) / "checkpoints").glob("step-*.pt"))


def save_checkpoint(out: str | os.PathLike, ckpt: dict, keep_last: int) -> Path:
    """Write `ckpt` as OUT/checkpoints/step-<ckpt["step"]>.pt with its sha256 sidecar, then delete all but the
    newest `keep_last` checkpoints. Returns the path written."""
    path = Path(out) / "checkpoints" / f"step-{ckpt['step']:07d}.pt"
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    data = buf.getvalue()
    atomic_write(path, data)
    atomic_write(_sidecar(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    remove_checkpoints(out, keep_last)
    return path


def remove_checkpoints(out: str | os.PathLike, keep_last: int = 0) -> None:
    """Delete the checkpoints of the run in `out` (and their sidecars) except the newest `keep_last`."""
    paths = list_checkpoints(out)
    for old in paths[: max(0, len(paths) - keep_last)]:
        old.unlink()
        _sidecar(old).unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint after checking its sha256 sidecar; CheckpointError when unreadable or corrupt."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from e
    sidecar = _sidecar(path)
    if sidecar.is_file() and sidecar.read_text().split()[0] != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} does not match its sha256 sidecar (corrupt or truncated)")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors come in many types
        raise CheckpointError(f"checkpoint {path} is not a readable bitnet-fast checkpoint ({type(e).__name__})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise CheckpointError(f"{path} is not a bitnet-fast training checkpoint")
    return ckpt


def latest_checkpoint(out: str | os.PathLike) -> dict | None:
    """The newest checkpoint of the run in `out` that loads and verifies (older ones are the fallback)."""
    for path in reversed(list_checkpoints(out)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: skipping {e}")
    return None


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> LM:
    """The LM a checkpoint holds, with its weights, on `device`."""
    model = build_model(ModelConfig(**ckpt["model_config"]), device)
    model.load_state_dict(ckpt["model"])
    return model


def rng_state() -> dict:
    """The random state training draws from: torch's CPU generator (init; sampling/dropout if added) and Python's
    `random`. Stored in checkpoints so that a resumed run continues bit-identically."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
