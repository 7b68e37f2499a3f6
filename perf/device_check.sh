#!/usr/bin/env bash
# perf/device_check.sh OUTDIR: what a lent GPU machine runs, in one go (about 8 minutes on an H100).
# Installs the project (no network there), runs the GPU test suite, the quick benchmark and the
# report, and writes logs, results and plots to OUTDIR. Each stage runs even if an earlier one
# failed; OUTDIR/SUMMARY.txt says how each ended.
set -uo pipefail
OUT=${1:?usage: perf/device_check.sh OUTDIR}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-210}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-270}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/SUMMARY.txt"
: > "$SUMMARY"
stage() {  # stage NAME TIMEOUT COMMAND...: run, log, record the exit status and duration
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s ($*)" | tee -a "$SUMMARY"
    return $rc
}

{ nvidia-smi; git rev-parse HEAD; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"; } > "$OUT/env.txt" 2>&1
stage install 120 python3 -m pip install --no-deps --no-build-isolation -e .
stage info 60 tritonrnn info --hidden-size 256 --batch 16
stage tests "$TESTS_TIMEOUT" python3 -m pytest -q -rfE -p no:cacheprovider --junitxml="$OUT/junit.xml"
tail -n 3 "$OUT/tests.log" | tee -a "$SUMMARY"
stage bench "$BENCH_TIMEOUT" tritonrnn bench --grid quick --out-dir "$OUT/results"
stage report 120 tritonrnn report --no-bench --results "$OUT"/results/*.json --out-dir "$OUT/report"
cat "$OUT/report.log" >> "$SUMMARY"
echo "logs, results and report: $OUT"
