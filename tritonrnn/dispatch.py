"""Which implementation a call takes: the backend for a device, the kernel path for a shape."""
import os

import torch

from tritonrnn import kernels


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
                direction: str = "forward") -> str:
    """'sequence', 'streamed' or 'stepwise' for the forward or backward recurrence of this shape.

    A single step always takes the step kernel. Otherwise the tuned configs shipped for this GPU
    decide where they exist; else 'sequence' when one program can hold W_hh, 'stepwise' if not.
    """
    if seq_len == 1:
        return "stepwise"
    choice = kernels.config.tuned(dtype, hidden_size, batch, direction, device)
    if choice is not None:
        return choice["path"]
    return kernels.default_path(hidden_size, dtype)


def describe(seq_len: int, hidden_size: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> str:
    """What a layer of this shape runs on this device, forward and backward."""
    which = backend(device)
    if which == "torch":
        return f"torch's own RNN implementation on {device.type} (Triton kernels need CUDA or TRITON_INTERPRET=1)"
    mode = "compiled" if which == "triton" else "interpreted"
    lines = []
    for direction in ("forward", "backward"):
        path = kernel_path(seq_len, hidden_size, dtype, batch, device, direction)
        kernel = {"sequence": "rnn_sequence_kernel, one launch for all steps, W_hh held on chip",
                  "streamed": "rnn_sequence_kernel, one launch for all steps, W_hh streamed from L2",
                  "stepwise": f"rnn_step_kernel, one launch per step ({seq_len} per layer and direction)"}[path]
        tuned = kernels.config.tuned(dtype, hidden_size, batch, direction, device)
        source = ("shipped tuned config" if tuned is not None and tuned["path"] == path
                  else "Triton autotuner" if which == "triton" and kernels.config.autotune_enabled()
                  else "default config")
        lines.append(f"{direction}: {path} path ({kernel}; {source}; {mode})")
    return "\n  ".join(lines)
