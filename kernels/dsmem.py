"""The Elman recurrence with the hidden state in distributed shared memory: one thread-block cluster
of S CTAs per batch tile, the state exchanged CTA to CTA, never through global memory. One kernel
runs the forward and the backward (BACKWARD), as kernels/persistent.py's does:

    forward:   h_t  = act(xw_t + h_{t-1} @ W_hh^T)          M = W_hh^T, state h (h0 first)
    backward:  dz_t = (g_t + dz_{t+1} @ W_hh) * act'(h_t)     M = W_hh,   state dz (0 first)

act = CELL ("tanh" or "relu"); the input p_xw is xw_t (forward) or g_t = dL/dh_t (backward, dL/dh_n
folded in by the caller); act'(h_t) comes from the forward's output, p_act ([T, B, H], backward
only); the output p_out is h_t or dz_t. The walk is t = 0 .. T-1, or T-1 .. 0 with REVERSE (T >= 1;
the backward of a forward walks the other way). With lengths (p_len, [B] int32, HAS_LENGTHS), steps
t >= lengths[b] of row b output 0; in the forward the row keeps its state (h0 until a reverse row
starts), in the backward its state is that 0 (kernels/persistent.py's semantics; step_result). The
forward also writes h_n (p_hn, [B, H]): each row's state after the last step. Below, "h" is the
state of either direction and "W_hh slice" the rank's columns of M (slice_offset): in the forward
W_hh's rows [BLOCK_N, H], in the backward its columns, held as W_hh has them, [H, BLOCK_N].

Dimensions: T steps, B batch, H hidden, S = CLUSTER CTAs a cluster (2, 4, 8 or 16), BLOCK_N = H / S
columns a CTA, BLOCK_B batch rows a cluster (16: the MMA's M), e the element size.

- The launch (`forward` / `backward`, through kernels/launch.py's cluster launch): grid (S, tiles, D)
  CTAs in clusters of (S, 1, 1); D = 2 runs both directions of a bidirectional layer (inputs,
  W_hh, h0, h_t, outputs and h_n stacked [2, ...], lengths shared; direction 1 walks the other
  way: walks_back), D = 1 takes unstacked tensors. Cluster c (program_id(1)) serves batch rows
  c*BLOCK_B ... (BLOCK_B of them, rows past B computed on zeros and never stored). Its CTA of rank
  r (%cluster_ctarank) owns output columns [r*BLOCK_N, (r+1)*BLOCK_N) for every step. Before the
  time loop it loads its W_hh slice, W_hh[r*BLOCK_N:(r+1)*BLOCK_N, :] ([BLOCK_N, H]; the backward:
  W_hh[:, r*BLOCK_N:(r+1)*BLOCK_N], [H, BLOCK_N]; BLOCK_N x H x e bytes either way), into its shared
  memory, where it stays for all steps.
- Every CTA keeps the whole state of its tile, h [BLOCK_B, H], in its own shared memory, twice: the
  state buffer [2, BLOCK_B, H] (2 x BLOCK_B x H x e bytes), slot i % 2 read at step i (read_slot),
  slot (i + 1) % 2 written during step i for step i + 1 (write_slot). h0 arrives as a step's output
  does: before the loop each CTA loads its columns of h0 (zeros in the backward) and pushes them
  into slot 0 of every CTA.
- Step i of CTA r (time t = i, or T - 1 - i: step_time): wait until slot i % 2 is full;
  z = xw_t + h_{t-1} @ slice^T ([BLOCK_B, BLOCK_N],
  the MMA: mma.sync m16n8k16 (bf16/fp16) or m16n8k8 (TF32), A = the state, B = the slice, both read
  from shared memory each step in BLOCK_K-column chunks; warps side by side on the columns);
  h = act(z) (backward: z * act'(h_t)), then the lengths' masking (step_result: the CTA keeps its
  columns of the state in registers for the rows that keep it); store the output into out[t];
  unless this is the last step, push the new state into columns
  [r*BLOCK_N, (r+1)*BLOCK_N) of slot (i + 1) % 2 of EVERY CTA of the cluster, itself included
  (`mapa` of the slot's and the mbarrier's shared addresses to the peer's rank, then one
  `st.async.shared::cluster.mbarrier::complete_tx::bytes` per pair of elements a thread holds:
  BLOCK_B x BLOCK_N x e bytes to each of the S CTAs; each CTA receives S x BLOCK_B x BLOCK_N x e =
  BLOCK_B x H x e bytes a step).
- The wait: each CTA has one mbarrier per slot (count 1). At every step it arms the slot's mbarrier
  with the bytes all S CTAs send into the slot (`expect`: one thread's arrive + expect_tx of
  BLOCK_B x H x e), and every thread spins on try_wait.parity (acquire, cluster scope) with parity
  wait_phase(i) = (i // 2) % 2: slot 0's mbarrier completes at steps 0, 2, 4, ..., slot 1's at
  1, 3, 5, ...; each completion flips its phase. A push may land before the arming: the transaction
  count goes negative, and the phase still needs the arming's arrival, so it cannot complete early.
- Why two slots suffice: CTA r writes slot (i + 1) % 2 of CTA q during step i. CTA q last read that
  slot during step i - 1, and pushed its step i - 1 result only after that read (the push's data come
  from the MMA that read it, in every thread: no element is replicated across threads). CTA r passed
  its step-i wait only after every CTA's step i - 1 push had landed, so q's reads are over before r's
  write. Likewise a slot's mbarrier never has two phases in flight: the pushes completing phase k + 1
  need r's own push of the step between them, which comes after r's wait on phase k.
- Before the first push, every CTA's mbarriers must be initialised: init, `fence.mbarrier_init`
  (release, cluster scope), then the cluster barrier (arrive.release / wait.acquire, every thread).
- Global memory on the step's dependency chain: none but the loads of the next step's inputs
  (xw or g, and h_t in the backward; issued after the push, before the wait) and the output's
  store (h_n after the loop). No barrier after the last step: nothing is pushed at
  step T - 1, and a CTA's own last wait covers every push into its memory, so no CTA exits while
  another writes to it (hence T >= 1: with T = 0 the h0 pushes would outlive their targets).

The shared state buffer is swizzled (16-byte vectors XOR-ed by row % 8: the MMA's ldmatrix reads are
free of bank conflicts); the push computes each element's address with the same formula
(state_offset), and the Gluon kernel asserts at compile time that Triton's layout is that formula.

`dsmem_twin_kernel` is the same protocol in plain Triton for the CPU interpreter, which runs one
program at a time: one program per cluster runs the ranks of its cluster in turn at each step, and
the CTAs' state buffers are a global buffer laid out as the shared ones (`p_state`: [clusters, S,
2, BLOCK_B x H], state_offset). It shares the slot, parity, column and offset helpers with the Gluon
kernel and models each CTA's two mbarriers (`p_barrier`: the bytes pushed into each slot, the phases
each has completed), so a wrong slot, parity, column block or byte count fails on the CPU. Ranks in
turn never drift apart, so `dsmem_cta_twin_kernel` runs one program per CTA as the Gluon kernel does
(every program a thread in tests/concurrent_interpreter.py; each slot's mbarrier a byte counter that
only grows): there a CTA runs up to a step ahead of a slower one, which is what the double buffer is
for (with one buffer the results go wrong).

The Gluon kernel needs Triton >= 3.9 (shared-memory descriptors as inline-asm operands); on an older
Triton this module imports and `available()` is False. No layout of the package launches it yet:
`forward` and `backward` run it on an sm_90 GPU (never run so far: it is compiled offline by the
tests, forward and backward, with and without lengths, and its launches checked against a recording
launcher). The twins take the same arguments (twin_run) and share step_time, step_offset,
slice_offset and step_result with it.
"""
import triton
import triton.language as tl

from .common import activate
from .toolchain import triton_version

GLUON_MIN_VERSION = (3, 9)


@triton.jit
def read_slot(i):
    """The state slot step i reads (slot 0: h0, pushed before the loop, for step 0)."""
    return i % 2


@triton.jit
def write_slot(i):
    """The state slot step i pushes into: the one step i + 1 reads."""
    return (i + 1) % 2


@triton.jit
def completions_before(i):
    """How many phases the mbarrier of read_slot(i) completed before the one step i waits for: slot 0's
    completes for steps 0 (h0), 2, 4, ..., slot 1's for steps 1, 3, 5, ..."""
    return i // 2


@triton.jit
def wait_phase(i):
    """The parity of the phase step i waits for (try_wait.parity): phases 0, 1, 0, ... of each slot."""
    return completions_before(i) % 2


@triton.jit
def state_offset(o_row, o_col, H: tl.constexpr, VEC: tl.constexpr, PHASES: tl.constexpr):
    """Element offset of h[o_row, o_col] in a state slot [BLOCK_B, H] (rows of H elements): the
    swizzled layout of the shared buffer, VEC-element (16-byte) vectors XOR-ed by o_row % PHASES."""
    return o_row * H + (o_col ^ ((o_row % PHASES) * VEC))


@triton.jit
def column_block(rank, BLOCK_N: tl.constexpr):
    """The first output column of the CTA of rank `rank`."""
    return rank * BLOCK_N


@triton.jit
def walks_back(direction, REVERSE: tl.constexpr):
    """1 where `direction` walks t = T-1 .. 0, else 0: direction 0 as REVERSE says, direction 1 (the
    second of a bidirectional launch, grid axis 2) the other way."""
    return (direction + (1 if REVERSE else 0)) % 2


@triton.jit
def step_time(i, T, reverse):
    """The time step t that step i of the walk computes: i, or T - 1 - i where `reverse` (walks_back) is 1."""
    return i + reverse * (T - 1 - 2 * i)


@triton.jit
def direction_offsets(direction, T, B, H: tl.constexpr):
    """Element offsets of `direction`'s [B, H] and [T, B, H] blocks in inputs stacked [D, ...] (int64)."""
    batch = tl.cast(direction, tl.int64) * B * H
    return batch, batch * T


@triton.jit
def direction_pointers(direction, T, B, H: tl.constexpr, p_xw, p_out, p_w, p_act, p_h0, p_hn, BACKWARD: tl.constexpr):
    """The pointers to `direction`'s blocks of inputs stacked [D, ...] (p_act is the backward's, p_h0 and p_hn
    the forward's: None in the other)."""
    o_bh, o_tbh = direction_offsets(direction, T, B, H)
    p_xw += o_tbh
    p_out += o_tbh
    p_w += direction * H * H
    if BACKWARD:
        p_act += o_tbh
    else:
        p_h0 += o_bh
        p_hn += o_bh
    return p_xw, p_out, p_w, p_act, p_h0, p_hn


@triton.jit
def slice_offset(o_n, o_k, H: tl.constexpr, BACKWARD: tl.constexpr):
    """Element offset in W_hh of M[k, n], the slice's element for output column n and state column k:
    M = W_hh^T in the forward (W_hh[n, k]), W_hh in the backward (W_hh[k, n]; kernels/persistent.py's
    strides swapped the same way)."""
    if BACKWARD:
        offset = o_k * H + o_n
    else:
        offset = o_n * H + o_k
    return offset


@triton.jit
def step_result(b_new, b_prev, active, BACKWARD: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """(output, state) of a step from act's result b_new and the CTA's columns of the previous state
    b_prev: with lengths, a row past its length (active False) outputs 0 and keeps its state in the
    forward (h0 until a reverse row starts); in the backward its state is that 0 (kernels/persistent.py)."""
    b_out = b_new
    b_state = b_new
    if HAS_LENGTHS:
        b_out = tl.where(active, b_new, 0.0)
        if BACKWARD:
            b_state = b_out
        else:
            b_state = tl.where(active, b_new, b_prev)
    return b_out, b_state


@triton.jit
def step_offset(i, T, B, H: tl.constexpr, reverse):
    """Element offset of step i's [B, H] block in a [T, B, H] tensor (int64: T x B x H may pass 2^31)."""
    return tl.cast(step_time(i, T, reverse), tl.int64) * B * H


CLUSTER_SIZES = (2, 4, 8, 16)  # 16: non-portable, what Hopper allows beyond the portable 8


def default_config(hidden: int, cluster: int, element_bytes: int) -> dict:
    """The Gluon kernel's config: one 16-row batch tile a cluster (the mma.sync's M); K read in chunks of
    one swizzle period (64 bf16 / 32 fp32 columns: 128 bytes a row); warps side by side on the columns
    in 8-column mma.sync tiles, at most 4, fewer where BLOCK_N < 32 (no element held, and pushed, by two
    threads). H a power of two (the kernel's aranges), at least 8 columns a CTA."""
    block_n = hidden // cluster
    if cluster not in CLUSTER_SIZES or hidden & (hidden - 1) or block_n < 8 or hidden * element_bytes < 128:
        raise ValueError(f"H = {hidden} does not split into {cluster} CTAs of 8 or more columns (H a power of two "
                         f"of at least 128 bytes, cluster sizes {CLUSTER_SIZES})")
    needed = shared_memory_bytes(hidden, cluster, element_bytes, 16)
    if needed > SHARED_MEMORY_LIMIT:
        raise ValueError(f"H = {hidden} over {cluster} CTAs needs {needed} B of shared memory a CTA, over the "
                         f"{SHARED_MEMORY_LIMIT} B one may use")
    return {"BLOCK_B": 16, "BLOCK_K": 128 // element_bytes, "num_warps": min(4, block_n // 8)}


SHARED_MEMORY_LIMIT = 232448  # bytes a CTA may use on sm_90 (227 KB)


def shared_memory_bytes(hidden: int, cluster: int, element_bytes: int, block_b: int) -> int:
    """A CTA's shared memory: its W_hh slice (H / S x H), the state's two slots (2 x BLOCK_B x H) and two
    8-byte mbarriers."""
    return (hidden // cluster * hidden + 2 * block_b * hidden) * element_bytes + 16


def state_slot_bytes(block_b: int, hidden: int, element_bytes: int) -> int:
    """The bytes a CTA receives each step (all S CTAs' pushes): one slot, BLOCK_B x H x e."""
    return block_b * hidden * element_bytes


@triton.jit
def _twin_push(values, p_state, p_barrier, slot, o_lb, o_c, H: tl.constexpr, CLUSTER: tl.constexpr,
               SLOT: tl.constexpr, ELEMENT_BYTES: tl.constexpr, VEC: tl.constexpr, PHASES: tl.constexpr):
    """A rank's push of `values` [BLOCK_B, BLOCK_N] (columns o_c) into `slot` of every CTA of the cluster,
    and the bytes it completes on each CTA's mbarrier of that slot (st.async's complete_tx)."""
    for peer in tl.static_range(CLUSTER):
        tl.store(p_state + (peer * 2 + slot) * SLOT + state_offset(o_lb[:, None], o_c[None, :], H, VEC, PHASES),
                 values.to(p_state.dtype.element_ty))
        p_peer_bar = p_barrier + (peer * 2 + slot) * 2
        tl.store(p_peer_bar, tl.load(p_peer_bar) + ELEMENT_BYTES * values.numel)


@triton.jit
def dsmem_twin_kernel(
    p_xw,  # [D, T, B, H] forward: x_t W_ih^T + b; backward: g_t = dL/dh_t (D directions: grid axis 2)
    p_w,  # [D, H, H] W_hh (slice_offset: its rows in the forward, its columns in the backward)
    p_h0,  # [D, B, H] (forward; None in the backward: the state starts at 0)
    p_act,  # [D, T, B, H] h_t of the forward (backward only, else None)
    p_out,  # [D, T, B, H] forward: h_t; backward: dz_t
    p_hn,  # [D, B, H] each row's state after its last step (forward only, else None)
    p_len,  # [B] int32 sequence lengths (HAS_LENGTHS), else None
    p_state,  # [D, clusters, CLUSTER, 2, BLOCK_B * H]: each CTA's state buffer (state_offset), any content
    p_barrier,  # [D, clusters, CLUSTER, 2, 2] int32, zero: per CTA and slot, bytes pushed and phases completed
    T,
    B,
    H: tl.constexpr,
    CLUSTER: tl.constexpr,  # S, CTAs a cluster
    BLOCK_B: tl.constexpr,
    CELL: tl.constexpr,
    ELEMENT_BYTES: tl.constexpr,  # e of the Gluon kernel's dtype: the byte counts and the swizzle
    BACKWARD: tl.constexpr = False,
    REVERSE: tl.constexpr = False,  # direction 0 walks t = T-1 .. 0; direction 1 the other way
    HAS_LENGTHS: tl.constexpr = False,
    # Tests only: a planted protocol bug ("slot": push into the slot being read; "parity": wait for the
    # other phase; "columns": push into the next rank's columns). "" in every real run.
    DEBUG_MUTATION: tl.constexpr = "",
):
    """One program per cluster (grid (clusters, D)); the ranks of the cluster run in turn within each step."""
    BLOCK_N: tl.constexpr = H // CLUSTER
    VEC: tl.constexpr = 16 // ELEMENT_BYTES
    PHASES: tl.constexpr = 8
    SLOT: tl.constexpr = BLOCK_B * H
    cluster = tl.program_id(0)
    direction = tl.program_id(1)
    p_xw, p_out, p_w, p_act, p_h0, p_hn = direction_pointers(direction, T, B, H, p_xw, p_out, p_w, p_act, p_h0, p_hn,
                                                             BACKWARD)
    reverse = walks_back(direction, REVERSE)
    first_row = cluster * BLOCK_B
    o_lb = tl.arange(0, BLOCK_B)  # rows within the tile
    o_b = first_row + o_lb
    m_b = o_b < B
    o_k = tl.arange(0, H)
    o_n = tl.arange(0, BLOCK_N)
    p_state += (direction * tl.num_programs(0) + cluster) * CLUSTER * 2 * SLOT
    p_barrier += (direction * tl.num_programs(0) + cluster) * CLUSTER * 4
    b_len = tl.load(p_len + o_b, mask=m_b, other=0) if HAS_LENGTHS else o_b
    # h0 (0 in the backward) into slot 0 of every CTA: each rank pushes its columns (rows past B zero), as
    # after a step.
    for rank in tl.static_range(CLUSTER):
        o_c = column_block(rank, BLOCK_N) + o_n
        if BACKWARD:
            b_h0 = tl.zeros([BLOCK_B, BLOCK_N], tl.float64)
        else:
            b_h0 = tl.load(p_h0 + o_b[:, None] * H + o_c[None, :], mask=m_b[:, None], other=0.0)
        _twin_push(b_h0, p_state, p_barrier, read_slot(0), o_lb, o_c, H, CLUSTER, SLOT, ELEMENT_BYTES, VEC, PHASES)
    failed = 0
    for i in range(T):
        slot = read_slot(i)
        t = step_time(i, T, reverse)
        for rank in tl.static_range(CLUSTER):
            p_own = p_state + (rank * 2 + slot) * SLOT
            p_bar = p_barrier + (rank * 2 + slot) * 2
            # The wait: every CTA's push into this slot landed, and it is the phase the Gluon kernel waits for.
            pushed = tl.load(p_bar)
            completed = tl.load(p_bar + 1)
            failed |= (pushed != ELEMENT_BYTES * SLOT).to(tl.int32)
            phase = wait_phase(i)
            if DEBUG_MUTATION == "parity":
                phase = 1 - phase
            # The pushes complete phase number `completed` (0, 1, 2, ...): try_wait.parity(phase) returns
            # once the phase of that parity completed, so the kernel must wait for its parity.
            failed |= (completed % 2 != phase).to(tl.int32)
            tl.store(p_bar, 0)  # the completion resets the count, the phase flips
            tl.store(p_bar + 1, completed + 1)
            b_h = tl.load(p_own + state_offset(o_lb[:, None], o_k[None, :], H, VEC, PHASES))
            first = column_block(rank, BLOCK_N)
            o_c = first + o_n
            # This rank's columns of the state it read: what the Gluon kernel keeps in registers.
            b_prev = tl.load(p_own + state_offset(o_lb[:, None], o_c[None, :], H, VEC, PHASES)).to(tl.float64)
            b_w = tl.load(p_w + slice_offset(o_c[None, :], o_k[:, None], H, BACKWARD))  # slice^T [H, BLOCK_N]
            o_io = o_b[:, None] * H + o_c[None, :]
            o_t = step_offset(i, T, B, H, reverse) + o_io
            b_z = tl.load(p_xw + o_t, mask=m_b[:, None], other=0.0).to(tl.float64)
            b_z = tl.dot(b_h.to(tl.float64), b_w.to(tl.float64), b_z, out_dtype=tl.float64)
            b_act = tl.load(p_act + o_t, mask=m_b[:, None], other=0.0).to(tl.float64) if BACKWARD else b_z
            b_out, b_new = step_result(activate(b_z, b_act, BACKWARD, CELL), b_prev, (t < b_len)[:, None],
                                       BACKWARD, HAS_LENGTHS)
            tl.store(p_out + o_t, b_out.to(p_out.dtype.element_ty), mask=m_b[:, None])
            if i + 1 < T:
                target = write_slot(i)
                if DEBUG_MUTATION == "slot":
                    target = slot
                if DEBUG_MUTATION == "columns":
                    o_c = column_block((rank + 1) % CLUSTER, BLOCK_N) + o_n
                _twin_push(b_new, p_state, p_barrier, target, o_lb, o_c, H, CLUSTER, SLOT, ELEMENT_BYTES, VEC,
                           PHASES)
            elif not BACKWARD:
                tl.store(p_hn + o_io, b_new.to(p_hn.dtype.element_ty), mask=m_b[:, None])
    if failed != 0:  # a wait the Gluon kernel would not pass as modelled: poison the tile's outputs
        b_nan = tl.full([BLOCK_B, H], float("nan"), tl.float64)
        for i in range(T):
            tl.store(p_out + i * B * H + o_b[:, None] * H + o_k[None, :], b_nan.to(p_out.dtype.element_ty),
                     mask=m_b[:, None])
        if not BACKWARD:
            tl.store(p_hn + o_b[:, None] * H + o_k[None, :], b_nan.to(p_hn.dtype.element_ty), mask=m_b[:, None])


@triton.jit
def dsmem_cta_twin_kernel(
    p_xw,  # [D, T, B, H] (grid axis 2: the direction)
    p_w,  # [D, H, H] W_hh
    p_h0,  # [D, B, H] (forward only)
    p_act,  # [D, T, B, H] (backward only)
    p_out,  # [D, T, B, H]
    p_hn,  # [D, B, H] (forward only)
    p_len,  # [B] int32 (HAS_LENGTHS)
    p_state,  # [D, clusters, CLUSTER, 2, BLOCK_B * H]: each CTA's state buffer (state_offset), any content
    p_bytes,  # [D, clusters, CLUSTER, 2] int32, zero: bytes pushed into each CTA's slot so far (only grows)
    T,
    B,
    H: tl.constexpr,
    CLUSTER: tl.constexpr,
    BLOCK_B: tl.constexpr,
    CELL: tl.constexpr,
    ELEMENT_BYTES: tl.constexpr,
    BACKWARD: tl.constexpr = False,
    REVERSE: tl.constexpr = False,
    HAS_LENGTHS: tl.constexpr = False,
    # Tests only: "one_slot" reads and pushes one slot (no double buffer). "" in every real run.
    DEBUG_MUTATION: tl.constexpr = "",
):
    """The protocol with one program per CTA, grid (CLUSTER, clusters) like the Gluon kernel's, for
    tests/concurrent_interpreter.py (every program a thread): ranks run at their own pace, so the
    double buffer's argument (no push lands in a slot a slower CTA still reads) is exercised. A push
    is stores then a release add of its bytes to the peer's slot counter; the wait polls its own
    counter (acquire) until the slot's mbarrier would complete: (completions_before(i) + 1) slots'
    worth of bytes. As the Gluon kernel, it keeps its columns of the state in registers (b_prev)."""
    BLOCK_N: tl.constexpr = H // CLUSTER
    VEC: tl.constexpr = 16 // ELEMENT_BYTES
    PHASES: tl.constexpr = 8
    SLOT: tl.constexpr = BLOCK_B * H
    rank = tl.program_id(0)
    cluster = tl.program_id(1)
    direction = tl.program_id(2)
    p_xw, p_out, p_w, p_act, p_h0, p_hn = direction_pointers(direction, T, B, H, p_xw, p_out, p_w, p_act, p_h0, p_hn,
                                                             BACKWARD)
    reverse = walks_back(direction, REVERSE)
    o_lb = tl.arange(0, BLOCK_B)
    o_b = cluster * BLOCK_B + o_lb
    m_b = o_b < B
    o_k = tl.arange(0, H)
    o_c = column_block(rank, BLOCK_N) + tl.arange(0, BLOCK_N)
    p_state += (direction * tl.num_programs(1) + cluster) * CLUSTER * 2 * SLOT
    p_bytes += (direction * tl.num_programs(1) + cluster) * CLUSTER * 2
    o_io = o_b[:, None] * H + o_c[None, :]
    b_w = tl.load(p_w + slice_offset(o_c[None, :], o_k[:, None], H, BACKWARD))  # slice^T [H, BLOCK_N]
    b_len = tl.load(p_len + o_b, mask=m_b, other=0) if HAS_LENGTHS else o_b
    if BACKWARD:
        b_prev = tl.zeros([BLOCK_B, BLOCK_N], tl.float64)
    else:
        b_prev = tl.load(p_h0 + o_io, mask=m_b[:, None], other=0.0).to(tl.float64)
    _cta_push(b_prev, p_state, p_bytes, read_slot(0), o_lb, o_c, H, CLUSTER, SLOT, ELEMENT_BYTES, VEC, PHASES)
    for i in range(T):
        slot = read_slot(i)
        t = step_time(i, T, reverse)
        target = (completions_before(i) + 1) * ELEMENT_BYTES * SLOT
        if DEBUG_MUTATION == "one_slot":
            slot = 0
            target = (i + 1) * ELEMENT_BYTES * SLOT
        p_mine = p_bytes + rank * 2 + slot
        seen = tl.atomic_add(p_mine, 0, sem="acquire")
        while seen < target:
            seen = tl.atomic_add(p_mine, 0, sem="acquire")
        b_h = tl.load(p_state + (rank * 2 + slot) * SLOT + state_offset(o_lb[:, None], o_k[None, :], H, VEC, PHASES))
        o_t = step_offset(i, T, B, H, reverse) + o_io
        b_z = tl.load(p_xw + o_t, mask=m_b[:, None], other=0.0).to(tl.float64)
        b_z = tl.dot(b_h.to(tl.float64), b_w.to(tl.float64), b_z, out_dtype=tl.float64)
        b_act = tl.load(p_act + o_t, mask=m_b[:, None], other=0.0).to(tl.float64) if BACKWARD else b_z
        b_out, b_prev = step_result(activate(b_z, b_act, BACKWARD, CELL), b_prev, (t < b_len)[:, None], BACKWARD,
                                    HAS_LENGTHS)
        tl.store(p_out + o_t, b_out.to(p_out.dtype.element_ty), mask=m_b[:, None])
        if i + 1 < T:
            target_slot = write_slot(i)
            if DEBUG_MUTATION == "one_slot":
                target_slot = 0
            _cta_push(b_prev, p_state, p_bytes, target_slot, o_lb, o_c, H, CLUSTER, SLOT, ELEMENT_BYTES, VEC,
                      PHASES)
    if not BACKWARD:
        tl.store(p_hn + o_io, b_prev.to(p_hn.dtype.element_ty), mask=m_b[:, None])


@triton.jit
def _cta_push(values, p_state, p_bytes, slot, o_lb, o_c, H: tl.constexpr, CLUSTER: tl.constexpr,
              SLOT: tl.constexpr, ELEMENT_BYTES: tl.constexpr, VEC: tl.constexpr, PHASES: tl.constexpr):
    """dsmem_cta_twin_kernel's push: the stores into `slot` of every CTA, then each CTA's byte count
    (release: the stores before the count)."""
    for peer in tl.static_range(CLUSTER):
        tl.store(p_state + (peer * 2 + slot) * SLOT + state_offset(o_lb[:, None], o_c[None, :], H, VEC, PHASES),
                 values.to(p_state.dtype.element_ty))
        tl.atomic_add(p_bytes + peer * 2 + slot, ELEMENT_BYTES * values.numel, sem="release")


def twin_forward(xw, w_hh, h0, cluster: int, block_b: int = 16, cell: str = "tanh", element_bytes: int = 2,
                 debug_mutation: str = "", per_cta: bool = False):
    """The forward's out [T, B, H] by twin_run (no lengths, t = 0 .. T-1)."""
    return twin_run(xw, w_hh, h0, cluster, block_b=block_b, cell=cell, element_bytes=element_bytes,
                    debug_mutation=debug_mutation, per_cta=per_cta)[0]


def twin_run(inputs, w_hh, h0, cluster: int, block_b: int = 16, cell: str = "tanh", element_bytes: int = 2,
             debug_mutation: str = "", per_cta: bool = False, act=None, lengths=None, reverse: bool = False):
    """Run dsmem_twin_kernel (under TRITON_INTERPRET=1 on a CPU): (out [T, B, H], h_n [B, H] or None),
    outputs NaN where never written. The forward from `inputs` = xw and h0; the backward where `act` (the
    forward's h_t) is given: `inputs` = g_t, h0 None, out = dz_t, no h_n. `lengths`: [B] int32 or None;
    `reverse`: walk t = T-1 .. 0. Both directions in one launch where `inputs` is stacked [2, T, B, H]
    (w_hh [2, H, H], h0 [2, B, H], act [2, T, B, H]; direction 1 walks the other way). `element_bytes`:
    the Gluon kernel's e (2: bf16/fp16, 4: fp32) for its byte counts and swizzle. `per_cta`:
    dsmem_cta_twin_kernel instead, one program per CTA (needs every program running at once:
    tests/concurrent_interpreter.py)."""
    import torch

    steps, batch, hidden = inputs.shape[-3:]
    directions = inputs.shape[0] if inputs.dim() == 4 else 1
    backward = act is not None
    assert hidden % cluster == 0 and block_b % 16 == 0 and (h0 is None) == backward
    clusters = triton.cdiv(batch, block_b)
    out = torch.full_like(inputs, float("nan"))
    h_n = None if backward else torch.full_like(h0, float("nan"))
    state = torch.full((directions, clusters, cluster, 2, block_b * hidden), float("nan"), dtype=inputs.dtype,
                       device=inputs.device)
    args = (inputs, w_hh, h0, act, out, h_n, lengths, state)
    meta = dict(H=hidden, CLUSTER=cluster, BLOCK_B=block_b, CELL=cell, ELEMENT_BYTES=element_bytes, BACKWARD=backward,
                REVERSE=reverse, HAS_LENGTHS=lengths is not None, DEBUG_MUTATION=debug_mutation)
    if per_cta:
        counts = torch.zeros((directions, clusters, cluster, 2), dtype=torch.int32, device=inputs.device)
        dsmem_cta_twin_kernel[(cluster, clusters, directions)](*args, counts, steps, batch, **meta)
    else:
        barrier = torch.zeros((directions, clusters, cluster, 2, 2), dtype=torch.int32, device=inputs.device)
        dsmem_twin_kernel[(clusters, directions)](*args, barrier, steps, batch, **meta)
    return out, h_n


def available() -> bool:
    """Whether this Triton has the Gluon the kernel needs (>= 3.9: shared-memory descriptors as inline-asm
    operands, Hopper mbarriers, mma_v2)."""
    return GLUON_PROBLEM is None


GLUON_PROBLEM = None  # why the Gluon kernel cannot be compiled here, or None
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
except ImportError as error:
    GLUON_PROBLEM = f"no Gluon for Hopper in Triton {triton.__version__}: {error}"
if GLUON_PROBLEM is None and triton_version()[:2] < GLUON_MIN_VERSION:
    GLUON_PROBLEM = f"Triton {triton.__version__} < 3.9: its Gluon takes no shared-memory address in inline asm"


def _unavailable(fn):
    """Stands in for Gluon's decorators where GLUON_PROBLEM says why they cannot be used."""
    def refuse(*args, **kwargs):
        raise RuntimeError(f"{fn.__name__} needs Gluon (Triton >= 3.9): {GLUON_PROBLEM}")
    refuse.__name__ = fn.__name__
    return refuse


_gluon_jit = gluon.jit if GLUON_PROBLEM is None else _unavailable
_asm_builder = gluon.constexpr_function if GLUON_PROBLEM is None else _unavailable


@_asm_builder
def _push_asm(values, offsets, slot, barrier, peer, element_bytes):
    """PTX of one thread's push into the CTA of rank `peer`: its slot's and mbarrier's shared addresses
    mapped into the cluster window (mapa), then one st.async a pair of elements (a pair is adjacent in
    the row: _check_layouts), each completing its bytes on the peer's mbarrier."""
    lines = ["{", ".reg .b32 peer_slot, peer_barrier, address, word;",
             f"mapa.shared::cluster.u32 peer_slot, {slot}, {peer};",
             f"mapa.shared::cluster.u32 peer_barrier, {barrier}, {peer};"]
    for j in range(0, len(values), 2):
        lines.append(f"add.u32 address, peer_slot, {offsets[j]};")
        if element_bytes == 2:  # st.async has no 16-bit form: the pair as one b32 (lower column in the low half)
            lines += [f"mov.b32 word, {{{values[j]}, {values[j + 1]}}};",
                      "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [address], word, [peer_barrier];"]
        else:
            lines.append(f"st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [address], "
                         f"{{{values[j]}, {values[j + 1]}}}, [peer_barrier];")
    return "\n".join(lines + ["}"])


@_asm_builder
def _push16_asm(outputs, inputs):
    (slot,), (barrier,), (peer,), values, offsets = inputs
    return _push_asm(values, offsets, slot, barrier, peer, 2)


@_asm_builder
def _push32_asm(outputs, inputs):
    (slot,), (barrier,), (peer,), values, offsets = inputs
    return _push_asm(values, offsets, slot, barrier, peer, 4)


@_asm_builder
def _state_layout_problem(layout, block_b, hidden, vec, phases):
    """Why Triton's linear layout of a state slot [BLOCK_B, H] is not state_offset's, or '' where it is:
    each offset bit's coordinates must be where state_offset (its Python function, on integers) puts
    that offset. (The slots of [2, BLOCK_B, H] follow each other: slot * BLOCK_B * H.)"""
    formula = getattr(state_offset, "fn")  # its Python function (Triton's dependency scan refuses `.fn`)
    for bit, (row, col) in enumerate(layout.offset_bases):
        where = formula(row, col, hidden, vec, phases)
        if where != 1 << bit:
            return f"offset {1 << bit} holds element {(row, col)}, which state_offset puts at {where}"
    if len(layout.offset_bases) != (block_b * hidden).bit_length() - 1:
        return f"{len(layout.offset_bases)} offset bits for {block_b * hidden} elements"
    return ""


@_asm_builder
def _accumulator_layout_problem(layout):
    """Why the MMA accumulator's layout does not suit the push, or '': a thread's registers 0 and 1 must
    be adjacent columns of one row (the pair one st.async sends), and no element may sit in two threads
    (each would push it: bytes the mbarrier does not expect)."""
    if list(layout.reg_bases[0]) != [0, 1]:
        return f"register 1 is element {layout.reg_bases[0]} of register 0's, not the next column"
    if any(not any(basis) for basis in [*layout.reg_bases, *layout.lane_bases, *layout.warp_bases]):
        return "elements replicated across registers, lanes or warps"
    return ""


@_asm_builder
def _row_lanes(row, vec):
    """A warp's lanes [across rows, along a row] loading rows of `row` elements in `vec`-element vectors."""
    along = max(1, min(32, row // vec))
    return [32 // along, along]


@_asm_builder
def _row_swizzle(row, element_bytes):
    """The backward slice's shared layout, rows of `row` elements: 16-byte vectors XOR-ed over 128 bytes
    (rows shorter than 128 bytes share a phase), so the MMA's column reads spread over the banks."""
    vec = 16 // element_bytes
    per_phase = max(1, 128 // (row * element_bytes))
    return gl.SwizzledSharedLayout(vec, per_phase, max(1, min(8, row // vec)), order=[1, 0])


@_gluon_jit
def _cluster_rank():
    return gl.inline_asm("mov.u32 $0, %cluster_ctarank;", "=r", [], gl.int32, is_pure=True)


@_gluon_jit
def _wait(barrier, phase):
    """Every thread spins until the phase of parity `phase` of its CTA's `barrier` completed, acquiring at
    cluster scope: the pushes that complete it are other CTAs' st.async, so the conservative scope is the
    cluster's (Gluon's mbarrier.wait acquires at CTA scope only). Its cost: ptxas adds an L1
    invalidation (CCTL.IVALL) after the wait, harmless here (the state and W_hh live in shared memory)."""
    gl.inline_asm("{\n.reg .pred complete;\nwait_for_phase:\n"
                  "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 complete, [$0], $1;\n"
                  "@!complete bra.uni wait_for_phase;\n}", "r,r", [barrier, phase], ())


@_gluon_jit
def _push(values, byte_offsets, slot, barrier, CLUSTER: tl.constexpr, ELEMENT_BYTES: tl.constexpr):
    """Every thread sends its elements of `values` (their byte offsets in a slot) into `slot` of each CTA
    of the cluster, itself included, completing the bytes on that CTA's `barrier`."""
    for peer in gl.static_range(CLUSTER):
        if ELEMENT_BYTES == 2:
            gl.inline_asm(_push16_asm, ("r", "r", "r", "h", "r"), [slot, barrier, peer, values, byte_offsets])
        else:
            gl.inline_asm(_push32_asm, ("r", "r", "r", "f", "r"), [slot, barrier, peer, values, byte_offsets])


@_gluon_jit
def elman_dsmem_kernel(
    p_xw,  # [D, T, B, H] forward: x_t W_ih^T + b; backward: g_t = dL/dh_t (D directions: grid axis 2)
    p_w,  # [D, H, H] W_hh (slice_offset: its rows in the forward, its columns in the backward)
    p_h0,  # [D, B, H] (forward; None in the backward: the state starts at 0)
    p_act,  # [D, T, B, H] h_t of the forward (backward only, else None)
    p_out,  # [D, T, B, H] forward: h_t; backward: dz_t
    p_hn,  # [D, B, H] each row's state after its last step (forward only, else None)
    p_len,  # [B] int32 sequence lengths (HAS_LENGTHS), else None
    T,
    B,
    H: tl.constexpr,
    CLUSTER: tl.constexpr,  # S: CTAs a cluster; grid (CLUSTER, tiles) CTAs in clusters of (CLUSTER, 1, 1)
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,  # the MMA's K chunk: the state and the slice are read from shared memory in chunks
    CELL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr = None,  # "tf32" for fp32
    BACKWARD: tl.constexpr = False,
    REVERSE: tl.constexpr = False,  # direction 0 walks t = T-1 .. 0; direction 1 the other way
    HAS_LENGTHS: tl.constexpr = False,
    # Tests only (the PTX checks must reject them): "no_wait" drops the step's mbarrier wait, "fixed_phase"
    # waits for parity 0 at every step. "" in every real compile.
    DEBUG_MUTATION: tl.constexpr = "",
):
    dtype: tl.constexpr = p_w.dtype.element_ty
    ELEMENT_BYTES: tl.constexpr = dtype.primitive_bitwidth // 8
    BLOCK_N: tl.constexpr = H // CLUSTER
    WARPS: tl.constexpr = gl.num_warps()
    VEC: tl.constexpr = 16 // ELEMENT_BYTES
    PHASES: tl.constexpr = 8
    gl.static_assert(H % CLUSTER == 0, "H must split evenly over the cluster")
    gl.static_assert(BLOCK_B % 16 == 0, "BLOCK_B: a multiple of the MMA's 16 rows")
    gl.static_assert(H % BLOCK_K == 0 and BLOCK_K % (VEC * PHASES) == 0, "BLOCK_K: whole swizzle periods")
    ACC: tl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
    A_OPERAND: tl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=4 // ELEMENT_BYTES)
    B_OPERAND: tl.constexpr = gl.DotOperandLayout(operand_index=1, parent=ACC, k_width=4 // ELEMENT_BYTES)
    LOAD: tl.constexpr = gl.BlockedLayout([1, VEC], [1, 32], [WARPS, 1], [1, 0])
    STATE_SMEM: tl.constexpr = gl.SwizzledSharedLayout(VEC, 1, PHASES, order=[1, 0])  # per slot
    SLICE_SMEM: tl.constexpr = gl.SwizzledSharedLayout(VEC, 1, PHASES, order=[1, 0])
    gl.static_assert(_state_layout_problem(gl.to_linear_layout(STATE_SMEM, [BLOCK_B, H]), BLOCK_B, H, VEC,
                                           PHASES) == "", "the state buffer's layout is not state_offset's")
    gl.static_assert(_accumulator_layout_problem(gl.to_linear_layout(ACC, [BLOCK_B, BLOCK_N])) == "",
                     "the accumulator's layout does not suit the push (BLOCK_N >= 8 * num_warps)")

    rank = _cluster_rank()
    first_row = gl.program_id(1) * BLOCK_B  # the cluster's batch tile (program_id(0) is the rank)
    direction = gl.program_id(2)
    p_xw, p_out, p_w, p_act, p_h0, p_hn = direction_pointers(direction, T, B, H, p_xw, p_out, p_w, p_act, p_h0, p_hn,
                                                             BACKWARD)
    reverse = walks_back(direction, REVERSE)
    # The slice into shared memory once, as W_hh holds it (loads and stores in 16-byte vectors): in the
    # forward W_hh's rows of the rank's columns, [BLOCK_N, H] (M^T), read transposed as the MMA's B; in the
    # backward W_hh's columns, [H, BLOCK_N] (M's), read as they are (a transposing load of the columns spills
    # at bf16 H = 1024).
    if BACKWARD:
        W_LOAD: tl.constexpr = gl.BlockedLayout([1, VEC], _row_lanes(BLOCK_N, VEC), [WARPS, 1], [1, 0])
        o_wn = column_block(rank, BLOCK_N) + gl.arange(0, BLOCK_N, gl.SliceLayout(0, W_LOAD))
        o_wk = gl.arange(0, H, gl.SliceLayout(1, W_LOAD))
        b_w = gl.load(p_w + slice_offset(o_wn[None, :], o_wk[:, None], H, BACKWARD))
        w_slice = gl.allocate_shared_memory(dtype, [H, BLOCK_N], _row_swizzle(BLOCK_N, ELEMENT_BYTES), b_w)
    else:
        o_wn = column_block(rank, BLOCK_N) + gl.arange(0, BLOCK_N, gl.SliceLayout(1, LOAD))
        o_wk = gl.arange(0, H, gl.SliceLayout(0, LOAD))
        b_w = gl.load(p_w + slice_offset(o_wn[:, None], o_wk[None, :], H, BACKWARD))
        w_slice = gl.allocate_shared_memory(dtype, [BLOCK_N, H], SLICE_SMEM, b_w)
    state = gl.allocate_shared_memory(dtype, [2, BLOCK_B, H], STATE_SMEM)
    full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # one mbarrier a slot
    mbarrier.init(full.index(0), count=1)
    mbarrier.init(full.index(1), count=1)
    # Every CTA's mbarriers initialised (and visible cluster-wide) before any CTA pushes.
    gl.inline_asm("fence.mbarrier_init.release.cluster;\n"
                  "barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;", "", [], ())

    o_lb = gl.arange(0, BLOCK_B, gl.SliceLayout(1, ACC))
    o_b = first_row + o_lb
    o_c = column_block(rank, BLOCK_N) + gl.arange(0, BLOCK_N, gl.SliceLayout(0, ACC))
    o_io = o_b[:, None] * H + o_c[None, :]
    m_io = (o_b < B)[:, None] & (o_c < H)[None, :]
    push_offsets = state_offset(o_lb[:, None], o_c[None, :], H, VEC, PHASES) * ELEMENT_BYTES
    if HAS_LENGTHS:
        b_len = gl.load(p_len + o_b, mask=o_b < B, other=0)
    # The CTA's columns of the state, kept in registers (a row past its length keeps them in the forward).
    # h0 (0 in the backward) reaches every CTA as a step's output does: each CTA pushes its columns into slot 0.
    if BACKWARD:
        b_prev = gl.zeros([BLOCK_B, BLOCK_N], dtype, ACC)
    else:
        b_prev = gl.load(p_h0 + o_io, mask=m_io, other=0.0)
    _push(b_prev, push_offsets, state.index(read_slot(0)), full.index(read_slot(0)), CLUSTER, ELEMENT_BYTES)
    o_t = step_offset(0, T, B, H, reverse) + o_io
    b_in = gl.load(p_xw + o_t, mask=m_io, other=0.0)
    if BACKWARD:
        b_act = gl.load(p_act + o_t, mask=m_io, other=0.0)
    for i in range(T):
        slot = read_slot(i)
        if DEBUG_MUTATION != "no_wait":
            mbarrier.expect(full.index(slot), BLOCK_B * H * ELEMENT_BYTES)
            _wait(full.index(slot), 0 if DEBUG_MUTATION == "fixed_phase" else wait_phase(i))
        b_state = state.index(slot)
        acc = b_in.to(gl.float32)
        for k in gl.static_range(0, H, BLOCK_K):
            a = b_state.slice(k, BLOCK_K, dim=1).load(A_OPERAND)
            if BACKWARD:
                w = w_slice.slice(k, BLOCK_K, dim=0).load(B_OPERAND)
            else:
                w = w_slice.slice(k, BLOCK_K, dim=1).permute((1, 0)).load(B_OPERAND)
            acc = mma_v2(a, w, acc, input_precision=INPUT_PRECISION)
        if BACKWARD:
            b_new = activate(acc, b_act.to(gl.float32), True, CELL).to(dtype)
        else:
            b_new = activate(acc, acc, False, CELL).to(dtype)
        active = None
        if HAS_LENGTHS:
            active = (step_time(i, T, reverse) < b_len)[:, None]
        b_out, b_prev = step_result(b_new, b_prev, active, BACKWARD, HAS_LENGTHS)
        gl.store(p_out + o_t, b_out, mask=m_io)
        if i + 1 < T:
            target = write_slot(i)
            _push(b_prev, push_offsets, state.index(target), full.index(target), CLUSTER, ELEMENT_BYTES)
            # The next step's inputs: after the push (on the chain), before the wait.
            o_t = step_offset(i + 1, T, B, H, reverse) + o_io
            b_in = gl.load(p_xw + o_t, mask=m_io, other=0.0)
            if BACKWARD:
                b_act = gl.load(p_act + o_t, mask=m_io, other=0.0)
    if not BACKWARD:
        gl.store(p_hn + o_io, b_prev, mask=m_io)


def forward(xw, w_hh, h0, cluster: int, cell: str = "tanh", lengths=None, reverse: bool = False):
    """(out, h_n): h_t for t = 0 .. T-1 ([T, B, H], xw's dtype: bf16, fp16 or fp32 in TF32; walking T-1 .. 0
    where `reverse`) and each row's state after its last step ([B, H]), by elman_dsmem_kernel on an sm_90
    GPU: clusters of `cluster` CTAs, one a 16-row batch tile (kernels/launch.py's cluster launch:
    compiled with num_ctas = 1, launched with num_ctas = the cluster size). `lengths`: [B] int32 or None
    (steps t >= lengths[b] output 0, the row keeps its state). Raises ClusterUnavailable where no cluster
    launch runs (no sm_90 GPU, a Triton whose launcher was not checked, no Gluon). Both directions of a
    bidirectional layer in one launch where xw is stacked [2, T, B, H] (w_hh [2, H, H], h0 [2, B, H];
    direction 1 walks the other way; grid axis 2): out and h_n stacked too."""
    import torch

    if h0.shape != xw.shape[:-3] + xw.shape[-2:] or h0.dtype != xw.dtype:
        raise ValueError(f"h0 {tuple(h0.shape)} {h0.dtype} for xw {tuple(xw.shape)} {xw.dtype}")
    h_n = torch.empty_like(h0)
    out = _launch(dict(p_xw=xw, p_h0=h0.contiguous(), p_hn=h_n), w_hh, lengths, reverse, cluster, cell)
    return out, h_n


def backward(grad, out, w_hh, cluster: int, cell: str = "tanh", lengths=None, reverse: bool = False):
    """dz_t = (g_t + dz_{t+1} W_hh) * act'(h_t) ([T, B, H]) by elman_dsmem_kernel (BACKWARD) on an sm_90 GPU:
    `grad` g_t = dL/dh_t (dL/dh_n folded in by the caller), `out` the forward's h_t; `reverse` names the
    forward's walk, which the backward walks the other way (kernels/launch.py's recurrence_backward).
    With `lengths`, steps t >= lengths[b] output 0 and the row's state is 0. As `forward` otherwise."""
    if out.shape != grad.shape or out.dtype != grad.dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} for grad {tuple(grad.shape)} {grad.dtype}")
    return _launch(dict(p_xw=grad, p_act=out.contiguous()), w_hh, lengths, not reverse, cluster, cell)


def _launch(pointers: dict, w_hh, lengths, walk_reverse: bool, cluster: int, cell: str):
    """The cluster launch of elman_dsmem_kernel on `pointers` (p_xw, and p_h0 and p_hn or p_act): its output.
    Inputs stacked [2, T, B, H] (w_hh [2, H, H]): both directions, grid axis 2."""
    import torch

    from . import launch
    from .occupancy import ClusterUnavailable, Plan

    inputs = pointers["p_xw"]
    refusal = launch.cluster_refusal(inputs.device) or (None if available() else GLUON_PROBLEM)
    if refusal:
        raise ClusterUnavailable(refusal)
    steps, batch, hidden = inputs.shape[-3:]
    directions = inputs.shape[0] if inputs.dim() == 4 else 1
    if steps < 1:  # every CTA must wait for the h0 pushes into it before it exits
        raise ValueError("the DSMEM kernel needs T >= 1")
    if w_hh.shape != inputs.shape[:-3] + (hidden, hidden) or w_hh.dtype != inputs.dtype or directions > 2:
        raise ValueError(f"shapes/dtypes: inputs {tuple(inputs.shape)} {inputs.dtype}, w_hh {tuple(w_hh.shape)} "
                         f"{w_hh.dtype}")
    if lengths is not None and (lengths.shape != (batch,) or lengths.dtype != torch.int32):
        raise ValueError(f"lengths: [B] int32, got {tuple(lengths.shape)} {lengths.dtype}")
    config = default_config(hidden, cluster, inputs.element_size())
    out = torch.empty_like(inputs)
    unused = {"p_h0": None, "p_act": None, "p_hn": None}  # None: the direction does not take them
    args = dict({**unused, **pointers}, p_w=w_hh.contiguous(), p_out=out, p_len=lengths, T=steps, B=batch, H=hidden,
                CLUSTER=cluster, BLOCK_B=config["BLOCK_B"], BLOCK_K=config["BLOCK_K"], CELL=cell,
                INPUT_PRECISION="tf32" if inputs.dtype == torch.float32 else None, BACKWARD="p_act" in pointers,
                REVERSE=walk_reverse, HAS_LENGTHS=lengths is not None)
    args["p_xw"] = inputs.contiguous()
    compiled = elman_dsmem_kernel.warmup(**args, grid=(cluster, 1), num_warps=config["num_warps"])
    tiles = triton.cdiv(batch, config["BLOCK_B"])
    # Clusters never wait for each other: more than the device holds at once simply run later.
    chosen = Plan(cluster, tiles, batch_tiles=1, resident_capacity=cluster * tiles * directions, directions=directions,
                  cluster=True)
    launch.launch_clusters(compiled, chosen, launch.bound_arguments(elman_dsmem_kernel, args))
    return out
