#!/usr/bin/env bash
# Every test of the project, cheapest first; stops at the first failure.
#   0. Python style: `ruff format --check` and `ruff check` over every Python file (ruff.toml),
#      with the ruff pinned in scripts/test-requirements.txt, from the cached SGLang venv.
#   1. Rust: the kvtuner-patch CLI (unit, fixture snapshot, CLI, real-release tests).
#   2. kvtuner_quant: cargo tests of the core, then pytest against the numpy oracle and real KV.
#   3. SGLang 0.5.23 for real (cached venv with the full install; scripts/functional-matrix.sh): a
#      fresh copy of the release is patched by the CLI, then pytest drives the quantizing host pool,
#      the patched argument parser and backend factory, and the JuiceFS backend on a real FUSE mount,
#      and starts real `sglang.launch_server` processes of the patched tree on SGLang's CPU engine
#      (tests/python/test_live_server.py: host and storage hits over HTTP; L3 through file,
#      JuiceFS, NIXL and Mooncake; ~13 min; older releases serve one-token pages only;
#      tests/python/test_live_mla.py: a tiny DeepSeek-V2-shaped model through the MLA pool, ~3 min).
#      With KVTUNER_FULL_MATRIX=1 also on one release of each older era (0.5.22: device-pool
#      constructor with the keyword-only base; 0.5.19; 0.5.16; 0.5.15: chooser in
#      memory_pool_host.py; 0.5.13.post1).
#   4. The release matrix: apply / verify / apply-again / revert on every release in
#      scripts/releases.txt; checks that README's compatibility table is what this run found and
#      that this run's functional results agree with docs/functional-results.tsv. Nothing tracked
#      is written (the table is rewritten only by `scripts/release-matrix.sh --write`).
# Caches (wheels, venvs, captured KV) live under ${KVTUNER_CACHE:-~/.cache/kvtuner-patch}.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
cache=${KVTUNER_CACHE:-$HOME/.cache/kvtuner-patch}
step() { printf '\n==== %s\n' "$*"; }

# Tests never write tracked files: what `git status` says now must still hold at the end.
git_state() { git status --porcelain=v1 --untracked-files=all 2>/dev/null || true; }
before=$(git_state)

rm -f target/functional-results.tsv   # this run's functional results, checked by the matrix

step "python venv with the full sglang 0.5.23 install (cached; ~10 min the first time)"
venv=$(scripts/sglang-venv.sh 0.5.23)
py="$venv/bin/python"

step "python style: ruff format --check, ruff check (ruff.toml)"
"$venv/bin/ruff" format --check .
"$venv/bin/ruff" check .

step "cargo test: kvtuner-patch CLI"
cargo test --locked

step "kvtuner_quant: cargo test, install, pytest"
quant/run-tests.sh "$py"

step "SGLang 0.5.23 for real: patch a fresh copy with the CLI, pytest host pool, patched SGLang, JuiceFS (real FUSE mount)"
# Records `0.5.23<TAB>pass|fail` in target/functional-results.tsv (untracked).
scripts/functional-matrix.sh 0.5.23

if [ "${KVTUNER_FULL_MATRIX:-0}" = 1 ]; then
    step "functional tests on the newest release of each older era (KVTUNER_FULL_MATRIX=1; full installs, ~10 min each the first time)"
    scripts/functional-matrix.sh 0.5.22 0.5.19 0.5.16 0.5.15 0.5.13.post1
fi

step "release matrix"
scripts/release-matrix.sh

step "tracked files unchanged by the tests"
if [ "$(git_state)" != "$before" ]; then
    diff <(echo "$before") <(git_state) >&2 || true
    echo "the test command changed the files above (tests must not write into the checkout)" >&2
    exit 1
fi
echo "git status unchanged"
