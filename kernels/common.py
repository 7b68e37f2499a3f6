"""Element-wise pieces shared by the RNN kernels.

Dimensions: T steps, B batch, H hidden. `z` is a pre-activation tile [BLOCK_B, BLOCK_H].
"""
import triton
import triton.language as tl


@triton.jit
def tanh(z):
    # (1 - e) / (1 + e) with e = exp(-2|z|) never overflows (libdevice.tanh does not run in the
    # interpreter), but 1 - e cancels near 0 (tanh(1e-8) would be 0). There the odd Taylor series,
    # exact to rounding below 1/8 in fp64 and 1/2 in fp32; above, the quotient is within a few ulps
    # (fp32 on a GPU: exp is ex2.approx, about 2^-22 relative, which the quotient turns into up to
    # ~3.5 ulps at |z| = 1/2 and ~6.8 at 1/4).
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    small = tl.abs(z) < (0.125 if z.dtype == tl.float64 else 0.5)
    s = tl.where(small, z, 0.0)
    s2 = s * s
    series = s + s * s2 * (-1.0 / 3 + s2 * (2.0 / 15 + s2 * (-17.0 / 315 + s2 * (62.0 / 2835 + s2 * (
        -1382.0 / 155925 + s2 * (21844.0 / 6081075 + s2 * (-929569.0 / 638512875)))))))
    return tl.where(small, series, tl.where(z >= 0, t, -t))


@triton.jit
def below_while(o, bound, live):
    """o < bound where the scalar condition `live` holds, all False where it does not. A block mask
    and'ed with a scalar condition (`m & (i < T)`) is typed int32 by Triton's interpreter, whose 3.9
    release refuses such a mask: the scalar goes into the bound instead."""
    return o < tl.where(live, bound, 0)


@triton.jit
def cell_update(z, p_h, offsets, mask, BACKWARD: tl.constexpr, CELL: tl.constexpr):
    """Forward: h_t = cell(z_t). Backward: z is dh_t; loads h_t from p_h + offsets (p_h is None in
    the forward) and returns dz_t = dh_t * cell'(z_t)."""
    b_h = tl.load(p_h + offsets, mask=mask, other=0.0).to(z.dtype) if BACKWARD else z
    return activate(z, b_h, BACKWARD, CELL)


@triton.jit
def activate(z, b_h, BACKWARD: tl.constexpr, CELL: tl.constexpr):
    """The cell's step after the matmul (CELL: kernels/cells.py). Forward: h_t = act(z_t). Backward: z
    is dh_t, b_h is h_t; returns dz_t = dh_t * act'(z_t)."""
    tl.static_assert((CELL == "tanh") | (CELL == "relu"), "CELL must be 'tanh' or 'relu'")
    if BACKWARD:
        if CELL == "relu":  # as torch's relu backward: the gradient passes where h_t is not <= 0 (NaN included)
            out = tl.where(b_h <= 0, 0.0, z)
        else:
            out = z * (1.0 - b_h * b_h)
    else:
        if CELL == "relu":  # NaN stays NaN, as in torch (the GPU's max.f32 would return 0)
            out = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        else:
            out = tanh(z)
    return out


@triton.jit
def recurrent_dot(b_s, b_w, acc, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + b_s @ b_w with operands in DOT_DTYPE (fp16/bf16 on tensor cores) and acc's precision."""
    return tl.dot(b_s.to(DOT_DTYPE), b_w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION,
                  out_dtype=acc.dtype)


@triton.jit
def streamed_product(acc, p_s, o_row, m_b, p_w, o_n, m_n, H, stride_wk, stride_wn, BLOCK_K: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + S @ M[:, o_n]: the state rows S at p_s + o_row and W_hh streamed in BLOCK_K-row chunks
    (from L2), for tiles whose W_hh does not fit on chip."""
    for k in range(0, H, BLOCK_K):
        o_k = k + tl.arange(0, BLOCK_K)
        m_k = o_k < H
        b_s = tl.load(p_s + o_row + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
        # int64: H * H passes 2^31 from H = 46,341 (the stepwise layout runs any H).
        b_w = tl.load(p_w + o_k[:, None].to(tl.int64) * stride_wk + o_n[None, :].to(tl.int64) * stride_wn,
                      mask=m_k[:, None] & m_n[None, :], other=0.0)
        acc = recurrent_dot(b_s.to(acc.dtype), b_w.to(acc.dtype), acc, DOT_DTYPE, INPUT_PRECISION)
    return acc
