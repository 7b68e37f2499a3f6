"""The plan as a range (issue 26 item 1): every constant of the cost model with a baseline, a pessimistic
value and a source (costmodel.CONSTANTS, Hardware.pessimistic), the offline plan's rows with both
predictions and a verdict, the constants object of `info --offline --json`, and the range in the text,
the markdown and PREDICTION.md."""
import dataclasses
import json
import math

import pytest
import triton

from conftest import calibration
from tritonrnn import cli, costmodel
from tritonrnn.perf import plan

H100 = costmodel.OFFLINE_GPUS["h100"]
WORST = H100.pessimistic()

# The issue's bounds: each pessimistic value at least this adverse.
ISSUE_BOUNDS = {"launch_ns": (">=", 10000), "counter_barrier_ns": (">=", 1500), "cluster_barrier_ns": (">=", 1000),
                "l2_latency_ns": (">=", 600), "wgmma_efficiency": ("<=", 0.35), "mma_sync_efficiency": ("<=", 0.25),
                "cudnn_small_h_fp32_us": ("<=", 0.56), "cudnn_small_h_16bit_us": ("<=", 0.45),
                "cudnn_standard_floor_fp32_us": ("<=", 6.1), "cudnn_standard_floor_16bit_us": ("<=", 6.1)}
# Hardware's fields that are not costs: names, the chip's limits (what fits), calibration bookkeeping.
NOT_CHARGED = {"name", "target", "limits", "calibrated", "layout_scale", "measured"}
NEW_KEYS = ("path_pessimistic", "config_pessimistic", "predicted_us_pessimistic", "cudnn_predicted_us_pessimistic",
            "predicted_speedup_pessimistic", "verdict")


@pytest.fixture(scope="module")
def rows():
    return plan.grid_plan("h100")


def test_every_constant_has_a_baseline_a_pessimistic_value_and_a_source():
    table = H100.constants()
    assert set(table) == set(costmodel.CONSTANTS) and set(ISSUE_BOUNDS) <= set(table)
    for name, c in table.items():
        assert set(c) == {"baseline", "pessimistic", "source"}, name
        assert math.isfinite(c["baseline"]) and math.isfinite(c["pessimistic"]) and len(c["source"]) > 20, name
    # Every field the model charges is named by a constant (a new one needs its two values and source).
    charged = {f.name for f in dataclasses.fields(costmodel.Hardware)} - NOT_CHARGED
    assert charged == {c.field for c in costmodel.CONSTANTS.values()}
    assert "no source" in table["epilogue_ns"]["source"]  # unsourced, and it says so


def test_each_pessimistic_value_is_at_least_as_adverse_as_the_issues_bound():
    table = H100.constants()
    for name, (op, bound) in ISSUE_BOUNDS.items():
        value = table[name]["pessimistic"]
        assert (value >= bound if op == ">=" else value <= bound), (name, value, bound)
    for name, c in costmodel.CONSTANTS.items():  # and never in our favour against the baseline, as declared
        for base, worst in ((table[name]["baseline"], table[name]["pessimistic"]), (c.baseline, c.pessimistic)):
            if base is not None:  # a derived constant declares neither
                assert (worst >= base if c.worse == "higher" else worst <= base), name
    # The cluster barrier's baseline: at least the L2 latency plus a handshake, in either set.
    for hw in (H100, WORST):
        assert hw.cluster_barrier() == hw.l2_latency_ns + hw.cluster_handshake_ns and hw.cluster_handshake_ns > 0
    assert table["cudnn_small_h_fp32_us"]["pessimistic"] == pytest.approx(0.78 * 1.41 / 1.98, abs=1e-6)


# The baseline constants as they were before the pessimistic set (Hardware's defaults), and five standard-grid
# rows of the plan as shipped (perf/NOTES.md v0.7.1: the streamed layout, the warp layout's operand reads).
OLD_DEFAULTS = {"clock_ghz": 1.98, "mma_sync_efficiency": 0.5, "wgmma_efficiency": 0.7, "mma_latency_cycles": 33.0,
                "shared_bytes_per_cycle": 128.0, "l2_bytes_per_cycle_per_sm": 64.0, "l2_total_bytes_per_ns": 5500.0,
                "l2_latency_ns": 300.0, "barrier_ns": 1000.0, "cluster_barrier_ns": None, "launch_ns": 8000.0,
                "epilogue_ns": 100.0, "cudnn_lstm768_ns": 1960.0, "cudnn_boundaries_ns": 2000.0,
                "peak_tflops": (("bfloat16", 989.0), ("float16", 989.0), ("float32", 495.0), ("float64", 67.0)),
                "cudnn_small_h_ns": (("float32", 780.0), ("bfloat16", 620.0), ("float16", 620.0)),
                "cudnn_standard_floor_ns": (("float32", 8960.0), ("bfloat16", 7900.0), ("float16", 7900.0))}
KNOWN = [(("float32", 1, 128, "forward"), "sequence", 0.8, "PERSIST_STATIC_SMALL_H", 0.78, 0.975),
         (("bfloat16", 16, 256, "forward"), "cluster", 1.253, "PERSIST_STATIC_SMALL_H", 0.623, 0.497),
         (("float16", 64, 1024, "forward"), "streamed", 2.949, "PERSIST_STATIC", 1.065, 0.361),
         (("float32", 256, 2048, "backward"), "stepwise", 21.278, "STANDARD", 8.96, 0.421),
         (("bfloat16", 64, 512, "forward"), "cluster", 1.582, "STANDARD", 7.9, 4.992)]


def test_the_baseline_plan_is_unchanged(rows):
    assert {name: getattr(H100, name) for name in OLD_DEFAULTS} == OLD_DEFAULTS
    assert H100.cluster_barrier() == 500.0 and H100.cudnn_gemm_efficiency == H100.wgmma_efficiency
    index = {(r["dtype"], r["batch"], r["hidden"], r["direction"]): r for r in rows}
    for key, path, ours, algorithm, theirs, speedup in KNOWN:
        r = index[key]
        got = (r["path"], r["predicted_us"], r["cudnn_algorithm"], r["cudnn_predicted_us"], r["predicted_speedup"])
        assert got == (path, ours, algorithm, theirs, speedup), key
    assert sum(r["predicted_speedup"] >= 1.0 for r in rows) == 76  # the plan as shipped (perf/NOTES.md v0.7.1)


def test_the_pessimistic_set_never_speeds_us_up_nor_slows_cudnn_down(rows):
    for r in rows:
        assert r["predicted_us_pessimistic"] >= r["predicted_us"], r
        assert r["cudnn_predicted_us_pessimistic"] <= r["cudnn_predicted_us"], r
        assert r["predicted_speedup_pessimistic"] <= r["predicted_speedup"], r
    # Candidate by candidate, not only the chosen ones.
    for dtype, batch, hidden in (("float32", 16, 256), ("bfloat16", 64, 1024), ("float16", 1, 2048),
                                 ("bfloat16", 256, 128)):
        shape = costmodel.Shape(512, batch, hidden, dtype)
        for c in costmodel.candidates(shape, H100):
            if c.fits:
                assert costmodel.predict(shape, WORST, c.layout, c.config).step_ns >= c.step_ns, (shape, c.layout)
    # A value already worse than the pessimistic one stays: the pessimistic set never improves one.
    slow = dataclasses.replace(H100, launch_ns=20000.0, wgmma_efficiency=0.3)
    assert (slow.pessimistic().launch_ns, slow.pessimistic().wgmma_efficiency) == (20000.0, 0.3)


def test_the_pessimistic_layout_is_the_one_chosen_under_the_pessimistic_set(rows):
    for r in rows[::7]:
        shape = costmodel.Shape(r["seq_len"], r["batch"], r["hidden"], r["dtype"], r["direction"])
        chosen = costmodel.choose(shape, WORST)
        assert (r["path_pessimistic"], r["config_pessimistic"]) == (chosen.layout, chosen.config)
        assert r["predicted_us_pessimistic"] == round(chosen.step_us, 3)
    moved = [r for r in rows if r["path_pessimistic"] != r["path"]]
    assert moved and all(f"[pessimistic: {r['path_pessimistic']} (" in plan.text([r]) for r in moved)


@pytest.mark.parametrize("speedup, worst, expected", [
    (3.0, 1.0, "win"), (1.0, 1.0, "win"), (3.0, 0.999, "likely"), (1.25, 0.9, "likely"), (1.249, 0.9, "tie"),
    (1.0, 0.5, "tie"), (0.8, 0.5, "tie"), (0.799, 0.5, "loss"), (0.2, 0.1, "loss")])
def test_verdict_at_its_boundaries(speedup, worst, expected):
    assert costmodel.verdict(speedup, worst) == expected


def test_every_row_carries_its_verdict_and_the_headline_counts_them(rows):
    assert all(r["verdict"] == costmodel.verdict(r["predicted_speedup"], r["predicted_speedup_pessimistic"])
               for r in rows)
    head = plan.headline(rows)
    assert sum(head["verdicts"].values()) == len(rows) == 120
    assert head["verdicts"]["win"] == head["winning_pessimistic"] == sum(r["predicted_speedup_pessimistic"] >= 1
                                                                         for r in rows)
    assert len(head["short_of_a_win"]) == 120 - head["verdicts"]["win"]
    assert plan.verdicts_text(head).startswith(f"verdicts of 120 cell-directions: {head['verdicts']['win']} win (")


def test_info_offline_json_has_the_range_and_the_constants_object(capsys):
    assert cli.main(["info", "--offline", "h100", "--hidden-size", "256", "--batch", "16", "--dtype", "bfloat16",
                     "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = json.loads(lines[0])
    assert head["triton"] == triton.__version__ and head["gpu"] == "H100"
    assert head["constants"] == json.loads(json.dumps(H100.constants()))
    basis, rows = plan.read_json(lines)
    assert basis == head and [r["direction"] for r in rows] == ["forward", "backward"]
    for r in rows:
        assert set(plan.JSON_KEYS) <= set(r) and set(NEW_KEYS) <= set(r)
        assert r["predicted_speedup_pessimistic"] == pytest.approx(
            r["cudnn_predicted_us_pessimistic"] / r["predicted_us_pessimistic"], rel=2e-3, abs=1e-3)  # 3 decimals


def test_text_and_markdown_show_the_range(rows, capsys):
    r = rows[0]
    line = plan.text([r]).splitlines()[0]
    assert (f"{r['predicted_us']:.2f} .. {r['predicted_us_pessimistic']:.2f} us a step" in line
            and f"{r['cudnn_predicted_us']:.2f} .. {r['cudnn_predicted_us_pessimistic']:.2f} us" in line
            and line.endswith(f"{r['predicted_speedup']:.2f}x .. {r['predicted_speedup_pessimistic']:.2f}x: "
                              f"{r['verdict']}"))
    table = plan.markdown_table(rows).splitlines()
    assert table[0].endswith("| verdict fwd / bwd |") and len(table) == 2 + 60
    for line in table[2:]:
        cells = line.split(" | ")
        assert " .. " in cells[4] and " .. " in cells[6] and " .. " in cells[8] and cells[9].count(" .. ") == 2
        assert cells[10].rstrip(" |").split(" / ")[0] in costmodel.VERDICTS
    assert cli.main(["info", "--offline", "h100", "--grid", "standard", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("each step and speedup: baseline .. pessimistic constants")
    assert out[-2].startswith("verdicts of 40 cell-directions: ")


def test_prediction_shows_the_range_and_the_verdicts(rows, tmp_path):
    text = plan.render_prediction(rows, tmp_path).read_text()
    head = plan.headline(rows)
    assert plan.verdicts_text(head).capitalize() in text
    assert f"{head['winning']} of 120 cell-directions under the baseline constants, {head['winning_pessimistic']} " \
           f"under the pessimistic set" in text
    assert "| `launch_ns` | 8000 | 10000 | host cost of one Triton launch" in text
    assert f"## The constants (Triton {triton.__version__} installed" in text
    loss = next(r for r in rows if r["verdict"] == "loss")
    assert (f"- {loss['dtype']} H={loss['hidden']} B={loss['batch']} {loss['direction']}: loss, "
            f"{loss['predicted_speedup']:.2f}x .. {loss['predicted_speedup_pessimistic']:.2f}x") in text


def test_report_prediction_says_the_range_and_the_verdicts(tmp_path, capsys):
    assert cli.main(["report", "--prediction", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "under the pessimistic set" in out and "verdicts of 120 cell-directions: " in out
    assert " .. " in (tmp_path / "PREDICTION.md").read_text()


def test_a_measured_constant_is_its_own_pessimistic_value(calibration_dir):
    (calibration_dir / "H100.json").write_text(json.dumps(calibration(
        {"counter_barrier_ns": 700, "launch_ns": 5000, "cudnn_small_h_ns": {"float32": 900.0}})))
    hw = costmodel.offline_hardware("h100")
    worst = hw.pessimistic()
    assert hw.barrier_ns == worst.barrier_ns == 700.0 and hw.launch_ns == worst.launch_ns == 5000.0
    assert worst.cudnn_small_h_ns == hw.cudnn_small_h_ns == (("float32", 900.0),)
    assert worst.l2_latency_ns == 600.0 and worst.wgmma_efficiency == 0.35  # not measured: pessimistic
    table = hw.constants()
    assert table["counter_barrier_ns"]["baseline"] == table["counter_barrier_ns"]["pessimistic"] == 700.0
    assert table["launch_ns"]["source"].startswith("measured by this GPU's calibration file")
    assert not table["l2_latency_ns"]["source"].startswith("measured")
    (calibration_dir / "H100.json").write_text(json.dumps(calibration({"counter_barrier_ns": 700, "barrier_ns": 800})))
    with pytest.raises(ValueError, match="one constant under two names: counter_barrier_ns and barrier_ns"):
        costmodel.read_calibration(calibration_dir / "H100.json")
