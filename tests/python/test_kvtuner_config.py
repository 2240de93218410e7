"""Config and preset validation: the startup errors users see (no SGLang import)."""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import pytest

from kvtuner_hicache import config as C

ROOT = Path(__file__).resolve().parents[2]


def args(**kw):
    base = dict(enable_hierarchical_cache=True, enable_kvtuner_hicache=True, page_size=64)
    base.update(kw)
    return types.SimpleNamespace(**base)


def write(tmp_path, text, name="preset.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_when_args_group_absent():
    cfg = C.config_from_args(types.SimpleNamespace())
    assert cfg == C.KVTunerHiCacheConfig()
    assert not cfg.enabled
    assert C.validate_server_args(types.SimpleNamespace()) is None


def declared_flags():
    """{field: (default, choices)} of the server-argument declarations the CLI injects,
    read with ``ast`` (the module itself needs SGLang >= 0.5.20 to import)."""
    source = (ROOT / "patches/kvtuner_hicache/server_args_fields.py").read_text()
    [cls] = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    flags = {}
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        choices = [
            tuple(ast.literal_eval(node.value))
            for node in ast.walk(stmt.annotation)
            if isinstance(node, ast.keyword) and node.arg == "choices"
        ]
        flags[stmt.target.id] = (ast.literal_eval(stmt.value), choices[0] if choices else None)
    return flags


def test_defaults_are_the_declared_ones():
    declared = declared_flags()
    assert list(declared) == list(C.DEFAULTS)
    assert {name: default for name, (default, _) in declared.items()} == C.DEFAULTS
    assert {name: c for name, (_, c) in declared.items() if c} == {
        "kvtuner_hicache_nbits_key": C.ALLOWED_BITS,
        "kvtuner_hicache_nbits_value": C.ALLOWED_BITS,
        "kvtuner_hicache_axis_key": C.ALLOWED_AXES,
        "kvtuner_hicache_axis_value": C.ALLOWED_AXES,
        "kvtuner_hicache_codec": C.ALLOWED_CODECS,
    }


def test_readme_flag_table_is_the_declared_one():
    """The README's table lists every flag, in order, with its declared default."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+) \|", readme, flags=re.M)

    def shown(default):
        # Not a dict lookup: False == 0 would show the default 0 as "off".
        return "off" if default is False else "none" if default is None else str(default)

    want = [(C._flag(name), shown(default)) for name, default in C.DEFAULTS.items()]
    assert [(flag, default.strip()) for flag, default in rows] == want


def test_flag_without_hierarchical_cache():
    with pytest.raises(ValueError, match="needs --enable-hierarchical-cache"):
        C.validate_server_args(args(enable_hierarchical_cache=False))


@pytest.mark.parametrize(
    "field,value,msg",
    [
        (
            "kvtuner_hicache_nbits_key",
            3,
            r"--kvtuner-hicache-nbits-key=3 is not one of \[2, 4, 8\]",
        ),
        ("kvtuner_hicache_nbits_value", 16, r"--kvtuner-hicache-nbits-value=16"),
        ("kvtuner_hicache_axis_key", 2, r"--kvtuner-hicache-axis-key=2"),
        ("kvtuner_hicache_q_group_size", 0, r"--kvtuner-hicache-q-group-size=0 must be > 0"),
        ("kvtuner_hicache_residual_length", -1, r"--kvtuner-hicache-residual-length=-1"),
        ("kvtuner_hicache_codec", "gpu", r"--kvtuner-hicache-codec='gpu' is not one of"),
        ("kvtuner_hicache_sink_tokens", -1, r"--kvtuner-hicache-sink-tokens=-1 must be >= 0"),
    ],
)
def test_bad_values(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        C.validate_server_args(args(**{field: value}))


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("hicache_mem_layout", "layer_first", r"--hicache-mem-layout 'layer_first' cannot be"),
        ("hicache_mem_layout", "page_head", r"use one of page_first, page_first_direct"),
        ("hicache_io_backend", "kernel_ascend", r"--hicache-io-backend 'kernel_ascend' cannot"),
    ],
)
def test_host_layout_and_io_backend_refused_at_startup(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        C.validate_server_args(args(**{field: value}))
    C.validate_server_args(
        args(hicache_mem_layout="page_first_direct", hicache_io_backend="direct")
    )
    # Without the flag SGLang decides alone.
    assert C.validate_server_args(args(enable_kvtuner_hicache=False, **{field: value})) is None


def test_startup_hook_ends_with_one_line():
    # What SGLang calls at start-up: no traceback, one line naming the flag, non-zero exit.
    with pytest.raises(SystemExit) as exit_info:
        C.check_server_args(args(kvtuner_hicache_nbits_key=3))
    assert exit_info.value.code == "error: --kvtuner-hicache-nbits-key=3 is not one of [2, 4, 8]"
    assert C.check_server_args(args()).enabled


def test_sink_tokens_must_leave_a_page_quantized():
    per_token = dict(kvtuner_hicache_axis_key=0, kvtuner_hicache_axis_value=0)
    with pytest.raises(ValueError, match=r"sink-tokens=16 keeps a whole page \(--page-size 16\)"):
        C.validate_server_args(args(page_size=16, kvtuner_hicache_sink_tokens=16, **per_token))
    C.validate_server_args(args(page_size=16, kvtuner_hicache_sink_tokens=15, **per_token))


def test_per_channel_group_longer_than_page():
    with pytest.raises(ValueError, match=r"longer than a page \(--page-size 32\)"):
        C.validate_server_args(args(page_size=32, kvtuner_hicache_q_group_size=64))
    # Per-token groups only need to divide head_dim, not fit a page.
    C.validate_server_args(
        args(
            page_size=32,
            kvtuner_hicache_q_group_size=64,
            kvtuner_hicache_axis_key=0,
            kvtuner_hicache_axis_value=0,
        )
    )


def test_preset_parsed(tmp_path):
    path = write(
        tmp_path, "0: {nbits_key: 8, nbits_value: 4}\n'1': {nbits_key: 4, nbits_value: 2}\n"
    )
    cfg = C.validate_server_args(args(kvtuner_hicache_layer_config=path))
    assert cfg.layer_bits_map() == {0: (8, 4), 1: (4, 2)}


@pytest.mark.parametrize(
    "text,msg",
    [
        ("0: {nbits_key: 3, nbits_value: 4}\n", r"layer 0: nbits_key=3 is not one of"),
        ("0: {nbits_key: 4}\n", r"needs both nbits_key and nbits_value"),
        ("0: {0: {nbits_key: 4, nbits_value: 4}}\n", r"per-head preset"),
        ("x: {nbits_key: 4, nbits_value: 4}\n", r"layer key 'x' is not a layer index"),
        ("- 1\n- 2\n", r"must be a non-empty map"),
        ("0: {nbits_key: 4, nbits_value: 4, foo: 1}\n", r"unknown keys \['foo'\]"),
        ("0: [\n", r"cannot parse"),
    ],
)
def test_bad_presets(tmp_path, text, msg):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=msg):
        C.load_layer_preset(path)


def test_missing_preset_file():
    with pytest.raises(ValueError, match="--kvtuner-hicache-layer-config: no such file"):
        C.validate_server_args(args(kvtuner_hicache_layer_config="/nonexistent/p.yaml"))


def plan(cfg, **kw):
    geo = dict(
        start_layer=0,
        target_layer_num=4,
        draft_layer_num=0,
        head_num=2,
        head_dim=128,
        page_size=64,
        dtype_name="float16",
        model_layer_num=4,
    )
    geo.update(kw)
    return C.resolve_layer_plan(cfg, **geo)


def test_preset_naming_layers_the_model_lacks(tmp_path):
    path = write(tmp_path, "".join(f"{i}: {{nbits_key: 4, nbits_value: 2}}\n" for i in range(6)))
    cfg = C.config_from_args(args(kvtuner_hicache_layer_config=path))
    with pytest.raises(ValueError, match=r"names layers 4-5 but the model has 4 layers"):
        plan(cfg)
    # A pipeline stage that cannot know the model's layer count checks only its own.
    assert plan(cfg, model_layer_num=None).layer_bits == ((4, 2),) * 4


def test_preset_missing_layers_use_uniform_bits(tmp_path):
    path = write(tmp_path, "1: {nbits_key: 8, nbits_value: 8}\n")
    cfg = C.config_from_args(
        args(
            kvtuner_hicache_layer_config=path,
            kvtuner_hicache_nbits_key=2,
            kvtuner_hicache_nbits_value=4,
        )
    )
    p = plan(cfg, draft_layer_num=1)
    assert p.layer_bits == ((2, 4), (8, 8), (2, 4), (2, 4), (2, 4))
    # Pipeline stage 2 of 2: global layers 2..3.
    assert plan(cfg, start_layer=1, target_layer_num=2).layer_bits == ((8, 8), (2, 4))


def test_group_must_divide_head_dim_per_token():
    cfg = C.config_from_args(args(kvtuner_hicache_axis_key=0, kvtuner_hicache_q_group_size=48))
    with pytest.raises(ValueError, match=r"does not divide the model's head_dim 128.*key"):
        plan(cfg)


def test_fp8_kv_cache_rejected():
    cfg = C.config_from_args(args())
    with pytest.raises(ValueError, match=r"KV cache dtype is float8_e4m3fn"):
        plan(cfg, dtype_name="float8_e4m3fn")


def test_tag_names_dtype_and_bits_and_changes_with_config():
    cfg = C.config_from_args(args())
    a = plan(cfg).tag()
    assert a.startswith("kvt-f16-k4v4-g64-")
    assert plan(cfg, dtype_name="bfloat16").tag() != a
    assert plan(C.config_from_args(args(kvtuner_hicache_asym=True))).tag() != a
    # The residual window does not change stored pages, so not the namespace either.
    assert plan(C.config_from_args(args(kvtuner_hicache_residual_length=0))).tag() == a
