"""Shared fixtures for the suites that import SGLang for real (CPU is enough).

The suites run against any release the host pool supports (0.5.23 and the releases
whose host pools take the device pool, e.g. 0.5.19 and 0.5.13.post1):
:func:`host_pool_args` gives what that release passes its dense MHA host pools.

Run in the cached venv (see README):
    $(scripts/sglang-venv.sh 0.5.23)/bin/python -m pytest tests/python

``KVTUNER_PATCHED_SGLANG=/path/to/patched/tree`` (the folder holding a patched
``sglang/``) puts that tree first on sys.path; the tests that need the patched
argument parser or selection run only then and are skipped, with the reason,
otherwise. Without it the installed (stock) SGLang is imported and
``kvtuner_hicache`` comes from ``patches/`` standalone.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCHED = os.environ.get("KVTUNER_PATCHED_SGLANG")

if PATCHED:
    sys.path.insert(0, PATCHED)

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
        "sglang.srt.mem_cache.hicache_storage",
        "sglang.srt.managers.cache_controller",
    ):
        mods[name.rsplit(".", 1)[-1]] = importlib.import_module(name)
    mods["mha"] = mha_module()
    if PATCHED:
        mods["sglang_file"] = mods["mha"].__file__
        assert mods["mha"].__file__.startswith(PATCHED), (
            f"KVTUNER_PATCHED_SGLANG={PATCHED} but sglang came from {mods['mha'].__file__}"
        )
    return mods


def mha_module():
    """The module defining MHATokenToKVPoolHost (and, from 0.5.14,
    get_mha_host_pool_cls): pool_host/mha.py from 0.5.16, memory_pool_host.py before."""
    try:
        return importlib.import_module("sglang.srt.mem_cache.pool_host.mha")
    except ImportError:
        return importlib.import_module("sglang.srt.mem_cache.memory_pool_host")


def takes_buffer_info() -> bool:
    """0.5.23's host pools take an MHABufferInfo; earlier ones the device pool."""
    params = inspect.signature(mha_module().MHATokenToKVPoolHost.__init__).parameters
    return "buffer_info" in params


def host_pool_args(dev):
    """(first argument, keywords) the release passes a dense MHA host pool built for
    device pool ``dev``: 0.5.23 the device pool's MHABufferInfo plus the geometry
    keywords it lacks, 0.5.3 - 0.5.22 the device pool itself. Also what
    ``get_mha_host_pool_cls`` is called with (0.5.14+)."""
    if takes_buffer_info():
        info = dev.get_device_pool_infos()[0].buffer_info
        return info, dict(
            device_capacity_tokens=dev.size, start_layer=0, end_layer=len(dev.k_buffer)
        )
    return dev, {}


def cpu_device_pool(*, size, page_size, heads, head_dim, layers, dtype=None):
    """SGLang's dense MHA device KV pool on CPU, fp16 unless ``dtype`` says otherwise."""
    import torch

    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(
        size=size,
        page_size=page_size,
        dtype=dtype or torch.float16,
        head_num=heads,
        head_dim=head_dim,
        layer_num=layers,
        device="cpu",
        enable_memory_saver=False,
        start_layer=0,
        end_layer=layers,
    )


def quantizing_config(config_module, **overrides):
    """A quantizing-pool config for the suites: K4V4 asymmetric, group 32, no residual window."""
    fields = dict(
        enabled=True,
        nbits_key=4,
        nbits_value=4,
        asym=True,
        axis_key=1,
        axis_value=0,
        group_size=32,
        residual_length=0,
    )
    fields.update(overrides)
    return config_module.KVTunerHiCacheConfig(**fields)


def build_host_pool(mha, dev, *args, **kwargs):
    """A dense MHA host pool for device pool ``dev``, built through the code the patch
    changes: the class ``get_mha_host_pool_cls`` picks (0.5.14+), else the stock
    ``MHATokenToKVPoolHost`` itself, whose patched ``__new__`` picks (0.5.3 -
    0.5.13.post1, where every call site names that class). ``args`` / ``kwargs``
    follow the device pool (ratio, size, page size, layout, ...)."""
    source, geometry = host_pool_args(dev)
    pick = getattr(mha, "get_mha_host_pool_cls", None)
    cls = pick(source) if pick is not None else mha.MHATokenToKVPoolHost
    return cls(source, *args, **geometry, **kwargs)


@contextlib.contextmanager
def published_server_args(**fields):
    """Publish server args where the scheduler process finds them at startup, restored
    afterwards: the context's override (0.5.16+), else a ServerArgs-shaped object through
    the release's slot (0.5.15: the runtime context's ``set_server_args``, 0.5.3.post2 -
    0.5.14: ``set_global_server_args_for_scheduler``), else (0.5.3, 0.5.3.post1) the slot
    the patched ``run_scheduler_process`` fills (``publish_server_args``)."""
    import types

    from sglang.srt import server_args as sa_mod

    try:
        import sglang.srt.runtime_context as rc
    except ImportError:  # before 0.5.15
        rc = None
    published = types.SimpleNamespace(**fields)
    ctx = rc.get_context() if rc is not None else None
    if hasattr(ctx, "override_server_args"):
        with ctx.override_server_args(**fields):
            yield
        return
    if hasattr(ctx, "set_server_args"):  # 0.5.15
        old = ctx._server_args
        ctx.set_server_args(published)
        try:
            yield
        finally:
            ctx._server_args = old
        return
    if hasattr(sa_mod, "set_global_server_args_for_scheduler"):
        old = sa_mod._global_server_args
        sa_mod.set_global_server_args_for_scheduler(published)
        try:
            yield
        finally:
            sa_mod._global_server_args = old
        return
    from sglang.srt.mem_cache.kvtuner_hicache import config

    old = config._scheduler_server_args
    config.publish_server_args(published)
    try:
        yield
    finally:
        config._scheduler_server_args = old


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

# A fleet: real Redis metadata, one volume mounted once per server (juicefs_fleet_fixture.py).
from juicefs_fleet_fixture import fleet, make_fleet  # noqa: E402,F401

# Tiny real model and the evaluate/calibrate modules (tests/python/tiny_lm.py), shared by
# test_evaluate and test_calibrate.
from tiny_lm import kvtools, tiny_model_dir  # noqa: E402,F401
