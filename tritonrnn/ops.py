"""The recurrence as torch.library custom ops, with fake (meta) implementations and autograd.

Dimensions: T steps, B batch, H hidden. The ops cover only the sequential part; the input
projection before it and the parameter-gradient GEMMs after it are large matmuls over all T*B rows.

    tritonrnn::recurrence(xw, h0, w_hh, ...)               -> out [T, B, H], h_n [B, H]
    tritonrnn::recurrence_backward(grad_out, grad_hn, ...) -> dxw [T, B, H], dh0 [B, H], dw_hh [H, H]

Opaque custom ops keep torch.compile(fullgraph=True) tracing through the layers without a break.
"""
import warnings
from typing import Optional

import torch
from torch import Tensor

from tritonrnn import kernels, reference

DOUBLE_BACKWARD_WARNING = (
    "tritonrnn: double backward (create_graph=True) runs a differentiable PyTorch BPTT "
    "(tritonrnn.reference.recurrence_backward), one small op per step, not the fused kernel."
)


def _walk_ends(lengths: Optional[Tensor], T: int, B: int, reverse: bool, device) -> tuple[Tensor, Tensor]:
    """Per row, the time index of its first and of its last step in walk order."""
    if lengths is None:
        lengths = torch.full((B,), T, device=device, dtype=torch.long)
    lengths = lengths.to(device=device, dtype=torch.long)
    zeros = torch.zeros_like(lengths)
    return (lengths - 1, zeros) if reverse else (zeros, lengths - 1)


@torch.library.custom_op("tritonrnn::recurrence", mutates_args=())
def recurrence(xw: Tensor, h0: Tensor, w_hh: Tensor, lengths: Optional[Tensor], reverse: bool,
               relu: bool, path: str, backward_path: str, allow_tf32: bool) -> tuple[Tensor, Tensor]:
    """h_t = act(xw_t + h_{t-1} W_hh^T) for all t; see tritonrnn.kernels.recurrence_forward."""
    return kernels.recurrence_forward(xw, h0, w_hh, lengths=lengths, reverse=reverse, relu=relu,
                                      path=path, allow_tf32=allow_tf32)


@recurrence.register_fake
def _(xw, h0, w_hh, lengths, reverse, relu, path, backward_path, allow_tf32):
    return torch.empty_like(xw), torch.empty_like(h0)


def _fold_final_grad(grad_out: Tensor, grad_hn: Tensor, lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """dL/dh_t with dL/dh_n added at each row's last step (where h_n was taken)."""
    T, B, _ = grad_out.shape
    _, last = _walk_ends(lengths, T, B, reverse, grad_out.device)
    grad = grad_out.clone()
    grad.index_put_((last, torch.arange(B, device=grad.device)), grad_hn, accumulate=True)
    return grad


def _state_grads(dz: Tensor, out: Tensor, h0: Tensor, w_hh: Tensor, lengths: Optional[Tensor],
                 reverse: bool) -> tuple[Tensor, Tensor]:
    """dh0 and dW_hh from the kernel's dz: GEMMs over all steps."""
    T, B, H = out.shape
    first, _ = _walk_ends(lengths, T, B, reverse, out.device)
    dz_first = dz[first, torch.arange(B, device=out.device)]  # dz of each row's first step: the one that read h0
    dh0 = dz_first @ w_hh
    # dW_hh = sum_t dz_t^T h_{t-1}: h_{t-1} is the neighbouring output in walk order, h0 at the
    # first step (padding outputs are 0, so steps that start after padding add nothing there).
    if reverse:
        dz_body, h_prev = dz[:-1], out[1:]
    else:
        dz_body, h_prev = dz[1:], out[:-1]
    dw_hh = dz_first.T @ h0
    if T > 1:
        dw_hh = dw_hh + dz_body.reshape(-1, H).T @ h_prev.reshape(-1, H)
    return dh0, dw_hh


@torch.library.custom_op("tritonrnn::recurrence_backward", mutates_args=())
def recurrence_backward(grad_out: Tensor, grad_hn: Tensor, out: Tensor, h0: Tensor, w_hh: Tensor,
                        lengths: Optional[Tensor], reverse: bool, relu: bool, path: str,
                        allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """BPTT of `recurrence`: the fused backward kernel, then dh0 and dW_hh as GEMMs."""
    dz = kernels.recurrence_backward(_fold_final_grad(grad_out, grad_hn, lengths, reverse), out, w_hh,
                                     lengths=lengths, reverse=reverse, relu=relu, path=path, allow_tf32=allow_tf32)
    return dz, *_state_grads(dz, out, h0, w_hh, lengths, reverse)


@recurrence_backward.register_fake
def _(grad_out, grad_hn, out, h0, w_hh, lengths, reverse, relu, path, allow_tf32):
    return torch.empty_like(out), torch.empty_like(h0), torch.empty_like(w_hh)


def _setup_context(ctx, inputs, output):
    xw, h0, w_hh, lengths, reverse, relu, path, backward_path, allow_tf32 = inputs
    out, _ = output
    ctx.save_for_backward(out, h0, w_hh, lengths)
    ctx.flags = (reverse, relu, backward_path, allow_tf32)


def _saved(ctx, grad_out, grad_hn) -> tuple:
    """The forward's saved out, h0, w_hh, lengths, and the incoming gradients (None: zeros)."""
    out, h0, w_hh, lengths = ctx.saved_tensors
    return (out, h0, w_hh, lengths, torch.zeros_like(out) if grad_out is None else grad_out,
            torch.zeros_like(h0) if grad_hn is None else grad_hn)


def _double_backward() -> bool:
    """create_graph=True: the gradient must itself be differentiable (PyTorch's BPTT, with a warning)."""
    if torch.is_grad_enabled():
        warnings.warn(DOUBLE_BACKWARD_WARNING, stacklevel=3)
    return torch.is_grad_enabled()


def _backward(ctx, grad_out, grad_hn):
    out, h0, w_hh, lengths, grad_out, grad_hn = _saved(ctx, grad_out, grad_hn)
    if _double_backward():
        reverse, relu = ctx.flags[:2]
        dxw, dh0, dw_hh = reference.recurrence_backward(out, h0, w_hh, grad_out, grad_hn,
                                                        "relu" if relu else "tanh", lengths, reverse)
    else:
        dxw, dh0, dw_hh = recurrence_backward(grad_out, grad_hn, out, h0, w_hh, lengths, *ctx.flags)
    return dxw, dh0, dw_hh, None, None, None, None, None, None


recurrence.register_autograd(_backward, setup_context=_setup_context)


# Both directions of a bidirectional layer in one launch of the persistent kernel: tensors stacked
# [2, ...], direction 0 forward in time, direction 1 reverse.
REVERSE_OF = (False, True)


@torch.library.custom_op("tritonrnn::bidirectional_recurrence", mutates_args=())
def bidirectional_recurrence(xw: Tensor, h0: Tensor, w_hh: Tensor, lengths: Optional[Tensor], relu: bool,
                             allow_tf32: bool) -> tuple[Tensor, Tensor]:
    """`recurrence` of both directions at once; see tritonrnn.kernels.bidirectional_forward."""
    return kernels.bidirectional_forward(xw, h0, w_hh, lengths=lengths, relu=relu, allow_tf32=allow_tf32)


@bidirectional_recurrence.register_fake
def _(xw, h0, w_hh, lengths, relu, allow_tf32):
    return torch.empty_like(xw), torch.empty_like(h0)


@torch.library.custom_op("tritonrnn::bidirectional_recurrence_backward", mutates_args=())
def bidirectional_recurrence_backward(grad_out: Tensor, grad_hn: Tensor, out: Tensor, h0: Tensor, w_hh: Tensor,
                                      lengths: Optional[Tensor], relu: bool,
                                      allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """BPTT of `bidirectional_recurrence`: one launch of the fused backward kernel for both
    directions, then dh0 and dW_hh of each as GEMMs."""
    grad = torch.stack([_fold_final_grad(grad_out[d], grad_hn[d], lengths, REVERSE_OF[d]) for d in range(2)])
    dz = kernels.bidirectional_backward(grad, out, w_hh, lengths=lengths, relu=relu, allow_tf32=allow_tf32)
    dh0, dw_hh = zip(*(_state_grads(dz[d], out[d], h0[d], w_hh[d], lengths, REVERSE_OF[d]) for d in range(2)),
                     strict=True)
    return dz, torch.stack(dh0), torch.stack(dw_hh)


@bidirectional_recurrence_backward.register_fake
def _(grad_out, grad_hn, out, h0, w_hh, lengths, relu, allow_tf32):
    return torch.empty_like(out), torch.empty_like(h0), torch.empty_like(w_hh)


def _setup_bidirectional_context(ctx, inputs, output):
    xw, h0, w_hh, lengths, relu, allow_tf32 = inputs
    ctx.save_for_backward(output[0], h0, w_hh, lengths)
    ctx.flags = (relu, allow_tf32)


def _bidirectional_backward(ctx, grad_out, grad_hn):
    out, h0, w_hh, lengths, grad_out, grad_hn = _saved(ctx, grad_out, grad_hn)
    if _double_backward():
        nonlinearity = "relu" if ctx.flags[0] else "tanh"
        grads = [reference.recurrence_backward(out[d], h0[d], w_hh[d], grad_out[d], grad_hn[d], nonlinearity,
                                               lengths, REVERSE_OF[d]) for d in range(2)]
        dxw, dh0, dw_hh = (torch.stack(g) for g in zip(*grads, strict=True))
    else:
        dxw, dh0, dw_hh = bidirectional_recurrence_backward(grad_out, grad_hn, out, h0, w_hh, lengths, *ctx.flags)
    return dxw, dh0, dw_hh, None, None, None


bidirectional_recurrence.register_autograd(_bidirectional_backward, setup_context=_setup_bidirectional_context)
