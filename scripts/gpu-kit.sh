#!/usr/bin/env bash
# Build target/gpu-kit: everything benches/device_codec_gpu.py needs beyond torch, triton and
# numpy, for a GPU machine without network (scripts/gpu-run.sh installs it there):
#   kit.tar.xz        kvtuner_quant (abi3, built here), sglang==$SGLANG and the wheels listed in
#                     scripts/gpu-kit-requirements.txt, all for CPython $PYVER on manylinux x86_64
#   requirements.txt  what gpu-run.sh installs from it, pinned
#   MANIFEST.txt      the wheels and their sizes
# Why a tar.xz: the wheels come to ~83 MiB as downloaded, over the 64 MiB a device call may carry.
# They are re-zipped with their members stored (same files, same RECORD) and the lot compressed as
# one solid xz stream, which brings it to ~52 MiB. Only one Python version fits: sglang's wheel alone
# is ~37 MiB per version. Set GPU_KIT_PYTHON=3.11 (or 3.13) to build for another one.
# Idempotent: downloads are cached under ${KVTUNER_CACHE:-~/.cache/kvtuner-patch}/gpu-kit, and the
# archive is only rebuilt when a wheel changed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
pyver=${GPU_KIT_PYTHON:-3.12}
sglang=${GPU_KIT_SGLANG:-0.5.23}
limit_mib=60
cache=${KVTUNER_CACHE:-$HOME/.cache/kvtuner-patch}
dl="$cache/gpu-kit/cp${pyver/./}"
kit="$root/target/gpu-kit"
stage="$root/target/gpu-kit-stage"
mkdir -p "$dl" "$stage"

# Requirements: the tracked list without comments, plus sglang itself and kvtuner_quant.
reqs="$stage/requirements.txt"
{
    grep -v '^#' scripts/gpu-kit-requirements.txt | grep .
    echo "sglang==$sglang"
    echo "kvtuner_quant==$(sed -n 's/^version = "\(.*\)"/\1/p' quant/pyproject.toml)"
} >"$reqs"

# 1. Third-party wheels. pip download reuses files already in --dest but still asks the index, so
# a stamp (of the list) skips it entirely once done.
stamp="$dl/.done-$(grep -v kvtuner_quant "$reqs" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    # scripts/sglang-wheel.sh caches the wheel for the default python3; reuse it when it fits.
    cp -n "$cache/wheels/$sglang/dl/sglang-$sglang-cp${pyver/./}-"*.whl "$dl/" 2>/dev/null || true
    # --platform manylinux_2_34: sglang's wheels need glibc 2.34; pip also accepts older tags.
    grep -v kvtuner_quant "$reqs" | python3 -m pip download --quiet --no-deps \
        --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux2014_x86_64 --dest "$dl" -r /dev/stdin
    touch "$stamp"
fi

# 2. kvtuner_quant, abi3 (CPython >= 3.11). Own target folder: quant/target stays cargo test's.
rm -rf "$stage/quant" && mkdir -p "$stage/quant"
CARGO_TARGET_DIR="$root/target/gpu-kit-build" python3 -m pip wheel --quiet --no-deps \
    ./quant -w "$stage/quant"

# 3. The wheels that match the list (the cache may hold older pins), re-zipped stored.
wheels=("$stage"/quant/kvtuner_quant-*.whl)
while read -r req; do
    name=${req%%==*} version=${req#*==}
    [ "$name" = kvtuner_quant ] && continue
    # Wheel file names use the normalized name with "_" (PEP 427), any case.
    pattern="$(echo "$name" | tr '.-' '__')-$version-*.whl"
    mapfile -t found < <(find "$dl" -maxdepth 1 -iname "$pattern")
    [ ${#found[@]} -eq 1 ] || { echo "gpu-kit: expected one wheel $pattern in $dl, got ${#found[@]}" >&2; exit 1; }
    wheels+=("${found[0]}")
done <"$reqs"

# Digest of the wheels' member names and CRCs: the kvtuner_quant wheel is rebuilt on every run,
# with new timestamps, and an unchanged one should not cost a minute of xz.
digest=$(python3 - "${wheels[@]}" <<'PY'
import hashlib, os, sys, zipfile
h = hashlib.sha256()
for w in sys.argv[1:]:
    h.update(os.path.basename(w).encode())
    for i in zipfile.ZipFile(w).infolist():
        # maturin's SBOM has a fresh serial number each build, and RECORD lists its hash.
        if "/sboms/" not in i.filename and not i.filename.endswith("/RECORD"):
            h.update(f"{i.filename}:{i.CRC}".encode())
print(h.hexdigest()[:16])
PY
)
if [ ! -f "$kit/.digest-$digest" ]; then
    rm -rf "$stage/wheels" && mkdir -p "$stage/wheels"
    python3 - "$stage/wheels" "${wheels[@]}" <<'PY'
import os, sys, zipfile
dest, wheels = sys.argv[1], sys.argv[2:]
for src in wheels:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(os.path.join(dest, os.path.basename(src)), "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
PY
    cp "$reqs" "$stage/wheels/requirements.txt"
    rm -rf "$kit" && mkdir -p "$kit"
    # Sorted names keep the archive reproducible; -T2 since the build machine has 2 cores.
    (cd "$stage/wheels" && printf '%s\n' * | LC_ALL=C sort |
        tar -cf - --owner=0 --group=0 --mtime=@0 -T - | xz -T2 -6 >"$kit/kit.tar.xz")
    cp "$reqs" "$kit/requirements.txt"
    (cd "$stage/wheels" && du -b -- *.whl | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}') \
        >"$kit/MANIFEST.txt"
    printf 'CPython %s, %s wheels, built %s\n' "$pyver" "${#wheels[@]}" "$(date -u +%FT%TZ)" >>"$kit/MANIFEST.txt"
    touch "$kit/.digest-$digest"
fi

bytes=$(du -sb "$kit" | cut -f1)
echo "gpu-kit: $kit: $(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}') MiB, ${#wheels[@]} wheels for CPython $pyver"
if [ "$bytes" -gt $((limit_mib * 1048576)) ]; then
    echo "gpu-kit: over $limit_mib MiB; a device call carries at most 64 MiB" >&2
    exit 1
fi
