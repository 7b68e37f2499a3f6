"""The offline plan: what a GPU would run, predicted by the cost model, with no GPU and no compile.

    tritonrnn info --offline h100 --grid standard [--json]     # every standard-grid cell, both directions
    tritonrnn info --offline h200 --hidden-size 1024 --batch 64 --dtype bfloat16

Rows come from tritonrnn.costmodel.plan_cell (resources from the shipped offline sm_90 table). Without
measured results, `tritonrnn report` renders this plan as a prediction (`render_prediction`): a report
titled as such and a heatmap of the predicted speedup over cuDNN per cell.
"""
import math
from pathlib import Path

from tritonrnn import costmodel

from .grid import BATCHES, DTYPES, HIDDENS, SEQ_LEN

DIRECTIONS = ("forward", "backward")
JSON_KEYS = ("dtype", "batch", "hidden", "direction", "path", "predicted_us", "cudnn_algorithm", "cudnn_predicted_us")


def cells(gpu: str, shapes) -> list:
    """plan_cell of each (seq_len, batch, hidden, dtype) in `shapes`, forward and backward."""
    hw = costmodel.offline_hardware(gpu)
    return [costmodel.plan_cell(costmodel.Shape(t, b, h, d, direction), hw)
            for t, b, h, d in shapes for direction in DIRECTIONS]


def grid_plan(gpu: str) -> list:
    """The standard grid (3 dtypes x 4 B x 5 H, T = 512), both directions: 120 cells."""
    return cells(gpu, [(SEQ_LEN, b, h, d) for d in DTYPES for h in HIDDENS for b in BATCHES])


def _config_text(config: dict) -> str:
    short = {"BLOCK_B": "B", "BLOCK_N": "N", "BLOCK_K": "K", "K_SPLIT": "ks", "num_warps": "w"}
    return " ".join(f"{short[k]}{v}" for k, v in config.items() if k in short)


def text(rows: list) -> str:
    """Each cell and direction: the chosen layout and every candidate's predicted step."""
    out = []
    for r in rows:
        out.append(f"{r['dtype']} T={r['seq_len']} B={r['batch']} H={r['hidden']} {r['direction']}: {r['path']} "
                   f"({_config_text(r['config'])}) {r['predicted_us']:.2f} us a step; cuDNN {r['cudnn_algorithm']} "
                   f"{r['cudnn_predicted_us']:.2f} us; predicted speedup {r['predicted_speedup']:.2f}x")
        for c in r["candidates"]:
            verdict = f"{c['predicted_us']:.2f} us" if c["fits"] else f"not taken: {c['why']}"
            out.append(f"    {c['layout']:10s} {_config_text(c['config']):24s} {verdict}")
    return "\n".join(out)


def markdown_table(rows: list) -> str:
    """The plan as the table of perf/NOTES.md: one row per cell, forward and backward side by side."""
    lines = ["| dtype | H | B | forward: layout (config) | step (us) | backward: layout (config) | step (us) "
             "| cuDNN algorithm | cuDNN step (us) | predicted speedup fwd / bwd |", "|" + "---|" * 10]
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["dtype"], r["hidden"], r["batch"]), {})[r["direction"]] = r
    for (dtype, hidden, batch), pair in by_cell.items():
        f, b = pair["forward"], pair["backward"]
        algorithm = f["cudnn_algorithm"] + ("" if b["cudnn_algorithm"] == f["cudnn_algorithm"]
                                            else f" / {b['cudnn_algorithm']}")
        cudnn = f"{f['cudnn_predicted_us']:.2f}" + ("" if b["cudnn_predicted_us"] == f["cudnn_predicted_us"]
                                                     else f" / {b['cudnn_predicted_us']:.2f}")
        lines.append(f"| {dtype} | {hidden} | {batch} | {f['path']} ({_config_text(f['config'])}) | "
                     f"{f['predicted_us']:.2f} | {b['path']} ({_config_text(b['config'])}) | {b['predicted_us']:.2f} | "
                     f"{algorithm} | {cudnn} | {f['predicted_speedup']:.2f}x / {b['predicted_speedup']:.2f}x |")
    return "\n".join(lines)


PREDICTED = ("predicted_us", "cudnn_predicted_us")  # the step times (configs may tie-break apart)


def headline(rows: list) -> dict:
    """How many cell-directions the chosen layout is predicted to win (speedup >= 1), and which lose; how
    many cells (shapes) they are, and in how many the backward's prediction is the forward's."""
    losing = [r for r in rows if r["predicted_speedup"] < 1.0]
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["dtype"], r["seq_len"], r["batch"], r["hidden"]), []).append(r)
    identical = [pair for pair in by_cell.values()
                 if len(pair) == 2 and all(pair[0][key] == pair[1][key] for key in PREDICTED)]
    return {"cells": len(rows), "winning": len(rows) - len(losing),
            "losing": [(r["dtype"], r["hidden"], r["batch"], r["direction"], r["cudnn_algorithm"],
                        r["predicted_speedup"]) for r in losing],
            "shapes": len(by_cell), "identical_directions": len(identical),
            "winning_shapes": sum(all(r["predicted_speedup"] >= 1.0 for r in cell) for cell in by_cell.values())}


def headline_text(head: dict) -> str:
    """The headline in words: cell-directions, and what they are where each cell counts twice."""
    text = f"predicted speedup >= 1.0 in {head['winning']} of {head['cells']} cell-directions"
    if head["cells"] != 2 * head["shapes"]:
        return text
    text += f" ({head['shapes']} cells x forward/backward"
    if head["identical_directions"] == head["shapes"]:
        return (text + f"; the model predicts each cell's backward step as its forward step, so this is "
                       f"{head['winning_shapes']} of {head['shapes']} cells counted twice)")
    return text + ")"


LAYOUT_ABBREVIATIONS = {"sequence": "seq", "persistent": "pers", "cluster": "clus", "stepwise": "step"}
SPEEDUP_TICKS = (-2, -1, 0, 1, 2)  # log2 of the speedup: 0.25x .. 4x, the colour scale's ends


def predicted_speedup_figure(rows: list):
    """The heatmaps of the predicted speedup (B x H) per dtype and direction, labelled a prediction, with a
    colour bar and the layouts' abbreviations; one panel per dtype for both directions where the backward's
    predictions are the forward's in every cell (the model's case today)."""
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
                        ax.text(hi, bi, f"{r['predicted_speedup']:.2f}x\n{LAYOUT_ABBREVIATIONS[r['path']]}",
                                ha="center", va="center", fontsize=7)
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
    fig.suptitle(f"PREDICTION (cost model, {gpu}, no GPU measured it): cuDNN step / tritonrnn step\nlayouts: "
                 + ", ".join(f"{short} = {name}" for name, short in LAYOUT_ABBREVIATIONS.items()), fontsize=10)
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
    lines = ["# tritonrnn: PREDICTED performance (no GPU measured this)", "",
             f"**This is a prediction of the cost model (tritonrnn/costmodel.py) for {rows[0]['gpu']}, not a "
             f"measurement**: no results from `tritonrnn bench` were found. Constants: "
             f"{'a calibration file measured on that GPU' if calibrated else 'the uncalibrated defaults (sources in tritonrnn/costmodel.py)'}; "
             "resources: the offline sm_90 compile shipped in kernels/offline/sm_90.json. Measure with "
             "`tritonrnn bench` on a GPU (or perf/device_check.sh) and `tritonrnn report` renders the measurement "
             "instead.", "",
             f"{headline_text(head).replace('predicted speedup', 'Predicted speedup (cuDNN step / tritonrnn step)')}"
             " of the standard grid (T = 512, one layer).", "",
             f"![predicted speedup]({plot.relative_to(out_dir).as_posix()})", "",
             "## The plan (what each cell would run)", "", markdown_table(rows), ""]
    if head["losing"]:
        lines += ["## Cells no layout is predicted to win", ""]
        lines += [f"- {d} H={h} B={b} {direction}: {speedup:.2f}x against cuDNN's {algorithm}"
                  for d, h, b, direction, algorithm, speedup in head["losing"]]
        lines.append("")
    path = out_dir / "PREDICTION.md"
    path.write_text("\n".join(lines))
    return path


def show(rows: list, gpu: str, as_json: bool = False) -> None:
    """Print the plan's rows: one JSON object each, or the text `tritonrnn info --offline` shows."""
    import json

    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"offline plan for {rows[0]['gpu']} (cost model, {'calibrated' if rows[0]['calibrated'] else 'uncalibrated'} "
          f"constants; resources from the offline sm_90 compile by Triton {rows[0]['resources_triton']}; no GPU "
          f"measured this)")
    if gpu.lower() in costmodel.OFFLINE_NOTES:
        print(costmodel.OFFLINE_NOTES[gpu.lower()])
    print(text(rows))
    if len(rows) > 2:
        print(headline_text(headline(rows)))


def main(argv=None) -> int:
    """python -m tritonrnn.perf.plan [h100|h200] [--json]: the standard grid's plan, as `tritonrnn info
    --offline GPU --grid standard` prints it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tritonrnn.perf.plan", description=__doc__.split("\n")[0])
    parser.add_argument("gpu", nargs="?", default="h100", choices=sorted(costmodel.OFFLINE_GPUS))
    parser.add_argument("--json", action="store_true", help="one JSON object per cell and direction")
    args = parser.parse_args(argv)
    show(grid_plan(args.gpu), args.gpu, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
