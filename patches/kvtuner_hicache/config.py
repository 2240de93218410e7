"""Quantization config of the KVTuner HiCache host pool: the ``kvtuner`` server arguments,
the per-layer preset file, the startup checks, and the binding of both to a model. Flags,
preset policy and checks: ``docs/host-pool.md``.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

ALLOWED_BITS = (2, 4, 8)
ALLOWED_AXES = (0, 1)
ALLOWED_CODECS = ("auto", "device", "host")

# The host layouts and I/O backends the quantizing pool serves (the others move fp16 spans
# per layer or per head, which a quantized row does not have).
SUPPORTED_LAYOUTS = ("page_first", "page_first_direct")
SUPPORTED_IO_BACKENDS = ("kernel", "direct")


def _flag(name: str) -> str:
    """The command-line spelling of a server-argument field."""
    return "--" + name.replace("_", "-")


def _declared_defaults() -> Dict[str, Any]:
    """The server arguments declared in ``server_args_fields.py`` and their defaults, in order."""
    # Read, not imported: importing the declarations needs SGLang >= 0.5.20, and a tree the
    # `kvtuner` group did not patch still needs the defaults (the feature reads as off there).
    source = Path(__file__).with_name("server_args_fields.py").read_text(encoding="utf-8")
    [fields] = [node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)]
    return {
        stmt.target.id: ast.literal_eval(stmt.value)
        for stmt in fields.body
        if isinstance(stmt, ast.AnnAssign)
    }


# The `kvtuner` group's server arguments and their defaults, declared once for SGLang in
# server_args_fields.py. A field a tree lacks (the group not patched in) reads as its default.
DEFAULTS: Dict[str, Any] = _declared_defaults()


def _from_flag(name: str) -> Any:
    """A config field holding the server argument ``name``, with its declared default."""
    return dataclasses.field(default=DEFAULTS[name], metadata={"flag": name})


@dataclasses.dataclass(frozen=True)
class KVTunerHiCacheConfig:
    """The flags as given (not yet bound to a model)."""

    enabled: bool = _from_flag("enable_kvtuner_hicache")
    nbits_key: int = _from_flag("kvtuner_hicache_nbits_key")
    nbits_value: int = _from_flag("kvtuner_hicache_nbits_value")
    asym: bool = _from_flag("kvtuner_hicache_asym")
    axis_key: int = _from_flag("kvtuner_hicache_axis_key")
    axis_value: int = _from_flag("kvtuner_hicache_axis_value")
    group_size: int = _from_flag("kvtuner_hicache_q_group_size")
    residual_length: int = _from_flag("kvtuner_hicache_residual_length")
    # The first tokens of every page, also stored exact: every sequence starts a page, so
    # its attention sink (position 0) is among them.
    sink_tokens: int = _from_flag("kvtuner_hicache_sink_tokens")
    layer_config: Optional[str] = _from_flag("kvtuner_hicache_layer_config")
    # Who packs the pages: Triton kernels on the device, kvtuner_quant on the host, or
    # "auto" (the device when the KV cache is on a CUDA/ROCm device and Triton imports).
    codec: str = _from_flag("kvtuner_hicache_codec")
    # Parsed preset: global layer id -> (K bits, V bits); None without a preset.
    layer_bits: Optional[Tuple[Tuple[int, Tuple[int, int]], ...]] = None

    def layer_bits_map(self) -> Optional[Dict[int, Tuple[int, int]]]:
        """The preset as ``{layer: (K bits, V bits)}``, or None without one."""
        return None if self.layer_bits is None else dict(self.layer_bits)


# The config fields that hold a server argument, by the argument's name.
_FIELD_OF_FLAG: Dict[str, dataclasses.Field] = {
    f.metadata["flag"]: f for f in dataclasses.fields(KVTunerHiCacheConfig) if f.metadata
}


def _arg(args: Any, name: str) -> Any:
    """The server argument ``name`` of ``args``, or its default where the tree lacks it."""
    value = getattr(args, name, None) if args is not None else None
    return DEFAULTS[name] if value is None else value


def config_from_args(args: Any, *, load_preset: bool = True) -> KVTunerHiCacheConfig:
    """The config from anything carrying the server-argument names as attributes."""
    # ServerArgs, the resolved `memory` bag, an argparse namespace.
    values = {f.name: _typed_arg(args, name, f.type) for name, f in _FIELD_OF_FLAG.items()}
    path = values["layer_config"]
    if path and load_preset:
        values["layer_bits"] = tuple(sorted(load_layer_preset(path).items()))
    return KVTunerHiCacheConfig(**values)


def _typed_arg(args: Any, name: str, type_name: str) -> Any:
    """The server argument ``name`` as the config field's type (``type_name``) wants it."""
    if type_name == "int":
        return _int_arg(args, name)
    value = _arg(args, name)
    if type_name == "bool":
        return bool(value)
    if type_name == "str":
        return str(value)
    return str(value) if value else None  # Optional[str]: a path, or none


def _int_arg(args: Any, name: str) -> int:
    """The server argument ``name`` as an int (argparse-free callers may pass strings)."""
    value = _arg(args, name)
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError:
            raise ValueError(f"{_flag(name)} must be an integer, got {value!r}") from None
    return value


def current_server_config() -> KVTunerHiCacheConfig:
    """The config of the running server; off where nothing is published (tests, tools)."""
    source = _published_memory_args()
    return config_from_args(source, load_preset=source is not None)


# The server args `run_scheduler_process` hands over (the patch does so in 0.5.3 -
# 0.5.13.post1): 0.5.3 and 0.5.3.post1 have no process-wide slot of their own to read.
_scheduler_server_args: Any = None


def publish_server_args(args: Any) -> None:
    """Remember the scheduler process's ``ServerArgs`` (called first thing there)."""
    global _scheduler_server_args
    _scheduler_server_args = args


def _published_memory_args() -> Any:
    """The release's own published arguments, else what the scheduler handed over."""
    found = _release_memory_args()
    return found if found is not None else _scheduler_server_args


def _release_memory_args() -> Any:
    """The running server's arguments as the release publishes them, or None."""
    try:
        import sglang.srt.runtime_context as rc
    except ImportError:  # standalone install without SGLang, or before 0.5.15 (no runtime context)
        rc = None
    bag = _memory_bag(rc)
    if bag is not None and "enable_kvtuner_hicache" in bag:
        return _BagView(bag)
    getter = _server_args_getter(rc)
    if getter is None:
        return bag
    try:
        return getter()
    except _NOT_PUBLISHED:
        return bag


# What the releases' getters raise while nothing is published yet.
_NOT_PUBLISHED = (ValueError, RuntimeError, AttributeError, AssertionError)


def _memory_bag(rc: Any) -> Any:
    """The resolved ``memory`` config bag (0.5.17+), or None."""
    get_memory = getattr(rc, "get_memory", None)
    if get_memory is None:
        return None
    try:
        return get_memory()
    except _NOT_PUBLISHED:
        return None


def _server_args_getter(rc: Any) -> Optional[Callable[[], Any]]:
    """The release's getter of its published ``ServerArgs``; None in 0.5.3 and 0.5.3.post1."""
    getter = getattr(rc, "get_server_args", None)  # 0.5.15+
    if getter is not None:
        return getter
    try:  # 0.5.3.post2 - 0.5.14: the module-level global of server_args.py
        from sglang.srt.server_args import get_global_server_args
    except ImportError:
        return None
    return get_global_server_args


class _BagView:
    """A resolved config bag whose absent leaves read as None (the bag itself raises)."""

    def __init__(self, bag: Any):
        self._bag = bag

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bag, name, None)


def is_enabled() -> bool:
    """Whether the running server asked for the quantizing host pool."""
    source = _published_memory_args()
    return bool(getattr(source, "enable_kvtuner_hicache", False) or False)


# --------------------------------------------------------------------- preset ---


def load_layer_preset(path: str) -> Dict[int, Tuple[int, int]]:
    """Parse a KVTuner per-layer preset YAML into ``{layer: (k_bits, v_bits)}``."""
    flag = _flag("kvtuner_hicache_layer_config")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file: {path!r}")
    try:
        import yaml
    except ImportError as e:  # pyyaml ships with SGLang; say so if it is missing
        raise ValueError(f"{flag}: reading {path!r} needs PyYAML ({e})") from None
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{flag}: cannot parse {path!r}: {e}") from None
    return parse_layer_preset(data, source=path)


def parse_layer_preset(data: Any, *, source: str = "<preset>") -> Dict[int, Tuple[int, int]]:
    """Validate a loaded preset into ``{layer: (k_bits, v_bits)}``; ``source`` names it."""
    flag = _flag("kvtuner_hicache_layer_config")
    if not isinstance(data, Mapping) or not data:
        raise ValueError(
            f"{flag}: {source} must be a non-empty map "
            "'layer_idx: {nbits_key: N, nbits_value: M}', got "
            f"{type(data).__name__}"
        )
    out: Dict[int, Tuple[int, int]] = {}
    for raw_layer, entry in data.items():
        layer = _layer_index(raw_layer, flag, source)
        if layer in out:
            raise ValueError(f"{flag}: {source} names layer {layer} twice")
        out[layer] = _entry_bits(entry, f"{flag}: {source} layer {layer}")
    return out


def _entry_bits(entry: Any, where: str) -> Tuple[int, int]:
    """(K bits, V bits) of one preset entry ``{nbits_key: N, nbits_value: M}``."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected {{nbits_key: N, nbits_value: M}}, got {entry!r}")
    if "nbits_key" not in entry or "nbits_value" not in entry:
        if entry and all(_is_int_like(k) for k in entry):
            raise ValueError(
                f"{where} is a per-head preset "
                "(layer -> head -> bits); per-head bits are not supported by the "
                "host pool (it stores whole heads together). Use one "
                "{nbits_key, nbits_value} pair per layer."
            )
        raise ValueError(
            f"{where}: needs both nbits_key and nbits_value, got keys {sorted(map(str, entry))}"
        )
    extra = set(map(str, entry)) - {"nbits_key", "nbits_value"}
    if extra:
        raise ValueError(f"{where}: unknown keys {sorted(extra)}")
    for name in ("nbits_key", "nbits_value"):
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
            raise ValueError(f"{where}: {name}={value!r} is not one of {list(ALLOWED_BITS)}")
    return entry["nbits_key"], entry["nbits_value"]


def _is_int_like(value: Any) -> bool:
    """An int, or a string of one (YAML keys may be either); never a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _layer_index(raw: Any, flag: str, source: str) -> int:
    """A preset key as a layer index."""
    if not _is_int_like(raw) or int(raw) < 0:
        raise ValueError(f"{flag}: {source}: layer key {raw!r} is not a layer index (int >= 0)")
    return int(raw)


# -------------------------------------------------------------- arg checks ---


def check_server_args(args: Any) -> Optional[KVTunerHiCacheConfig]:
    """The startup hook SGLang calls: a bad flag ends start-up with one line naming it."""
    # SystemExit, not the ValueError: SGLang would print it as a traceback.
    try:
        return validate_server_args(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def validate_server_args(args: Any) -> Optional[KVTunerHiCacheConfig]:
    """Startup checks that need only the arguments: the config when on, None when off."""
    # Raises ValueError naming the flag and the bad value.
    cfg = config_from_args(args, load_preset=False)
    if not cfg.enabled:
        return None
    if not getattr(args, "enable_hierarchical_cache", False):
        raise ValueError(
            f"{_flag('enable_kvtuner_hicache')} quantizes the hierarchical cache's host "
            "pool and needs --enable-hierarchical-cache"
        )
    check_host_transfer_args(args)
    check_uniform_config(cfg)
    page_size = getattr(args, "page_size", None)
    if page_size:
        check_page_config(cfg, int(page_size))
    if cfg.layer_config:
        cfg = dataclasses.replace(
            cfg, layer_bits=tuple(sorted(load_layer_preset(cfg.layer_config).items()))
        )
    return cfg


def check_host_transfer_args(args: Any) -> None:
    """Refuse a host layout or I/O backend the quantizing pool cannot serve."""
    for flag, value, supported, why in (
        (
            "--hicache-mem-layout",
            getattr(args, "hicache_mem_layout", None),
            SUPPORTED_LAYOUTS,
            "the quantizing pool stores page-major quantized rows",
        ),
        (
            "--hicache-io-backend",
            getattr(args, "hicache_io_backend", None),
            SUPPORTED_IO_BACKENDS,
            "the other backends' copy kernels need fp16 host rows",
        ),
    ):
        if value is not None and value not in supported:
            raise ValueError(
                f"{flag} {value!r} cannot be used with {_flag('enable_kvtuner_hicache')}: "
                f"{why} (use one of {', '.join(supported)})"
            )


def check_uniform_config(cfg: KVTunerHiCacheConfig) -> None:
    """Refuse bits, axes, group size or residual length outside their ranges."""
    for name, value in (
        ("kvtuner_hicache_nbits_key", cfg.nbits_key),
        ("kvtuner_hicache_nbits_value", cfg.nbits_value),
    ):
        if value not in ALLOWED_BITS:
            raise ValueError(f"{_flag(name)}={value} is not one of {list(ALLOWED_BITS)}")
    for name, value in (
        ("kvtuner_hicache_axis_key", cfg.axis_key),
        ("kvtuner_hicache_axis_value", cfg.axis_value),
    ):
        if value not in ALLOWED_AXES:
            raise ValueError(
                f"{_flag(name)}={value} is not one of {list(ALLOWED_AXES)} "
                "(0 = per-token groups along head_dim, 1 = per-channel groups of tokens)"
            )
    if cfg.group_size <= 0:
        raise ValueError(f"{_flag('kvtuner_hicache_q_group_size')}={cfg.group_size} must be > 0")
    if cfg.residual_length < 0:
        raise ValueError(
            f"{_flag('kvtuner_hicache_residual_length')}={cfg.residual_length} must be >= 0"
        )
    if cfg.sink_tokens < 0:
        raise ValueError(f"{_flag('kvtuner_hicache_sink_tokens')}={cfg.sink_tokens} must be >= 0")
    if cfg.codec not in ALLOWED_CODECS:
        raise ValueError(
            f"{_flag('kvtuner_hicache_codec')}={cfg.codec!r} is not one of {list(ALLOWED_CODECS)}"
        )


def check_page_config(cfg: KVTunerHiCacheConfig, page_size: int) -> None:
    """Refuse per-channel groups longer than a page, and a page that would be all sink."""
    if cfg.sink_tokens >= page_size:
        raise ValueError(
            f"{_flag('kvtuner_hicache_sink_tokens')}={cfg.sink_tokens} keeps a whole page "
            f"(--page-size {page_size}) exact; use fewer sink tokens than the page size "
            "(0 turns them off)"
        )
    # Per-channel groups run along tokens and must never cross a page: a page is
    # the unit every backup, load and storage transfer moves.
    if (cfg.axis_key == 1 or cfg.axis_value == 1) and cfg.group_size > page_size:
        which = [n for n, a in (("key", cfg.axis_key), ("value", cfg.axis_value)) if a == 1]
        raise ValueError(
            f"{_flag('kvtuner_hicache_q_group_size')}={cfg.group_size} is longer than a "
            f"page (--page-size {page_size}); per-channel ({'/'.join(which)}) groups "
            "never cross a page. Use a group size <= the page size or axis 0."
        )


# ------------------------------------------------------------ model binding ---


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """The config bound to one host pool: (K bits, V bits) for each pool layer."""

    cfg: KVTunerHiCacheConfig
    layer_bits: Tuple[Tuple[int, int], ...]  # index = pool-local layer
    head_num: int
    head_dim: int
    page_size: int
    dtype_name: str  # "float16" / "bfloat16" / "float32"
    # "mha": K and V rows of head_num x head_dim; "mla": a latent of head_dim (kv_lora_rank)
    # and rope keys of rope_dim per token (page_format.ROW_KINDS).
    kind: str = "mha"
    rope_dim: int = 0

    def tag(self) -> str:
        """Short stable name of everything that decides the stored page bytes."""
        # Dtype, geometry, per-layer bits, symmetry, axes, group size, sink tokens and the
        # page format version. The residual window is absent on purpose: storage only ever
        # receives quantized pages.
        from .page_format import ROW_KINDS

        c = self.cfg
        short = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}[self.dtype_name]
        if self.kind == "mha":
            # The description MHA tags have always had, so stored pages keep their namespace.
            bits_desc = (self.layer_bits, c.asym, c.axis_key, c.axis_value)
            extra = ()
            kinds = sorted(set(self.layer_bits))
            bits = f"k{kinds[0][0]}v{kinds[0][1]}" if len(kinds) == 1 else "mixed"
        else:
            # MLA: only the latent is quantized, with the key bits and axis.
            latent_bits = tuple(k for k, _ in self.layer_bits)
            bits_desc = (latent_bits, c.asym, c.axis_key)
            extra = (self.kind, self.rope_dim)
            kinds = sorted(set(latent_bits))
            bits = f"l{kinds[0]}" if len(kinds) == 1 else "mixed"
            short = f"{self.kind}-{short}"
        desc = repr(
            (
                ROW_KINDS[self.kind][0],
                self.dtype_name,
                self.page_size,
                self.head_num,
                self.head_dim,
                *bits_desc,
                c.group_size,
                c.sink_tokens,
                *extra,
            )
        )
        digest = hashlib.sha256(desc.encode()).hexdigest()[:12]
        return f"kvt-{short}-{bits}-g{c.group_size}-s{c.sink_tokens}-{digest}"


def resolve_layer_plan(
    cfg: KVTunerHiCacheConfig,
    *,
    start_layer: int,
    target_layer_num: int,
    draft_layer_num: int,
    head_num: int,
    head_dim: int,
    page_size: int,
    dtype_name: str,
    model_layer_num: Optional[int],
    kind: str = "mha",
    rope_dim: int = 0,
) -> LayerPlan:
    """Bind the flags to a host pool's layers, geometry and KV dtype (MLA: head_num 1,
    head_dim the latent's kv_lora_rank, rope_dim the exact rope keys)."""
    # model_layer_num: the model's layer count where this rank knows it (no pipeline
    # parallelism, or the last stage); with None only this stage's layers are checked.
    check_uniform_config(cfg)
    check_page_config(cfg, page_size)
    _check_kv_dtype(dtype_name)
    _check_head_dim_groups(cfg, head_dim, kind)
    layers = range(start_layer, start_layer + target_layer_num)
    bits = _target_layer_bits(cfg, layers, model_layer_num)
    bits += [(cfg.nbits_key, cfg.nbits_value)] * draft_layer_num
    return LayerPlan(
        cfg=cfg,
        layer_bits=tuple(bits),
        head_num=head_num,
        head_dim=head_dim,
        page_size=page_size,
        dtype_name=dtype_name,
        kind=kind,
        rope_dim=rope_dim,
    )


def _check_kv_dtype(dtype_name: str) -> None:
    """Refuse a device KV cache the codec cannot read (fp8, fp4, ...)."""
    if dtype_name not in ("float16", "bfloat16", "float32"):
        raise ValueError(
            f"{_flag('enable_kvtuner_hicache')}: the KV cache dtype is {dtype_name}; the "
            "quantizing host pool needs fp16, bf16 or fp32 device KV (do not combine it "
            "with an fp8/fp4 --kv-cache-dtype)"
        )


def _check_head_dim_groups(cfg: KVTunerHiCacheConfig, head_dim: int, kind: str = "mha") -> None:
    """Refuse per-token groups that do not divide head_dim (MLA: the latent's width)."""
    axes = [(cfg.axis_key, "key")]
    if kind == "mha":
        axes.append((cfg.axis_value, "value"))
    what = "head_dim" if kind == "mha" else "MLA latent width (kv_lora_rank)"
    for axis, name in axes:
        if axis == 0 and head_dim % cfg.group_size:
            raise ValueError(
                f"{_flag('kvtuner_hicache_q_group_size')}={cfg.group_size} does not divide "
                f"the model's {what} {head_dim}, which per-token {name} groups "
                f"({_flag('kvtuner_hicache_axis_' + name)} 0) require"
            )


def _target_layer_bits(
    cfg: KVTunerHiCacheConfig, layers: range, model_layer_num: Optional[int]
) -> List[Tuple[int, int]]:
    """(K bits, V bits) of each of ``layers``: the preset's, else the uniform bits."""
    uniform = (cfg.nbits_key, cfg.nbits_value)
    preset = cfg.layer_bits_map()
    if preset is None:
        return [uniform] * len(layers)
    where = f"{_flag('kvtuner_hicache_layer_config')} {cfg.layer_config}"
    missing = [layer for layer in layers if layer not in preset]
    if missing:
        logger.info(
            "%s lists no bits for layers %s; they use the uniform K%dV%d",
            where,
            _ranges(missing),
            uniform[0],
            uniform[1],
        )
    if model_layer_num is not None:
        extra = sorted(layer for layer in preset if layer >= model_layer_num)
        if extra:
            raise ValueError(
                f"{where}: names layers {_ranges(extra)} but the model has "
                f"{model_layer_num} layers (0..{model_layer_num - 1}); is the preset "
                "for another model?"
            )
    return [preset.get(layer, uniform) for layer in layers]


def _ranges(values: Iterable[int]) -> str:
    """``"0-3, 7"`` for ``[0, 1, 2, 3, 7]``."""
    vals = sorted(values)
    out = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(out)


def uniform_plan_for(
    cfg: KVTunerHiCacheConfig, layer_bits: Sequence[Tuple[int, int]], **geometry: Any
) -> LayerPlan:
    """A LayerPlan from explicit per-layer bits (benchmarks, tests)."""
    return LayerPlan(cfg=cfg, layer_bits=tuple(layer_bits), **geometry)
