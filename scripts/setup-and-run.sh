#!/usr/bin/env bash
# The main job on a fresh machine: build and install the kvtuner-patch CLI and the kvtuner_quant
# module, patch and verify a fresh copy of the newest supported SGLang release, then serve it
# for real: a live demo on SGLang's CPU engine (scripts/live_demo.py) in which a prompt comes
# back from the quantized host pool.
#
#   --skip-demo             stop after "patched and verified" (no SGLang install, no server)
#   PYTHON=/path/to/python  install kvtuner_quant (and kvtuner_hicache) into this interpreter's
#                           environment instead of the tool's own venv (e.g. your SGLang venv);
#                           the demo then serves from it too (it needs a full SGLang install)
#   SGLANG_VERSION=V        patch release V instead of the newest supported one
set -euo pipefail
cd "$(dirname "$0")/.."
demo=1
case "${1:-}" in
    --skip-demo) demo=0 ;;
    "") ;;
    *) echo "usage: $0 [--skip-demo]" >&2; exit 2 ;;
esac
cache=${KVTUNER_CACHE:-$HOME/.cache/kvtuner-patch}
version=${SGLANG_VERSION:-$(grep -v '^#' scripts/releases.txt | tail -n 1)}

echo "==== building and installing the kvtuner-patch CLI (cargo install)"
cargo install --quiet --locked --path . --root "$cache/cli"
cli="$cache/cli/bin/kvtuner-patch"

echo "==== building and installing kvtuner_quant and kvtuner_hicache (pip)"
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif [ "$demo" = 1 ]; then
    # The demo serves from a full SGLang install: the cached venv (~10 min, ~11 GB the first time).
    py="$(scripts/sglang-venv.sh "$version")/bin/python"
else
    venv="$cache/venvs/kvtuner-tool"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    py="$venv/bin/python"
fi
"$py" -m pip install --quiet ./quant ./patches
"$py" -c 'import kvtuner_quant, kvtuner_hicache; print("kvtuner_quant", kvtuner_quant.__version__, "at", kvtuner_quant.__file__)'

echo "==== fresh copy of SGLang $version (wheel cached under $cache/wheels)"
pristine=$(scripts/sglang-wheel.sh "$version")
work="$cache/demo/sglang-$version"
rm -rf "$work" && mkdir -p "$work" && cp -a "$pristine/." "$work/"

echo "==== kvtuner-patch status"
"$cli" status --sglang-root "$work" || true
echo "==== kvtuner-patch apply"
"$cli" apply --sglang-root "$work" --python "$py"
echo "==== kvtuner-patch verify"
"$cli" verify --sglang-root "$work" --python "$py"
echo
echo "Patched tree: $work   (CLI: $cli; undo with: $cli revert --sglang-root $work)"
[ "$demo" = 1 ] || exit 0

echo
echo "==== live demo: the patched SGLang $version serving on its CPU engine"
"$py" scripts/live_demo.py "$work"
