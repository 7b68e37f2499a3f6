"""The perf harness on the CPU: grids and arguments, a real (interpreted) smoke benchmark and its
schema, wrong outputs reported as failures, the report from a committed fixture, the tune logic
with a stubbed timer, and the tuned-config lookup."""
import json
import math
import re
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
from tritonrnn.kernels import configs
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


def test_compare_rejects_nan_reference_wrong_shapes_and_non_finite_outputs():
    reference = (torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64))
    close = tuple((t * (1 + 1e-6)).float() for t in reference)
    assert providers.compare(close, reference, torch.float32)[0]
    broadcastable = (close[0], close[1].expand(5, 3, 4))  # (1,3,4) vs (5,3,4) would broadcast
    ok, error, why = providers.compare(broadcastable[::-1], reference[::-1], torch.float32, ["h_n", "out"])
    assert not ok and "shape" in why and "(5, 3, 4)" in why
    ok, _, why = providers.compare((close[0][:, :1],) + close[1:], reference, torch.float32)
    assert not ok and "shape" in why  # (5,3,1) against (5,3,4)
    ok, _, why = providers.compare((close[0], torch.full_like(close[1], math.nan)), reference, torch.float32)
    assert not ok and "not finite" in why
    assert not providers.compare(close[:1], reference, torch.float32)[0]
    poisoned = (reference[0].clone().fill_(math.nan), reference[1])
    with pytest.raises(ValueError, match="not finite"):
        providers.check_reference(poisoned)
    # Norm-wise: one element off by 10% of itself in a large tensor is within bf16's tolerance.
    big = torch.randn(64, 16, 32, dtype=torch.float64)
    spiked = big.clone()
    spiked.view(-1)[0] *= 1.1
    ok, error, _ = providers.compare((spiked,), (big,), torch.bfloat16)
    assert ok and error < 1e-2
    ok, error, why = providers.compare((big * 1.2,), (big,), torch.bfloat16, ["d_weight_hh_l0"])
    assert not ok and error == pytest.approx(0.2) and "d_weight_hh_l0" in why


def test_nan_float64_reference_leaves_rows_unchecked_not_blamed(monkeypatch):
    honest = providers.Run.outputs

    def nan_reference(self, mode):
        results = honest(self, mode)
        return tuple(torch.full_like(t, math.nan) for t in results) if self.dtype == torch.float64 else results

    monkeypatch.setattr(providers.Run, "outputs", nan_reference)
    rows = bench.run([grid.smoke_grid()[0]], timer=measure.wall_timer, profile=False,
                     providers=("tritonrnn", "torch-native"))["rows"]
    assert {r["status"] for r in rows} == {"unchecked"}
    assert all("float64 reference failed" in r["error"] and r["median_ms"] is None for r in rows)
    for line in report.summary(rows):  # no provider counted as failed
        assert (line["cells"], line["failed"], line["cudnn_failed"], line["unchecked"]) == (0, 0, 0, 1)


def test_packed_case_packs_once_outside_the_timed_call(monkeypatch):
    calls = []
    real = providers.pack_padded_sequence
    monkeypatch.setattr(providers, "pack_padded_sequence", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    case = grid.Case("float32", 5, 8, seq_len=6, packed=True)
    run = providers.Run("torch-native", case, torch.device("cpu"))
    packed_at_setup = len(calls)
    for mode in ("inference", "training"):
        run.fn(mode)()
    assert packed_at_setup == len(run.inputs) and len(calls) == packed_at_setup
    out = run.outputs("training")
    assert out[0].shape == (sum(case.lengths()), 8) and out[2].shape == (sum(case.lengths()), 8)


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


def test_backend_from_ops_tells_cudnn_from_its_fallback():
    cuda = torch.device("cuda")
    assert measure.backend_from_ops({"aten::rnn_tanh", "aten::_cudnn_rnn"}, cuda) == "cudnn"
    assert measure.backend_from_ops({"aten::rnn_tanh", "aten::addmm", "aten::tanh"}, cuda) == "torch-native"
    assert measure.backend_from_ops({"tritonrnn::recurrence"}, cuda) == "triton"


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


def test_failing_ceilings_leave_the_cases_running_without_a_floor(monkeypatch):
    def broken(*args):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(measure, "ceilings", broken)
    results = bench.run([grid.smoke_grid()[0]], timer=lambda fn: measure.wall_timer(fn, reps=1), profile=False,
                        providers=("torch-native",))
    assert results["complete"] and "simulated" in results["ceilings"]["float32"]["error"]
    assert all(r["status"] == "ok" and r["floor_ms"] is None for r in results["rows"])


def test_floor_counts_packed_work_at_real_lengths():
    padded, packed = grid.Case("float32", 64, 256), grid.Case("float32", 64, 256, packed=True)
    ratio = measure.case_work(packed, "training", 4)["flops"] / measure.case_work(padded, "training", 4)["flops"]
    assert ratio == pytest.approx(sum(packed.lengths()) / (64 * 512)) and ratio < 0.6
    assert measure.case_work(packed, "training", 4)["chain_steps"] == 2 * 512


CHAIN_PTX = """
import re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritonrnn.perf import measure
signature = {"p_out": "*bf16", "steps": "i32", "BLOCK": "constexpr", "DTYPE": "constexpr", "TF32": "constexpr"}
source = ASTSource(measure._dependent_chain_kernel, signature, {"BLOCK": 16, "DTYPE": tl.bfloat16, "TF32": False})
ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1}).asm["ptx"]
print(bool(re.search(r"mma.sync.aligned.m16n8k16[.a-z0-9]*bf16", ptx)), "ld.global" in ptx)
"""


def test_floor_chain_is_a_load_free_dependent_matmul_chain(device):
    """The chain term's step compiles (sm_90) to tensor-core matmuls with no global load at all."""
    from tritonrnn.perf import static

    if not static.available():
        pytest.skip("this triton cannot compile for NVIDIA offline")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CHAIN_PTX], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "False"], result.stderr[-2000:]
    assert measure.dependent_step_ms(device, torch.float32, lambda fn: measure.wall_timer(fn, reps=1), 4) >= 0


def test_report_renders_fixture(tmp_path, monkeypatch):
    drawn = {}
    save = report._save

    titles = {}

    def counting_save(fig, path, note=None):  # what each plot holds, before it is written
        drawn[path.name] = sum(len(ax.lines) + len(ax.images) for ax in fig.axes)
        result = save(fig, path, note)
        titles[path.name] = fig._suptitle.get_text() if fig._suptitle else ""
        return result

    monkeypatch.setattr(report, "_save", counting_save)
    report_path = report.render(bench.load([FIXTURE]), [FIXTURE], tmp_path)
    text = report_path.read_text()
    assert text.startswith("# tritonrnn performance report\n\n**SYNTHETIC rows (a test fixture), not a measurement.**")
    for png in ("speedup_heatmap.png", "time_vs_T.png", "memory.png", "floor.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 5000, png
        assert f"plots/{png}" in text
        assert drawn[png] > 0, f"{png} has no data"
        assert titles[png].startswith("SYNTHETIC"), png
    assert drawn["speedup_heatmap.png"] == 4  # 2 dtypes x 2 modes
    assert drawn["time_vs_T.png"] == 6  # 3 providers x 2 modes
    assert "## Summary (8 B x H grid cells in these results; the standard grid has 60)" in text
    assert "standard grid)" not in text
    # Failures count against the provider that failed: tritonrnn's wrong bf16 cell, cuDNN's failed fp32 cell.
    assert "| float32 | inference | 4 | 0 | 0 | 0 | 0 |" in text
    assert "| float32 | training | 3 | 0 | 1 | 0 | 0 |" in text
    assert "| bfloat16 | training | 3 | 1 | 0 | 0 | 3 |" in text  # and cuDNN fell back in the 3 compared
    assert "- float32-T512-B1-I1024-H1024 inference:" in text
    assert "- bfloat16-T512-B1-I1024-H1024 inference: 0.85x (cuDNN fell back to torch-native)" in text
    assert "bfloat16-T512-B64-I1024-H1024 training tritonrnn: wrong" in text
    assert "float32-T512-B64-I1024-H1024 training cudnn: error" in text
    assert "RNN_blockPersist_fp_GPU" in text and "**cuDNN fell back to torch's native kernels in 8 rows**" in text
    assert "| bfloat16-T512-B1-I128-H128 | inference | 0.504 | 0.808 | 2.025 | 1.60 | 0.302 | 1.7 | native |" in text


def test_report_summary_numbers():
    def row(case, provider, ms, status="ok", backend=None):
        return {"case": case, "mode": "training", "provider": provider, "median_ms": ms, "status": status,
                "dtype": "float16", "group": "grid", "backend": backend}

    rows = [row("a", "tritonrnn", 1.0), row("a", "cudnn", 2.0, backend="cudnn"),  # 2x faster
            row("b", "tritonrnn", 4.0), row("b", "cudnn", 2.0, backend="torch-native"),  # 2x slower, a fallback
            row("c", "tritonrnn", None, "wrong"), row("c", "cudnn", 1.0),  # tritonrnn's failure
            row("d", "tritonrnn", 1.0), row("d", "cudnn", None, "error"),  # cuDNN's failure, not tritonrnn's
            row("e", "tritonrnn", None, "unchecked"), row("e", "cudnn", None, "unchecked")]  # the reference failed
    (line,) = report.summary(rows)
    assert (line["cells"], line["failed"], line["cudnn_failed"], line["unchecked"], line["fallback"]) == (2, 1, 1, 1, 1)
    assert line["min_case"] == "b" and line["geomean"] == pytest.approx(1.0) and line["min"] == pytest.approx(0.5)
    text = report.summary_text(line)
    assert "2 compared, 1 failed (tritonrnn), 1 failed (cuDNN), 1 unchecked: geomean speedup over cuDNN 1.00" in text
    assert "in 1 of them cuDNN fell back to torch-native" in text


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
        return torch.full((2,), 9.0 if self.key[1] == "persistent" else 1.0)


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
    assert "persistent" not in timed  # wrong outputs are never timed
    assert defaults == {"forward": True, "backward": True}
    table = json.loads(outcome["path"].read_text())
    assert set(table["entries"]) == {"float32/H64/B16/forward"}  # B=9 and B=16 share the bucket
    entry = table["entries"]["float32/H64/B16/forward"]
    assert entry["path"] == "stepwise" and entry["config"]["num_warps"] == 8 and entry["time_ms"] == 0.5
    assert table["command"] == "test"


def test_tune_confirms_a_winner_against_the_default_before_writing(monkeypatch, tmp_path):
    """A candidate that was fast once (noise) is re-timed with the default, interleaved, and loses;
    a real winner stays fast in every round and is written."""
    monkeypatch.setattr(tune, "recurrence_fn",
                        lambda problem, direction, path, config: _Tagged(direction, path, config))
    default_path, default_config = tune.default_choice(64, 16, torch.float32)
    default_key = (default_path, tuple(sorted(default_config.kwargs.items())), default_config.num_warps)
    seen, calls = {}, []

    def stub_timer(fn):
        direction, path, kwargs, warps = fn.key
        calls.append("default" if (path, kwargs, warps) == default_key else (path, kwargs, warps))
        if calls[-1] == "default":
            return {"median_ms": 1.0}
        if path == "stepwise" and warps == 8 and dict(kwargs)["BLOCK_N"] == 32:
            seen[fn.key] = seen.get(fn.key, 0) + 1
            if direction == "forward":
                return {"median_ms": 0.5}  # a real winner
            return {"median_ms": 0.5 if seen[fn.key] == 1 else 1.0}  # lucky once, then as slow as the default
        return {"median_ms": 2.0}

    outcome = tune.tune([("float32", 64, 16)], stub_timer, torch.device("cpu"), directory=tmp_path)
    forward, backward = outcome["results"]
    assert forward["written"] and forward["best"]["time_ms"] == 0.5 and forward["default_ms"] == 1.0
    assert not backward["written"] and backward["best"]["time_ms"] == 1.0  # the confirmed time, not the lucky one
    assert set(json.loads(outcome["path"].read_text())["entries"]) == {"float32/H64/B16/forward"}
    # Each confirmation alternates the default and the winner, CONFIRM_ROUNDS times, after the search.
    rounds = 2 * tune.CONFIRM_ROUNDS
    for confirmation in (calls[len(calls) // 2 - rounds:len(calls) // 2], calls[-rounds:]):
        assert confirmation[0::2] == ["default"] * tune.CONFIRM_ROUNDS
        assert len(set(confirmation[1::2])) == 1 and confirmation[1] != "default"


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
        assert r["best"] is not None and r["best"]["path"] in configs.TUNED_LAYOUTS
    candidates = len(tune.candidates(20, 3, torch.float32))
    assert {p for p, _ in tune.candidates(20, 3, torch.float32)} == set(configs.TUNED_LAYOUTS)
    # every candidate agreed with the default and was timed; a would-be winner was then confirmed
    assert len(timed) - 2 * (1 + candidates) in {2 * tune.CONFIRM_ROUNDS * k for k in range(3)}
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
        layout, config = configs.tuned(torch.float32, 64, 13, "forward", cuda)
        assert layout == "stepwise" and config.num_warps == 8
        assert dispatch.kernel_path(100, 64, torch.float32, 13, cuda, "forward") == "stepwise"
        assert dispatch.kernel_path(100, 64, torch.float32, 13, cuda, "backward") == "sequence"  # no entry
        assert configs.tuned(torch.float32, 64, 13, "forward", torch.device("cpu")) is None
    finally:
        configs._tuned_table.cache_clear()


def test_tuning_space_fits_the_shape():
    assert configs.gpu_slug("NVIDIA H100 80GB HBM3") == "H100"
    assert configs.gpu_slug("NVIDIA H200") == "H200"
    for path in configs.TUNED_LAYOUTS:
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


def test_profiler_failure_keeps_the_time(monkeypatch):
    real_init = providers.Run.__init__
    built = []

    def fails_second_time(self, *args, **kwargs):  # the profiling pass rebuilds the case: out of memory there
        built.append(1)
        if len(built) > 2:
            raise RuntimeError("out of memory (simulated)")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(providers.Run, "__init__", fails_second_time)
    results = bench.run([grid.smoke_grid()[0]], timer=lambda fn: measure.wall_timer(fn, reps=1),
                        providers=("torch-native",), modes=("inference",))
    (row,) = results["rows"]
    assert results["complete"] and row["status"] == "ok" and row["median_ms"] > 0
    assert row["kernels"] == ["profiler failed: RuntimeError: out of memory (simulated)"]


def test_tune_offers_only_configs_that_load_at_the_layers_precision():
    """fp32's sequence path cannot hold W_hh in shared memory at H = 200; bf16's can."""
    assert "sequence" not in {p for p, _ in tune.candidates(200, 16, torch.float32)}
    assert "sequence" in {p for p, _ in tune.candidates(200, 16, torch.bfloat16)}
    budget = configs.SHARED_MEMORY_BUDGET
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for path, config in tune.candidates(200, 16, dtype):
            assert configs.shared_memory_bytes(path, config, 200, dtype, True) <= budget, (path, config)


def test_report_renders_newest_grid_results_and_output_layer_results_in_their_own_section(tmp_path, capsys):
    """After `bench --output-layer`, the newest file in the folder is the output layer's: report still takes
    the newest grid results, and renders the output layer's beside them (time and peak memory against torch's,
    a plot). Files written before output-layer files said their kind are recognised by their rows."""
    from tritonrnn.perf import output_layer

    results_dir = tmp_path / "results"
    results_dir.mkdir()
    shutil.copy(FIXTURE, results_dir / "20250101T000000-FIXTURE-quick.json")  # older grid results
    shutil.copy(FIXTURE, results_dir / "20260101T000000-FIXTURE-quick.json")
    assert cli.main(["bench", "--output-layer", "64", "--vocab", "300", "--hidden", "8", "--dtypes", "float32",
                     "--out-dir", str(results_dir)]) == 0
    (layer,) = results_dir.glob("output_layer-*.json")
    legacy = json.loads(layer.read_text())
    del legacy["kind"]
    (results_dir / "output_layer-cpu-20200101-000000.json").write_text(json.dumps(legacy))  # older, no kind
    assert output_layer.is_results_file(results_dir / "output_layer-cpu-20200101-000000.json")
    capsys.readouterr()
    out_dir = tmp_path / "report"
    assert cli.main(["report", "--results-dir", str(results_dir), "--out-dir", str(out_dir), "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"rendered {out_dir / 'REPORT.md'} from "
                                   f"{results_dir / '20260101T000000-FIXTURE-quick.json'}, {layer}")
    assert "float32   training  3 compared" in out
    assert "output layer output-N64-V300-H8: " in out and " ms vs torch " in out and " MiB vs " in out
    text = (out_dir / "REPORT.md").read_text()
    assert "## Summary (8 B x H grid cells" in text
    section = text[text.index("## Output layer"):]
    assert ("**A CPU run (Triton's interpreter)" in section) != ON_GPU
    assert re.search(r"\| output-N64-V300-H8 \| float32 \| 64 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|"
                     r" [\d.]+ \|", section), section
    assert "![Output layer](plots/output_layer.png)" in section
    assert (out_dir / "plots" / "output_layer.png").stat().st_size > 5000
    # Output-layer results alone, given as --results: their section, no grid report.
    assert cli.main(["report", "--results", str(layer), "--out-dir", str(out_dir), "--no-bench"]) == 0
    text = (out_dir / "REPORT.md").read_text()
    assert "## Output layer" in text and "## Summary" not in text


@pytest.mark.skipif(ON_GPU, reason="a CPU run's report")
def test_report_of_a_cpu_run_says_only_what_happened(monkeypatch, tmp_path):
    """The smoke run's report (CPU, no cuDNN): no heatmap title claims a cuDNN fallback that did not happen,
    no title reads B=None, and the red banner fits inside every figure."""
    rows = bench.run([grid.smoke_grid()[0]], timer=measure.wall_timer, profile=False, providers=["tritonrnn", "cudnn"],
                     modes=["inference"])["rows"]
    assert {r["status"] for r in rows if r["provider"] == "cudnn"} == {"unavailable"}
    figures = []
    save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path, note=None: figures.append(fig) or save(fig, path, note))
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # keep the figures to read them
    report.render(rows, [], tmp_path, ([], []))
    assert len(figures) == 4
    for fig in figures:
        fig.canvas.draw()
        box = fig._suptitle.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width, fig._suptitle.get_text()
        titles = [ax.get_title() for ax in fig.axes]
        assert not any("fell back" in t or "None" in t for t in titles), titles
    plt.close("all")


def test_prediction_plot_has_a_colour_bar_a_layout_legend_and_no_repeated_panels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tritonrnn.perf import plan

    rows = plan.grid_plan("h100")
    fig = plan.predicted_speedup_figure(rows)
    heatmaps = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if "predicted speedup" in ax.get_ylabel()]
    assert len(bars) == 1 and [t.get_text() for t in bars[0].get_yticklabels()] == ["0.25x", "0.5x", "1x", "2x", "4x"]
    assert "seq = sequence, pers = persistent, clus = cluster, step = stepwise" in fig._suptitle.get_text()
    # Every backward prediction equals its forward one here: one panel per dtype says so, none repeats another.
    assert len(heatmaps) == 3
    assert all("forward and backward (the same predictions)" in ax.get_title() for ax in heatmaps)
    plt.close(fig)
    changed = [dict(r, predicted_speedup=r["predicted_speedup"] * 2, predicted_us=r["predicted_us"] / 2)
               if r["direction"] == "backward" and r["hidden"] == 128 else r for r in rows]
    fig = plan.predicted_speedup_figure(changed)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert len(titles) == 6 and sum("backward" in t for t in titles) == 3
    plt.close(fig)


# The commands' handlers (perf's `command` functions, which the CLI shows) and what they are made of.

def test_columns_align_the_header_and_rows_alike():
    from tritonrnn.perf.table import Columns

    columns = Columns(("case", "<6"), ("ms", ">7"), rest="status", gap="  ")
    assert columns.header() == "case        ms  status"
    assert columns.line("a", "1.500", "ok") == "a        1.500  ok"
    assert columns.line("toolongcase", 3) == "toolongcase       3"  # a long cell is kept whole; no free column
    assert Columns(("key", "<4")).header() == "key "
    with pytest.raises(ValueError, match="3 cells for 1 columns"):
        Columns(("key", "<4")).line("a", "b", "c")


def test_output_layer_and_privacy_tables_share_one_layout():
    from tritonrnn.perf import output_layer, privacy

    row = {"case": "output-N8-V4-H2", "provider": "tritonrnn", "mode": "ghost", "median_ms": 1.5,
           "peak_memory_bytes": 3 * 2 ** 19, "loss": 2.0, "status": "ok", "error": None, "backend": "triton"}
    failed = dict(row, median_ms=None, peak_memory_bytes=None, loss=None, status="error", error="RuntimeError: oom")
    assert output_layer.format_rows([row, failed]).splitlines() == [
        "case                         provider    median ms   peak MiB     loss  status",
        "output-N8-V4-H2              tritonrnn       1.500        1.5   2.0000  ok",
        "output-N8-V4-H2              tritonrnn           -          -        -  error: RuntimeError: oom"]
    assert privacy.format_rows([row]).splitlines() == [
        "case                         mode          median ms   peak MiB     loss  status",
        "output-N8-V4-H2              ghost             1.500       1.50   2.0000  ok"]


def test_tune_result_lines():
    result = {"key": "float32-H256-B16-forward", "default_ms": 1.23456, "written": True,
              "best": {"time_ms": 0.98765, "path": "persistent", "config": {"BLOCK_B": 16}}}
    assert tune.result_line(result) == ("float32-H256-B16-forward         default 1.235 ms, best 0.988 ms "
                                        "persistent {'BLOCK_B': 16} -> written")
    assert tune.result_line(dict(result, written=False)).endswith("-> default kept")
    assert tune.result_line(dict(result, best=None)) == "float32-H256-B16-forward         no candidate ran"


def test_tune_command_needs_a_gpu_before_reading_its_shapes(monkeypatch):
    from tritonrnn.perf import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        tune.command("standard", ["not-a-shape"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UsageError, match="bad shape 'not-a-shape'"):
        tune.command("standard", ["not-a-shape"])


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


def test_results_sources_newest_of_each_kind_cpu_runs_skipped(tmp_path):
    """The newest by the time stamp in the name (bench's 20260101T000000-..., the output layer's
    ...-20260101-000000), whatever the files' ages on disk; CPU runs skipped only when asked to."""
    from tritonrnn.perf import sources

    gpu = json.loads(FIXTURE.read_text())
    cpu = dict(gpu, rows=[dict(r, gpu="cpu (x86_64)") for r in gpu["rows"]])
    layer = {"kind": "output-layer", "rows": [{"device": "NVIDIA H100"}]}
    files = {"20250101T000000-H100-quick.json": gpu, "20260101T000000-H100-quick.json": gpu,
             "20270101T000000-cpu-smoke.json": cpu, "output_layer-H100-20240101-000000.json": layer,
             "output_layer-H100-20230101-000000.json": layer}
    for name, data in reversed(files.items()):  # written newest name first: the names decide, not the times
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "notes.txt").write_text("not a results file")
    assert sources.stamp(tmp_path / "output_layer-H100-20240101-000000.json") == \
        ("20240101000000", "output_layer-H100-20240101-000000.json")
    assert sources.is_cpu_run(tmp_path / "20270101T000000-cpu-smoke.json")
    assert not sources.is_cpu_run(tmp_path / "20260101T000000-H100-quick.json")
    assert not sources.is_cpu_run(tmp_path / "notes.txt")
    grid_file, layer_file, skipped = sources.newest([tmp_path], skip_cpu=True)
    assert grid_file == [tmp_path / "20260101T000000-H100-quick.json"]
    assert layer_file == [tmp_path / "output_layer-H100-20240101-000000.json"]
    assert skipped == [tmp_path / "20270101T000000-cpu-smoke.json"]
    assert sources.skipped_text(skipped).startswith(
        f"skipped 1 CPU run(s), not measurements (the newest: {skipped[0]})")
    assert sources.newest([tmp_path], skip_cpu=False)[0] == [tmp_path / "20270101T000000-cpu-smoke.json"]
    assert sources.newest([tmp_path / "missing"], skip_cpu=True) == ([], [], [])
    assert sources.folders(tmp_path) == [tmp_path]


def test_results_sources_refuse_paths_of_the_wrong_kind(tmp_path):
    from tritonrnn.perf import UsageError, sources

    sources.check_paths([FIXTURE], tmp_path)
    sources.check_paths([FIXTURE], tmp_path / "missing")  # files given: a missing folder is not needed
    for files, folder, message in (([tmp_path], None, "is a folder: --results takes files"),
                                   ([tmp_path / "x.json"], None, "x.json does not exist"),
                                   ((), FIXTURE, "is a file: --results-dir takes a folder"),
                                   ((), tmp_path / "missing", "missing does not exist")):
        with pytest.raises(UsageError, match=message):
            sources.check_paths(files, folder)


def test_report_command_returns_what_it_rendered(tmp_path):
    outcome = report.command([FIXTURE], out_dir=tmp_path, measure_first=False)
    assert outcome.ok and not outcome.errors
    assert outcome.lines[:2] == [f"rendered {tmp_path / 'REPORT.md'} from {FIXTURE}",
                                 "  SYNTHETIC ROWS (A TEST FIXTURE), NOT A MEASUREMENT"]
    assert len(outcome.lines) == 2 + 4 and (tmp_path / "REPORT.md").exists()  # 2 dtypes x 2 modes
    empty = tmp_path / "empty"
    empty.mkdir()
    outcome = report.command(results_dir=empty, out_dir=tmp_path, measure_first=False)
    assert outcome.lines[0].startswith(f"No results to render in {empty}.")
    assert outcome.lines[1].startswith(f"rendered {tmp_path / 'PREDICTION.md'}: a PREDICTION")
