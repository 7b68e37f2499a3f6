#!/usr/bin/env bash
# perf/device_check.sh OUTDIR: what a lent GPU machine runs, in one go (under 8 minutes on an H100).
# Installs the project (no network there), runs the GPU tests, the quick benchmark and the report.
# Each stage runs even if an earlier one failed. OUTDIR gets two files (the device tool brings
# back few): SUMMARY.txt (how each stage ended) and device_check.tar.gz (logs, junit.xml, results,
# REPORT.md and plots).
set -uo pipefail
shopt -s nullglob
OUT=${1:?usage: perf/device_check.sh OUTDIR}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-220}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK="$OUT/device_check"
mkdir -p "$WORK"
SUMMARY="$OUT/SUMMARY.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit (SIGINT first, so Python can save), log
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout -s INT -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s ($*)" | tee -a "$SUMMARY"
    return $rc
}

{ nvidia-smi; git rev-parse HEAD; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"; } > "$WORK/env.txt" 2>&1
head -n 12 "$WORK/env.txt" >> "$SUMMARY"
stage install 90 python3 -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e .
stage info 30 tritonrnn info --hidden-size 256 --batch 16
# GPU-specific tests first (pytest skips the repeat in tests/), so a timeout cuts the CPU-side ones;
# with pytest-xdist (on the lent machines) 8 workers compile the kernel variants in parallel.
PARALLEL=()
python3 -c "import xdist" 2>/dev/null && PARALLEL=(-n 8 --dist loadfile)
stage tests "$TESTS_TIMEOUT" python3 -m pytest -q -rfE -p no:cacheprovider --junitxml="$WORK/junit.xml" \
    "${PARALLEL[@]}" tests/test_gpu.py tests
tail -n 15 "$WORK/tests.log" >> "$SUMMARY"
stage bench "$BENCH_TIMEOUT" tritonrnn bench --grid quick --out-dir "$WORK/results"
results=("$WORK"/results/*.json)
if (( ${#results[@]} )); then
    stage report 60 tritonrnn report --no-bench --results "${results[@]}" --out-dir "$WORK/report"
    cat "$WORK/report.log" >> "$SUMMARY"
else
    echo "report: skipped, the bench wrote no results" | tee -a "$SUMMARY"
fi
tar czf "$OUT/device_check.tar.gz" -C "$OUT" device_check
echo "summary: $SUMMARY; everything else: $OUT/device_check.tar.gz" | tee -a "$SUMMARY"
