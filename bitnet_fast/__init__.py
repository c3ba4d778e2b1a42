"""bitnet-fast: fast BitNet b1.58 (ternary-weight) training and inference for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"
