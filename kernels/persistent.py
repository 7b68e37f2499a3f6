"""The persistent recurrence: one launch for all T steps, W_hh split by output columns over
programs that stay resident and meet at a barrier after every step.

Dimensions: T steps, B batch, H hidden. Program (n, g) owns the output columns
n*BLOCK_N ... (n+1)*BLOCK_N - 1 for every step, and loads its slice of W_hh once, before the time
loop, so the slice stays on chip (shared memory/registers) for the whole sequence. It serves the
batch rows of group g: BATCH_TILES tiles of BLOCK_B rows, in direction d (a bidirectional layer
runs both directions in one launch: grid axis 2, inputs stacked [2, ...], direction 1 walking
the other way). Each step it reads the group's whole previous state (all H columns of its rows,
which the other programs of the group have just written: one row of `p_out`, in L2), computes
its columns of the new state and stores them. Then the programs of the group (same g and d,
every n) wait for each other:

    debug_barrier; arrivals[g] += 1 (release); poll arrivals[g] (acquire) until it reaches
    (steps done) * (programs per group); debug_barrier

The counter only grows (zeroed once per launch, never between steps), so no reset can race with
a late poll. With BARRIER="cluster" a group is one thread-block cluster instead and waits at the
hardware cluster barrier (kernels/cluster.py launches that form). The exchanged state is read with .cg (from L2, never a stale L1 line) after the
acquire. Every program of the launch must be resident at once, or the waits never end:
`resident_capacity` computes from the compiled kernel how many fit, `plan` never exceeds it and
the launch is cooperative (the driver refuses a grid that cannot be co-resident). Groups of one
program wait for no one (the plain interpreter runs programs one at a time, so its groups are
single programs).

The same kernel runs the forward (state h) and the backward (state dz):

    forward:   h_t  = act(xw_t + h_{t-1} @ W_hh^T)               M = W_hh^T
    backward:  dz_t = (g_t + dz_{t+1} @ W_hh) * act'(h_t)          M = W_hh

With lengths, steps t >= lengths[b] of row b write 0. The forward's carried state is then not
the output: a row's previous state is out[t_prev] where t_prev was active, else h0 (the reverse
direction starts each row at its own last step); h_n is out at each row's last step.
"""
import dataclasses
import math

import torch
import triton
import triton.language as tl

from . import cluster
from .common import cell_update, recurrent_dot


@triton.jit
def _load_slice(p_w, o_k, o_n, m_n, H, stride_wk, stride_wn):
    """Rows o_k, columns o_n of M (zero outside H)."""
    return tl.load(p_w + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn, mask=(o_k < H)[:, None] & m_n[None, :],
                   other=0.0)


@triton.jit
def _load_state(p_s, m_s, o_k, H):
    """Columns o_k of the state rows p_s (zero where m_s is off), from L2: other programs wrote them."""
    return tl.load(p_s + o_k[None, :], mask=m_s[:, None] & (o_k < H)[None, :], other=0.0, cache_modifier=".cg")


@triton.jit
def _batch_tile(first, B, H, m_n, BLOCK_B: tl.constexpr):
    """Rows first .. first + BLOCK_B - 1: their indices, mask, row offsets and mask with columns m_n."""
    o_b = first + tl.arange(0, BLOCK_B)
    m_b = o_b < B
    return o_b, m_b, o_b[:, None].to(tl.int64) * H, m_b[:, None] & m_n[None, :]


@triton.jit
def counter_barrier(p_count, target):
    """Arrive at the int32 counter p_count (release) and wait until it reaches `target` (acquire):
    every thread's stores before, every thread's loads after."""
    tl.debug_barrier()
    tl.atomic_add(p_count, 1, sem="release")
    waiting = True
    while waiting:
        waiting = tl.atomic_add(p_count, 0, sem="acquire") < target
    tl.debug_barrier()


@triton.heuristics({"HAS_LENGTHS": lambda args: args["p_len"] is not None})
# B unspecialised: B = 1 would become a constant (no .to) and a variant of its own to compile.
@triton.jit(do_not_specialize=["T", "B", "BATCH_TILES"])
def rnn_persistent_kernel(
    p_in,  # [D, T, B, H] forward: x_t W_ih^T + b; backward: dL/dh_t (dL/dh_n folded in)
    p_h0,  # [D, B, H] initial state (forward only)
    p_w,  # [D, H, H] M[k, n] = p_w[k * stride_wk + n * stride_wn]
    p_act,  # [D, T, B, H] h_t of the forward (backward only)
    p_out,  # [D, T, B, H] forward: h_t; backward: dz_t. Also the state the programs exchange
    p_hn,  # [D, B, H] final state (forward only)
    p_len,  # [B] int32 sequence lengths, or None
    p_arrivals,  # [D, groups] int32, zero at launch: arrivals of each group's programs so far (counter form)
    T,
    B,
    H,
    stride_wk,
    stride_wn,
    BATCH_TILES,  # batch tiles per group
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    K_SPLIT: tl.constexpr,  # 1, or 2: the state read in two halves (halves its shared-memory copy)
    BACKWARD: tl.constexpr,
    REVERSE: tl.constexpr,  # of direction 0; direction 1 walks the other way
    RELU: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    # Arrivals the wait does not wait for: 0 in every real launch. The tests set 1 (the target off
    # by one) or more than T * programs (no wait) to show that a broken barrier fails them.
    DEBUG_WAIT_SLACK: tl.constexpr = 0,
    # "counter": the group barrier through global atomics; "cluster": a group is one thread-block
    # cluster and waits at its hardware barrier (GPU only; kernels/cluster.py launches it).
    BARRIER: tl.constexpr = "counter",
):
    direction = tl.program_id(2)
    reverse = (direction == 1) != REVERSE
    n_bh = B.to(tl.int64) * H
    p_in += direction * T * n_bh
    p_out += direction * T * n_bh
    p_w += direction * H * H
    if BACKWARD:
        p_act += direction * T * n_bh
    else:
        p_h0 += direction * n_bh
        p_hn += direction * n_bh
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    BLOCK_K: tl.constexpr = BLOCK_H // K_SPLIT
    o_k = tl.arange(0, BLOCK_K)
    m_n = o_n < H
    # Padded rows and columns of the slice are zero, so padded state columns add nothing.
    b_w = _load_slice(p_w, o_k, o_n, m_n, H, stride_wk, stride_wn).to(DOT_DTYPE)
    if K_SPLIT == 2:
        b_w2 = _load_slice(p_w, BLOCK_K + o_k, o_n, m_n, H, stride_wk, stride_wn).to(DOT_DTYPE)
    if BARRIER != "cluster":  # the cluster form has no counters (p_arrivals is None)
        p_group_arrivals = p_arrivals + direction * tl.num_programs(1) + tl.program_id(1)
    group_size = tl.num_programs(0)
    first_row = tl.program_id(1) * BATCH_TILES * BLOCK_B

    for i in range(T):
        t = tl.where(reverse, T - 1 - i, i)
        t_prev = tl.where(reverse, t + 1, t - 1)
        for j in range(BATCH_TILES):
            o_b, m_b, o_row, m_bn = _batch_tile(first_row + j * BLOCK_B, B, H, m_n, BLOCK_B)
            m_prev = m_b & (i > 0)
            if HAS_LENGTHS:
                b_len = tl.load(p_len + o_b, mask=m_b, other=0)
                if not BACKWARD:  # the backward's inactive steps wrote dz = 0: its state is 0 there
                    m_prev = m_prev & (t_prev < b_len)
            # One load of the whole state, in the storage dtype (an fp32 copy of [BLOCK_B, H] would
            # not fit in registers): each row from the previous step's output, or from h0 / zero.
            if BACKWARD:
                p_s = p_out + t_prev * n_bh + o_row
                m_s = m_prev
            else:
                p_s = tl.where(m_prev[:, None], p_out + t_prev * n_bh, p_h0) + o_row
                m_s = m_b
            o_t = t * n_bh + o_row + o_n[None, :]
            b_z = tl.load(p_in + o_t, mask=m_bn, other=0.0).to(ACC_DTYPE)
            b_z = recurrent_dot(_load_state(p_s, m_s, o_k, H), b_w, b_z, DOT_DTYPE, INPUT_PRECISION)
            if K_SPLIT == 2:
                b_z = recurrent_dot(_load_state(p_s, m_s, BLOCK_K + o_k, H), b_w2, b_z, DOT_DTYPE, INPUT_PRECISION)
            b_new = cell_update(b_z, p_act, o_t, m_bn, BACKWARD, RELU)
            if HAS_LENGTHS:
                b_new = tl.where((t < b_len)[:, None], b_new, 0.0)
            tl.store(p_out + o_t, b_new.to(p_out.dtype.element_ty), mask=m_bn)

        # The group barrier: this step's columns are stored by every thread before the arrival,
        # and no thread reads the next state before the acquire has seen every arrival.
        if BARRIER == "cluster":
            cluster.barrier()
        else:
            counter_barrier(p_group_arrivals, (i + 1) * group_size - DEBUG_WAIT_SLACK)

    if not BACKWARD:
        for j in range(BATCH_TILES):  # h_n: each row's state after its own last step (own columns)
            o_b, m_b, o_row, m_bn = _batch_tile(first_row + j * BLOCK_B, B, H, m_n, BLOCK_B)
            # The reverse walk ends at t = 0 in every row, the forward walk at each row's last step.
            t_last = tl.zeros([BLOCK_B], dtype=tl.int32) + tl.where(reverse, 0, T - 1)
            if HAS_LENGTHS:
                b_len = tl.load(p_len + o_b, mask=m_b, other=0)
                t_last = tl.where(reverse, t_last, b_len - 1)
                t_last = tl.where(b_len > 0, t_last, -1)  # a row of length 0 never stepped: h_n = h0
            p_last = tl.where((t_last >= 0)[:, None], p_out + t_last[:, None].to(tl.int64) * n_bh, p_h0) + o_row
            tl.store(p_hn + o_row + o_n[None, :], tl.load(p_last + o_n[None, :], mask=m_bn, cache_modifier=".cg"),
                     mask=m_bn)


# Without a GPU, Triton's interpreter runs the programs of a launch one after another: only one is
# ever resident. tests/concurrent_interpreter.py runs them all at once and raises this.
INTERPRETED_RESIDENT_PROGRAMS = 1


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """What one streaming multiprocessor holds at once (defaults: sm_90, H100/H200)."""

    registers: int = 65536
    threads: int = 2048
    shared_bytes: int = 233472  # 228 KB, of which each resident program reserves RESERVED_SHARED
    programs: int = 32
    sms: int = 132

    RESERVED_SHARED = 1024  # the driver's shared memory per resident program (sm_80+)
    REGISTER_UNIT = 256  # registers are allocated per warp in units of 256

    @classmethod
    def of(cls, device: torch.device) -> "SMLimits":
        p = torch.cuda.get_device_properties(device)
        # Older torch builds lack regs_per_multiprocessor: 64 K registers an SM since sm_50.
        return cls(registers=getattr(p, "regs_per_multiprocessor", cls.registers),
                   threads=p.max_threads_per_multi_processor, shared_bytes=p.shared_memory_per_multiprocessor,
                   sms=p.multi_processor_count)


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int, limits: SMLimits = SMLimits()) -> int:
    """How many programs of a compiled kernel (registers per thread, warps, dynamic shared memory)
    one SM holds at once: the tightest of its register file, threads, shared memory and slots."""
    warp_registers = math.ceil(max(registers, 1) * 32 / limits.REGISTER_UNIT) * limits.REGISTER_UNIT
    by_registers = limits.registers // warp_registers // num_warps
    by_threads = limits.threads // (32 * num_warps)
    by_shared = limits.shared_bytes // (shared_bytes + limits.RESERVED_SHARED)
    return min(by_registers, by_threads, by_shared, limits.programs)


def resident_capacity(compiled, device: torch.device) -> int:
    """Programs of this compiled kernel that the CUDA device runs at once (all of them must be)."""
    limits = SMLimits.of(device)
    compiled._init_handles()  # loads the binary: n_regs is known from here
    return limits.sms * programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                                        limits)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a launch tiles the problem: per direction, `groups` groups of `programs_per_group`
    programs (one per BLOCK_N columns), each group serving `batch_tiles` tiles of BLOCK_B rows."""

    programs_per_group: int
    groups: int
    batch_tiles: int
    resident_capacity: int
    directions: int = 1

    @property
    def grid(self) -> tuple:
        return (self.programs_per_group, self.groups, self.directions)

    @property
    def programs(self) -> int:
        return self.programs_per_group * self.groups * self.directions

    @property
    def waits(self) -> bool:
        """Whether programs wait for each other: then all must be resident at once (a cooperative
        launch); programs alone in their group never wait and need not be."""
        return self.programs_per_group > 1


def plan(batch: int, hidden: int, block_b: int, block_n: int, capacity: int, directions: int = 1) -> Plan:
    """The most groups (batch parallelism) whose programs all fit in `capacity` at once; more batch
    tiles per group where they do not. Groups of one program wait for no one: one per batch tile."""
    per_group = triton.cdiv(hidden, block_n)
    tiles = triton.cdiv(batch, block_b)
    if per_group == 1:
        return Plan(1, tiles, 1, capacity, directions)
    if per_group * directions > capacity:
        raise ValueError(f"the persistent path needs {per_group} resident programs per group (H = {hidden}, "
                         f"BLOCK_N = {block_n}) in each of {directions} direction(s), but the device holds "
                         f"{capacity} of this kernel at once")
    batch_tiles = triton.cdiv(tiles, min(tiles, capacity // (per_group * directions)))
    return Plan(per_group, triton.cdiv(tiles, batch_tiles), batch_tiles, capacity, directions)


def launch_args(p_in, p_h0, w_hh, p_act, out, h_n, lengths, T, B, H, *, backward: bool, reverse: bool, relu: bool,
                numerics: dict, meta: dict):
    """The kernel's arguments but the arrivals and BATCH_TILES: pointers, scalars, constexprs
    (tensors, or their dtypes where only the compiled kernel is needed)."""
    # M = W_hh^T in the forward (W_hh read with its strides swapped), W_hh in the backward.
    stride_wk, stride_wn = (H, 1) if backward else (1, H)
    args = (p_in, p_h0, w_hh, p_act, out, h_n, lengths)
    kwargs = dict(BLOCK_H=max(16, triton.next_power_of_2(H)), BACKWARD=backward, REVERSE=reverse, RELU=relu,
                  **numerics, **meta)
    return args, (T, B, H, stride_wk, stride_wn), kwargs


def schedule(args, scalars, kwargs, device: torch.device, directions: int = 1) -> tuple:
    """The plan of a launch and its meta-parameters: on a GPU from the compiled kernel's resources
    (compiling it if needed); in the interpreter, where programs run one at a time unless the
    concurrent test harness runs them, a group of one program."""
    T, B, H = scalars[:3]
    if device.type == "cuda":
        compiled = rnn_persistent_kernel.warmup(*args, torch.int32, *scalars, 1, grid=(1, 1, 1),
                                                launch_cooperative_grid=True, **kwargs)
        capacity = resident_capacity(compiled, device)
    else:
        capacity = INTERPRETED_RESIDENT_PROGRAMS
        if capacity == 1:
            kwargs = dict(kwargs, BLOCK_N=kwargs["BLOCK_H"], K_SPLIT=1)
    return plan(B, H, kwargs["BLOCK_B"], kwargs["BLOCK_N"], capacity, directions), kwargs


def check_counters(T: int, chosen: Plan) -> None:
    """The int32 arrival counters reach T times the programs of a group."""
    if T * chosen.programs_per_group >= 2 ** 31:
        raise ValueError(f"T = {T} steps overflow the int32 arrival counters of {chosen.programs_per_group} "
                         f"programs per group")


def launch(p_in, p_h0, w_hh, p_act, out, h_n, lengths, **options) -> Plan:
    """Run the whole recurrence in one launch into `out` (and `h_n` in the forward); see the module
    docstring. Tensors are [T, B, H], [B, H] and [H, H], or both directions stacked on a leading
    dimension of 2 (contiguous), direction 1 walking the other way. options: backward, reverse
    (of direction 0), relu, numerics and meta (BLOCK_B, BLOCK_N, K_SPLIT, num_warps, num_stages;
    DEBUG_WAIT_SLACK in tests only). Returns the plan it ran."""
    directions = out.shape[0] if out.dim() == 4 else 1
    args, scalars, kwargs = launch_args(p_in, p_h0, w_hh, p_act, out, h_n, lengths, *out.shape[-3:], **options)
    chosen, kwargs = schedule(args, scalars, kwargs, out.device, directions)
    check_counters(scalars[0], chosen)
    arrivals = torch.zeros(directions, chosen.groups, dtype=torch.int32, device=out.device)
    rnn_persistent_kernel[chosen.grid](*args, arrivals, *scalars, chosen.batch_tiles,
                                       launch_cooperative_grid=chosen.waits, **kwargs)
    return chosen
