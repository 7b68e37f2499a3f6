"""Softmax cross-entropy over a chunk of logits rows, with dL/dlogits written over the logits.

Dimensions: C rows of the chunk (a slice of the N = T*B rows), V classes (the vocabulary).

    cross_entropy_chunk(logits [C, V], target [C], ...) -> loss [C]
        and, with write_grad, logits[r, c] := scale_r * (softmax(logits_r)_c - q_rc)

where q_r is the (label-smoothed) one-hot of target_r: (1 - eps) [c == target_r] + eps / V. Rows
whose target is ignore_index get loss 0 and gradient 0. One program owns BLOCK_C rows and sweeps
their V columns twice in BLOCK_V tiles: an online (max, sum-exp) softmax that also collects the
target's logit and the logits' sum (for smoothing), then the gradient tiles: the logits are read
twice and written once, and the gradient needs no logits beyond this chunk's.
"""
import contextlib

import torch
import triton
import triton.language as tl

_ACC = {torch.float64: tl.float64}


def _empty(shape, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Every kernel output is allocated here (the tests fill it with NaN to catch unwritten elements).
    return torch.empty(shape, dtype=dtype, device=like.device)


@triton.heuristics({
    "HAS_SCALE": lambda args: args["p_scale"] is not None,
    "HAS_SMOOTHING": lambda args: args["p_smoothing"] is not None,
})
@triton.jit
def cross_entropy_kernel(
    p_logits,  # [C, V] logits in; dL/dlogits out when WRITE_GRAD (row stride stride_c, unit column stride)
    p_target,  # [C] int64 class indices; ignore_index marks rows without a loss
    p_scale,  # [C] per-row factor of the gradient (reduction "none": grad_output), or None for 1
    p_smoothing,  # [1] label smoothing eps in ACC_DTYPE (a scalar argument would be fp32), or None for 0
    p_loss,  # [C] per-row loss in ACC_DTYPE (0 where ignored)
    C,
    V,
    stride_c,
    ignore_index,
    BLOCK_C: tl.constexpr,
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    o_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_row = o_c[:, None].to(tl.int64) * stride_c
    b_target = tl.load(p_target + o_c, mask=m_c, other=ignore_index)
    m_valid = m_c & (b_target != ignore_index)

    b_max = tl.full([BLOCK_C], float("-inf"), ACC_DTYPE)
    b_sum = tl.zeros([BLOCK_C], ACC_DTYPE)  # sum of exp(z - b_max)
    b_z_sum = tl.zeros([BLOCK_C], ACC_DTYPE)  # sum of the logits (label smoothing)
    b_z_target = tl.zeros([BLOCK_C], ACC_DTYPE)
    for v in range(0, V, BLOCK_V):
        o_v = v + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_logits + o_row + o_v[None, :], mask=m_c[:, None] & m_v[None, :], other=0.0).to(ACC_DTYPE)
        # Padding columns are -inf; the first tile holds column 0, so every row's max is finite
        # after it (rows past C read zeros) and exp(b_max - b_new_max) never sees -inf - -inf.
        b_new_max = tl.maximum(b_max, tl.max(tl.where(m_v[None, :], b_z, float("-inf")), 1))
        b_exp = tl.where(m_v[None, :], tl.exp(b_z - b_new_max[:, None]), 0.0)
        b_sum = b_sum * tl.exp(b_max - b_new_max) + tl.sum(b_exp, 1)
        b_max = b_new_max
        b_z_sum += tl.sum(tl.where(m_v[None, :], b_z, 0.0), 1)
        b_z_target += tl.sum(tl.where(o_v[None, :] == b_target[:, None], b_z, 0.0), 1)
    b_lse = b_max + tl.log(b_sum)
    b_loss = b_lse - b_z_target
    if HAS_SMOOTHING:  # (1 - eps) (lse - z_target) + eps (lse - mean_c z_c)
        b_eps = tl.load(p_smoothing)
        b_loss = (1.0 - b_eps) * b_loss + b_eps * (b_lse - b_z_sum / V)
    else:
        b_eps = 0.0
    tl.store(p_loss + o_c, tl.where(m_valid, b_loss, 0.0), mask=m_c)

    if WRITE_GRAD:
        if HAS_SCALE:
            b_scale = tl.load(p_scale + o_c, mask=m_c, other=0.0).to(ACC_DTYPE)
        else:
            b_scale = tl.full([BLOCK_C], 1.0, ACC_DTYPE)
        for v in range(0, V, BLOCK_V):
            o_v = v + tl.arange(0, BLOCK_V)
            m = m_c[:, None] & (o_v < V)[None, :]
            b_z = tl.load(p_logits + o_row + o_v[None, :], mask=m, other=0.0).to(ACC_DTYPE)
            b_q = tl.where(o_v[None, :] == b_target[:, None], 1.0 - b_eps, 0.0) + b_eps / V
            b_grad = (tl.exp(b_z - b_lse[:, None]) - b_q) * b_scale[:, None]
            b_grad = tl.where(m_valid[:, None], b_grad, 0.0)  # exactly 0, even for an inf or NaN scale
            tl.store(p_logits + o_row + o_v[None, :], b_grad.to(p_logits.dtype.element_ty), mask=m)


def _blocks(V: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_V, num_warps). On a GPU one row a program (a chunk has hundreds of rows: enough
    programs) and 4096-wide tiles: 64 registers, no spill on sm_90 (compiled offline; not yet timed).
    Rows a program cost registers (per-row accumulators: 2 rows 76, 4 rows 98-152). The interpreter
    pays per operation, not per element: large 2-D tiles there."""
    if device.type == "cuda":
        block_v = min(triton.next_power_of_2(V), 4096)
        return 1, block_v, 8 if block_v >= 2048 else 4
    return 16, min(triton.next_power_of_2(V), 4096), 4


def cross_entropy_chunk(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                        label_smoothing: float = 0.0, grad_scale: torch.Tensor | None = None,
                        write_grad: bool = False) -> torch.Tensor:
    """Per-row softmax cross-entropy of `logits` [C, V] against `target` [C] (int64).

    Returns the loss [C] in float32 (float64 for float64 logits), 0 where target == ignore_index.
    With write_grad, overwrites logits with dL/dlogits of the summed loss, each row times
    grad_scale[r] ([C], optional). Targets must already be checked to lie in [0, V) or be ignored.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a [C, V] tensor with unit column stride, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    C, V = logits.shape
    if target.shape != (C,) or target.dtype != torch.int64 or target.device != logits.device:
        raise ValueError(f"target must be a [{C}] int64 tensor on {logits.device}")
    if grad_scale is not None:
        if grad_scale.shape != (C,) or grad_scale.device != logits.device:
            raise ValueError(f"grad_scale must be a [{C}] tensor on {logits.device}")
        grad_scale = grad_scale.contiguous()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = _empty((C,), logits, acc)
    smoothing = torch.full((1,), label_smoothing, dtype=acc, device=logits.device) if label_smoothing else None
    if C == 0 or V == 0:  # no class: every row is ignored (targets were checked), loss 0, nothing to write
        return loss.zero_()
    block_c, block_v, num_warps = _blocks(V, logits.device)
    with torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext():
        cross_entropy_kernel[(triton.cdiv(C, block_c),)](
            logits, target.contiguous(), grad_scale, smoothing, loss, C, V, logits.stride(0), ignore_index,
            BLOCK_C=block_c, BLOCK_V=block_v, WRITE_GRAD=write_grad, ACC_DTYPE=_ACC.get(logits.dtype, tl.float32),
            num_warps=num_warps)
    return loss
