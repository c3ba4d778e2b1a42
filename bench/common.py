"""Shared pieces of the asv suite: fixed seeds and shapes, thread pinning, data location and clean skips.

asv runs the *current* benchmark files against every commit it measures, so whatever a benchmark needs from
the project is imported inside setup through `need()`: a module or function that does not exist yet at that
commit becomes asv's skip (NotImplementedError), not a failure. Imports here stay cheap (asv imports every
benchmark module just to discover the suite).

The CPU kernel tuning file is pinned to none (BITNET_FAST_TUNING=/dev/null, never a file), so every machine times
the plan for its capabilities (kernels/tuning.py), not whatever `bitnet-fast calibrate` last wrote there.
"""

from __future__ import annotations

import importlib
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

os.environ["BITNET_FAST_TUNING"] = os.devnull  # set on import: before any benchmark's setup loads the kernels

SEED = 1234
THREADS = 2  # the suite's thread count for torch and numba: stable numbers on a shared machine

# (N, K) = (out_features, in_features) of real layers: presets from bitnet_fast/model.py and TinyLlama-1.1B.
KERNEL_SHAPES: dict[str, tuple[int, int]] = {
    "small.up 688x256": (688, 256),
    "large.up 2048x768": (2048, 768),
    "tinyllama.qkvo 2048x2048": (2048, 2048),
    "tinyllama.up 5632x2048": (5632, 2048),
    "tinyllama.down 2048x5632": (2048, 5632),
}
PREFILL_ROWS = 128  # M of the GEMM benchmarks: one 128-token prefill chunk


def need(module: str, *names: str) -> ModuleType:
    """Import `module` and check it has `names`; raise NotImplementedError (asv's skip) when absent at this commit.

    Only a missing module or attribute skips: an error raised while importing an existing module propagates,
    so a broken commit shows up as a failed benchmark rather than a silent gap.
    """
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            raise NotImplementedError(f"{module} does not exist at this commit") from None
        raise
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise NotImplementedError(f"{module} has no {', '.join(missing)} at this commit")
    return mod


def pin_threads(n: int = THREADS) -> None:
    """Use `n` threads in torch and numba, and silence deprecation chatter in benchmark output."""
    import numba
    import torch

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def randn(*shape: int, seed: int = SEED, device: str = "cpu"):
    """A reproducible standard-normal tensor: the same values at every commit and on every machine."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device)


def randint(high: int, *shape: int, seed: int = SEED):
    """Reproducible token ids in [0, high)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g)


def cuda_or_skip() -> None:
    """Skip (NotImplementedError) unless a CUDA device is present."""
    import torch

    if not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device on this machine")


def sync() -> None:
    """Wait for queued GPU work so a timing covers it (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(step: Callable[[], object], items_per_call: int, min_time: float = 1.0, min_calls: int = 3) -> float:
    """Items per second of `step`: one untimed warm-up call, then calls until both minimums are met."""
    step()
    sync()
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_time:
        step()
        calls += 1
    sync()
    return calls * items_per_call / (time.perf_counter() - t0)


def wikitext_dir() -> Path:
    """WikiText-2 found as the CLI finds it (BITNET_FAST_DATA, then the user cache dir); skip when absent."""
    data = need("bitnet_fast.data", "find_wikitext", "DataError")
    try:
        return data.find_wikitext(None)
    except data.DataError as e:
        raise NotImplementedError(f"skipped, no data: {e}") from None
