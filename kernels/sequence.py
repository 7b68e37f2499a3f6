"""Whole-sequence recurrence: one launch runs all T steps.

Dimensions: T steps, B batch, H hidden. Each program owns BLOCK_B rows of the batch and all of H,
keeps the state in registers and walks the sequence; W_hh is loaded once and held on chip
(Triton keeps it in shared memory, within the budget of kernels/configs.py). The same kernel runs
the forward (state h, writes every h_t) and the backward (state dz, writes every dz_t):

    forward:   h_t  = act(xw_t + h_{t-1} @ W_hh^T)               M = W_hh^T
    backward:  dz_t = (g_t + dz_{t+1} @ W_hh) * act'(h_t)          M = W_hh

where g_t already holds dL/dh_n at each sequence's last step. With lengths (packed input), rows
past their length are inactive: they write 0, and the forward carries h unchanged through them.
"""
import triton
import triton.language as tl

from .common import below_while, cell_update, recurrent_dot


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
    T,
    B,
    H,
    stride_wk,
    stride_wn,
    B_BUCKET,  # the batch size rounded up to a power of two: the autotuning key (unused here)
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,  # H padded to a power of two: all of W_hh in one tile
    BACKWARD: tl.constexpr,
    REVERSE: tl.constexpr,
    CELL: tl.constexpr,  # the cell (kernels/cells.py): "tanh" or "relu"
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

    # Padded rows and columns of W are zero, so padded state columns stay zero.
    b_w = tl.load(p_w + o_h[:, None] * stride_wk + o_h[None, :] * stride_wn,
                  mask=m_h[:, None] & m_h[None, :], other=0.0).to(DOT_DTYPE)
    if BACKWARD:
        b_s = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC_DTYPE)
    else:
        b_s = tl.load(p_h0 + o_bh, mask=m_bh, other=0.0).to(ACC_DTYPE)
    if HAS_LENGTHS:
        b_len = tl.load(p_len + o_b, mask=m_b, other=0)
    # Step i's input is loaded during step i - 1: the dot that starts each step's dependent chain
    # takes it as its accumulator, and would otherwise wait an L2/HBM round trip every step.
    step: tl.constexpr = -1 if REVERSE else 1
    if REVERSE:
        t = T - 1
    else:
        t = T * 0
    b_in = tl.load(p_in + t.to(tl.int64) * B * H + o_bh, mask=m_bh, other=0.0)

    for i in range(T):
        o_t = t.to(tl.int64) * B * H + o_bh
        b_z = b_in.to(ACC_DTYPE)
        b_in = tl.load(p_in + (t + step).to(tl.int64) * B * H + o_bh,
                       mask=below_while(o_b, B, i + 1 < T)[:, None] & m_h[None, :], other=0.0)
        b_z = recurrent_dot(b_s, b_w, b_z, DOT_DTYPE, INPUT_PRECISION)
        b_new = cell_update(b_z, p_act, o_t, m_bh, BACKWARD, CELL)
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
        t += step

    if not BACKWARD:
        tl.store(p_hn + o_bh, b_s.to(p_hn.dtype.element_ty), mask=m_bh)
