"""`tritonrnn tune`: search the kernels' tuning space (paths and configs) on this GPU.

For each shape (dtype, H, batch bucket) and direction (forward, backward) every candidate of the
space declared in kernels/configs.py is timed once on the recurrence alone. The fastest is then
re-timed against the untuned default (default path, default config), the two interleaved over
CONFIRM_ROUNDS rounds, and written to <directory>/<GPU>.json (the launchers read kernels/tuned/)
only if its median beats the default's by at least MARGIN: one lucky timing among dozens of
candidates cannot win. T does not enter the key: configs hold for every T.
"""
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

from tritonrnn import kernels
from tritonrnn.numerics import allow_tf32
from tritonrnn.kernels import configs

from . import Outcome, UsageError, in_checkout, measure
from .grid import select
from .providers import DTYPES, compare
from .table import Columns

MARGIN = 0.03  # a winner must be at least 3% faster than the default, beyond timing noise
CONFIRM_ROUNDS = 5  # default and winner re-timed alternately, so drifts (clocks, heat) hit both
TUNE_SEQ_LEN = 128
RESULT = Columns(("key", "<32"))  # one line a tuned key: the key, then the verdict


def candidates(hidden: int, batch: int, dtype: torch.dtype):
    """(layout, config) pairs to try for this shape: only those that load at the layers' precision."""
    tf32 = allow_tf32()
    layouts = [layout for layout in configs.TUNED_LAYOUTS if configs.layout_fits(layout, hidden, dtype, tf32)]
    return [(layout, config) for layout in layouts
            for config in configs.tuning_space(layout, batch, hidden, dtype, tf32)]


def default_choice(hidden: int, batch: int, dtype: torch.dtype):
    layout = configs.default_layout(hidden, dtype, allow_tf32())  # the layers' default at their precision
    return layout, configs.default_config(layout, batch, hidden)


def _problem(dtype, batch, hidden, device, seq_len=TUNE_SEQ_LEN):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return {"xw": rand(seq_len, batch, hidden), "h0": rand(batch, hidden),
            "w_hh": rand(hidden, hidden) / hidden ** 0.5, "grad": rand(seq_len, batch, hidden)}


def recurrence_fn(problem, direction: str, layout: str, config):
    """The call a candidate is timed on: the forward or backward recurrence alone."""
    tf32 = allow_tf32()  # the precision the layers run fp32 at
    if direction == "forward":
        return lambda: kernels.recurrence_forward(problem["xw"], problem["h0"], problem["w_hh"], layout=layout,
                                                  config=config, allow_tf32=tf32)
    out = torch.tanh(problem["xw"])
    return lambda: kernels.recurrence_backward(problem["grad"], out, problem["w_hh"], layout=layout, config=config,
                                               allow_tf32=tf32)


def _agrees(result, expected, dtype: torch.dtype) -> bool:
    """A candidate's output against the default's, within the benchmark's correctness tolerance."""
    result = result if isinstance(result, tuple) else (result,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return compare(result, expected, dtype)[0]


def tune_shape(dtype: torch.dtype, hidden: int, batch: int, direction: str, timer, device, progress=None,
               seq_len: int = TUNE_SEQ_LEN) -> dict:
    """Time the default and every candidate whose output agrees with the default's; returns the
    measurements and the verdict."""
    problem = _problem(dtype, batch, hidden, device, seq_len)
    default_path, default_config = default_choice(hidden, batch, dtype)
    default_fn = recurrence_fn(problem, direction, default_path, default_config)
    expected = default_fn()
    default_ms = timer(default_fn)["median_ms"]
    best = None
    for path, config in candidates(hidden, batch, dtype):
        fn = recurrence_fn(problem, direction, path, config)
        try:
            if _agrees(fn(), expected, dtype):
                ms = timer(fn)["median_ms"]
                if not _agrees(fn(), expected, dtype):  # a race may show only some of the time
                    print(f"\n    {path} {configs.config_to_dict(config)}: wrong after timing", file=sys.stderr)
                    ms = None
            else:  # a fast wrong answer (e.g. a race) must never win
                print(f"\n    {path} {configs.config_to_dict(config)}: wrong output, skipped", file=sys.stderr)
                ms = None
        except Exception as exc:  # noqa: BLE001 - out of resources etc.: the candidate is out
            print(f"\n    {path} {configs.config_to_dict(config)}: {type(exc).__name__}", file=sys.stderr)
            ms = None
        if progress:
            progress()
        if ms is not None and (best is None or ms < best["time_ms"]):
            best = {"path": path, "config": configs.config_to_dict(config), "time_ms": ms}
    verdict = False
    if best is not None and best["time_ms"] < default_ms * (1 - MARGIN):  # a candidate winner: confirm it
        best_fn = recurrence_fn(problem, direction, best["path"], configs.config_from_dict(best["config"]))
        default_ms, best["time_ms"] = confirm(default_fn, best_fn, timer)
        verdict = best["time_ms"] < default_ms * (1 - MARGIN)
    return {"key": configs.tuned_key(dtype, hidden, batch, direction), "default_ms": default_ms,
            "default": {"path": default_path, "config": configs.config_to_dict(default_config)},
            "best": best, "written": verdict}


def confirm(default_fn, best_fn, timer, rounds: int = CONFIRM_ROUNDS) -> tuple:
    """(default's, winner's) median time over `rounds` interleaved timings of each."""
    default_times, best_times = [], []
    for _ in range(rounds):
        default_times.append(timer(default_fn)["median_ms"])
        best_times.append(timer(best_fn)["median_ms"])
    return statistics.median(default_times), statistics.median(best_times)


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def __call__(self):
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def tune(shapes, timer, device, command: str = "", directory=None, seq_len: int = TUNE_SEQ_LEN) -> dict:
    """Tune (dtype, hidden, batch) shapes; merge the winners into <directory>/<GPU>.json
    (default: kernels/tuned/, where the launchers read them)."""
    directory = directory or configs.TUNED_DIR
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = directory / f"{configs.gpu_slug(gpu)}.json"
    table = json.loads(path.read_text()) if path.exists() else {"gpu": gpu, "entries": {}}
    unique = sorted({(d, h, configs.batch_bucket(b)) for d, h, b in shapes})
    total = sum(len(candidates(h, b, DTYPES[d])) for d, h, b in unique) * 2
    progress = Progress(total)
    results = []
    for dtype_name, hidden, batch in unique:
        for direction in ("forward", "backward"):
            result = tune_shape(DTYPES[dtype_name], hidden, batch, direction, timer, device, progress, seq_len)
            results.append(result)
            if result["written"]:
                table["entries"][result["key"]] = {**result["best"], "default_ms": result["default_ms"]}
            else:
                table["entries"].pop(result["key"], None)  # an old winner that no longer wins goes
    table.update(gpu=gpu, torch=torch.__version__, triton=triton.__version__, command=command,
                 date=datetime.datetime.now().isoformat(timespec="seconds"))
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True))
    configs._tuned_table.cache_clear()
    return {"path": path, "results": results}


def result_line(result: dict) -> str:
    """One of tune_shape's results in a line: the default's time, the best candidate's, and whether it was written."""
    best = result["best"]
    if best is None:
        return RESULT.line(result["key"], "no candidate ran")
    return RESULT.line(result["key"], f"default {result['default_ms']:.3f} ms, best {best['time_ms']:.3f} ms "
                                      f"{best['path']} {best['config']} -> "
                                      f"{'written' if result['written'] else 'default kept'}")


def command(grid_name: str = "standard", shapes=(), dtypes=None, out_dir=None, command_line: str = "") -> Outcome:
    """`tritonrnn tune`: tune the (dtype, H, batch) shapes of `grid_name`'s cases (or of `shapes`) on this GPU,
    writing <GPU>.json to out_dir (default: kernels/tuned/ from a checkout, where the launchers read it, else the
    current directory); returns an Outcome: a line per key and where the file went. UsageError without a GPU or
    for a bad shape."""
    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA GPU (timings under the interpreter mean nothing)")
    shapes = [(c.dtype, c.hidden, c.batch) for c in select(grid_name, shapes, dtypes)]
    directory = out_dir or (configs.TUNED_DIR if in_checkout() else Path.cwd())
    outcome = tune(shapes, measure.cuda_timer, torch.device("cuda"), command=command_line, directory=directory)
    note = "" if outcome["path"].parent.resolve() == configs.TUNED_DIR.resolve() else \
        f" (the launchers read {configs.TUNED_DIR}: copy it there to use it)"
    return Outcome([result_line(r) for r in outcome["results"]] + [f"tuned configs: {outcome['path']}{note}"])
