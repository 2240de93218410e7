#!/usr/bin/env bash
# Time `apply` and `verify` of the kvtuner-patch release binary on a fresh copy of the real
# SGLang 0.5.23 tree (targets: apply < 1 s, verify < 2 s). Prints one line per figure.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
version=${1:-0.5.23}
runs=${RUNS:-5}
cargo build --release --quiet --manifest-path "$here/Cargo.toml"
bin="$here/target/release/kvtuner-patch"
src="$("$here/scripts/sglang-wheel.sh" "$version")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }
times=()
for i in $(seq "$runs"); do
    rm -rf "$work/tree"; cp -a "$src" "$work/tree"
    t0=$(now); "$bin" apply --sglang-root "$work/tree" >/dev/null; t1=$(now)
    "$bin" verify --sglang-root "$work/tree" >/dev/null; t2=$(now)
    times+=("$t0 $t1 $t2")
done
printf 'sglang %s, %d runs, fresh tree copy each run (%s files)\n' "$version" "$runs" "$(find "$src" -type f | wc -l)"
printf '%s\n' "${times[@]}" | awk '
    { a = $2 - $1; v = $3 - $2; sa += a; sv += v
      if (NR == 1 || a < ba) ba = a; if (NR == 1 || v < bv) bv = v }
    END { printf "apply  (target < 1.000 s): best %.3f s, mean %.3f s\n", ba, sa / NR
          printf "verify (target < 2.000 s): best %.3f s, mean %.3f s\n", bv, sv / NR }'
