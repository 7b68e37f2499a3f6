"""The report from a committed fixture and from runs (perf/report.py): its text, plots and summary numbers,
the newest results it renders, the output layer's section, the prediction's plot; the results files it
reads (perf/sources.py)."""
import json
import re
import shutil

import pytest

from conftest import ON_GPU
from conftest import RESULTS_FIXTURE as FIXTURE
from tritonrnn import cli
from tritonrnn.perf import bench, grid, measure, report


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

    # Every backward prediction set equal to its forward one: one panel per dtype says so, none repeats another.
    rows = plan.grid_plan("h100")
    forward = {(r["dtype"], r["batch"], r["hidden"]): r for r in rows if r["direction"] == "forward"}
    rows = [dict(forward[(r["dtype"], r["batch"], r["hidden"])], direction=r["direction"]) for r in rows]
    fig = plan.predicted_speedup_figure(rows)
    heatmaps = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if "predicted speedup" in ax.get_ylabel()]
    assert len(bars) == 1 and [t.get_text() for t in bars[0].get_yticklabels()] == ["0.25x", "0.5x", "1x", "2x", "4x"]
    legend = "seq = sequence, pers = persistent, clus = cluster, strm = streamed, step = stepwise"
    assert legend in fig._suptitle.get_text()
    assert len(heatmaps) == 3
    assert all("forward and backward (the same predictions)" in ax.get_title() for ax in heatmaps)
    plt.close(fig)
    changed = [dict(r, predicted_speedup=r["predicted_speedup"] * 2, predicted_us=r["predicted_us"] / 2)
               if r["direction"] == "backward" and r["hidden"] == 128 else r for r in rows]
    fig = plan.predicted_speedup_figure(changed)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert len(titles) == 6 and sum("backward" in t for t in titles) == 3
    plt.close(fig)


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
