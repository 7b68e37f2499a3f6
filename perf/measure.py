"""Measuring on the device: timers, peak memory, the kernels a call launches, and the floor.

The floor of a case is a lower bound on its time, the largest of: its FLOPs at the GPU's measured
matmul rate, its fewest bytes at the measured copy bandwidth, and its sequential chain (layers x T
steps, twice for training) at the shortest dependent step (a load-free chain of 16x16x16 tensor-core
matmuls, not this project's kernel). Packed cases count their real lengths. All three ceilings are
measured once per dtype and run.
"""
import contextlib
import os
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

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


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null for the block: torch's profiler (kineto) prints 'USDT: ...
    profiler_start' and 'profiler_stop' there from C++ at every profile (KINETO_LOG_LEVEL does not turn
    them off). Python's sys.stderr (warnings, messages) still goes where it went."""
    python_stderr = sys.stderr
    python_stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    sys.stderr = open(os.dup(saved), "w", buffering=1)
    try:
        yield
    finally:
        _flush_c_stdio()  # what C++ buffered goes to /dev/null, not out afterwards
        sys.stderr.close()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _flush_c_stdio() -> None:
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to reach: at worst the lines come out
        pass


def profile_call(fn, device: torch.device, limit: int = 12) -> dict:
    """One call under torch.profiler: {"kernels": the distinct GPU kernels, most time first (on the
    CPU: the aten ops), "backend": which implementation of the RNN ran}.

    The backend comes from the operators the call dispatched: aten::_cudnn_rnn is cuDNN (torch may
    route a cuDNN-enabled call to its native kernels instead, e.g. bf16 before cuDNN 9.13),
    tritonrnn::* is this project's kernels, anything else torch's native RNN.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _native_stderr_silenced():
        with profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
    totals, ops = {}, set()
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if not on_device:
            ops.add(event.name)
        if on_device == (device.type == "cuda") and (on_device or event.name.startswith("aten::")):
            totals[event.name] = totals.get(event.name, 0) + (event.device_time_total if on_device
                                                                else event.cpu_time_total)
    kernels = [name[:160] for name, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:limit]]
    return {"kernels": kernels, "backend": backend_from_ops(ops, device)}


def backend_from_ops(ops, device: torch.device) -> str:
    """Which RNN implementation ran, from the names of the operators a call dispatched."""
    from tritonrnn.dispatch import backend

    if "aten::_cudnn_rnn" in ops:
        return "cudnn"
    if any(name.startswith("tritonrnn::") for name in ops):
        return backend(device)
    return "torch-native"


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """An error that leaves the CUDA context unusable (illegal address, device assert, launch failure):
    every later call on the device fails too, so the run must stop, not record more failures."""
    sticky = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure",
              "device-side assert", "an illegal address", "hardware exception", "context is destroyed")
    return isinstance(exc, RuntimeError) and any(s in str(exc).lower() for s in sticky)


@triton.jit
def _dependent_chain_kernel(p_out, steps, BLOCK: tl.constexpr, DTYPE: tl.constexpr, TF32: tl.constexpr):
    """`steps` dependent [BLOCK, BLOCK] x [BLOCK, BLOCK] tensor-core matmuls and nothing else: no
    load, no nonlinearity, one program. The shortest step any RNN kernel can take."""
    o_i = tl.arange(0, BLOCK)
    b_w = ((o_i[:, None] * 7 + o_i[None, :] * 3) % 5 - 2).to(tl.float32) * 0.05
    b_w = b_w.to(DTYPE)
    b_h = (o_i[:, None] == o_i[None, :]).to(DTYPE)
    for _ in range(steps):
        b_h = tl.dot(b_h, b_w, input_precision="tf32" if TF32 else "ieee").to(DTYPE)
    tl.store(p_out + o_i[:, None] * BLOCK + o_i[None, :], b_h)


def dependent_step_ms(device: torch.device, dtype: torch.dtype, timer, steps: int) -> float:
    """Time of one step of `_dependent_chain_kernel`: the difference of `2 * steps` and `steps`
    steps, so that the launch cost cancels. fp32 runs as TF32, the fastest fp32 matmul (a lower bound
    for exact fp32 too)."""
    block = 16
    out = torch.empty(block, block, device=device, dtype=dtype)
    kernel_dtype = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                    torch.float64: tl.float64}[dtype]

    def chain(n):
        return lambda: _dependent_chain_kernel[(1,)](out, n, BLOCK=block, DTYPE=kernel_dtype,
                                                     TF32=dtype == torch.float32,
                                                     num_warps=1)  # one warp: no exchange between warps
    short, long = timer(chain(steps))["median_ms"], timer(chain(2 * steps))["median_ms"]
    return max(long - short, 0.0) / steps


def ceilings(device: torch.device, dtype: torch.dtype, timer) -> dict:
    """The device's measured matmul rate (FLOP/s), copy bandwidth (B/s) and shortest dependent step (ms)."""
    n = 8192 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_ms = timer(lambda: a @ b)["median_ms"]  # fp32: TF32 if the run allows it (bench.run sets it)
    del a, b
    size = (1 << 28) if device.type == "cuda" else (1 << 22)  # 1 GiB of fp32 on a GPU
    src = torch.randn(size, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))["median_ms"]
    del src, dst
    return {"matmul_flops_per_s": 2 * n ** 3 / (matmul_ms * 1e-3),
            "copy_bytes_per_s": 2 * size * 4 / (copy_ms * 1e-3),
            "step_ms": dependent_step_ms(device, dtype, timer, 1024 if device.type == "cuda" else 8)}


def case_work(case, mode: str, element_size: int) -> dict:
    """FLOPs and fewest bytes of a case (training: forward + backward, about 3x the forward); a
    packed case counts its real lengths, not T for every row."""
    directions = 2 if case.bidirectional else 1
    flops = nbytes = 0
    rows = sum(case.lengths())  # T x B unpacked
    for layer in range(case.layers):
        inputs = case.inputs if layer == 0 else directions * case.hidden
        flops += directions * 2 * rows * case.hidden * (inputs + case.hidden)
        activations = rows * (inputs + directions * case.hidden)
        weights = directions * case.hidden * (inputs + case.hidden + 2)
        nbytes += (activations + weights) * element_size
    factor = 3 if mode == "training" else 1
    return {"flops": factor * flops, "bytes": factor * nbytes,
            "chain_steps": (2 if mode == "training" else 1) * case.layers * case.seq_len}


def floor_ms(case, mode: str, element_size: int, ceiling: dict) -> dict:
    """The floor and its three terms (all None when the ceilings could not be measured)."""
    work = case_work(case, mode, element_size)
    if not ceiling or "error" in ceiling:
        return {"floor_ms": None, "compute_ms": None, "memory_ms": None, "chain_ms": None, "flops": work["flops"]}
    parts = {"compute_ms": work["flops"] / ceiling["matmul_flops_per_s"] * 1e3,
             "memory_ms": work["bytes"] / ceiling["copy_bytes_per_s"] * 1e3,
             "chain_ms": work["chain_steps"] * ceiling["step_ms"]}
    return {"floor_ms": max(parts.values()), **parts, "flops": work["flops"]}
