#!/usr/bin/env bash
# Download (once) the SGLang wheel for VERSION, unpack it, and print the unpacked folder (holding sglang/).
# Cached under ${KVTUNER_CACHE:-~/.cache/kvtuner-patch}/wheels/VERSION; callers copy before patching.
set -euo pipefail
version=${1:?usage: sglang-wheel.sh VERSION}
cache=${KVTUNER_CACHE:-$HOME/.cache/kvtuner-patch}
dir="$cache/wheels/$version"
mkdir -p "$cache/wheels"
# One download per version at a time: parallel test jobs ask for the same release.
exec 9>"$cache/wheels/.lock-$version"
flock 9
if [ ! -f "$dir/.unpacked" ]; then
    rm -rf "$dir"
    mkdir -p "$dir/dl"
    python3 -m pip download --quiet --no-deps --dest "$dir/dl" "sglang==$version" >&2
    python3 -m zipfile -e "$dir"/dl/sglang-*.whl "$dir/tree"
    touch "$dir/.unpacked"
fi
echo "$dir/tree"
