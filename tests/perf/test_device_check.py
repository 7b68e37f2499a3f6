"""perf/device_check.sh's shell logic with stub commands: its stages, outputs, deadline and refusals."""
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import ON_GPU


DEVICE_CHECK = Path(__file__).resolve().parents[2] / "perf" / "device_check.sh"
STUB_PYTHON = """#!/bin/sh
case "$2" in "import torch") [ -z "$STUB_NO_TORCH" ]; exit;; esac  # the torch check
case "$2" in *"sys.exit(0 if torch.cuda.is_available()"*) [ -z "$STUB_NO_GPU" ]; exit;; esac  # the GPU check
if [ "$1 $2" = "-m pytest" ] && [ "$STUB_HANG" = tests ]; then exec sleep 600; fi
case "$1 $2" in "-m pip"|"-m pytest") echo "stub $*"; exit 0;; esac
exec {python} "$@"
"""
STUB_TRITONRNN = """#!/bin/sh
echo "stub tritonrnn $*"
for last; do :; done  # --out-dir DIR comes last
if [ "$1" = bench ] && [ -n "$STUB_WRITES_RESULTS" ]; then mkdir -p "$last"; echo {{}} > "$last/run.json"; fi
if [ "$1" = report ]; then mkdir -p "$last"; echo report > "$last/REPORT.md"; fi
"""


# Shell logic with stubs, about a minute of sleeping stages: checked on the CPU, so that the GPU run's
# own (deadline-bound) test stage spends its time on the GPU.
CPU_ONLY = pytest.mark.skipif(ON_GPU, reason="shell logic, checked on the CPU; a GPU run's time goes to the GPU")


def _device_check(tmp_path, deadline, **env_vars):
    """perf/device_check.sh with stub commands (pip, pytest, tritonrnn, nvidia-smi): a running process."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", STUB_PYTHON.format(python=sys.executable)), ("tritonrnn", STUB_TRITONRNN),
                       ("nvidia-smi", "#!/bin/sh\necho stub GPU\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path / "tmp"),
           "DEADLINE": str(deadline), "KILL_GRACE": "2", **env_vars}
    return subprocess.Popen(["bash", str(DEVICE_CHECK), str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _outputs(out: Path):
    assert sorted(p.name for p in out.iterdir()) == ["SUMMARY.txt", "device_check.tar.gz"]  # nothing else
    with tarfile.open(out / "device_check.tar.gz") as archive:
        return (out / "SUMMARY.txt").read_text(), archive.getnames()


@CPU_ONLY
@pytest.mark.parametrize("with_results", [True, False], ids=["results", "no-results"])
def test_device_check_stages_and_outputs(tmp_path, with_results):
    """The script's shell logic: every stage runs, OUTDIR holds two files, the summary says what ran where."""
    process = _device_check(tmp_path, 300, **({"STUB_WRITES_RESULTS": "1"} if with_results else {}))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    summary, names = _outputs(tmp_path / "out")
    for stage in ("install: exit 0", "info: exit 0", "tests: exit 0", "bench: exit 0"):
        assert stage in summary
    assert f"torch {torch.__version__} CUDA {torch.version.cuda}" in summary and "triton 3." in summary
    assert "cuDNN" in summary and "stub GPU" in summary
    tree_hash = subprocess.run(["bash", str(DEVICE_CHECK), "--tree-hash"], capture_output=True, text=True).stdout
    assert f"tree hash: {tree_hash.strip()} " in summary and len(tree_hash.strip()) == 16
    assert "commit: " in summary
    assert "device_check/tests.log" in names and "device_check/SUMMARY.txt" in names
    if with_results:
        assert "report: exit 0" in summary and "device_check/report/REPORT.md" in names
    else:
        assert "report: skipped" in summary
    assert not list((tmp_path / "tmp").iterdir())  # the work folder is gone


@CPU_ONLY
def test_device_check_hanging_stage_keeps_the_deadline(tmp_path):
    """A hanging test stage is cut at its share; the later stages still run; all within DEADLINE."""
    deadline = 60
    start = time.monotonic()
    process = _device_check(tmp_path, deadline, STUB_HANG="tests", STUB_WRITES_RESULTS="1")
    _, stderr = process.communicate(timeout=deadline + 30)
    assert time.monotonic() - start <= deadline, "over the deadline"
    summary, names = _outputs(tmp_path / "out")
    assert "tests: TIMED OUT" in summary, summary
    assert "bench: exit 0" in summary and "report: exit 0" in summary
    assert "device_check/tests.log" in names


@CPU_ONLY
def test_device_check_cut_short_returns_the_finished_stages(tmp_path):
    """Killed mid-run (as the device tool does at its limit): OUTDIR already holds the finished stages."""
    process = _device_check(tmp_path, 120, STUB_HANG="tests")
    summary = tmp_path / "out" / "SUMMARY.txt"
    for _ in range(300):
        if summary.exists() and "info: exit" in summary.read_text():
            break
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    text, names = _outputs(tmp_path / "out")
    assert "install: exit 0" in text and "info: exit 0" in text
    assert "tests: exit" not in text and "tests: TIMED" not in text
    assert "device_check/info.log" in names


@CPU_ONLY
@pytest.mark.parametrize("stubs", [True, False], ids=["stub-no-gpu", "this-machine"])
def test_device_check_without_a_gpu_stops_at_once(tmp_path, stubs):
    """No GPU: one line saying so, exit 2, in seconds (it ran every stage for minutes, then failed at the bench)."""
    if stubs:
        process = _device_check(tmp_path, 300, STUB_NO_GPU="1")
    else:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3 with torch
        process = subprocess.Popen(["bash", str(DEVICE_CHECK), str(tmp_path / "out")], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and time.monotonic() - start < 60
    assert stderr.splitlines() == [(tmp_path / "out" / "SUMMARY.txt").read_text().strip()]
    assert stderr.startswith("device_check: needs a CUDA GPU") and "nothing ran" in stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["SUMMARY.txt"]


@CPU_ONLY
def test_device_check_says_when_python3_cannot_import_torch(tmp_path):
    """python3 without torch (a machine where torch lives in another interpreter) is not 'no GPU'."""
    process = _device_check(tmp_path, 300, STUB_NO_TORCH="1")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr.splitlines() == [(tmp_path / "out" / "SUMMARY.txt").read_text().strip()]
    assert stderr.startswith(f"device_check: python3 ({tmp_path / 'bin' / 'python3'}) cannot import torch")
    assert "GPU" not in stderr and "nothing ran" in stderr
