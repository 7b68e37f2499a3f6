"""Triton kernels of tritonrnn and their launchers (installed as tritonrnn.kernels)."""
from . import toolchain
from .config import default_path
from .recurrence import PATHS, bidirectional_backward, bidirectional_forward, recurrence_backward, recurrence_forward

__all__ = ["PATHS", "bidirectional_backward", "bidirectional_forward", "default_path", "recurrence_backward",
           "recurrence_forward"]

toolchain.warn_if_unsupported()
