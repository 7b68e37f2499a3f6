"""Which implementation a call takes: the backend for a device, the kernel path for a shape."""
import os

import torch

from tritonrnn import costmodel, kernels, numerics, selftest
from tritonrnn.kernels import cluster


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


def hardware(device: torch.device) -> costmodel.Hardware:
    """What the cost model knows of `device`: a CUDA GPU's own limits (and its calibration file);
    elsewhere (the interpreter) the H100's, the GPU the kernels are written for."""
    if device.type == "cuda" and torch.cuda.is_available():
        return costmodel.device_hardware(device.index if device.index is not None else torch.cuda.current_device())
    return costmodel.offline_hardware("h100")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def kernel_choice(seq_len: int, hidden_size: int, dtype: torch.dtype, batch: int = 1, device: torch.device = CPU,
                  direction: str = "forward", allow_tf32: bool = True, directions: int = 1) -> dict:
    """The layout and config a recurrence of this shape runs, and why: {"path", "config" (a dict, or
    None: the launcher's own), "source", "predicted_us" (None where no prediction was made)}.

    A single step takes the step kernel. A tuned config shipped for this GPU wins where its layout
    passed its self-test. Otherwise the cost model (tritonrnn.costmodel) predicts every layout that
    fits and the fastest is taken; a persistent or cluster choice is then checked against what this
    device runs (the compiled kernel's resident capacity, kernels.recurrence.persistent_fits: on a GPU
    it compiles, as the launch would anyway; kernels.cluster.cluster_fits), and every layout but the
    stepwise reference against its self-test on this device (tritonrnn.selftest.usable: run at its first
    use); where either says no, the model's next layout is taken.
    """
    if seq_len == 1:
        return {"path": "stepwise", "config": None, "source": "one step: the step kernel", "predicted_us": None}
    choice = kernels.config.tuned(dtype, hidden_size, batch, direction, device)
    if choice is not None and selftest.usable(choice["path"], dtype, device, allow_tf32):
        return {"path": choice["path"], "config": kernels.config.config_to_dict(choice["config"]),
                "source": "shipped tuned config", "predicted_us": None}
    hw = hardware(device)
    shape = costmodel.Shape(seq_len, batch, hidden_size, _dtype_name(dtype), direction, allow_tf32, directions)
    best, excluded = costmodel.choose(shape, hw), ()
    while best.layout != "stepwise" and not (
            _runs(best, seq_len, batch, hidden_size, dtype, device, direction, allow_tf32, directions)
            and selftest.usable(best.layout, dtype, device, allow_tf32)):
        excluded += (best.layout,)  # e.g. fewer SMs than an H100's, no clusters here, a failed self-test
        best = costmodel.choose(shape, hw, exclude=excluded)
    source = "cost model" + (f", calibrated on {hw.name}" if hw.calibrated else f", {hw.name} constants")
    return {"path": best.layout, "config": best.config, "source": source, "predicted_us": best.step_us}


def _runs(best, seq_len, batch, hidden_size, dtype, device, direction, allow_tf32, directions) -> bool:
    """Whether the model's persistent or cluster choice runs here with its config: the persistent path
    where the compiled kernel's resident capacity holds it (kernels.recurrence.persistent_plan); the
    cluster form where kernels.cluster says it fits (a CUDA device of sm_90 or later; never the
    interpreter, which runs one program at a time); the sequence layout wherever the model fits it."""
    if best.layout == "sequence":
        return True
    config = kernels.config.config_from_dict(best.config)
    if best.layout == "cluster":
        return cluster.cluster_fits(hidden_size, dtype, allow_tf32, device) and cluster.fits(
            hidden_size, dtype, allow_tf32, config)
    try:
        kernels.recurrence.persistent_plan(seq_len, batch, hidden_size, dtype, device, direction, allow_tf32,
                                           config=config, directions=directions)
    except ValueError:
        return False
    return True


def launch_config(path: str, seq_len: int, hidden_size: int, dtype: torch.dtype, batch: int = 1,
                  device: torch.device = CPU, direction: str = "forward", allow_tf32: bool = True,
                  directions: int = 1):
    """The triton.Config the launcher of `path` runs for this shape, or None (the launcher's own:
    shipped tuned, Triton's autotuner, or its default).

    On CUDA: kernel_choice's config where it chose `path` (a tuned config, or the cost model's
    config of the sequence or persistent layout, checked there against the device). The model's
    stepwise config is the launcher's default, weighed as such: None leaves that path to the autotuner.
    Elsewhere (the interpreter) None: interpreted programs run one at a time, so a tile size changes
    no result and only the CPU tests' time, and those tests pin the launchers' default tiles."""
    if device.type != "cuda":
        return None
    choice = kernel_choice(seq_len, hidden_size, dtype, batch, device, direction, allow_tf32, directions)
    return _config_of(choice) if choice["path"] == path else None


def _config_of(choice: dict):
    """launch_config of kernel_choice's own path (on CUDA)."""
    if choice["config"] is None or (choice["path"] == "stepwise" and choice["source"] != "shipped tuned config"):
        return None
    return kernels.config.config_from_dict(choice["config"])


def launch_choice(seq_len: int, hidden_size: int, dtype: torch.dtype, batch: int = 1, device: torch.device = CPU,
                  direction: str = "forward", allow_tf32: bool = True, directions: int = 1) -> dict:
    """What the ops pass the launchers: {"path": kernel_path's, "config": launch_config's for it}, from
    one kernel_choice (on a GPU its device check compiles or looks up the kernel: once a call)."""
    choice = kernel_choice(seq_len, hidden_size, dtype, batch, device, direction, allow_tf32, directions)
    return {"path": choice["path"], "config": _config_of(choice) if device.type == "cuda" else None}


def kernel_path(seq_len: int, hidden_size: int, dtype: torch.dtype, batch: int = 1, device: torch.device = CPU,
                direction: str = "forward", allow_tf32: bool = True, directions: int = 1) -> str:
    """'sequence', 'persistent', 'cluster' or 'stepwise' for the forward or backward recurrence of this shape
    (`directions` = 2: both directions of a layer in one launch): kernel_choice's layout. A single
    step takes the step kernel; a shipped tuned config wins; else the layout the cost model
    predicts fastest among those this device can run (`tritonrnn info` says which and why).
    """
    return kernel_choice(seq_len, hidden_size, dtype, batch, device, direction, allow_tf32, directions)["path"]


def describe(seq_len: int, hidden_size: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> str:
    """What a layer of this shape runs on this device, forward and backward."""
    which = backend(device)
    if which == "torch":
        return f"torch's own RNN implementation on {device.type} (Triton kernels need CUDA or TRITON_INTERPRET=1)"
    mode = "compiled" if which == "triton" else "interpreted"
    allow_tf32 = numerics.allow_tf32()
    lines = []
    for direction in ("forward", "backward"):
        choice = kernel_choice(seq_len, hidden_size, dtype, batch, device, direction, allow_tf32)
        path = choice["path"]
        kernel = {"sequence": "rnn_sequence_kernel, one launch for all steps, W_hh held on chip",
                  "persistent": "rnn_persistent_kernel, one launch for all steps, W_hh in column slices on chip",
                  "cluster": "rnn_persistent_kernel in thread-block clusters, one launch for all steps, W_hh in "
                             "column slices over a cluster's CTAs, the hardware cluster barrier",
                  "stepwise": f"rnn_step_kernel, one launch per step ({seq_len} per layer and direction)"}[path]
        config = launch_config(path, seq_len, hidden_size, dtype, batch, device, direction, allow_tf32)
        if path == "persistent":
            plan = kernels.recurrence.persistent_plan(seq_len, batch, hidden_size, dtype, device, direction,
                                                      allow_tf32, config=config)
            kernel += (f": {plan.groups} group(s) of {plan.programs_per_group} program(s), {plan.batch_tiles} "
                       f"batch tile(s) a group, " + (f"{plan.programs} of a resident capacity of "
                                                     f"{plan.resident_capacity}" if plan.waits else
                                                     "no program waits for another"))
        tuned = kernels.config.tuned(dtype, hidden_size, batch, direction, device)
        source = ("shipped tuned config" if tuned is not None and tuned["path"] == path
                  else "the cost model's config" if config is not None
                  else "Triton autotuner" if kernels.config.autotunes(path, device)
                  else "default config")
        why = "" if choice["predicted_us"] is None else \
            f"; chosen by the {choice['source']}: {choice['predicted_us']:.2f} us a step predicted"
        lines.append(f"{direction}: {path} path ({kernel}; {source}; {mode}{why})")
    return "\n  ".join(lines)
