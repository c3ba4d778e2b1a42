"""Where tuned CPU kernel parameters live: defaults, the search space a calibrator sweeps, and a JSON file.

The file is `$BITNET_FAST_TUNING`, else `<user cache dir>/bitnet-fast/kernel_tuning.json`. `load()` merges it
over `CPU_DEFAULTS` (unknown keys and a corrupt file are ignored with a warning); `save()` writes atomically.
`kernels.cpu` reads `load()` on first use; `kernels.cpu.configure(**params)` changes parameters at runtime.

Usage by a calibrator:

    from bitnet_fast.kernels import cpu, tuning
    for value in tuning.CPU_SEARCH_SPACE["gemv_max_m"]:
        cpu.configure(gemv_max_m=value)  # ... time kernels ...
    tuning.save({**tuning.load(), "gemv_max_m": best})
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

# threads: 0 means min(torch.get_num_threads(), NUMBA_NUM_THREADS) at call time.
# gemv_max_m: batches with M <= this use the Numba packed kernel; larger M use the GEMM path.
# gemm_impl: "int_mm" = unpack i2 tiles to int8 and call torch._int_mm (oneDNN); "numba" = packed kernel.
# gemm_tile_n: weight rows unpacked per torch._int_mm call on the GEMM path (bounds the int8 scratch).
# rows_per_pass: activation rows that share one decoded weight block in the Numba kernel (1 or 4).
CPU_DEFAULTS: dict[str, Any] = {
    "threads": 0,
    "gemv_max_m": 128,
    "gemm_impl": "int_mm",
    "gemm_tile_n": 1024,
    "rows_per_pass": 4,
}

# Below this many multiply-adds (or elements, for packing) the kernels run on one thread: one thread does
# ~1M int8 MACs in ~5 us here (GEMV 4096^2: 72 us), about what waking a second thread costs on an idle
# machine; under contention a 2-thread region can stall for milliseconds (docs/calibrate.md).
SERIAL_WORK = 1 << 20

CPU_SEARCH_SPACE: dict[str, list[Any]] = {
    "threads": [0, 1, 2, 4, 8],
    "gemv_max_m": [1, 4, 8, 16, 32, 64, 128, 256, 512],
    "gemm_impl": ["int_mm", "numba"],
    "gemm_tile_n": [256, 512, 1024, 2048, 4096],
    "rows_per_pass": [1, 4],
}


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
        if key == "gemm_impl" and value not in ("int_mm", "numba"):
            raise ValueError(f"gemm_impl={value!r} must be 'int_mm' or 'numba'")
        if key == "rows_per_pass" and value not in (1, 4):
            raise ValueError(f"rows_per_pass={value!r} must be 1 or 4")
        if key != "gemm_impl" and value < (0 if key in ("threads", "gemv_max_m") else 1):
            raise ValueError(f"{key}={value!r} is out of range")
    return params


def load() -> dict[str, Any]:
    """CPU_DEFAULTS overlaid with the tuning file's valid entries (missing file: the defaults)."""
    params = dict(CPU_DEFAULTS)
    p = path()
    if not p.is_file():
        return params
    try:
        saved = json.loads(p.read_text())
        if not isinstance(saved, dict):
            raise ValueError("top level is not a JSON object")
    except (OSError, ValueError) as e:
        warnings.warn(f"bitnet_fast: ignoring unreadable kernel tuning file {p} ({e}); using defaults", stacklevel=2)
        return params
    for key, value in saved.items():
        try:
            params.update(validate({key: value}))
        except ValueError as e:
            warnings.warn(f"bitnet_fast: ignoring {p}: {e}", stacklevel=2)
    return params


def save(params: dict[str, Any]) -> Path:
    """Validate and write `params` atomically (temp file + rename); returns the path written."""
    validate(params)
    p = path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".kernel_tuning.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(params, f, indent=2, sort_keys=True)
        os.replace(tmp, p)
    except BaseException:
        os.unlink(tmp)
        raise
    return p
