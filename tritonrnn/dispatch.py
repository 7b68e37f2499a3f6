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


def kernel_path(seq_len: int, hidden_size: int, dtype: torch.dtype) -> str:
    """'stepwise' for a single step or an H one program cannot hold, else 'sequence'."""
    if seq_len > 1 and kernels.sequence_fits(hidden_size, dtype):
        return "sequence"
    return "stepwise"


def describe(seq_len: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> str:
    """One line saying what a layer of this shape runs on this device."""
    which = backend(device)
    if which == "torch":
        return f"torch's own RNN implementation on {device.type} (Triton kernels need CUDA or TRITON_INTERPRET=1)"
    path = kernel_path(seq_len, hidden_size, dtype)
    kernel = ("rnn_sequence_kernel: one launch for all steps" if path == "sequence"
              else f"rnn_step_kernel: one launch per step ({seq_len} launches per direction)")
    mode = "compiled" if which == "triton" else "interpreted"
    return f"{path} path, {kernel}, {mode}"
