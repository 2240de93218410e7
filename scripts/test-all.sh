#!/usr/bin/env bash
# Every test of the project, cheapest first; stops at the first failure.
#   1. Rust: the kvtuner-patch CLI (unit, fixture snapshot, CLI, real-release tests).
#   2. kvtuner_quant: cargo tests of the core, then pytest against the numpy oracle and real KV.
#   3. SGLang 0.5.23 for real (cached venv with the full install): a fresh copy of the release is
#      patched by the CLI, then pytest drives the quantizing host pool, the patched argument parser
#      and backend factory, and the JuiceFS backend on a real FUSE mount.
#   4. The release matrix: apply / verify / apply-again / revert on every release in
#      scripts/releases.txt; writes docs/compat.md.
# Caches (wheels, venvs, captured KV) live under ${KVTUNER_CACHE:-~/.cache/kvtuner-patch}.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
cache=${KVTUNER_CACHE:-$HOME/.cache/kvtuner-patch}
step() { printf '\n==== %s\n' "$*"; }

rm -f target/functional-results.tsv   # only this run's functional results reach the table

step "cargo test: kvtuner-patch CLI"
cargo test --locked

step "python venv with the full sglang 0.5.23 install (cached; ~10 min the first time)"
venv=$(scripts/sglang-venv.sh 0.5.23)
py="$venv/bin/python"

step "kvtuner_quant: cargo test, install, pytest"
quant/run-tests.sh "$py"

step "kvtuner_hicache: install the injected package standalone (the unpatched 'dynamic' path uses it)"
"$py" -m pip install --quiet --no-deps --force-reinstall --no-cache-dir ./patches

step "patch a fresh copy of sglang 0.5.23 with the CLI"
cargo build --locked --release --quiet
patched=$(mktemp -d "${TMPDIR:-/tmp}/kvtuner-sglang-0.5.23.XXXXXX")
trap 'rm -rf "$patched"' EXIT
cp -a "$(scripts/sglang-wheel.sh 0.5.23)/." "$patched/"
target/release/kvtuner-patch apply --sglang-root "$patched" --python "$py"
target/release/kvtuner-patch verify --sglang-root "$patched" --python "$py"

step "pytest: host pool, patched SGLang, JuiceFS (real FUSE mount)"
KVTUNER_PATCHED_SGLANG="$patched" "$py" -m pytest -q -rs -p no:cacheprovider tests/python
# Reached only when pytest passed (set -e): the release matrix's "functional" column reads this.
mkdir -p target && printf '0.5.23\tpass\n' >> target/functional-results.tsv

step "release matrix"
scripts/release-matrix.sh --allow-partial
