"""perf's benchmark on the CPU: the grids and shape arguments, a real (interpreted) smoke run and its rows'
schema, an interrupted or failing run keeping its rows, wrong outputs reported as failures, the profiling
pass after the timing, the interpreter's limits."""
import json
import re

import pytest

from conftest import ON_GPU
from tritonrnn import cli, dispatch
from tritonrnn.perf import bench, grid, measure, providers


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
        assert row["kernels"] and not row["kernels"][0].startswith("profiler failed")  # aten ops on the CPU
        if row["mode"] == "training":
            assert (row["peak_memory_bytes"] or 0) > 0 if ON_GPU else row["peak_memory_bytes"] is None
    ours = [r for r in rows if r["provider"] == "tritonrnn"]
    assert {r["backend"] for r in ours} == {"triton" if ON_GPU else "triton-interpreter"}  # not torch's RNN
    assert {r["backend"] for r in rows if r["provider"] == "torch-native"} == {"torch-native"}  # the profiler's
    assert all(r["rel_error"] < 1e-4 for r in rows if r["status"] == "ok")  # fp32 (TF32 off) vs float64
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
    assert "differs from the float64 run" in wrong[0]["error"]
    assert all(r["status"] == "ok" for r in rows if r["provider"] != "tritonrnn" and r["status"] != "unavailable")


def test_profiling_runs_after_all_timing_and_names_the_backend(monkeypatch):
    events = []
    real_profile = measure.profile_call

    def timer(fn):
        events.append("time")
        return measure.wall_timer(fn, reps=1)

    monkeypatch.setattr(measure, "profile_call", lambda fn, device: (events.append("profile"),
                                                                     real_profile(fn, device))[1])
    results = bench.run(grid.smoke_grid(), timer=timer, providers=("tritonrnn", "torch-native"))
    assert results["complete"]
    first_profile = events.index("profile")
    assert "profile" not in events[:first_profile] and "time" not in events[first_profile:]
    assert events.count("profile") == len(results["rows"])
    backends = {(r["provider"], r["backend"]) for r in results["rows"]}
    assert backends == {("tritonrnn", "triton" if ON_GPU else "triton-interpreter"), ("torch-native", "torch-native")}


def test_sticky_cuda_error_ends_the_run_with_the_rows_so_far(monkeypatch, tmp_path):
    honest = providers.Run.outputs

    def illegal_address(self, mode):
        if self.provider == "tritonrnn" and mode == "training":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return honest(self, mode)

    monkeypatch.setattr(providers.Run, "outputs", illegal_address)
    assert cli.main(["bench", "--grid", "smoke", "--out-dir", str(tmp_path), "--no-profile"]) == 1
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert not data["complete"] and "illegal memory access" in data["stopped"]
    rows = data["rows"]
    assert {r["case"] for r in rows} == {grid.smoke_grid()[0].name}  # the second case never ran
    assert rows[-1]["provider"] == "tritonrnn" and rows[-1]["status"] == "error"  # the failing row is kept
    assert len(rows) == 3 + 1  # inference's three, then the failing one


@pytest.mark.skipif(ON_GPU, reason="the interpreter's limits; a GPU runs every case")
def test_bench_device_under_the_interpreter(monkeypatch):
    """Small named shapes and the smoke grid run on the CPU under the interpreter; the big grids and shapes the
    interpreter would take hours on are refused before any work; without the interpreter nothing runs."""
    from tritonrnn.perf import UsageError

    cases = grid.select(shapes=["T64-B16-H128", "T32-B16-H64-L2-bidir"])  # each at the limit, 2 ** 17 states
    assert bench.device_for(cases, "custom").type == "cpu"
    assert bench.device_for(grid.smoke_grid(), "smoke").type == "cpu"
    with pytest.raises(UsageError, match="--grid quick under the interpreter"):
        bench.device_for(grid.quick_grid(), "quick")
    for shape, refused in (("T65-B16-H128", "T65-B16-H128 x 1 layer(s) x 1 direction(s)"),
                           ("T33-B16-H64-L2-bidir", "T33-B16-H64 x 2 layer(s) x 2 direction(s)")):
        with pytest.raises(UsageError, match=re.escape(refused)):
            bench.device_for(grid.select(shapes=[shape]), "custom")
    monkeypatch.setattr(dispatch, "interpreter_enabled", lambda: False)
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        bench.device_for(cases, "custom")
