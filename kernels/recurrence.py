"""Launchers of the recurrence: tensors in, tensors out. No autograd here.

Dimensions: T steps, B batch, H hidden. All [T, B, H] and [B, H] tensors are made contiguous.

    recurrence_forward(xw, h0, w_hh)       -> out [T, B, H] (every h_t), h_n [B, H]
    recurrence_backward(grad, out, w_hh)   -> dz  [T, B, H]

`path` is "sequence" (one launch for all T steps, W_hh held on chip by each program),
"persistent" (one launch for all T steps, W_hh split by columns over programs that stay resident
and meet at a barrier each step; kernels/persistent.py), "cluster" (the persistent kernel with each
group one Hopper thread-block cluster meeting at the hardware cluster barrier; kernels/cluster.py)
or "stepwise" (one launch of the step kernel per timestep; any H). A refused cluster launch runs
the persistent path, a refused persistent launch the stepwise path (one warning each), except inside
`checking()` (tritonrnn.selftest), where the refusal is raised and every output starts as NaN.
"""
import contextlib
import contextvars
import functools
import warnings

import torch
import triton
import triton.language as tl

from . import cluster, persistent
from . import config as configs
from .sequence import rnn_sequence_kernel
from .step import rnn_step_kernel

PATHS = configs.PATHS
# What a launcher's `path` may name: the kernels' paths and the persistent kernel's cluster form
# (a launch of the persistent kernel, not a kernel with a config space of its own).
LAUNCH_PATHS = PATHS + ("cluster",)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


# Inside checking(): the persistent kernel's wait limit (seconds) for the launches of a self-test.
_checking = contextvars.ContextVar("tritonrnn_checking", default=None)


@contextlib.contextmanager
def checking(wait_s: float):
    """The launches of a layout's self-test (tritonrnn.selftest): every output starts as NaN (an element
    a kernel fails to write stays NaN), a refused launch raises (ClusterUnavailable, LaunchRefused)
    instead of running the next layout, and the persistent kernel gives up waiting after `wait_s`."""
    token = _checking.set(wait_s)
    try:
        yield
    finally:
        _checking.reset(token)


def _empty_like(tensor: torch.Tensor) -> torch.Tensor:
    # Every kernel output is allocated here (the tests and the self-test fill it with NaN to catch
    # unwritten elements).
    return torch.empty_like(tensor) if _checking.get() is None else torch.full_like(tensor, float("nan"))


def _numerics(dtype: torch.dtype, device: torch.device, allow_tf32: bool) -> dict:
    """Accumulate in fp32 (fp64 for fp64); multiply in the storage dtype on the tensor cores.

    fp32 multiplies in TF32 where allowed, else in 3xTF32 (fp32 accuracy on the tensor cores:
    plain IEEE fp32 dots run on FMA units and spill registers at these tile sizes).
    """
    if dtype not in _TL_DTYPE:
        raise TypeError(f"tritonrnn kernels support float16, bfloat16, float32 and float64, got {dtype}")
    dot = _TL_DTYPE[dtype]
    if device.type == "cpu" and dtype == torch.bfloat16:
        dot = tl.float32  # the interpreter multiplies bf16 as integers
    return {"ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32, "DOT_DTYPE": dot,
            "INPUT_PRECISION": ("tf32" if allow_tf32 else "tf32x3") if dtype == torch.float32 else "ieee"}


def _jitted(path: str):
    return rnn_step_kernel if path == "stepwise" else rnn_sequence_kernel


def _variant_flags(path: str) -> list:
    """The constexpr arguments a launch sets besides the config's own (direction, nonlinearity,
    optional inputs, numerics): each compiles a different variant, so each is in the autotuning key."""
    annotations = _jitted(path).fn.fn.__annotations__  # below @triton.heuristics and @triton.jit
    tuned = {name for config in configs.full_space(path) for name in config.kwargs}
    return [name for name, kind in annotations.items() if kind is tl.constexpr and name not in tuned]


@functools.lru_cache(maxsize=None)
def _autotuned(path: str):
    """Triton's autotuner over the path's space, keyed by H, the batch bucket and every variant flag
    (never by T). The heuristics run first, so the flags they derive (HAS_LENGTHS, ...) reach the key."""
    heuristics = _jitted(path)
    tuner = triton.autotune(configs=configs.full_space(path), key=["H", "B_BUCKET", *_variant_flags(path)],
                            prune_configs_by={"early_config_prune": configs.prune_space(path)})(heuristics.fn)
    return triton.heuristics(heuristics.values)(tuner)


def _launcher(path: str, B: int, H: int, dtype, device, direction: str, config, allow_tf32: bool):
    """The kernel to launch and its meta-parameters: an explicit config, else the shipped tuned one,
    else Triton's autotuner (GPU), else the default config (interpreter, or autotuning off)."""
    if config is None:
        choice = configs.tuned(dtype, H, B, direction, device)
        if choice is not None and choice["path"] == path:
            config = choice["config"]
    if config is None and path != "cluster" and configs.autotunes(path, device):
        return _autotuned(path), {}
    kernel_path = "persistent" if path == "cluster" else path  # a cluster's CTA is a persistent program
    config = config or (cluster.default_config(B, H, dtype) if path == "cluster"
                        else configs.default_config(path, B, H, dtype))
    budget = configs.shared_memory_budget(device)
    if not configs.config_fits(kernel_path, config, H, dtype, allow_tf32, budget):
        raise ValueError(f"{path} config {configs.config_to_dict(config)} needs "
                         f"{configs.shared_memory_bytes(kernel_path, config, H, dtype, allow_tf32)} B of shared memory "
                         f"at H = {H} in {dtype}; a program may use {budget} B")
    return _jitted(path), configs.config_to_dict(config)


_refusal_warned = False
_cluster_refusal_warned = False


def _warn_stepwise(refusal: Exception) -> None:
    """Once per process: the persistent path's cooperative launch was refused (this GPU cannot hold
    every program at once: fewer SMs, another process's work, MPS limits), so the stepwise path runs
    instead (one launch per step: slower, same results)."""
    global _refusal_warned
    if not _refusal_warned:
        _refusal_warned = True
        warnings.warn(f"tritonrnn: {refusal}. Running the stepwise path instead (one launch per step); this "
                      f"warning is shown once.", RuntimeWarning, stacklevel=3)


def _warn_persistent(refusal: Exception, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
    """Once per process: the cluster launch cannot run here (a cluster size Triton does not launch, a
    GPU before sm_90, the driver's refusal, the plain interpreter), so the persistent path runs
    instead (the same kernel with the counter barrier: same results)."""
    global _cluster_refusal_warned
    cluster.remember_refusal(hidden, dtype, device)  # later calls are dispatched elsewhere at once
    if not _cluster_refusal_warned:
        _cluster_refusal_warned = True
        warnings.warn(f"tritonrnn: {refusal}. Running the persistent path instead (counter barrier); this "
                      f"warning is shown once.", RuntimeWarning, stacklevel=3)


def _run_in_groups(path: str, rerun, first: torch.Tensor, *tensors, **options):
    """One launch of the persistent kernel: persistent.launch, or cluster.launch on the cluster path.
    Where the device refuses it, the next layout runs instead, with one warning: rerun("persistent")
    after a refused cluster launch (the same kernel with the counter barrier), rerun("stepwise") after a
    refused persistent one. Returns rerun's result then, else None (the outputs were written). Inside
    checking() the refusal is raised: a self-test must see the layout it tests, not the next one."""
    wait_s = _checking.get()
    if wait_s is not None:
        options = dict(options, timeout_s=wait_s)
    try:
        with _on(first.device):
            (cluster.launch if path == "cluster" else persistent.launch)(first, *tensors, **options)
    except cluster.ClusterUnavailable as refusal:
        if wait_s is not None:
            raise
        _warn_persistent(refusal, first.shape[-1], first.dtype, first.device)
        return rerun("persistent")
    except persistent.LaunchRefused as refusal:
        if wait_s is not None:
            raise
        _warn_stepwise(refusal)
        return rerun("stepwise")
    return None


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid(path: str, B: int, H: int):
    if path != "stepwise":
        return lambda meta: (triton.cdiv(B, meta["BLOCK_B"]),)
    return lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(H, meta["BLOCK_N"]))


def _check(name: str, tensor: torch.Tensor, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype != like.dtype or tensor.device != like.device:
        raise ValueError(f"{name} must be {like.dtype} on {like.device}, got {tensor.dtype} on {tensor.device}")
    return tensor.contiguous()


def _prepare(first: torch.Tensor, w_hh: torch.Tensor, lengths, path: str, allow_tf32: bool):
    if first.dim() != 3:
        raise ValueError(f"expected a [T, B, H] tensor, got shape {tuple(first.shape)}")
    T, B, H = first.shape
    if T == 0:
        raise ValueError("expected at least one timestep, got T = 0")
    if path not in LAUNCH_PATHS:
        raise ValueError(f"path must be one of {LAUNCH_PATHS}, got {path!r}")
    budget = configs.shared_memory_budget(first.device)
    # The cluster path's shapes are the persistent path's (it falls back there where no cluster runs).
    if not configs.path_fits("persistent" if path == "cluster" else path, H, first.dtype, allow_tf32, budget):
        raise ValueError(f"the {path} path does not run H = {H} in {first.dtype}: its smallest tile needs more than "
                         f"the {budget} B of shared memory a program may use")
    _check("w_hh", w_hh, (H, H), first)
    if lengths is not None:
        if lengths.shape != (B,) or lengths.device != first.device:
            raise ValueError(f"lengths must be a [{B}] tensor on {first.device}")
        lengths = lengths.to(torch.int32).contiguous()
    return T, B, H, lengths


def recurrence_forward(xw, h0, w_hh, *, lengths=None, reverse=False, relu=False, path="sequence",
                       allow_tf32=False, config=None):
    """Run h_t = act(xw_t + h_{t-1} W_hh^T) over all steps (reverse: from t = T-1 down to 0).

    Args:
        xw: [T, B, H] projected input x_t W_ih^T + b_ih + b_hh.
        h0: [B, H] initial state.
        w_hh: [H, H] recurrent weight.
        lengths: optional [B] lengths; steps t >= lengths[b] of row b output 0 and keep its state.
        config: a triton.Config for the path's kernel (default: tuned, autotuned or default).
    Returns:
        out [T, B, H] with every h_t, and h_n [B, H], the state after each row's last step.
    """
    T, B, H, lengths = _prepare(xw, w_hh, lengths, path, allow_tf32)
    xw = xw.contiguous()
    h0 = _check("h0", h0, (B, H), xw)
    w_hh = w_hh.contiguous()
    numerics = _numerics(xw.dtype, xw.device, allow_tf32)
    out = _empty_like(xw)
    if B == 0:
        return out, h0.clone()
    kernel, meta = _launcher(path, B, H, xw.dtype, xw.device, "forward", config, allow_tf32)
    if path in ("persistent", "cluster"):
        h_n = _empty_like(h0)

        def rerun(next_path):
            return recurrence_forward(xw, h0, w_hh, lengths=lengths, reverse=reverse, relu=relu, path=next_path,
                                      allow_tf32=allow_tf32, config=config if next_path == "persistent" else None)
        fallback = _run_in_groups(path, rerun, xw, h0, w_hh, None, out, h_n, lengths, backward=False,
                                  reverse=reverse, relu=relu, numerics=numerics, meta=meta)
        if fallback is not None:
            return fallback
        return out, h_n
    grid = _grid(path, B, H)
    # M = W_hh^T: read W_hh with its strides swapped.
    if path != "stepwise":
        h_n = _empty_like(h0)
        with _on(xw.device):
            kernel[grid](xw, h0, w_hh, None, out, h_n, lengths, T, B, H, 1, H,
                         configs.batch_bucket(B),
                         BLOCK_H=configs.block_h(H), BACKWARD=False, REVERSE=reverse, RELU=relu, **numerics,
                         **meta)
        return out, h_n
    # With lengths the carried state differs from the output (0 past each row's end): ping-pong it.
    states = [_empty_like(h0), _empty_like(h0)] if lengths is not None else None
    prev = h0
    with _on(xw.device):
        for i in range(T):
            t = T - 1 - i if reverse else i
            state = states[i % 2] if states is not None else None
            kernel[grid](xw[t], prev, w_hh, None, out[t], state, lengths, t, B, H, 1, H, configs.batch_bucket(B),
                         BACKWARD=False, RELU=relu, **numerics, **meta)
            prev = state if state is not None else out[t]
    return out, prev.clone()


def _prepare_pair(first: torch.Tensor, w_hh: torch.Tensor, lengths, allow_tf32: bool, path: str):
    if first.dim() != 4 or first.shape[0] != 2:
        raise ValueError(f"expected a [2, T, B, H] tensor (both directions), got shape {tuple(first.shape)}")
    if path not in ("persistent", "cluster"):
        raise ValueError(f"both directions run in one launch on the persistent or cluster path, got {path!r}")
    H = first.shape[-1]
    _check("w_hh", w_hh, (2, H, H), first)
    return _prepare(first[0], w_hh[0], lengths, path, allow_tf32)


def bidirectional_forward(xw, h0, w_hh, *, lengths=None, relu=False, allow_tf32=False, config=None,
                          path="persistent"):
    """Both directions of a bidirectional layer in one launch of the persistent kernel.

    Args:
        xw: [2, T, B, H] projected inputs of the forward (0) and reverse (1) direction.
        h0: [2, B, H]. w_hh: [2, H, H]. lengths, relu, allow_tf32, config: as for recurrence_forward.
        path: "persistent" or "cluster" (its cluster form; where refused, the persistent path runs).
    Returns:
        out [2, T, B, H] and h_n [2, B, H], each direction as recurrence_forward gives it.
    """
    T, B, H, lengths = _prepare_pair(xw, w_hh, lengths, allow_tf32, path)
    xw, w_hh = xw.contiguous(), w_hh.contiguous()
    h0 = _check("h0", h0, (2, B, H), xw)
    out, h_n = _empty_like(xw), _empty_like(h0)
    if B == 0:
        return out, h0.clone()
    _, meta = _launcher(path, B, H, xw.dtype, xw.device, "forward", config, allow_tf32)
    def rerun(next_path):
        if next_path == "persistent":
            return bidirectional_forward(xw, h0, w_hh, lengths=lengths, relu=relu, allow_tf32=allow_tf32, config=config)
        results = [recurrence_forward(xw[d], h0[d], w_hh[d], lengths=lengths, reverse=d == 1, relu=relu,
                                      path=next_path, allow_tf32=allow_tf32) for d in range(2)]
        return torch.stack([r[0] for r in results]), torch.stack([r[1] for r in results])
    fallback = _run_in_groups(path, rerun, xw, h0, w_hh, None, out, h_n, lengths, backward=False, reverse=False,
                              relu=relu, numerics=_numerics(xw.dtype, xw.device, allow_tf32), meta=meta)
    return (out, h_n) if fallback is None else fallback


def bidirectional_backward(grad, out, w_hh, *, lengths=None, relu=False, allow_tf32=False, config=None,
                           path="persistent"):
    """recurrence_backward of both directions of a bidirectional layer in one launch: grad and out
    are [2, T, B, H], w_hh [2, H, H]; returns dz [2, T, B, H]. path: as for bidirectional_forward."""
    T, B, H, lengths = _prepare_pair(grad, w_hh, lengths, allow_tf32, path)
    grad, w_hh = grad.contiguous(), w_hh.contiguous()
    out = _check("out", out, (2, T, B, H), grad)
    dz = _empty_like(grad)
    if B == 0:
        return dz
    _, meta = _launcher(path, B, H, grad.dtype, grad.device, "backward", config, allow_tf32)
    def rerun(next_path):
        if next_path == "persistent":
            return bidirectional_backward(grad, out, w_hh, lengths=lengths, relu=relu, allow_tf32=allow_tf32,
                                          config=config)
        return torch.stack([recurrence_backward(grad[d], out[d], w_hh[d], lengths=lengths, reverse=d == 1, relu=relu,
                                                path=next_path, allow_tf32=allow_tf32) for d in range(2)])
    fallback = _run_in_groups(path, rerun, grad, None, w_hh, out, dz, None, lengths, backward=True, reverse=True,
                              relu=relu, numerics=_numerics(grad.dtype, grad.device, allow_tf32), meta=meta)
    return dz if fallback is None else fallback


def persistent_plan(T: int, B: int, H: int, dtype: torch.dtype, device: torch.device, direction: str,
                    allow_tf32: bool = True, config=None, directions: int = 1) -> persistent.Plan:
    """The tiling the persistent path runs for this shape: programs per group, groups, batch tiles
    and the resident capacity (on a GPU this compiles the kernel). Raises ValueError where the
    path cannot run it on this device (shared memory, resident programs, arrival counters)."""
    _, meta = _launcher("persistent", B, H, dtype, device, direction, config, allow_tf32)
    backward = direction == "backward"
    # p_in, w_hh, p_act, out, ring, h_n, lengths
    tensors = [dtype, dtype, dtype if backward else None, dtype, dtype, None if backward else dtype, None]
    args, scalars, kwargs = persistent.launch_args(*tensors, T, B, H, backward=backward, reverse=backward, relu=False,
                                                   numerics=_numerics(dtype, device, allow_tf32), meta=meta,
                                                   timer=device.type == "cuda")
    with _on(device):
        chosen = persistent.schedule(args, scalars, kwargs, device, directions)[0]
    persistent.check_counters(T, chosen)
    return chosen


def persistent_fits(T: int, B: int, H: int, dtype: torch.dtype, device: torch.device, direction: str,
                    allow_tf32: bool = True, directions: int = 1) -> bool:
    """Whether the persistent path runs this shape on this device (see persistent_plan)."""
    try:
        persistent_plan(T, B, H, dtype, device, direction, allow_tf32, directions=directions)
    except ValueError:
        return False
    return True


def recurrence_backward(grad, out, w_hh, *, lengths=None, reverse=False, relu=False, path="sequence",
                        allow_tf32=False, config=None):
    """Walk the recurrence backwards: dz_t = (grad_t + dz_{t+1} W_hh) * act'(h_t).

    Args:
        grad: [T, B, H] dL/dh_t from the output, with dL/dh_n already added at each row's last step.
        out: [T, B, H] the forward's h_t.
        w_hh, lengths, reverse, relu, config: as for the forward (reverse names the forward's direction).
    Returns:
        dz [T, B, H], the gradient of the pre-activations (0 at inactive steps).
    """
    T, B, H, lengths = _prepare(grad, w_hh, lengths, path, allow_tf32)
    grad = grad.contiguous()
    out = _check("out", out, (T, B, H), grad)
    w_hh = w_hh.contiguous()
    numerics = _numerics(grad.dtype, grad.device, allow_tf32)
    dz = _empty_like(grad)
    if B == 0:
        return dz
    kernel, meta = _launcher(path, B, H, grad.dtype, grad.device, "backward", config, allow_tf32)
    if path in ("persistent", "cluster"):
        def rerun(next_path):
            return recurrence_backward(grad, out, w_hh, lengths=lengths, reverse=reverse, relu=relu, path=next_path,
                                       allow_tf32=allow_tf32, config=config if next_path == "persistent" else None)
        fallback = _run_in_groups(path, rerun, grad, None, w_hh, out, dz, None, lengths, backward=True,
                                  reverse=not reverse, relu=relu, numerics=numerics, meta=meta)
        return dz if fallback is None else fallback
    grid = _grid(path, B, H)
    if path != "stepwise":
        with _on(grad.device):
            kernel[grid](grad, None, w_hh, out, dz, None, lengths, T, B, H, H, 1,
                         configs.batch_bucket(B),
                         BLOCK_H=configs.block_h(H), BACKWARD=True, REVERSE=not reverse, RELU=relu, **numerics,
                         **meta)
        return dz
    prev = None
    with _on(grad.device):
        for i in range(T):
            t = i if reverse else T - 1 - i
            kernel[grid](grad[t], prev, w_hh, out[t], dz[t], None, lengths, t, B, H, H, 1, configs.batch_bucket(B),
                         BACKWARD=True, RELU=relu, **numerics, **meta)
            prev = dz[t]
    return dz
