#!/usr/bin/env bash
# Runs the whole kvtuner_quant test suite: cargo tests (core, no Python), then installs the module
# into the venv of PYTHON and runs the pytest suite (oracle, pages, errors, real KV).
# Usage: quant/run-tests.sh /path/to/venv/bin/python [extra pytest args]
set -euo pipefail
PY=${1:?usage: run-tests.sh PYTHON [pytest args]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"
echo "== cargo test (release: proptests run faster)"
cargo test --release --quiet
echo "== pip install ./quant into $("$PY" -c 'import sys; print(sys.prefix)')"
# --force-reinstall --no-cache-dir: never test a stale wheel of the same version.
# Own target dir: maturin moves the .so out of target/release, which confuses cargo's freshness
# check when `cargo test` shares that directory.
CARGO_TARGET_DIR="$HERE/target/wheel" "$PY" -m pip install --quiet --no-deps --force-reinstall --no-cache-dir "$HERE"
echo "== pytest"
cd "$HERE/tests"
"$PY" -m pytest -q -p no:cacheprovider "$@" .
