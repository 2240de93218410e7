#!/usr/bin/env bash
# The functional column of the release matrix: for each VERSION, patch a fresh copy of that
# release's wheel tree with the CLI, install kvtuner_quant and the standalone kvtuner_hicache
# package into that release's full-install venv (scripts/sglang-venv.sh), run tests/python
# against the patched tree, and append `VERSION<TAB>pass|fail` to the results file that
# scripts/release-matrix.sh compares with the committed docs/functional-results.tsv (a later
# line for the same release wins).
#
# usage: scripts/functional-matrix.sh [--record] [VERSION...]
#   --record: also write each release's result into docs/functional-results.tsv (tracked; the
#   README's functional column), replacing that release's line. Without it nothing tracked is
#   written.
#   default VERSIONs: one release of each era the host pool supports (0.5.23, 0.5.22, 0.5.19,
#   0.5.16, 0.5.15, 0.5.13.post1), each only if its venv is cached or can be installed here (a
#   release whose install fails is reported and skipped, not recorded).
# env: KVTUNER_FUNCTIONAL_RESULTS (default target/functional-results.tsv),
#      KVTUNER_CACHE (wheels/venvs cache), KVTUNER_PYTEST_ARGS (extra pytest arguments).
# Exits 1 if any release failed. Plain CI runs the newest release through scripts/test-all.sh;
# the older ones run there only with KVTUNER_FULL_MATRIX=1 (each full install is ~10 min and
# ~11 GB the first time).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
cache=${KVTUNER_CACHE:-$HOME/.cache/kvtuner-patch}
results=${KVTUNER_FUNCTIONAL_RESULTS:-$here/target/functional-results.tsv}
record=0
if [ "${1:-}" = "--record" ]; then record=1; shift; fi
committed="$here/docs/functional-results.tsv"
explicit=$#
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(0.5.23 0.5.22 0.5.19 0.5.16 0.5.15 0.5.13.post1)

cargo build --locked --release --quiet
bin="$here/target/release/kvtuner-patch"

# kvtuner_quant is abi3 (CPython >= 3.11): one wheel serves every venv. Own target folder, so a
# concurrent build in quant/target cannot swap the library under maturin.
wheels=$(mktemp -d "${TMPDIR:-/tmp}/kvtuner-functional-wheels.XXXXXX")
work=$(mktemp -d "${TMPDIR:-/tmp}/kvtuner-functional.XXXXXX")
trap 'rm -rf "$wheels" "$work"' EXIT
built=0

mkdir -p "$(dirname "$results")"
failed=0
for v in "${versions[@]}"; do
    printf '\n==== functional tests: SGLang %s\n' "$v"
    if ! venv=$(scripts/sglang-venv.sh "$v"); then
        echo "functional-matrix: no venv for $v (install failed); skipped" >&2
        # Asked for by name: a missing venv is a failure, not a silent gap.
        [ "$explicit" -eq 0 ] || failed=1
        continue
    fi
    py="$venv/bin/python"
    if [ "$built" -eq 0 ]; then
        CARGO_TARGET_DIR="$here/target/quant-wheel" "$py" -m pip wheel --quiet --no-deps \
            --no-cache-dir ./quant -w "$wheels"
        built=1
    fi
    "$py" -m pip install --quiet --no-deps --force-reinstall "$wheels"/kvtuner_quant-*.whl
    "$py" -m pip install --quiet --no-deps --force-reinstall --no-cache-dir ./patches
    tree="$work/sglang-$v"
    rm -rf "$tree"
    mkdir -p "$tree"
    cp -a "$(scripts/sglang-wheel.sh "$v")/." "$tree/"
    result=fail
    # shellcheck disable=SC2086  # KVTUNER_PYTEST_ARGS is a word list on purpose
    if "$bin" apply --sglang-root "$tree" --python "$py" &&
        "$bin" verify --sglang-root "$tree" --python "$py" &&
        KVTUNER_PATCHED_SGLANG="$tree" "$py" -m pytest -q -rs -p no:cacheprovider \
            ${KVTUNER_PYTEST_ARGS:-} tests/python; then
        result=pass
    fi
    printf '%s\t%s\n' "$v" "$result" >>"$results"
    echo "functional-matrix: $v $result (recorded in $results)"
    if [ "$record" = 1 ]; then
        # Replace this release's line, keep the comments and the others, sorted by version.
        { grep '^#' "$committed"
          { grep -v '^#' "$committed" | awk -F'\t' -v v="$v" '$1 != v'
            printf '%s\t%s\n' "$v" "$result"; } | sort -V; } >"$committed.tmp"
        mv "$committed.tmp" "$committed"
        echo "functional-matrix: $v $result written to ${committed#"$here"/}"
    fi
    [ "$result" = pass ] || failed=1
done
exit "$failed"
