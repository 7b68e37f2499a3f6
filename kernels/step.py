"""One timestep of the recurrence, tiled over batch and hidden: a matmul with a fused epilogue.

Dimensions: B batch, H hidden (the reduction dimension K is H too).

    forward:   h_t  = act(xw_t + h_{t-1} @ W_hh^T)               M = W_hh^T
    backward:  dz_t = (g_t + dz_{t+1} @ W_hh) * act'(h_t)          M = W_hh

Programs tile [B, H] and loop over K, so any H fits; one launch per step. Used by RNNCell, for
T = 1, and for the hidden sizes one program cannot hold (the stepwise layout).
"""
import triton
import triton.language as tl

from .common import cell_update, streamed_product


@triton.heuristics({
    "HAS_PREV": lambda args: args["p_prev"] is not None,
    "HAS_LENGTHS": lambda args: args["p_len"] is not None,
    "STORE_STATE": lambda args: args["p_state"] is not None,
})
@triton.jit(do_not_specialize=["t"])
def rnn_step_kernel(
    p_in,  # [B, H] forward: x_t W_ih^T + b; backward: dL/dh_t (dL/dh_n folded in)
    p_prev,  # [B, H] previous state (h_{t-1} or dz_{t+1}), or None where it is zero
    p_w,  # [H, H] M[k, n] = p_w[k * stride_wk + n * stride_wn]
    p_act,  # [B, H] h_t of the forward (backward only)
    p_out,  # [B, H] forward: h_t; backward: dz_t (0 in inactive rows)
    p_state,  # [B, H] state carried to the next step (forward with lengths), or None
    p_len,  # [B] int32 sequence lengths, or None
    t,  # the step this launch runs: rows whose length it reaches are inactive
    B,
    H,  # also the reduction's K: the programs loop over it in BLOCK_K chunks, so any H runs
    stride_wk,
    stride_wn,
    B_BUCKET,  # the batch size rounded up to a power of two: the autotuning key (unused here)
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BACKWARD: tl.constexpr,
    CELL: tl.constexpr,  # the cell (kernels/cells.py): "tanh" or "relu"
    HAS_PREV: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    STORE_STATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    o_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    o_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_b = o_b < B
    m_n = o_n < H
    m_bn = m_b[:, None] & m_n[None, :]
    o_row = o_b[:, None].to(tl.int64) * H
    o_bn = o_row + o_n[None, :]

    b_z = tl.load(p_in + o_bn, mask=m_bn, other=0.0).to(ACC_DTYPE)
    if HAS_PREV:
        b_z = streamed_product(b_z, p_prev, o_row, m_b, p_w, o_n, m_n, H, stride_wk, stride_wn, BLOCK_K, DOT_DTYPE,
                               INPUT_PRECISION)
    b_new = cell_update(b_z, p_act, o_bn, m_bn, BACKWARD, CELL)
    if HAS_LENGTHS:
        m_active = (t < tl.load(p_len + o_b, mask=m_b, other=0))[:, None]
        if STORE_STATE:
            b_prev = tl.load(p_prev + o_bn, mask=m_bn, other=0.0).to(ACC_DTYPE)
            tl.store(p_state + o_bn, tl.where(m_active, b_new, b_prev).to(p_state.dtype.element_ty), mask=m_bn)
        b_new = tl.where(m_active, b_new, 0.0)
    tl.store(p_out + o_bn, b_new.to(p_out.dtype.element_ty), mask=m_bn)
