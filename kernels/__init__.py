"""Triton kernels of tritonrnn and their launchers (installed as tritonrnn.kernels)."""
from .config import default_path
from .recurrence import PATHS, recurrence_backward, recurrence_forward

__all__ = ["PATHS", "default_path", "recurrence_backward", "recurrence_forward"]
