"""The recurrence as torch.library custom ops, with fake (meta) implementations, autograd and vmap rules.

Dimensions: D directions, T steps, B batch, H hidden. Every tensor of the ops has its directions
first: D = 1 (one direction; `reverse` walks it from T-1 down to 0) or D = 2 (both directions of a
bidirectional layer, direction 1 walking the other way: one launch for both on the persistent
kernel's layouts). The ops cover only the sequential part; the input projection before it and the
parameter-gradient GEMMs after it are large matmuls over all T*B rows.

    tritonrnn::recurrence(xw, h0, w_hh, ...)               -> out [D, T, B, H], h_n [D, B, H]
    tritonrnn::recurrence_backward(grad_out, grad_hn, ...) -> dxw [D, T, B, H], dh0 [D, B, H], dw_hh [D, H, H]

`cell` names the cell (tritonrnn.kernels.cells: "tanh" or "relu", the Elman nonlinearity).
Opaque custom ops keep torch.compile(fullgraph=True) tracing through the layers without a break.
The layout and its config (dispatch.choose: tuned configs per GPU, else the cost model) are chosen
inside the ops when they run, never in traced code: tracing queries no device and reads no file, on a
GPU as on the CPU. Where the device refuses the chosen layout, `_run` tells the dispatcher and runs
its next choice: the one fallback loop.
"""
import warnings
from typing import Optional

import torch
from torch import Tensor

from tritonrnn import dispatch, kernels, numerics, reference
from tritonrnn.kernels.occupancy import ClusterUnavailable, LaunchRefused

DOUBLE_BACKWARD_WARNING = (
    "tritonrnn: double backward (create_graph=True) runs a differentiable PyTorch BPTT "
    "(tritonrnn.reference.recurrence_backward), one small op per step, not the fused kernel."
)


def walk_ends(lengths: Optional[Tensor], T: int, B: int, reverse: bool, device) -> tuple[Tensor, Tensor]:
    """Per row, the time index of its first and of its last step in walk order."""
    if lengths is None:
        lengths = torch.full((B,), T, device=device, dtype=torch.long)
    lengths = lengths.to(device=device, dtype=torch.long)
    zeros = torch.zeros_like(lengths)
    return (lengths - 1, zeros) if reverse else (zeros, lengths - 1)


def _reverse_of(d: int, reverse: bool) -> bool:
    """Whether direction d walks from T-1 down to 0: direction 1 the other way than direction 0."""
    return reverse != (d == 1)


def _run(launcher, direction: str, first: Tensor, second: Tensor, w_hh: Tensor, lengths: Optional[Tensor],
         reverse: bool, cell: str, allow_tf32: bool):
    """launcher(first, second, w_hh, ...) (kernels.recurrence_forward or _backward) on the dispatcher's
    choice, for tensors with their directions first; its outputs, directions first. Both directions go to
    one launch where the choice runs them so, else one launch (or T) a direction. Where the device refuses
    the layout, the dispatcher is told (dispatch.refuse: it takes its next layout from then on, with one
    warning) and the next choice runs: the one fallback loop."""
    shape = dispatch.shape_of(first, direction, allow_tf32, cell)
    options = dict(lengths=lengths, cell=cell, allow_tf32=allow_tf32)
    if shape.batch == 0:  # no rows, nothing to compute or to choose for: every launcher returns empty outputs
        return _with_directions(launcher(_squeezed(first), _squeezed(second), _squeezed(w_hh), reverse=reverse,
                                         layout="stepwise", **options), first)
    while True:
        choice = dispatch.choose(shape, first.device)
        options.update(layout=choice.layout, config=choice.config)
        try:
            if choice.directions == shape.directions:
                return _with_directions(launcher(_squeezed(first), _squeezed(second), _squeezed(w_hh),
                                                 reverse=reverse, **options), first)
            results = [launcher(first[d], second[d], w_hh[d], reverse=_reverse_of(d, reverse), **options)
                       for d in range(shape.directions)]
            return tuple(torch.stack(r) for r in zip(*results)) if isinstance(results[0], tuple) else \
                torch.stack(results)
        except (LaunchRefused, ClusterUnavailable) as refusal:
            dispatch.refuse(choice, shape, first.device, refusal)


def _squeezed(tensor: Tensor) -> Tensor:
    """The launchers take one direction as [T, B, H] ([B, H], [H, H]) and two stacked."""
    return tensor[0] if tensor.shape[0] == 1 else tensor


def _with_directions(result, like: Tensor):
    """A launcher's outputs with their directions first, as `like` has them."""
    if like.shape[0] != 1:
        return result
    return tuple(r[None] for r in result) if isinstance(result, tuple) else result[None]


def _contiguous_like(tensor: Tensor) -> Tensor:
    """A fake output: the real ops return contiguous tensors whatever the inputs' strides."""
    return tensor.new_empty(tensor.shape)


@torch.library.custom_op("tritonrnn::recurrence", mutates_args=())
@numerics.quiet_interpreter
def recurrence(xw: Tensor, h0: Tensor, w_hh: Tensor, lengths: Optional[Tensor], reverse: bool, cell: str,
               allow_tf32: bool) -> tuple[Tensor, Tensor]:
    """h_t = act(xw_t + h_{t-1} W_hh^T) for all t and each direction: xw [D, T, B, H], h0 [D, B, H],
    w_hh [D, H, H]; see tritonrnn.kernels.recurrence_forward."""
    return _run(kernels.recurrence_forward, "forward", xw, h0, w_hh, lengths, reverse, cell, allow_tf32)


@recurrence.register_fake
def _(xw, h0, w_hh, lengths, reverse, cell, allow_tf32):
    return _contiguous_like(xw), _contiguous_like(h0)


@torch.library.custom_op("tritonrnn::recurrence_backward", mutates_args=())
@numerics.quiet_interpreter
def recurrence_backward(grad_out: Tensor, grad_hn: Tensor, out: Tensor, h0: Tensor, w_hh: Tensor,
                        lengths: Optional[Tensor], reverse: bool, cell: str,
                        allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """BPTT of `recurrence`: the fused backward kernel (both directions in one launch on the persistent
    kernel's layouts), then dh0 and dW_hh of each direction as GEMMs."""
    D = out.shape[0]
    grad = torch.stack([_fold_final_grad(grad_out[d], grad_hn[d], lengths, _reverse_of(d, reverse)) for d in range(D)])
    dz = _run(kernels.recurrence_backward, "backward", grad, out, w_hh, lengths, reverse, cell, allow_tf32)
    dh0, dw_hh = zip(*(_state_grads(dz[d], out[d], h0[d], w_hh[d], lengths, _reverse_of(d, reverse))
                       for d in range(D)), strict=True)
    return dz, torch.stack(dh0), torch.stack(dw_hh)


def _fold_final_grad(grad_out: Tensor, grad_hn: Tensor, lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """dL/dh_t with dL/dh_n added at each row's last step (where h_n was taken)."""
    T, B, _ = grad_out.shape
    _, last = walk_ends(lengths, T, B, reverse, grad_out.device)
    grad = grad_out.clone()
    grad.index_put_((last, torch.arange(B, device=grad.device)), grad_hn, accumulate=True)
    return grad


def previous_states(out: Tensor, h0: Tensor, lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """The state each step read, [T, B, H]: the neighbouring output in walk order, h0 at a row's first step."""
    T, B, _ = out.shape
    first, _ = walk_ends(lengths, T, B, reverse, out.device)
    h_prev = torch.cat([out[1:], torch.zeros_like(h0[None])] if reverse else [h0[None], out[:-1]])
    return h_prev.index_put((first, torch.arange(B, device=out.device)), h0)


def _state_grads(dz: Tensor, out: Tensor, h0: Tensor, w_hh: Tensor, lengths: Optional[Tensor],
                 reverse: bool) -> tuple[Tensor, Tensor]:
    """dh0 and dW_hh of one direction from the kernel's dz: GEMMs over all steps."""
    T, B, H = out.shape
    first, _ = walk_ends(lengths, T, B, reverse, out.device)
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
def _(grad_out, grad_hn, out, h0, w_hh, lengths, reverse, cell, allow_tf32):
    return _contiguous_like(out), _contiguous_like(h0), _contiguous_like(w_hh)


def _setup_context(ctx, inputs, output):
    xw, h0, w_hh, lengths, reverse, cell, allow_tf32 = inputs
    out, _ = output
    ctx.save_for_backward(out, h0, w_hh, lengths)
    ctx.flags = (reverse, cell, allow_tf32)


def _backward(ctx, grad_out, grad_hn):
    out, h0, w_hh, lengths = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_hn = torch.zeros_like(h0) if grad_hn is None else grad_hn
    if _double_backward():
        reverse, cell = ctx.flags[:2]
        grads = [reference.recurrence_backward(out[d], h0[d], w_hh[d], grad_out[d], grad_hn[d], cell, lengths,
                                               _reverse_of(d, reverse)) for d in range(out.shape[0])]
        dxw, dh0, dw_hh = (torch.stack(g) for g in zip(*grads, strict=True))
    else:
        dxw, dh0, dw_hh = recurrence_backward(grad_out, grad_hn, out, h0, w_hh, lengths, *ctx.flags)
    return dxw, dh0, dw_hh, None, None, None, None


def _double_backward() -> bool:
    """create_graph=True: the gradient must itself be differentiable (PyTorch's BPTT, with a warning)."""
    if torch.is_grad_enabled():
        warnings.warn(DOUBLE_BACKWARD_WARNING, stacklevel=3)
    return torch.is_grad_enabled()


recurrence.register_autograd(_backward, setup_context=_setup_context)

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
# sample. The non-tensor arguments after `lengths` (direction, cell, settings) pass through.
_SEQUENCE_BATCH = 2  # the batch axis of [D, T, B, H]
_STATE_BATCH = 1  # of [D, B, H]


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
    out, h_n = recurrence(_fold(xw, in_dims[0], n, _SEQUENCE_BATCH), _fold(h0, in_dims[1], n, _STATE_BATCH), w_hh,
                          _fold(lengths, in_dims[3], n, 0), *flags)
    return (out.unflatten(_SEQUENCE_BATCH, (n, -1)), h_n.unflatten(_STATE_BATCH, (n, -1))), (_SEQUENCE_BATCH,
                                                                                             _STATE_BATCH)


@recurrence_backward.register_vmap
def _(info, in_dims, grad_out, grad_hn, out, h0, w_hh, lengths, reverse, *flags):
    n = info.batch_size
    if in_dims[4] is not None:
        args = (grad_out, grad_hn, out, h0, w_hh, lengths, reverse, *flags)
        return _per_sample(recurrence_backward, n, in_dims, args)
    out = _fold(out, in_dims[2], n, _SEQUENCE_BATCH)
    h0, lengths = _fold(h0, in_dims[3], n, _STATE_BATCH), _fold(lengths, in_dims[5], n, 0)
    dz, dh0, _ = recurrence_backward(_fold(grad_out, in_dims[0], n, _SEQUENCE_BATCH),
                                     _fold(grad_hn, in_dims[1], n, _STATE_BATCH), out, h0, w_hh, lengths, reverse,
                                     *flags)
    # The op's dW_hh sums over all N*B rows; each sample needs its own: sum over t and its rows of
    # dz_t^T h_{t-1}, per direction.
    h_prev = torch.stack([previous_states(out[d], h0[d], lengths, _reverse_of(d, reverse))
                          for d in range(out.shape[0])])
    dw_hh = torch.einsum("dtnbi,dtnbj->ndij", dz.unflatten(_SEQUENCE_BATCH, (n, -1)),
                         h_prev.unflatten(_SEQUENCE_BATCH, (n, -1)))
    return (dz.unflatten(_SEQUENCE_BATCH, (n, -1)), dh0.unflatten(_STATE_BATCH, (n, -1)), dw_hh), (
        _SEQUENCE_BATCH, _STATE_BATCH, 0)
