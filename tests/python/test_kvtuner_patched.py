"""Through a patched SGLang tree (KVTUNER_PATCHED_SGLANG): its own argument
parser accepts the kvtuner flags and rejects bad values with the message users see,
and its host-pool selection builds the quantizing pool only with the flag."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest
import torch

from conftest import host_pool_args, requires_patched

pytestmark = requires_patched


@pytest.fixture(scope="module")
def parser(sgl):
    from sglang.srt.server_args import ServerArgs

    p = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(p)
    return p


def parse(parser, *flags):
    return parser.parse_args(["--model-path", "dummy", *flags])


def parse_error(parser, *flags) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        parse(parser, *flags)
    return err.getvalue()


def test_flags_accepted(parser, kvh, tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("0: {nbits_key: 8, nbits_value: 4}\n")
    ns = parse(
        parser, "--enable-hierarchical-cache", "--enable-kvtuner-hicache",
        "--kvtuner-hicache-nbits-key", "8", "--kvtuner-hicache-nbits-value", "2",
        "--kvtuner-hicache-asym", "--kvtuner-hicache-axis-key", "0",
        "--kvtuner-hicache-axis-value", "0", "--kvtuner-hicache-q-group-size", "32",
        "--kvtuner-hicache-residual-length", "0",
        "--kvtuner-hicache-layer-config", str(preset), "--page-size", "64",
    )
    cfg = kvh.config.check_server_args(ns)
    assert (cfg.nbits_key, cfg.nbits_value, cfg.asym, cfg.axis_key, cfg.group_size) == (8, 2, True, 0, 32)
    assert cfg.layer_bits_map() == {0: (8, 4)}


def test_defaults(parser, kvh):
    ns = parse(parser)
    assert ns.enable_kvtuner_hicache is False
    assert (ns.kvtuner_hicache_nbits_key, ns.kvtuner_hicache_nbits_value) == (4, 4)
    assert kvh.config.check_server_args(ns) is None


@pytest.mark.parametrize("flags,msg", [
    (("--kvtuner-hicache-nbits-key", "3"), "invalid choice"),
    (("--kvtuner-hicache-nbits-value", "x"), "invalid"),
    (("--kvtuner-hicache-axis-key", "2"), "invalid choice"),
])
def test_parser_rejects_bad_values(parser, flags, msg):
    out = parse_error(parser, *flags)
    assert msg in out and flags[0] in out


def test_cross_field_errors(parser, kvh):
    ns = parse(parser, "--enable-kvtuner-hicache")
    with pytest.raises(ValueError, match="needs --enable-hierarchical-cache"):
        kvh.config.check_server_args(ns)
    ns = parse(parser, "--enable-hierarchical-cache", "--enable-kvtuner-hicache", "--page-size", "32")
    with pytest.raises(ValueError, match="longer than a page"):
        kvh.config.check_server_args(ns)


def _info(sgl):
    pool = sgl["memory_pool"].MHATokenToKVPool(
        size=128, page_size=64, dtype=torch.float16, head_num=2, head_dim=64,
        layer_num=2, device="cpu", enable_memory_saver=False, start_layer=0, end_layer=2,
    )
    return host_pool_args(pool)[0]


def test_selection_follows_the_flag(sgl, kvh):
    from sglang.srt.runtime_context import get_context

    mha = sgl["mha"]
    info = _info(sgl)
    with get_context().override_server_args(enable_hierarchical_cache=True):
        assert mha.get_mha_host_pool_cls(info) is mha.MHATokenToKVPoolHost
    with get_context().override_server_args(
        enable_hierarchical_cache=True, enable_kvtuner_hicache=True
    ):
        assert mha.get_mha_host_pool_cls(info) is kvh.host_pool.KVTunerMHATokenToKVPoolHost


@pytest.mark.parametrize("kw,msg", [
    (dict(enable_kvtuner_hicache=True), "needs --enable-hierarchical-cache"),
    (dict(enable_kvtuner_hicache=True, enable_hierarchical_cache=True, page_size=32),
     r"--kvtuner-hicache-q-group-size=64 is longer than a page \(--page-size 32\)"),
    (dict(enable_kvtuner_hicache=True, enable_hierarchical_cache=True,
          kvtuner_hicache_layer_config="/nonexistent.yaml"), "no such file"),
])
def test_resolution_rejects_bad_combinations(sgl, kw, msg):
    """SGLang's own startup validation (what `sglang serve` runs before loading a model)
    raises the message."""
    from sglang.srt.server_args import ServerArgs

    with pytest.raises(ValueError, match=msg):
        startup_checks(ServerArgs(model_path="dummy", **kw))
    startup_checks(ServerArgs(model_path="dummy", enable_kvtuner_hicache=True,
                              enable_hierarchical_cache=True, page_size=64))


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
    """The selected class, built the way build_kv_host_pool builds it (no explicit
    config), takes its bits from the published server args, preset included."""
    from sglang.srt.runtime_context import get_context

    preset = tmp_path / "p.yaml"
    preset.write_text("1: {nbits_key: 2, nbits_value: 2}\n")
    pool = sgl["memory_pool"].MHATokenToKVPool(
        size=256, page_size=64, dtype=torch.float16, head_num=2, head_dim=64,
        layer_num=2, device="cpu", enable_memory_saver=False, start_layer=0, end_layer=2,
    )
    info, geometry = host_pool_args(pool)
    with get_context().override_server_args(
        enable_hierarchical_cache=True, enable_kvtuner_hicache=True,
        kvtuner_hicache_nbits_key=8, kvtuner_hicache_layer_config=str(preset),
        kvtuner_hicache_residual_length=0,
    ):
        cls = sgl["mha"].get_mha_host_pool_cls(info)
        host = cls(info, 2.0, 0, 64, "page_first", pin_memory=False, **geometry)
    assert host.kvtuner_plan.layer_bits == ((8, 4), (2, 2))
    assert host._ovl is None
