"""The persistent recurrence: one launch for all T steps, W_hh split by output columns over
programs that stay resident and meet at a barrier after every step.

Dimensions: T steps, B batch, H hidden, HP = H rounded up to 16. The MMA's shape (what the cost
model uses):

- Program (n, g, d) owns BLOCK_N output columns n*BLOCK_N ... for every step, in direction d (a
  bidirectional layer runs both directions in one launch: grid axis 2, inputs stacked [2, ...],
  direction 1 walking the other way), for the batch rows of group g: BATCH_TILES tiles of BLOCK_B
  rows, one after another each step.
- Before the time loop it loads its slice of M transposed, [BLOCK_N, BLOCK_H] (M^T rows: W_hh's
  rows in the forward), once; Triton keeps it in shared memory for all steps (BLOCK_N x BLOCK_H x
  element bytes: 64 x 1024 x 2 = 128 KB). The slice is the MMA's M side: 64 columns give wgmma
  m64nN on sm_90 (N = BLOCK_B over the warpgroups: 8 warps = [4, 2], m64n8 each); 32 columns give
  mma.sync m16n8 with K in 4 parts, one a warp ([4, 1, 1]), none repeated (perf/NOTES.md, v0.5).
- Each step, per batch tile: it reads state^T [BLOCK_H, BLOCK_B] (all H columns of the tile's rows,
  which every program of the group wrote) from L2 (.cg, 16-byte vectors: the ring's rows are
  HP-padded), stages it through shared memory (BLOCK_H x BLOCK_B x element bytes), computes
  acc^T [BLOCK_N, BLOCK_B] = slice^T @ state^T + in^T in one dot (K = BLOCK_H; with K_SPLIT > 1 a
  batched dot over K_SPLIT parts of K, [K_SPLIT, BLOCK_N, BLOCK_B], Triton giving each warp one part:
  K_SPLIT independent chains of BLOCK_H / K_SPLIT, summed across warps through shared memory; the
  slice is then held as [K_SPLIT, BLOCK_N, BLOCK_K]), applies the activation, and stores
  its [BLOCK_B, BLOCK_N] block transposed back: into the output and into the ring slot of this
  step (the state the group exchanges). The next tile's inputs (in^T, and h_t^T in the backward)
  are loaded right after, so the last tile's load of step i + 1 is issued before the wait.
- Then the programs of the group (same g and d, every n) wait for each other (_group_barrier, one
  @triton.jit function):

      debug_barrier; counter[g] += 1 (release, gpu scope, one thread); one thread polls counter[g]
      (relaxed loads, broadcast) until it reaches (steps done) * (programs per group) or that thread's
      clock passes the limit; one acquire read; debug_barrier

  Each group's counter, status and LATE words have their own 128-byte line (SYNC_LINE int32). The
  counter only grows (zeroed once per launch), so no reset races a late poll. A poll past the time
  limit reads the LATE word (GAVE_UP) instead of the counter: the polling thread's own clock decides,
  and every thread sees its verdict with the poll's broadcast value. No barrier after the last
  step. Per step and program: the state read (BLOCK_H x BATCH_TILES*BLOCK_B elements from L2),
  BATCH_TILES dots, one arrival, polls, one acquire read. With BARRIER="cluster" a group is one
  Hopper thread-block cluster and _group_barrier is the cluster's hardware barrier instead (no
  counters, no timeout: a cluster's CTAs are gang-scheduled; kernels/cluster.py launches that form).
- The ring [D, 2, B, HP] holds the state: slot i % 2 written at step i, slot 1 the initial state
  (h0 forward, 0 backward), columns H..HP-1 zero. Two slots suffice: slot i % 2, read at step
  i + 1, is written again at step i + 2, which a program starts only after the barrier of step
  i + 1, i.e. after every program of its group has finished reading it.
- Where H is not a multiple of 16 the launcher passes M^T with padded rows (padded_slices: one copy
  of W_hh a launch), so the slice loads in vectors too.

Every program of the launch must be resident at once, or the waits never end: `resident_capacity`
asks the driver (cuOccupancyMaxActiveBlocksPerMultiprocessor on the loaded kernel), `plan` never
exceeds it and the launch is cooperative (the driver refuses a grid that cannot be co-resident:
LaunchRefused, and the launchers in recurrence.py run the stepwise path with one warning). The
hand model (programs_per_sm, SMLimits) serves offline plans. A wait is bounded: past
WAIT_TIMEOUT_S (%globaltimer; in the interpreter, which cannot run PTX, a poll count) a program
stops waiting, and at the end writes NaN over all its outputs and flags its group; the launcher
raises BarrierTimeout. Groups of one program wait for no one: the plain interpreter runs programs
one at a time, so there a group is one program serving all H columns in COLUMN_BLOCKS blocks of
BLOCK_N in turn (its slice reloaded each step: the interpreter's tensors stop at 2^20 elements).

The same kernel runs the forward (state h) and the backward (state dz):

    forward:   h_t  = act(xw_t + h_{t-1} @ W_hh^T)               M = W_hh^T
    backward:  dz_t = (g_t + dz_{t+1} @ W_hh) * act'(h_t)          M = W_hh

With lengths, steps t >= lengths[b] of row b output 0; in the forward the row keeps its state
(h0 until a reverse row starts), in the backward its state is that 0; h_n is each row's state
after the last step.
"""
import ctypes
import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

# cluster.py's barrier() is called by the kernel below and cluster.py calls this module's launch
# helpers: each imports the other (neither uses the other at import time).
from . import cluster
from .common import activate, below_while, recurrent_dot


@triton.jit
def _slice(p_w, o_n, H, HP, stride_wk, stride_wn, K_SPLIT: tl.constexpr, BLOCK_K: tl.constexpr,
           DOT_DTYPE: tl.constexpr):
    """The transposed slice of the columns o_n: [BLOCK_N, BLOCK_H], element [n, k] = M[k, n] (zero
    outside H: M's rows H..HP-1 are zero where HP > H, padded_slices); with K_SPLIT > 1 its K in
    K_SPLIT parts, [K_SPLIT, BLOCK_N, BLOCK_K]."""
    if K_SPLIT == 1:
        o_k = tl.arange(0, BLOCK_K)
        b_w = tl.load(p_w + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :] * stride_wk,
                      mask=(o_n < H)[:, None] & (o_k < HP)[None, :], other=0.0)
    else:
        o_k = tl.arange(0, K_SPLIT)[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, None, :]
        o_n3 = o_n[None, :, None]
        b_w = tl.load(p_w + o_n3.to(tl.int64) * stride_wn + o_k * stride_wk, mask=(o_n3 < H) & (o_k < HP), other=0.0)
    return b_w.to(DOT_DTYPE)


@triton.jit
def _product(b_w, p_s, o_srow, m_b, acc, HP, K_SPLIT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    """acc + slice^T @ state^T, state^T [BLOCK_H, BLOCK_B] read from a ring slot (rows o_srow, HP-padded:
    16-element aligned, the mask constant over 16, so the loads vectorise at any H) from L2 (.cg):
    other programs wrote it. K_SPLIT > 1: one batched dot over the K parts, [K_SPLIT, BLOCK_N, BLOCK_B]
    (Triton puts the warps on the parts: each warp one part, K_SPLIT independent accumulator chains of
    BLOCK_K), summed across warps."""
    if K_SPLIT == 1:
        o_k = tl.arange(0, BLOCK_K)
        b_s = tl.load(p_s + o_srow[None, :] + o_k[:, None], mask=(o_k < HP)[:, None] & m_b[None, :], other=0.0,
                      cache_modifier=".cg")
        acc = recurrent_dot(b_w, b_s, acc, DOT_DTYPE, INPUT_PRECISION)
    else:
        o_k = tl.arange(0, K_SPLIT)[:, None, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :, None]
        b_s = tl.load(p_s + o_srow[None, None, :] + o_k, mask=(o_k < HP) & m_b[None, None, :], other=0.0,
                      cache_modifier=".cg")
        b_parts = tl.dot(b_w, b_s.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        acc += tl.sum(b_parts, axis=0)
    return acc


@triton.jit
def _time(i, T, reverse):
    return tl.where(reverse, T - 1 - i, i)


@triton.jit
def _step_inputs(p_in, p_act, i, T, first_row, block, B, H, n_bh, reverse, BLOCK_B: tl.constexpr,
                 BLOCK_N: tl.constexpr, BACKWARD: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """What step i of a tile needs besides the state, transposed [BLOCK_N, BLOCK_B]: the input
    (forward: x_t W_ih^T + b; backward: dL/dh_t) and, in the backward, h_t. Zero from i = T on."""
    o_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    o_b = first_row + tl.arange(0, BLOCK_B)
    mask = (o_n < H)[:, None] & below_while(o_b, B, i < T)[None, :]
    o_t = _time(i, T, reverse) * n_bh + o_b[None, :].to(tl.int64) * H + o_n[:, None]
    b_in = tl.load(p_in + o_t, mask=mask, other=0.0).to(ACC_DTYPE)
    b_act = tl.load(p_act + o_t, mask=mask, other=0.0).to(ACC_DTYPE) if BACKWARD else b_in
    return b_in, b_act


@triton.jit
def _clock(polls, TIMER: tl.constexpr):
    """Nanoseconds (%globaltimer) on a GPU; the interpreter cannot run PTX, so there the poll count."""
    if TIMER:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                        pack=1)
    else:
        now = polls
    return now


@triton.jit
def _group_barrier(p_group, target, failed, wait_limit, TIMER: tl.constexpr, ABSENT: tl.constexpr,
                   BARRIER: tl.constexpr):
    """BARRIER "counter": wait until the group's counter (p_group: its sync words) reaches `target`:
    every thread's stores of this step come before the arrival (CTA barrier, then one release add at
    gpu scope); the poll is relaxed (no L1 invalidation per poll) and one acquire read follows once
    the target is seen, then a CTA barrier, so no thread reads the next state before every arrival is
    visible. Gives up after `wait_limit` (microseconds on a GPU, polls in the interpreter): returns 1
    then (0 while all is well; a program that already failed no longer waits).
    BARRIER "cluster": the cluster's hardware barrier (cluster.barrier: every thread arrives with
    release semantics and waits with acquire); no counter, no timeout (gang-scheduled CTAs all run)."""
    if BARRIER == "cluster":
        cluster.barrier()
    else:
        p_counter = p_group + COUNTER
        tl.debug_barrier()
        if ABSENT < 0:
            tl.atomic_add(p_counter, 1, sem="release")
        elif tl.program_id(0) != ABSENT:  # tests: this column block never arrives
            tl.atomic_add(p_counter, 1, sem="release")
        limit = wait_limit.to(tl.int64) * (1000 if TIMER else 1)
        polls = 0
        start = _clock(polls, TIMER)
        # The poll: a scalar add of 0, which Triton lowers to one thread's relaxed load, its value broadcast to
        # every thread through shared memory. That thread's own clock picks the word it reads: past the limit
        # the LATE word (GAVE_UP), so its verdict reaches every thread with the poll's value and all leave the
        # loop at the same poll (a clock read by each thread would split them between the CTA barriers).
        seen = tl.atomic_add(p_counter, 0, sem="relaxed")
        while (failed == 0) & (seen < target):
            late = (_clock(polls, TIMER) - start > limit).to(tl.int32)
            seen = tl.atomic_add(p_counter + late * (LATE - COUNTER), 0, sem="relaxed")
            polls += 1
        # The one read-modify-write of a wait, at the give-up only: GAVE_UP into the counter, where the group's
        # other programs see it in their own polls. A program that gave up keeps arriving, so its arrivals can
        # complete a count a stalled program of its group never reached: GAVE_UP, set before those arrivals
        # (released with them), fails the step.
        tl.atomic_or(p_counter, GAVE_UP, mask=seen >= GAVE_UP, sem="relaxed")
        # Its value is used, or the read is removed (an add of 0 lowers to a load): >= target unless timed out.
        seen = tl.atomic_add(p_counter, 0, sem="acquire")
        tl.debug_barrier()
        failed |= ((seen < target) | (seen >= GAVE_UP)).to(tl.int32)
    return failed


# One group's synchronisation words, an int32 each: its own 128-byte line, so the polls of
# different groups never share a line with another group's arrivals.
SYNC_LINE = tl.constexpr(32)
COUNTER = tl.constexpr(0)  # the arrivals so far
STATUS = tl.constexpr(1)  # nonzero once a program of the group timed out (read by the host)
# Or-ed into the counter by a program that gives up waiting: every later poll of its group sees it. Arrivals
# stay below it (check_counters).
GAVE_UP = tl.constexpr(1 << 30)
LATE = tl.constexpr(2)  # holds GAVE_UP (init_sync): what a poll past the time limit reads


@triton.jit
def init_sync(p_group, BARRIER: tl.constexpr):
    """A program's start: the group's LATE word set (every program of the group writes the same value; its
    own write is ordered before its polls by the CTA barrier that begins each wait)."""
    if BARRIER == "counter":
        tl.store(p_group + LATE, GAVE_UP)


@triton.heuristics({"HAS_LENGTHS": lambda args: args["p_len"] is not None})
# B unspecialised: B = 1 would become a constant (no .to) and a variant of its own to compile.
@triton.jit(do_not_specialize=["T", "B", "BATCH_TILES", "wait_limit"])
def rnn_persistent_kernel(
    p_in,  # [D, T, B, H] forward: x_t W_ih^T + b; backward: dL/dh_t (dL/dh_n folded in)
    p_w,  # [D, H, H] M[k, n] = p_w[k * stride_wk + n * stride_wn]
    p_act,  # [D, T, B, H] h_t of the forward (backward only)
    p_out,  # [D, T, B, H] forward: h_t; backward: dz_t
    p_ring,  # [D, 2, B, HP] the state the programs exchange: slot i % 2 written at step i; slot 1 holds
             # h0 (forward) or 0 (backward) at launch, columns H..HP-1 zero
    p_hn,  # [D, B, H] final state (forward only)
    p_len,  # [B] int32 sequence lengths, or None
    p_sync,  # [D, groups, SYNC_LINE] int32, zero at launch: each group's COUNTER and STATUS
    T,
    B,
    H,
    HP,  # H rounded up to a multiple of 16: the ring's row stride
    stride_wk,
    stride_wn,
    BATCH_TILES,  # batch tiles per group
    wait_limit,  # how long a wait may last: microseconds on a GPU (TIMER), polls in the interpreter
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    K_SPLIT: tl.constexpr,  # 1, or the product's K in as many parts: a batched dot, independent chains
    COLUMN_BLOCKS: tl.constexpr,  # BLOCK_N-column blocks a program serves in turn (1: its slice stays on chip)
    BACKWARD: tl.constexpr,
    REVERSE: tl.constexpr,  # of direction 0; direction 1 walks the other way
    RELU: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    TIMER: tl.constexpr,  # %globaltimer bounds the wait (GPU); else the poll count (interpreter)
    # Tests only (0 and -1 in every real launch): arrivals the wait does not wait for (1: the target
    # off by one; more than T * programs: no wait), and a column block that never arrives.
    DEBUG_WAIT_SLACK: tl.constexpr = 0,
    DEBUG_ABSENT: tl.constexpr = -1,
    # "counter": the group barrier through global atomics (p_sync); "cluster": a group is one
    # thread-block cluster waiting at its hardware barrier (GPU only, p_sync None; kernels/cluster.py).
    BARRIER: tl.constexpr = "counter",
):
    direction = tl.program_id(2)
    group = tl.program_id(1)
    reverse = (direction == 1) != REVERSE
    n_bh = B.to(tl.int64) * H
    n_bhp = B.to(tl.int64) * HP
    p_in += direction * T * n_bh
    p_out += direction * T * n_bh
    p_w += direction * H * HP  # [D, H, H], or [D, H, HP] (padded_slices; HP = H otherwise)
    p_ring += direction * 2 * n_bhp
    if BACKWARD:
        p_act += direction * T * n_bh
    else:
        p_hn += direction * n_bh
    if BARRIER == "counter":
        p_counter = p_sync + (direction * tl.num_programs(1) + group) * SYNC_LINE
    else:  # no sync words: the hardware barrier counts, and never times out
        p_counter = p_sync
    init_sync(p_counter, BARRIER)
    group_size = tl.num_programs(0)
    BLOCK_K: tl.constexpr = BLOCK_H // K_SPLIT
    first_block = tl.program_id(0) * COLUMN_BLOCKS
    first_row = group * BATCH_TILES * BLOCK_B
    if COLUMN_BLOCKS == 1:  # loaded once: the slice stays on chip (shared memory) for all steps
        o_n = first_block * BLOCK_N + tl.arange(0, BLOCK_N)
        b_wr = _slice(p_w, o_n, H, HP, stride_wk, stride_wn, K_SPLIT, BLOCK_K, DOT_DTYPE)
    b_in, b_act = _step_inputs(p_in, p_act, 0, T, first_row, first_block, B, H, n_bh, reverse, BLOCK_B, BLOCK_N,
                               BACKWARD, ACC_DTYPE)
    failed = 0
    for i in range(T):
        t = _time(i, T, reverse)
        p_prev = p_ring + ((i + 1) % 2) * n_bhp
        for j in range(BATCH_TILES):
            o_b = first_row + j * BLOCK_B + tl.arange(0, BLOCK_B)
            m_b = o_b < B
            o_srow = o_b.to(tl.int64) * HP
            for c in tl.static_range(COLUMN_BLOCKS):
                o_n = (first_block + c) * BLOCK_N + tl.arange(0, BLOCK_N)
                m_n = o_n < H
                b_ws = b_wr if COLUMN_BLOCKS == 1 else _slice(p_w, o_n, H, HP, stride_wk, stride_wn, K_SPLIT,
                                                              BLOCK_K, DOT_DTYPE)
                # acc^T [BLOCK_N, BLOCK_B] = slice^T @ state^T + in^T: the slice is the MMA's M side.
                b_z = _product(b_ws, p_prev, o_srow, m_b, b_in, HP, K_SPLIT, BLOCK_K, DOT_DTYPE, INPUT_PRECISION)
                b_new = activate(b_z, b_act, BACKWARD, RELU)
                b_state = b_new
                m_nb = m_n[:, None] & m_b[None, :]
                o_own = o_b[None, :].to(tl.int64) * H + o_n[:, None]
                o_ring = o_srow[None, :] + o_n[:, None]
                if HAS_LENGTHS:
                    b_len = tl.load(p_len + o_b, mask=m_b, other=0)
                    active = (t < b_len)[None, :]
                    b_new = tl.where(active, b_new, 0.0)
                    if BACKWARD:  # dz = 0 at inactive steps: that is the state too
                        b_state = b_new
                    else:  # an inactive row keeps its state (h0 before a reverse row starts)
                        b_state = tl.where(active, b_new,
                                           tl.load(p_prev + o_ring, mask=m_nb, other=0.0, cache_modifier=".cg"))
                tl.store(p_out + t * n_bh + o_own, b_new.to(p_out.dtype.element_ty), mask=m_nb)
                if i < T - 1:
                    tl.store(p_ring + (i % 2) * n_bhp + o_ring, b_state.to(p_ring.dtype.element_ty), mask=m_nb)
                elif not BACKWARD:  # h_n: each row's state after the last step
                    tl.store(p_hn + o_own, b_state.to(p_hn.dtype.element_ty), mask=m_nb)
                # The next tile's inputs: loaded before the wait where this tile is the step's last.
                if c + 1 < COLUMN_BLOCKS:
                    b_in, b_act = _step_inputs(p_in, p_act, i, T, first_row + j * BLOCK_B, first_block + c + 1, B, H,
                                               n_bh, reverse, BLOCK_B, BLOCK_N, BACKWARD, ACC_DTYPE)
                else:
                    last = j == BATCH_TILES - 1
                    b_in, b_act = _step_inputs(p_in, p_act, tl.where(last, i + 1, i),
                                               T, first_row + tl.where(last, 0, j + 1) * BLOCK_B, first_block, B, H,
                                               n_bh, reverse, BLOCK_B, BLOCK_N, BACKWARD, ACC_DTYPE)
        if i < T - 1:  # no barrier after the last step: nothing reads its state
            failed = _group_barrier(p_counter, (i + 1) * group_size - DEBUG_WAIT_SLACK, failed, wait_limit,
                                    TIMER, DEBUG_ABSENT, BARRIER)

    if BARRIER == "counter":  # the cluster form never gives up waiting
        if failed != 0:  # a wait timed out: this program's outputs are not the recurrence's
            tl.store(p_counter + STATUS, 1)
            b_nan = tl.full([BLOCK_N, BLOCK_B], float("nan"), ACC_DTYPE)
            for i in range(T):
                for j in range(BATCH_TILES):
                    o_b = first_row + j * BLOCK_B + tl.arange(0, BLOCK_B)
                    for c in tl.static_range(COLUMN_BLOCKS):
                        o_n = (first_block + c) * BLOCK_N + tl.arange(0, BLOCK_N)
                        m_nb = (o_n < H)[:, None] & (o_b < B)[None, :]
                        o_own = o_b[None, :].to(tl.int64) * H + o_n[:, None]
                        tl.store(p_out + i * n_bh + o_own, b_nan.to(p_out.dtype.element_ty), mask=m_nb)
                        if not BACKWARD:
                            tl.store(p_hn + o_own, b_nan.to(p_hn.dtype.element_ty), mask=m_nb)


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


def modelled_capacity(compiled, device: torch.device) -> int:
    """The hand model's resident programs of this compiled kernel (programs_per_sm over the SMs): what
    offline plans use; tests/test_gpu.py holds it against the driver's answer."""
    limits = SMLimits.of(device)
    compiled._init_handles()  # loads the binary: n_regs is known from here
    return limits.sms * programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                                        limits)


@functools.lru_cache(maxsize=None)
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def resident_capacity(compiled, device: torch.device) -> int:
    """Programs of this compiled kernel that the CUDA device runs at once (all of them must be), from
    the driver: cuOccupancyMaxActiveBlocksPerMultiprocessor on the loaded kernel (its registers,
    warps and dynamic shared memory, and the driver's own reservations) times the SMs."""
    compiled._init_handles()  # loads the binary: compiled.function is the CUfunction from here
    per_sm = ctypes.c_int()
    error = _libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(per_sm), ctypes.c_void_p(compiled.function), ctypes.c_int(32 * compiled.metadata.num_warps),
        ctypes.c_size_t(compiled.metadata.shared))
    if error != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed with CUresult {error}")
    return per_sm.value * torch.cuda.get_device_properties(device).multi_processor_count


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a launch tiles the problem: per direction, `groups` groups of `programs_per_group`
    programs (one per BLOCK_N columns), each group serving `batch_tiles` tiles of BLOCK_B rows."""

    programs_per_group: int
    groups: int
    batch_tiles: int
    resident_capacity: int
    directions: int = 1
    # On a GPU: the hand model's capacity (modelled_capacity) beside the driver's, for tests/test_gpu.py.
    modelled_capacity: int = dataclasses.field(default=None, compare=False)

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


def padded(hidden: int) -> int:
    """The ring's row stride: H rounded up to 16 elements (aligned, vectorised state loads at any H)."""
    return triton.cdiv(hidden, 16) * 16


def launch_args(p_in, w_hh, p_act, out, ring, h_n, lengths, T, B, H, *, backward: bool, reverse: bool, relu: bool,
                numerics: dict, meta: dict, timer: bool):
    """The kernel's arguments but the sync words, BATCH_TILES and the wait limit: pointers, scalars,
    constexprs (tensors, or their dtypes where only the compiled kernel is needed)."""
    stride_wk, stride_wn = slice_strides(H, backward)
    args = (p_in, w_hh, p_act, out, ring, h_n, lengths)
    kwargs = dict(BLOCK_H=max(16, triton.next_power_of_2(H)), COLUMN_BLOCKS=1, BACKWARD=backward, REVERSE=reverse,
                  RELU=relu, TIMER=timer, **numerics, **meta)
    return args, (T, B, H, padded(H), stride_wk, stride_wn), kwargs


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


# The interpreter's largest tensor (triton.language.TRITON_MAX_TENSOR_NUMEL): a single program's
# [BLOCK_N, BLOCK_H] slice must stay below it, so from H = 1025 it serves its columns in blocks.
INTERPRETED_MAX_NUMEL = 1 << 20


def schedule(args, scalars, kwargs, device: torch.device, directions: int = 1) -> tuple:
    """The plan of a launch and its meta-parameters: on a GPU from the compiled kernel's resources
    (compiling it if needed); in the interpreter, where programs run one at a time unless the
    concurrent test harness runs them, a group of one program that serves every column block in
    turn (blocks as wide as the interpreter's tensors allow)."""
    T, B, H = scalars[:3]
    if device.type == "cuda":
        compiled = rnn_persistent_kernel.warmup(*args, torch.int32, *scalars, 1, 1, grid=(1, 1, 1),
                                                launch_cooperative_grid=True, **kwargs)
        capacity, modelled = resident_capacity(compiled, device), modelled_capacity(compiled, device)
    else:
        modelled = None
        capacity = INTERPRETED_RESIDENT_PROGRAMS
        if capacity == 1:
            width = kwargs["BLOCK_H"]
            block_n = min(width, max(16, INTERPRETED_MAX_NUMEL // width))
            kwargs = dict(kwargs, BLOCK_N=block_n, COLUMN_BLOCKS=triton.cdiv(width, block_n), K_SPLIT=1)
    width = kwargs["BLOCK_N"] * kwargs["COLUMN_BLOCKS"]
    chosen = plan(B, H, kwargs["BLOCK_B"], width, capacity, directions)
    return dataclasses.replace(chosen, modelled_capacity=modelled), kwargs


def check_counters(T: int, chosen: Plan) -> None:
    """The int32 arrival counters reach T times the programs of a group, below the GAVE_UP bit."""
    if T * chosen.programs_per_group >= GAVE_UP.value:
        raise ValueError(f"T = {T} steps overflow the int32 arrival counters of {chosen.programs_per_group} "
                         f"programs per group")


# How long a program waits at a step's barrier before it gives up (a program of its group is not
# running: not resident, preempted, or a fault). Steps take microseconds; a wait of seconds is a hang.
WAIT_TIMEOUT_S = 10.0
# The interpreter has no clock in the kernel: its bound is in polls, each taken to last this long
# (under the concurrent harness a poll is several interpreted operations and a random sleep of
# 0.1 ms on average: 1 to 30 ms measured on a loaded 2-core machine).
INTERPRETED_POLL_S = 1e-3


class LaunchRefused(RuntimeError):
    """The persistent launch cannot run here: the device cannot hold every program of a group, or the
    driver refused the cooperative launch."""


class BarrierTimeout(RuntimeError):
    """A group of the persistent kernel waited past the limit at a step barrier; its outputs are NaN."""


def _wait_limit(device: torch.device, timeout_s: float) -> int:
    if device.type == "cuda":
        return max(1, min(int(timeout_s * 1e6), 2 ** 31 - 1))  # microseconds
    return max(1, min(int(timeout_s / INTERPRETED_POLL_S), 2 ** 31 - 1))


def _check_sync_status(sync: torch.Tensor, chosen: Plan, timeout_s: float) -> None:
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
            f"tritonrnn.kernels.persistent.WAIT_TIMEOUT_S if steps legitimately take that long, or take the "
            f"stepwise path (path='stepwise' in tritonrnn.kernels.recurrence_forward/backward).")


def launch_inputs(p_in, p_h0, w_hh, p_act, out, h_n, lengths, **options) -> tuple:
    """(directions, launch_args(...)) of a launch (persistent or cluster): the ring holding the
    exchanged state (two slots, rows padded to 16 elements, zero beyond H; slot 1 the state before
    step 0) and, where H is not a multiple of 16, the padded slices."""
    directions = out.shape[0] if out.dim() == 4 else 1
    T, B, H = out.shape[-3:]
    ring = torch.zeros(directions, 2, B, padded(H), dtype=out.dtype, device=out.device)
    if H % 16:
        w_hh = padded_slices(w_hh, backward=options["backward"])
    if p_h0 is not None:
        ring[:, 1, :, :H] = p_h0.view(directions, B, H)
    return directions, launch_args(p_in, w_hh, p_act, out, ring, h_n, lengths, T, B, H,
                                   timer=out.device.type == "cuda", **options)


def launch(p_in, p_h0, w_hh, p_act, out, h_n, lengths, timeout_s: float = None, **options) -> Plan:
    """Run the whole recurrence in one launch into `out` (and `h_n` in the forward); see the module
    docstring. Tensors are [T, B, H], [B, H] and [H, H], or both directions stacked on a leading
    dimension of 2 (contiguous), direction 1 walking the other way. options: backward, reverse
    (of direction 0), relu, numerics and meta (BLOCK_B, BLOCK_N, K_SPLIT, num_warps, num_stages;
    DEBUG_WAIT_SLACK, DEBUG_ABSENT in tests only). timeout_s: the wait limit (WAIT_TIMEOUT_S).
    Returns the plan it ran. Raises LaunchRefused where the device cannot hold a group's programs or the
    driver refuses the cooperative launch,
    BarrierTimeout where a group waited past the limit (its outputs NaN)."""
    timeout_s = WAIT_TIMEOUT_S if timeout_s is None else timeout_s
    directions, (args, scalars, kwargs) = launch_inputs(p_in, p_h0, w_hh, p_act, out, h_n, lengths, **options)
    T = scalars[0]
    try:
        chosen, kwargs = schedule(args, scalars, kwargs, out.device, directions)
    except ValueError as exc:  # e.g. a cluster path's fallback: this device cannot hold a group's programs
        raise LaunchRefused(f"the persistent path cannot run here: {exc}") from exc
    check_counters(T, chosen)
    sync = torch.zeros(directions, chosen.groups, SYNC_LINE.value, dtype=torch.int32, device=out.device)
    try:
        rnn_persistent_kernel[chosen.grid](*args, sync, *scalars, chosen.batch_tiles,
                                           _wait_limit(out.device, timeout_s),
                                           launch_cooperative_grid=chosen.waits, **kwargs)
    except RuntimeError as exc:
        if chosen.waits and "cooperative launch" in str(exc):  # CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
            raise LaunchRefused(f"the driver refused a cooperative launch of {chosen.programs} programs "
                                f"({chosen.grid}): {exc}") from exc
        raise
    _check_sync_status(sync, chosen, timeout_s)
    return chosen
