"""The cost model the dispatcher runs (tritonrnn/costmodel.py), its offline plan (`tritonrnn info
--offline`, the prediction `tritonrnn report` renders without results), its resource table and its
calibration file."""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from conftest import DEVICE, ON_GPU, assert_close, calibration
from tritonrnn import cli, costmodel, dispatch, kernels, reference
from tritonrnn.kernels import configs
from tritonrnn.perf import calibrate, plan

H100 = costmodel.OFFLINE_GPUS["h100"]
ROOT = Path(__file__).resolve().parents[2]


def _shape(batch, hidden, dtype="bfloat16", direction="forward", seq_len=512):
    return costmodel.Shape(seq_len, batch, hidden, dtype, direction)




def test_every_standard_cell_gets_a_layout_that_fits():
    """The chosen candidate fits (no spill, within the shared-memory budget, a persistent plan within
    the resident capacity) and is the fastest that fits; candidates that do not fit say why."""
    for row in plan.grid_plan("h100"):
        fitting = [c for c in row["candidates"] if c["fits"]]
        assert fitting and row["path"] == fitting[0]["layout"] and row["config"] == fitting[0]["config"]
        assert row["predicted_us"] == min(c["predicted_us"] for c in fitting)
        assert all(c["why"] for c in row["candidates"] if not c["fits"])


def test_a_layout_that_does_not_fit_is_never_chosen():
    """A GPU whose SMs hold 64 KB of shared memory: the sequence layout (147 KB at bf16 H=256) and the
    persistent configs beyond it lose their place; a spilling variant is never taken either."""
    shape = _shape(64, 256)
    assert costmodel.choose(shape, H100, exclude=("cluster",)).layout == "sequence"
    small = dataclasses.replace(H100, limits=dataclasses.replace(H100.limits, shared_bytes=64 * 1024))
    chosen = costmodel.choose(shape, small, exclude=("cluster",))
    assert chosen.layout == "persistent"
    assert dict(chosen.resources)["shared_bytes"] + 1024 <= 64 * 1024
    config = configs.default_config("sequence", 16, 256)
    res = costmodel.resources("sequence", "bfloat16", 256, "forward", config)
    spilling = costmodel.predict(shape, H100, "sequence", config, dict(res, stack_bytes=8))
    assert not spilling.fits and "spills" in spilling.why


def test_the_model_is_cached_per_shape_and_never_compiles(monkeypatch):
    from tritonrnn.perf import static

    monkeypatch.setattr(static, "compile_kernel", None)  # any compile would fail
    costmodel._choose.cache_clear()
    shape = _shape(16, 1024)
    first = costmodel.choose(shape, H100)
    assert costmodel.choose(shape, H100) is first and costmodel._choose.cache_info().hits == 1


def test_persistent_cost_reads_config_keys_generically():
    """A config with keys the model does not know (the rebuilt kernel's) still gets a prediction; a
    larger batch tile is predicted faster at B = 256 (fewer tiles a step) when it fits."""
    shape = _shape(256, 1024)
    base = {"BLOCK_B": 16, "BLOCK_N": 32, "K_SPLIT": 1, "num_warps": 4, "num_stages": 1}
    res = {"registers": 128, "stack_bytes": 0, "shared_bytes": 100_000, "num_warps": 4, "mma": "mma.sync"}
    small = costmodel.predict(shape, H100, "persistent", base, res)
    extra = costmodel.predict(shape, H100, "persistent", dict(base, NEW_KNOB=3), res)
    assert small.fits and extra.step_ns == small.step_ns
    wide = costmodel.predict(shape, H100, "persistent", dict(base, BLOCK_B=64, BLOCK_N=64), dict(res, mma="wgmma"))
    assert wide.step_ns < small.step_ns


def test_cudnn_side_uses_the_published_figures():
    """PyTorch PR 62143's benchmark: small-H persistent 0.78 us fp32 / 0.62 fp16 (at H = 120, B = 34), STANDARD
    8.96 / 7.9; DeepBench's V100 STANDARD step at H = 2048, B = 16, scaled to an H100 by bandwidth,
    bounds the model's from above (the model does not make cuDNN slower than published)."""
    assert costmodel.cudnn_algorithm("float32", 16, 256) == "PERSIST_STATIC_SMALL_H"
    assert costmodel.cudnn_algorithm("float16", 64, 1024) == "PERSIST_STATIC"
    assert costmodel.cudnn_algorithm("bfloat16", 64, 1024) == "STANDARD"
    assert costmodel.cudnn_step_ns("float32", 34, 120, H100) == pytest.approx(780, rel=0.01)
    assert costmodel.cudnn_step_ns("float16", 34, 120, H100) == pytest.approx(620, rel=0.01)
    assert costmodel.cudnn_step_ns("float32", 16, 512, H100) == pytest.approx(8960)
    for dtype in ("float32", "float16"):
        bound = costmodel.DEEPBENCH_V100_NS[dtype] / costmodel.V100_TO_H100
        assert costmodel.cudnn_step_ns(dtype, 16, 2048, H100) <= bound


# The resource table: shipped, generated from candidate_configs (one source), matching a recompile.

def test_resource_table_covers_every_candidate():
    from tritonrnn.perf import resources

    table = costmodel.resource_table("sm_90")
    keys = {costmodel.resource_key(*v) for v in resources.variants()}
    assert keys == set(table), sorted(keys ^ set(table))[:5]


def test_sequence_h256_16bit_is_a_spill_free_candidate():
    """Issue 16 item 3a: H = 256 in 16-bit, one program per batch tile holding all of W_hh, no barrier:
    its default (BLOCK_B 16, 4 warps) compiles spill-free forward and backward, and the model weighs it."""
    table = costmodel.resource_table("sm_90")
    config = configs.default_config("sequence", 16, 256)
    for dtype in ("bfloat16", "float16"):
        for direction in ("forward", "backward"):
            entry = table[costmodel.resource_key("sequence", dtype, 256, direction, config)]
            assert entry["stack_bytes"] == 0 and entry["mma"] != "fma", entry
        assert any(c.layout == "sequence" and c.fits for c in costmodel.candidates(_shape(16, 256, dtype), H100))


@pytest.mark.skipif(ON_GPU, reason="the interpreter's fp16; on a GPU: the 16-bit kernels in test_kernels_gpu.py")
def test_sequence_path_at_h256_in_float16_matches_float64():
    """The H = 256 sequence layout (the model's choice for 16-bit H = 256) against the float64
    reference: forward (reverse, lengths) and backward, fp16 in the interpreter (one program, 3 steps)."""
    T, B, H = 3, 2, 256
    g = torch.Generator().manual_seed(16)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).half().double()
    xw, h0, w, go = rand(T, B, H), rand(B, H), rand(H, H, scale=1.5 / H ** 0.5), rand(T, B, H)
    lengths = torch.tensor([3, 2])
    assert dispatch.kernel_path(T, H, torch.float16, B) == "sequence"
    out, h_n = kernels.recurrence_forward(xw.half(), h0.half(), w.half(), lengths=lengths, reverse=True,
                                          layout="sequence")
    ref_out, ref_hn = reference.forward(xw, h0, torch.eye(H, dtype=torch.float64), w, lengths=lengths, reverse=True)
    assert_close(out, ref_out, torch.float16, "out")
    assert_close(h_n, ref_hn, torch.float16, "h_n")
    dz = kernels.recurrence_backward(go.half(), ref_out.half(), w.half(), layout="sequence")
    ref_dz, _, _ = reference.recurrence_backward(ref_out.half().double(), h0, w, go, torch.zeros_like(h0))
    assert_close(dz, ref_dz, torch.float16, "dz")


@pytest.mark.skipif(ON_GPU, reason="an offline compile check; the CPU machines run it")
def test_resource_table_matches_a_recompile():
    """A few entries compiled again (without the interpreter) give the shipped numbers."""
    from tritonrnn.perf import static

    if not static.available():
        pytest.skip("this triton has no bundled NVIDIA toolchain")
    if costmodel.resource_table_triton() != triton.__version__:  # CI runs this file's check under that release
        pytest.skip(f"the table was compiled by Triton {costmodel.resource_table_triton()}, this is {triton.__version__}")
    picks = [("sequence", "bfloat16", 256, "backward", configs.default_config("sequence", 16, 256)),
             ("persistent", "float32", 1024, "forward", configs.default_config("persistent", 16, 1024, torch.float32)),
             ("persistent", "bfloat16", 1024, "backward", costmodel.candidate_configs("persistent", 1024, "bfloat16")[-1])]
    script = ("import json, sys; from tritonrnn.perf import resources; from tritonrnn.kernels import configs as c; "
              "picks = json.loads(sys.argv[1]); "
              "print(json.dumps([resources.compile_entry(l, d, h, r, c.config_from_dict(k)) for l, d, h, r, k in picks]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([(layout, d, h, r, configs.config_to_dict(c)) for layout, d, h, r, c in picks])
    result = subprocess.run([sys.executable, "-c", script, args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = costmodel.resource_table("sm_90")
    for pick, compiled in zip(picks, json.loads(result.stdout)):
        assert table[costmodel.resource_key(*pick)] == compiled, pick


# The command line: info --offline, and report's prediction.

def _run(argv, capsys):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_info_offline_grid_json_has_every_cell_and_direction(capsys):
    _, rows = plan.read_json(_run(["info", "--offline", "h100", "--grid", "standard", "--json"], capsys).splitlines())
    assert len(rows) == 3 * 4 * 5 * 2
    assert all(set(plan.JSON_KEYS) <= set(r) for r in rows)
    assert {(r["dtype"], r["batch"], r["hidden"], r["direction"]) for r in rows} == {
        (d, b, h, direction) for d in ("float32", "bfloat16", "float16") for b in (1, 16, 64, 256)
        for h in (128, 256, 512, 1024, 2048) for direction in ("forward", "backward")}
    assert {r["path"] for r in rows} <= set(costmodel.LAYOUTS) and all(r["gpu"] == "H100" for r in rows)


def test_info_offline_shape_lists_every_candidate(capsys):
    out = _run(["info", "--offline", "H200", "--hidden-size", "1024", "--batch", "64", "--dtype", "bfloat16"], capsys)
    assert out.startswith("offline plan for H200")
    assert "bfloat16 T=512 B=64 H=1024 forward:" in out and "bfloat16 T=512 B=64 H=1024 backward:" in out
    assert "cuDNN STANDARD" in out and "stepwise" in out and "persistent" in out and "cluster" in out
    _, rows = plan.read_json(_run(["info", "--offline", "h200", "--hidden-size", "1024", "--batch", "64",
                                   "--dtype", "bfloat16", "--json"], capsys).splitlines())
    assert [r["direction"] for r in rows] == ["forward", "backward"] and rows[0]["hidden"] == 1024


def test_info_offline_needs_no_interpreter_and_no_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tritonrnn.cli", "info", "--offline", "h100", "--json"], env=env,
                            capture_output=True, text=True, cwd=ROOT, timeout=300)  # this checkout's tritonrnn
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 + 2  # the constants, then forward and backward


def test_info_offline_bad_gpu_and_stray_options_are_usage_errors(capsys):
    for argv, expected in ((["info", "--offline", "a100"], "unknown GPU 'a100': --offline knows h100, h200"),
                           (["info", "--grid", "standard"], "--grid and --json go with --offline GPU")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


def _offline(*argv) -> subprocess.CompletedProcess:
    """`python -m tritonrnn.cli info --offline ARGV` on this checkout, as a user's shell runs it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "tritonrnn.cli", "info", "--offline", *argv], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_info_offline_h200_says_why_it_predicts_the_h100s_numbers():
    result = _offline("h200", "--hidden-size", "1024", "--batch", "64", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "no term of a step reads HBM" in result.stdout.splitlines()[1]
    h100, h200 = plan.grid_plan("h100"), plan.grid_plan("h200")
    assert [dict(r, gpu=None) for r in h100] == [dict(r, gpu=None) for r in h200]  # what the note explains


def test_info_offline_single_step_says_only_the_step_kernel_runs(capsys):
    out = _run(["info", "--offline", "h100", "--seq-len", "1", "--hidden-size", "64", "--batch", "4"], capsys)
    (row, _) = plan.cells("h100", [(1, 4, 64, "float32")])
    assert row["path"] == "stepwise" and row["candidates"][0]["layout"] == "stepwise"
    others = [c for c in row["candidates"] if c["layout"] != "stepwise"]
    assert others and all(not c["fits"] and c["why"].startswith("T = 1: a single step runs the step kernel")
                          for c in others)
    assert "    sequence   B16 w4                   not taken: T = 1: a single step runs the step kernel" in out


def test_info_offline_grid_standard_honours_shape_options():
    result = _offline("h100", "--grid", "standard", "--dtype", "bfloat16", "--hidden-size", "1024", "--json")
    assert result.returncode == 0, result.stderr
    _, rows = plan.read_json(result.stdout.splitlines())
    assert len(rows) == 4 * 2 and {(r["dtype"], r["hidden"]) for r in rows} == {("bfloat16", 1024)}
    result = _offline("h100", "--grid", "standard", "--batch", "8")
    assert result.returncode == 2 and result.stderr.strip() == (
        "tritonrnn info: error: --batch 8 is not in the standard grid (1, 16, 64, 256); drop --grid standard for "
        "one shape")


@pytest.mark.parametrize("scale", [1.0, 1.3], ids=["uncalibrated", "calibrated"])
def test_every_candidates_terms_add_up_to_its_prediction(scale):
    hw = dataclasses.replace(H100, layout_scale=tuple((layout, scale) for layout in costmodel.LAYOUTS))
    shapes = [_shape(b, h, d, direction) for d in ("float32", "bfloat16") for b in (1, 64, 256)
              for h in (128, 1024, 4096) for direction in ("forward", "backward")]
    seen = set()
    for shape in shapes:
        for c in costmodel.plan_cell(shape, hw)["candidates"]:
            if c["fits"]:
                seen.add(c["layout"])
                assert sum(c["terms_us"].values()) == pytest.approx(c["predicted_us"], abs=2e-3 * len(c["terms_us"]))
    assert seen == set(costmodel.LAYOUTS)


def test_headline_counts_cells_in_both_directions(capsys):
    rows = plan.grid_plan("h100")
    out = _run(["info", "--offline", "h100", "--grid", "standard"], capsys).splitlines()[-1]  # after the verdicts
    cells = {(r["dtype"], r["batch"], r["hidden"]) for r in rows}
    keys = ("predicted_speedup", "predicted_speedup_pessimistic")
    both = [sum(all(r[key] >= 1 for r in rows if (r["dtype"], r["batch"], r["hidden"]) == cell) for cell in cells)
            for key in keys]
    winning = [sum(r[key] >= 1 for r in rows) for key in keys]
    predicted = ("predicted_us", "predicted_us_pessimistic", "cudnn_predicted_us", "cudnn_predicted_us_pessimistic")
    differing = sum(len({tuple(r[key] for key in predicted) for r in rows if (r["dtype"], r["batch"], r["hidden"]) ==
                         cell}) > 1 for cell in cells)
    assert 0 < differing < 60  # the backward reads two input tiles a step, the forward one; compiled resources differ
    assert out == (f"predicted speedup >= 1.0 in {winning[0]} of 120 cell-directions under the baseline constants, "
                   f"{winning[1]} under the pessimistic set (60 cells x forward/backward; {both[0]} and {both[1]} of "
                   f"60 cells in both directions; each cell's backward step is predicted on its own, differing from "
                   f"its forward step in {differing} cells)")


def test_report_without_results_renders_the_prediction(tmp_path, capsys):
    out = _run(["report", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path), "--no-bench"], capsys)
    assert "No results to render" in out and "a PREDICTION" in out
    text = (tmp_path / "PREDICTION.md").read_text()
    assert text.startswith("# tritonrnn: PREDICTED performance (no GPU measured this)")
    assert (tmp_path / "plots" / "predicted_speedup.png").stat().st_size > 0
    assert not (tmp_path / "REPORT.md").exists()  # REPORT.md is for measurements only


# Calibration: the file's format from measured numbers (anywhere), the measurement itself on a GPU only.

def _measured():
    cells = []
    for dtype in calibrate.DTYPES:
        for hidden in calibrate.HIDDENS:
            for batch in calibrate.BATCHES:
                for layout in calibrate._layouts(dtype, hidden) + ["cudnn"]:
                    cells.append({"layout": layout, "dtype": dtype, "hidden": hidden, "batch": batch,
                                  "measured_ns": 3000.0 if layout != "stepwise" else 6000.0 + hidden})
    return {"gpu": "NVIDIA H100 80GB HBM3", "barrier_ns": 700.0, "round_trip_ns": 1100.0, "cluster_barrier_ns": 250.0,
            "cells": cells}


def test_calibration_document_from_measured_numbers(calibration_dir):
    document = calibrate.calibration_document(_measured())
    assert document["slug"] == "H100" and document["constants"]["barrier_ns"] == 700.0
    assert document["constants"]["l2_latency_ns"] == 400.0 and document["constants"]["launch_ns"] == 6256.0
    assert document["constants"]["cudnn_standard_floor_ns"]["bfloat16"] == 3000.0
    assert document["constants"]["cluster_barrier_ns"] == 250.0
    assert set(document["layout_scale"]) == {"sequence", "persistent", "cluster"}
    # Calibrated predictions of the measured cells: the scale makes their median ratio 1.
    for layout in ("sequence", "persistent", "cluster"):
        ratios = [c["measured_ns"] / c["predicted_calibrated_ns"] for c in document["cells"] if c["layout"] == layout]
        assert statistics.median(ratios) == pytest.approx(1.0, rel=1e-6)
    path = calibration_dir / "H100.json"
    path.write_text(json.dumps(document))
    hw = costmodel.offline_hardware("h100")
    assert hw.calibrated and hw.barrier_ns == 700.0 and hw.cluster_barrier_ns == 250.0
    assert hw.scale("persistent") == document["layout_scale"]["persistent"]
    assert "barrier 700 ns" in calibrate.table(document) and len(calibrate.table(document).splitlines()) == 2 + len(
        document["cells"])
    path.write_text(json.dumps({"schema": 1, "constants": {"warp_speed": 1}}))
    with pytest.raises(ValueError, match="unknown constants"):
        costmodel.read_calibration(path)


@pytest.mark.skipif(ON_GPU, reason="the refusal without a GPU")
def test_calibrate_refuses_without_a_gpu(tmp_path, capsys):
    assert calibrate.main([str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.gpu
def test_calibration_barrier_measures_on_a_gpu():
    ns = calibrate.measure_barrier(DEVICE, round_trip=False)
    assert 0 < ns < 50_000


# The cluster layout (issue 17): the persistent kernel's groups as thread-block clusters.

def test_cluster_layout_is_taken_where_predicted_fastest_and_it_fits(calibration_dir):
    """bf16 H = 512, B = 16: clusters of 16 CTAs (32 columns each) predicted fastest, the same step as
    the persistent layout's but for the barrier (the L2 latency plus a handshake, 500 ns, assumed against
    1 us); no cluster where it would need more than 16 CTAs (H = 2048) or in exact fp32; a calibrated
    slow cluster barrier gives the choice back to the persistent layout."""
    shape = _shape(16, 512)
    chosen = costmodel.choose(shape, H100)
    assert chosen.layout == "cluster" and dict(chosen.terms)["barrier"] == H100.cluster_barrier() == 500
    assert dict(chosen.plan)["programs_per_group"] in (2, 3, 4, 5, 6, 7, 8, 16) and dict(chosen.plan)["cluster"]
    same = costmodel.predict(shape, H100, "persistent", chosen.config)
    assert same.step_ns - chosen.step_ns == pytest.approx(H100.barrier_ns - H100.cluster_barrier())
    assert not [c for c in costmodel.candidates(_shape(16, 2048), H100) if c.layout == "cluster"]
    exact = costmodel.Shape(512, 16, 256, "float32", allow_tf32=False)
    assert not [c for c in costmodel.candidates(exact, H100) if c.layout == "cluster"]
    (calibration_dir / "H100.json").write_text(json.dumps(calibration({"cluster_barrier_ns": 2000})))
    costmodel._calibration_for.cache_clear()
    assert costmodel.choose(shape, costmodel.offline_hardware("h100")).layout == "persistent"


def test_unmeasured_cluster_barrier_costs_the_l2_latency_plus_a_handshake():
    """Until a GPU measured it, the cluster barrier is charged at least the L2 latency (the release waits
    for the CTA's stores to reach L2) plus the arrive/wait handshake: with the model's L2 latency, or a
    calibrated one; a measured barrier is charged as measured."""
    handshake = costmodel.ASSUMED_CLUSTER_HANDSHAKE_NS
    assert H100.cluster_barrier() == H100.l2_latency_ns + handshake == 500 and handshake > 0
    slow_l2 = dataclasses.replace(H100, l2_latency_ns=800.0)
    assert slow_l2.cluster_barrier() == 800.0 + handshake
    chosen = costmodel.predict(_shape(16, 512), slow_l2, "cluster", costmodel.choose(_shape(16, 512), H100).config)
    assert dict(chosen.terms)["barrier"] == 1000.0
    assert dataclasses.replace(H100, cluster_barrier_ns=250.0).cluster_barrier() == 250.0
