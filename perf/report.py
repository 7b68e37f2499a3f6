"""`tritonrnn report`: perf/REPORT.md and its PNG plots, rendered from results files.

Plots: the speedup of tritonrnn over cuDNN as a heatmap of B by H for each dtype and mode; time
against T; peak training memory; distance to the floor. Then the summary (geometric mean and
minimum speedup per dtype and mode), every cell where tritonrnn is slower than cuDNN, and the case
table with the kernels the baseline ran. Output-layer results (`bench --output-layer`) get a section
of their own: time and peak memory of the fused layer against F.cross_entropy(F.linear(...)), a plot.
"""
import math
from collections import defaultdict
from pathlib import Path

from . import Outcome, UsageError, output_dir
from .grid import BATCHES, DTYPES, HIDDENS, MODES, PROVIDERS, quick_grid
from .table import Columns


def _index(rows):
    """{(case, mode, provider): row}"""
    return {(r["case"], r["mode"], r["provider"]): r for r in rows}


def _time(row):
    return row["median_ms"] if row and row["status"] == "ok" else None


def speedups(rows, baseline: str = "cudnn") -> dict:
    """{(dtype, mode): [(case row of tritonrnn, speedup)]} for grid cases measured by both."""
    index = _index(rows)
    result = defaultdict(list)
    for r in rows:
        if r["provider"] != "tritonrnn":
            continue
        ours, theirs = _time(r), _time(index.get((r["case"], r["mode"], baseline)))
        if ours and theirs:
            result[(r["dtype"], r["mode"])].append((r, theirs / ours))
    return result


def _failed(row) -> bool:
    return row is not None and row["status"] in ("wrong", "error")


def fell_back(row) -> bool:
    """A "cudnn" row that torch actually ran on its native kernels (the profiler saw no cuDNN RNN)."""
    return row is not None and row["provider"] == "cudnn" and row.get("backend") == "torch-native"


def summary(rows) -> list:
    """Per dtype and mode over the grid cells: cells compared (both timed), the failures of each
    provider, counted against the provider that failed (wrong or error), cells left unchecked (the
    float64 reference failed), cells where "cuDNN" fell back to torch's native kernels, and the
    geometric mean and minimum of the speedup (None without a compared cell)."""
    grid = [r for r in rows if r["group"] == "grid"]
    index = _index(grid)
    pairs = speedups(grid)
    lines = []
    for dtype, mode in sorted({(r["dtype"], r["mode"]) for r in grid}):
        cells = sorted({r["case"] for r in grid if (r["dtype"], r["mode"]) == (dtype, mode)})
        ours = [index.get((c, mode, "tritonrnn")) for c in cells]
        theirs = [index.get((c, mode, "cudnn")) for c in cells]
        values = [s for _, s in pairs.get((dtype, mode), [])]
        line = {"dtype": dtype, "mode": mode, "cells": len(values), "failed": sum(map(_failed, ours)),
                "cudnn_failed": sum(map(_failed, theirs)),
                "unchecked": sum(1 for r in ours if r is not None and r["status"] == "unchecked"),
                "fallback": sum(1 for r, t in zip(ours, theirs, strict=True) if fell_back(t) and _time(r) and _time(t)),
                "geomean": None, "min": None, "min_case": None}
        if values:
            worst_row, worst = min(pairs[(dtype, mode)], key=lambda p: p[1])
            line.update(geomean=math.exp(sum(math.log(v) for v in values) / len(values)), min=worst,
                        min_case=worst_row["case"])
        lines.append(line)
    return lines


def caveat(rows):
    """What the rows are not, if they are not a GPU measurement: None for a real GPU run."""
    if any("FIXTURE" in (r["gpu"] or "") or "synthetic" in (r["gpu"] or "") for r in rows):
        return "SYNTHETIC rows (a test fixture), not a measurement"
    if any(not r["sm_count"] for r in rows):
        return "a CPU run (Triton's interpreter): checks the harness, not the kernels' speed"
    return None


SUMMARY = Columns(("dtype", "<9"), ("mode", "<9"))  # a summary line: dtype, mode, then what was found


def summary_text(line: dict) -> str:
    """One console line of the summary."""
    text = SUMMARY.line(line["dtype"], line["mode"], f"{line['cells']} compared, {line['failed']} failed (tritonrnn), "
                                                    f"{line['cudnn_failed']} failed (cuDNN)")
    if line["unchecked"]:
        text += f", {line['unchecked']} unchecked"
    if line["geomean"] is not None:
        text += f": geomean speedup over cuDNN {line['geomean']:.2f}, min {line['min']:.2f} ({line['min_case']})"
    if line["fallback"]:
        text += f"; in {line['fallback']} of them cuDNN fell back to torch-native"
    return text


def console_summary(rows, layer_rows) -> list:
    """The lines the command line shows under "rendered": what the rows are not (if not a GPU measurement), the
    summary of grid rows, a line per output-layer case."""
    notes = [caveat(rows) if rows else None, output_layer_caveat(layer_rows)]
    return ([f"  {note.upper()}" for note in dict.fromkeys(n for n in notes if n)] +
            [f"  {summary_text(line)}" for line in summary(rows)] +
            [f"  {line}" for line in output_layer_summary(layer_rows)])


def command(results=(), results_dir=None, out_dir=None, prediction: bool = False, measure_first: bool = True,
            command_line: str = "") -> Outcome:
    """`tritonrnn report`: render REPORT.md and its plots into out_dir (default: output_dir()) from the results
    files `results`, else (with a GPU and measure_first) a quick bench run just made, else the newest results of
    each kind in `results_dir` (default: sources.folders()); without any, or with `prediction`, the cost model's
    prediction (PREDICTION.md). Returns an Outcome: what was rendered from what, and the summary. UsageError for
    paths of the wrong kind, malformed files, or `prediction` with results."""
    import torch

    from . import bench, sources

    sources.check_paths(results, results_dir)
    if prediction:
        if results or results_dir:
            raise UsageError("--prediction renders the cost model's plan: no --results or --results-dir with it")
        return Outcome([render_prediction(out_dir)])
    dirs = sources.folders(results_dir)
    skip_cpu = results_dir is None
    files, lines = list(results), []
    if not files and torch.cuda.is_available() and measure_first:
        bench.no_autotuning()
        _, path = bench.run_to_file(quick_grid(), "quick", output_dir("results"), command=command_line)
        files = ([path] if path else []) + sources.newest(dirs, skip_cpu)[1]
    if not files:
        grid_file, layer_file, cpu = sources.newest(dirs, skip_cpu)
        lines += [sources.skipped_text(cpu)] if cpu else []
        files = grid_file + layer_file
    if not files:
        return Outcome(lines + [sources.none_found_text(dirs), render_prediction(out_dir)])
    grid_files, rows, layer_files, layer_rows = sources.load(files)
    path = render(rows, grid_files, out_dir or output_dir(), (layer_rows, layer_files))
    lines.append(f"rendered {path} from {', '.join(str(s) for s in files)}")
    return Outcome(lines + console_summary(rows, layer_rows))


def render_prediction(out_dir=None) -> str:
    """No measured results: render the cost model's offline plan for an H100 into out_dir (default:
    output_dir()), titled as a prediction; returns the line that says so."""
    from . import plan

    rows = plan.grid_plan("h100")
    path = plan.render_prediction(rows, out_dir or output_dir())
    head = plan.headline(rows)
    return (f"rendered {path}: a PREDICTION (cost model, H100, no GPU measured it); "
            f"{plan.headline_text(head)} of the standard grid; {plan.verdicts_text(head)}")


def _save(fig, path: Path, note=None) -> Path:
    if note:  # wrapped to the figure's width (about 11 characters an inch at this size): never clipped
        import textwrap

        fig.suptitle(textwrap.fill(note, int(fig.get_figwidth() * 11)), color="red", fontsize=10)
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        elif not ax.images:
            ax.text(0.5, 0.5, "no data in these results", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_speedup_heatmaps(rows, path: Path, note=None):
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["group"] == "grid"]
    index = _index(grid)
    dtypes = sorted({r["dtype"] for r in grid}) or ["float32"]
    batches = sorted({r["batch"] for r in grid}) or list(BATCHES)
    hiddens = sorted({r["hidden"] for r in grid}) or list(HIDDENS)
    fig, axes = plt.subplots(len(dtypes), len(MODES), figsize=(5.2 * len(MODES), 3.6 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            fallbacks = False
            values = [[math.nan] * len(hiddens) for _ in batches]
            labels = [[""] * len(hiddens) for _ in batches]
            for bi, b in enumerate(batches):
                for hi, h in enumerate(hiddens):
                    case = next((r["case"] for r in grid
                                 if (r["dtype"], r["batch"], r["hidden"]) == (dtype, b, h)), None)
                    ours, theirs = index.get((case, mode, "tritonrnn")), index.get((case, mode, "cudnn"))
                    if ours is None or theirs is None:
                        continue
                    if _time(ours) and _time(theirs):
                        values[bi][hi] = math.log2(_time(theirs) / _time(ours))
                        fallbacks |= fell_back(theirs)
                        native = "\nnative" if fell_back(theirs) else ""
                        labels[bi][hi] = f"{_time(theirs) / _time(ours):.2f}x{native}"
                    else:  # who failed
                        labels[bi][hi] = (f"ours: {ours['status']}" if ours["status"] != "ok" else
                                          f"cuDNN: {theirs['status']}")
            ax.imshow(values, cmap="RdYlGn", vmin=-3, vmax=3, aspect="auto")
            for bi in range(len(batches)):
                for hi in range(len(hiddens)):
                    ax.text(hi, bi, labels[bi][hi], ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(hiddens)), [str(h) for h in hiddens])
            ax.set_yticks(range(len(batches)), [str(b) for b in batches])
            ax.set_xlabel("hidden size H")
            ax.set_ylabel("batch B")
            ax.set_title(f"{dtype} {mode}: speedup over cuDNN"
                         + (" (native: cuDNN fell back to torch's kernels)" if fallbacks else ""), fontsize=8)
    return _save(fig, path, note)


def plot_time_vs_t(rows, path: Path, note=None):
    import matplotlib.pyplot as plt

    line = [r for r in rows if r["group"] == "t-line" or
            (r["group"] == "grid" and (r["dtype"], r["batch"], r["hidden"]) == ("float32", 16, 256))]
    fig, axes = plt.subplots(1, len(MODES), figsize=(10, 3.6), squeeze=False)
    for ax, mode in zip(axes[0], MODES, strict=True):
        for provider in PROVIDERS:
            points = sorted((r["seq_len"], r["median_ms"]) for r in line
                            if r["mode"] == mode and r["provider"] == provider and _time(r))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"float32, B=16, H=256, {mode}", fontsize=9)
    return _save(fig, path, note)


def plot_memory(rows, path: Path, note=None):
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["group"] == "grid" and r["mode"] == "training" and r["peak_memory_bytes"]]
    dtypes = sorted({r["dtype"] for r in grid}) or ["float32"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.5 * len(dtypes), 3.6), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        batch = max((r["batch"] for r in grid if r["dtype"] == dtype), default=None)
        for provider in PROVIDERS:
            points = sorted((r["hidden"], r["peak_memory_bytes"] / 2 ** 20) for r in grid
                            if r["dtype"] == dtype and r["batch"] == batch and r["provider"] == provider)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size H")
        ax.set_ylabel("peak training memory (MiB)")
        lengths = sorted({r["seq_len"] for r in grid if r["dtype"] == dtype and r["batch"] == batch})
        ax.set_title(", ".join([dtype] + ([f"B={batch}"] if batch is not None else [])
                               + [f"T={t}" for t in lengths]), fontsize=9)
    return _save(fig, path, note)


def plot_floor(rows, path: Path, note=None):
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["group"] == "grid" and _time(r) and r["floor_ms"]]
    ratio = {(r["case"], r["mode"], r["provider"]): r["median_ms"] / r["floor_ms"] for r in grid}
    fig, axes = plt.subplots(1, len(MODES), figsize=(10, 3.6), squeeze=False)
    for ax, mode in zip(axes[0], MODES, strict=True):
        # One x position per cell for every provider: cells ordered by tritonrnn's distance.
        cells = sorted({c for c, m, _ in ratio if m == mode}, key=lambda c: ratio.get((c, mode, "tritonrnn"), math.inf))
        for provider in PROVIDERS:
            points = [(i, ratio[(c, mode, provider)]) for i, c in enumerate(cells, 1) if (c, mode, provider) in ratio]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=provider,
                        linestyle="-" if provider == "tritonrnn" else "none")
        ax.axhline(1, color="gray", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("grid cells, ordered by tritonrnn's distance")
        ax.set_ylabel("time / floor")
        ax.set_title(f"{mode}: distance to the floor", fontsize=9)
    return _save(fig, path, note)


def _ms(row):
    if row is None:
        return "-"
    return f"{row['median_ms']:.3f}" if _time(row) else row["status"]


def _measured_on(row) -> str:
    """'**GPU** (132 SMs, driver 550.1)', leaving out what a run did not know (a CPU run: no SMs, no driver)."""
    known = [f"{row['sm_count']} SMs" if row.get("sm_count") else None,
             f"driver {row['driver']}" if row.get("driver") else None]
    known = [k for k in known if k]
    return f"**{row['gpu']}**" + (f" ({', '.join(known)})" if known else "")


def render(rows, sources, out_dir: Path, output_layer=((), ())) -> Path:
    """Write out_dir/REPORT.md and out_dir/plots/*.png from grid results (rows, sources) and
    output-layer results (output_layer = (rows, sources), a section of its own); returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = grid_lines(rows, sources, plots) if rows else ["# tritonrnn performance report"]
    if output_layer[0]:
        lines += output_layer_lines(*output_layer, plots)
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def grid_lines(rows, sources, plots: Path) -> list:
    """The report of grid results (RNN cases against cuDNN), its plots written into `plots`."""
    note = caveat(rows)
    figures = {
        "Speedup over cuDNN (B x H)": plot_speedup_heatmaps(rows, plots / "speedup_heatmap.png", note),
        "Time against T": plot_time_vs_t(rows, plots / "time_vs_T.png", note),
        "Peak training memory": plot_memory(rows, plots / "memory.png", note),
        "Distance to the floor": plot_floor(rows, plots / "floor.png", note),
    }
    first = rows[0]
    gpus = sorted({r["gpu"] for r in rows})
    lines = ["# tritonrnn performance report", ""]
    if note:
        lines += [f"**{note[0].upper() + note[1:]}.**", ""]
    lines += [f"Measured on {_measured_on(first)}, torch "
              f"{first['torch']}, triton {first['triton']}, cuDNN {first['cudnn']}, {first['date']}. "
              f"TF32: cuDNN {'on' if first['tf32'] else 'off'}, cuBLAS {'on' if first.get('matmul_tf32') else 'off'}. "
              f"tritonrnn configs: {first.get('tuned_configs') or 'no shipped tuned file'}, autotuner "
              f"{'on' if first.get('autotune') else 'off'}.", ""]
    if len(gpus) > 1:
        lines += [f"**These results mix GPUs**: {', '.join(gpus)}; compare rows of one GPU only.", ""]
    lines += ["Results used: " + ", ".join(f"`{Path(s).name}`" for s in sources) + ".",
              f"Command: `{first['command']}`", "",
              "Speedup = cuDNN median time / tritonrnn median time (above 1: tritonrnn is faster). Every "
              "provider, cuDNN included, is first checked against one float64 run of the case (norm-wise "
              "relative error); a provider that fails the check is marked `wrong` and has no time, and a "
              "failure counts against the provider that failed. The floor is a lower bound: FLOPs at the "
              "measured matmul rate, bytes at the measured copy bandwidth, or T dependent 16x16x16 matmuls, "
              "whichever is largest.", ""]
    fallbacks = [r for r in rows if fell_back(r)]
    if fallbacks:
        lines += [f"**cuDNN fell back to torch's native kernels in {len(fallbacks)} rows** (the profiler saw no "
                  "cuDNN RNN: torch routes bf16 RNNs to cuDNN only from cuDNN 9.13): their \"cudnn\" times are "
                  "torch-native times, marked `native` in the heatmap and in the cases' backend column.", ""]
    grid_cells = len({r["case"] for r in rows if r["group"] == "grid"})
    lines += [f"## Summary ({grid_cells} B x H grid cells in these results; the standard grid has "
              f"{len(DTYPES) * len(BATCHES) * len(HIDDENS)})", "",
              "| dtype | mode | cells compared | tritonrnn failed | cuDNN failed | unchecked | cuDNN fell back "
              "| geomean speedup | min speedup | at |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        speed = (f"{s['geomean']:.2f} | {s['min']:.2f} | {s['min_case']}" if s["geomean"] is not None
                 else "- | - | -")
        lines.append(f"| {s['dtype']} | {s['mode']} | {s['cells']} | {s['failed']} | {s['cudnn_failed']} | "
                     f"{s['unchecked']} | {s['fallback']} | {speed} |")
    compared = speedups(rows)
    slower = sorted((r["case"], r["mode"], s) for pairs in compared.values() for r, s in pairs if s < 1)
    lines += ["", "## Where tritonrnn is slower than cuDNN", ""]
    if not compared:
        lines.append("- no case was measured with both tritonrnn and cuDNN")
    else:
        index = _index(rows)
        lines += [f"- {case} {mode}: {s:.2f}x" + (" (cuDNN fell back to torch-native)"
                                                   if fell_back(index.get((case, mode, "cudnn"))) else "")
                  for case, mode, s in slower] or ["- nowhere in these results"]
    failures = [r for r in rows if r["status"] not in ("ok", "unavailable")]
    if failures:
        lines += ["", "## Failures (by the provider that failed)", ""] + [
            f"- {r['case']} {r['mode']} {r['provider']}: {r['status']}: {r['error']}" for r in failures]
    for title, png in figures.items():
        lines += ["", f"## {title}", "", f"![{title}](plots/{png.name})"]
    lines += ["", "## Cases", "", "| case | mode | tritonrnn ms | cudnn ms | torch-native ms | speedup | floor ms "
              "| tritonrnn / floor | cudnn backend | cuDNN kernels |", "|---|---|---|---|---|---|---|---|---|---|"]
    index = _index(rows)
    for case, mode in sorted({(r["case"], r["mode"]) for r in rows}):
        ours, cudnn, native = (index.get((case, mode, p)) for p in PROVIDERS)
        speed = f"{_time(cudnn) / _time(ours):.2f}" if _time(ours) and _time(cudnn) else "-"
        floor = ours["floor_ms"] if ours else None
        distance = f"{_time(ours) / floor:.1f}" if _time(ours) and floor else "-"
        floor_text = f"{floor:.3f}" if floor else "-"
        ran = "-" if cudnn is None else ("native" if fell_back(cudnn) else cudnn.get("backend") or "unverified")
        kernels = "<br>".join((cudnn or {}).get("kernels") or [])[:400] or "-"
        lines.append(f"| {case} | {mode} | {_ms(ours)} | {_ms(cudnn)} | {_ms(native)} | {speed} | {floor_text} | "
                     f"{distance} | {ran} | {kernels} |")
    return lines


# The output layer (`tritonrnn bench --output-layer`): the fused linear_cross_entropy ("tritonrnn")
# against F.cross_entropy(F.linear(...)) ("torch"), forward + backward, per row count.

def output_layer_pairs(rows) -> list:
    """[(case, dtype, N, fused row, torch row)], ordered by dtype and rows."""
    index = {(r["case"], r["dtype"], r["provider"]): r for r in rows}
    cases = sorted({(r["dtype"], r["rows"], r["case"]) for r in rows})
    return [(case, dtype, n, index.get((case, dtype, "tritonrnn")), index.get((case, dtype, "torch")))
            for dtype, n, case in cases]


def output_layer_caveat(rows):
    """What output-layer rows are not, if they are not a GPU measurement."""
    if any(r.get("backend") == "triton-interpreter" or r.get("device") == "cpu" for r in rows):
        return "a CPU run (Triton's interpreter): checks the harness, not the kernel's speed"
    return None


def _mib(row) -> str:
    value = (row or {}).get("peak_memory_bytes")
    return f"{value / 2 ** 20:.1f}" if value is not None else "-"


def _ratio(ours, theirs, field: str, form: str) -> str:
    """torch's value / the fused layer's, where both ran."""
    ok = ours is not None and theirs is not None and ours["status"] == theirs["status"] == "ok"
    a, b = (ours.get(field), theirs.get(field)) if ok else (None, None)
    return form.format(b / a) if a and b is not None else "-"


def output_layer_summary(rows) -> list:
    """One console line per case: time and peak memory of the fused layer against torch's."""
    return [f"output layer {case}: {_ms(ours)} ms vs torch {_ms(theirs)} ms "
            f"(speedup {_ratio(ours, theirs, 'median_ms', '{:.2f}')}), peak {_mib(ours)} MiB vs {_mib(theirs)} MiB"
            for case, _, _, ours, theirs in output_layer_pairs(rows)]


def plot_output_layer(rows, path: Path, note=None):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, field, scale, label in ((axes[0][0], "median_ms", 1, "median time, forward + backward (ms)"),
                                    (axes[0][1], "peak_memory_bytes", 2 ** -20, "peak memory (MiB)")):
        for dtype in sorted({r["dtype"] for r in rows}):
            for provider, name in (("tritonrnn", "fused"), ("torch", "F.cross_entropy(F.linear)")):
                points = sorted((r["rows"], r[field] * scale) for r in rows if r["dtype"] == dtype and
                                r["provider"] == provider and r["status"] == "ok" and r.get(field) is not None)
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=f"{name} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows N = T x B")
        ax.set_ylabel(label)
        ax.set_title("output layer, " + "; ".join(sorted({f"V={r['vocab']}, H={r['hidden']}" for r in rows})),
                     fontsize=9)
    return _save(fig, path, note)


def output_layer_lines(rows, sources, plots: Path) -> list:
    """The output layer's section: a table of time and peak memory against torch's, and a plot."""
    note = output_layer_caveat(rows)
    png = plot_output_layer(rows, plots / "output_layer.png", note)
    lines = ["", "## Output layer: fused linear_cross_entropy against F.cross_entropy(F.linear(...))", ""]
    if note:
        lines += [f"**{note[0].upper() + note[1:]}.**", ""]
    lines += ["Results used: " + ", ".join(f"`{Path(s).name}`" for s in sources) + ". Forward + backward of the "
              "mean loss; peak memory above what was allocated before the call. Speedup = torch's time / the fused "
              "layer's; memory ratio = torch's peak / the fused layer's.", "",
              "| case | dtype | rows | fused ms | torch ms | speedup | fused peak MiB | torch peak MiB "
              "| memory ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    for case, dtype, n, ours, theirs in output_layer_pairs(rows):
        lines.append(f"| {case} | {dtype} | {n} | {_ms(ours)} | {_ms(theirs)} | "
                     f"{_ratio(ours, theirs, 'median_ms', '{:.2f}')} | {_mib(ours)} | {_mib(theirs)} | "
                     f"{_ratio(ours, theirs, 'peak_memory_bytes', '{:.1f}')} |")
    return lines + ["", f"![Output layer](plots/{png.name})"]
