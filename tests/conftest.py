"""Shared test settings: hypothesis profiles (no deadlines: the first call JIT-compiles) and the data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    """Directory holding WikiText-2 (BITNET_FAST_DATA, else ../shared/data); skip when absent."""
    root = Path(os.environ.get("BITNET_FAST_DATA", _SHARED))
    for cand in (root, root / "wikitext-2"):
        if (cand / "train.txt").is_file() and (cand / "valid.txt").is_file():
            return cand
    pytest.skip(f"WikiText-2 not found under {root}; set BITNET_FAST_DATA to the folder holding wikitext-2/")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core box: one torch intra-op thread avoids spin-wait contention (100x on busy hosts)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
