"""bitnet-fast: fast BitNet b1.58 (ternary-weight) training and inference for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

# Lazy re-exports: `import bitnet_fast` stays cheap (no torch import, no JIT) until one of these is used.
_LAZY = {
    "BitLinear": "bitnet_fast.nn",
    "convert": "bitnet_fast.nn",
    "pack_model": "bitnet_fast.nn",
    "unpack_model": "bitnet_fast.nn",
    "set_grad_input": "bitnet_fast.nn",
    "save_packed": "bitnet_fast.export",
    "load_packed": "bitnet_fast.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bitnet_fast' has no attribute {name!r}")
