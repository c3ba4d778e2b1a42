"""Shared test settings: hypothesis profiles (no deadlines: the first call JIT-compiles), the data dir, and no
hidden state: the CPU kernel tuning file is pinned to an empty temporary folder before any test imports the
kernels, so a user's `bitnet-fast calibrate` result cannot change which kernel path the tests exercise."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports bitnet_fast.kernels (kernels.cpu reads the tuning file on first use): the plan for this
# machine's capabilities, nothing else. Subprocesses inherit it. Tests that exercise the file set their own path.
os.environ["BITNET_FAST_TUNING"] = str(Path(tempfile.mkdtemp(prefix="bitnet-fast-tests-")) / "kernel_tuning.json")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_ROOT = Path(__file__).resolve().parents[1]
_SHARED = _ROOT.parent / "shared" / "data"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once unless the package under test is this checkout's: an editable install of another checkout maps
    `bitnet_fast.kernels` to *its* kernels/ (and a non-editable one to a copy), so the tests would pass or fail on
    code they were not given."""
    import importlib.util

    for name, folder in (("bitnet_fast", _ROOT / "bitnet_fast"), ("bitnet_fast.kernels", _ROOT / "kernels")):
        found = Path(importlib.util.find_spec(name).origin).resolve().parent
        if found != folder:
            pytest.exit(f"{name} is imported from {found}, not from this checkout's {folder}; install this checkout "
                        f"(`pip install --no-deps -e {_ROOT}`) or run the tests in the checkout that is installed",
                        returncode=4)


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    """Directory holding WikiText-2 (BITNET_FAST_DATA, else ../shared/data); skip when absent, or fail when
    BITNET_FAST_REQUIRE_DATA=1 (CI sets it: the data is always there, so a skip would hide a broken path)."""
    root = Path(os.environ.get("BITNET_FAST_DATA", _SHARED))
    for cand in (root, root / "wikitext-2"):
        if (cand / "train.txt").is_file() and (cand / "valid.txt").is_file():
            return cand
    msg = f"WikiText-2 not found under {root}; set BITNET_FAST_DATA to the folder holding wikitext-2/"
    if os.environ.get("BITNET_FAST_REQUIRE_DATA") == "1":
        pytest.fail(f"{msg} (BITNET_FAST_REQUIRE_DATA=1: data-dependent tests must run)", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core box: one torch intra-op thread avoids spin-wait contention (100x on busy hosts)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
