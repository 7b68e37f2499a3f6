"""Benchmarks against cuDNN, autotuning and the performance report (installed as tritonrnn.perf).

    grid.py       the cases: the standard grid, its lines, the quick subset, user-named shapes
    measure.py    timers, peak memory, profiler kernel names, the GPU's measured ceilings (floor)
    providers.py  tritonrnn, cudnn and torch-native runs of a case, checked against cuDNN
    bench.py      runs cases, writes one results file per run under perf/results/
    tune.py       searches the kernels' tuning space, writes kernels/tuned/<GPU>.json
    report.py     renders perf/REPORT.md and its plots from results files
"""
from pathlib import Path

PERF_DIR = Path(__file__).resolve().parent
RESULTS_DIR = PERF_DIR / "results"
