"""Shared fixtures for the suites that import SGLang 0.5.23 for real (CPU is enough).

Run in the cached venv (see README):
    $(scripts/sglang-venv.sh 0.5.23)/bin/python -m pytest tests/python

``KVTUNER_PATCHED_SGLANG=/path/to/patched/tree`` (the folder holding a patched
``sglang/``) puts that tree first on sys.path; the tests that need the patched
argument parser or selection run only then and are skipped, with the reason,
otherwise. Without it the installed (stock) SGLang is imported and
``kvtuner_hicache`` comes from ``patches/`` standalone.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCHED = os.environ.get("KVTUNER_PATCHED_SGLANG")

if PATCHED:
    sys.path.insert(0, PATCHED)
# The package as installed standalone: patches/kvtuner_hicache.
sys.path.insert(0, str(ROOT / "patches"))

warnings.filterwarnings("ignore", message="Only CUDA.*")

requires_patched = pytest.mark.skipif(
    not PATCHED,
    reason="needs a patched SGLang tree: set KVTUNER_PATCHED_SGLANG to the folder holding it",
)


@pytest.fixture(scope="session")
def sgl():
    """The SGLang modules the suites use, imported once (the import takes ~30 s)."""
    mods = {}
    for name in (
        "sglang.srt.mem_cache.memory_pool",
        "sglang.srt.mem_cache.pool_host.mha",
        "sglang.srt.mem_cache.hicache_storage",
        "sglang.srt.managers.cache_controller",
    ):
        mods[name.rsplit(".", 1)[-1]] = importlib.import_module(name)
    if PATCHED:
        mods["sglang_file"] = mods["mha"].__file__
        assert mods["mha"].__file__.startswith(PATCHED), (
            f"KVTUNER_PATCHED_SGLANG={PATCHED} but sglang came from {mods['mha'].__file__}"
        )
    return mods


@pytest.fixture(scope="session")
def kq():
    try:
        import kvtuner_quant
    except ImportError as e:  # a hard failure: the host pool cannot work without it
        pytest.fail(f"kvtuner_quant is not installed (pip install ./quant): {e}")
    return kvtuner_quant


@pytest.fixture(scope="session")
def kvh(sgl):
    """The kvtuner_hicache package: injected into the patched tree when there is one,
    else the standalone copy from patches/. Returns a namespace of its modules."""
    base = "sglang.srt.mem_cache.kvtuner_hicache" if PATCHED else "kvtuner_hicache"
    ns = type("kvh", (), {})()
    for sub in ("config", "page_format", "host_pool", "selection"):
        setattr(ns, sub, importlib.import_module(f"{base}.{sub}"))
    return ns

# JuiceFS volume fixtures (tests/python/juicefs_fixture.py), shared by the test_juicefs_* suites.
from juicefs_fixture import juicefs_volume, make_volume  # noqa: E402,F401
