"""Whole-sequence recurrence: one launch runs all T steps.

Dimensions: T steps, B batch, H hidden. Each program owns BLOCK_B rows of the batch and all of H,
keeps the state in registers and walks the sequence. W_hh is either loaded once and held on chip
(BLOCK_K = 0, the "sequence" path: Triton keeps it in shared memory, within the budget of
kernels/config.py) or, where it does not fit, streamed from L2 in
BLOCK_K-row chunks every step, the state read back from a double-buffered scratch (the "streamed"
path). The same kernel runs the forward (state h, writes every h_t) and the backward (state dz,
writes every dz_t):

    forward:   h_t  = act(xw_t + h_{t-1} @ W_hh^T)               M = W_hh^T
    backward:  dz_t = (g_t + dz_{t+1} @ W_hh) * act'(h_t)          M = W_hh

where g_t already holds dL/dh_n at each sequence's last step. With lengths (packed input), rows
past their length are inactive: they write 0, and the forward carries h unchanged through them.
"""
import triton
import triton.language as tl

from .common import cell_update, recurrent_dot, streamed_product


@triton.heuristics({"HAS_LENGTHS": lambda args: args["p_len"] is not None})
@triton.jit(do_not_specialize=["T"])
def rnn_sequence_kernel(
    p_in,  # [T, B, H] forward: x_t W_ih^T + b; backward: dL/dh_t (dL/dh_n folded in)
    p_h0,  # [B, H] initial state (forward only)
    p_w,  # [H, H] M[k, n] = p_w[k * stride_wk + n * stride_wn]
    p_act,  # [T, B, H] h_t of the forward (backward only)
    p_out,  # [T, B, H] forward: h_t; backward: dz_t
    p_hn,  # [B, H] final state (forward only)
    p_len,  # [B] int32 sequence lengths, or None
    p_scratch,  # [2, B, H] ACC_DTYPE state, double-buffered (streamed W_hh only), or None
    T,
    B,
    H,
    stride_wk,
    stride_wn,
    B_BUCKET,  # the batch size rounded up to a power of two: the autotuning key (unused here)
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 0: W_hh held on chip; else rows of W_hh streamed per chunk
    BACKWARD: tl.constexpr,
    REVERSE: tl.constexpr,
    RELU: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    o_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    o_h = tl.arange(0, BLOCK_H)
    m_b = o_b < B
    m_h = o_h < H
    m_bh = m_b[:, None] & m_h[None, :]
    o_row = o_b[:, None].to(tl.int64) * H
    o_bh = o_row + o_h[None, :]

    if BLOCK_K == 0:
        # Padded rows and columns of W are zero, so padded state columns stay zero.
        b_w = tl.load(p_w + o_h[:, None] * stride_wk + o_h[None, :] * stride_wn,
                      mask=m_h[:, None] & m_h[None, :], other=0.0).to(DOT_DTYPE)
    if BACKWARD:
        b_s = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC_DTYPE)
    else:
        b_s = tl.load(p_h0 + o_bh, mask=m_bh, other=0.0).to(ACC_DTYPE)
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)
    if BLOCK_K > 0:
        # The scratch buffer a step reads is t % 2 (t alternates parity in either direction).
        n_bh = B.to(tl.int64) * H
        if REVERSE:
            o_first = ((T - 1) % 2) * n_bh
        else:
            o_first = 0
        tl.store(p_scratch + o_first + o_bh, b_s, mask=m_bh)
        tl.debug_barrier()  # this program's threads read each other's state chunks

    for i in range(T):
        if REVERSE:
            t = T - 1 - i
        else:
            t = i
        t64 = t.to(tl.int64)
        o_t = t64 * B * H + o_bh
        b_z = tl.load(p_in + o_t, mask=m_bh, other=0.0).to(ACC_DTYPE)
        if BLOCK_K == 0:
            b_z = recurrent_dot(b_s, b_w, b_z, DOT_DTYPE, INPUT_PRECISION)
        else:
            b_z = streamed_product(b_z, p_scratch + (t64 % 2) * n_bh, o_row, m_b, p_w, o_h, m_h, H, stride_wk,
                                   stride_wn, BLOCK_K, DOT_DTYPE, INPUT_PRECISION)
        b_new = cell_update(b_z, p_act, o_t, m_bh, BACKWARD, RELU)
        if HAS_LENGTHS:
            m_active = (t < b_len)[:, None]
            b_new = tl.where(m_active, b_new, 0.0)
            if BACKWARD:
                b_s = b_new
            else:
                b_s = tl.where(m_active, b_new, b_s)
        else:
            b_s = b_new
        tl.store(p_out + o_t, b_new.to(p_out.dtype.element_ty), mask=m_bh)
        if BLOCK_K > 0:  # double buffering: one barrier per step orders this write and the next reads
            tl.store(p_scratch + ((t64 + 1) % 2) * n_bh + o_bh, b_s, mask=m_bh)
            tl.debug_barrier()

    if not BACKWARD:
        tl.store(p_hn + o_bh, b_s.to(p_hn.dtype.element_ty), mask=m_bh)
