"""CPU kernel parameters: a plan derived from what this CPU and this torch build can do fast, refined by measurement.

`plan(caps)` is a pure function of the capabilities (`capabilities()` reads them from the host), so every ISA
class's dispatch is testable without its hardware. The tuning file written by `bitnet-fast calibrate`
($BITNET_FAST_TUNING, else `<user cache dir>/bitnet-fast/kernel_tuning.json`) records the capabilities it was
measured with and is applied only on a machine with the same ones. `kernels.cpu.configure(**params)` changes
parameters at runtime (what a calibrator sweeps).

Usage by a calibrator:

    from bitnet_fast.kernels import cpu, tuning
    for value in tuning.CPU_SEARCH_SPACE["gemm_min_m"]:
        cpu.configure(gemm_min_m=value)  # ... time kernels ...
    bitnet_fast.calibrate.save_tuning({**cpu.params(), "gemm_min_m": best})  # the application layer writes it
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

# threads: 0 means min(torch.get_num_threads(), NUMBA_NUM_THREADS) at call time.
# gemm_impl: engine for M > gemv_max_m: "numba" = the packed engine (every M), "int_mm" = unpack i2 tiles to
#   int8 and call torch._int_mm (oneDNN; fast only with AVX-512 VNNI, see plan()).
# gemv_max_m: with gemm_impl="int_mm", batches with M <= this stay on the packed engine.
# gemm_tile_n: weight rows unpacked per torch._int_mm call (bounds the int8 scratch; also the backward's tile).
# gemm_min_m: on the packed engine, M from which activation rows are tiled by the ISA's GEMM tile (below: 1 x 4).
# panel_bytes: packed weight bytes per task panel (kept in L2 while a tile of activation rows sweeps it).
# outer_min_rows: (avx2) activation rows per task from which the GEMM runs on the outer-product tile over a panel
#   copy in its layout (no per-output reduction: +13% at K = 256; below ~256 rows the copy costs what it saves).
CPU_DEFAULTS: dict[str, Any] = {
    "threads": 0,
    "gemm_impl": "numba",
    "gemv_max_m": 128,
    "gemm_tile_n": 1024,
    "gemm_min_m": 4,
    "panel_bytes": 1 << 18,
    "outer_min_rows": 256,
}

CPU_SEARCH_SPACE: dict[str, list[Any]] = {
    "threads": [0, 1, 2, 4, 8],
    "gemm_impl": ["int_mm", "numba"],
    "gemv_max_m": [1, 4, 8, 16, 32, 64, 128, 256, 512],
    "gemm_tile_n": [256, 512, 1024, 2048, 4096],
    "gemm_min_m": [2, 4, 8, 16],
    "panel_bytes": [1 << 16, 1 << 17, 1 << 18, 1 << 19],
    "outer_min_rows": [64, 256, 1024, 1 << 30],
}

# Below this many multiply-adds (or elements, for packing) the kernels run on one thread: one thread does
# ~1M int8 MACs in ~5 us, about what waking a second thread costs on an idle machine; under contention a
# 2-thread region can stall for milliseconds (docs/calibrate.md).
SERIAL_WORK = 1 << 20


def capabilities(isa: str | None = None) -> dict[str, Any]:
    """What this host can do fast: the dot-product ISA class of `kernels.cpu_dot` (honouring
    BITNET_FAST_CPU_ISA) and whether torch._int_mm reaches oneDNN's VNNI GEMM. A forced ISA class below
    vnni512 also switches the int_mm engine off, so a forced run reproduces that class's dispatch."""
    import torch

    if isa is None:
        from .cpu_dot import ISA as isa
    vnni = bool(torch.cpu._is_vnni_supported()) and torch.backends.mkldnn.is_available()
    return {"isa": isa, "int_mm_vnni": vnni and isa == "vnni512"}


def plan(caps: dict[str, Any]) -> dict[str, Any]:
    """Default parameters for `caps` (a pure function): int_mm for large M only where oneDNN has VNNI (elsewhere
    ATen runs a plain loop, ~30x slower than fp32), the packed engine everywhere else."""
    params = dict(CPU_DEFAULTS)
    if caps["int_mm_vnni"]:
        params.update(gemm_impl="int_mm", gemv_max_m=128)
    return params


def path() -> Path:
    """The tuning file: $BITNET_FAST_TUNING, else the per-user cache dir."""
    env = os.environ.get("BITNET_FAST_TUNING")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("bitnet-fast")) / "kernel_tuning.json"


def validate(params: dict[str, Any]) -> dict[str, Any]:
    """Check names and values against CPU_DEFAULTS types; ValueError names the bad parameter."""
    for key, value in params.items():
        if key not in CPU_DEFAULTS:
            raise ValueError(f"unknown CPU kernel parameter {key!r}; known: {sorted(CPU_DEFAULTS)}")
        want = type(CPU_DEFAULTS[key])
        if not isinstance(value, want) or isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be a {want.__name__}")
        if key == "gemm_impl":
            if value not in ("int_mm", "numba"):
                raise ValueError(f"gemm_impl={value!r} must be 'int_mm' or 'numba'")
        elif value < (0 if key in ("threads", "gemv_max_m") else 1):
            raise ValueError(f"{key}={value!r} is out of range")
    return params


def load(isa: str | None = None) -> dict[str, Any]:
    """plan(capabilities()) overlaid with the tuning file's valid entries, when the file was measured on a
    machine with the same capabilities (missing file: the plan)."""
    caps = capabilities(isa)
    params = plan(caps)
    p = path()
    if not p.is_file():
        return params
    try:
        saved = json.loads(p.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), dict):
            raise ValueError("not a bitnet-fast tuning file (no 'params' object)")
    except (OSError, ValueError) as e:
        warnings.warn(f"bitnet_fast: ignoring unreadable kernel tuning file {p} ({e}); using defaults", stacklevel=2)
        return params
    if saved.get("capabilities") != caps:
        warnings.warn(f"bitnet_fast: ignoring kernel tuning file {p}: measured on {saved.get('capabilities')}, this "
                      f"machine is {caps}; re-run `bitnet-fast calibrate`", stacklevel=2)
        return params
    for key, value in saved["params"].items():
        try:
            params.update(validate({key: value}))
        except ValueError as e:
            warnings.warn(f"bitnet_fast: ignoring {p}: {e}", stacklevel=2)
    return params
