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
    "gpu", "sm_count", "driver", "torch", "triton", "cudnn", "python", "date", "command", "tf32", "tuned_configs",
    "autotune",
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
            "command": command, "tf32": bool(torch.backends.cudnn.allow_tf32)}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_case(case, modes, providers, device, timer, env: dict, ceiling: dict, profile: bool = True) -> list:
    """All rows of one case: per mode, per provider."""
    dtype = DTYPES[case.dtype]
    runs, rows = {}, []
    base = {**env, "case": case.name, **dataclasses.asdict(case), "input_size": case.inputs}
    for provider in providers:
        if available(provider, device):
            runs[provider] = Run(provider, case, device)
    reference_provider = "cudnn" if "cudnn" in runs else "torch-native" if "torch-native" in runs else None
    if reference_provider is None:
        reference_provider = "torch-native"
        runs[reference_provider] = Run(reference_provider, case, device)
    for mode in modes:
        reference = runs[reference_provider].outputs(mode)
        floor = measure.floor_ms(case, mode, dtype.itemsize, ceiling)
        for provider in providers:
            row = {**base, "mode": mode, "provider": provider, **floor, "status": "ok", "error": None,
                   "backend": tritonrnn.backend(device) if provider == "tritonrnn" else "torch"}
            run = runs.get(provider)
            if run is None:
                row.update(status="unavailable", error=f"{provider} is not available on {device.type}")
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
                        if profile:
                            row["kernels"] = measure.kernel_names(fn, device)
                except Exception as exc:  # noqa: BLE001 - a failing provider is a result, not a crash
                    row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
                    _log(traceback.format_exc(limit=3))
            rows.append({field: row.get(field) for field in ROW_FIELDS})
            time_text = f"{row['median_ms']:.3f} ms" if row.get("median_ms") is not None else row["status"]
            _log(f"  {case.name:40s} {mode:9s} {provider:12s} {time_text}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(cases, modes=MODES, providers=PROVIDERS, device=None, timer=None, command: str = "", profile=True) -> dict:
    """Measure `cases`; returns {"schema", "ceilings", "rows"}."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = timer or measure.timer_for(device)
    env = environment(device, command)
    _log(f"benchmark on {env['gpu']}: {len(cases)} cases x {len(modes)} modes x {len(providers)} providers")
    ceilings = {}
    rows = []
    for i, case in enumerate(cases, 1):
        if case.dtype not in ceilings:
            ceilings[case.dtype] = measure.ceilings(device, DTYPES[case.dtype], timer)
            _log(f"ceilings {case.dtype}: {ceilings[case.dtype]}")
        _log(f"[{i}/{len(cases)}] {case.name}")
        rows += run_case(case, modes, providers, device, timer, env, ceilings[case.dtype], profile)
    return {"schema": SCHEMA, "ceilings": ceilings, "rows": rows}


def write(results: dict, grid_name: str, directory: Path = RESULTS_DIR) -> Path:
    """perf/results/<date>-<gpu>-<grid>.json"""
    from tritonrnn.kernels.config import gpu_slug

    rows = results["rows"]
    stamp = rows[0]["date"].replace(":", "").replace("-", "") if rows else "empty"
    gpu = gpu_slug(rows[0]["gpu"]) if rows else "none"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}-{gpu}-{grid_name}.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def load(paths) -> list:
    """Rows of the given results files."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{path}: results schema {data.get('schema')}, expected {SCHEMA}")
        rows += data["rows"]
    return rows
