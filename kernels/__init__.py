"""Triton kernels of tritonrnn and their launchers (installed as tritonrnn.kernels)."""
from .config import sequence_fits
from .recurrence import PATHS, recurrence_backward, recurrence_forward

__all__ = ["PATHS", "recurrence_backward", "recurrence_forward", "sequence_fits"]
