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
  mma.sync m16n8 with K in 4 parts, one a warp ([4, 1, 1]), none repeated (docs/DESIGN.md D7).
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
  counters, no timeout: a cluster's CTAs are gang-scheduled; kernels/launch.py launches that form).
- With STREAM_K > 0 (the streamed layout) nothing is held: each step, per tile, the program reads its
  slice and the state^T tile from L2 in STREAM_K-row chunks of K, one dot a chunk, in a loop Triton
  pipelines (num_stages: cp.async copies, .cg for the state), for the H whose slice does not fit on chip.
- The ring [D, 2, B, HP] holds the state: slot i % 2 written at step i, slot 1 the initial state
  (h0 forward, 0 backward), columns H..HP-1 zero. Two slots suffice: slot i % 2, read at step
  i + 1, is written again at step i + 2, which a program starts only after the barrier of step
  i + 1, i.e. after every program of its group has finished reading it.
- Where H is not a multiple of 16 the launcher passes M^T with padded rows (padded_slices: one copy
  of W_hh a launch), so the slice loads in vectors too.

Every program of a group must be resident at once, or the waits never end: the launch is planned
within the compiled kernel's resident capacity (kernels/occupancy.py) and is cooperative (the driver
refuses a grid that cannot be co-resident). A wait is bounded: past the launcher's wait limit
(%globaltimer; in the interpreter, which cannot run PTX, a poll count) a program stops waiting, and
at the end writes NaN over all its outputs and flags its group (STATUS); the launcher raises
BarrierTimeout. Groups of one program wait for no one: the plain interpreter runs programs one at a
time, so there a group is one program serving all H columns in COLUMN_BLOCKS blocks of BLOCK_N in
turn (its slice reloaded each step: the interpreter's tensors stop at 2^20 elements).

The same kernel runs the forward (state h) and the backward (state dz):

    forward:   h_t  = act(xw_t + h_{t-1} @ W_hh^T)               M = W_hh^T
    backward:  dz_t = (g_t + dz_{t+1} @ W_hh) * act'(h_t)          M = W_hh

With lengths, steps t >= lengths[b] of row b output 0; in the forward the row keeps its state
(h0 until a reverse row starts), in the backward its state is that 0; h_n is each row's state
after the last step.

This file holds the kernel and its @triton.jit pieces; kernels/occupancy.py plans a launch within
what the device holds, kernels/launch.py launches it (both forms).
"""
import triton
import triton.language as tl

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
def _streamed_product(p_w, o_n, p_s, o_srow, m_b, acc, H, HP, stride_wk, stride_wn, STREAM_K: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + slice^T @ state^T with neither held: the slice [BLOCK_N, STREAM_K] and the state
    [STREAM_K, BLOCK_B] (from the ring, .cg: other programs wrote it) read from L2 chunk by chunk along
    K, the loop pipelined by Triton (num_stages): the streamed layout, for slices that do not fit on chip."""
    m_n = o_n < H
    for k in range(0, HP, STREAM_K):
        o_k = k + tl.arange(0, STREAM_K)
        m_k = o_k < HP
        b_w = tl.load(p_w + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :] * stride_wk,
                      mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_s = tl.load(p_s + o_srow[None, :] + o_k[:, None], mask=m_k[:, None] & m_b[None, :], other=0.0,
                      cache_modifier=".cg")
        acc = recurrent_dot(b_w, b_s, acc, DOT_DTYPE, INPUT_PRECISION)
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
def cluster_barrier():
    """Every thread of every CTA of the cluster: arrive (release), then wait (acquire).

    A scalar inline asm with no operands runs once per thread, unpredicated; is_pure=False keeps it
    in place (it has effects the compiler cannot see)."""
    tl.inline_asm_elementwise("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
                              "\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _group_barrier(p_group, target, failed, wait_limit, TIMER: tl.constexpr, ABSENT: tl.constexpr,
                   BARRIER: tl.constexpr):
    """BARRIER "counter": wait until the group's counter (p_group: its sync words) reaches `target`:
    every thread's stores of this step come before the arrival (CTA barrier, then one release add at
    gpu scope); the poll is relaxed (no L1 invalidation per poll) and one acquire read follows once
    the target is seen, then a CTA barrier, so no thread reads the next state before every arrival is
    visible. Gives up after `wait_limit` (microseconds on a GPU, polls in the interpreter): returns 1
    then (0 while all is well; a program that already failed no longer waits).
    BARRIER "cluster": the cluster's hardware barrier (cluster_barrier: every thread arrives with
    release semantics and waits with acquire); no counter, no timeout (gang-scheduled CTAs all run)."""
    if BARRIER == "cluster":
        cluster_barrier()
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
    CELL: tl.constexpr,  # the cell (kernels/cells.py): "tanh" or "relu"
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
    # thread-block cluster waiting at its hardware barrier (GPU only, p_sync None; kernels/launch.py).
    BARRIER: tl.constexpr = "counter",
    # 0: the slice held on chip (or reloaded whole per column block); else the streamed layout (its configs
    # set it): the slice and the state read from L2 in STREAM_K-row chunks every step, nothing held.
    STREAM_K: tl.constexpr = 0,
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
    if (COLUMN_BLOCKS == 1) & (STREAM_K == 0):  # loaded once: the slice stays on chip (shared memory) for all steps
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
                # acc^T [BLOCK_N, BLOCK_B] = slice^T @ state^T + in^T: the slice is the MMA's M side.
                if STREAM_K > 0:
                    b_z = _streamed_product(p_w, o_n, p_prev, o_srow, m_b, b_in, H, HP, stride_wk, stride_wn, STREAM_K,
                                            DOT_DTYPE, INPUT_PRECISION)
                else:
                    b_ws = b_wr if COLUMN_BLOCKS == 1 else _slice(p_w, o_n, H, HP, stride_wk, stride_wn, K_SPLIT,
                                                                  BLOCK_K, DOT_DTYPE)
                    b_z = _product(b_ws, p_prev, o_srow, m_b, b_in, HP, K_SPLIT, BLOCK_K, DOT_DTYPE, INPUT_PRECISION)
                b_new = activate(b_z, b_act, BACKWARD, CELL)
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


@triton.jit(do_not_specialize=["STEPS", "wait_limit"])
def barrier_probe_kernel(p_sync, STEPS, wait_limit, BARRIER: tl.constexpr, TIMER: tl.constexpr):
    """STEPS empty steps, each ending at the persistent kernel's group barrier (_group_barrier) in
    its BARRIER form: program_id(0) is the rank in the group (the cluster), program_id(1) the group.
    p_sync: [groups, SYNC_LINE] int32, zero at launch (the counter form's), or None (cluster)."""
    p_group = p_sync + tl.program_id(1) * SYNC_LINE if BARRIER == "counter" else p_sync
    init_sync(p_group, BARRIER)
    failed = 0
    for i in range(STEPS):
        failed = _group_barrier(p_group, (i + 1) * tl.num_programs(0), failed, wait_limit, TIMER, -1, BARRIER)
