"""Which implementation a call takes: the backend for a device, the kernel path for a shape."""
import os

import torch

from tritonrnn import kernels, numerics


def interpreter_enabled() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1, set before tritonrnn is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def backend(device: torch.device) -> str:
    """'triton' (compiled kernels on CUDA), 'triton-interpreter' (the same kernels, interpreted on the
    CPU) or 'torch' (torch's own RNN: CPU without the interpreter, and devices Triton does not run on)."""
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreter_enabled():
        return "triton-interpreter"
    return "torch"


CPU = torch.device("cpu")


def kernel_path(seq_len: int, hidden_size: int, dtype: torch.dtype, batch: int = 1, device: torch.device = CPU,
                direction: str = "forward", allow_tf32: bool = True, directions: int = 1) -> str:
    """'sequence', 'persistent' or 'stepwise' for the forward or backward recurrence of this shape
    (`directions` = 2: both directions of a layer in one launch).

    A single step always takes the step kernel. Otherwise the tuned configs shipped for this GPU
    decide where they exist; else 'sequence' when one program can hold W_hh, 'persistent' (W_hh
    split over programs that stay resident) up to H = 2048 where this device holds every program
    at once, 'stepwise' beyond (`tritonrnn info` says which).
    """
    if seq_len == 1:
        return "stepwise"
    choice = kernels.config.tuned(dtype, hidden_size, batch, direction, device)
    if choice is not None:
        return choice["path"]
    path = kernels.default_path(hidden_size, dtype, allow_tf32)
    if path == "persistent" and not kernels.recurrence.persistent_fits(seq_len, batch, hidden_size, dtype, device,
                                                                       direction, allow_tf32, directions):
        return "stepwise"  # e.g. fewer SMs or less shared memory than an H100's
    return path


def describe(seq_len: int, hidden_size: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> str:
    """What a layer of this shape runs on this device, forward and backward."""
    which = backend(device)
    if which == "torch":
        return f"torch's own RNN implementation on {device.type} (Triton kernels need CUDA or TRITON_INTERPRET=1)"
    mode = "compiled" if which == "triton" else "interpreted"
    allow_tf32 = numerics.allow_tf32()
    lines = []
    for direction in ("forward", "backward"):
        path = kernel_path(seq_len, hidden_size, dtype, batch, device, direction, allow_tf32)
        kernel = {"sequence": "rnn_sequence_kernel, one launch for all steps, W_hh held on chip",
                  "persistent": "rnn_persistent_kernel, one launch for all steps, W_hh in column slices on chip",
                  "stepwise": f"rnn_step_kernel, one launch per step ({seq_len} per layer and direction)"}[path]
        if path == "persistent":
            plan = kernels.recurrence.persistent_plan(seq_len, batch, hidden_size, dtype, device, direction,
                                                      allow_tf32)
            kernel += (f": {plan.groups} group(s) of {plan.programs_per_group} program(s), {plan.batch_tiles} "
                       f"batch tile(s) a group, " + (f"{plan.programs} of a resident capacity of "
                                                     f"{plan.resident_capacity}" if plan.waits else
                                                     "no program waits for another"))
        tuned = kernels.config.tuned(dtype, hidden_size, batch, direction, device)
        source = ("shipped tuned config" if tuned is not None and tuned["path"] == path
                  else "Triton autotuner" if kernels.config.autotunes(path, device)
                  else "default config")
        lines.append(f"{direction}: {path} path ({kernel}; {source}; {mode})")
    return "\n  ".join(lines)
