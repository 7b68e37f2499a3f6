"""Differentially private training with Opacus: per-sample gradients and per-sample gradient norms of
tritonrnn.RNN and tritonrnn.RNNCell from the Triton kernels.

Dimensions: T steps, B batch (the samples), I input, H hidden, L layers, D directions.

Importing this module registers, in Opacus's public registries, a grad sampler for both layers (Opacus's
default "hooks" mode), a norm sampler for RNN (ghost clipping, grad_sample_mode="ghost") and a validator
(dropout). `import tritonrnn` imports it as soon as Opacus is imported, in either order
(tritonrnn/_after_import.py: Opacus takes seconds to import, so tritonrnn never imports it itself).

How Opacus's hooks meet the layers. Opacus hands a grad sampler the module's forward inputs and the
gradient of its first output only; tritonrnn.RNN returns (output, h_n), and the loss may use both. So the
layers let this module adapt the hooks Opacus registers on them (modules.py's `hook_adapters`): the
adapted backward hook keeps every output gradient on the layer for the sampler, tells Opacus the batch
size (its own guess reads hx's first dimension), and hands Opacus a one-element stand-in for the output
gradient (Opacus only scales and reorders it; the sampler takes the real ones). A PackedSequence is no
tensor: Opacus's forward hook, which detaches every argument, gets its data instead; and torch's module
hooks see only h_n's gradient, so the output's packed data and h_n go through one identity autograd node
whose backward, given the gradient of whichever of them the loss used, runs Opacus's backward hook for
that call (the adapted hook does nothing then). Opacus's forward hook sees positional arguments only and
detaches each: it is given hx passed by keyword, and a hx=None (an RNNCell loop's first step) is left
out, as if not passed.
Per-sample results are in the caller's sample order (Opacus's DPRNN gives a packed batch's sorted order).

What the samplers compute. Per layer and direction, with dz_t = dL/dz_t (the pre-activation gradients
that the fused BPTT kernel produces), x_t the layer's input and h_(t-1) the state a step reads:

    dW_ih[b] = sum_t dz_t[b]^T x_t[b]     dW_hh[b] = sum_t dz_t[b]^T h_(t-1)[b]     db[b] = sum_t dz_t[b]

Opacus calls the sampler inside its backward hook, which runs before the layer's own backward when no
input needs a gradient; so the sampler recomputes the layer's forward and BPTT once for the whole batch
(the kernels, one launch each per layer and direction as in training) to get every x_t, h_(t-1) and dz_t:
one extra forward and backward of the layer per batch. The norms for ghost clipping never form a
per-sample [B, H, I] gradient: ||dW[b]||^2 = sum_(t,s) (dz_t . dz_s)(a_t . a_s), two [B, T, T] Gram
matrices (Opacus's trick for sequences through nn.Linear), unless T * T exceeds the weight's size.

RNNCell has no norm sampler: a cell runs once per step, and Opacus's ghost clipping refuses a layer
called more than once a batch; in ghost mode Opacus clips the cell with its per-sample gradients.

Not supported: dropout between layers in training (the recomputation would draw other masks): the
validator and the samplers refuse it. A layer called several times in one batch pairs its calls with
their gradients in reverse call order, as Opacus pairs activations.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from opacus.validators.errors import UnsupportedModuleError
from opacus.validators.utils import register_module_validator
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from tritonrnn import functional, ops, reference
from tritonrnn.modules import RNN, RNNCell, _Tritonrnn
from tritonrnn.numerics import allow_tf32


@dataclass
class _PackedCall:
    """A forward call on a PackedSequence: its packing."""
    batch_sizes: Tensor
    sorted_indices: Optional[Tensor]
    unsorted_indices: Optional[Tensor]


@dataclass
class _OutputGrads:
    """What the adapted hooks keep on the layer while Opacus's backward hook (and so the sampler) runs: the
    output gradients, how Opacus is configured (its batch_first reorders the activations; "mean" scales by
    the batch size), and the packing of a PackedSequence call."""
    grads: tuple
    batch_first: bool
    loss_reduction: str
    packed: Optional[_PackedCall]


def _opacus_owner(hook):
    """The Opacus GradSampleHooks a hook is a method of (a partial of one for the backward hook), or None."""
    owner = getattr(hook, "__self__", None) or getattr(getattr(hook, "func", None), "__self__", None)
    return owner if isinstance(owner, GradSampleHooks) else None


def adapt_hook(layer, hook, kind: str):
    """modules.py's hook adapter: wrap the forward and full backward hooks of Opacus's GradSampleHooks
    (others pass unchanged)."""
    owner = _opacus_owner(hook)
    if owner is None:
        return hook
    if getattr(owner, "force_functorch", False):
        raise NotImplementedError(
            f"tritonrnn.{type(layer).__name__} under Opacus's functorch mode: Opacus's functorch per-sample "
            "gradients need a module with a single output; use grad_sample_mode='hooks' (the default) or 'ghost', "
            "which take tritonrnn's grad and norm samplers")
    return _forward_hook(owner, hook) if kind == "forward" else _backward_hook(owner)


def _forward_hook(owner, hook):
    """Opacus's forward hook, without a trailing None argument and given the packed data for a
    PackedSequence argument (it detaches every argument); a PackedSequence call's output data and h_n then
    go through _OutputGradients, which runs Opacus's backward hook once their gradients are known (torch's
    module hooks see only h_n, a PackedSequence is no tensor)."""

    def opacus_forward_hook(module, args, kwargs, output):
        # hx passed by keyword counts (Opacus's hook sees positional arguments only); hx=None is left out
        # (Opacus would call None.detach()).
        args = tuple(args) + tuple(kwargs.get(name) for name in ("input", "hx")[len(args):])
        while args and args[-1] is None:
            args = args[:-1]
        if not isinstance(args[0], PackedSequence):
            return hook(module, args, output)
        packed = args[0]
        hook(module, (packed.data, *args[1:]), output)
        if not (owner.hooks_enabled and module.training and torch.is_grad_enabled()
                and any(p.requires_grad for p in module.parameters())):
            return None
        call = _PackedCall(packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        module.__dict__.setdefault("_packed_calls", []).append(call)
        data, h_n = _OutputGradients.apply(output[0].data, output[1], module, owner, call)
        return output[0]._replace(data=data), h_n

    opacus_forward_hook.with_kwargs = True  # registered with with_kwargs=True (modules.py)
    return opacus_forward_hook


def _backward_hook(owner):
    """Opacus's backward hook, adapted: see the module docstring. While PackedSequence calls wait for their
    gradients it does nothing (torch runs it at h_n alone); _OutputGradients calls Opacus for them."""

    def opacus_backward_hook(module, grad_input, grad_output):
        if not getattr(module, "_packed_calls", None):
            return _run_opacus(owner, module, tuple(grad_output), None)
        return None

    return opacus_backward_hook


class _OutputGradients(torch.autograd.Function):
    """Identity on a PackedSequence call's output data and h_n; its backward, which runs once whichever of
    them the loss used has its gradient (the other's is None), runs Opacus's backward hook for that call."""

    @staticmethod
    def forward(ctx, data, h_n, module, owner, call):
        ctx.module, ctx.owner, ctx.call = module, owner, call
        ctx.set_materialize_grads(False)
        return data.view_as(data), h_n.view_as(h_n)

    @staticmethod
    def backward(ctx, grad_data, grad_hn):
        calls = getattr(ctx.module, "_packed_calls", [])
        if ctx.owner.hooks_enabled and any(call is ctx.call for call in calls):
            calls.remove(ctx.call)
            _run_opacus(ctx.owner, ctx.module, (grad_data, grad_hn), ctx.call)
        return grad_data, grad_hn, None, None, None


def _run_opacus(owner, module, grads: tuple, packed: Optional[_PackedCall]):
    """Opacus's backward hook for one call, with the layer's output gradients kept for the sampler, the
    batch size set (Opacus would read it from hx's first dimension), and a one-element stand-in for the
    output gradient (Opacus only scales and reorders it)."""
    if not hasattr(module, "max_batch_len") and getattr(module, "activations", None):
        module.max_batch_len = (int(packed.batch_sizes[0]) if packed is not None
                                else max(_batch_size(module, args[0]) for args in module.activations))
    module._output_grads = _OutputGrads(grads, owner.batch_first, owner.loss_reduction, packed)
    parameter = next(module.parameters())
    stand_in = torch.zeros(1, 1, dtype=parameter.dtype, device=parameter.device)
    try:
        return owner.capture_backprops_hook(module, None, (stand_in,), loss_reduction=owner.loss_reduction,
                                            batch_first=owner.batch_first)
    finally:
        del module._output_grads


def _batch_size(module, input: Tensor) -> int:
    """B of a forward input as the layer received it (unbatched input: one sample)."""
    if isinstance(module, RNN):
        return input.size(0 if module.batch_first else 1) if input.dim() == 3 else 1
    return input.size(0) if input.dim() == 2 else 1


def _call(module, activations: list) -> tuple[list, _OutputGrads, float]:
    """The layer's forward arguments in its own layout, what the hooks kept, and Opacus's loss scale."""
    kept: Optional[_OutputGrads] = getattr(module, "_output_grads", None)
    if kept is None:
        raise RuntimeError(f"tritonrnn.privacy: the grad sampler of tritonrnn.{type(module).__name__} runs from "
                           "the Opacus hooks the layer adapted (opacus.GradSampleModule or PrivacyEngine)")
    if not kept.batch_first:  # Opacus moved dim 1 of every activation to the front: move it back
        activations = [t.movedim(0, 1) for t in activations]
    scale = module.max_batch_len if kept.loss_reduction == "mean" else 1
    return activations, kept, scale


@dataclass
class _Terms:
    """One layer and direction of a recomputed batch: time-major x [T, B, I], h_prev [T, B, H] (the state
    each step read) and dz [T, B, H], already multiplied by Opacus's loss scale."""
    x: Tensor
    h_prev: Tensor
    dz: Tensor


def _check_dropout(module) -> None:
    if isinstance(module, RNN) and module.dropout > 0 and module.num_layers > 1 and module.training:
        raise NotImplementedError(_DROPOUT_MESSAGE)


_DROPOUT_MESSAGE = ("tritonrnn.privacy: dropout between layers is not supported under Opacus (the per-sample "
                    "gradients recompute the forward, which would draw other dropout masks); set dropout=0")


def _weights(module) -> list[list]:
    """Per layer and direction: the parameters w_ih, w_hh, then b_ih, b_hh with bias."""
    if isinstance(module, RNNCell):
        return [[module.weight_ih, module.weight_hh] + ([module.bias_ih, module.bias_hh] if module.bias else [])]
    per = 4 if module.bias else 2
    names = module._flat_weights_names
    return [[getattr(module, name) for name in names[i:i + per]] for i in range(0, len(names), per)]


def _time_major(module, activations: list, kept: _OutputGrads) -> tuple:
    """x [T, B, I], hx [L * D, B, H] or None, g_out [T, B, D * H] and g_hn [L * D, B, H] (each gradient
    None where that output took no part in the loss), and lengths [B] for packed input (then in the
    packed batch's sorted order). A cell is one step of a one-layer RNN, unbatched input a batch of one."""
    x, hx = activations[0], activations[1] if len(activations) > 1 else None
    g_out, g_hn = kept.grads if len(kept.grads) == 2 else (kept.grads[0], None)
    if isinstance(module, RNNCell):
        if x.dim() == 1:
            x, hx, g_out = x[None], _unsqueeze(hx, 0), _unsqueeze(g_out, 0)
        return x[None], _unsqueeze(hx, 0), _unsqueeze(g_out, 0), None, None
    if kept.packed is not None:
        call = kept.packed
        x, lengths = pad_packed_sequence(PackedSequence(x, call.batch_sizes))
        if g_out is not None:
            g_out = pad_packed_sequence(PackedSequence(g_out, call.batch_sizes))[0]
        if call.sorted_indices is not None:  # hx and h_n are in the caller's order: sort them as the batch
            order = call.sorted_indices.to(x.device)
            hx, g_hn = (None if t is None else t.index_select(1, order) for t in (hx, g_hn))
        return x, hx, g_out, g_hn, lengths.to(device=x.device, dtype=torch.int32)
    if x.dim() == 2:  # unbatched [T, I]: B = 1
        return x[:, None], _unsqueeze(hx, 1), _unsqueeze(g_out, 1), _unsqueeze(g_hn, 1), None
    if module.batch_first:
        x, g_out = x.transpose(0, 1), g_out.transpose(0, 1) if g_out is not None else None
    return x, hx, g_out, g_hn, None


def _unsqueeze(t: Optional[Tensor], dim: int) -> Optional[Tensor]:
    return None if t is None else t.unsqueeze(dim)


def _recompute(module, activations: list) -> tuple[list[_Terms], Optional[Tensor]]:
    """Forward and BPTT of the layer on the Triton kernels for the batch Opacus recorded (see the module
    docstring): per layer and direction, the inputs, previous states and pre-activation gradients; and,
    for a packed batch, the order that puts its samples back in the caller's order (else None)."""
    _check_dropout(module)
    activations, kept, scale = _call(module, activations)
    x, hx, g_out, g_hn, lengths = _time_major(module, activations, kept)
    layers, directions = (1, 1) if isinstance(module, RNNCell) else (module.num_layers, 1 + module.bidirectional)
    T, B, _ = x.shape
    H = module.hidden_size
    if hx is None:
        hx = x.new_zeros(layers * directions, B, H)
    cell = module.nonlinearity  # the Elman cell's name (tritonrnn.kernels.cells)
    weights = [[w.detach() for w in params] for params in _weights(module)]

    terms, xws, layer_input = [], [], x
    with torch.enable_grad():
        h_n = []
        for layer in range(layers):
            outputs = []
            for direction in range(directions):
                w = weights[layer * directions + direction] + [None, None]
                xw = functional._project(layer_input, w[0], w[2], w[3])
                if not xw.requires_grad:  # the first layer: no input needs a gradient
                    xw.requires_grad_()
                h0 = hx[layer * directions + direction]
                reverse = direction == 1
                out, h = _recurrence(xw, h0, w[1], lengths, reverse, cell)
                h_prev = ops.previous_states(out, h0, lengths, reverse)
                terms.append(_Terms(layer_input.detach(), h_prev.detach(), None))
                xws.append(xw)
                outputs.append(out)
                h_n.append(h)
            layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
        results, result_grads = [layer_input], [g_out]
        if g_hn is not None:
            results.append(torch.stack(h_n))
            result_grads.append(g_hn)
        pairs = [(r, g) for r, g in zip(results, result_grads, strict=True) if g is not None]
        dzs = torch.autograd.grad([r for r, _ in pairs], xws, [g for _, g in pairs], allow_unused=True,
                                  materialize_grads=True)
    for term, dz in zip(terms, dzs, strict=True):
        term.dz = dz * scale
    packed = kept.packed
    return terms, None if packed is None or packed.unsorted_indices is None else packed.unsorted_indices.to(x.device)


def _recurrence(xw: Tensor, h0: Tensor, w_hh: Tensor, lengths: Optional[Tensor], reverse: bool,
                cell: str) -> tuple[Tensor, Tensor]:
    """The recurrence op on the kernels; where the layers run torch's own RNN (a CPU without
    TRITON_INTERPRET), the plain-PyTorch reference, given an identity input weight (xw is projected)."""
    if functional.backend(xw.device) != "torch":
        out, h_n = ops.recurrence(xw[None], h0[None], w_hh[None], lengths, reverse, cell, allow_tf32())
        return out[0], h_n[0]
    identity = torch.eye(xw.shape[-1], dtype=xw.dtype, device=xw.device)
    return reference.forward(xw, h0, identity, w_hh, nonlinearity=cell, lengths=lengths,
                             reverse=reverse)


def _per_parameter(module, activations: list[Tensor], weight, bias) -> dict:
    """{parameter that wants a gradient: weight(dz, a) for W_ih (a = x) and W_hh (a = h_prev), bias(dz) for
    the biases}, each [B, ...] in the caller's sample order."""
    terms, order = _recompute(module, activations)
    results = {}
    for term, params in zip(terms, _weights(module), strict=True):
        for p, kind in zip(params, ("ih", "hh", "b", "b"), strict=False):
            if p.requires_grad:
                a = term.x if kind == "ih" else term.h_prev
                results[p] = bias(term.dz) if kind == "b" else weight(term.dz, a.to(term.dz.dtype))
    return {p: r if order is None else r.index_select(0, order) for p, r in results.items()}


@register_grad_sampler([RNN, RNNCell])
def compute_rnn_grad_sample(module, activations: list[Tensor], backprops: Tensor) -> dict:
    """Opacus grad sampler: {parameter: per-sample gradient [B, *parameter.shape]} (backprops is the
    adapted hook's stand-in: the gradients come from the recomputation)."""
    return _per_parameter(module, activations, weight=lambda dz, a: torch.einsum("tbh,tbi->bhi", dz, a),
                          bias=lambda dz: dz.sum(0))


def _weight_norms(dz: Tensor, a: Tensor) -> Tensor:
    """||sum_t dz_t[b]^T a_t[b]|| for every b, without the [B, H, A] gradients where T * T <= H * A."""
    T, _, H = dz.shape
    if T * T > H * a.shape[-1]:  # a short weight and a long sequence: the gradients are the smaller tensor
        return torch.einsum("tbh,tbi->bhi", dz, a).flatten(1).norm(dim=1)
    gram_dz = torch.einsum("tbh,sbh->bts", dz, dz)
    gram_a = torch.einsum("tbi,sbi->bts", a, a)
    return (gram_dz * gram_a).sum((1, 2)).clamp(min=0).sqrt()


@register_norm_sampler(RNN)
def compute_rnn_norm_sample(module, activations: list[Tensor], backprops: Tensor) -> dict:
    """Opacus norm sampler (ghost clipping): {parameter: per-sample gradient norm [B]}."""
    return _per_parameter(module, activations, weight=_weight_norms, bias=lambda dz: dz.sum(0).norm(dim=1))


@register_module_validator(RNN)
def validate_rnn(module: RNN) -> list:
    """Opacus's ModuleValidator (PrivacyEngine runs it): accept the layer as it is, unless it uses dropout."""
    if module.dropout > 0 and module.num_layers > 1:
        return [UnsupportedModuleError(_DROPOUT_MESSAGE)]
    return []


if adapt_hook not in _Tritonrnn.hook_adapters:
    _Tritonrnn.hook_adapters.append(adapt_hook)
