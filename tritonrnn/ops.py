"""The recurrence as torch.library custom ops, with fake (meta) implementations and autograd.

Dimensions: T steps, B batch, H hidden. The ops cover only the sequential part; the input
projection before it and the parameter-gradient GEMMs after it are large matmuls over all T*B rows.

    tritonrnn::recurrence(xw, h0, w_hh, ...)               -> out [T, B, H], h_n [B, H]
    tritonrnn::recurrence_backward(grad_out, grad_hn, ...) -> dxw [T, B, H], dh0 [B, H], dw_hh [H, H]
    tritonrnn::bidirectional_recurrence(_backward): the same for both directions of a layer, stacked
        [2, ...] (one launch for both on the persistent path)

Opaque custom ops keep torch.compile(fullgraph=True) tracing through the layers without a break.
The kernel path and its config (dispatch.launch_choice: tuned configs per GPU, else the cost model)
are chosen inside the ops when they run, never in traced code: tracing queries no device and reads
no file, on a GPU as on the CPU.
"""
import warnings
from typing import Optional

import torch
from torch import Tensor

from tritonrnn import dispatch, kernels, numerics, reference

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


def _launch(sequence: Tensor, direction: str, allow_tf32: bool, directions: int = 1) -> dict:
    """The launcher's keyword arguments for this [T, B, H] recurrence on this device, chosen at run
    time (`directions` = 2: both directions of a layer in one launch; dispatch.launch_choice): its
    path, and its config where one was chosen (else the launcher's own)."""
    T, B, H = sequence.shape[-3:]
    if B == 0:  # no rows, nothing to compute or to choose for: every launcher returns empty outputs at once
        return {"path": "stepwise"}
    choice = dispatch.launch_choice(T, H, sequence.dtype, B, sequence.device, direction, allow_tf32, directions)
    return {k: v for k, v in choice.items() if v is not None}


def _contiguous_like(tensor: Tensor) -> Tensor:
    """A fake output: the real ops return contiguous tensors whatever the inputs' strides."""
    return tensor.new_empty(tensor.shape)


@torch.library.custom_op("tritonrnn::recurrence", mutates_args=())
@numerics.quiet_interpreter
def recurrence(xw: Tensor, h0: Tensor, w_hh: Tensor, lengths: Optional[Tensor], reverse: bool,
               relu: bool, allow_tf32: bool) -> tuple[Tensor, Tensor]:
    """h_t = act(xw_t + h_{t-1} W_hh^T) for all t; see tritonrnn.kernels.recurrence_forward."""
    return kernels.recurrence_forward(xw, h0, w_hh, lengths=lengths, reverse=reverse, relu=relu,
                                      allow_tf32=allow_tf32, **_launch(xw, "forward", allow_tf32))


@recurrence.register_fake
def _(xw, h0, w_hh, lengths, reverse, relu, allow_tf32):
    return _contiguous_like(xw), _contiguous_like(h0)


@torch.library.custom_op("tritonrnn::recurrence_backward", mutates_args=())
@numerics.quiet_interpreter
def recurrence_backward(grad_out: Tensor, grad_hn: Tensor, out: Tensor, h0: Tensor, w_hh: Tensor,
                        lengths: Optional[Tensor], reverse: bool, relu: bool,
                        allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """BPTT of `recurrence`: the fused backward kernel, then dh0 and dW_hh as GEMMs."""
    dz = kernels.recurrence_backward(_fold_final_grad(grad_out, grad_hn, lengths, reverse), out, w_hh,
                                     lengths=lengths, reverse=reverse, relu=relu, allow_tf32=allow_tf32,
                                     **_launch(out, "backward", allow_tf32))
    return dz, *_state_grads(dz, out, h0, w_hh, lengths, reverse)


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


@recurrence_backward.register_fake
def _(grad_out, grad_hn, out, h0, w_hh, lengths, reverse, relu, allow_tf32):
    return _contiguous_like(out), _contiguous_like(h0), _contiguous_like(w_hh)


def _setup_context(ctx, inputs, output):
    xw, h0, w_hh, lengths, reverse, relu, allow_tf32 = inputs
    out, _ = output
    ctx.save_for_backward(out, h0, w_hh, lengths)
    ctx.flags = (reverse, relu, allow_tf32)


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
    return dxw, dh0, dw_hh, None, None, None, None


recurrence.register_autograd(_backward, setup_context=_setup_context)


# Both directions of a bidirectional layer: tensors stacked [2, ...], direction 0 forward in time,
# direction 1 reverse. The kernel path is chosen here, at run time: on the persistent and cluster
# paths both directions run in one launch, on the others one launch (or T) per direction.
REVERSE_OF = (False, True)
GROUPED = ("persistent", "cluster")  # the persistent kernel's layouts: both directions in one launch


@torch.library.custom_op("tritonrnn::bidirectional_recurrence", mutates_args=())
@numerics.quiet_interpreter
def bidirectional_recurrence(xw: Tensor, h0: Tensor, w_hh: Tensor, lengths: Optional[Tensor], relu: bool,
                             allow_tf32: bool) -> tuple[Tensor, Tensor]:
    """`recurrence` of both directions at once: xw [2, T, B, H], h0 [2, B, H], w_hh [2, H, H]."""
    both = _launch(xw, "forward", allow_tf32, directions=2)
    if both["path"] in GROUPED:
        return kernels.bidirectional_forward(xw, h0, w_hh, lengths=lengths, relu=relu, allow_tf32=allow_tf32, **both)
    one = _launch(xw, "forward", allow_tf32)  # where both directions' programs are not resident at once: one each
    outputs = [kernels.recurrence_forward(xw[d], h0[d], w_hh[d], lengths=lengths, reverse=REVERSE_OF[d], relu=relu,
                                          allow_tf32=allow_tf32, **one) for d in range(2)]
    return tuple(torch.stack(o) for o in zip(*outputs, strict=True))


@bidirectional_recurrence.register_fake
def _(xw, h0, w_hh, lengths, relu, allow_tf32):
    return _contiguous_like(xw), _contiguous_like(h0)


@torch.library.custom_op("tritonrnn::bidirectional_recurrence_backward", mutates_args=())
@numerics.quiet_interpreter
def bidirectional_recurrence_backward(grad_out: Tensor, grad_hn: Tensor, out: Tensor, h0: Tensor, w_hh: Tensor,
                                      lengths: Optional[Tensor], relu: bool,
                                      allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """BPTT of `bidirectional_recurrence`: the fused backward kernel for both directions (one
    launch on the persistent path), then dh0 and dW_hh of each as GEMMs."""
    grad = torch.stack([_fold_final_grad(grad_out[d], grad_hn[d], lengths, REVERSE_OF[d]) for d in range(2)])
    both = _launch(out, "backward", allow_tf32, directions=2)
    if both["path"] in GROUPED:
        dz = kernels.bidirectional_backward(grad, out, w_hh, lengths=lengths, relu=relu, allow_tf32=allow_tf32, **both)
    else:
        one = _launch(out, "backward", allow_tf32)
        dz = torch.stack([kernels.recurrence_backward(grad[d], out[d], w_hh[d], lengths=lengths, reverse=REVERSE_OF[d],
                                                      relu=relu, allow_tf32=allow_tf32, **one) for d in range(2)])
    dh0, dw_hh = zip(*(_state_grads(dz[d], out[d], h0[d], w_hh[d], lengths, REVERSE_OF[d]) for d in range(2)),
                     strict=True)
    return dz, torch.stack(dh0), torch.stack(dw_hh)


@bidirectional_recurrence_backward.register_fake
def _(grad_out, grad_hn, out, h0, w_hh, lengths, relu, allow_tf32):
    return _contiguous_like(out), _contiguous_like(h0), _contiguous_like(w_hh)


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

# torch.func transforms (grad, vmap, per-sample gradients: vmap(grad(loss)) with functional_call).
# torch.func refuses a custom op's own autograd (register_autograd: pytorch/pytorch#168393), so under
# its transforms the layers call the op through an autograd.Function with the same setup_context and
# backward; its vmap rule is generated from the ops' vmap rules below.

class _Recurrence(torch.autograd.Function):
    generate_vmap_rule = True
    setup_context = staticmethod(_setup_context)

    @staticmethod
    def forward(*args):
        return recurrence(*args)

    @staticmethod
    def backward(ctx, grad_out, grad_hn):
        # torch.func.grad runs every backward with create_graph=True, so that grad can nest: the
        # fused backward unless a second grad (or jvp) transform really differentiates this one.
        with torch.set_grad_enabled(_gradient_is_differentiated()):
            return _backward(ctx, grad_out, grad_hn)


def recurrence_any_transform(*args) -> tuple[Tensor, Tensor]:
    """`recurrence`, also under torch.func transforms (same arguments)."""
    if torch._C._are_functorch_transforms_active():
        return _Recurrence.apply(*args)
    return recurrence(*args)


def _gradient_is_differentiated() -> bool:
    """Under torch.func transforms: whether more than one grad or jvp level is active."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    levels = [interpreter.key() for interpreter in retrieve_all_functorch_interpreters()]
    return torch.is_grad_enabled() and sum(key in (TransformType.Grad, TransformType.Jvp) for key in levels) > 1


# vmap rules. The batch is already a dimension of the kernels, so a vmapped dimension of N samples of
# B rows becomes one batch of N*B rows (sample-major), run once and split back. Only a per-sample W_hh
# (vmap over the parameters, as for model ensembles) cannot share the kernel's W_hh: then one call per
# sample. The non-tensor arguments after `lengths` (direction, activation, settings) pass through.

def _fold(tensor: Optional[Tensor], dim: Optional[int], n: int, axis: int) -> Optional[Tensor]:
    """Merge the vmapped dimension `dim` (None: the same tensor for every sample) into the batch axis."""
    if tensor is None:
        return None
    if dim is None:
        tensor = tensor.unsqueeze(axis).expand(*tensor.shape[:axis], n, *tensor.shape[axis:])
    else:
        tensor = tensor.movedim(dim, axis)
    return tensor.flatten(axis, axis + 1)


def _per_sample(op, n: int, in_dims, args) -> tuple:
    """One op call per sample, stacked along dim 0."""
    calls = [op(*(arg if dim is None else arg.select(dim, i) for arg, dim in zip(args, in_dims, strict=True)))
             for i in range(n)]
    return tuple(torch.stack(outputs) for outputs in zip(*calls, strict=True)), (0,) * len(calls[0])


@recurrence.register_vmap
def _(info, in_dims, xw, h0, w_hh, lengths, *flags):
    n = info.batch_size
    if in_dims[2] is not None:
        return _per_sample(recurrence, n, in_dims, (xw, h0, w_hh, lengths, *flags))
    out, h_n = recurrence(_fold(xw, in_dims[0], n, 1), _fold(h0, in_dims[1], n, 0), w_hh,
                          _fold(lengths, in_dims[3], n, 0), *flags)
    return (out.unflatten(1, (n, -1)), h_n.unflatten(0, (n, -1))), (1, 0)


@recurrence_backward.register_vmap
def _(info, in_dims, grad_out, grad_hn, out, h0, w_hh, lengths, reverse, *flags):
    n = info.batch_size
    if in_dims[4] is not None:
        args = (grad_out, grad_hn, out, h0, w_hh, lengths, reverse, *flags)
        return _per_sample(recurrence_backward, n, in_dims, args)
    out, h0, lengths = _fold(out, in_dims[2], n, 1), _fold(h0, in_dims[3], n, 0), _fold(lengths, in_dims[5], n, 0)
    dz, dh0, _ = recurrence_backward(_fold(grad_out, in_dims[0], n, 1), _fold(grad_hn, in_dims[1], n, 0), out, h0,
                                     w_hh, lengths, reverse, *flags)
    # The op's dW_hh sums over all N*B rows; each sample needs its own: sum over t and its rows of
    # dz_t^T h_{t-1}, where h_{t-1} is the neighbouring output in walk order and h0 at a row's first step.
    T, B, H = out.shape
    first, _ = _walk_ends(lengths, T, B, reverse, out.device)
    h_prev = torch.cat([out[1:], torch.zeros_like(out[:1])]) if reverse else torch.cat([h0[None], out[:-1]])
    h_prev = h_prev.index_put((first, torch.arange(B, device=out.device)), h0)
    dw_hh = torch.einsum("tnbi,tnbj->nij", dz.unflatten(1, (n, -1)), h_prev.unflatten(1, (n, -1)))
    return (dz.unflatten(1, (n, -1)), dh0.unflatten(0, (n, -1)), dw_hh), (1, 0, 0)
