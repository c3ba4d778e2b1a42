"""Numba's on-disk cache, keyed on everything a CPU kernel is built from, not only the function's own file.

Numba reuses a cached function while its own source file is unchanged, but a kernel in `cpu_engine.py` inlines the
dot-product tiles of `cpu_dot.py` and freezes module constants (the instruction set, the register tile, the block
size) into its code. Without this, editing `cpu_dot.py` alone (or `git pull` in an editable install) kept serving
the old kernels, and a run with `BITNET_FAST_CPU_ISA` forced found the host ISA's kernels in the cache and measured
those. `install()` puts locators in front of Numba's for the files of this package that
    * keep a separate cache folder per instruction set (switching back and forth recompiles nothing), and
    * add a hash of every source file here to the stamp Numba checks (any edit recompiles the kernels once).
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

from numba.core import caching

HERE = Path(__file__).resolve().parent


def sources_hash(folder: Path = HERE) -> str:
    """sha256 over the names and bytes of the folder's *.py files: what the compiled kernels are made from."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@cache
def _stamp_part() -> str:
    return sources_hash()


def _isa() -> str:
    from .cpu_dot import ISA  # imported late: the packer's kernels are decorated before cpu_dot is imported

    return ISA


def _ours(py_file: str) -> bool:
    try:
        return Path(py_file).resolve().parent == HERE
    except OSError:
        return False


def _locator(base: type) -> type:
    class Locator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            return super().from_function(py_func, py_file) if _ours(py_file) else None

        def get_cache_path(self) -> str:
            return os.path.join(super().get_cache_path(), _isa())

        def get_source_stamp(self):
            return super().get_source_stamp(), _stamp_part()

    Locator.__name__ = Locator.__qualname__ = f"BitnetFast{base.__name__.lstrip('_')}"
    return Locator


def install() -> None:
    """Put this package's locators first in Numba's list (once per process); other functions are unaffected."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed in numba 0.6x
    if getattr(impl, "_bitnet_fast_locators", False):
        return
    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    bases = [getattr(caching, n, None) or getattr(caching, "_" + n) for n in names]
    impl._locator_classes = [_locator(b) for b in bases] + list(impl._locator_classes)
    impl._bitnet_fast_locators = True
