"""The self-test gate: a layout proves itself on a device before the dispatcher takes it.

Before the dispatcher first takes a layout (sequence, persistent, streamed, cluster; stepwise is the reference
and always trusted) for a dtype on a device, `usable` runs it once at a few small shapes, forward and
backward (one and both directions for the persistent kernel's layouts), its outputs poisoned with
NaN, against the stepwise layout and a float64 reference, under a time limit. A layout that fails,
exceeds the limit or is refused by the driver is unusable on that device: one warning names it and
the reason, and the dispatcher (tritonrnn.dispatch.choose) takes its next layout.

A device is its GPU name, compute capability, driver, CUDA, Triton, torch and tritonrnn versions and
the kernels' sources (`device_key`). Verdicts are cached on disk per device, in
$TRITONRNN_CACHE_DIR, else $XDG_CACHE_HOME/tritonrnn, else ~/.cache/tritonrnn (`cache_path`); a check
writes "pending" there before its first launch, so a check that hangs the process (the cluster
barrier cannot be timed out) or crashes it leaves a verdict the next process reads as failed.

On by default on CUDA; TRITONRNN_SELFTEST=0 turns it off (every layout trusted), TRITONRNN_SELFTEST=1
turns it on under Triton's interpreter too (off there by default: the CPU tests would pay for it).
While a CUDA graph is captured nothing may run: an untested layout is then not taken.
`tritonrnn selftest` runs every layout and prints the table (`run_all`; perf.table.verdicts).
"""
import contextlib
import ctypes
import datetime
import functools
import hashlib
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path

import torch
import triton

from tritonrnn import kernels, reference
from tritonrnn.kernels import configs
from tritonrnn.kernels import launch, occupancy

GATED = ("sequence", "persistent", "streamed", "cluster")  # stepwise is the reference: always trusted
SCHEMA = 1
# The GPU work of one layout's checks, counted once its launches have returned (compilation is done
# by then): small shapes take milliseconds, so a layout past this limit hangs.
TIME_LIMIT_S = 10.0
# Under the interpreter a layout's checks run on the host: the limit covers all of them.
INTERPRETED_TIME_LIMIT_S = 120.0
# The persistent kernel's own wait limit during its checks (kernels.launch.WAIT_TIMEOUT_S otherwise).
WAIT_LIMIT_S = 2.0
# The checks (T, B, H, lengths, both directions): the persistent kernel's layouts at H > BLOCK_N (several
# programs or CTAs a group meet at the barrier: clusters of 4, and of 8 and 16 where the dtype makes them
# at H = 512 and 1024), H not a multiple of 16 (padded slices), several batch tiles; the sequence layout
# at sizes it takes. The interpreter's are smaller (its programs run one at a time: a group is one
# program there whatever H). A case the layout does not run in a dtype is left out (`cases`).
CASES = {"cuda": {"sequence": ((6, 5, 64, True, False), (4, 20, 40, False, False)),
                  "grouped": ((6, 5, 256, True, False), (4, 20, 200, False, False), (5, 3, 256, True, True),
                              (3, 4, 512, False, False), (3, 4, 1024, False, False))},
         "cpu": {"sequence": ((4, 3, 16, True, False), (3, 5, 24, False, False)),
                 "grouped": ((4, 3, 40, True, False), (3, 5, 24, False, True))}}
# Errors against the float64 reference, relative to its largest magnitude (tests/conftest.py's table;
# TF32 multiplies with a 10-bit mantissa, like fp16); a layout may also be as far off as the stepwise
# layout, twice over.
TOLERANCE = {"float64": (1e-10, 1e-10), "float32": (2e-5, 2e-5), "float32/tf32": (5e-3, 1e-2),
             "float16": (5e-3, 1e-2), "bfloat16": (3e-2, 5e-2)}


class SelfTestHang(RuntimeError):
    """A layout's self-test kernels still ran past the time limit: the GPU is held by them (a hardware
    barrier that never opens cannot be stopped from the host). The verdict is saved first."""


def enabled(device: torch.device) -> bool:
    """Whether the gate runs for `device`: TRITONRNN_SELFTEST=0/1, else on CUDA only."""
    value = os.environ.get("TRITONRNN_SELFTEST")
    if value is not None:
        return value.strip().lower() not in ("0", "false", "no", "off")
    return device.type == "cuda"


def variant(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The dtype a layout serves, as its verdict is keyed: 'float32/tf32' where fp32 multiplies in TF32."""
    name = configs.dtype_name(dtype)
    return name + "/tf32" if dtype == torch.float32 and allow_tf32 else name


def _driver() -> str:
    """The NVIDIA driver's version (the kernel module's, e.g. 570.124.06), else the CUDA version it supports."""
    try:
        first = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
        return next((word for word in first.split() if word[:1].isdigit() and "." in word), first)
    except (OSError, IndexError):
        version = ctypes.c_int()
        if occupancy.libcuda().cuDriverGetVersion(ctypes.byref(version)) != 0:
            return "unknown"
        return f"CUDA {version.value // 1000}.{version.value % 1000 // 10} driver"


@functools.lru_cache(maxsize=None)
def _sources_hash() -> str:
    """The kernels' sources: an edited kernel is a new kernel, whatever the version says."""
    digest = hashlib.sha256()
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _device_key(kind: str, index: int) -> tuple:
    import tritonrnn  # (its __init__ imports dispatch, which imports this module)

    key = {"triton": triton.__version__, "torch": torch.__version__, "tritonrnn": tritonrnn.__version__,
           "kernels": _sources_hash()}
    if kind == "cuda":
        props = torch.cuda.get_device_properties(index)
        key.update(gpu=props.name, capability=f"{props.major}.{props.minor}", driver=_driver(),
                   cuda=torch.version.cuda)
    else:
        key.update(gpu="Triton interpreter (CPU)")
    return tuple(sorted(key.items()))


def device_key(device: torch.device) -> dict:
    """What identifies a device's verdicts: GPU name, compute capability, driver, CUDA, Triton, torch and
    tritonrnn versions, and the kernels' sources."""
    return dict(_device_key(device.type, _index(device)))


def _index(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def cache_dir() -> Path:
    """$TRITONRNN_CACHE_DIR, else $XDG_CACHE_HOME/tritonrnn, else ~/.cache/tritonrnn."""
    if os.environ.get("TRITONRNN_CACHE_DIR"):
        return Path(os.environ["TRITONRNN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tritonrnn"


def cache_path(device: torch.device) -> Path:
    """The verdict file of `device` (one per device key). Looked up on every dispatch: memoized."""
    return _cache_path(device.type, _index(device), os.environ.get("TRITONRNN_CACHE_DIR"),
                       os.environ.get("XDG_CACHE_HOME"))


@functools.lru_cache(maxsize=None)
def _cache_path(kind: str, index: int, relocated, xdg) -> Path:
    """(cache_dir() reads the two variables itself: they are in the key so that a change is seen.)"""
    key = json.dumps(_device_key(kind, index))
    return cache_dir() / f"selftest-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("verdicts", {}) if isinstance(data, dict) and data.get("schema") == SCHEMA else {}


def _write(device: torch.device, name: str, verdict) -> None:
    """Merge one verdict (None: remove it) into the device's file (a rename: never half a file). An
    unwritable cache leaves the verdict in this process only."""
    path = cache_path(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        verdicts = {k: v for k, v in {**_read(path), name: verdict}.items() if v is not None}
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        partial.write_text(json.dumps({"schema": SCHEMA, "device": device_key(device), "verdicts": verdicts},
                                      indent=1, sort_keys=True) + "\n")
        os.replace(partial, path)
    except OSError:
        pass


# Verdicts of this process: (cache file, "layout/variant") -> verdict; and those warned about.
_VERDICTS = {}
_WARNED = set()


def reset() -> None:
    """Forget this process's verdicts and warnings (the files stay): tests."""
    _VERDICTS.clear()
    _WARNED.clear()


def _alive(pending: dict) -> bool:
    """Whether the process that wrote a pending verdict may still be running its check."""
    if pending.get("host") != socket.gethostname():
        return True  # another machine sharing the cache: not ours to judge
    try:
        os.kill(int(pending.get("pid", -1)), 0)
    except (OSError, ValueError):
        return False
    return True


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def usable(layout: str, dtype: torch.dtype, device: torch.device, allow_tf32: bool = True) -> bool:
    """Whether the dispatcher may take `layout` for `dtype` on `device`: stepwise always; with the gate
    off, every layout; else its verdict (this process's, the cache file's, or a check run now, once).
    While a CUDA graph is captured no check runs: an untested layout is not taken then."""
    if layout not in GATED or not enabled(device):
        return True
    name = f"{layout}/{variant(dtype, allow_tf32)}"
    key = (cache_path(device), name)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = _read(key[0]).get(name)
        if verdict is not None and verdict["status"] == "pending":
            verdict = None if _alive(verdict) else _unfinished(device, name, verdict)
        if verdict is None and _capturing(device):
            _warn_once(("capture", key), f"tritonrnn: the {layout} layout has not passed its self-test on this "
                       f"device in {variant(dtype, allow_tf32)} and no self-test can run while a CUDA graph is "
                       f"captured: the next layout runs instead. Run the model once before capturing.")
            return False
        if verdict is None:
            verdict = check(layout, dtype, device, allow_tf32)
        _VERDICTS[key] = verdict
    if verdict["status"] != "passed":
        _warn_once(key, f"tritonrnn: the {layout} layout did not pass its self-test on {device_key(device)['gpu']} in "
                   f"{variant(dtype, allow_tf32)} ({verdict['status']}: {verdict['reason']}); the dispatcher takes "
                   f"the next layout. Verdict cached in {key[0]} (delete it to test again, or run `tritonrnn "
                   f"selftest`).")
    return verdict["status"] == "passed"


def _warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _unfinished(device: torch.device, name: str, pending: dict) -> dict:
    verdict = _verdict("did not finish", f"its check started at {pending.get('started')} (process "
                       f"{pending.get('pid')}) never ended: that process hung or crashed in it", 0.0)
    _write(device, name, verdict)
    return verdict


def _verdict(status: str, reason: str, seconds: float) -> dict:
    return {"status": status, "reason": reason, "seconds": round(seconds, 3),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def cases(layout: str, dtype: torch.dtype, device: torch.device, allow_tf32: bool) -> list:
    """The (T, B, H, lengths, both directions) checks of `layout` in `dtype` on `device`: the shapes
    the dispatcher could give it (kernels.configs's size rules and cluster sizes) whose config loads on
    this device (its shared memory)."""
    # Clusters of several CTAs (the GPU's shapes) also elsewhere, which check() says refuses them.
    kind = "cuda" if device.type == "cuda" or layout == "cluster" else "cpu"
    table = CASES[kind]["sequence" if layout == "sequence" else "grouped"]
    out = []
    for case in table:
        loads = configs.config_fits(layout, _config(layout, case[1], case[2], dtype), case[2], dtype, allow_tf32,
                                    configs.shared_memory_budget(device))
        # The size rules (max_hidden), not the model's weighing: the streamed layout runs any H it is given.
        if loads and case[2] <= configs.max_hidden(layout, dtype, allow_tf32, weighed=True) and (
                layout != "cluster" or configs.layout_fits("cluster", case[2], dtype, allow_tf32)):
            out.append(case)
    return out


def _inputs(T: int, B: int, H: int, lengths: bool, directions: int, seed: int) -> dict:
    """A check's float64 inputs, on the CPU whatever the default device (the reference runs there)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.5):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, device="cpu") * scale

    dims = (directions,) if directions > 1 else ()
    rows = torch.arange(B, device="cpu").remainder(T).flip(0) + 1 if lengths else None
    return {"xw": randn(*dims, T, B, H), "h0": randn(*dims, B, H), "w_hh": randn(*dims, H, H, scale=H ** -0.5),
            "grad": randn(*dims, T, B, H), "lengths": rows}


def _references(p: dict, directions: int) -> tuple:
    """float64 out, h_n and dz of every direction (direction 1 walks in reverse)."""
    results = []
    for d in range(directions):
        xw, h0, w_hh, grad = (_of(p[k], d, directions) for k in ("xw", "h0", "w_hh", "grad"))
        identity = torch.eye(w_hh.shape[0], dtype=torch.float64, device="cpu")  # xw is already projected
        out, h_n = reference.forward(xw, h0, identity, w_hh, lengths=p["lengths"], reverse=d == 1)
        dz, _, _ = reference.recurrence_backward(out, h0, w_hh, grad, torch.zeros_like(h0), lengths=p["lengths"],
                                                 reverse=d == 1)
        results.append((out, h_n, dz))
    return _stacked(results)


def _run(layout: str, p: dict, ref_out: torch.Tensor, directions: int, dtype: torch.dtype, device: torch.device,
         allow_tf32: bool) -> tuple:
    """One check's launches on `layout` (both directions stacked where there are two): out, h_n, dz."""
    cast = {k: None if v is None else v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in p.items()}
    B, H = cast["h0"].shape[-2:]
    options = dict(lengths=cast["lengths"], allow_tf32=allow_tf32, config=_config(layout, B, H, dtype), layout=layout)
    out, h_n = kernels.recurrence_forward(cast["xw"], cast["h0"], cast["w_hh"], **options)
    dz = kernels.recurrence_backward(cast["grad"], ref_out.to(device=device, dtype=dtype), cast["w_hh"], **options)
    return out, h_n, dz


def _of(tensor: torch.Tensor, direction: int, directions: int) -> torch.Tensor:
    """One direction's tensor of a check (both stacked on dim 0 where there are two)."""
    return tensor[direction] if directions > 1 else tensor


def _stacked(results: list) -> tuple:
    """(out, h_n, dz) of each direction -> each stacked over the directions (one direction: as is)."""
    return tuple(torch.stack(r) for r in zip(*results, strict=True)) if len(results) > 1 else results[0]


def _config(layout: str, batch: int, hidden: int, dtype: torch.dtype):
    """The launcher's default config (never Triton's autotuner: it would time every config first)."""
    return configs.default_config(layout, batch, hidden, dtype)


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual = actual.detach().double().cpu()
    if actual.isnan().any():
        return math.nan
    return (actual - expected).abs().max().item() if actual.numel() else 0.0


def _compare(layout: str, got: tuple, stepwise: tuple, refs: tuple, name: str, case: tuple) -> str:
    """'' where every output is within the tolerance of `name` (or within twice the stepwise layout's
    error), else what is wrong."""
    atol, rtol = TOLERANCE[name]
    for what, actual, trusted, expected in zip(("out", "h_n", "dz"), got, stepwise, refs, strict=True):
        error, trusted_error = _error(actual, expected), _error(trusted, expected)
        bound = max(atol + rtol * expected.abs().max().item(), 2 * trusted_error)
        if not error <= bound:  # NaN included: an element the kernel never wrote
            T, B, H, lengths, both = case
            at = f"T={T} B={B} H={H}{' with lengths' if lengths else ''}{' both directions' if both else ''}"
            found = "NaN (an element never written)" if math.isnan(error) else f"max error {error:.3g}"
            return f"{what} at {at}: {found} against float64, allowed {bound:.3g} (stepwise: {trusted_error:.3g})"
    return ""


def check(layout: str, dtype: torch.dtype, device: torch.device, allow_tf32: bool = True) -> dict:
    """Run `layout`'s self-test now, save and return its verdict: {"status": "passed", "failed", "refused",
    "timed out", "not run" (no check shape runs on it) or "did not finish", "reason", "seconds", "date"}."""
    name = f"{layout}/{variant(dtype, allow_tf32)}"
    todo = cases(layout, dtype, device, allow_tf32)
    if not todo:
        return _verdict("not run", "no check shape runs on this layout in this dtype", 0.0)
    refusal = launch.cluster_refusal(device) if layout == "cluster" else None
    if refusal:
        return _verdict("refused", f"no cluster launch runs on {device.type} here: {refusal}", 0.0)
    _write(device, name, {"status": "pending", "pid": os.getpid(), "host": socket.gethostname(),
                          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    start = time.perf_counter()
    try:
        verdict = _checked(layout, todo, dtype, device, allow_tf32, start)
    except (occupancy.ClusterUnavailable, occupancy.LaunchRefused) as refusal:
        verdict = _verdict("refused", str(refusal), time.perf_counter() - start)
    except (occupancy.BarrierTimeout, _TimeLimit) as timeout:
        verdict = _verdict("timed out", str(timeout), time.perf_counter() - start)
    except SelfTestHang as hang:
        _write(device, name, _verdict("timed out", str(hang), time.perf_counter() - start))
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the layout is its verdict
        verdict = _verdict("failed", f"{type(error).__name__}: {error}", time.perf_counter() - start)
    except BaseException:  # interrupted on the host: no verdict, the next use tests again
        _write(device, name, None)
        raise
    _write(device, name, verdict)
    return verdict


def _checked(layout: str, todo: list, dtype: torch.dtype, device: torch.device, allow_tf32: bool,
             start: float) -> dict:
    name = variant(dtype, allow_tf32)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    checks = []
    for i, case in enumerate(todo):
        directions = 2 if case[4] else 1
        # Rounded to the dtype first: the reference then differs from the kernels by their arithmetic only.
        p = {k: v if v is None or not v.is_floating_point() else v.to(dtype).double()
             for k, v in _inputs(*case[:4], directions, seed=i).items()}
        checks.append((case, directions, p, _references(p, directions)))
    with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()), torch.no_grad():
        began = time.perf_counter()
        with launch.checking(WAIT_LIMIT_S):
            results = [_run(layout, p, refs[0], directions, dtype, device, allow_tf32)
                       for _, directions, p, refs in checks]
        _wait(layout, stream, began)  # the layout's kernels, before anything else runs behind them
        trusted = [_run("stepwise", p, refs[0], directions, dtype, device, allow_tf32)
                   for _, directions, p, refs in checks]
    for (case, _, _, refs), got, reference_run in zip(checks, results, trusted, strict=True):
        wrong = _compare(layout, got, reference_run, refs, name, case)
        if wrong:
            return _verdict("failed", wrong, time.perf_counter() - start)
    return _verdict("passed", f"{len(todo)} shape(s), forward and backward, within the tolerance of {name}",
                    time.perf_counter() - start)


def _wait(layout: str, stream, began: float) -> None:
    """Wait for the layout's kernels within the time limit: on a GPU by polling an event (a hung kernel
    cannot be stopped, only noticed: SelfTestHang); under the interpreter they ran on the host."""
    if stream is None:
        elapsed = time.perf_counter() - began
        if elapsed > INTERPRETED_TIME_LIMIT_S:
            raise _TimeLimit(f"its checks took {elapsed:.1f} s, over the limit of {INTERPRETED_TIME_LIMIT_S} s")
        return
    done = stream.record_event()
    deadline = time.perf_counter() + TIME_LIMIT_S
    while not done.query():
        if time.perf_counter() > deadline:
            raise SelfTestHang(f"the {layout} layout's self-test kernels still ran {TIME_LIMIT_S} s after their "
                               f"launch (small shapes take milliseconds): they are likely stuck at a barrier and "
                               f"hold the GPU. The verdict is saved, so the next process does not take this layout; "
                               f"restart this one.")
        time.sleep(1e-3)


class _TimeLimit(Exception):
    """The interpreter's checks took longer than their limit."""


def served(device: torch.device) -> list:
    """(dtype, allow_tf32) the layouts serve on `device`: on a GPU every dtype, fp32 with TF32 and without;
    under the interpreter fp64 and fp32 (its bf16 is wrong, its fp16 slow, and it ignores TF32)."""
    if device.type == "cuda":
        return [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                (torch.float64, False)]
    return [(torch.float64, False), (torch.float32, False)]


def run_all(device: torch.device, variants: list = None) -> list:
    """Check every gated layout in each (dtype, allow_tf32) of `variants` (default: `served`) now (the
    cache is rewritten): rows {"layout", "dtype", verdict's keys}, the stepwise reference listed first."""
    variants = served(device) if variants is None else variants
    rows = [{"layout": "stepwise", "dtype": "all", "status": "reference", "reason": "the trusted path", "seconds": 0}]
    hung = None
    for layout in GATED:  # the cluster last: its barrier is the one that cannot be timed out
        for dtype, allow_tf32 in variants:
            if hung is not None:  # the GPU is held by the hung kernels: nothing more can be trusted to finish
                verdict = _verdict("not run", f"an earlier check hung: {hung}", 0.0)
            else:
                try:
                    verdict = check(layout, dtype, device, allow_tf32)
                except SelfTestHang as error:
                    hung, verdict = error, _verdict("timed out", str(error), TIME_LIMIT_S)
                _VERDICTS[(cache_path(device), f"{layout}/{variant(dtype, allow_tf32)}")] = verdict
            rows.append({"layout": layout, "dtype": variant(dtype, allow_tf32), **verdict})
    return rows
