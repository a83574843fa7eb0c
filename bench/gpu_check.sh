#!/usr/bin/env bash
# The GPU check of gradsurgery: the GPU-only tests, the kernel tests compiled, the kernel benchmark and
# the training-step benchmark, in under 7 minutes of device time, made to work the first time it meets
# a GPU. A CPU rehearsal runs the same steps under the same conditions as far as a CPU can.
#
#   OUT=DIR bash bench/gpu_check.sh                       on the CUDA machine
#   OUT=DIR bash bench/gpu_check.sh --rehearse [--quick]  on a CPU: a fresh copy of the working tree, a
#                                                         python with nothing installed, Triton's
#                                                         interpreter, GPU-only tests skipped, toy
#                                                         benchmarks (--quick: a few tests only)
#
# The GPU machine as this assumes it (the H200 image): python3 with torch, triton, pytest, hypothesis and
# scipy; no network; this working tree copied without a venv or an editable install. So nothing is
# installed and nothing fetched: the package is staged in a scratch folder in its installed layout
# (./kernels becomes gradsurgery/kernels) beside copies of tests/, bench/ and pyproject.toml, and every
# step runs there (`python3 -m pytest` puts the current folder first on the import path: in the
# checkout that would be gradsurgery/ without its kernels). Each pytest session checks that it imports
# the staged copy (bench/gpu_pytest_plugin.py). Caches stay in the scratch folder.
#
# What comes back in $OUT (which must start empty; at most 6 files, no folders):
#   summary.txt      versions, device, where gradsurgery came from, and one line per step; written
#                    before the first step and rewritten as each step starts and ends
#   logs.tar.gz      every finished step's log and JUnit XML, environment facts, nvidia-smi, pip list;
#                    rebuilt after each step
#   running.log      the log of the step running now: only there if the check was stopped mid-step
#   kernels.jsonl    bench.bench_kernels, one JSON line per measurement (kernels_smoke.jsonl rehearsed)
#   step.jsonl       bench.gpu_step: per (T, dtype) an eager line, then a CUDA-graph line (step_smoke.jsonl
#                    rehearsed, eager lines only)
# The benchmarks append a line as soon as it is measured, so a step stopped by its limit keeps its rows.
#
# Steps, in this order, each under its own limit (seconds, on the GPU); all run even if one fails, and
# the exit status is 1 if any did not pass:
#   environment      20   versions, device, Triton APIs, gradsurgery from the staged copy
#   pytest_gpu      100   python3 -m pytest -m gpu tests
#   pytest_kernels  110   python3 -m pytest -m "not gpu" tests/kernels (the kernels compiled)
#   bench_kernels    85   python3 -m bench.bench_kernels (T = 2, 8, 32; fp32, bf16; solves to T = 64)
#   bench_step       90   python3 -m bench.gpu_step (the suite's MLP, T = 2, 8, 32; fp32, bf16)
# 405 s in all; the Triton cache is shared, so later steps reuse what earlier ones compiled.
#
# Environment: PYTHON (default python3; rehearsed, the python whose packages the throwaway one sees),
# GPU_CHECK_REVISION (recorded with every result; default: git's HEAD where the tree has a .git),
# GPU_CHECK_LIMITS ("step=seconds,..." to change limits), GPU_CHECK_SKIP ("step,..." to leave steps out),
# GPU_CHECK_WORKERS (pytest-xdist processes; default half the cores, at most 8, none below 2),
# GPU_CHECK_KEEP=1 (keep the scratch folder and print where it is).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

REHEARSE=0
QUICK=0
for arg in "$@"; do
    case "$arg" in
        --rehearse) REHEARSE=1 ;;
        --quick) QUICK=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg" >&2; usage >&2; exit 2 ;;
    esac
done
if [ "$QUICK" = 1 ] && [ "$REHEARSE" = 0 ]; then
    echo "gpu_check: --quick only shortens a rehearsal (--rehearse --quick)" >&2
    exit 2
fi
if [ -z "${OUT:-}" ]; then
    echo "gpu_check: set OUT to an empty folder for the results" >&2
    exit 2
fi
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
if [ -n "$(ls -A "$OUT")" ]; then
    echo "gpu_check: $OUT is not empty; what comes back is counted, so give it an empty folder" >&2
    exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
LOGS="$SCRATCH/logs"
STAGE="$SCRATCH/stage"
mkdir -p "$LOGS"
STARTED=$SECONDS

STEPS=(environment pytest_gpu pytest_kernels bench_kernels bench_step)
declare -A LIMIT=([environment]=20 [pytest_gpu]=100 [pytest_kernels]=110 [bench_kernels]=85 [bench_step]=90)
if [ "$REHEARSE" = 1 ]; then
    # The interpreter runs the kernel tests far slower than a GPU: rehearsed limits only stop a hang.
    LIMIT=([environment]=120 [pytest_gpu]=300 [pytest_kernels]=1200 [bench_kernels]=300 [bench_step]=300)
fi
GPU_CHECK_LIMITS="${GPU_CHECK_LIMITS:-}"
for pair in ${GPU_CHECK_LIMITS//,/ }; do
    LIMIT[${pair%%=*}]="${pair#*=}"
done
declare -A STATUS SPENT NOTE
for name in "${STEPS[@]}"; do
    STATUS[$name]=pending
    SPENT[$name]=""
    NOTE[$name]=""
done
GPU_CHECK_SKIP="${GPU_CHECK_SKIP:-}"
for name in ${GPU_CHECK_SKIP//,/ }; do
    STATUS[$name]=skipped
done
HEADER=()
CURRENT=""
STEP_PID=""
FILES_LINE=""

cleanup() {
    if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then
        echo "gpu_check: scratch folder kept: $SCRATCH"
    else
        rm -rf "$SCRATCH"
    fi
}
trap cleanup EXIT

write_summary() {
    {
        if [ "$REHEARSE" = 1 ]; then
            echo "gpu_check rehearsal on a CPU (Triton interpreter, toy benchmark sizes$([ "$QUICK" = 1 ] && echo ', --quick'))"
        else
            echo "gpu_check on the GPU"
        fi
        printf '%s\n' "${HEADER[@]}"
        echo
        printf '%-15s %-14s %8s %6s  %s\n' step status seconds limit notes
        local step
        for step in "${STEPS[@]}"; do
            printf '%-15s %-14s %8s %6s  %s\n' "$step" "${STATUS[$step]}" "${SPENT[$step]:--}" "${LIMIT[$step]}" "${NOTE[$step]}"
        done
        echo
        echo "elapsed: $((SECONDS - STARTED)) s"
        if [ -n "$FILES_LINE" ]; then echo "$FILES_LINE"; fi
    } >"$OUT/summary.txt.part" && mv "$OUT/summary.txt.part" "$OUT/summary.txt"
}

bundle_logs() {
    if command -v tar >/dev/null 2>&1; then
        tar -czf "$SCRATCH/logs.tar.gz" -C "$SCRATCH" logs
    else
        "$PYTHON" -c 'import sys, tarfile; t = tarfile.open(sys.argv[1], "w:gz"); t.add(sys.argv[2], "logs"); t.close()' \
            "$SCRATCH/logs.tar.gz" "$LOGS"
    fi && cp "$SCRATCH/logs.tar.gz" "$OUT/logs.tar.gz"
}

on_signal() {
    if [ -n "$STEP_PID" ]; then
        kill -TERM "$STEP_PID" 2>/dev/null  # timeout passes it on to the step's command
        wait "$STEP_PID" 2>/dev/null
    fi
    [ -n "$CURRENT" ] && STATUS[$CURRENT]="interrupted"
    [ -f "$OUT/running.log" ] && cp "$OUT/running.log" "$LOGS/${CURRENT:-interrupted}.log"
    bundle_logs
    write_summary
    exit 143
}
trap on_signal TERM INT

# run_step NAME COMMAND...: COMMAND from the staged copy, its output in $OUT/running.log while it runs.
run_step() {
    local name="$1"  # (bash scopes dynamically: the functions it calls must not assign a `name`)
    shift
    if [ "${STATUS[$name]}" = skipped ]; then
        echo "=== $name: skipped (GPU_CHECK_SKIP)"
        return
    fi
    CURRENT="$name"
    STATUS[$name]=running
    write_summary
    echo "=== $name (limit ${LIMIT[$name]} s): $*"
    local start=$SECONDS
    # In the background and waited for, so that a TERM to this script is handled at once, not after
    # the step (bash runs traps only between foreground commands).
    (cd "$STAGE" && exec timeout --kill-after=10 "${LIMIT[$name]}" "$@") >"$OUT/running.log" 2>&1 &
    STEP_PID=$!
    wait "$STEP_PID"
    local rc=$?
    STEP_PID=""
    SPENT[$name]=$((SECONDS - start))
    mv "$OUT/running.log" "$LOGS/$name.log"
    case "$rc" in
        0) STATUS[$name]=ok ;;
        124 | 137) STATUS[$name]="TIMEOUT" ;;
        *) STATUS[$name]="FAILED rc=$rc" ;;
    esac
    # The pytest tally, or a benchmark's last line.
    NOTE[$name]="$(grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected)' "$LOGS/$name.log" | tail -n 1 | tr -d '=' | sed 's/^ *//;s/ *$//')"
    [ -z "${NOTE[$name]}" ] && NOTE[$name]="$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-150)"
    CURRENT=""
    echo "--- $name: ${STATUS[$name]} in ${SPENT[$name]} s; ${NOTE[$name]}"
    tail -n 5 "$LOGS/$name.log"
    bundle_logs
    write_summary
}

# ---------------------------------------------------------------------- the tree, the python, the stage

TREE="$REPO"
if [ "$REHEARSE" = 1 ]; then
    # What the GPU machine receives: tracked files plus untracked ones git does not ignore, no venv.
    TREE="$SCRATCH/tree"
    mkdir -p "$TREE"
    if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
            tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$TREE" -xf -
    else
        (cd "$REPO" && tar --exclude=./.venv --exclude=./.git -cf - .) | tar -C "$TREE" -xf -
    fi
    # A python with nothing of ours installed: a throwaway venv that sees PYTHON's packages through a .pth
    # line. Lines of a .pth only extend sys.path: the .pth files in that folder (an editable install of
    # gradsurgery among them) are not run, as nothing of the kind exists on the GPU machine.
    "$PYTHON" -m venv --without-pip "$SCRATCH/venv" || exit 1
    "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' >"$SCRATCH/parent_site.txt" || exit 1
    VENV_SITE="$("$SCRATCH/venv/bin/python3" -c 'import site; print(site.getsitepackages()[0])')"
    cp "$SCRATCH/parent_site.txt" "$VENV_SITE/gpu_check_parent_site.pth"
    PYTHON="$SCRATCH/venv/bin/python3"
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    unset TRITON_INTERPRET  # compiled kernels: the interpreter would time NumPy
fi

mkdir -p "$STAGE/bench"
cp -R "$TREE/gradsurgery" "$STAGE/gradsurgery"
rm -rf "$STAGE/gradsurgery/kernels"
cp -R "$TREE/kernels" "$STAGE/gradsurgery/kernels"
cp -R "$TREE/tests" "$STAGE/tests"
(cd "$TREE/bench" && tar --exclude=./results -cf - .) | tar -C "$STAGE/bench" -xf -
cp "$TREE/pyproject.toml" "$STAGE/"
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +

if [ -z "${GPU_CHECK_REVISION:-}" ]; then
    GPU_CHECK_REVISION="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    if [ "$GPU_CHECK_REVISION" != unknown ] && [ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]; then
        GPU_CHECK_REVISION="$GPU_CHECK_REVISION+uncommitted"
    fi
fi
export GPU_CHECK_REVISION GPU_CHECK_STAGE="$STAGE" TRITON_CACHE_DIR="$SCRATCH/triton_cache"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
HEADER+=("revision: $GPU_CHECK_REVISION")
write_summary

# ---------------------------------------------------------------------- the steps

{
    echo "PYTHON=$PYTHON"
    "$PYTHON" -m pip list 2>&1
} >"$LOGS/pip_list.txt"
command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >"$LOGS/nvidia_smi.txt" 2>&1
ENV_ARGS=(--stage "$STAGE" --json "$LOGS/environment.json")
[ "$REHEARSE" = 0 ] && ENV_ARGS+=(--require-cuda)
run_step environment "$PYTHON" -m bench.gpu_environment "${ENV_ARGS[@]}"
fact() { sed -n "s/^$1: //p" "$LOGS/environment.log" 2>/dev/null | head -n 1; }
NOTE[environment]="$(grep '^PROBLEM' "$LOGS/environment.log" | head -n 2 | tr '\n' ' ')"
[ -z "${NOTE[environment]}" ] && NOTE[environment]="staged copy imported: $(fact gradsurgery_staged)"
HEADER+=(
    "python $(fact python)"
    "torch $(fact torch) (CUDA $(fact torch_cuda)), triton $(fact triton); missing Triton APIs: $(fact triton_missing_apis)"
    "device: $([ -n "$(fact device)" ] && echo "$(fact device) ($(fact multiprocessors) SMs, $(fact device_memory_gib) GiB, sm $(fact device_capability))" || echo "no CUDA device")"
    "gradsurgery from $(fact gradsurgery_from), kernels from $(fact gradsurgery_kernels_from); staged copy: $(fact gradsurgery_staged)"
)
if (cd / && "$PYTHON" -c "import gradsurgery" >/dev/null 2>&1); then
    HEADER+=("outside the stage gradsurgery still imports: this python has an install the GPU machine lacks")
else
    HEADER+=("outside the stage gradsurgery does not import (nothing installed, as on the GPU machine)")
fi
HEADER+=("peers: torchjd $(fact peer_torchjd), pytorch_optimizer $(fact peer_pytorch_optimizer) (None: absent; bench_step times no peer and says so)")
if [ "$REHEARSE" = 0 ] && [ "$(fact cuda_available)" != True ]; then
    HEADER+=("no CUDA device visible to torch: the GPU steps cannot run here (use --rehearse on a CPU)")
    for name in "${STEPS[@]:1}"; do STATUS[$name]="not run"; done
    bundle_logs
    write_summary
    cat "$OUT/summary.txt"
    exit 1
fi
write_summary

PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -p bench.gpu_pytest_plugin --continue-on-collection-errors --durations=15 -rs)
# pyproject's addopts name --benchmark-disable, an error where pytest-benchmark is not installed.
[[ "$(fact have_pytest_benchmark)" =~ ^(None)?$ ]] && PYTEST+=(-o "addopts=-ra")
# One hung test must not take the whole step's limit with it.
[[ "$(fact have_pytest_timeout)" =~ ^(None)?$ ]] || PYTEST+=(--timeout=90)
# Compiling ~150 kernel variants is most of the test steps' time and runs on the CPU: spread the tests
# over processes where pytest-xdist is there (the H200 image has it; 16 cores). They share one Triton
# cache, and no test times anything.
WORKERS="${GPU_CHECK_WORKERS:-$(($(nproc 2>/dev/null || echo 2) / 2))}"
[ "$WORKERS" -gt 8 ] && WORKERS=8
if [ "$WORKERS" -ge 2 ] && ! [[ "$(fact have_pytest_xdist)" =~ ^(None)?$ ]]; then
    PYTEST+=(-n "$WORKERS")
fi

if [ "$QUICK" = 1 ]; then
    run_step pytest_gpu "${PYTEST[@]}" -m gpu --junitxml "$LOGS/pytest_gpu.xml" tests/kernels
    run_step pytest_kernels "${PYTEST[@]}" -m "not gpu" --junitxml "$LOGS/pytest_kernels.xml" \
        tests/kernels/test_kernel_backend.py tests/kernels/test_kernel_gram.py::test_gram_fp32_is_not_tf32
    run_step bench_kernels "$PYTHON" -m bench.bench_kernels --out "$OUT" --smoke --tasks 2 --dtypes fp32,bf16 --solve-tasks 3
    run_step bench_step "$PYTHON" -m bench.gpu_step --out "$OUT" --smoke --tasks 3 --dtypes fp32
else
    SMOKE=()
    [ "$REHEARSE" = 1 ] && SMOKE=(--smoke)
    run_step pytest_gpu "${PYTEST[@]}" -m gpu --junitxml "$LOGS/pytest_gpu.xml" tests
    run_step pytest_kernels "${PYTEST[@]}" -m "not gpu" --junitxml "$LOGS/pytest_kernels.xml" tests/kernels
    run_step bench_kernels "$PYTHON" -m bench.bench_kernels --out "$OUT" "${SMOKE[@]}"
    run_step bench_step "$PYTHON" -m bench.gpu_step --out "$OUT" "${SMOKE[@]}"
fi

# ---------------------------------------------------------------------- what comes back

count=0
deepest=0
bad=""
while IFS= read -r -d '' path; do
    relative="${path#"$OUT"/}"
    [ -f "$path" ] && count=$((count + 1))
    slashes="${relative//[^\/]/}"
    [ ${#slashes} -gt "$deepest" ] && deepest=${#slashes}
    [[ "$(basename "$relative")" =~ ^[A-Za-z0-9._-]+$ ]] || bad="$bad $relative"
done < <(find "$OUT" -mindepth 1 -print0)
FILES_LINE="in \$OUT: $count files (at most 8 come back), $deepest folders deep (at most 2), names ${bad:+NOT all plain:$bad}${bad:-all plain}"
write_summary

failed=0
for name in "${STEPS[@]}"; do
    case "${STATUS[$name]}" in ok | skipped) ;; *) failed=1 ;; esac
done
echo "=== summary ($OUT)"
cat "$OUT/summary.txt"
exit "$failed"
