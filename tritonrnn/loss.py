"""The output layer and its loss, fused: cross_entropy(h @ weight.T + bias, target) over row chunks.

Dimensions: N rows (T*B: every step of every sequence), H hidden, V classes (vocabulary), C rows
of a chunk.

    linear_cross_entropy(h [N, H], weight [V, H], bias [V], target [N]) -> loss

Only [C, V] logits exist at a time. Per chunk: the logits (torch GEMM, bias fused), then the
Triton kernel (kernels/output.py: online softmax, the loss, and dL/dlogits written over the
logits), then dh = dlogits @ weight, dW += dlogits^T @ h, db += sum dlogits (torch GEMMs into the
gradient buffers). The gradients are computed in the forward, when one is required, so the
backward only scales them by grad_output: no second pass over the logits. With reduction="none"
grad_output has one value per row, unknown in the forward, so there the forward computes the loss
only and the backward runs the chunked pass again with grad_output as the per-row scale.

Opaque torch.library custom ops (tritonrnn::linear_cross_entropy and its "none" backward) keep
torch.compile(fullgraph=True) tracing through.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tritonrnn.dispatch import backend
from tritonrnn.kernels import output
from tritonrnn.numerics import autocast, quiet_interpreter, torch_type_name

REDUCTIONS = ("mean", "sum", "none")
MIN_CHUNK_ROWS = 256


def default_chunk_size(N: int, V: int, H: int) -> int:
    """Rows per chunk: the chunk's logits about as large as h itself ([N, H]; Liger-Kernel's rule),
    and at least MIN_CHUNK_ROWS rows so the GEMMs stay large."""
    return max(1, min(N, max(MIN_CHUNK_ROWS, math.ceil(N / max(1, math.ceil(V / max(H, 1)))))))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunked(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
             label_smoothing: float, grad_scale: Optional[Tensor], compute_grad: bool,
             chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses [N] (float32, float64 for float64) and, with compute_grad, the gradients of
    sum_r grad_scale[r] * loss_r (grad_scale None: 1) for h, weight and bias; empty tensors otherwise."""
    N, H = h.shape
    V = weight.shape[0]
    acc = _acc_dtype(h.dtype)
    dh = h.new_empty(h.shape) if compute_grad else h.new_empty(0)  # distinct empties: op outputs may not alias
    dw = torch.zeros(V, H, dtype=acc, device=h.device) if compute_grad else h.new_empty(0)
    db = torch.zeros(V, dtype=acc, device=h.device) if compute_grad and bias is not None else h.new_empty(0)
    logits = h.new_empty(min(chunk_size, N), V)  # the only [C, V] buffer: reused by every chunk
    losses = []
    for start in range(0, N, chunk_size):
        rows = slice(start, min(start + chunk_size, N))
        h_c = h[rows]
        z = logits[:h_c.shape[0]]
        if bias is None:
            torch.mm(h_c, weight.T, out=z)
        else:
            torch.addmm(bias, h_c, weight.T, out=z)
        scale = None if grad_scale is None else grad_scale[rows]
        losses.append(output.cross_entropy_chunk(z, target[rows], ignore_index=ignore_index,
                                                 label_smoothing=label_smoothing, grad_scale=scale,
                                                 write_grad=compute_grad))
        if compute_grad:  # z now holds dL/dlogits of the chunk
            torch.mm(z, weight, out=dh[rows])
            if acc == z.dtype:
                dw.addmm_(z.T, h_c)
            else:  # fp16/bf16 products, accumulated over the chunks in fp32
                dw += z.T @ h_c
            if bias is not None:
                db += z.sum(0, dtype=acc)
    loss = torch.cat(losses) if losses else torch.zeros(0, dtype=acc, device=h.device)
    return loss, dh, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else db


def _check_targets(target: Tensor, V: int, ignore_index: int) -> None:
    # Data-dependent (one device sync), so inside the op: torch's CPU error for the same input.
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


def _n_valid(target: Tensor, ignore_index: int) -> Tensor:
    return (target != ignore_index).sum()


@torch.library.custom_op("tritonrnn::linear_cross_entropy", mutates_args=())
@quiet_interpreter
def linear_cross_entropy_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                            reduction: str, label_smoothing: float, compute_grad: bool,
                            chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss (reduced) and, with compute_grad and reduction mean/sum, the gradients of the loss
    for h, weight and bias (else empty tensors)."""
    _check_targets(target, weight.shape[0], ignore_index)
    compute_grad = compute_grad and reduction != "none"
    n_valid = _n_valid(target, ignore_index)
    scale = None
    if compute_grad and reduction == "mean":  # 1 / n_valid per row; 1 / 1 when every row is ignored (grads 0)
        scale = n_valid.clamp(min=1).to(_acc_dtype(h.dtype)).reciprocal().expand(h.shape[0]).contiguous()
    loss, dh, dw, db = _chunked(h, weight, bias, target, ignore_index, label_smoothing, scale, compute_grad,
                                chunk_size)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / n_valid  # NaN when every row is ignored, as torch
    return loss.to(h.dtype), dh, dw, db


@linear_cross_entropy_op.register_fake
def _(h, weight, bias, target, ignore_index, reduction, label_smoothing, compute_grad, chunk_size):
    grads = compute_grad and reduction != "none"
    loss = h.new_empty(h.shape[0]) if reduction == "none" else h.new_empty(())
    return (loss, h.new_empty(h.shape) if grads else h.new_empty(0),
            weight.new_empty(weight.shape) if grads else h.new_empty(0),
            bias.new_empty(bias.shape) if grads and bias is not None else h.new_empty(0))


@torch.library.custom_op("tritonrnn::linear_cross_entropy_backward", mutates_args=())
@quiet_interpreter
def linear_cross_entropy_backward(grad_loss: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  target: Tensor, ignore_index: int, label_smoothing: float,
                                  chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_r grad_loss[r] * loss_r (reduction "none"): the chunked pass with per-row scales."""
    _, dh, dw, db = _chunked(h, weight, bias, target, ignore_index, label_smoothing, grad_loss, True,
                             chunk_size)
    return dh, dw, db


@linear_cross_entropy_backward.register_fake
def _(grad_loss, h, weight, bias, target, ignore_index, label_smoothing, chunk_size):
    return (h.new_empty(h.shape), weight.new_empty(weight.shape),
            h.new_empty(0) if bias is None else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output):
    h, weight, bias, target, ignore_index, reduction, label_smoothing, compute_grad, chunk_size = inputs
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.has_bias = bias is not None
    ctx.reduction = reduction
    if reduction == "none":
        ctx.save_for_backward(h, weight, bias, target)
        ctx.args = (ignore_index, label_smoothing, chunk_size)
    else:
        ctx.save_for_backward(dh, dw, db)


def _backward(ctx, grad_loss, *unused):
    if torch.is_grad_enabled():
        raise RuntimeError("tritonrnn.functional.linear_cross_entropy: double backward (create_graph=True) is not "
                           "supported; use F.cross_entropy(F.linear(...)) for higher-order gradients")
    if ctx.reduction == "none":
        h, weight, bias, target = ctx.saved_tensors
        dh, dw, db = linear_cross_entropy_backward(grad_loss, h, weight, bias, target, *ctx.args)
    else:
        dh, dw, db = ctx.saved_tensors
        if dh.numel() == 0 and dw.numel() == 0:
            raise RuntimeError("tritonrnn.functional.linear_cross_entropy: the forward ran without gradients "
                               "(compute_grad=False)")
        dh, dw, db = dh * grad_loss, dw * grad_loss, db * grad_loss
    return dh, dw, db if ctx.has_bias else None, None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _fused_takes(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor) -> bool:
    """Whether the chunked path takes these arguments: h [N, H] (or one row [H] with a 0-d target) and
    weight [V, H] of one dtype, a bias of V values (or one), class-index targets (not class probabilities,
    a [N, V] target). Anything else is left to F.cross_entropy(F.linear(...)) itself: it raises torch's
    errors (F.linear's fail before computing anything) or computes what torch computes (a per-row bias,
    class probabilities: tensors as large as the logits anyway)."""
    V = weight.shape[0] if weight.dim() == 2 else -1
    return (h.dim() in (1, 2) and weight.dim() == 2 and h.shape[-1] == weight.shape[1] and h.dtype == weight.dtype
            and (bias is None or (bias.dtype == weight.dtype and bias.dim() <= 1 and bias.numel() in (1, V)))
            and (target.dim() == 0 if h.dim() == 1 else target.shape != (h.shape[0], V)))


def _check_args(h: Tensor, target: Tensor, reduction: str, label_smoothing: float) -> None:
    # The cross-entropy's errors on the CPU, in torch's order, for [N, V] logits and a class-index target.
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    batch = target.shape[0] if target.dim() else 0
    if batch != h.shape[0]:
        raise ValueError(f"Expected input batch_size ({h.shape[0]}) to match target batch_size ({batch}).")
    if target.dim() > 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {torch_type_name(target.dtype)}")


def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, *,
                         chunk_size: Optional[int] = None) -> Tensor:
    """F.cross_entropy(F.linear(h, weight, bias), target, ...) without holding all N x V logits.

    Args:
        h: [N, H] rows (e.g. an RNN's output reshaped to [T*B, H]), or one row [H].
        weight: [V, H]. bias: [V] (or broadcastable to it), or None.
        target: [N] (or []) class indices in [0, V), int64 or uint8; rows equal to ignore_index
            contribute no loss and no gradient ("mean" divides by the rows not ignored: NaN if none).
        reduction: "mean", "sum" or "none" ([N] per-row losses). label_smoothing: at most 1 (as torch,
            a value not above 0, NaN included, means none).
        chunk_size: rows per chunk (default: default_chunk_size(N, V, H)). Peak extra memory is
            chunk_size x V logits plus the gradients, independent of N x V.
    Returns:
        The loss, in h's dtype (float32 under autocast, as torch's cross_entropy).

    On CUDA (and on the CPU under TRITON_INTERPRET=1) it runs the chunked Triton path; elsewhere, and
    under ONNX export (which translates it to ONNX's own cross-entropy), F.cross_entropy(F.linear(...))
    itself, and so for what torch accepts beyond the chunked path's arguments: class probabilities as
    target ([N, V], floating), a per-row bias [N, V], one row h [H] with a 1-D target. Errors are torch's
    for the same arguments (an out-of-range target raises IndexError on every device: checking costs one
    device sync).
    """
    if backend(h.device) == "torch" or torch.onnx.is_in_onnx_export():  # ONNX has its own: both exporters
        return F.cross_entropy(F.linear(h, weight, bias), target, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    if h.dim() > 2:
        raise ValueError(f"linear_cross_entropy takes h of shape [N, H] (or [H]), got {tuple(h.shape)}: flatten "
                         f"time and batch first (h.reshape(-1, H), target.reshape(-1))")
    autocasting = torch.is_autocast_enabled(h.device.type)
    h, weight, bias = autocast(h.device.type, h, weight, bias)
    if not _fused_takes(h, weight, bias, target):
        return F.cross_entropy(F.linear(h, weight, bias), target, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    unbatched = h.dim() == 1
    if unbatched:
        h, target = h.unsqueeze(0), target.unsqueeze(0)
    label_smoothing = float(label_smoothing)
    _check_args(h, target, reduction, label_smoothing)
    label_smoothing = label_smoothing if label_smoothing > 0.0 else 0.0  # as torch: not > 0 (NaN too) is none
    N, H = h.shape
    V = weight.shape[0]
    if bias is not None:
        bias = bias.expand(V)  # F.linear broadcasts the bias; autograd sums its gradient back
    compute_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    chunk = default_chunk_size(N, V, H) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk}")
    loss, *_ = linear_cross_entropy_op(h, weight, bias, target.long(), ignore_index, reduction, label_smoothing,
                                       compute_grad, chunk)
    if unbatched and reduction == "none":
        loss = loss.squeeze(0)
    return loss.float() if autocasting else loss

