"""Packed model files: every BitLinear stored ternary-packed in a safetensors file, everything else as is.

    save_packed(model, "m.safetensors", fmt="tq1")   # tq1: ~1.6 bits/weight, the smallest files; i2: 2 bits
    model = load_packed(lambda: MyModel(cfg), "m.safetensors")   # packed, in the compute format of its device
    lm = load_lm("lm.safetensors")   # bitnet-fast's own LM: its ModelConfig is in the file (`bitnet-fast export`)

A BitLinear named `blk.fc` is stored as `blk.fc.packed.{data,gamma,header}` (PackedWeight.state()); the file's
metadata carries the layout version, checked at load, for bitnet-fast's own LM its ModelConfig (`lm_config`,
JSON), so that `load_lm` needs nothing but the file, and a sha256 over every tensor (name, dtype, shape, bytes)
and the rest of the metadata, verified at load (`verify=False` skips it; a file from before checksums loads
with a warning that it is unverified). Loaded packed weights are validated: a finite, non-negative gamma and
no byte that is not a ternary code (i2/i2g code 3, tq1 byte > 242). Writes are atomic and durable
(plumbing.atomic_path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bitnet_fast import __version__, kernels
from bitnet_fast.kernels import PackedWeight
from bitnet_fast.model import LM, ModelConfig
from bitnet_fast.nn import BitLinear, _to_compute, meta_parameters
from bitnet_fast.plumbing import atomic_path, warn

__all__ = ["load_lm", "load_packed", "read_metadata", "save_packed"]

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
    if isinstance(getattr(model, "config", None), ModelConfig):
        meta["lm_config"] = json.dumps(model.config.to_dict())
    names = {v: k for k, v in _DTYPES.items()}
    meta["sha256"] = _file_digest(meta, {k: (names[t.dtype], list(t.shape), _digest(t)) for k, t in tensors.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _digest(t: torch.Tensor) -> str:
    """sha256 of a CPU tensor's bytes."""
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _file_digest(meta: dict[str, str], tensors: dict[str, tuple[str, list[int], str]]) -> str:
    """The checksum a packed file carries: over {name: (dtype, shape, sha256 of bytes)} and the other metadata."""
    body = json.dumps([sorted((k, v) for k, v in meta.items() if k != "sha256"),
                       sorted((k, d, [int(x) for x in s], h) for k, (d, s, h) in tensors.items())])
    return hashlib.sha256(body.encode()).hexdigest()


def _check_codes(pw: PackedWeight, where: str) -> None:
    """ValueError when a loaded packed weight holds what no save writes: a non-finite or negative gamma, an
    i2/i2g code 3 (bits 11, which would decode to an effective weight of +2) or a tq1 byte above 3**5 - 1."""
    gamma = float(pw.gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"{where}: gamma is {gamma}, not a finite non-negative scale; the file is corrupt")
    b = pw.data.reshape(-1).view(torch.uint8)
    bad = (b > 242) if pw.format == "tq1" else (b & (b >> 1) & 0x55) != 0
    if pw.format in ("i2", "i2g", "tq1") and bool(bad.any()):
        raise ValueError(f"{where}: {int(bad.sum())} byte(s) hold codes that are not ternary weights "
                         f"({pw.format}); the file is corrupt")


_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header's JSON


def _header(f, path: Path, tensors: bool = True) -> tuple[dict, int]:
    """(header, offset of the data section) of an open safetensors file; ValueError names what is malformed.
    `tensors=False` reads the header (and its metadata) without checking the tensors' offsets against the file."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if not 0 < n <= min(size - 8, _MAX_HEADER):
        raise ValueError(f"{path}: corrupt or truncated: not a safetensors file (header size {n}, file {size} bytes)")
    try:
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        for name, info in header.items() if tensors else ():
            if name == "__metadata__":
                continue
            numel = math.prod(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
            if not 0 <= begin <= end <= size - 8 - n or end - begin != numel * _DTYPES[info["dtype"]].itemsize:
                raise ValueError(f"tensor {name!r} has offsets {begin}..{end} that do not fit its shape or the file")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors header: {e}") from None
    return header, 8 + n


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a packed file; ValueError when it is missing, corrupt, truncated or of another version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such packed model file")
    with open(path, "rb") as f:
        meta = _header(f, path)[0].get("__metadata__") or {}
    if meta.get("kind") != FILE_KIND:
        raise ValueError(f"{path}: not a bitnet-fast packed model (metadata kind={meta.get('kind')!r})")
    if meta.get("layout_version") != str(kernels.LAYOUT_VERSION):
        raise ValueError(
            f"{path}: packed layout version {meta.get('layout_version')} but this bitnet-fast reads version "
            f"{kernels.LAYOUT_VERSION}; re-export the model with a matching bitnet-fast"
        )
    return meta


def _read(f, path: Path, start: int, name: str, info: dict, out: torch.Tensor | None = None,
          digests: dict | None = None) -> torch.Tensor:
    """One tensor of an open safetensors file, read with a plain read into fresh memory (or into `out`, a scratch
    buffer of at least its size): unlike a memory map, the file's pages never count toward this process's RSS.
    With `digests`, records {name: (dtype, shape, sha256 of its bytes)}."""
    dtype, shape = _DTYPES[info["dtype"]], [int(d) for d in info["shape"]]
    nbytes = math.prod(shape) * dtype.itemsize
    t = torch.empty(shape, dtype=dtype) if out is None else out[:nbytes].view(dtype).view(shape)
    f.seek(start + int(info["data_offsets"][0]))
    if nbytes and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != nbytes:
        raise ValueError(f"{path}: truncated while reading tensor {name!r}")
    if digests is not None:
        digests[name] = (info["dtype"], shape, _digest(t))
    return t


def _load_state(path: Path, meta: dict[str, str], verify: bool = True) -> dict[str, torch.Tensor]:
    """The file's state dict with every packed layer validated and in the CPU compute format. Packed data in
    another format (tq1) is read into one scratch buffer and decoded layer by layer, so the load holds no second
    encoding of the model and leaves no heap holes behind; tied weights are restored from their aliases. With
    `verify`, the bytes read are checked against the file's sha256 before the state is returned."""
    digests = {} if verify and "sha256" in meta else None
    with open(path, "rb") as f:
        header, start = _header(f, path)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        packed = [k for k in entries if k.endswith("packed.data")]
        state = {k: _read(f, path, start, k, v, digests=digests) for k, v in entries.items() if k not in packed}
        sizes = [int(entries[k]["data_offsets"][1]) - int(entries[k]["data_offsets"][0]) for k in packed]
        scratch = torch.empty(max(sizes, default=0), dtype=torch.uint8)
        for key in packed:
            prefix = key[: -len("data")]
            parts = {"data": _read(f, path, start, key, entries[key], scratch, digests)}
            parts |= {k: state.get(prefix + k, torch.empty(0)) for k in ("gamma", "header")}
            stored = PackedWeight.from_state(parts, prefix[:-1])
            _check_codes(stored, f"{path}: {prefix[:-1]}")
            pw = _to_compute(stored, torch.device("cpu"))
            if pw.data.untyped_storage().data_ptr() == scratch.untyped_storage().data_ptr():
                pw = dataclasses.replace(pw, data=pw.data.clone())  # stored in the compute format already
            state.update({prefix + k: t for k, t in pw.state().items()})
    if digests is not None and _file_digest(meta, digests) != meta["sha256"]:
        raise ValueError(f"{path}: fails its sha256 checksum (corrupt); re-export it, or pass verify=False to load "
                         "it anyway")
    if verify and "sha256" not in meta:
        warn(f"{path} carries no checksum (saved before checksums): loaded unverified")
    try:
        aliases = json.loads(meta.get("aliases", "{}"))
        for alias, stored in aliases.items():  # tied weights are stored once
            state[alias] = state[stored]
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: corrupt tied-weight aliases in the metadata: {e!r}") from None
    return state


def load_packed(model_or_factory: nn.Module | Callable[[], nn.Module], path: str | os.PathLike,
                verify: bool = True) -> nn.Module:
    """Load a file from `save_packed` into a model (or the model a zero-argument factory builds), in place.

    Every layer stored packed becomes a packed BitLinear (a plain nn.Linear there is converted first), decoded
    to the compute format of the device the layer lives on. A factory's model is built with its parameters on
    the meta device and takes the file's tensors as they load, so no fp32 copy of the model is ever allocated.
    The file's sha256 is verified unless `verify=False` (ValueError when it fails). Returns the model.
    """
    built = not isinstance(model_or_factory, nn.Module)
    if not built:
        model = model_or_factory
    elif callable(model_or_factory):
        with meta_parameters():
            model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory must return an nn.Module, got {type(model).__name__}")
    else:
        raise TypeError(f"model_or_factory must be an nn.Module or a callable, got {type(model_or_factory).__name__}")
    path = Path(path)
    meta = read_metadata(path)
    state = _load_state(path, meta, verify)
    aliases = json.loads(meta.get("aliases", "{}"))
    for key in state:
        if key.endswith("packed.header"):
            _ensure_bitlinear(model, key[: -len("packed.header")].rstrip("."))
    model.load_state_dict(state, strict=True, assign=built)
    if built:  # assign=True gives each name its own Parameter: tie the aliases back to the stored one
        params = dict(model.named_parameters(remove_duplicate=False))
        for alias, stored in aliases.items():
            if alias in params and stored in params:
                owner, _, attr = alias.rpartition(".")
                setattr(model.get_submodule(owner), attr, params[stored])
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{path}: the model has tensors the file does not fill: {left[:5]}")
    return model


def load_lm(path: str | os.PathLike) -> LM:
    """bitnet-fast's own LM from a file `save_packed` (or `bitnet-fast export`) wrote for one, built from the
    ModelConfig in its metadata, packed and in eval mode: ready for `decode.PackedDecoder.from_model`."""
    path = Path(path)
    raw = read_metadata(path).get("lm_config")
    if raw is None:
        raise ValueError(f"{path}: holds no bitnet-fast LM config (saved from another kind of model); load it with "
                         "load_packed(factory, path), the factory building that model")
    try:
        fields = json.loads(raw)
        cfg = ModelConfig(**fields)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt lm_config in the metadata: {e}") from None
    return load_packed(lambda: LM(cfg), path).eval()


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
