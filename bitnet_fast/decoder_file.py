"""A PackedDecoder in one file that loads by memory map, as llama.cpp loads a GGUF: no copy, no conversion.

    save_decoder(PackedDecoder.from_model(model), "m.decoder")   # i2 projections, int8 (or fp32) head and embedding
    dec = load_decoder("m.decoder")                               # milliseconds past the checksum; pages load on use

The file is safetensors (tensors: `{q,k,v,o,gate,up,down}.{layer}`, `gammas`, norms, RoPE tables, `head.q`/
`head.scale` or `head`, `embedding.q`/`embedding.scale`, `embedding` or nothing when it is the head's rows;
metadata: kind, the packed layout version, DecoderConfig as JSON, a sha256). `load_decoder` maps the file
copy-on-write (writable views, so the Numba kernels see the types they were compiled for; nothing writes to
them) and hands the runtime views into the map: the weights count toward RSS as the pages are touched, like an
mmapped GGUF, and the embedding is advised MADV_RANDOM, so a prompt faults in its own rows, not 128 KiB of
readahead around each. The checksum is verified with plain reads, which do not map pages into the process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from bitnet_fast import kernels
from bitnet_fast.decode import KEYS, DecoderConfig, PackedDecoder
from bitnet_fast.export import _file_digest, _header
from bitnet_fast.plumbing import atomic_path

__all__ = ["is_decoder_file", "load_decoder", "save_decoder"]

FILE_KIND = "bitnet-fast-decoder"
_ARRAYS = ("gammas", "norm_attn", "norm_mlp", "norm_final", "sub_o", "sub_d", "cos", "sin")


def save_decoder(dec: PackedDecoder, path: str | os.PathLike, tokenizer: str | None = None) -> Path:
    """Write `dec`'s weights (not its KV cache) to `path`, atomically, with the `tokenizer` JSON (tokenizers'
    Tokenizer.to_str(), what `bitnet-fast generate FILE` needs) if given; returns the path."""
    w = dec._weights
    tensors = {f"{k}.{i}": a for k, ws in dec._projections.items() for i, a in enumerate(ws)}
    tensors |= {name: getattr(w, name) for name in _ARRAYS}
    if dec.head_kind == "int8":
        tensors |= {"head.q": dec._head_q, "head.scale": dec._head_scale}
    else:
        tensors["head"] = dec._head.numpy()
    embedding = "head"  # tied: the embedding is the int8 head's rows
    if isinstance(dec._embed, tuple):
        if not (dec.head_kind == "int8" and np.shares_memory(dec._embed[0], dec._head_q)):
            tensors |= {"embedding.q": dec._embed[0], "embedding.scale": dec._embed[1]}
            embedding = "int8"
    else:
        tensors["embedding"], embedding = dec._embed, "fp32"
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {"kind": FILE_KIND, "layout_version": str(kernels.LAYOUT_VERSION), "embedding": embedding,
            "config": json.dumps(dataclasses.asdict(dec.config)), "sub_eps": repr(float(w.sub_eps))}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer
    digests = {k: (_DTYPE_NAMES[v.dtype], list(v.shape), hashlib.sha256(v.reshape(-1).view(np.uint8)).hexdigest())
               for k, v in tensors.items()}
    meta["sha256"] = _file_digest(meta, digests)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


_NUMPY = {"F32": np.float32, "I8": np.int8, "U8": np.uint8}  # safetensors dtype names <-> the dtypes a file holds
_DTYPE_NAMES = {np.dtype(t): name for name, t in _NUMPY.items()}


def is_decoder_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a safetensors file whose metadata says it is a decoder file (a checkpoint is not). Only the
    header is read and its tensors are not checked: a truncated decoder file is still one (load_decoder says what
    is wrong with it)."""
    try:
        with open(path, "rb") as f:
            return (_header(f, Path(path), tensors=False)[0].get("__metadata__") or {}).get("kind") == FILE_KIND
    except (OSError, ValueError, AttributeError):
        return False


def load_decoder(path: str | os.PathLike, max_len: int | None = None, verify: bool = True) -> PackedDecoder:
    """The PackedDecoder saved in `path`, its weights mapped from the file; `max_len` (at most the saved one)
    sizes the KV cache. ValueError names what is wrong with a corrupt, truncated or foreign file; `verify=False`
    skips the sha256 (one sequential read of the file). The tokenizer saved with it, if any, is its `tokenizer`
    attribute (JSON; None without one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such decoder file; write one with save_decoder")
    with open(path, "rb") as f:
        header, start = _header(f, path)
        meta = header.pop("__metadata__", None) or {}
        if meta.get("kind") != FILE_KIND:
            raise ValueError(f"{path}: not a bitnet-fast decoder file (metadata kind={meta.get('kind')!r})")
        if meta.get("layout_version") != str(kernels.LAYOUT_VERSION):
            raise ValueError(f"{path}: packed layout version {meta.get('layout_version')}, this bitnet-fast reads "
                             f"{kernels.LAYOUT_VERSION}; save the decoder again with this version")
        if any(info["dtype"] not in _NUMPY for info in header.values()):
            raise ValueError(f"{path}: holds a dtype a decoder file never has; the file is corrupt")
        if verify:
            _verify(f, path, start, header, meta)
    try:
        cfg = DecoderConfig(**json.loads(meta["config"]))
        sub_eps = float(meta["sub_eps"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt decoder metadata: {e!r}") from None
    if max_len is not None:
        if not 1 <= max_len <= cfg.max_len:
            raise ValueError(f"max_len={max_len}; use 1..{cfg.max_len} (the context this file was saved for)")
        cfg = dataclasses.replace(cfg, max_len=max_len)
    m = np.memmap(path, dtype=np.uint8, mode="c")

    def view(name: str) -> np.ndarray:
        if name not in header:
            raise ValueError(f"{path}: tensor {name!r} is missing; the file is corrupt")
        info = header[name]
        begin, end = (start + int(o) for o in info["data_offsets"])
        a = m[begin:end].view(_NUMPY[info["dtype"]]).reshape([int(d) for d in info["shape"]]).view(np.ndarray)
        return a if a.flags.aligned else a.copy()  # (safetensors stores the widest dtypes first: always aligned)

    keys = KEYS if cfg.swiglu else tuple(k for k in KEYS if k != "gate")
    projections = {k: [view(f"{k}.{i}") for i in range(cfg.n_layer)] for k in keys}
    head = (view("head.q"), view("head.scale")) if "head.q" in header else view("head")
    arrays = {name: view(name) for name in _ARRAYS}
    kind = meta.get("embedding")
    if kind == "head" and isinstance(head, tuple):
        embedding = (head[0][:, : arrays["norm_final"].shape[0]], head[1])
    elif kind == "int8":
        embedding = (view("embedding.q"), view("embedding.scale"))
        _advise_random(m, start + int(header["embedding.q"]["data_offsets"][0]), embedding[0].nbytes)
    elif kind == "fp32":
        embedding = view("embedding")
        _advise_random(m, start + int(header["embedding"]["data_offsets"][0]), embedding.nbytes)
    else:
        raise ValueError(f"{path}: corrupt decoder metadata: embedding={kind!r}")
    try:
        dec = PackedDecoder(cfg, projections, **arrays, sub_eps=sub_eps, head=head, embedding=embedding)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{path}: its tensors do not make a decoder ({e}); the file is corrupt") from None
    dec.tokenizer = meta.get("tokenizer")
    return dec


def _verify(f, path: Path, start: int, header: dict, meta: dict) -> None:
    """Check the file's sha256 with plain reads in file order (no pages mapped into this process)."""
    if "sha256" not in meta:
        raise ValueError(f"{path}: carries no checksum; save it again, or pass verify=False")
    digests, buf = {}, bytearray(1 << 22)
    for name, info in sorted(header.items(), key=lambda kv: int(kv[1]["data_offsets"][0])):
        begin, end = (int(o) for o in info["data_offsets"])
        f.seek(start + begin)
        h, left = hashlib.sha256(), end - begin
        while left:
            n = f.readinto(memoryview(buf)[: min(left, len(buf))])
            if not n:
                raise ValueError(f"{path}: truncated while reading tensor {name!r}")
            h.update(memoryview(buf)[:n])
            left -= n
        digests[name] = (info["dtype"], [int(d) for d in info["shape"]], h.hexdigest())
    if _file_digest(meta, digests) != meta["sha256"]:
        raise ValueError(f"{path}: fails its sha256 checksum (corrupt); save it again, or pass verify=False")


def _advise_random(m: np.memmap, offset: int, length: int) -> None:
    """MADV_RANDOM over the pages of [offset, offset + length) of the map: no readahead around a looked-up row."""
    if length and hasattr(mmap, "MADV_RANDOM"):
        page = mmap.PAGESIZE
        first = offset // page * page
        m._mmap.madvise(mmap.MADV_RANDOM, first, offset + length - first)
