"""`tritonrnn bench`: run cases for each mode and provider, and write one results file per run.

Before timing, every provider's output (cuDNN's included) is checked against one float64 run of
the case: a wrong answer is recorded as status "wrong", never as a time; when the float64 run
itself fails, the case's rows are "unchecked" (no provider is blamed). After all timing, a separate
pass profiles one call per row to record the kernels and the backend that really ran (the profiler
stays attached once used, and would slow later timings). An error that breaks the CUDA context
(an illegal address) ends the run cleanly with the rows so far. Each row is self-contained:
device, versions, settings, shape, mode, provider, backend, times, memory, kernels, floor, and the
exact command.
"""
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import traceback
from pathlib import Path

import torch
import triton

import tritonrnn
from tritonrnn.numerics import allow_tf32
from . import RESULTS_DIR, Outcome, UsageError, bench_output_dir, measure
from .grid import MODES, PROVIDERS, select
from .providers import DTYPES, Run, available, check_reference, compare, output_names
from .table import Columns

SCHEMA = 2  # 2: rel_error is norm-wise against float64; status unchecked; backend from the profiler
ROW_FIELDS = (
    "gpu", "sm_count", "driver", "torch", "triton", "cudnn", "python", "date", "command", "tf32", "matmul_tf32",
    "tuned_configs", "autotune",
    "case", "group", "dtype", "seq_len", "batch", "input_size", "hidden", "layers", "bidirectional", "packed",
    "mode", "provider", "backend", "status", "error", "median_ms", "p20_ms", "p80_ms", "peak_memory_bytes",
    "kernels", "rel_error", "floor_ms", "compute_ms", "memory_ms", "chain_ms", "flops",
)

_NUMBER, _INT, _TEXT, _FLAG = (int, float), (int,), (str,), (bool,)
# Each field's JSON types; the first group never null (the report sorts, groups and compares them).
REQUIRED_TYPES = {"case": _TEXT, "group": _TEXT, "dtype": _TEXT, "mode": _TEXT, "provider": _TEXT, "status": _TEXT,
                  "seq_len": _INT, "batch": _INT, "input_size": _INT, "hidden": _INT, "layers": _INT,
                  "bidirectional": _FLAG, "packed": _FLAG}
OPTIONAL_TYPES = {"gpu": _TEXT, "sm_count": _INT, "driver": _TEXT, "torch": _TEXT, "triton": _TEXT, "cudnn": _INT,
                  "python": _TEXT, "date": _TEXT, "command": _TEXT, "tf32": _FLAG, "matmul_tf32": _FLAG,
                  "tuned_configs": _TEXT, "autotune": _FLAG, "backend": _TEXT, "error": _TEXT, "kernels": (list,),
                  **{f: _NUMBER for f in ("median_ms", "p20_ms", "p80_ms", "peak_memory_bytes", "rel_error",
                                          "floor_ms", "compute_ms", "memory_ms", "chain_ms", "flops")}}
PROGRESS = Columns(("case", "<40"), ("mode", "<9"), ("provider", "<12"))  # a line on stderr per row measured
INTERPRETER_MAX_STATES = 1 << 17  # T x B x H x layers x directions the interpreter benchmarks in about a minute
_TYPE_NAMES = {_NUMBER: "a number", _INT: "an integer", _TEXT: "a string", _FLAG: "true or false",
               (list,): "a list of strings"}


def check_types(path, rows: list, required: dict, optional: dict) -> None:
    """ValueError naming the file, the row and the field whose value is not of its type."""
    for index, row in enumerate(rows):
        for field, types in (*required.items(), *optional.items()):
            value = row.get(field)
            if value is None and field in optional:
                continue
            # JSON has no separate bool: true is not a number here, nor 1 a flag
            if not isinstance(value, types) or (isinstance(value, bool) and types is not _FLAG) or \
                    (types == (list,) and not all(isinstance(item, str) for item in value)):
                wanted = _TYPE_NAMES[types] + ("" if field in required else " or null")
                raise ValueError(f"{path}: row {index} ({row.get('case', '?')}), field {field!r} is {value!r}, "
                                 f"not {wanted}")


def environment(device: torch.device, command: str) -> dict:
    """What every row records about where and how it was measured."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu, sms = props.name, props.multi_processor_count
        try:
            import subprocess

            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = None
    else:
        gpu, sms, driver = f"cpu ({platform.processor() or platform.machine()})", None, None
    from tritonrnn.kernels import configs

    tuned = configs.TUNED_DIR / f"{configs.gpu_slug(gpu)}.json"
    return {"gpu": gpu, "sm_count": sms, "driver": driver, "torch": torch.__version__, "triton": triton.__version__,
            "tuned_configs": tuned.name if tuned.exists() and device.type == "cuda" else None,
            "autotune": device.type == "cuda" and configs.autotune_enabled(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command, "tf32": allow_tf32(),
            "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _row(base: dict, mode: str, provider: str, floor: dict, **values) -> dict:
    row = {**base, "mode": mode, "provider": provider, **floor, "status": "ok", "error": None, **values}
    return {field: row.get(field) for field in ROW_FIELDS}


def _error(exc: Exception) -> str:
    _log(traceback.format_exc(limit=3))
    return f"{type(exc).__name__}: {exc}"[:500]


class DeviceBroken(Exception):
    """A sticky CUDA error: the context is unusable, every later call would fail too."""

    def __init__(self, message: str, rows: list):
        super().__init__(message)
        self.rows = rows


def _check_device(exc: Exception, device: torch.device, rows: list) -> None:
    """Raise DeviceBroken if `exc` left the CUDA context unusable (some errors only show at the next sync)."""
    broken = measure.is_sticky_cuda_error(exc)
    if not broken and device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.ones(1, device=device).add_(1).item()
        except RuntimeError:
            broken = True
    if broken:
        raise DeviceBroken(f"{type(exc).__name__}: {exc}"[:500], rows) from exc


def run_case(case, modes, providers, device, timer, env: dict, ceiling: dict) -> list:
    """All rows of one case: per mode, per provider. Failures become rows, never exceptions, except
    a sticky CUDA error (DeviceBroken, carrying the rows so far)."""
    dtype = DTYPES[case.dtype]
    base = {**env, "case": case.name, **dataclasses.asdict(case), "input_size": case.inputs}
    # tritonrnn's backend is what dispatch decides; cuDNN's is known only once profiled.
    backend = {"tritonrnn": tritonrnn.backend(device), "cudnn": None, "torch-native": "torch-native"}
    floors = {mode: measure.floor_ms(case, mode, dtype.itemsize, ceiling) for mode in modes}
    rows = []
    try:
        runs = {p: Run(p, case, device) for p in providers if available(p, device)}
        float64 = Run("torch-native", case, device, reference=True)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory building the case
        message = _error(exc)
        rows = [_row(base, m, p, floors[m], backend=backend[p], status="error", error=message)
                for m in modes for p in providers]
        _check_device(exc, device, rows)
        return rows
    names = output_names(float64.model)
    for mode in modes:
        try:
            reference, reference_error = float64.outputs(mode), None
            check_reference(reference)
        except Exception as exc:  # noqa: BLE001
            reference, reference_error = None, f"float64 reference failed, nothing checked: {_error(exc)}"
            _check_device(exc, device, rows)
        for provider in providers:
            row = _row(base, mode, provider, floors[mode], backend=backend[provider])
            rows.append(row)
            run = runs.get(provider)
            if run is None:
                row.update(status="unavailable", error=f"{provider} is not available on {device.type}")
            elif reference is None:
                row.update(status="unchecked", error=reference_error)
            else:
                try:
                    ok, error, why = compare(run.outputs(mode), reference, dtype, names[:len(reference)])
                    row["rel_error"] = error if math.isfinite(error) else None  # JSON has no inf
                    if not ok:
                        row.update(status="wrong", error=why)
                    else:
                        fn = run.fn(mode)
                        row.update(timer(fn))
                        if mode == "training":
                            row["peak_memory_bytes"] = measure.peak_memory(fn, device)
                except Exception as exc:  # noqa: BLE001 - a failing provider is a result, not a crash
                    row.update(status="error", error=_error(exc))
                    _check_device(exc, device, rows)
            time_text = f"{row['median_ms']:.3f} ms" if row.get("median_ms") is not None else row["status"]
            _log("  " + PROGRESS.line(case.name, mode, provider, time_text))
    del runs, float64
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile_case(case, rows, device) -> None:
    """The kernels and backend of each timed row of `case`, from one profiled call (after all timing)."""
    timed = [r for r in rows if r["status"] == "ok"]
    runs = {}
    for row in timed:
        try:
            if row["provider"] not in runs:
                runs[row["provider"]] = Run(row["provider"], case, device)
            row.update(measure.profile_call(runs[row["provider"]].fn(row["mode"]), device))
        except Exception as exc:  # noqa: BLE001 - a profiler hiccup does not void a time
            row["kernels"] = [f"profiler failed: {type(exc).__name__}: {exc}"[:160]]
            _check_device(exc, device, [])


def run(cases, modes=MODES, providers=PROVIDERS, device=None, timer=None, command: str = "", profile=True,
        after_case=None) -> dict:
    """Measure `cases`; returns {"schema", "ceilings", "rows", "complete", "stopped"}.

    `after_case(results)` runs after every case (the CLI writes the file there, so an interrupted
    run keeps what it measured); Ctrl-C / SIGINT ends the run early with complete = False, and so
    does a sticky CUDA error (its message in "stopped"). Kernel names and backends are profiled
    after all cases are timed. fp32 matmuls outside cuDNN (cuBLAS in torch-native and in
    tritonrnn's GEMMs) follow cuDNN's TF32 switch for the run, so every provider computes at the
    same precision.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = timer or measure.timer_for(device)
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32()
    env = environment(device, command)
    _log(f"benchmark on {env['gpu']}: {len(cases)} cases x {len(modes)} modes x {len(providers)} providers")
    results = {"schema": SCHEMA, "ceilings": {}, "rows": [], "complete": False, "stopped": None}
    measured = []  # (case, its rows)
    try:
        for i, case in enumerate(cases, 1):
            if case.dtype not in results["ceilings"]:
                try:
                    results["ceilings"][case.dtype] = measure.ceilings(device, DTYPES[case.dtype], timer)
                except Exception as exc:  # noqa: BLE001 - the cases still run, without a floor
                    results["ceilings"][case.dtype] = {"error": _error(exc)}
                    _check_device(exc, device, [])
                _log(f"ceilings {case.dtype}: {results['ceilings'][case.dtype]}")
            _log(f"[{i}/{len(cases)}] {case.name}")
            rows = run_case(case, modes, providers, device, timer, env, results["ceilings"][case.dtype])
            measured.append((case, rows))
            results["rows"] += rows
            if after_case:
                after_case(results)
        if profile:
            _log("profiling one call per timed row (kernel names, backend)")
            for case, rows in measured:
                profile_case(case, rows, device)
        results["complete"] = True
    except KeyboardInterrupt:
        _log(f"interrupted: keeping the {len(results['rows'])} rows measured so far")
    except DeviceBroken as exc:
        results["rows"] += exc.rows
        results["stopped"] = f"the CUDA context broke ({exc}); later cases would all fail, so the run ends here"
        _log(f"stopped: {results['stopped']}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return results


def results_path(env: dict, grid_name: str, directory: Path = RESULTS_DIR) -> Path:
    """perf/results/<date>-<gpu>-<grid>.json"""
    from tritonrnn.kernels.configs import gpu_slug

    stamp = env["date"].replace(":", "").replace("-", "")
    return directory / f"{stamp}-{gpu_slug(env['gpu'])}-{grid_name}.json"


def write(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)  # a reader never sees half a file
    return path


def run_to_file(cases, grid_name: str, directory: Path = RESULTS_DIR, **kwargs):
    """`run`, rewriting the results file after every case; returns (results, path or None)."""
    written = {}

    def save(results):
        if results["rows"]:
            written.setdefault("path", results_path(results["rows"][0], grid_name, directory))
            write(results, written["path"])

    results = run(cases, after_case=save, **kwargs)
    save(results)
    return results, written.get("path")


def load(paths) -> list:
    """Rows of the given results files; ValueError saying what is wrong with a file that is not one."""
    rows = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a results file: not JSON ({exc})") from None
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA:
            raise ValueError(f"{path} is not a results file of schema {SCHEMA} (its schema: {schema})")
        if not data.get("rows") or not all(isinstance(r, dict) and set(ROW_FIELDS) <= r.keys() for r in data["rows"]):
            raise ValueError(f"{path} holds no rows, or rows without the fields of schema {SCHEMA}")
        check_types(path, data["rows"], REQUIRED_TYPES, OPTIONAL_TYPES)
        rows += data["rows"]
    return rows


def no_autotuning() -> None:
    """Benchmarks measure the shipped tuned configs or the defaults: the autotuner would first
    tune every shape (slow, and not what a timed call runs)."""
    os.environ["TRITONRNN_AUTOTUNE"] = "0"


def device_for(cases, grid_name: str) -> torch.device:
    """The device to run `cases` (of the grid `grid_name`, "custom" for named shapes) on: the GPU, else the CPU
    under the interpreter for cases it gets through in minutes; UsageError saying why there is none that makes
    sense."""
    from tritonrnn.dispatch import interpreter_enabled

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreter_enabled():
        raise UsageError("needs a CUDA GPU; without one, TRITON_INTERPRET=1 with --grid smoke checks the harness "
                         "on the CPU (not a speed measurement)")
    if grid_name not in ("custom", "smoke"):
        raise UsageError(f"--grid {grid_name} under the interpreter (TRITON_INTERPRET=1) would take hours; use "
                         "--grid smoke (or small --shapes) to check the harness on the CPU")
    for case in cases:
        states = case.seq_len * case.batch * case.hidden * case.layers * (1 + case.bidirectional)
        if states > INTERPRETER_MAX_STATES:
            raise UsageError(f"T{case.seq_len}-B{case.batch}-H{case.hidden} x {case.layers} layer(s) x "
                             f"{1 + case.bidirectional} direction(s) under the interpreter would take hours; keep "
                             f"T x B x H x layers x directions within {INTERPRETER_MAX_STATES} (e.g. T64-B16-H128)")
    return torch.device("cpu")


def command(grid_name: str = "standard", shapes=(), dtypes=None, modes=MODES, providers=PROVIDERS, out_dir=None,
            command_line: str = "", profile: bool = True, autotune: bool = False) -> Outcome:
    """`tritonrnn bench`: the cases of `grid_name` (or of `shapes`, a grid named "custom"), restricted to
    `dtypes`, measured with the shipped or default configs (`autotune`: Triton's autotuner too) and written to
    out_dir (default: bench_output_dir()); returns an Outcome: where the results went, not ok if a row was
    wrong or failed or the run was cut short. UsageError for a bad shape or where the cases cannot run here."""
    cases = select(grid_name, shapes, dtypes)
    name = "custom" if shapes else grid_name
    device = device_for(cases, name)
    if not autotune:
        no_autotuning()
    results, path = run_to_file(cases, name, out_dir or bench_output_dir(), device=device, modes=modes,
                                providers=providers, command=command_line, profile=profile)
    failed = [r for r in results["rows"] if r["status"] in ("wrong", "error")]
    errors = [f"stopped early: {results['stopped']}"] if results["stopped"] else []
    return Outcome([f"results: {path} ({len(results['rows'])} rows, {len(failed)} wrong or failed"
                    f"{'' if results['complete'] else ', interrupted'})"], errors,
                   ok=not failed and results["complete"])
