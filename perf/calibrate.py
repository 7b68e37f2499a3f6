"""Calibrate the cost model on this GPU: measure its constants, write kernels/calibration/<GPU>.json.

    python -m tritonrnn.perf.calibrate OUTDIR      # a CUDA GPU only; writes OUTDIR/<GPU>.json

What it measures (each a per-step slope: the time at T2 steps minus the time at T1, over T2 - T1, so
launch and setup cancel):
- the group barrier: a persistent kernel of 32 programs whose steps do nothing but meet at the
  counter barrier the persistent layout uses (release add, acquire poll);
- the state round trip: the same, each step also reading the whole state the others wrote (.cg,
  from L2) and writing its slice: minus the barrier, the dependent L2 latency;
- the cluster barrier (sm_90+): empty steps of one 16-CTA cluster (kernels.launch.probe_barrier);
- one step of each layout the model weighs (the launchers' configs) at H = 256/1024/2048 x
  B = 16/64/256 in float32 (TF32) and bfloat16, and cuDNN's (torch.nn.RNN) at the same cells.

First of all it runs every layout's self-test (tritonrnn.selftest, as `tritonrnn selftest` does) and
records its table in calibration.txt and the file's "selftest"; a layout that did not pass it is not
measured (a cluster barrier that never opens would hang the calibration).

From them (`calibration_document`, which takes the measured numbers and runs on the CPU too): the
barriers, the L2 latency, the host launch cost (the fastest stepwise step) and cuDNN's persistent and
STANDARD figures replace the constants of tritonrnn.costmodel.Hardware; each layout's median of
measured / predicted becomes its scale. Schema: kernels/calibration/README.md. Copy the file into
kernels/calibration/ to ship it (the model reads it at run time, by the GPU's slug).
"""
import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from tritonrnn import costmodel
from tritonrnn.kernels import configs

from .table import Columns, verdicts

HIDDENS = (256, 1024, 2048)
BATCHES = (16, 64, 256)
DTYPES = ("float32", "bfloat16")
STEPS = (32, 96)  # T1, T2 of the slope
BARRIER_PROGRAMS = 32


def _slope(time_ms, steps=STEPS) -> float:
    """ns a step: (t(T2) - t(T1)) / (T2 - T1)."""
    t1, t2 = (time_ms(t) for t in steps)
    return max((t2 - t1) * 1e6 / (steps[1] - steps[0]), 0.0)


def _bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=20)


def _barrier_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def calibration_barrier(p_arrivals, p_state, T, H, ROUND_TRIP: tl.constexpr, BLOCK: tl.constexpr,
                            BLOCK_H: tl.constexpr):
        pid = tl.program_id(0)
        group = tl.num_programs(0)
        o_h = tl.arange(0, BLOCK_H)
        o_n = pid * BLOCK + tl.arange(0, BLOCK)
        for i in range(T):
            if ROUND_TRIP:  # read what every program wrote last step (L2), write this program's slice
                b_s = tl.load(p_state + (i % 2) * H + o_h, mask=o_h < H, other=0.0, cache_modifier=".cg")
                tl.store(p_state + ((i + 1) % 2) * H + o_n, tl.zeros([BLOCK], tl.float32) + tl.sum(b_s) * 0.5,
                         mask=o_n < H)
            tl.debug_barrier()
            tl.atomic_add(p_arrivals, 1, sem="release")
            waiting = True
            while waiting:
                waiting = tl.atomic_add(p_arrivals, 0, sem="acquire") < (i + 1) * group
            tl.debug_barrier()

    return calibration_barrier


def measure_barrier(device, round_trip: bool, hidden: int = 1024) -> float:
    kernel = _barrier_kernel()
    state = torch.zeros(2, hidden, device=device)

    def run(steps):
        arrivals = torch.zeros(1, dtype=torch.int32, device=device)
        return lambda: kernel[(BARRIER_PROGRAMS,)](arrivals.zero_(), state, steps, hidden, ROUND_TRIP=round_trip,
                                                   BLOCK=hidden // BARRIER_PROGRAMS, BLOCK_H=hidden,
                                                   launch_cooperative_grid=True)
    return _slope(lambda t: _bench(run(t)))


def measure_cluster_barrier(device) -> float:
    """ns a step of empty steps at the hardware cluster barrier (kernels.launch.probe_barrier: one
    cluster of 16 CTAs, the cluster layout's largest). Raises ClusterUnavailable before sm_90."""
    from tritonrnn.kernels import launch

    return _slope(lambda t: _bench(lambda: launch.probe_barrier("cluster", t, device=device)))


def measure_layout(device, layout: str, dtype: str, batch: int, hidden: int) -> float:
    from tritonrnn import kernels

    torch_dtype = getattr(torch, dtype)
    w = (torch.randn(hidden, hidden, device=device) / hidden ** 0.5).to(torch_dtype)
    h0 = torch.zeros(batch, hidden, device=device, dtype=torch_dtype)

    def time_ms(steps):
        xw = torch.randn(steps, batch, hidden, device=device).to(torch_dtype)
        return _bench(lambda: kernels.recurrence_forward(xw, h0, w, layout=layout, allow_tf32=True))
    return _slope(time_ms)


def measure_cudnn(device, dtype: str, batch: int, hidden: int) -> float:
    torch_dtype = getattr(torch, dtype)
    rnn = torch.nn.RNN(hidden, hidden).to(device=device, dtype=torch_dtype)

    def time_ms(steps):
        x = torch.randn(steps, batch, hidden, device=device, dtype=torch_dtype)
        with torch.no_grad():
            return _bench(lambda: rnn(x))
    return _slope(time_ms)


def _layouts(dtype: str, hidden: int, device=None) -> list:
    """The layouts measured at this cell: those the model weighs, less those that did not pass their
    self-test on `device` (TF32: the calibration's fp32)."""
    from tritonrnn import selftest

    return [layout for layout in configs.LAYOUTS if configs.layout_allowed(layout, hidden, getattr(torch, dtype))
            and (device is None or selftest.usable(layout, getattr(torch, dtype), device, allow_tf32=True))]


def measure(device, log=sys.stderr, out=None) -> dict:
    """Every measurement of the calibration on `device` (ns a step), into `out` as they come (an
    interrupted run keeps what it measured)."""
    out = {} if out is None else out
    out.update(gpu=torch.cuda.get_device_name(device), cells=[])
    out["barrier_ns"] = measure_barrier(device, False)
    out["round_trip_ns"] = measure_barrier(device, True)
    print(f"barrier {out['barrier_ns']:.0f} ns, round trip {out['round_trip_ns']:.0f} ns", file=log, flush=True)
    try:
        out["cluster_barrier_ns"] = measure_cluster_barrier(device)
        print(f"cluster barrier {out['cluster_barrier_ns']:.0f} ns", file=log, flush=True)
    except ValueError as exc:  # ClusterUnavailable: no clusters on this GPU; the assumed figure stays
        print(f"cluster barrier: not measured: {exc}", file=log, flush=True)
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's default for RNNs: both sides in TF32
    for dtype in DTYPES:
        for hidden in HIDDENS:
            for batch in BATCHES:
                for layout in _layouts(dtype, hidden, device) + ["cudnn"]:
                    try:
                        ns = (measure_cudnn(device, dtype, batch, hidden) if layout == "cudnn"
                              else measure_layout(device, layout, dtype, batch, hidden))
                    except Exception as exc:  # noqa: BLE001 - one failed cell must not end the calibration
                        print(f"{dtype} H={hidden} B={batch} {layout}: failed: {exc}", file=log, flush=True)
                        continue
                    out["cells"].append({"layout": layout, "dtype": dtype, "hidden": hidden, "batch": batch,
                                         "measured_ns": ns})
                    print(f"{dtype} H={hidden} B={batch} {layout}: {ns / 1e3:.2f} us a step", file=log, flush=True)
    return out


def _predicted(cell: dict, hw: costmodel.Hardware) -> float:
    if cell["layout"] == "cudnn":
        return costmodel.cudnn_step_ns(cell["dtype"], cell["batch"], cell["hidden"], hw)
    shape = costmodel.Shape(STEPS[1], cell["batch"], cell["hidden"], cell["dtype"])
    # What the launcher ran without a config: its default for the dtype (a cluster's CTA: the persistent one's).
    layout = "persistent" if cell["layout"] == "cluster" else cell["layout"]
    config = configs.default_config(layout, cell["batch"], cell["hidden"], getattr(torch, cell["dtype"]))
    return costmodel.predict(shape, hw, cell["layout"], config).step_ns


def calibration_document(measured: dict, base: costmodel.Hardware = costmodel.Hardware(), versions=None) -> dict:
    """The calibration file's content from measure()'s numbers (runs anywhere: no GPU needed)."""
    cells = measured["cells"]

    def of(layout, algorithm=None):
        return [c for c in cells if c["layout"] == layout and (
            algorithm is None or costmodel.cudnn_algorithm(c["dtype"], c["batch"], c["hidden"]) == algorithm)]

    constants = {"barrier_ns": measured["barrier_ns"],
                 "l2_latency_ns": max(measured["round_trip_ns"] - measured["barrier_ns"], 0.0)}
    if "cluster_barrier_ns" in measured:
        constants["cluster_barrier_ns"] = measured["cluster_barrier_ns"]
    stepwise = [c["measured_ns"] for c in of("stepwise")]
    if stepwise:
        constants["launch_ns"] = min(stepwise)  # the host launch is the floor of every stepwise step
    for name, algorithm, pick in (("cudnn_small_h_ns", "PERSIST_STATIC_SMALL_H", statistics.median),
                                  ("cudnn_standard_floor_ns", "STANDARD", min)):
        values = {}
        for dtype in sorted({c["dtype"] for c in of("cudnn", algorithm)}):
            values[dtype] = pick([c["measured_ns"] for c in of("cudnn", algorithm) if c["dtype"] == dtype])
        if values:
            constants[name] = {**dict(getattr(base, name)), **values}
    data = {"schema": costmodel.CALIBRATION_SCHEMA, "constants": constants}
    hw = costmodel.calibrated(base, data)
    scale = {}
    for layout in ("sequence", "persistent", "cluster"):
        ratios = [c["measured_ns"] / _predicted(c, hw) for c in of(layout)]
        if ratios:
            scale[layout] = statistics.median(ratios)
    data["layout_scale"] = scale
    hw = costmodel.calibrated(base, data)
    rows = [{**c, "predicted_default_ns": _predicted(c, base), "predicted_calibrated_ns": _predicted(c, hw)}
            for c in cells]
    return {"schema": costmodel.CALIBRATION_SCHEMA, "gpu": measured["gpu"], "slug": configs.gpu_slug(measured["gpu"]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions or {}, "steps": list(STEPS), "constants": constants, "layout_scale": scale,
            "measured": {"barrier_ns": measured["barrier_ns"], "round_trip_ns": measured["round_trip_ns"]},
            "cells": rows}


CELLS = Columns(("dtype", "<9"), ("H", ">5"), ("B", ">4"), ("layout", "<10"), ("measured", ">9"),
                ("predicted", ">9"), ("calibrated", ">10"), rest="(us a step)", gap="  ")


def table(document: dict) -> str:
    """Measured against predicted (defaults, then calibrated), one line per cell: the summary's table."""
    lines = [f"calibration of {document['gpu']}: barrier {document['measured']['barrier_ns']:.0f} ns (assumed "
             f"{costmodel.Hardware().barrier_ns:.0f}), state round trip "
             f"{document['measured']['round_trip_ns']:.0f} ns; "
             f"layout scale {json.dumps({k: round(v, 2) for k, v in document['layout_scale'].items()})}",
             CELLS.header()]
    for c in document["cells"]:
        lines.append(CELLS.line(c["dtype"], c["hidden"], c["batch"], c["layout"], *(
            f"{c[field] / 1e3:.2f}" for field in ("measured_ns", "predicted_default_ns", "predicted_calibrated_ns"))))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="where <GPU>.json and calibration.txt go")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tritonrnn.perf.calibrate: error: needs a CUDA GPU (it measures one); the offline plan "
              "(`tritonrnn info --offline h100`) uses the model's default constants", file=sys.stderr)
        return 2
    import triton

    from tritonrnn import selftest

    device = torch.device("cuda")
    versions = {"torch": torch.__version__, "triton": triton.__version__, "cudnn": torch.backends.cudnn.version()}
    checks = selftest.run_all(device)  # first: a layout that fails or hangs is not measured
    checked = verdicts(checks)
    print(checked, flush=True)
    measured = {}
    try:
        measure(device, out=measured)
    except KeyboardInterrupt:  # the device check's deadline: keep the cells measured so far
        print(f"interrupted after {len(measured.get('cells', []))} cells", file=sys.stderr)
        if "round_trip_ns" not in measured:
            return 1
    document = dict(calibration_document(measured, versions=versions), selftest=checks)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{document['slug']}.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    text = f"self-test (tritonrnn selftest) on {document['gpu']}:\n{checked}\n" + table(document)
    (args.out_dir / "calibration.txt").write_text(text + "\n")
    print(text)
    print(f"wrote {path} (copy it into kernels/calibration/ to ship it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
