#!/usr/bin/env bash
# Opt-in, slow (about 10 s a release): the `kvtuner` flags on the real argparse path of older
# releases, without a full install of each. For each release (default: every release of
# scripts/releases.txt before the msgspec era, 0.5.3 - 0.5.19) it patches a copy of the wheel
# tree and imports that tree's `sglang.srt.server_args` with the interpreter of the cached
# full 0.5.23 install (scripts/sglang-venv.sh), then checks: the ten flags parse with their
# declared defaults, types and choices (a bad choice exits 2), the dataclass has the ten
# fields with the same defaults, and from 0.5.17 every one is in the `memory` namespace.
# Newer transformers already registers some configs older SGLang registers again at import;
# that registration is made tolerant (exist_ok) for this check only.
# usage: scripts/release-flags-check.sh [RELEASE...]     exit 1 if any release fails
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
bin="$here/target/release/kvtuner-patch"
py="$("$here/scripts/sglang-venv.sh" 0.5.23)/bin/python"
if [ $# -gt 0 ]; then
    releases=("$@")
else
    mapfile -t releases < <(grep -v '^\s*#' "$here/scripts/releases.txt" | grep -v '^\s*$' |
        awk '{ split($1, p, "."); if (p[3] + 0 < 20) print }')
fi
check='
import sys
import transformers
_register = transformers.AutoConfig.register
transformers.AutoConfig.register = staticmethod(
    lambda *a, **k: _register(*a, **{**k, "exist_ok": True}))
import argparse, dataclasses
from sglang.srt.server_args import ServerArgs
p = argparse.ArgumentParser()
ServerArgs.add_cli_args(p)
a = p.parse_args(["--model-path", "x", "--enable-kvtuner-hicache", "--kvtuner-hicache-nbits-key", "2",
                  "--kvtuner-hicache-layer-config", "p.yaml"])
got = {k: v for k, v in vars(a).items() if "kvtuner" in k}
fields = {f.name: f.default for f in dataclasses.fields(ServerArgs) if "kvtuner" in f.name}
want = {**fields, "enable_kvtuner_hicache": True, "kvtuner_hicache_nbits_key": 2,
        "kvtuner_hicache_layer_config": "p.yaml"}
assert len(fields) == 10 and got == want, (got, fields)
try:
    p.parse_args(["--model-path", "x", "--kvtuner-hicache-nbits-value", "3"])
    sys.exit("choices not enforced")
except SystemExit as e:
    assert e.code == 2, e
note = ""
try:
    from sglang.srt.arg_groups.arg_utils import namespace_of
except ImportError:
    pass
else:
    ns = {k: v for k, v in namespace_of(ServerArgs).items() if "kvtuner" in k}
    assert ns == {k: "memory" for k in fields}, ns
    note = ", all in namespace memory"
print(f"ok: 10 flags parse, 10 dataclass fields{note}")
'
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
for v in "${releases[@]}"; do
    tree="$work/$v"
    mkdir -p "$tree"
    cp -a "$("$here/scripts/sglang-wheel.sh" "$v")/." "$tree/"
    "$bin" apply --only kvtuner --sglang-root "$tree" >/dev/null
    if out=$(cd "$tree" && PYTHONPATH="$tree" "$py" -B -c "$check" 2>&1); then
        echo "$v: ${out##*$'\n'}"
    else
        echo "$v: FAIL ${out##*$'\n'}"
        failed=$((failed + 1))
    fi
    rm -rf "$tree"
done
[ "$failed" -eq 0 ]
