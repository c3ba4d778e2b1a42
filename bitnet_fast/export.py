"""Packed model files: every BitLinear stored ternary-packed in a safetensors file, everything else as is.

    save_packed(model, "m.safetensors", fmt="tq1")   # tq1: ~1.6 bits/weight, the smallest files; i2: 2 bits
    model = load_packed(lambda: MyModel(cfg), "m.safetensors")   # packed, in the compute format of its device

A BitLinear named `blk.fc` is stored as `blk.fc.packed.{data,gamma,header}` (PackedWeight.state()); the file's
metadata carries the layout version, checked at load. Writes are atomic (temp file + fsync + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from bitnet_fast import __version__, kernels
from bitnet_fast.nn import BitLinear

__all__ = ["load_packed", "read_metadata", "save_packed"]

FILE_KIND = "bitnet-fast-packed"


def _packed_state(model: nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    """model.state_dict() with every BitLinear's weight replaced by its packed form in `fmt`, on CPU."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        if not isinstance(m, BitLinear):
            continue
        prefix = f"{name}." if name else ""
        state.pop(prefix + "weight", None)
        pw = kernels.repack(m.packed_weight, fmt, device="cpu")
        state.update({prefix + "packed." + k: t for k, t in pw.state().items()})
    return state


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors that share memory (tied weights) once: (tensors to write, {alias key: stored key})."""
    out: dict[str, torch.Tensor] = {}
    stored: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for k, t in state.items():
        t = t.cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key in stored:
            aliases[k] = stored[key]
            continue
        if key is not None:
            stored[key] = k
        out[k] = t
    return out, aliases


def save_packed(model: nn.Module, path: str | os.PathLike, fmt: str = "tq1") -> Path:
    """Write `model` with its BitLinear weights packed in `fmt` ("tq1" smallest, "i2" compute) to `path`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if fmt not in ("i2", "tq1"):
        raise ValueError(f"fmt={fmt!r} is not a file format; use 'tq1' (smallest) or 'i2' (compute layout)")
    if not any(isinstance(m, BitLinear) for m in model.modules()):
        raise ValueError("model has no BitLinear layers; run bitnet_fast.convert(model) first")
    path = Path(path)
    tensors, aliases = _dedupe(_packed_state(model, fmt))
    meta = {"kind": FILE_KIND, "layout_version": str(kernels.LAYOUT_VERSION), "format": fmt, "version": __version__,
            "aliases": json.dumps(aliases)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a packed file; ValueError when it is missing, corrupt, truncated or of another version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such packed model file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from None
    if meta.get("kind") != FILE_KIND:
        raise ValueError(f"{path}: not a bitnet-fast packed model (metadata kind={meta.get('kind')!r})")
    if meta.get("layout_version") != str(kernels.LAYOUT_VERSION):
        raise ValueError(
            f"{path}: packed layout version {meta.get('layout_version')} but this bitnet-fast reads version "
            f"{kernels.LAYOUT_VERSION}; re-export the model with a matching bitnet-fast"
        )
    return meta


def load_packed(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | os.PathLike) -> nn.Module:
    """Load a file from `save_packed` into a model (or the model a zero-argument factory builds), in place.

    Every layer stored packed becomes a packed BitLinear (a plain nn.Linear there is converted first), decoded
    to the compute format of the device the layer lives on. Returns the model.
    """
    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory
    elif callable(model_or_factory):
        model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory must return an nn.Module, got {type(model).__name__}")
    else:
        raise TypeError(f"model_or_factory must be an nn.Module or a callable, got {type(model_or_factory).__name__}")
    meta = read_metadata(path)
    try:
        state = load_file(path, device="cpu")
        for alias, stored in json.loads(meta.get("aliases", "{}")).items():  # tied weights are stored once
            state[alias] = state[stored]
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: cannot read the tensors (corrupt or truncated?): {e!r}") from None
    for key in state:
        if key.endswith("packed.header"):
            _ensure_bitlinear(model, key[: -len("packed.header")].rstrip("."))
    model.load_state_dict(state, strict=True)
    return model


def _ensure_bitlinear(model: nn.Module, name: str) -> None:
    """Make the module called `name` a BitLinear (converting an nn.Linear there), or say what is wrong."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the file holds a packed layer {name!r} that this model does not have") from None
    if isinstance(module, BitLinear):
        return
    if not isinstance(module, nn.Linear) or not name:
        raise ValueError(f"the file holds a packed layer {name!r} but the model has a {type(module).__name__} there; "
            "build the model with BitLinear layers (bitnet_fast.convert) before loading")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, BitLinear.from_linear(module))
