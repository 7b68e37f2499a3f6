"""Measuring on the device: timers, peak memory, the kernels a call launches, and the floor.

The floor of a case is the largest of: its FLOPs at the GPU's measured matmul rate, its fewest
bytes at the measured copy bandwidth, and its sequential chain (layers x T steps, twice for
training) at the shortest measured step. All three ceilings are measured once per run.
"""
import statistics
import time

import torch

QUANTILES = (0.5, 0.2, 0.8)


def cuda_timer(fn, warmup_ms: int = 25, rep_ms: int = 100, min_reps: int = 10) -> dict:
    """Median and 20/80% quantiles in ms over CUDA events (triton.testing.do_bench, L2 flushed),
    over at least `min_reps` calls however slow one call is."""
    import triton.testing

    fn()  # compile and warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    rep = max(rep_ms, min_reps * start.elapsed_time(end))
    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep, quantiles=list(QUANTILES))
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def wall_timer(fn, reps: int = 3) -> dict:
    """Wall-clock timer for the CPU (the interpreter): one warm-up call, then `reps` timed calls."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1]}


def timer_for(device: torch.device):
    return cuda_timer if device.type == "cuda" else wall_timer


def peak_memory(fn, device: torch.device):
    """Bytes allocated at the peak of one call, above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def kernel_names(fn, device: torch.device, limit: int = 12) -> list:
    """The distinct GPU kernels one call launches, most time first (on the CPU: the aten ops)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals = {}
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if on_device == (device.type == "cuda") and (on_device or event.name.startswith("aten::")):
            totals[event.name] = totals.get(event.name, 0) + (event.device_time_total if on_device
                                                                else event.cpu_time_total)
    return [name[:160] for name, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:limit]]


def ceilings(device: torch.device, dtype: torch.dtype, timer) -> dict:
    """The device's measured matmul rate (FLOP/s), copy bandwidth (B/s) and shortest RNN step (ms)."""
    from tritonrnn import kernels

    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_ms = timer(lambda: a @ b)["median_ms"]  # fp32: TF32 if the run allows it (bench.run sets it)
    size = (1 << 28) if device.type == "cuda" else (1 << 22)  # 1 GiB of fp32 on a GPU
    src = torch.randn(size, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))["median_ms"]
    # The shortest dependent step: the sequence kernel at the smallest tile, time per step.
    steps = 1024 if device.type == "cuda" else 8
    xw = torch.randn(steps, 1, 16, device=device, dtype=dtype)
    h0 = torch.zeros(1, 16, device=device, dtype=dtype)
    w = torch.randn(16, 16, device=device, dtype=dtype) * 0.1
    tf32 = torch.backends.cudnn.allow_tf32
    chain_ms = timer(lambda: kernels.recurrence_forward(xw, h0, w, path="sequence", allow_tf32=tf32))["median_ms"]
    return {"matmul_flops_per_s": 2 * n ** 3 / (matmul_ms * 1e-3),
            "copy_bytes_per_s": 2 * src.numel() * src.element_size() / (copy_ms * 1e-3),
            "step_ms": chain_ms / steps}


def case_work(case, mode: str, element_size: int) -> dict:
    """FLOPs and fewest bytes of a case (training: forward + backward, about 3x the forward)."""
    directions = 2 if case.bidirectional else 1
    flops = nbytes = 0
    for layer in range(case.layers):
        inputs = case.inputs if layer == 0 else directions * case.hidden
        flops += directions * 2 * case.seq_len * case.batch * case.hidden * (inputs + case.hidden)
        activations = case.seq_len * case.batch * (inputs + directions * case.hidden)
        weights = directions * case.hidden * (inputs + case.hidden + 2)
        nbytes += (activations + weights) * element_size
    factor = 3 if mode == "training" else 1
    return {"flops": factor * flops, "bytes": factor * nbytes,
            "chain_steps": (2 if mode == "training" else 1) * case.layers * case.seq_len}


def floor_ms(case, mode: str, element_size: int, ceiling: dict) -> dict:
    work = case_work(case, mode, element_size)
    parts = {"compute_ms": work["flops"] / ceiling["matmul_flops_per_s"] * 1e3,
             "memory_ms": work["bytes"] / ceiling["copy_bytes_per_s"] * 1e3,
             "chain_ms": work["chain_steps"] * ceiling["step_ms"]}
    return {"floor_ms": max(parts.values()), **parts, "flops": work["flops"]}
