"""The results files `tritonrnn report` renders: where it looks, which file of each kind is the newest, which
are CPU runs (the interpreter's check of the harness, not a measurement), and loading them by kind."""
import json
import re
from pathlib import Path

from . import UsageError, in_checkout, output_dir


def check_paths(files, folder) -> None:
    """UsageError unless each of `files` is a file and `folder` (None: not given) a folder, saying which kind of
    path is wanted where one was given the other (--results takes files, --results-dir a folder); a folder that
    does not exist is refused only where it is the only source."""
    for source in files:
        if source.is_dir():
            raise UsageError(f"results file {source} is a folder: --results takes files (a folder goes to "
                             f"--results-dir)")
        if not source.is_file():
            raise UsageError(f"results file {source} does not exist")
    if folder is not None and folder.exists() and not folder.is_dir():
        raise UsageError(f"results directory {folder} is a file: --results-dir takes a folder (a file goes to "
                         f"--results)")
    if folder is not None and not files and not folder.is_dir():
        raise UsageError(f"results directory {folder} does not exist")


def folders(folder=None) -> list:
    """Where report looks for results: `folder` where given, else where bench writes (the checkout's
    perf/results/, or the current directory for an installed copy) and the package's own results."""
    from . import RESULTS_DIR  # read at each call: a test (or an installed copy's stand-in) may move it

    if folder is not None:
        return [folder]
    return list(dict.fromkeys([output_dir("results"), RESULTS_DIR]))


def stamp(path: Path) -> tuple:
    """Sort key of a results file: the time stamp in its name (bench's and --output-layer's files
    both carry one, at different places), then the name."""
    match = re.search(r"(\d{8})T?-?(\d{6})", path.name)
    return ("".join(match.groups()) if match else "", path.name)


def is_cpu_run(path: Path) -> bool:
    """Whether a results file is a CPU run (the interpreter's check of the harness, not a measurement)."""
    try:
        rows = json.loads(path.read_text()).get("rows") or []
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return any(isinstance(r, dict) and str(r.get("gpu") or r.get("device") or "").startswith("cpu") for r in rows)


def newest(dirs, skip_cpu: bool) -> tuple[list, list, list]:
    """([the newest grid results file], [the newest output-layer results file], [the CPU runs skipped]) in these
    folders. With skip_cpu (report's own folders, not a folder asked for) CPU runs are skipped: they are no
    report's source unless asked for."""
    from .output_layer import is_results_file

    files = [p for d in dirs if d.is_dir() for p in d.glob("*.json")]
    cpu = [p for p in files if skip_cpu and is_cpu_run(p)]
    files = [p for p in files if p not in cpu]
    layer = [p for p in files if is_results_file(p)]
    grid_files = [p for p in files if p not in layer]
    return sorted(grid_files, key=stamp)[-1:], sorted(layer, key=stamp)[-1:], cpu


def skipped_text(cpu: list) -> str:
    """The note that CPU runs were skipped, naming the newest."""
    return (f"skipped {len(cpu)} CPU run(s), not measurements (the newest: {max(cpu, key=stamp)}); "
            f"--results FILE (or --results-dir DIR) renders one")


def none_found_text(dirs) -> str:
    """Where report looked and found nothing, and how to measure."""
    device_check = " (or perf/device_check.sh)" if in_checkout() else ""
    return (f"No results to render in {' or '.join(str(d) for d in dirs)}. Measure on a GPU with `tritonrnn bench`"
            f"{device_check}, which writes to {output_dir('results')}, or pass --results FILE.")


def load(files) -> tuple[list, list, list, list]:
    """(grid results files, their rows, output-layer results files, their rows) of `files`, each by its kind;
    UsageError naming a file that is not a results file of its kind and what writes one."""
    from . import bench, output_layer

    layer_files = [f for f in files if output_layer.is_results_file(f)]
    grid_files = [f for f in files if f not in layer_files]
    try:
        rows = bench.load(grid_files)
    except ValueError as exc:
        raise UsageError(f"{exc}; pass a file that `tritonrnn bench` wrote") from None
    try:
        layer_rows = output_layer.load(layer_files)
    except ValueError as exc:
        raise UsageError(f"{exc}; pass a file that `tritonrnn bench --output-layer` wrote") from None
    return grid_files, rows, layer_files, layer_rows
