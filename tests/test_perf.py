"""The perf harness on the CPU: grids and arguments, a real (interpreted) smoke benchmark and its
schema, wrong outputs reported as failures, the report from a committed fixture, the tune logic
with a stubbed timer, and the tuned-config lookup."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from conftest import ON_GPU
from tritonrnn import cli, dispatch
from tritonrnn.kernels import config as configs
from tritonrnn.perf import bench, grid, measure, providers, report, tune

FIXTURE = Path(__file__).parent / "fixtures" / "results_fixture.json"


def test_standard_grid_is_the_issue_grid():
    cases = grid.standard_grid()
    main = [c for c in cases if c.group == "grid"]
    assert len(main) == 3 * 4 * 5
    assert {(c.seq_len, c.layers, c.bidirectional, c.inputs == c.hidden) for c in main} == {(512, 1, False, True)}
    assert sorted({c.seq_len for c in cases if c.group == "t-line"} | {512}) == list(grid.T_LINE)
    assert any(c.layers == 4 and c.bidirectional for c in cases)
    assert any(c.packed for c in cases)
    quick = grid.quick_grid()
    assert len(quick) < len(cases) / 3
    assert all(c.dtype == "bfloat16" for c in grid.select("standard", dtypes=["bfloat16"]))


def test_parse_shape():
    case = grid.parse_shape("T64-B3-H40-I8-L2-bidir-packed", "float16")
    assert (case.seq_len, case.batch, case.hidden, case.inputs, case.layers, case.bidirectional, case.packed) == \
        (64, 3, 40, 8, 2, True, True)
    assert case.name == "float16-T64-B3-I8-H40-L2-bidir-packed"
    with pytest.raises(ValueError, match="bad shape"):
        grid.parse_shape("B3-H40", "float32")
    assert [c.dtype for c in grid.select(shapes=["T8-B2-H16"], dtypes=["float32", "float16"])] == \
        ["float32", "float16"]


def test_case_work_counts_flops():
    case = grid.Case("float32", 2, 4, seq_len=3, input_size=5)
    work = measure.case_work(case, "inference", 4)
    assert work["flops"] == 2 * 3 * 2 * 4 * (5 + 4)
    assert measure.case_work(case, "training", 4)["flops"] == 3 * work["flops"]
    assert work["chain_steps"] == 3


REFERENCE = "cudnn" if ON_GPU else "torch-native"


def test_smoke_bench_writes_complete_rows(tmp_path):
    assert cli.main(["bench", "--grid", "smoke", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert data["schema"] == bench.SCHEMA and data["complete"]
    rows = data["rows"]
    assert len(rows) == len(grid.smoke_grid()) * 2 * 3
    for row in rows:
        assert set(row) == set(bench.ROW_FIELDS)
        assert row["command"] == "tritonrnn bench --grid smoke --out-dir " + str(path.parent)
        if row["provider"] == "cudnn" and not ON_GPU:
            assert row["status"] == "unavailable"
            continue
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["p20_ms"] <= row["p80_ms"]
        assert row["floor_ms"] > 0
        if row["provider"] != "tritonrnn":  # the baselines' kernels (aten ops on the CPU)
            assert row["kernels"] and not row["kernels"][0].startswith("profiler failed")
        if row["mode"] == "training":
            assert (row["peak_memory_bytes"] or 0) > 0 if ON_GPU else row["peak_memory_bytes"] is None
    ours = [r for r in rows if r["provider"] == "tritonrnn"]
    assert {r["backend"] for r in ours} == {"triton" if ON_GPU else "triton-interpreter"}  # not torch's RNN
    assert all(r["max_rel_error"] < 1e-2 for r in ours)
    native = [r for r in rows if r["provider"] == "torch-native" and r["mode"] == "inference"]
    if not ON_GPU:
        assert any("aten::rnn_tanh" in name for name in native[0]["kernels"])


def test_bench_keeps_rows_of_an_interrupted_run(monkeypatch, tmp_path):
    real = bench.run_case
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_case", interrupt_second)
    assert cli.main(["bench", "--grid", "smoke", "--out-dir", str(tmp_path), "--no-profile"]) == 1
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert not data["complete"] and len(data["rows"]) == 2 * 3  # the first case's rows


def test_a_failing_case_becomes_error_rows(monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(providers.Run, "__init__", broken)
    rows = bench.run([grid.smoke_grid()[0]], timer=measure.wall_timer, profile=False)["rows"]
    assert len(rows) == 6 and all(r["status"] == "error" and "simulated" in r["error"] for r in rows)


def test_wrong_provider_output_is_reported_as_a_failure(monkeypatch, tmp_path):
    honest = providers.Run.outputs

    def corrupted(self, mode):
        results = honest(self, mode)
        return tuple(t * 1.5 for t in results) if self.provider == "tritonrnn" else results

    monkeypatch.setattr(providers.Run, "outputs", corrupted)
    code = cli.main(["bench", "--shapes", "T6-B2-H16", "--out-dir", str(tmp_path), "--no-profile"])
    assert code == 1
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    wrong = [r for r in rows if r["provider"] == "tritonrnn"]
    assert wrong and all(r["status"] == "wrong" and r["median_ms"] is None for r in wrong)
    assert f"differs from {REFERENCE}" in wrong[0]["error"]


def test_report_renders_fixture(tmp_path, monkeypatch):
    drawn = {}
    save = report._save

    def counting_save(fig, path):  # what each plot holds, before it is written
        drawn[path.name] = sum(len(ax.lines) + len(ax.images) for ax in fig.axes)
        return save(fig, path)

    monkeypatch.setattr(report, "_save", counting_save)
    report_path = report.render(bench.load([FIXTURE]), [FIXTURE], tmp_path)
    text = report_path.read_text()
    assert "FIXTURE (synthetic rows, not a measurement)" in text
    for png in ("speedup_heatmap.png", "time_vs_T.png", "memory.png", "floor.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 5000, png
        assert f"plots/{png}" in text
        assert drawn[png] > 0, f"{png} has no data"
    assert drawn["speedup_heatmap.png"] == 4  # 2 dtypes x 2 modes
    assert drawn["time_vs_T.png"] == 6  # 3 providers x 2 modes
    assert "| float32 | inference | 4 | 0 |" in text and "| bfloat16 | training | 3 | 1 |" in text
    # H=1024 is slower than cuDNN in the fixture; the bf16 training cell at H=1024, B=64 is wrong.
    assert "- float32-T512-B1-I1024-H1024 inference:" in text
    assert "bfloat16-T512-B64-I1024-H1024 training tritonrnn: wrong" in text
    assert "RNN_blockPersist_fp_GPU" in text


def test_report_summary_numbers():
    def row(case, provider, ms, status="ok"):
        return {"case": case, "mode": "training", "provider": provider, "median_ms": ms, "status": status,
                "dtype": "float16", "group": "grid"}

    rows = [row("a", "tritonrnn", 1.0), row("a", "cudnn", 2.0),  # 2x faster
            row("b", "tritonrnn", 4.0), row("b", "cudnn", 2.0),  # 2x slower
            row("c", "tritonrnn", None, "wrong"), row("c", "cudnn", 1.0)]
    (line,) = report.summary(rows)
    assert (line["cells"], line["failed"], line["min_case"]) == (2, 1, "b")
    assert line["geomean"] == pytest.approx(1.0) and line["min"] == pytest.approx(0.5)


def test_report_cli_renders_newest_results_and_says_which(tmp_path, capsys):
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    shutil.copy(FIXTURE, results_dir / "20260101T000000-FIXTURE-quick.json")
    assert cli.main(["report", "--results-dir", str(results_dir), "--out-dir", str(tmp_path), "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "20260101T000000-FIXTURE-quick.json" in out and (tmp_path / "REPORT.md").exists()


def test_report_without_results_says_so(tmp_path, capsys):
    assert cli.main(["report", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path), "--no-bench"]) == 0
    assert "No results to render" in capsys.readouterr().out
    assert not (tmp_path / "REPORT.md").exists()


class _Tagged:
    def __init__(self, direction, path, config):
        self.key = (direction, path, tuple(sorted(config.kwargs.items())), config.num_warps)

    def __call__(self):  # the output the candidates are checked with; "wrong" ones differ
        return torch.full((2,), 9.0 if self.key[1] == "streamed" else 1.0)


def test_tune_writes_only_winners_that_beat_the_default(monkeypatch, tmp_path):
    monkeypatch.setattr(tune, "recurrence_fn",
                        lambda problem, direction, path, config: _Tagged(direction, path, config))
    defaults = {}

    def stub_timer(fn):
        direction, path, kwargs, warps = fn.key
        default_path, default_config = tune.default_choice(64, 16, torch.float32)
        is_default = (path, kwargs, warps) == (default_path, tuple(sorted(default_config.kwargs.items())),
                                               default_config.num_warps)
        if is_default:
            defaults[direction] = True
            return {"median_ms": 1.0}
        if direction == "forward" and path == "stepwise" and warps == 8 and dict(kwargs)["BLOCK_N"] == 32:
            return {"median_ms": 0.5}  # a clear winner
        if direction == "backward" and path == "sequence":
            return {"median_ms": 0.99}  # within the margin: not written
        return {"median_ms": 2.0}

    (tmp_path / "cpu.json").write_text(json.dumps({"gpu": "cpu", "entries": {
        "float32/H64/B16/backward": {"path": "stepwise", "config": {}}}}))  # a stale winner
    timed = []
    timer = lambda fn: (timed.append(fn.key[1]), stub_timer(fn))[1]  # noqa: E731
    outcome = tune.tune([("float32", 64, 16), ("float32", 64, 9)], timer, torch.device("cpu"),
                        command="test", directory=tmp_path)
    assert "streamed" not in timed  # wrong outputs are never timed
    assert defaults == {"forward": True, "backward": True}
    table = json.loads(outcome["path"].read_text())
    assert set(table["entries"]) == {"float32/H64/B16/forward"}  # B=9 and B=16 share the bucket
    entry = table["entries"]["float32/H64/B16/forward"]
    assert entry["path"] == "stepwise" and entry["config"]["num_warps"] == 8 and entry["time_ms"] == 0.5
    assert table["command"] == "test"


def test_tune_runs_every_candidate_for_real(tmp_path):
    """No stubs: every candidate of a tiny shape runs (interpreted here), is checked and timed."""
    timed = []

    def timer(fn):
        timed.append(fn)
        return measure.wall_timer(fn, reps=1)

    device = torch.device("cuda" if ON_GPU else "cpu")
    outcome = tune.tune([("float32", 20, 3)], timer, device, directory=tmp_path, seq_len=3)
    results = {r["key"].rsplit("/", 1)[1]: r for r in outcome["results"]}
    assert set(results) == {"forward", "backward"}
    for r in results.values():
        assert r["best"] is not None and r["best"]["path"] in configs.PATHS
    candidates = len(tune.candidates(20, 3))
    assert {p for p, _ in tune.candidates(20, 3)} == set(configs.PATHS)
    assert len(timed) == 2 * (1 + candidates)  # every candidate agreed with the default and was timed
    assert json.loads(outcome["path"].read_text())["entries"].keys() <= {r["key"] for r in results.values()}


def test_tuned_configs_are_used_for_their_gpu(monkeypatch, tmp_path):
    entry = {"path": "stepwise", "config": {"BLOCK_B": 16, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8,
                                            "num_stages": 3}}
    (tmp_path / "H100.json").write_text(json.dumps({"entries": {"float32/H64/B16/forward": entry}}))
    monkeypatch.setattr(configs, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    configs._tuned_table.cache_clear()
    try:
        cuda = torch.device("cuda")
        choice = configs.tuned(torch.float32, 64, 13, "forward", cuda)
        assert choice["path"] == "stepwise" and choice["config"].num_warps == 8
        assert dispatch.kernel_path(100, 64, torch.float32, 13, cuda, "forward") == "stepwise"
        assert dispatch.kernel_path(100, 64, torch.float32, 13, cuda, "backward") == "sequence"  # no entry
        assert configs.tuned(torch.float32, 64, 13, "forward", torch.device("cpu")) is None
    finally:
        configs._tuned_table.cache_clear()


def test_tuning_space_fits_the_shape():
    assert configs.gpu_slug("NVIDIA H100 80GB HBM3") == "H100"
    assert configs.gpu_slug("NVIDIA H200") == "H200"
    for path in configs.PATHS:
        for batch, hidden in ((1, 16), (256, 2048), (17, 100)):
            space = configs.tuning_space(path, batch, hidden)
            assert space
            assert all(c.kwargs["BLOCK_B"] <= max(16, configs.batch_bucket(batch)) for c in space)
        default = configs.default_config(path, 64, 128)
        assert default.kwargs["BLOCK_B"] >= configs.MIN_DOT
    pruned = configs.prune_space("sequence")(configs.full_space("sequence"), {"B": 1, "H": 64})
    assert {c.kwargs["BLOCK_B"] for c in pruned} == {16}


DEVICE_CHECK = Path(__file__).resolve().parents[1] / "perf" / "device_check.sh"
STUB_PYTHON = """#!/bin/sh
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
