#!/usr/bin/env bash
# perf/device_check.sh OUTDIR: what a lent GPU machine runs, in one go, within DEADLINE seconds.
# Installs the project (no network there), runs the GPU tests, the quick benchmark and the report.
# Each stage runs even if an earlier one failed or timed out.
#
# OUTDIR only ever holds two files (the device tool brings back few), both rewritten after every
# stage, so a run cut short still returns what finished: SUMMARY.txt (versions, commit, how each
# stage ended, the test summary, the report's headline) and device_check.tar.gz (logs, junit.xml,
# results, REPORT.md and plots). The work folder is a temporary directory outside OUTDIR.
#
# Time: one overall DEADLINE (seconds from start, kill grace included, default 480: fits a 560 s
# device call with room for its start). Stage i must end by its cumulative share of it, so time an
# early stage leaves unused goes to the later ones, and a hanging stage cannot eat their shares; at
# 480: versions 33 s, install 33, calibrate 100, info 14, tests 115, bench 168, report 38, kill grace included.
#
# perf/device_check.sh --tree-hash prints the tree hash the summary records, to match a run to a
# commit here: the device tool copies the working tree without .git, so `git rev-parse` cannot work.
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

tree_hash() {  # sha256 of the sorted per-file hashes of the project's source (no build outputs)
    find pyproject.toml README.md kernels tritonrnn perf tests examples -type f \
        -not -path '*/__pycache__/*' -not -name '*.pyc' -not -path 'perf/results/*' -print0 2>/dev/null |
        LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
if [[ ${1:-} == --tree-hash ]]; then tree_hash; exit 0; fi

OUT=${1:?usage: perf/device_check.sh OUTDIR | --tree-hash}
# Without torch or a GPU the stages would run for minutes before the benchmark fails: stop at once, in one
# line that says which of the two it is.
if ! python3 -c "import torch" 2>/dev/null; then
    STOP="device_check: python3 ($(command -v python3)) cannot import torch: install torch for it, or put a python3 that has it first on PATH; nothing ran"
elif ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    STOP="device_check: needs a CUDA GPU (python3 -c 'import torch; torch.cuda.is_available()' is not True here); nothing ran"
fi
if [[ -n ${STOP:-} ]]; then
    mkdir -p "$OUT" && echo "$STOP" > "$OUT/SUMMARY.txt"
    echo "$STOP" >&2
    exit 2
fi
DEADLINE=${DEADLINE:-480}
GRACE=${KILL_GRACE:-10}   # after SIGINT (Python saves what it has), SIGKILL this much later
RESERVE=3                 # seconds kept for writing the summary and the archive at the end
# Cumulative shares of DEADLINE (percent) by which each stage must have ended.
declare -A BY=([versions]=7 [install]=16 [info]=21 [tests]=57 [bench]=92 [report]=100)
START=$SECONDS

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TMP=$(mktemp -d)
WORK="$TMP/device_check"
mkdir -p "$WORK"
SUMMARY="$WORK/SUMMARY.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1

publish() {  # copy the summary and archive the work folder into OUT (renames: never half a file)
    cp "$SUMMARY" "$OUT/.SUMMARY.txt.part" && mv -f "$OUT/.SUMMARY.txt.part" "$OUT/SUMMARY.txt"
    tar czf "$OUT/.device_check.tar.gz.part" -C "$TMP" device_check &&
        mv -f "$OUT/.device_check.tar.gz.part" "$OUT/device_check.tar.gz"
}
finish() { rm -f "$OUT"/.*.part; rm -rf "$TMP"; }
trap finish EXIT
trap 'echo "device_check: interrupted after $((SECONDS - START)) s" >> "$SUMMARY"; publish; exit 130' INT TERM

stage() {  # stage NAME COMMAND...: run within the stage's share (SIGINT first, so Python can save), log
    local name=$1; shift
    local limit=$((START + DEADLINE * ${BY[$name]} / 100 - SECONDS - GRACE - RESERVE)) begin=$SECONDS rc
    if (( limit < 1 )); then
        echo "$name: skipped, no time left before the deadline" >> "$SUMMARY"
        publish
        return 124
    fi
    timeout -s INT -k "$GRACE" "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    local how="exit $rc"
    (( rc == 124 || rc == 137 )) && how="TIMED OUT after its $limit s (exit $rc)"
    echo "$name: $how in $((SECONDS - begin)) s (${*%%$'\n'*})" >> "$SUMMARY"
    publish
    return $rc
}

# The software and GPU this run measured.
VERSIONS='nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__,
\"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version(), \"triton\", triton.__version__,
\"GPU\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)"'
echo "device_check.sh, deadline $DEADLINE s, started $(date -u +%FT%TZ)" >> "$SUMMARY"
# Only this checkout's own git metadata counts, not a repository that happens to hold the copy.
if [[ $(git rev-parse --show-toplevel 2>/dev/null) == "$PWD" ]] && commit=$(git rev-parse HEAD 2>/dev/null); then
    echo "commit: $commit$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')" >> "$SUMMARY"
else
    echo "commit: unknown here (no git metadata in the copied tree)" >> "$SUMMARY"
fi
echo "tree hash: $(tree_hash) (perf/device_check.sh --tree-hash at a commit gives the same for the same files)" \
    >> "$SUMMARY"
nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1
stage versions bash -c "$VERSIONS"
tail -n 6 "$WORK/versions.log" >> "$SUMMARY" 2>/dev/null
publish

stage install python3 -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -e .

# Calibration of the cost model (issue 16 item 7), the first stage on the GPU. It runs every layout's
# self-test first (`tritonrnn selftest`: each layout against the stepwise path and float64, NaN-poisoned,
# under a time limit; the verdicts cached for the later stages), then measures the empty-step
# barrier, the state round trip, one step of each layout that passed and cuDNN's at H = 256/1024/2048 x
# B = 16/64/256 in fp32 and bf16 (perf/calibrate.py). Writes calibration/<GPU>.json into the archive
# (copy it into kernels/calibration/ to ship it), and the self-test's table and the measured-against-
# predicted table into the summary. Its share comes out of the install's and the tests' (at 480 s: about 100 s).
BY[install]=14; BY[calibrate]=35; BY[info]=38; BY[tests]=62
stage calibrate python3 -m tritonrnn.perf.calibrate "$WORK/calibration"
cat "$WORK/calibration/calibration.txt" >> "$SUMMARY" 2>/dev/null || tail -n 5 "$WORK/calibrate.log" >> "$SUMMARY"
publish
stage info tritonrnn info --hidden-size 256 --batch 16

# Tests: the whole suite, the ones marked gpu first (tests/conftest.py orders them so on a GPU). With
# pytest-xdist, 8 workers take tests one by one (--dist load), so the GPU tests' slow compiles spread
# over workers; with pytest-timeout each test also gets its own limit. Without them the stage's own
# limit is all there is (the summary says which).
PYTEST=(-q -rfE -p no:cacheprovider --junitxml="$WORK/junit.xml")
if python3 -c "import xdist" 2>/dev/null; then PYTEST+=(-n 8 --dist load); else
    echo "tests: pytest-xdist missing, one process" >> "$SUMMARY"; fi
if python3 -c "import pytest_timeout" 2>/dev/null; then PYTEST+=(--timeout "${TEST_TIMEOUT:-150}"); else
    echo "tests: pytest-timeout missing, no per-test limit (only the stage's)" >> "$SUMMARY"; fi
stage tests python3 -m pytest "${PYTEST[@]}" tests
tail -n 15 "$WORK/tests.log" >> "$SUMMARY" 2>/dev/null
publish

stage bench tritonrnn bench --grid quick --out-dir "$WORK/results"
results=("$WORK"/results/*.json)
if (( ${#results[@]} )); then
    stage report tritonrnn report --no-bench --results "${results[@]}" --out-dir "$WORK/report"
    cat "$WORK/report.log" >> "$SUMMARY" 2>/dev/null
else
    echo "report: skipped, the bench wrote no results" >> "$SUMMARY"
fi
echo "done in $((SECONDS - START)) s: summary $OUT/SUMMARY.txt; logs, results, report: $OUT/device_check.tar.gz" \
    >> "$SUMMARY"
publish
cat "$SUMMARY"
