#!/usr/bin/env bash
# The release matrix: kvtuner-patch on every SGLang release in scripts/releases.txt.
#
# usage: scripts/release-matrix.sh [--write] [--out FILE] [--functional FILE] [--run-results FILE]
#                                  [--only GROUP]... [--jobs N] [--allow-partial] [RELEASE...]
#
# Builds the CLI (release profile), then for each release (all of releases.txt, or the ones
# named): gets the wheel (cached by scripts/sglang-wheel.sh), copies its tree to a temporary
# folder and checks, in order:
#   status   says the release is supported (exit 1 = supported and not applied yet)
#   apply    succeeds, and a second apply changes nothing (tree hashes equal)
#   verify   passes (every group intact, every touched file parses with tree-sitter and
#            compiles with python3 / $KVTUNER_PYTHON)
#   revert   succeeds and the tree is byte-identical to the pristine wheel (diff -r)
# A release whose era some selected group has no form for is checked with the groups that
# do have one and marked partial ("not yet: ..."); partial rows fail unless --allow-partial.
# Prints one row per release and builds the markdown table of the README's compatibility
# section. Without --write it only checks (the test command): the table between the
# release-matrix markers of FILE (default README.md) must equal the one just built, or the run
# fails and says to run `scripts/release-matrix.sh --write`. With --write it rewrites that part
# of FILE (created if missing). Exits 1 if any release fails or the check finds a difference.
#
# The functional column comes from --functional FILE (default docs/functional-results.tsv, the
# committed results that `scripts/functional-matrix.sh --record` writes): one line per release,
# `RELEASE<TAB>RESULT`, `#` comments; a later line for the same release wins. Releases it does
# not list show `n/a`. --run-results FILE (default: $KVTUNER_FUNCTIONAL_RESULTS, else
# target/functional-results.tsv, when it exists) holds this run's functional results in the same
# form; a release whose result there differs from the committed one fails the run.
#
# --only GROUP is passed to apply/verify/status (default: every group). --jobs N checks N
# releases at once (default: the number of CPUs).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

# ---- one release (run as a child: `release-matrix.sh --check-one VERSION WORKDIR`) ------------
if [ "${1:-}" = "--check-one" ]; then
    v=$2 work=$3
    bin="$here/target/release/kvtuner-patch"
    read -r -a only <<<"${KVTUNER_MATRIX_ONLY:-}"
    start=$(date +%s.%N)
    tree="$work/tree-$v"
    era="?" groups="-" apply="-" verify="-" revert="-" why=""
    row() {
        local secs
        secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$v" "$era" "$groups" "$apply" "$verify" "$revert" "$secs" "$why" >"$work/row-$v"
        rm -rf "$tree"
        exit 0
    }
    fail() { why="$1"; row; }
    tree_hash() { (cd "$tree" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum); }
    # The last line of a command's output, for the reason column.
    last() { tail -n 1 "$work/out-$v" | tr '\t' ' ' | cut -c1-160; }

    src=$("$here/scripts/sglang-wheel.sh" "$v" 2>"$work/out-$v") || fail "wheel: $(last)"
    mkdir -p "$tree"
    cp -a "$src/." "$tree/" 2>"$work/out-$v" || fail "copy: $(last)"

    code=0
    "$bin" --json status "${only[@]/#/--only=}" --sglang-root "$tree" >"$work/out-$v" 2>&1 || code=$?
    read -r era groups missing supported release_ok reason < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
if "report" not in d:  # refused before looking at the tree (bad arguments)
    print("?", "-", "-", False, False, d.get("error", "no report").replace("\n", " "))
    sys.exit()
r = d["report"]
groups = ",".join(g["id"] for g in r["groups"]) or "-"
missing = ",".join(g["id"] for g in r.get("unsupported_groups", [])) or "-"
release = r.get("release_support", r["support"])
print(r["tree"]["era"] or "unknown", groups, missing, r["support"]["supported"],
      release["supported"], r["support"]["reason"].replace("\t", " "))
' "$work/out-$v" 2>/dev/null || echo "? - - False False unreadable status output")
    if [ "$release_ok" != "True" ] || { [ "$supported" != "True" ] && [ "$missing" = "-" ]; }; then
        apply="FAIL"; fail "status (exit $code): $reason"
    fi
    if [ "$missing" != "-" ]; then
        # Some selected groups have no form for this era yet: check the others, say which.
        [ "$groups" != "-" ] || { apply="FAIL"; fail "no selected group supports era $era"; }
        IFS=, read -r -a only <<<"$groups"
        groups="$groups (not yet: ${missing//,/, })"
    elif [ "$code" != 1 ]; then
        apply="FAIL"; fail "status exit $code on a fresh tree (expected 1, not applied): $reason"
    fi

    "$bin" apply "${only[@]/#/--only=}" --sglang-root "$tree" >"$work/out-$v" 2>&1 || { apply="FAIL"; fail "apply: $(last)"; }
    once=$(tree_hash)
    "$bin" apply "${only[@]/#/--only=}" --sglang-root "$tree" >"$work/out-$v" 2>&1 || { apply="FAIL"; fail "second apply: $(last)"; }
    grep -q "nothing to do" "$work/out-$v" && [ "$once" = "$(tree_hash)" ] ||
        { apply="FAIL"; fail "second apply changed the tree: $(last)"; }
    apply="ok"

    if "$bin" verify "${only[@]/#/--only=}" --sglang-root "$tree" >"$work/out-$v" 2>&1; then
        verify="ok"
    else
        verify="FAIL"; why="${why:+$why; }verify: $(grep '^problem: ' "$work/out-$v" | head -n 1 | cut -c1-160)"
    fi

    "$bin" revert --sglang-root "$tree" >"$work/out-$v" 2>&1 || { revert="FAIL"; fail "revert: $(last)"; }
    if diff -r -q "$src" "$tree" >"$work/out-$v" 2>&1; then
        revert="ok"
    else
        revert="FAIL"; why="${why:+$why; }revert not byte-identical: $(last)"
    fi
    row
fi

# ---- the matrix --------------------------------------------------------------------------------
out="$here/README.md"
functional="$here/docs/functional-results.tsv"
run_results="${KVTUNER_FUNCTIONAL_RESULTS:-$here/target/functional-results.tsv}"
write=0
jobs=$(nproc 2>/dev/null || echo 2)
only=()
releases=()
allow_partial=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --functional) functional=$2; shift 2 ;;
        --run-results) run_results=$2; shift 2 ;;
        --write) write=1; shift ;;
        --only) only+=("$2"); shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --allow-partial) allow_partial=1; shift ;;
        -h|--help) sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "release-matrix.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) releases+=("$1"); shift ;;
    esac
done
named=${#releases[@]}
if [ "$named" -eq 0 ]; then
    mapfile -t releases < <(grep -v '^\s*#' "$here/scripts/releases.txt" | grep -v '^\s*$')
fi

cargo build --release --quiet --manifest-path "$here/Cargo.toml"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Fetch missing wheels one at a time (pip and the cache are not safe to share between jobs).
for v in "${releases[@]}"; do "$here/scripts/sglang-wheel.sh" "$v" >/dev/null; done

t0=$(date +%s)
export KVTUNER_MATRIX_ONLY="${only[*]:-}"
printf '%s\n' "${releases[@]}" | xargs -P "$jobs" -I{} bash "$0" --check-one {} "$work"

# RELEASE<TAB>RESULT lines of a results file into the associative array named $2.
read_results() {
    local -n into=$2
    [ -f "$1" ] || return 0
    while IFS=$'\t' read -r rel res; do
        case "$rel" in ''|'#'*) continue ;; esac
        into[$rel]=$res
    done <"$1"
}
declare -A func=() ran=()
read_results "$functional" func
read_results "$run_results" ran
failed=0
partial=0
declare -A seen_groups=()
table="$work/table.md"
{
    echo "| release | era | groups | apply | verify | revert | functional |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
} >"$table"
printf '%-13s %-24s %-6s %-6s %-6s %-10s %-7s %s\n' release era apply verify revert functional seconds groups
for v in "${releases[@]}"; do
    IFS=$'\t' read -r _ era groups apply verify revert secs why <"$work/row-$v" ||
        { era="?" groups="-" apply="FAIL" verify="-" revert="-" secs="?" why="no result"; }
    g=${groups%% (*}
    [ "$g" = "-" ] || seen_groups[$g]=1
    f=${func[$v]:-n/a}
    printf '%-13s %-24s %-6s %-6s %-6s %-10s %-7s %s%s\n' "$v" "$era" "$apply" "$verify" "$revert" "$f" "$secs" "$groups" "${why:+  ($why)}"
    echo "| $v | $era | $groups | $apply | $verify | $revert | $f |" >>"$table"
    bad=0
    if [ "$apply" != ok ] || [ "$verify" != ok ] || [ "$revert" != ok ]; then bad=1; fi
    case "$f" in fail*|FAIL*) bad=1 ;; esac
    case "$groups" in *"not yet:"*) partial=$((partial + 1)); [ "$allow_partial" = 1 ] || bad=1 ;; esac
    failed=$((failed + bad))
done
elapsed=$(($(date +%s) - t0))
groups=$(printf '%s\n' "${!seen_groups[@]}" | tr ',' '\n' | sort -u | paste -sd, - | sed 's/,/, /g')
groups=${groups:-none}
echo "${#releases[@]} releases, $failed failing ($partial with groups not supporting their era yet$([ "$allow_partial" = 1 ] && echo ', allowed')), ${elapsed}s with $jobs jobs (groups: $groups)"

# The table between the markers of $out.
begin='<!-- release-matrix:begin (generated by scripts/release-matrix.sh; do not edit) -->'
end='<!-- release-matrix:end -->'
{
    echo "$begin"
    echo
    echo "Groups checked: $groups. groups = the groups applied to that release (\"not yet\": groups"
    echo "with no form for its era, which \`apply\` without \`--only\` refuses there); apply = status"
    echo "says supported, apply succeeds, a second apply changes nothing; verify = every group"
    echo "intact, every touched file parses and compiles; revert = byte-identical to the pristine"
    echo "wheel; functional = the Python functional tests against a full install of that release"
    echo "(\`n/a\` = not run for that release)."
    echo
    cat "$table"
    echo
    echo "$end"
} >"$work/block.md"

# This run's functional results must agree with the committed ones the table shows.
for v in "${!ran[@]}"; do
    if [ "${ran[$v]}" != "${func[$v]:-n/a}" ]; then
        echo "functional result of $v: this run says ${ran[$v]}, ${functional#"$here"/} says ${func[$v]:-nothing}" >&2
        echo "  (after a deliberate change: scripts/functional-matrix.sh --record $v)" >&2
        failed=$((failed + 1))
    fi
done

if [ "$write" = 1 ]; then
    if [ ! -f "$out" ]; then
        mkdir -p "$(dirname "$out")"
        printf '# SGLang release compatibility\n' >"$out"
    fi
    if grep -qF '<!-- release-matrix:begin' "$out" && grep -qF "$end" "$out"; then
        awk -v blockfile="$work/block.md" '
            /<!-- release-matrix:begin/ { while ((getline l < blockfile) > 0) print l; skip = 1; next }
            /<!-- release-matrix:end -->/ { skip = 0; next }
            !skip { print }' "$out" >"$work/out.md"
        cat "$work/out.md" >"$out"
    else
        { echo; cat "$work/block.md"; } >>"$out"
    fi
    echo "table written to ${out#"$here"/}"
elif [ "$named" -gt 0 ]; then
    echo "releases named: the table in ${out#"$here"/} (every release) is not checked"
else
    # The part of $out between the markers, markers included.
    awk '/<!-- release-matrix:begin/ { on = 1 } on { print } /<!-- release-matrix:end -->/ { on = 0 }' \
        "$out" 2>/dev/null >"$work/current.md" || true
    if ! diff -u "$work/current.md" "$work/block.md" >"$work/table.diff"; then
        cat "$work/table.diff" >&2
        echo "the compatibility table in ${out#"$here"/} differs from this run's (above): run scripts/release-matrix.sh --write" >&2
        failed=$((failed + 1))
    else
        echo "table in ${out#"$here"/} matches this run"
    fi
fi
[ "$failed" -eq 0 ]
