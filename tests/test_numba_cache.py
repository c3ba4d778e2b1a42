"""Numba's disk cache never serves a kernel built from other sources or for another instruction set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bitnet_fast.kernels import numba_cache

_RUN = """
import json, torch
from bitnet_fast import kernels
from bitnet_fast.kernels import cpu_engine
kernels.quantize_activations(torch.randn(4, 64))
stats = cpu_engine._quantize.stats
hits, misses = sum(stats.cache_hits.values()), sum(stats.cache_misses.values())
print(json.dumps({"isa": cpu_engine.ISA, "hits": hits, "misses": misses}))
"""


def _run(cache_dir, isa: str = "") -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "BITNET_FAST_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forced_isa_compiles_its_own_kernels_and_switching_back_recompiles_nothing(tmp_path):
    native = _run(tmp_path)
    assert native["misses"] == 1 and native["hits"] == 0
    assert _run(tmp_path) == {**native, "hits": 1, "misses": 0}
    other = "portable" if native["isa"] != "portable" else "avx2"
    assert _run(tmp_path, other) == {"isa": other, "hits": 0, "misses": 1}  # not the native build from the cache
    assert _run(tmp_path)["hits"] == 1  # each ISA keeps its own folder


def test_the_stamp_follows_the_bytes_of_every_kernel_source(tmp_path):
    (tmp_path / "cpu.py").write_text("x = 1\n")
    (tmp_path / "cpu_dot.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not a source")
    before = numba_cache.sources_hash(tmp_path)
    os.utime(tmp_path / "cpu_dot.py", (0, 0))  # a new mtime alone (a fresh checkout) changes nothing
    (tmp_path / "notes.txt").write_text("other")
    assert numba_cache.sources_hash(tmp_path) == before
    (tmp_path / "cpu_dot.py").write_text("y = 3\n")  # an edit to a file whose kernels are inlined elsewhere
    assert numba_cache.sources_hash(tmp_path) != before


def test_only_this_packages_files_use_the_locators():
    assert numba_cache._ours(numba_cache.__file__)
    assert not numba_cache._ours(__file__)
