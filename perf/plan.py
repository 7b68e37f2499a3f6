"""The offline plan: what a GPU would run, predicted by the cost model, with no GPU and no compile.

    tritonrnn info --offline h100 --grid standard [--json]     # every standard-grid cell, both directions
    tritonrnn info --offline h200 --hidden-size 1024 --batch 64 --dtype bfloat16

Rows come from tritonrnn.costmodel.plan_cell (resources from the shipped offline sm_90 table), each a range:
the baseline constants and the pessimistic set (costmodel.CONSTANTS), and a verdict (win, likely, tie, loss;
costmodel.verdict). The JSON output starts with one object of the constants, both values and their sources,
and the Triton the plan was computed for (`constants_object`). Without measured results, `tritonrnn report`
renders this plan as a prediction (`render_prediction`): a report titled as such and a heatmap of the
predicted speedup over cuDNN per cell.
"""
import math
from pathlib import Path

from tritonrnn import costmodel

from .grid import BATCHES, DTYPES, HIDDENS, SEQ_LEN

DIRECTIONS = ("forward", "backward")
JSON_KEYS = ("dtype", "batch", "hidden", "direction", "path", "predicted_us", "cudnn_algorithm", "cudnn_predicted_us",
             "predicted_speedup", "path_pessimistic", "config_pessimistic", "predicted_us_pessimistic",
             "cudnn_predicted_us_pessimistic", "predicted_speedup_pessimistic", "verdict")


def cells(gpu: str, shapes) -> list:
    """plan_cell of each (seq_len, batch, hidden, dtype) in `shapes`, forward and backward."""
    hw = costmodel.offline_hardware(gpu)
    return [costmodel.plan_cell(costmodel.Shape(t, b, h, d, direction), hw)
            for t, b, h, d in shapes for direction in DIRECTIONS]


def grid_plan(gpu: str) -> list:
    """The standard grid (3 dtypes x 4 B x 5 H, T = 512), both directions: 120 cells."""
    return cells(gpu, [(SEQ_LEN, b, h, d) for d in DTYPES for h in HIDDENS for b in BATCHES])


def constants_object(gpu: str) -> dict:
    """What the plan's numbers rest on: every constant of the model, baseline and pessimistic with its source,
    and the Triton installed here (the layouts that exist depend on it; `info --offline` plans for it)."""
    import triton

    hw = costmodel.offline_hardware(gpu)
    return {"constants": hw.constants(), "triton": triton.__version__, "gpu": hw.name, "calibrated": hw.calibrated}


def read_json(lines) -> tuple:
    """The JSON lines `show` prints: (the constants object, the rows)."""
    import json

    objects = [json.loads(line) for line in lines if line.strip()]
    return objects[0], objects[1:]


def _config_text(config: dict) -> str:
    short = {"BLOCK_B": "B", "BLOCK_N": "N", "BLOCK_K": "K", "K_SPLIT": "ks", "STREAM_K": "sk", "num_warps": "w"}
    return " ".join(f"{short[k]}{v}" for k, v in config.items() if k in short)


def text(rows: list) -> str:
    """Each cell and direction: the chosen layout, the range of its predicted step (baseline .. pessimistic),
    cuDNN's, the speedups and the verdict; every candidate's predicted step under the baseline."""
    out = []
    for r in rows:
        out.append(f"{r['dtype']} T={r['seq_len']} B={r['batch']} H={r['hidden']} {r['direction']}: {r['path']} "
                   f"({_config_text(r['config'])}){_pessimistic_layout(r)} {r['predicted_us']:.2f} .. "
                   f"{r['predicted_us_pessimistic']:.2f} us a step; cuDNN {r['cudnn_algorithm']} "
                   f"{r['cudnn_predicted_us']:.2f} .. {r['cudnn_predicted_us_pessimistic']:.2f} us; predicted speedup "
                   f"{_speedups(r)}: {r['verdict']}")
        for c in r["candidates"]:
            verdict = f"{c['predicted_us']:.2f} us" if c["fits"] else f"not taken: {c['why']}"
            out.append(f"    {c['layout']:10s} {_config_text(c['config']):24s} {verdict}")
    return "\n".join(out)


def _pessimistic_layout(row: dict) -> str:
    """' [pessimistic: LAYOUT (CONFIG)]' where the pessimistic set chooses another layout or config, else ''."""
    if (row["path_pessimistic"], row["config_pessimistic"]) == (row["path"], row["config"]):
        return ""
    return f" [pessimistic: {row['path_pessimistic']} ({_config_text(row['config_pessimistic'])})]"


def _layout_text(row: dict) -> str:
    return f"{row['path']} ({_config_text(row['config'])}){_pessimistic_layout(row)}"


def _speedups(row: dict) -> str:
    return f"{row['predicted_speedup']:.2f}x .. {row['predicted_speedup_pessimistic']:.2f}x"


def _steps(row: dict, prefix: str = "") -> str:
    return f"{row[prefix + 'predicted_us']:.2f} .. {row[prefix + 'predicted_us_pessimistic']:.2f}"


def markdown_table(rows: list) -> str:
    """The plan as the table of perf/NOTES.md: one row per cell, forward and backward side by side, every
    figure a range (baseline .. pessimistic), and the verdicts."""
    lines = ["| dtype | H | B | forward: layout (config) | step (us) | backward: layout (config) | step (us) "
             "| cuDNN algorithm | cuDNN step (us) | predicted speedup fwd / bwd | verdict fwd / bwd |",
             "|" + "---|" * 11]
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["dtype"], r["hidden"], r["batch"]), {})[r["direction"]] = r
    for (dtype, hidden, batch), pair in by_cell.items():
        f, b = pair["forward"], pair["backward"]
        algorithm = f["cudnn_algorithm"] + ("" if b["cudnn_algorithm"] == f["cudnn_algorithm"]
                                            else f" / {b['cudnn_algorithm']}")
        cudnn = _steps(f, "cudnn_") + ("" if _steps(b, "cudnn_") == _steps(f, "cudnn_")
                                       else f" / {_steps(b, 'cudnn_')}")
        lines.append(f"| {dtype} | {hidden} | {batch} | {_layout_text(f)} | {_steps(f)} | {_layout_text(b)} | "
                     f"{_steps(b)} | {algorithm} | {cudnn} | {_speedups(f)} / {_speedups(b)} | "
                     f"{f['verdict']} / {b['verdict']} |")
    return "\n".join(lines)


# The step times (configs may tie-break apart), baseline and pessimistic.
PREDICTED = ("predicted_us", "cudnn_predicted_us", "predicted_us_pessimistic", "cudnn_predicted_us_pessimistic")


def headline(rows: list) -> dict:
    """How many cell-directions the chosen layout is predicted to win (speedup >= 1) under the baseline and
    under the pessimistic set, and which lose (under the baseline); the verdicts counted, and the rows short
    of a win; how many cells (shapes) they are, and in how many the backward's prediction is the forward's."""
    losing = [r for r in rows if r["predicted_speedup"] < 1.0]
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["dtype"], r["seq_len"], r["batch"], r["hidden"]), []).append(r)
    identical = [pair for pair in by_cell.values()
                 if len(pair) == 2 and all(pair[0][key] == pair[1][key] for key in PREDICTED)]
    return {"cells": len(rows), "winning": len(rows) - len(losing),
            "winning_pessimistic": sum(r["predicted_speedup_pessimistic"] >= 1.0 for r in rows),
            "verdicts": {v: sum(r["verdict"] == v for r in rows) for v in costmodel.VERDICTS},
            "short_of_a_win": [(r["dtype"], r["hidden"], r["batch"], r["direction"], r["cudnn_algorithm"],
                                r["predicted_speedup"], r["predicted_speedup_pessimistic"], r["verdict"])
                               for r in rows if r["verdict"] != "win"],
            "losing": [(r["dtype"], r["hidden"], r["batch"], r["direction"], r["cudnn_algorithm"],
                        r["predicted_speedup"]) for r in losing],
            "shapes": len(by_cell), "identical_directions": len(identical),
            "winning_shapes": sum(all(r["predicted_speedup"] >= 1.0 for r in cell) for cell in by_cell.values()),
            "winning_shapes_pessimistic": sum(all(r["predicted_speedup_pessimistic"] >= 1.0 for r in cell)
                                              for cell in by_cell.values())}


def headline_text(head: dict) -> str:
    """The headline in words: cell-directions under either set, and what they are where each cell counts twice."""
    text = (f"predicted speedup >= 1.0 in {head['winning']} of {head['cells']} cell-directions under the baseline "
            f"constants, {head['winning_pessimistic']} under the pessimistic set")
    if head["cells"] != 2 * head["shapes"]:
        return text
    text += f" ({head['shapes']} cells x forward/backward"
    if head["identical_directions"] == head["shapes"]:
        return (text + f"; the model predicts each cell's backward step as its forward step, so this is "
                       f"{head['winning_shapes']} and {head['winning_shapes_pessimistic']} of {head['shapes']} cells "
                       f"counted twice)")
    return (text + f"; {head['winning_shapes']} and {head['winning_shapes_pessimistic']} of {head['shapes']} cells in "
                   f"both directions; each cell's backward step is predicted on its own, differing from its forward "
                   f"step in {head['shapes'] - head['identical_directions']} cells)")


VERDICT_RULES = {"win": f">= {costmodel.WIN_AT}x under the pessimistic set",
                 "likely": f">= {costmodel.LIKELY_AT}x under the baseline",
                 "tie": f"{costmodel.TIE_FROM}x to {costmodel.LIKELY_AT}x under the baseline",
                 "loss": f"< {costmodel.TIE_FROM}x under the baseline"}


def verdicts_text(head: dict) -> str:
    """The verdicts counted, each with its rule."""
    return (f"verdicts of {head['cells']} cell-directions: "
            + ", ".join(f"{head['verdicts'][v]} {v} ({VERDICT_RULES[v]})" for v in costmodel.VERDICTS))


LAYOUT_ABBREVIATIONS = {"sequence": "seq", "persistent": "pers", "cluster": "clus", "streamed": "strm",
                        "stepwise": "step"}
SPEEDUP_TICKS = (-2, -1, 0, 1, 2)  # log2 of the speedup: 0.25x .. 4x, the colour scale's ends


def predicted_speedup_figure(rows: list):
    """The heatmaps of the predicted speedup (B x H) per dtype and direction, labelled a prediction, with a
    colour bar (the baseline's speedup), each cell's range, layout and verdict, and the layouts' abbreviations;
    one panel per dtype for both directions where the backward's predictions are the forward's in every cell
    (the model's case today)."""
    import matplotlib.pyplot as plt

    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    head = headline(rows)
    same = head["identical_directions"] == head["shapes"]
    directions = DIRECTIONS[:1] if same else DIRECTIONS
    fig, axes = plt.subplots(len(dtypes), len(directions), figsize=(6.2 * len(directions) + 1.2, 3.6 * len(dtypes)),
                             squeeze=False, constrained_layout=True)
    index = {(r["dtype"], r["direction"], r["batch"], r["hidden"]): r for r in rows}
    for i, dtype in enumerate(dtypes):
        for j, direction in enumerate(directions):
            ax = axes[i][j]
            values = [[math.log2(index[(dtype, direction, b, h)]["predicted_speedup"])
                       if (dtype, direction, b, h) in index else float("nan") for h in HIDDENS] for b in BATCHES]
            image = ax.imshow(values, cmap="RdYlGn", vmin=SPEEDUP_TICKS[0], vmax=SPEEDUP_TICKS[-1], aspect="auto")
            for bi, b in enumerate(BATCHES):
                for hi, h in enumerate(HIDDENS):
                    r = index.get((dtype, direction, b, h))
                    if r:
                        ax.text(hi, bi, f"{r['predicted_speedup']:.2f}x..{r['predicted_speedup_pessimistic']:.2f}x\n"
                                        f"{LAYOUT_ABBREVIATIONS[r['path']]} {r['verdict']}",
                                ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(HIDDENS)), [str(h) for h in HIDDENS])
            ax.set_yticks(range(len(BATCHES)), [str(b) for b in BATCHES])
            ax.set_xlabel("H")
            ax.set_ylabel("B")
            which = "forward and backward (the same predictions)" if same else direction
            ax.set_title(f"{dtype} {which}: PREDICTED speedup over cuDNN", fontsize=9)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    bar.set_ticks(SPEEDUP_TICKS, labels=[f"{2.0 ** t:g}x" for t in SPEEDUP_TICKS])
    bar.set_label("predicted speedup (cuDNN step / tritonrnn step), log scale")
    gpu = rows[0]["gpu"]
    fig.suptitle(f"PREDICTION (cost model, {gpu}, no GPU measured it): cuDNN step / tritonrnn step\neach cell: the "
                 f"speedup under the baseline .. the pessimistic constants (colour: baseline), layout, verdict"
                 f"\nlayouts: " + ", ".join(f"{short} = {name}" for name, short in LAYOUT_ABBREVIATIONS.items()),
                 fontsize=10)
    return fig


def plot_predicted_speedup(rows: list, path: Path) -> Path:
    """predicted_speedup_figure, saved."""
    import matplotlib.pyplot as plt

    fig = predicted_speedup_figure(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_prediction(rows: list, out_dir: Path) -> Path:
    """PREDICTION.md and plots/predicted_speedup.png in out_dir: the offline plan, titled as a
    prediction (REPORT.md stays the name of measured reports)."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    plot = plot_predicted_speedup(rows, out_dir / "plots" / "predicted_speedup.png")
    head = headline(rows)
    calibrated = rows[0]["calibrated"]
    basis = constants_object(rows[0]["gpu"])
    lines = ["# tritonrnn: PREDICTED performance (no GPU measured this)", "",
             f"**This is a prediction of the cost model (tritonrnn/costmodel.py) for {rows[0]['gpu']}, not a "
             f"measurement**: no results from `tritonrnn bench` were found. Constants: "
             f"{'a calibration file measured on that GPU' if calibrated else 'the uncalibrated defaults'} (listed "
             "below with their sources); "
             "resources: the offline sm_90 compile shipped in kernels/offline/sm_90.json. Measure with "
             "`tritonrnn bench` on a GPU (or perf/device_check.sh) and `tritonrnn report` renders the measurement "
             "instead.", "",
             "Every figure is a range, baseline .. pessimistic: the baseline constants, and the pessimistic set "
             "that moves each constant against tritonrnn within its published spread (the constants below); the "
             "layout the pessimistic set would choose is named where it differs. A cell's verdict is the first that "
             "holds of: " + "; ".join(f"{v}, {rule}" for v, rule in VERDICT_RULES.items()) + ".", "",
             f"{headline_text(head).replace('predicted speedup', 'Predicted speedup (cuDNN step / tritonrnn step)')}"
             " of the standard grid (T = 512, one layer).", "", f"{verdicts_text(head).capitalize()}.", "",
             f"![predicted speedup]({plot.relative_to(out_dir).as_posix()})", "",
             "## The plan (what each cell would run)", "", markdown_table(rows), ""]
    if head["short_of_a_win"]:
        lines += ["## Cells short of a win (speedup baseline .. pessimistic)", ""]
        lines += [f"- {d} H={h} B={b} {direction}: {verdict}, {speedup:.2f}x .. {worst:.2f}x against cuDNN's "
                  f"{algorithm}" for d, h, b, direction, algorithm, speedup, worst, verdict in head["short_of_a_win"]]
        lines.append("")
    lines += [f"## The constants (Triton {basis['triton']} installed when this was computed)", "",
              "| constant | baseline | pessimistic | source |", "|---|---|---|---|"]
    lines += [f"| `{name}` | {c['baseline']:g} | {c['pessimistic']:g} | {c['source']} |"
              for name, c in basis["constants"].items()]
    lines.append("")
    path = out_dir / "PREDICTION.md"
    path.write_text("\n".join(lines))
    return path


def show(rows: list, gpu: str, as_json: bool = False) -> None:
    """Print the plan's rows: one JSON object each, or the text `tritonrnn info --offline` shows."""
    import json

    if as_json:  # the constants first, then a row each
        for row in [constants_object(gpu), *rows]:
            print(json.dumps(row))
        return
    print(f"offline plan for {rows[0]['gpu']} (cost model, {'calibrated' if rows[0]['calibrated'] else 'uncalibrated'} "
          f"constants; resources from the offline sm_90 compile by Triton {rows[0]['resources_triton']}; no GPU "
          f"measured this)")
    if gpu.lower() in costmodel.OFFLINE_NOTES:
        print(costmodel.OFFLINE_NOTES[gpu.lower()])
    import triton

    print(f"each step and speedup: baseline .. pessimistic constants (the JSON lists both with their sources); "
          f"candidates under the baseline; planned with Triton {triton.__version__}")
    print(text(rows))
    if len(rows) > 2:
        head = headline(rows)
        print(verdicts_text(head))
        print(headline_text(head))


def main(argv=None) -> int:
    """python -m tritonrnn.perf.plan [h100|h200] [--json]: the standard grid's plan, as `tritonrnn info
    --offline GPU --grid standard` prints it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tritonrnn.perf.plan", description=__doc__.split("\n")[0])
    parser.add_argument("gpu", nargs="?", default="h100", choices=sorted(costmodel.OFFLINE_GPUS))
    parser.add_argument("--json", action="store_true",
                        help="the constants' JSON object, then one JSON object per cell and direction")
    args = parser.parse_args(argv)
    show(grid_plan(args.gpu), args.gpu, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
