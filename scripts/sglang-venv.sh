#!/usr/bin/env bash
# Create (once) and print the path of a cached virtualenv holding a full `pip install sglang==VERSION`.
# The venv lives outside the checkout, keyed by version, so repeat runs are fast:
#   ${KVTUNER_CACHE:-~/.cache/kvtuner-patch}/venvs/sglang-VERSION
# A stamp file is written only after pip succeeded, so an interrupted install is redone, not trusted.
set -euo pipefail
version=${1:?usage: sglang-venv.sh VERSION}
cache=${KVTUNER_CACHE:-$HOME/.cache/kvtuner-patch}
venv="$cache/venvs/sglang-$version"
stamp="$venv/.kvtuner-ready"
if [ ! -f "$stamp" ]; then
    rm -rf "$venv"
    mkdir -p "$cache/venvs" "$cache/pip"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    # Full dependencies: importing sglang's host pool and server args on CPU needs them (see README).
    PIP_CACHE_DIR="$cache/pip" "$venv/bin/pip" install --quiet "sglang==$version" >&2
    touch "$stamp"
fi
# Test tools on top; re-checked each call (a no-op once satisfied), so adding a line here just works.
reqs="$(cd "$(dirname "$0")" && pwd)/test-requirements.txt"
if [ ! -f "$venv/.reqs-done" ] || ! cmp -s "$reqs" "$venv/.reqs-done"; then
    PIP_CACHE_DIR="$cache/pip" "$venv/bin/pip" install --quiet -r "$reqs" >&2
    cp "$reqs" "$venv/.reqs-done"
fi
echo "$venv"
