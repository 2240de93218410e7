#!/usr/bin/env bash
# Every test of the project, in order of increasing cost. Exits non-zero on the first failure.
#   Rust: the kvtuner-patch CLI crate (unit, snapshot, CLI and real-release tests) and the quant core.
#   Python: kvtuner_quant against its numpy oracle and real KV; the patched SGLang host pool and the
#   JuiceFS backend against a full SGLang install (cached venv, see scripts/sglang-venv.sh).
# Opt-in (slow): KVTUNER_FULL_MATRIX=1 also runs the functional tests on one release per older era.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

step() { printf '\n==== %s\n' "$*"; }

step "cargo test (kvtuner-patch CLI)"
cargo test --locked

step "cargo test (quant core)"
(cd quant && cargo test --locked)

step "python venv with sglang 0.5.23 (cached)"
venv=$(scripts/sglang-venv.sh 0.5.23)
py="$venv/bin/python"

step "install kvtuner_quant and kvtuner_hicache into the venv"
"$venv/bin/pip" install --quiet ./quant ./patches

step "pytest: quant, host pool, JuiceFS"
"$py" -m pytest -q -rs quant/tests tests/python
