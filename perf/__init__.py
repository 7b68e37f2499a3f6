"""Benchmarks against cuDNN, autotuning and the performance report (installed as tritonrnn.perf).

    grid.py       the cases: the standard grid, its lines, the quick subset, user-named shapes
    measure.py    timers, peak memory, profiled kernel names and backend, the GPU's measured ceilings (floor)
    providers.py  tritonrnn, cudnn and torch-native runs of a case, checked against one float64 run
    bench.py      runs cases, writes one results file per run (`tritonrnn bench`)
    output_layer.py  the fused output layer against F.cross_entropy(F.linear(...)) (`bench --output-layer`)
    tune.py       searches the kernels' tuning space, writes <GPU>.json (kernels/tuned/ in a checkout)
    sources.py    the results files report renders: where it looks, the newest of each kind, CPU runs, loading
    report.py     renders REPORT.md and its plots from results files (`tritonrnn report`)
    plan.py       the cost model's offline plan (`info --offline`), rendered as PREDICTION.md without results
    resources.py  the offline sm_90 resource table the cost model reads (kernels/offline/sm_90.json)
    calibrate.py  measures the cost model's constants on a GPU (kernels/calibration/<GPU>.json)
    table.py      fixed-width text tables for the console

The commands' handlers (bench.command, output_layer.command, tune.command, report.command) take plain
arguments and return an Outcome; tritonrnn/cli.py parses the options and shows it.
"""
import dataclasses
import os
from pathlib import Path

PERF_DIR = Path(__file__).resolve().parent
RESULTS_DIR = PERF_DIR / "results"  # the shipped results `tritonrnn report` renders by default


def in_checkout() -> bool:
    """Whether this package runs from a writable source checkout (an editable install), not from an
    installed copy (site-packages), which is no place to write output."""
    return (PERF_DIR.parent / "pyproject.toml").is_file() and os.access(PERF_DIR, os.W_OK)


def output_dir(checkout_subdir: str = "") -> Path:
    """Where bench and report write by default: the checkout's perf/<subdir> from a checkout, else the
    current directory (a place the user owns)."""
    return PERF_DIR / checkout_subdir if in_checkout() else Path.cwd()


def bench_output_dir() -> Path:
    """Where bench writes by default: perf/results/ (measured GPU results, committed) from a checkout on a GPU;
    a CPU run (the interpreter: a check of the harness, not a measurement) goes to perf/smoke/, ignored by git;
    an installed copy writes into the current directory."""
    import torch

    return output_dir("results" if torch.cuda.is_available() else "smoke")


class UsageError(ValueError):
    """What was asked cannot run as asked: a bad argument, a missing or malformed file, no device to run on.
    The command line prints its message as one line and exits with status 2."""


@dataclasses.dataclass
class Outcome:
    """What a command did, for the command line to show: lines for stdout, lines for stderr (shown first), and
    whether everything ran and was right (exit status 0, else 1)."""

    lines: list
    errors: list = dataclasses.field(default_factory=list)
    ok: bool = True
