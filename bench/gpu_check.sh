#!/usr/bin/env bash
# GPU validation of the Triton kernels, on a CUDA machine, in under 5 minutes. Installs nothing: the
# checkout is put on PYTHONPATH through a symlink shim (gradsurgery.kernels lives in ./kernels), so the
# torch/triton/pytest already on the machine are used as they are.
#
#   OUT=/some/dir bash bench/gpu_check.sh      # logs, JUnit XML and benchmark JSON lines under $OUT
#
# Steps (each under its own time limit, all run even if one fails; exit status 1 if any failed):
#   1. python -m pytest -m gpu tests            every GPU-only test in the suite
#   2. python -m pytest tests/kernels -m "not gpu"   the kernel parity tests, compiled, on the GPU
#   3. python bench/bench_kernels.py            T=8, P=64M, fp32 and bf16
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python}"
cd "$REPO"

SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/gradsurgery"
for entry in "$REPO"/gradsurgery/*; do ln -s "$entry" "$SHIM/gradsurgery/"; done
ln -s "$REPO/kernels" "$SHIM/gradsurgery/kernels"
export PYTHONPATH="$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Compiled kernels, not the interpreter; a private Triton cache so timings include no stale binaries.
unset TRITON_INTERPRET
export TRITON_CACHE_DIR="$OUT/triton_cache"

status=0
step() {  # step NAME SECONDS COMMAND...
    local name="$1" seconds="$2"
    shift 2
    echo "=== $name (limit ${seconds}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    tail -n 5 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

: >"$OUT/summary.txt"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device', torch.cuda.get_device_name())" 2>&1
    git -C "$REPO" rev-parse HEAD 2>&1
} >"$OUT/environment.txt"
cat "$OUT/environment.txt"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: nothing to check here" | tee -a "$OUT/summary.txt"
    exit 1
fi

PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider --durations=15)
# pyproject's addopts name --benchmark-disable, an error where pytest-benchmark is not installed.
"$PYTHON" -c "import pytest_benchmark" 2>/dev/null || PYTEST+=(-o "addopts=-ra")
step pytest_gpu 120 "${PYTEST[@]}" -m gpu --junitxml "$OUT/pytest_gpu.xml" tests
step pytest_kernels 120 "${PYTEST[@]}" -m "not gpu" --junitxml "$OUT/pytest_kernels.xml" tests/kernels
step bench_kernels 45 "$PYTHON" bench/bench_kernels.py --out "$OUT"

echo "=== summary (logs in $OUT)"
cat "$OUT/summary.txt"
exit "$status"
