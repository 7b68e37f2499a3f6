"""Triton kernels of tritonrnn and their launchers (installed as tritonrnn.kernels).

Kernel files hold the @triton.jit kernels (step.py, sequence.py, persistent.py, output.py, common.py);
config.py says what a launch may vary, occupancy.py what a GPU holds at once, launch.py launches,
cells.py names the cells, toolchain.py the Triton releases.
"""
from . import toolchain
from .configs import LAYOUTS, default_layout
from .launch import recurrence_backward, recurrence_forward

__all__ = ["LAYOUTS", "default_layout", "recurrence_backward", "recurrence_forward"]

toolchain.warn_if_unsupported()
