"""Launching the recurrence kernels: tensors in, tensors out. No autograd, and no choice: the caller
names the layout and its config (tritonrnn.dispatch chooses them); a layout the device refuses
raises (LaunchRefused, ClusterUnavailable) and the caller takes the next one.

Dimensions: D directions, T steps, B batch, H hidden. Every tensor is one direction's, [T, B, H],
[B, H] and W_hh [H, H], or D = 2 directions stacked on a leading dimension ([2, T, B, H], [2, B, H],
[2, H, H]: a bidirectional layer), direction 1 walking the other way.

    recurrence_forward(xw, h0, w_hh)       -> out (every h_t), h_n
    recurrence_backward(grad, out, w_hh)   -> dz

The layouts (kernels/configs.py, LAYOUTS):
- "sequence": rnn_sequence_kernel, one launch for all T steps, W_hh held on chip by each program;
- "persistent": rnn_persistent_kernel, one launch for all T steps (and both directions), W_hh split
  by columns over programs that stay resident and meet at a counter barrier each step;
- "cluster": the same kernel with each group one Hopper thread-block cluster meeting at the hardware
  cluster barrier (launched through Triton's launcher with num_ctas = the cluster size; below);
- "streamed": the persistent kernel's counter groups with nothing held on chip: each step reads
  the program's W slice and its group's state from L2 in STREAM_K-row chunks (H whose slice does
  not fit on chip);
- "stepwise": one launch of rnn_step_kernel per timestep (any H).
The cell (kernels/cells.py) is a parameter of every layout: its name is the kernels' CELL.

A config is a triton.Config, "autotune" (Triton's autotuner over the layout's space, keyed by H, the
batch bucket and every variant flag) or None (the layout's default config).
"""
import contextlib
import contextvars
import dataclasses
import functools
import inspect

import torch
import triton
import triton.language as tl

from . import cells, occupancy, toolchain
from . import configs
from .occupancy import BarrierTimeout, ClusterUnavailable, LaunchRefused, Plan
from .persistent import COUNTER, GAVE_UP, STATUS, SYNC_LINE, barrier_probe_kernel, rnn_persistent_kernel
from .sequence import rnn_sequence_kernel
from .step import rnn_step_kernel

__all__ = ["BarrierTimeout", "ClusterUnavailable", "LaunchRefused", "recurrence_backward", "recurrence_forward"]

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
KERNELS = {"sequence": rnn_sequence_kernel, "persistent": rnn_persistent_kernel, "cluster": rnn_persistent_kernel,
           "streamed": rnn_persistent_kernel, "stepwise": rnn_step_kernel}

# How long a program waits at a step's barrier before it gives up (a program of its group is not
# running: not resident, preempted, or a fault). Steps take microseconds; a wait of seconds is a hang.
WAIT_TIMEOUT_S = 10.0
# The interpreter has no clock in the kernel: its bound is in polls, each taken to last this long
# (under the concurrent harness a poll is several interpreted operations and a random sleep of
# 0.1 ms on average: 1 to 30 ms measured on a loaded 2-core machine).
INTERPRETED_POLL_S = 1e-3

# Inside checking(): the persistent kernel's wait limit (seconds) for the launches of a self-test.
_checking = contextvars.ContextVar("tritonrnn_checking", default=None)


@contextlib.contextmanager
def checking(wait_s: float):
    """The launches of a layout's self-test (tritonrnn.selftest): every output starts as NaN (an element
    a kernel fails to write stays NaN) and the persistent kernel gives up waiting after `wait_s`."""
    token = _checking.set(wait_s)
    try:
        yield
    finally:
        _checking.reset(token)


def _empty_like(tensor: torch.Tensor) -> torch.Tensor:
    # Every kernel output is allocated here (the tests and the self-test fill it with NaN to catch
    # unwritten elements).
    return torch.empty_like(tensor) if _checking.get() is None else torch.full_like(tensor, float("nan"))


def numerics(dtype: torch.dtype, device: torch.device, allow_tf32: bool) -> dict:
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


# ---------------------------------------------------------------------------------------------
# Configs


def variant_flags(layout: str) -> list:
    """The constexpr arguments a launch sets besides the config's own (direction, cell, optional
    inputs, numerics): each compiles a different variant, so each is in the autotuning key."""
    annotations = python_function(KERNELS[layout]).__annotations__
    tuned = {name for config in configs.full_space(layout) for name in config.kwargs}
    return [name for name, kind in annotations.items() if kind is tl.constexpr and name not in tuned]


def python_function(kernel):
    """The Python function below a kernel's @triton.heuristics, @triton.autotune and @triton.jit."""
    while not inspect.isfunction(kernel):
        kernel = kernel.fn
    return kernel


@functools.lru_cache(maxsize=None)
def _autotuned(layout: str):
    """Triton's autotuner over the layout's space, keyed by H, the batch bucket and every variant flag
    (never by T). The heuristics run first, so the flags they derive (HAS_LENGTHS, ...) reach the key."""
    heuristics = KERNELS[layout]
    tuner = triton.autotune(configs=configs.full_space(layout), key=["H", "B_BUCKET", *variant_flags(layout)],
                            prune_configs_by={"early_config_prune": configs.prune_space(layout)})(heuristics.fn)
    return triton.heuristics(heuristics.values)(tuner)


def _kernel_and_meta(layout: str, B: int, H: int, dtype, device, config, allow_tf32: bool) -> tuple:
    """The kernel to launch and its meta-parameters: Triton's autotuner ("autotune", where the layout
    has one: not the persistent kernel, whose grid depends on its compiled resources), else `config`
    or the layout's default, held to the device's shared memory."""
    if isinstance(config, str):
        if config != "autotune":
            raise ValueError(f"config must be a triton.Config, 'autotune' or None, got {config!r}")
        if layout in configs.AUTOTUNED:
            return _autotuned(layout), {}
        config = None  # the persistent kernel's grid depends on its compiled resources: no autotuner
    config = config or configs.default_config(layout, B, H, dtype)
    budget = configs.shared_memory_budget(device)
    if not configs.config_fits(layout, config, H, dtype, allow_tf32, budget):
        raise ValueError(f"{layout} config {configs.config_to_dict(config)} needs "
                         f"{configs.shared_memory_bytes(layout, config, H, dtype, allow_tf32)} B of shared memory "
                         f"at H = {H} in {dtype}; a program may use {budget} B")
    return KERNELS[layout], configs.config_to_dict(config)


# ---------------------------------------------------------------------------------------------
# The launchers


def recurrence_forward(xw, h0, w_hh, *, lengths=None, reverse=False, cell="tanh", layout="sequence",
                       allow_tf32=False, config=None):
    """Run h_t = act(xw_t + h_{t-1} W_hh^T) over all steps (reverse: from t = T-1 down to 0).

    Args:
        xw: [T, B, H] projected input x_t W_ih^T + b_ih + b_hh, or [2, T, B, H] (both directions).
        h0: [B, H] initial state ([2, B, H]).
        w_hh: [H, H] recurrent weight ([2, H, H]).
        lengths: optional [B] lengths; steps t >= lengths[b] of row b output 0 and keep its state.
        reverse: direction 0 walks from T-1 down to 0 (direction 1 always walks the other way).
        cell: the cell's name (kernels/cells.py: "tanh" or "relu", the Elman nonlinearity).
        layout, config: see the module docstring.
    Returns:
        out [T, B, H] with every h_t, and h_n [B, H], the state after each row's last step (stacked
        [2, ...] where the inputs are).
    """
    r = _Recurrence.of(xw, w_hh, lengths, layout, cell, backward=False, reverse=reverse, allow_tf32=allow_tf32)
    h0 = r.check("h0", h0, (r.B, r.H))
    out, h_n = _empty_like(r.first), _empty_like(h0)
    if r.B == 0:
        return r.unstack(out), r.unstack(h0.clone())
    r.run(allow_tf32, config, p_in=r.first, p_h0=h0, p_act=None, p_out=out, p_hn=h_n)
    return r.unstack(out), r.unstack(h_n)


def recurrence_backward(grad, out, w_hh, *, lengths=None, reverse=False, cell="tanh", layout="sequence",
                        allow_tf32=False, config=None):
    """Walk the recurrence backwards: dz_t = (grad_t + dz_{t+1} W_hh) * act'(h_t).

    Args:
        grad: [T, B, H] dL/dh_t from the output, with dL/dh_n already added at each row's last step
            ([2, T, B, H]: both directions).
        out: the forward's h_t, as grad.
        w_hh, lengths, reverse, cell, layout, config: as for the forward (reverse names the forward's
            direction).
    Returns:
        dz, as grad: the gradient of the pre-activations (0 at inactive steps).
    """
    r = _Recurrence.of(grad, w_hh, lengths, layout, cell, backward=True, reverse=reverse, allow_tf32=allow_tf32)
    out = r.check("out", out, (r.T, r.B, r.H))
    dz = _empty_like(r.first)
    if r.B == 0:
        return r.unstack(dz)
    r.run(allow_tf32, config, p_in=r.first, p_h0=None, p_act=out, p_out=dz, p_hn=None)
    return r.unstack(dz)


class _Recurrence:
    """One call of a launcher: its checked inputs, stacked [D, ...], and how each layout launches it."""

    def __init__(self, first, w_hh, lengths, layout, cell, backward, reverse, stacked):
        self.first, self.w_hh, self.lengths, self.layout = first, w_hh, lengths, layout
        self.cell, self.backward, self.reverse, self.stacked = cell, backward, reverse, stacked
        self.D, self.T, self.B, self.H = first.shape
        self.grouped = layout in configs.GROUPED

    @classmethod
    def of(cls, first, w_hh, lengths, layout, cell, backward, reverse, allow_tf32) -> "_Recurrence":
        stacked = first.dim() == 4
        if stacked and first.shape[0] != 2:
            raise ValueError(f"expected a [2, T, B, H] tensor (both directions), got shape {tuple(first.shape)}")
        if first.dim() not in (3, 4):
            raise ValueError(f"expected a [T, B, H] tensor, got shape {tuple(first.shape)}")
        first = first if stacked else first[None]
        D, T, B, H = first.shape
        numerics(first.dtype, first.device, allow_tf32)  # a dtype the kernels take
        if T == 0:
            raise ValueError("expected at least one timestep, got T = 0")
        if layout not in configs.LAYOUTS:
            raise ValueError(f"layout must be one of {configs.LAYOUTS}, got {layout!r}")
        gates = cells.get(cell).gates
        budget = configs.shared_memory_budget(first.device)
        if not configs.layout_fits(configs.kernel_layout(layout), H, first.dtype, allow_tf32, budget=budget):
            raise ValueError(f"the {layout} layout does not run H = {H} in {first.dtype}: its smallest tile needs more "
                             f"than the {budget} B of shared memory a program may use")
        r = cls(first.contiguous(), None, None, layout, cell, backward, reverse, stacked)
        r.w_hh = r.check("w_hh", w_hh, (gates * H, H))
        if lengths is not None:
            if lengths.shape != (B,) or lengths.device != first.device:
                raise ValueError(f"lengths must be a [{B}] tensor on {first.device}")
            r.lengths = lengths.to(torch.int32).contiguous()
        return r

    def check(self, name: str, tensor: torch.Tensor, shape: tuple) -> torch.Tensor:
        """`tensor` as one direction's `shape` (stacked: [D, *shape]) of this call's dtype and device;
        returned contiguous with its directions first."""
        expected = (self.D, *shape) if self.stacked else tuple(shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
        if tensor.dtype != self.first.dtype or tensor.device != self.first.device:
            raise ValueError(f"{name} must be {self.first.dtype} on {self.first.device}, got {tensor.dtype} on "
                             f"{tensor.device}")
        tensor = tensor.contiguous()
        return tensor if self.stacked else tensor[None]

    def unstack(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.stacked else tensor[0]

    def walks_backwards(self, d: int) -> bool:
        """Whether direction d's kernel walks from T-1 down to 0: direction 1 the other way than 0, and
        the backward the other way than its forward."""
        return (self.reverse != (d == 1)) != self.backward

    def flags(self, allow_tf32: bool) -> dict:
        return {"BACKWARD": self.backward, "CELL": self.cell,
                **numerics(self.first.dtype, self.first.device, allow_tf32)}

    def strides(self) -> dict:
        """M = W_hh^T in the forward (W_hh read with its strides swapped), W_hh in the backward."""
        H = self.H
        return {"stride_wk": H, "stride_wn": 1} if self.backward else {"stride_wk": 1, "stride_wn": H}

    def run(self, allow_tf32: bool, config, **tensors) -> None:
        """Launch on the layout: every direction at once on the persistent kernel's layouts, else one
        direction after the other. `tensors`: the kernel's tensors with their directions first (or None)."""
        if self.grouped:
            self.launch_grouped(allow_tf32, config, **tensors)
            return
        for d in range(self.D):
            self.launch_direction(d, allow_tf32, config, **{k: None if t is None else t[d] for k, t in tensors.items()})

    def launch_direction(self, d: int, allow_tf32: bool, config, *, p_in, p_h0, p_act, p_out, p_hn) -> None:
        """Direction d on the sequence layout (one launch) or the stepwise one (T launches)."""
        kernel, meta = _kernel_and_meta(self.layout, self.B, self.H, self.first.dtype, self.first.device, config,
                                        allow_tf32)
        common = dict(p_w=self.w_hh[d], p_len=self.lengths, B=self.B, H=self.H, B_BUCKET=configs.batch_bucket(self.B),
                      **self.strides(), **self.flags(allow_tf32), **meta)
        walks_backwards = self.walks_backwards(d)
        with _on(self.first.device):
            if self.layout == "sequence":
                grid = lambda m: (triton.cdiv(self.B, m["BLOCK_B"]),)  # noqa: E731
                kernel[grid](p_in=p_in, p_h0=p_h0, p_act=p_act, p_out=p_out, p_hn=p_hn, T=self.T,
                             BLOCK_H=configs.block_h(self.H), REVERSE=walks_backwards, **common)
            else:
                self._steps(kernel, common, walks_backwards, p_in, p_h0, p_act, p_out, p_hn)

    def _steps(self, kernel, common: dict, walks_backwards: bool, p_in, p_h0, p_act, p_out, p_hn) -> None:
        """The stepwise layout: one launch a step, each reading the state the previous one wrote. With
        lengths the forward's carried state differs from its output (0 past each row's end): it
        ping-pongs between two buffers."""
        grid = lambda m: (triton.cdiv(self.B, m["BLOCK_B"]), triton.cdiv(self.H, m["BLOCK_N"]))  # noqa: E731
        carried = None if self.backward or self.lengths is None else [_empty_like(p_hn), _empty_like(p_hn)]
        prev = p_h0  # the forward's h0; the backward starts from dz = 0 (no state)
        for i in range(self.T):
            t = self.T - 1 - i if walks_backwards else i
            state = carried[i % 2] if carried is not None else None
            kernel[grid](p_in=p_in[t], p_prev=prev, p_act=None if p_act is None else p_act[t], p_out=p_out[t],
                         p_state=state, t=t, **common)
            prev = state if state is not None else p_out[t]
        if p_hn is not None:
            p_hn.copy_(prev)

    def launch_grouped(self, allow_tf32: bool, config, *, p_in, p_h0, p_act, p_out, p_hn) -> Plan:
        """Every direction in one launch of the persistent kernel: counter groups, or clusters."""
        _, meta = _kernel_and_meta(self.layout, self.B, self.H, self.first.dtype, self.first.device, config,
                                   allow_tf32)
        wait_s = _checking.get()
        timeout_s = WAIT_TIMEOUT_S if wait_s is None else wait_s
        with _on(self.first.device):
            args = self.persistent_arguments(p_in, p_h0, p_act, p_out, p_hn, meta, allow_tf32)
            if self.layout == "cluster":
                return _launch_clusters_of(args, self.first.device, timeout_s)
            return _launch_persistent(args, self.first.device, timeout_s)

    def persistent_arguments(self, p_in, p_h0, p_act, p_out, p_hn, meta: dict, allow_tf32: bool) -> dict:
        """The persistent kernel's arguments but the sync words, BATCH_TILES and the wait limit: the
        ring holding the exchanged state (two slots, rows padded to 16 elements, zero beyond H; slot 1
        the state before step 0) and, where H is not a multiple of 16, the padded slices."""
        D, B, H = self.D, self.B, self.H
        ring = torch.zeros(D, 2, B, padded(H), dtype=p_out.dtype, device=p_out.device)
        if p_h0 is not None:
            ring[:, 1, :, :H] = p_h0
        w_hh = padded_slices(self.w_hh, self.backward) if H % 16 else self.w_hh
        return kernel_arguments(p_in=p_in, p_w=w_hh, p_act=p_act, p_out=p_out, p_ring=ring, p_hn=p_hn,
                                p_len=self.lengths, T=self.T, B=B, H=H, backward=self.backward,
                                reverse=self.walks_backwards(0), cell=self.cell,
                                numerics=numerics(p_out.dtype, p_out.device, allow_tf32), meta=meta,
                                timer=p_out.device.type == "cuda")


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# The persistent kernel's launch: counter groups


def padded(hidden: int) -> int:
    """The ring's row stride: H rounded up to 16 elements (aligned, vectorised state loads at any H)."""
    return triton.cdiv(hidden, 16) * 16


def slice_strides(hidden: int, backward: bool) -> tuple:
    """(stride_wk, stride_wn) of M: W_hh^T in the forward (W_hh read with its strides swapped), W_hh
    in the backward; or M^T with padded rows (padded_slices) where H is not a multiple of 16."""
    if hidden % 16:
        return 1, padded(hidden)
    return (hidden, 1) if backward else (1, hidden)


def padded_slices(w_hh: torch.Tensor, backward: bool) -> torch.Tensor:
    """M^T with rows padded to 16 elements ([..., H, HP], zero beyond H), for an H that is not a
    multiple of 16: each program's slice (rows of M^T) then loads in aligned vectors, not element by
    element. One copy of W_hh a launch (H * HP elements)."""
    H = w_hh.shape[-1]
    m_t = w_hh.transpose(-1, -2) if backward else w_hh  # forward M = W_hh^T: M^T = W_hh
    out = w_hh.new_zeros(*w_hh.shape[:-1], padded(H))
    out[..., :H] = m_t
    return out


def kernel_arguments(*, p_in, p_w, p_act, p_out, p_ring, p_hn, p_len, T, B, H, backward: bool, reverse: bool,
                     cell: str, numerics: dict, meta: dict, timer: bool) -> dict:
    """rnn_persistent_kernel's arguments by name but p_sync, BATCH_TILES and wait_limit (tensors, or
    their dtypes where only the compiled kernel is needed: persistent_plan, perf.static)."""
    stride_wk, stride_wn = slice_strides(H, backward)
    return dict(p_in=p_in, p_w=p_w, p_act=p_act, p_out=p_out, p_ring=p_ring, p_hn=p_hn, p_len=p_len, T=T, B=B, H=H,
                HP=padded(H), stride_wk=stride_wk, stride_wn=stride_wn, BLOCK_H=configs.block_h(H), COLUMN_BLOCKS=1,
                BACKWARD=backward, REVERSE=reverse, CELL=cell, TIMER=timer, **numerics, **meta)


def schedule(args: dict, device: torch.device, directions: int = 1) -> tuple:
    """The plan of a counter launch and its arguments: on a GPU from the compiled kernel's resources
    (compiling it if needed); in the interpreter, where programs run one at a time unless the
    concurrent test harness runs them, a group of one program that serves every column block in
    turn (blocks as wide as the interpreter's tensors allow)."""
    if device.type == "cuda":
        compiled = rnn_persistent_kernel.warmup(**args, p_sync=torch.int32, BATCH_TILES=1, wait_limit=1,
                                                grid=(1, 1, 1), launch_cooperative_grid=True)
        capacity, modelled = _capacities(compiled, device)
    else:
        modelled = None
        capacity = occupancy.INTERPRETED_RESIDENT_PROGRAMS
        if capacity == 1:
            width = args["BLOCK_H"]
            block_n = min(width, max(16, occupancy.INTERPRETED_MAX_NUMEL // width))
            args = dict(args, BLOCK_N=block_n, COLUMN_BLOCKS=triton.cdiv(width, block_n), K_SPLIT=1)
    width = args["BLOCK_N"] * args["COLUMN_BLOCKS"]
    chosen = occupancy.plan(args["B"], args["H"], args["BLOCK_B"], width, capacity, directions)
    check_counters(args["T"], chosen)
    return dataclasses.replace(chosen, modelled_capacity=modelled), args


# The resident capacities (the driver's, the hand model's) by compiled kernel and device: a loaded kernel's
# answer does not change, and the driver's query would otherwise run before every launch.
_CAPACITIES = {}


def _capacities(compiled, device: torch.device) -> tuple:
    key = (compiled.hash, str(device))
    if key not in _CAPACITIES:
        _CAPACITIES[key] = occupancy.resident_capacity(compiled, device), occupancy.modelled_capacity(compiled, device)
    return _CAPACITIES[key]


def check_counters(T: int, chosen: Plan) -> None:
    """The int32 arrival counters reach T times the programs of a group, below the GAVE_UP bit."""
    if T * chosen.programs_per_group >= GAVE_UP.value:
        raise LaunchRefused(f"T = {T} steps overflow the int32 arrival counters of {chosen.programs_per_group} "
                            f"programs per group")


def wait_limit(device: torch.device, timeout_s: float) -> int:
    """The kernel's wait_limit: microseconds on a GPU, polls in the interpreter."""
    if device.type == "cuda":
        return max(1, min(int(timeout_s * 1e6), 2 ** 31 - 1))
    return max(1, min(int(timeout_s / INTERPRETED_POLL_S), 2 ** 31 - 1))


def check_sync_status(sync: torch.Tensor, chosen: Plan, timeout_s: float) -> None:
    """Raise BarrierTimeout if a group gave up waiting. This reads the status words back: a host sync
    (the CPU waits for the launch to end before it queues more work: the launch latency of the next
    kernels is no longer hidden behind the recurrence). Skipped while a CUDA graph is captured (no
    sync is allowed there: a timed-out launch then shows only as NaN outputs)."""
    if not chosen.waits or (sync.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    failed = sync[..., STATUS.value].nonzero().tolist()
    if failed:
        where = ", ".join(f"group {g} of direction {d}" for d, g in failed)
        raise BarrierTimeout(
            f"the persistent RNN kernel's {where} waited more than {timeout_s} s at a step barrier for a program "
            f"of its group ({chosen.programs_per_group} programs a group, {chosen.programs} in the launch): not "
            f"every program was running at once (another process or MPS sharing the GPU, a debugger, a preempted "
            f"or faulted program). Its outputs are NaN. Rerun with the GPU to itself, raise "
            f"tritonrnn.kernels.launch.WAIT_TIMEOUT_S if steps legitimately take that long, or take the "
            f"stepwise layout (layout='stepwise' in tritonrnn.kernels.recurrence_forward/backward).")


def _directions(args: dict) -> int:
    return args["p_out"].shape[0]


def _launch_persistent(args: dict, device: torch.device, timeout_s: float) -> Plan:
    """One cooperative launch of the persistent kernel's counter groups; returns the plan it ran."""
    chosen, args = schedule(args, device, _directions(args))
    sync = torch.zeros(chosen.directions, chosen.groups, SYNC_LINE.value, dtype=torch.int32, device=device)
    try:
        rnn_persistent_kernel[chosen.grid](**args, p_sync=sync, BATCH_TILES=chosen.batch_tiles,
                                           wait_limit=wait_limit(device, timeout_s),
                                           launch_cooperative_grid=chosen.waits)
    except RuntimeError as exc:
        if chosen.waits and "cooperative launch" in str(exc):  # CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
            raise LaunchRefused(f"the driver refused a cooperative launch of {chosen.programs} programs "
                                f"({chosen.grid}): {exc}") from exc
        raise
    check_sync_status(sync, chosen, timeout_s)
    return chosen


def persistent_plan(T: int, B: int, H: int, dtype: torch.dtype, device: torch.device, direction: str,
                    allow_tf32: bool = True, config=None, directions: int = 1, layout: str = "persistent") -> Plan:
    """The tiling a counter-grouped layout (configs.COUNTER_GROUPED: persistent, streamed) runs for this
    shape: programs per group, groups, batch tiles and the resident capacity (on a GPU this compiles the
    kernel). Raises LaunchRefused where the layout cannot run it on this device (resident programs,
    arrival counters)."""
    _, meta = _kernel_and_meta(layout, B, H, dtype, device, config, allow_tf32)
    backward = direction == "backward"
    args = kernel_arguments(p_in=dtype, p_w=dtype, p_act=dtype if backward else None, p_out=dtype, p_ring=dtype,
                            p_hn=None if backward else dtype, p_len=None, T=T, B=B, H=H, backward=backward,
                            reverse=backward, cell="tanh", numerics=numerics(dtype, device, allow_tf32), meta=meta,
                            timer=device.type == "cuda")
    with _on(device):
        return schedule(args, device, directions)[0]


# ---------------------------------------------------------------------------------------------
# The persistent kernel's launch: clusters
#
# A group of programs is one Hopper thread-block cluster and the group barrier is the cluster's
# hardware barrier (kernels/persistent.py, BARRIER="cluster"): each program (one CTA) owns BLOCK_N
# columns, a group is cdiv(H, BLOCK_N) programs, and the launch makes each group one cluster of that
# many CTAs (cluster dims (programs per group, 1, 1), grid (groups x directions) clusters), so
# program_id(0) is the CTA's rank in its cluster (CUDA numbers a (N, 1, 1) cluster's CTAs by x).
# Clusters are gang-scheduled, so no cooperative launch is needed, nothing counts arrivals (no sync
# words) and no wait is bounded; clusters of a launch never wait for each other.
#
# Each CTA is its own Triton program, compiled with num_ctas = 1: with num_ctas = N, Triton makes one
# program span the cluster and splits every tensor over the CTAs by its own layout choice, so a
# program could not pick its W_hh slice by rank (docs/DESIGN.md D14). The launch instead tells
# Triton's launcher num_ctas = N for a kernel compiled with num_ctas = 1 (the launcher multiplies grid
# x by it and sets the cluster dimension; at 16 it allows the non-portable size): the releases whose
# launcher was read (kernels/toolchain.py) only.
#
# The interpreter cannot run PTX: there the same programs run with the counter barrier, which needs
# every CTA of a cluster at once (tests/concurrent_interpreter.py); the plain interpreter (one program
# at a time) refuses the launch (ClusterUnavailable). Nothing the CPU runs exercises the cluster
# barrier itself: the offline PTX checks (perf/static.py) do.


def cluster_refusal(device: torch.device):
    """Why no cluster launch runs on `device` (None: one may be tried): a device that is not an sm_90+
    GPU, or a Triton whose launcher was not checked."""
    if device.type != "cuda":
        return f"thread-block clusters run on CUDA GPUs of sm_90 or later, not on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability[0] < 9:
        return f"thread-block clusters need sm_90 or later; {device} is sm_{''.join(map(str, capability))}"
    return toolchain.cluster_launch_refusal() or None


def _launch_clusters_of(args: dict, device: torch.device, timeout_s: float) -> Plan:
    """The recurrence in one launch of clusters (meta's BLOCK_N sets the cluster size); returns the plan."""
    if args.get("COLUMN_BLOCKS", 1) != 1:
        raise ClusterUnavailable("a cluster's CTA holds one slice (COLUMN_BLOCKS = 1)")
    size = occupancy.cluster_size(args["H"], args["BLOCK_N"])
    if device.type != "cuda":
        # CTAs of a cluster wait for each other at the counter barrier: all must run at once.
        chosen = occupancy.plan(args["B"], args["H"], args["BLOCK_B"], args["BLOCK_N"],
                                occupancy.INTERPRETED_RESIDENT_PROGRAMS, _directions(args), cluster=True)
        sync = torch.zeros(chosen.directions, chosen.groups, SYNC_LINE.value, dtype=torch.int32, device=device)
        rnn_persistent_kernel[chosen.grid](**args, p_sync=sync, BATCH_TILES=chosen.batch_tiles,
                                           wait_limit=wait_limit(device, timeout_s), BARRIER="counter")
        check_sync_status(sync, chosen, timeout_s)
        return chosen
    refusal = cluster_refusal(device)
    if refusal:
        raise ClusterUnavailable(refusal)
    args = dict(args, BARRIER="cluster", p_sync=None, BATCH_TILES=1, wait_limit=1)
    compiled = rnn_persistent_kernel.warmup(**args, grid=(1, 1, 1))
    resident = occupancy.resident_clusters(compiled, size, device)
    chosen = occupancy.plan(args["B"], args["H"], args["BLOCK_B"], args["BLOCK_N"], resident * size,
                            _directions(args), cluster=True)
    values = bound_arguments(rnn_persistent_kernel, dict(args, BATCH_TILES=chosen.batch_tiles,
                                                         HAS_LENGTHS=args["p_len"] is not None))
    launch_clusters(compiled, chosen, values)
    return chosen


def bound_arguments(kernel, kwargs: dict) -> list:
    """Every argument of the @triton.jit function below `kernel` (heuristics included in kwargs),
    in its parameter order, defaults filled in: what Triton's launcher takes after the metadata."""
    signature = inspect.signature(python_function(kernel))
    bound = signature.bind(**{k: v for k, v in kwargs.items() if k in signature.parameters})
    bound.apply_defaults()
    return list(bound.arguments.values())


def packed_metadata(compiled, size: int) -> tuple:
    """Triton's launcher metadata (num_warps, num_ctas, shared), num_ctas set to the cluster size: the
    launcher then launches grid x times `size` CTAs in clusters (size, 1, 1) and, at 16, allows the
    non-portable size. The kernel itself is compiled with num_ctas = 1. Refused (ClusterUnavailable)
    on a Triton whose launcher was not checked (kernels/toolchain.py) and for a kernel with global
    scratch, which the launcher sizes by the compiled num_ctas (1), not by the cluster."""
    refusal = toolchain.cluster_launch_refusal()
    if refusal:
        raise ClusterUnavailable(refusal)
    meta = compiled.metadata
    if meta.num_ctas != 1:
        raise ValueError(f"a cluster launch takes a kernel compiled with num_ctas = 1, got {meta.num_ctas}")
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise ClusterUnavailable("the kernel needs global scratch, which Triton's launcher sizes for one CTA a "
                                 "program, not for a cluster")
    return (meta.num_warps, size, meta.shared)


def launch_grid(chosen: Plan) -> tuple:
    """The grid Triton's launcher takes for the Plan `chosen`: in clusters along x (it multiplies x by
    num_ctas = the cluster size), so that its CTAs are chosen.grid, the programs the counter form runs."""
    size, groups, directions = chosen.grid
    return (size // chosen.programs_per_group, groups, directions)


def launch_clusters(compiled, chosen: Plan, values: list) -> None:
    """Launch `compiled` (num_ctas = 1) as the clusters of `chosen` (chosen.grid CTAs, clusters of
    chosen.programs_per_group along x); values: every kernel argument (bound_arguments)."""
    from triton import knobs
    from triton.runtime import driver
    metadata = packed_metadata(compiled, chosen.programs_per_group)
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    grid = launch_grid(chosen)
    try:
        compiled.run(*grid, stream, compiled.function, metadata, compiled.launch_metadata(grid, stream, *values),
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)
    except RuntimeError as error:  # cuLaunchKernelEx's refusal, e.g. CUDA_ERROR_CLUSTER_OUT_OF_RESOURCES
        raise ClusterUnavailable(f"the driver refused {grid[1]} x {grid[2]} clusters of {chosen.programs_per_group} "
                                 f"CTAs: {error}") from error


def probe_barrier(barrier_kind: str, steps: int, size: int = occupancy.MAX_CLUSTER_SIZE, groups: int = 1,
                  device: torch.device = None) -> torch.Tensor:
    """Launch barrier_probe_kernel: `groups` groups of `size` programs (one CTA each, 4 warps) taking
    `steps` empty steps at the barrier `barrier_kind` ("cluster": each group one cluster, GPU only;
    "counter": a cooperative launch). Returns each group's arrival counter (the counter form's:
    steps x size; 0 in the cluster form). Time it with CUDA events, at two step counts to cancel the
    launch: calibration."""
    device = device or torch.device("cuda")
    on_gpu = device.type == "cuda"
    limit = wait_limit(device, WAIT_TIMEOUT_S)
    sync = torch.zeros(groups, SYNC_LINE.value, dtype=torch.int32, device=device)
    if barrier_kind == "counter":
        cooperative = {"launch_cooperative_grid": True} if on_gpu else {}
        barrier_probe_kernel[(size, groups)](p_sync=sync, STEPS=steps, wait_limit=limit, BARRIER="counter",
                                             TIMER=on_gpu, num_warps=4, **cooperative)
        return sync[:, COUNTER.value]
    refusal = cluster_refusal(device)
    if refusal:
        raise ClusterUnavailable(refusal)
    arguments = dict(p_sync=None, STEPS=steps, wait_limit=limit, BARRIER="cluster", TIMER=True)
    compiled = barrier_probe_kernel.warmup(**arguments, num_warps=4, grid=(1,))
    groups_of_size = Plan(size, groups, batch_tiles=1, resident_capacity=groups * size, cluster=True)
    launch_clusters(compiled, groups_of_size, bound_arguments(barrier_probe_kernel, arguments))
    return sync[:, COUNTER.value]
