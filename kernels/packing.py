"""Packed ternary weights: the `PackedWeight` container, its formats, and its (de)serialization.

A packed weight travels with its scale (gamma), logical shape (N, K), format name and layout version, so
it can be validated wherever it lands. Formats (layouts defined in `reference.py`):

    i2   compute format on CPU: 4 codes per byte, K padded to 128, blocks of 32 bytes give SIMD lanes
    tq1  storage format: 5 trits per byte (~1.6 bits/weight), for checkpoints and export
    i2g  compute format on GPU (Triton): 16 codes per int32 along K in natural order, K padded to 128
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import reference

LAYOUT_VERSION = 1


def _i2_bytes(n: int, k: int) -> tuple[int, int]:
    return n, reference.padded_k(k) // 4


def _tq1_bytes(n: int, k: int) -> tuple[int, int]:
    return n, -(-k // reference.TQ1_TRITS)


def _i2g_words(n: int, k: int) -> tuple[int, int]:
    return n, reference.padded_k(k) // reference.I2G_CODES


@dataclass(frozen=True)
class Format:
    """A packed layout: its storage dtype, its data shape for a logical (N, K), and reference codecs."""

    dtype: torch.dtype
    data_shape: Callable[[int, int], tuple[int, int]]
    pack: Callable[[torch.Tensor], torch.Tensor]  # (N, K) int8 ternary -> data
    unpack: Callable[[torch.Tensor, int], torch.Tensor]  # data, K -> (N, K) int8 ternary


FORMATS: dict[str, Format] = {
    "i2": Format(torch.uint8, _i2_bytes, reference.pack_i2, reference.unpack_i2),
    "tq1": Format(torch.uint8, _tq1_bytes, reference.pack_tq1, reference.unpack_tq1),
    "i2g": Format(torch.int32, _i2g_words, reference.pack_i2g, reference.unpack_i2g),
}


def get_format(name: str) -> Format:
    """The Format called `name`, or a ValueError that lists the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"format={name!r} is not a known packed format; use one of {sorted(FORMATS)}") from None


@dataclass(frozen=True)
class PackedWeight:
    """A ternary weight matrix in a packed format. `data` lives on the device the kernels run on."""

    data: torch.Tensor  # packed codes, dtype and shape given by the format
    gamma: torch.Tensor  # fp32 0-d scale: W ~= Wt * gamma
    shape: tuple[int, int]  # logical (N, K) = (out_features, in_features)
    format: str = "i2"
    version: int = LAYOUT_VERSION
    # Per-backend views of `data` (e.g. the numba backend's NumPy array, its address and float gamma), filled on
    # first use so that a decode call does not convert tensors again; never part of equality, repr or serialization,
    # and never carried into a deep copy or a pickle (an address is only valid for the buffer it was read from).
    views: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate(self)

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight(copy.deepcopy(self.data, memo), copy.deepcopy(self.gamma, memo), self.shape, self.format,
                            self.version)

    def __reduce__(self):
        return PackedWeight, (self.data, self.gamma, self.shape, self.format, self.version)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + 4

    def to(self, device: torch.device | str) -> PackedWeight:
        """The same packed weight on another device (same format: convert formats with kernels.repack)."""
        return PackedWeight(self.data.to(device), self.gamma.to(device), self.shape, self.format, self.version)

    def state(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors / state_dict: data, gamma and an int64 header (version, N, K, fmt id)."""
        header = torch.tensor([self.version, *self.shape, _FORMAT_IDS[self.format]], dtype=torch.int64)
        return {"data": self.data.cpu(), "gamma": self.gamma.cpu(), "header": header}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], where: str = "packed weight") -> PackedWeight:
        """Rebuild from `state()`; an unknown version, format or truncated buffer is a ValueError naming `where`."""
        missing = {"data", "gamma", "header"} - set(state)
        if missing:
            raise ValueError(f"{where}: missing {sorted(missing)}; was it saved with PackedWeight.state()?")
        header = state["header"].tolist()
        if len(header) != 4:
            raise ValueError(f"{where}: header has {len(header)} fields, expected 4 (version, N, K, format)")
        version, n, k, fmt_id = header
        if version != LAYOUT_VERSION:
            raise ValueError(
                f"{where}: layout version {version} is not supported by this bitnet-fast "
                f"(it reads version {LAYOUT_VERSION}); re-export the model with a matching version"
            )
        fmt = _FORMAT_NAMES.get(fmt_id)
        if fmt is None:
            raise ValueError(f"{where}: unknown format id {fmt_id}; known: {_FORMAT_NAMES}")
        gamma = state["gamma"]
        if gamma.numel() != 1:
            raise ValueError(f"{where}: gamma must be a single scale, got shape {tuple(gamma.shape)}")
        try:
            return cls(state["data"], gamma.float().reshape(()), (n, k), fmt, version)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: {e}") from None


_FORMAT_IDS = {"i2": 1, "tq1": 2, "i2g": 3}
_FORMAT_NAMES = {v: k for k, v in _FORMAT_IDS.items()}


def register_format(name: str, fmt: Format, format_id: int) -> None:
    """Add a packed layout (the GPU backend registers its own)."""
    FORMATS[name] = fmt
    _FORMAT_IDS[name] = format_id
    _FORMAT_NAMES[format_id] = name


def validate(pw: PackedWeight) -> None:
    """Check that data, gamma and shape agree with the format; ValueError/TypeError says what is wrong."""
    fmt = get_format(pw.format)
    if pw.version != LAYOUT_VERSION:
        raise ValueError(f"version={pw.version} is not supported (this build reads {LAYOUT_VERSION})")
    n, k = pw.shape
    if n <= 0 or k <= 0:
        raise ValueError(f"shape={pw.shape} must be positive (out_features, in_features)")
    if pw.data.dtype != fmt.dtype:
        raise TypeError(f"data has dtype {pw.data.dtype}; format {pw.format!r} stores {fmt.dtype}")
    want = fmt.data_shape(n, k)
    if tuple(pw.data.shape) != want:
        raise ValueError(
            f"data has shape {tuple(pw.data.shape)} but format {pw.format!r} with shape (N, K)={pw.shape} "
            f"needs {want}: the buffer is truncated or belongs to another layer"
        )
    if pw.gamma.numel() != 1:
        raise ValueError(f"gamma must be a single scale, got shape {tuple(pw.gamma.shape)}")
