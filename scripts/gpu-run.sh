#!/usr/bin/env bash
# Run benches/device_codec_gpu.py on a GPU machine that has torch and Triton but no network, from
# the kit scripts/gpu-kit.sh built (target/gpu-kit, carried along). From the repository root:
#   bash scripts/gpu-run.sh [bench args...]      e.g. --tokens 2048,8192 or --cpu-dry-run
# Writes $OUT/env.txt (python, torch, triton, GPU) and $OUT/device_codec_gpu.txt (the bench's
# output); $OUT defaults to target/gpu-out. Environment:
#   GPU_RUN_PYTHON   base interpreter holding torch + triton (default python3)
#   GPU_RUN_TIMEOUT  seconds for the whole run, install included (default 480: a device call
#                    is cut at 600 s, and what is in $OUT by then still comes back)
set -euo pipefail
cd "$(dirname "$0")/.."
timeout_s=${GPU_RUN_TIMEOUT:-480}
if [ -z "${GPU_RUN_INNER:-}" ]; then
    # The whole run under one deadline: re-run this script under timeout.
    export GPU_RUN_INNER=1
    exec timeout --kill-after=10 "$timeout_s" bash "$0" "$@"
fi

py=${GPU_RUN_PYTHON:-python3}
out=${OUT:-$PWD/target/gpu-out}
kit=$PWD/target/gpu-kit
mkdir -p "$out"
[ -f "$kit/kit.tar.xz" ] || { echo "gpu-run: no $kit/kit.tar.xz (run scripts/gpu-kit.sh, carry target/gpu-kit)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "gpu-run: kit $(tail -n1 "$kit/MANIFEST.txt"); base $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# Python's tarfile rather than tar -J: the machine may lack the xz binary.
"$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$kit/kit.tar.xz" "$work/wheels"

# A venv over the machine's packages (torch, triton) when the base is a system or conda python; if
# the base is itself a venv, a venv made from it would not see that venv's packages, so the kit
# goes into a folder on PYTHONPATH instead.
if "$py" -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)' && "$py" -m venv --system-site-packages "$work/venv" 2>/dev/null; then
    run_py="$work/venv/bin/python"
    target=()
else
    run_py=$py
    target=(--target "$work/site")
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu-run: base is a venv (or has no venv module); installing into $work/site on PYTHONPATH"
fi

# torchvision must match the machine's torch: keep the machine's when it has one.
reqs="$work/requirements.txt"
if "$py" -c 'import torchvision' 2>/dev/null; then
    grep -v '^torchvision==' "$work/wheels/requirements.txt" >"$reqs"
else
    cp "$work/wheels/requirements.txt" "$reqs"
fi
pip_install=("$run_py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps
    --find-links "$work/wheels" "${target[@]}")
if ! "${pip_install[@]}" -r "$reqs"; then
    # Usually a base python other than the kit's version: install what can be, one by one, and
    # let the bench say what is still missing (the machine may have it already).
    echo "gpu-run: installing the kit at once failed; trying each wheel" >&2
    while read -r req; do
        "${pip_install[@]}" "$req" 2>/dev/null || echo "gpu-run: could not install $req" >&2
    done <"$reqs"
    # sglang's wheel is per Python version only for its Rust extensions, which the bench does not
    # import: unpack its Python files as they are.
    if ! "$run_py" -c 'import sglang' 2>/dev/null; then
        site=${target[1]:-$("$run_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}
        echo "gpu-run: unpacking sglang's Python files into $site" >&2
        "$run_py" - "$site" "$work"/wheels/sglang-*.whl <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[2]) as z:
    z.extractall(sys.argv[1], [n for n in z.namelist() if not n.endswith(".so")])
PY
    fi
fi

{
    "$run_py" - <<'PY'
import platform, sys
print("python", sys.version.split()[0], platform.machine(), sys.executable)
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton", triton.__version__)
for i in range(torch.cuda.device_count()):
    print("gpu", i, torch.cuda.get_device_name(i))
PY
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; fi
} 2>&1 | tee "$out/env.txt"

echo "gpu-run: benches/device_codec_gpu.py $*"
"$run_py" benches/device_codec_gpu.py "$@" 2>&1 | tee "$out/device_codec_gpu.txt"
