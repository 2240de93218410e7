"""Layer-wise K/V bit presets for a model, chosen by measured cost under an average-bit budget.

    python -m kvtuner_hicache.calibrate --avg-bits 3.0 --out preset.yaml \\
        --text benches/texts/kjv-genesis.txt --text benches/texts/kjv-proverbs.txt

writes a KVTuner preset (``layer_idx: {nbits_key: N, nbits_value: M}``, the format
``--kvtuner-hicache-layer-config`` reads) with the budget, the model and the measured costs
as YAML comments.

The cost of a preset is the mean KL divergence of the model's next-token distributions
with the quantized prefix KV from those with the unquantized prefix KV, over every scored
token of several (prefix, continuation) windows of the calibration texts - thousands of
tokens. Short-text perplexity deltas are noise (they move both ways by more than the
effect); KL compares whole distributions at every position and is never negative.

1. Sensitivity: each layer's K alone at 2 and 4 bits, and its V alone at 2 and 4 bits, with
   every other layer unquantized. 8 bits is taken as free here (its error variance is
   1/256 of 4 bits'); the joint measurements below include it.
2. Additive optimum: the per-layer pairs minimising the sum of single-layer costs under the
   budget (exact dynamic programming over layers).
3. Greedy search on joint measurements: errors compound across layers, so presets are
   compared only by their measured joint cost. It starts from the best of the additive
   optimum and the uniform configs with the most bits the budget allows (e.g. K4V2 and K2V4
   for 3.0), then each round measures the most promising budget-keeping swaps (one layer's
   K or V a step up, one or two steps down elsewhere, ranked by the table) and moves to the
   best if it beats the current preset; it stops when none does.

The uniform configs are always measured, so a preset is never written that measured worse
than the uniform config of the same bits on the calibration text (the header says which it
is). Deterministic for the same model, texts and options.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections.abc import Sequence

import torch

from .config import ALLOWED_BITS, KVTunerHiCacheConfig, check_page_config, check_uniform_config
from .evaluate import (
    DEFAULT_CONFIG,
    KV_DTYPES,
    _progress,
    add_model_arguments,
    defaults_from_args,
)
from .kv_model import CausalLM, load_model, read_text, scored_nll_and_kl, token_windows
from .roundtrip import quantize_roundtrip

MIN_BITS = min(ALLOWED_BITS)
MAX_BITS = max(ALLOWED_BITS)
PAIRS = tuple((k, v) for k in ALLOWED_BITS for v in ALLOWED_BITS)
# A layer's (K bits, V bits); None leaves that tensor unquantized (sensitivity runs only).
Bits = tuple[int | None, int | None]


def check_budget(avg_bits: float) -> float:
    """The average-bit budget, refused outside what K/V pairs can average."""
    if not isinstance(avg_bits, (int, float)) or not MIN_BITS <= avg_bits <= MAX_BITS:
        raise ValueError(
            f"--avg-bits {avg_bits!r} is outside {MIN_BITS}..{MAX_BITS}: every layer's K and V "
            f"has {', '.join(map(str, ALLOWED_BITS))} bits"
        )
    return float(avg_bits)


def nominal_bits(layer_bits: Sequence[tuple[int, int]]) -> float:
    """Average bits of K and V over all layers."""
    return sum(k + v for k, v in layer_bits) / (2 * len(layer_bits))


@dataclasses.dataclass
class _Window:
    k: torch.Tensor  # prefix KV as the device pool holds it, float32
    v: torch.Tensor
    continuation: list[int]
    ref_logprobs: torch.Tensor
    ref_layer_outputs: list[torch.Tensor]  # replayed for layers before the first quantized one


class Calibrator:
    """Measures the cost (mean KL vs unquantized) of per-layer bits on calibration windows."""

    def __init__(
        self,
        lm: CausalLM,
        texts: Sequence[tuple[str, str]],
        *,
        base: KVTunerHiCacheConfig = DEFAULT_CONFIG,
        prefix_tokens: int = 512,
        continuation_tokens: int = 256,
        windows_per_text: int = 2,
        page_size: int = 64,
        kv_dtype: torch.dtype = torch.float16,
        progress: bool = True,
    ):
        """Reference KV and outputs of every window; ``base`` gives the scheme, including the
        sink tokens every page keeps exact."""
        if not texts:
            raise ValueError("calibration needs at least one --text")
        if windows_per_text < 1:
            raise ValueError(f"--windows-per-text {windows_per_text} must be >= 1")
        if prefix_tokens % page_size:
            raise ValueError(
                f"the prefix ({prefix_tokens} tokens) must be whole pages of --page-size "
                f"{page_size}: HiCache only backs up whole pages"
            )
        check_uniform_config(base)
        check_page_config(base, page_size)
        self.lm = lm
        self.base = base
        self.page_size = page_size
        self.kv_dtype = kv_dtype
        self.progress = progress
        self.layer_num = lm.layer_num
        self.texts = [name for name, _ in texts]
        self.windows: list[_Window] = []
        pieces = [
            window
            for name, text in texts
            for window in token_windows(
                lm.encode(text), prefix_tokens, continuation_tokens, windows_per_text, source=name
            )
        ]
        for prefix, cont in _progress(pieces, progress, "reference"):
            k, v = lm.prefix_kv(prefix)
            k, v = k.to(kv_dtype).float(), v.to(kv_dtype).float()
            self.windows.append(_Window(k, v, cont, *lm.reference_layer_outputs(k, v, cont)))
        self.scored_tokens = sum(len(w.continuation) - 1 for w in self.windows)
        self._costs: dict[tuple[Bits, ...], float] = {}

    @property
    def measurements(self) -> int:
        return len(self._costs)

    def cost(self, layer_bits: Sequence[Bits], windows: int | None = None) -> float:
        """Mean KL (nats/token) with ``layer_bits`` over all windows, or the first
        ``windows`` of them (memoised)."""
        key = tuple((k, v) for k, v in layer_bits)
        if len(key) != self.layer_num:
            raise ValueError(f"{len(key)} layer bit pairs for a {self.layer_num}-layer model")
        used = self.windows[:windows] if windows else self.windows
        if (key, len(used)) not in self._costs:
            first = next((i for i, pair in enumerate(key) if pair != (None, None)), len(key))
            kl_sum, tokens = 0.0, 0
            for w in _progress(used, self.progress and len(used) > 4, "windows"):
                k = self._quantize(w.k, [pair[0] for pair in key], self.base.axis_key)
                v = self._quantize(w.v, [pair[1] for pair in key], self.base.axis_value)
                logprobs = self.lm.continuation_logprobs(
                    k, v, w.continuation, layer_outputs=w.ref_layer_outputs, first_layer=first
                )
                _, kl, n = scored_nll_and_kl(w.ref_logprobs, logprobs, w.continuation)
                kl_sum, tokens = kl_sum + kl, tokens + n
            self._costs[(key, len(used))] = kl_sum / tokens
        return self._costs[(key, len(used))]

    def _quantize(self, x: torch.Tensor, bits, axis: int) -> torch.Tensor:
        out = x.clone()
        for layer, b in enumerate(bits):
            if b is not None:
                out[layer] = quantize_roundtrip(
                    x[layer],
                    self.base,
                    bits=b,
                    axis=axis,
                    dtype=self.kv_dtype,
                    page_size=self.page_size,
                )[0]
        return out

    def sensitivity(
        self, bits: Sequence[int] = (2, 4), windows: int | None = None
    ) -> dict[tuple[int, int, int], float]:
        """``{(layer, 0 for K / 1 for V, bits): cost}`` with only that tensor quantized,
        measured at ``bits`` on the first ``windows`` windows (default all). Other bits are
        extrapolated from the nearest measured: error variance, and so KL for small errors,
        falls 4x per extra bit; 8 bits is taken as free (1/256 of 4 bits')."""
        measured = sorted(set(bits))
        if not measured or not set(measured) <= set(ALLOWED_BITS) - {MAX_BITS}:
            raise ValueError(f"sensitivity bits {list(bits)} must be among 2, 4")
        table = {}
        jobs = [
            (layer, which, b)
            for layer in range(self.layer_num)
            for which in (0, 1)
            for b in measured
        ]
        for layer, which, b in _progress(jobs, self.progress, "sensitivity"):
            pairs: list[Bits] = [(None, None)] * self.layer_num
            pairs[layer] = (b, None) if which == 0 else (None, b)
            table[(layer, which, b)] = self.cost(pairs, windows)
        for layer in range(self.layer_num):
            for which in (0, 1):
                for b in ALLOWED_BITS:
                    if b == MAX_BITS:
                        table[(layer, which, b)] = 0.0
                    elif b not in measured:
                        near = min(measured, key=lambda m: abs(m - b))
                        table[(layer, which, b)] = table[(layer, which, near)] * 4.0 ** (near - b)
        return table


def additive_optimum(
    table: dict[tuple[int, int, int], float], layer_num: int, avg_bits: float
) -> tuple[tuple[int, int], ...]:
    """Pairs minimising the summed single-layer costs with average bits <= ``avg_bits``."""
    cap = math.floor(2 * avg_bits * layer_num + 1e-9)  # on sum(k + v)
    # best[c]: (cost, pairs) of the layers so far using exactly c bits of k + v.
    best: dict[int, tuple[float, tuple[tuple[int, int], ...]]] = {0: (0.0, ())}
    for layer in range(layer_num):
        nxt: dict[int, tuple[float, tuple[tuple[int, int], ...]]] = {}
        for used, (cost, pairs) in sorted(best.items()):
            for k, v in PAIRS:
                c = used + k + v
                if c > cap:
                    continue
                total = cost + table[(layer, 0, k)] + table[(layer, 1, v)]
                if c not in nxt or total < nxt[c][0]:
                    nxt[c] = (total, pairs + ((k, v),))
        best = nxt
    if not best:
        raise ValueError(f"no preset fits --avg-bits {avg_bits}")
    return min(best.values(), key=lambda item: (item[0], -nominal_bits(item[1])))[1]


def uniform_candidates(avg_bits: float) -> list[tuple[int, int]]:
    """The uniform pairs with the most bits that fit the budget (K bits first)."""
    fitting = [p for p in PAIRS if (p[0] + p[1]) / 2 <= avg_bits + 1e-9]
    top = max(sum(p) for p in fitting)
    return sorted((p for p in fitting if sum(p) == top), reverse=True)


def _steps(bits: int, up: bool) -> int | None:
    i = ALLOWED_BITS.index(bits) + (1 if up else -1)
    return ALLOWED_BITS[i] if 0 <= i < len(ALLOWED_BITS) else None


def swap_candidates(
    preset: Sequence[tuple[int, int]],
    table: dict[tuple[int, int, int], float],
    avg_bits: float,
    *,
    downs_considered: int = 12,
) -> list[tuple[float, tuple[tuple[int, int], ...]]]:
    """Budget-keeping neighbours of ``preset`` (one tensor a step up, none, one or two other
    tensors a step down), with their estimated cost change from the table, best first."""
    cap = math.floor(2 * avg_bits * len(preset) + 1e-9)
    used = sum(k + v for k, v in preset)

    def moves(up: bool):
        out = []
        for layer, pair in enumerate(preset):
            for which in (0, 1):
                new = _steps(pair[which], up)
                if new is not None:
                    delta = table[(layer, which, new)] - table[(layer, which, pair[which])]
                    out.append((delta, layer, which, new, new - pair[which]))
        return sorted(out)

    ups = moves(True)
    downs = moves(False)[:downs_considered]
    combos = [()] + [(d,) for d in downs] + list(itertools.combinations(downs, 2))
    found: dict[tuple[tuple[int, int], ...], float] = {}
    for up in ups:
        for combo in combos:
            touched = {(up[1], up[2])} | {(d[1], d[2]) for d in combo}
            if len(touched) != 1 + len(combo) or used + up[4] + sum(d[4] for d in combo) > cap:
                continue
            pairs = [list(p) for p in preset]
            for _, layer, which, new, _ in (up, *combo):
                pairs[layer][which] = new
            key = tuple((p[0], p[1]) for p in pairs)
            est = up[0] + sum(d[0] for d in combo)
            if key not in found or est < found[key]:
                found[key] = est
    return sorted(((est, key) for key, est in found.items()), key=lambda item: item[0])


@dataclasses.dataclass
class CalibrationResult:
    """A chosen preset and what it measured against the uniform config."""

    avg_bits: float
    layer_bits: tuple[tuple[int, int], ...]
    cost: float
    uniform: tuple[int, int]
    uniform_cost: float
    additive_cost: float
    source: str  # "search" or "uniform"

    @property
    def nominal_bits(self) -> float:
        return nominal_bits(self.layer_bits)


def search(
    calibrator: Calibrator,
    table: dict[tuple[int, int, int], float],
    avg_bits: float,
    *,
    rounds: int = 6,
    width: int = 4,
) -> CalibrationResult:
    """Greedy search on measured joint costs (see module docstring)."""
    check_budget(avg_bits)
    layers = calibrator.layer_num
    uniforms = [(calibrator.cost([pair] * layers), pair) for pair in uniform_candidates(avg_bits)]
    uniform_cost, uniform = min(uniforms)
    additive = additive_optimum(table, layers, avg_bits)
    additive_cost = calibrator.cost(additive)
    current = min(
        [(additive_cost, additive), (uniform_cost, (uniform,) * layers)],
        key=lambda item: item[0],
    )
    for _ in _progress(range(rounds), calibrator.progress, f"search {avg_bits:g} bits"):
        tried = [
            (calibrator.cost(pairs), pairs)
            for _, pairs in swap_candidates(current[1], table, avg_bits)[:width]
        ]
        best = min(tried, default=None, key=lambda item: item[0])
        if best is None or best[0] >= current[0]:
            break
        current = best
    cost, preset = current
    return CalibrationResult(
        avg_bits=avg_bits,
        layer_bits=preset,
        cost=cost,
        uniform=uniform,
        uniform_cost=uniform_cost,
        additive_cost=additive_cost,
        source="uniform" if len(set(preset)) == 1 and preset[0] == uniform else "search",
    )


def preset_yaml(result: CalibrationResult, calibrator: Calibrator, model: str) -> str:
    """The preset in KVTuner's format, with its budget, model and measured costs as comments."""
    base = calibrator.base
    u = result.uniform
    lines = [
        "# KVTuner layer-wise K/V bits for kvtuner-patch (--kvtuner-hicache-layer-config)",
        f"# model: {model} ({calibrator.layer_num} layers)",
        (
            f"# budget: {result.avg_bits:g} average bits; this preset: "
            f"{result.nominal_bits:.3f} (K and V over all layers)"
        ),
        (
            f"# measured cost: mean KL {result.cost:.6f} nats/token vs unquantized KV over "
            f"{calibrator.scored_tokens} tokens of {', '.join(calibrator.texts)}"
        ),
        f"# uniform K{u[0]}V{u[1]}: mean KL {result.uniform_cost:.6f}; additive optimum of the "
        f"single-layer costs: {result.additive_cost:.6f}"
        + ("; no searched preset beat the uniform config" if result.source == "uniform" else ""),
        (
            f"# scheme: {'asym' if base.asym else 'sym'}, axis K {base.axis_key} / V "
            f"{base.axis_value}, group {base.group_size}, page {calibrator.page_size}, "
            f"sink tokens {base.sink_tokens}, KV {str(calibrator.kv_dtype).replace('torch.', '')}"
        ),
    ]
    for layer, (k, v) in enumerate(result.layer_bits):
        lines.append(f"{layer}: {{nbits_key: {k}, nbits_value: {v}}}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvtuner_hicache.calibrate",
        description="Choose per-layer K/V bits under an average-bit budget by measured KL.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--avg-bits", type=float, required=True, help="budget: average K/V bits, 2..8"
    )
    parser.add_argument("--out", required=True, help="preset YAML to write")
    parser.add_argument(
        "--text", action="append", required=True, help="calibration text (repeat for several)"
    )
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--continuation-tokens", type=int, default=256)
    parser.add_argument(
        "--windows-per-text",
        type=int,
        default=2,
        help="disjoint prefix+continuation windows taken from each text (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=6, help="greedy rounds (default: 6)")
    parser.add_argument(
        "--width", type=int, default=4, help="swaps measured per round (default: 4)"
    )
    args = parser.parse_args(argv)
    try:
        budget = check_budget(args.avg_bits)
        base = defaults_from_args(args)
        texts = [(path, read_text(path)) for path in args.text]
        lm = load_model(args.model)
        calibrator = Calibrator(
            lm,
            texts,
            base=base,
            prefix_tokens=args.prefix_tokens,
            continuation_tokens=args.continuation_tokens,
            windows_per_text=args.windows_per_text,
            page_size=args.page_size,
            kv_dtype=KV_DTYPES[args.kv_dtype],
        )
        result = search(
            calibrator, calibrator.sensitivity(), budget, rounds=args.rounds, width=args.width
        )
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    text = preset_yaml(result, calibrator, args.model)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text, end="")
    print(f"# {calibrator.measurements} measurements; written to {args.out}")


if __name__ == "__main__":
    main()
