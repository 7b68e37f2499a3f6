"""`tritonrnn bench`: run cases for each mode and provider, and write one results file per run.

Before timing, every provider's output is checked against the reference provider's (cuDNN where
it exists, else torch-native): a wrong answer is recorded as status "wrong", never as a time.
Each row is self-contained: device, versions, settings, shape, mode, provider, times, memory,
kernels, floor, and the exact command.
"""
import dataclasses
import datetime
import json
import platform
import sys
import traceback
from pathlib import Path

import torch
import triton

import tritonrnn
from . import RESULTS_DIR, measure
from .grid import MODES, PROVIDERS
from .providers import DTYPES, Run, available, compare

SCHEMA = 1
ROW_FIELDS = (
    "gpu", "sm_count", "driver", "torch", "triton", "cudnn", "python", "date", "command", "tf32", "matmul_tf32",
    "tuned_configs", "autotune",
    "case", "group", "dtype", "seq_len", "batch", "input_size", "hidden", "layers", "bidirectional", "packed",
    "mode", "provider", "backend", "status", "error", "median_ms", "p20_ms", "p80_ms", "peak_memory_bytes",
    "kernels", "max_rel_error", "floor_ms", "compute_ms", "memory_ms", "chain_ms", "flops",
)


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
    from tritonrnn.kernels import config as configs

    tuned = configs.TUNED_DIR / f"{configs.gpu_slug(gpu)}.json"
    return {"gpu": gpu, "sm_count": sms, "driver": driver, "torch": torch.__version__, "triton": triton.__version__,
            "tuned_configs": tuned.name if tuned.exists() and device.type == "cuda" else None,
            "autotune": device.type == "cuda" and configs.autotune_enabled(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command, "tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _row(base: dict, mode: str, provider: str, floor: dict, **values) -> dict:
    row = {**base, "mode": mode, "provider": provider, **floor, "status": "ok", "error": None, **values}
    return {field: row.get(field) for field in ROW_FIELDS}


def _error(exc: Exception) -> str:
    _log(traceback.format_exc(limit=3))
    return f"{type(exc).__name__}: {exc}"[:500]


def run_case(case, modes, providers, device, timer, env: dict, ceiling: dict, profile: bool = True) -> list:
    """All rows of one case: per mode, per provider. Failures become rows, never exceptions."""
    dtype = DTYPES[case.dtype]
    base = {**env, "case": case.name, **dataclasses.asdict(case), "input_size": case.inputs}
    backend = {p: tritonrnn.backend(device) if p == "tritonrnn" else "torch" for p in providers}
    floors = {mode: measure.floor_ms(case, mode, dtype.itemsize, ceiling) for mode in modes}
    try:
        runs = {p: Run(p, case, device) for p in providers if available(p, device)}
        reference_provider = "cudnn" if "cudnn" in runs else "torch-native"
        if reference_provider not in runs:
            runs[reference_provider] = Run(reference_provider, case, device)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory building the case
        message = _error(exc)
        return [_row(base, m, p, floors[m], backend=backend[p], status="error", error=message)
                for m in modes for p in providers]
    rows = []
    for mode in modes:
        try:
            reference, reference_error = runs[reference_provider].outputs(mode), None
        except Exception as exc:  # noqa: BLE001
            reference, reference_error = None, f"{reference_provider} failed: {_error(exc)}"
        for provider in providers:
            row = _row(base, mode, provider, floors[mode], backend=backend[provider])
            run = runs.get(provider)
            if run is None:
                row.update(status="unavailable", error=f"{provider} is not available on {device.type}")
            elif reference is None:
                row.update(status="error", error=reference_error)
            else:
                try:
                    ok, error = compare(run.outputs(mode), reference, dtype)
                    row["max_rel_error"] = error
                    if not ok:
                        row.update(status="wrong", error=f"differs from {reference_provider} by {error:.3g} "
                                                         f"(relative), over the {case.dtype} tolerance")
                    else:
                        fn = run.fn(mode)
                        row.update(timer(fn))
                        if mode == "training":
                            row["peak_memory_bytes"] = measure.peak_memory(fn, device)
                except Exception as exc:  # noqa: BLE001 - a failing provider is a result, not a crash
                    row.update(status="error", error=_error(exc))
                if profile and provider != "tritonrnn" and row["status"] == "ok":
                    try:  # which kernels the baselines ran (cuDNN's persistent algorithm or not)
                        row["kernels"] = measure.kernel_names(run.fn(mode), device)
                    except Exception as exc:  # noqa: BLE001 - a profiler hiccup does not void a time
                        row["kernels"] = [f"profiler failed: {type(exc).__name__}"]
            rows.append(row)
            time_text = f"{row['median_ms']:.3f} ms" if row.get("median_ms") is not None else row["status"]
            _log(f"  {case.name:40s} {mode:9s} {provider:12s} {time_text}")
    if device.type == "cuda":
        del runs
        torch.cuda.empty_cache()
    return rows


def run(cases, modes=MODES, providers=PROVIDERS, device=None, timer=None, command: str = "", profile=True,
        after_case=None) -> dict:
    """Measure `cases`; returns {"schema", "ceilings", "rows", "complete"}.

    `after_case(results)` runs after every case (the CLI writes the file there, so an interrupted
    run keeps what it measured); Ctrl-C / SIGINT ends the run early with complete = False.
    fp32 matmuls outside cuDNN (cuBLAS in torch-native and in tritonrnn's GEMMs) follow cuDNN's
    TF32 switch for the run, so every provider computes at the same precision.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = timer or measure.timer_for(device)
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    env = environment(device, command)
    _log(f"benchmark on {env['gpu']}: {len(cases)} cases x {len(modes)} modes x {len(providers)} providers")
    results = {"schema": SCHEMA, "ceilings": {}, "rows": [], "complete": False}
    try:
        for i, case in enumerate(cases, 1):
            if case.dtype not in results["ceilings"]:
                results["ceilings"][case.dtype] = measure.ceilings(device, DTYPES[case.dtype], timer)
                _log(f"ceilings {case.dtype}: {results['ceilings'][case.dtype]}")
            _log(f"[{i}/{len(cases)}] {case.name}")
            results["rows"] += run_case(case, modes, providers, device, timer, env, results["ceilings"][case.dtype],
                                        profile)
            if after_case:
                after_case(results)
        results["complete"] = True
    except KeyboardInterrupt:
        _log(f"interrupted: keeping the {len(results['rows'])} rows measured so far")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return results


def results_path(env: dict, grid_name: str, directory: Path = RESULTS_DIR) -> Path:
    """perf/results/<date>-<gpu>-<grid>.json"""
    from tritonrnn.kernels.config import gpu_slug

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
    """Rows of the given results files."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{path}: results schema {data.get('schema')}, expected {SCHEMA}")
        rows += data["rows"]
    return rows
