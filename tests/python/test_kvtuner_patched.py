"""Through a patched SGLang tree (KVTUNER_PATCHED_SGLANG): its own argument
parser accepts the kvtuner flags and rejects bad values with the message users see,
and its host-pool selection builds the quantizing pool only with the flag."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest
import torch

from conftest import build_host_pool, published_server_args, requires_patched

pytestmark = requires_patched


@pytest.fixture(scope="module")
def parser(sgl):
    from sglang.srt.server_args import ServerArgs

    p = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(p)
    return p


# The layout the quantizing pool needs (0.5.3 - 0.5.13.post1 default to layer_first, which
# the startup check refuses; test_layer_first_is_refused_by_name checks that).
LAYOUT = ("--hicache-mem-layout", "page_first")


def parse(parser, *flags):
    return parser.parse_args(["--model-path", "dummy", *LAYOUT, *flags])


def parse_error(parser, *flags) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        parse(parser, *flags)
    return err.getvalue()


def test_flags_accepted(parser, kvh, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("0: {nbits_key: 8, nbits_value: 4}\n")
    ns = parse(
        parser,
        "--enable-hierarchical-cache",
        "--enable-kvtuner-hicache",
        "--kvtuner-hicache-nbits-key",
        "8",
        "--kvtuner-hicache-nbits-value",
        "2",
        "--kvtuner-hicache-asym",
        "--kvtuner-hicache-axis-key",
        "0",
        "--kvtuner-hicache-axis-value",
        "0",
        "--kvtuner-hicache-q-group-size",
        "32",
        "--kvtuner-hicache-residual-length",
        "0",
        "--kvtuner-hicache-layer-config",
        str(preset),
        "--page-size",
        "64",
    )
    cfg = kvh.config.validate_server_args(ns)
    assert (cfg.nbits_key, cfg.nbits_value, cfg.asym, cfg.axis_key, cfg.group_size) == (
        8,
        2,
        True,
        0,
        32,
    )
    assert cfg.layer_bits_map() == {0: (8, 4)}


def test_defaults(parser, kvh):
    ns = parse(parser)
    assert ns.enable_kvtuner_hicache is False
    assert (ns.kvtuner_hicache_nbits_key, ns.kvtuner_hicache_nbits_value) == (4, 4)
    assert kvh.config.validate_server_args(ns) is None


@pytest.mark.parametrize(
    "flags,msg",
    [
        (("--kvtuner-hicache-nbits-key", "3"), "invalid choice"),
        (("--kvtuner-hicache-nbits-value", "x"), "invalid"),
        (("--kvtuner-hicache-axis-key", "2"), "invalid choice"),
    ],
)
def test_parser_rejects_bad_values(parser, flags, msg):
    out = parse_error(parser, *flags)
    assert msg in out and flags[0] in out


def test_cross_field_errors(parser, kvh):
    ns = parse(parser, "--enable-kvtuner-hicache")
    with pytest.raises(ValueError, match="needs --enable-hierarchical-cache"):
        kvh.config.validate_server_args(ns)
    ns = parse(
        parser, "--enable-hierarchical-cache", "--enable-kvtuner-hicache", "--page-size", "32"
    )
    with pytest.raises(ValueError, match="longer than a page"):
        kvh.config.validate_server_args(ns)


def _device_pool(sgl, size=128):
    return sgl["memory_pool"].MHATokenToKVPool(
        size=size,
        page_size=64,
        dtype=torch.float16,
        head_num=2,
        head_dim=64,
        layer_num=2,
        device="cpu",
        enable_memory_saver=False,
        start_layer=0,
        end_layer=2,
    )


def test_selection_follows_the_flag(sgl, kvh, kq):
    """The pool the release builds for a dense MHA device pool, through the patched code
    (get_mha_host_pool_cls from 0.5.14, the stock class's __new__ before)."""
    mha = sgl["mha"]
    dev = _device_pool(sgl)
    with published_server_args(enable_hierarchical_cache=True):
        host = build_host_pool(mha, dev, 2.0, 0, 64, "page_first", pin_memory=False)
        assert type(host) is mha.MHATokenToKVPoolHost
    with published_server_args(
        enable_hierarchical_cache=True,
        enable_kvtuner_hicache=True,
        kvtuner_hicache_residual_length=0,
    ):
        host = build_host_pool(mha, dev, 2.0, 0, 64, "page_first", pin_memory=False)
        assert type(host) is kvh.host_pool.KVTunerMHATokenToKVPoolHost


def test_old_call_sites_build_the_quantizing_pool(sgl, kvh, monkeypatch):
    """0.5.11 - 0.5.13.post1: the release's own `build_kv_host_pool` (it names the stock
    class in a conditional expression, no call) builds the quantizing pool with the flag.
    It pins host memory (CUDA), so both constructors are stubbed: what is checked is the
    class the patched `__new__` picks for that real call site, with its real arguments."""
    if hasattr(sgl["mha"], "get_mha_host_pool_cls"):
        pytest.skip("0.5.14+: every call site asks get_mha_host_pool_cls (tested above)")
    try:
        from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import build_kv_host_pool
    except ImportError:
        pytest.skip("this release has no hybrid_pool_assembler.build_kv_host_pool (0.5.11+)")
    import types

    seen = []
    for cls in (sgl["mha"].MHATokenToKVPoolHost, kvh.host_pool.KVTunerMHATokenToKVPoolHost):
        monkeypatch.setattr(cls, "__init__", lambda self, *a, **k: seen.append(a[0]))
    args = types.SimpleNamespace(
        hicache_ratio=2.0,
        hicache_size=0,
        hicache_mem_layout="page_first",
        hicache_storage_backend=None,
    )
    dev = _device_pool(sgl)
    with published_server_args(enable_hierarchical_cache=True, enable_kvtuner_hicache=True):
        host = build_kv_host_pool(kv_pool=dev, page_size=64, server_args=args, use_mla=False)
    assert type(host) is kvh.host_pool.KVTunerMHATokenToKVPoolHost
    host = build_kv_host_pool(kv_pool=dev, page_size=64, server_args=args, use_mla=False)
    assert type(host) is sgl["mha"].MHATokenToKVPoolHost
    assert seen == [dev, dev]


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(enable_kvtuner_hicache=True), "needs --enable-hierarchical-cache"),
        (
            dict(enable_kvtuner_hicache=True, enable_hierarchical_cache=True, page_size=32),
            r"--kvtuner-hicache-q-group-size=64 is longer than a page \(--page-size 32\)",
        ),
        (
            dict(
                enable_kvtuner_hicache=True,
                enable_hierarchical_cache=True,
                kvtuner_hicache_layer_config="/nonexistent.yaml",
            ),
            "no such file",
        ),
    ],
)
def test_resolution_rejects_bad_combinations(sgl, kw, msg):
    """SGLang's own startup validation (what `sglang serve` runs before loading a model)
    ends start-up with the message as one line (SystemExit, no traceback)."""
    from sglang.srt.server_args import ServerArgs

    layout = dict(hicache_mem_layout="page_first")
    with pytest.raises(SystemExit, match=f"^error: .*{msg}"):
        startup_checks(ServerArgs(model_path="dummy", **layout, **kw))
    startup_checks(
        ServerArgs(
            model_path="dummy",
            enable_kvtuner_hicache=True,
            enable_hierarchical_cache=True,
            page_size=64,
            **layout,
        )
    )


def test_layer_first_is_refused_by_name(sgl):
    """The layout the oldest releases default to ends start-up naming the flag to set."""
    from sglang.srt.server_args import ServerArgs

    args = dict(enable_kvtuner_hicache=True, enable_hierarchical_cache=True, page_size=64)
    with pytest.raises(SystemExit, match="--hicache-mem-layout 'layer_first' cannot be used"):
        startup_checks(ServerArgs(model_path="dummy", hicache_mem_layout="layer_first", **args))


def startup_checks(server_args):
    """The release's startup validation, through the kvtuner check: resolution (0.5.20+:
    the check runs in handle_hicache_ratio_default) and, where the patch put the check at
    the start of ServerArgs.check_server_args (0.5.14 - 0.5.19; the engine calls it before
    any model load), that method. Its own later checks need a resolved model (a dummy path
    has none); only what the kvtuner check raises (ValueError) counts there."""
    import inspect

    resolve = getattr(server_args, "resolve_once", None)  # 0.5.19+; earlier __post_init__
    if resolve is not None:
        resolve()
    method = type(server_args).check_server_args
    if "_kvtuner_check_server_args" not in inspect.getsource(method):
        return
    try:
        method(server_args)
    except ValueError:
        raise
    except Exception:  # the release's model-dependent checks, after ours
        pass


def test_pool_reads_the_published_flags(sgl, kvh, kq, tmp_path):
    """The selected class, built the way the release builds it (no explicit config),
    takes its bits from the published server args, preset included."""
    preset = tmp_path / "p.yaml"
    preset.write_text("1: {nbits_key: 2, nbits_value: 2}\n")
    pool = _device_pool(sgl, size=256)
    with published_server_args(
        enable_hierarchical_cache=True,
        enable_kvtuner_hicache=True,
        kvtuner_hicache_nbits_key=8,
        kvtuner_hicache_layer_config=str(preset),
        kvtuner_hicache_residual_length=0,
    ):
        host = build_host_pool(sgl["mha"], pool, 2.0, 0, 64, "page_first", pin_memory=False)
    assert type(host).__name__ == "KVTunerMHATokenToKVPoolHost"
    assert host.kvtuner_plan.layer_bits == ((8, 4), (2, 2))
    assert host.kvtuner_overlay is None
