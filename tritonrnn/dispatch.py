"""Which implementation a call takes: the backend for a device, and for a shape the layout and its
config. `choose` is the one place that decides; `refuse` is its memory of what a device refused.
"""
import dataclasses
import os
import warnings
from typing import Optional

import torch

from tritonrnn import costmodel, numerics, selftest
from tritonrnn.kernels import configs
from tritonrnn.kernels import launch, toolchain

CPU = torch.device("cpu")


def interpreter_enabled() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1, set before tritonrnn is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# Triton decides when a @triton.jit function is defined, i.e. when tritonrnn is imported, whether it is
# interpreted: the kernels follow TRITON_INTERPRET as it was then.
_INTERPRETED_KERNELS = interpreter_enabled()
# Read once: the installed Triton and numpy do not change under a running process (nor under torch.compile's tracing).
_INTERPRETER_PROBLEM = toolchain.interpreter_problem() if _INTERPRETED_KERNELS else ""
INTERPRET_TOO_LATE = ("TRITON_INTERPRET=1 was set after tritonrnn was imported: set it before importing tritonrnn "
                      "and triton (in a notebook: restart the kernel, set it first)")


def backend(device: torch.device) -> str:
    """'triton' (compiled kernels on CUDA), 'triton-interpreter' (the same kernels, interpreted on the
    CPU) or 'torch' (torch's own RNN: CPU without the interpreter, and devices Triton does not run on).
    Raises where the interpreter is asked for but cannot run: TRITON_INTERPRET=1 set after import (the
    kernels were built for a GPU then: Triton would fail with "0 active drivers"), or an interpreter
    that fails with the installed numpy (kernels.toolchain says which, and the fix)."""
    which = _kind(device)
    if which == "triton-interpreter":
        if not _INTERPRETED_KERNELS:
            raise RuntimeError(INTERPRET_TOO_LATE)
        if _INTERPRETER_PROBLEM:
            raise RuntimeError(_INTERPRETER_PROBLEM)
    return which


def _kind(device: torch.device) -> str:
    """backend's answer, whether or not the interpreter can run (what `describe` reports)."""
    if device.type == "cuda":
        return "triton"
    return "triton-interpreter" if device.type == "cpu" and interpreter_enabled() else "torch"


def hardware(device: torch.device) -> costmodel.Hardware:
    """What the cost model knows of `device`: a CUDA GPU's own limits (and its calibration file);
    elsewhere (the interpreter) the H100's, the GPU the kernels are written for."""
    if device.type == "cuda" and torch.cuda.is_available():
        return costmodel.device_hardware(device.index if device.index is not None else torch.cuda.current_device())
    return costmodel.offline_hardware("h100")


def shape_of(sequence: torch.Tensor, direction: str, allow_tf32: bool, cell: str = "tanh") -> costmodel.Shape:
    """The Shape of a recurrence over `sequence` ([T, B, H], or [D, T, B, H]: D directions in one launch)."""
    T, B, H = sequence.shape[-3:]
    directions = sequence.shape[0] if sequence.dim() == 4 else 1
    return costmodel.Shape(T, B, H, costmodel.dtype_name(sequence.dtype), direction, allow_tf32, directions, cell)


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a recurrence runs: its layout, the config the launcher takes (a triton.Config, "autotune" for
    Triton's autotuner, or None for the layout's default config), why, the model's predicted step (None
    where no prediction was made), and the directions one launch runs (2: both directions of a layer at
    once, on the persistent kernel's layouts; 1: one launch, or T, a direction)."""

    layout: str
    config: object
    source: str
    predicted_us: Optional[float] = None
    directions: int = 1

    @property
    def config_source(self) -> str:
        """Where the config comes from, in words."""
        if self.source == "shipped tuned config":
            return self.source
        if isinstance(self.config, str):
            return "Triton autotuner"
        return "default config" if self.config is None else "the cost model's config"


def choose(shape: costmodel.Shape, device: torch.device = CPU) -> Choice:
    """The layout and config a recurrence of `shape` runs on `device`, and why.

    A single step takes the step kernel. A tuned config shipped for this GPU wins where its layout
    passed its self-test and was not refused here. Otherwise the cost model (tritonrnn.costmodel)
    predicts every layout that fits and the fastest is taken, unless this device cannot run it (the
    compiled persistent kernel's resident capacity: on a GPU that compiles, as the launch would anyway;
    no cluster launch here), its self-test failed (tritonrnn.selftest.usable: run at its first use),
    or a launch of it was refused in this process (`refuse`): then the model's next layout.
    `shape.directions` = 2: both directions in one launch where the layout runs them so (the
    persistent kernel's); else the layout each direction takes on its own.
    """
    if shape.seq_len == 1:
        return Choice("stepwise", _config("stepwise", None, device), "one step: the step kernel")
    dtype = getattr(torch, shape.dtype)
    tuned = configs.tuned(dtype, shape.hidden, shape.batch, shape.direction, device)
    if tuned is not None and not _refused(tuned[0], shape, device) and selftest.usable(tuned[0], dtype, device,
                                                                                        shape.allow_tf32):
        return Choice(tuned[0], tuned[1], "shipped tuned config",
                      directions=shape.directions if tuned[0] in configs.GROUPED else 1)
    hw = hardware(device)
    excluded = tuple(layout for layout in configs.LAYOUTS if _refused(layout, shape, device))
    best = costmodel.choose(shape, hw, exclude=excluded)
    while best.layout != "stepwise" and not (_runs(best, shape, device) and selftest.usable(best.layout, dtype, device,
                                                                                          shape.allow_tf32)):
        excluded += (best.layout,)  # e.g. fewer SMs than an H100's, no clusters here, a failed self-test
        best = costmodel.choose(shape, hw, exclude=excluded)
    if shape.directions > 1 and best.layout not in configs.GROUPED:
        return choose(dataclasses.replace(shape, directions=1), device)
    source = "cost model" + (f", calibrated on {hw.name}" if hw.calibrated else f", {hw.name} constants")
    return Choice(best.layout, _config(best.layout, best.config, device), source, best.step_us, shape.directions)


def _config(layout: str, model_config: Optional[dict], device: torch.device):
    """What the launcher takes for the model's choice. Under the interpreter the layout's default config:
    programs run one at a time there, so a tile size changes no result and only the CPU tests' time, and
    those tests pin the defaults. On a GPU the model's config, but for the stepwise layout, whose model
    config is its default weighed as such: Triton's autotuner runs it where enabled."""
    if device.type != "cuda":
        return None
    if layout == "stepwise" or model_config is None:
        return "autotune" if configs.autotunes(layout, device) else None
    return configs.config_from_dict(model_config)


def _runs(best: costmodel.Candidate, shape: costmodel.Shape, device: torch.device) -> bool:
    """Whether the model's choice runs here with its config: the counter layouts (persistent, streamed)
    where the compiled kernel's resident capacity holds it (kernels.launch.persistent_plan, remembered per
    shape on a GPU: _resident_plan) and the arrival counters hold T steps; the cluster layout where a
    cluster launch may be tried on this device (an sm_90+ GPU; never the interpreter, which runs one
    program at a time) and the config makes a cluster size a launch may ask for; the others wherever
    the model fits them."""
    if best.layout == "cluster":
        return launch.cluster_refusal(device) is None and configs.layout_fits(
            "cluster", shape.hidden, getattr(torch, shape.dtype), shape.allow_tf32,
            config=configs.config_from_dict(best.config))
    if best.layout in configs.COUNTER_GROUPED:
        try:
            launch.check_counters(shape.seq_len, _resident_plan(best, shape, device))
        except ValueError:
            return False
    return True


# On a GPU, the counter layouts' plans by (layout, config, B, H, dtype, direction, precision, directions, device):
# what the compiled kernel and the driver say does not change in a process, and asking costs a compile-cache
# lookup and driver queries at every call. A ValueError: the launcher's refusal there.
_PLANS = {}


def _resident_plan(best: costmodel.Candidate, shape: costmodel.Shape, device: torch.device):
    """The plan of the model's counter-layout choice, as launch.persistent_plan makes it for one step (T is
    checked by the caller: only the arrival counters depend on it), remembered per shape on CUDA. Raises
    the launcher's refusal (a ValueError) where the device cannot run it."""
    key = (best.layout, costmodel.config_key(best.config), shape.batch, shape.hidden, shape.dtype, shape.direction,
           shape.allow_tf32, shape.directions, str(device))
    known = _PLANS.get(key) if device.type == "cuda" else None
    if known is None:
        try:
            known = launch.persistent_plan(1, shape.batch, shape.hidden, getattr(torch, shape.dtype), device,
                                           shape.direction, shape.allow_tf32,
                                           config=configs.config_from_dict(best.config), directions=shape.directions,
                                           layout=best.layout)
        except ValueError as refusal:
            known = refusal
        if device.type == "cuda":
            _PLANS[key] = known
    if isinstance(known, ValueError):
        raise type(known)(*known.args)  # a fresh one: re-raising the stored one would grow its traceback
    return known


# (device, layout, H, dtype, precision, directions) whose launch was refused in this process (`refuse`).
_REFUSALS = set()
_WARNED = set()


def _refusal_key(layout: str, shape: costmodel.Shape, device: torch.device) -> tuple:
    return (str(device), layout, shape.hidden, shape.dtype, shape.allow_tf32, shape.directions)


def _refused(layout: str, shape: costmodel.Shape, device: torch.device) -> bool:
    return _refusal_key(layout, shape, device) in _REFUSALS


def refuse(choice: Choice, shape: costmodel.Shape, device: torch.device, refusal: Exception) -> None:
    """The device refused a launch of `choice` for `shape` (kernels.launch's LaunchRefused or
    ClusterUnavailable: fewer resident programs than an H100 holds, no clusters, the driver's refusal):
    `choose` takes the model's next layout for it from now on, and `tritonrnn info` names that one. One
    warning per layout and process."""
    layout = choice.layout
    _REFUSALS.add(_refusal_key(layout, dataclasses.replace(shape, directions=choice.directions), device))
    if layout not in _WARNED:
        _WARNED.add(layout)
        warnings.warn(f"tritonrnn: {refusal}. The {layout} layout is not taken for this shape on {device} from now "
                      f"on: the next layout the dispatcher chooses runs instead (same results); this warning is "
                      f"shown once.", RuntimeWarning, stacklevel=3)


def forget_refusals() -> None:
    """Forget every refusal and remembered plan (tests; a process whose GPU was freed)."""
    _REFUSALS.clear()
    _WARNED.clear()
    _PLANS.clear()


def kernel_path(seq_len: int, hidden_size: int, dtype: torch.dtype, batch: int = 1, device: torch.device = CPU,
                direction: str = "forward", allow_tf32: bool = True, directions: int = 1) -> str:
    """'sequence', 'persistent', 'cluster', 'streamed' or 'stepwise': the layout `choose` takes for the forward or
    backward recurrence of this shape (`directions` = 2: both directions of a layer at once); `tritonrnn
    info` says which and why. (The name is the public API's: a layout is the kernel path a call takes.)"""
    shape = costmodel.Shape(seq_len, batch, hidden_size, costmodel.dtype_name(dtype), direction, allow_tf32,
                            directions)
    return choose(shape, device).layout


_KERNEL_WORDS = {"sequence": "rnn_sequence_kernel, one launch for all steps, W_hh held on chip",
                 "persistent": "rnn_persistent_kernel, one launch for all steps, W_hh in column slices on chip",
                 "cluster": "rnn_persistent_kernel in thread-block clusters, one launch for all steps, W_hh in "
                            "column slices over a cluster's CTAs, the hardware cluster barrier",
                 "streamed": "rnn_persistent_kernel streaming W_hh, one launch for all steps, each step's column "
                             "slices and state read from L2 in chunks"}


def describe(seq_len: int, hidden_size: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> str:
    """What a layer of this shape runs on this device, forward and backward."""
    which = _kind(device)
    if which == "torch":
        return f"torch's own RNN implementation on {device.type} (Triton kernels need CUDA or TRITON_INTERPRET=1)"
    mode = "compiled" if which == "triton" else "interpreted"
    allow_tf32 = numerics.allow_tf32()
    lines = []
    for direction in ("forward", "backward"):
        shape = costmodel.Shape(seq_len, batch, hidden_size, costmodel.dtype_name(dtype), direction, allow_tf32)
        choice = choose(shape, device)
        layout = choice.layout
        kernel = _KERNEL_WORDS.get(layout, f"rnn_step_kernel, one launch per step ({seq_len} per layer and "
                                           f"direction)")
        if layout in configs.COUNTER_GROUPED:
            config = choice.config if not isinstance(choice.config, str) else None
            plan = launch.persistent_plan(seq_len, batch, hidden_size, dtype, device, direction, allow_tf32,
                                          config=config, layout=layout)
            kernel += (f": {plan.groups} group(s) of {plan.programs_per_group} program(s), {plan.batch_tiles} "
                       f"batch tile(s) a group, " + (f"{plan.programs} of a resident capacity of "
                                                     f"{plan.resident_capacity}" if plan.waits else
                                                     "no program waits for another"))
        why = "" if choice.predicted_us is None else \
            f"; chosen by the {choice.source}: {choice.predicted_us:.2f} us a step predicted"
        lines.append(f"{direction}: {layout} path ({kernel}; {choice.config_source}; {mode}{why})")
    return "\n  ".join(lines)
