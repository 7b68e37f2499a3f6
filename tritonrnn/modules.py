"""tritonrnn.RNN and tritonrnn.RNNCell: drop-in replacements for torch.nn.RNN and torch.nn.RNNCell.

Same arguments, parameters (names, shapes, order, init), state_dict, shapes and errors; the forward
calls tritonrnn.functional, which runs the Triton kernels on CUDA (and under TRITON_INTERPRET=1 on
the CPU) and torch's own implementation elsewhere.

RNN derives from nn.RNNBase, not nn.RNN: torch.compile's Dynamo refuses instances of nn.RNN.
"""
import torch
from torch import nn, Tensor
from torch.nn.utils._expanded_weights import ExpandedWeight
from torch.nn.utils.rnn import PackedSequence

from tritonrnn import functional


class _Tritonrnn:
    """What the layers share beyond torch.nn: their printed name (print(model) shows what convert()
    replaced: tritonrnn.RNN(100, 20)) and the refusal of ExpandedWeights."""

    # Functions (layer, hook, kind) -> hook, kind "forward" or "full_backward", that may adapt a hook being
    # registered on a layer. tritonrnn.privacy adds one for Opacus's hooks, which pass on the gradient of the
    # first output only and cannot hold a PackedSequence.
    hook_adapters: list = []

    def _adapted(self, hook, kind: str):
        owner = getattr(hook, "__self__", None) or getattr(getattr(hook, "func", None), "__self__", None)
        if type(owner).__module__.startswith("opacus."):
            # Opacus's support lives in tritonrnn.privacy, imported here rather than with tritonrnn
            # (importing Opacus takes seconds); it registers its adapter and Opacus's grad samplers.
            import tritonrnn.privacy  # noqa: F401
        for adapt in self.hook_adapters:
            hook = adapt(self, hook, kind)
        return hook

    def register_forward_hook(self, hook, **kwargs):
        hook = self._adapted(hook, "forward")
        if getattr(hook, "with_kwargs", False):  # an adapted hook that reads hx passed by keyword
            kwargs["with_kwargs"] = True
        return super().register_forward_hook(hook, **kwargs)

    def register_full_backward_hook(self, hook, prepend: bool = False):
        return super().register_full_backward_hook(self._adapted(hook, "full_backward"), prepend=prepend)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first, on the model and each submodule: TorchScript cannot compile the
        # Triton kernels' custom ops, so say so and what scripts instead, not a TorchScript parse error.
        raise RuntimeError(
            f"tritonrnn.{type(self).__name__} does not support TorchScript (torch.jit.script): its Triton kernels "
            "are not scriptable. Use torch.compile or torch.export, or script torch.nn layers with the same "
            "parameters: torch.jit.script(tritonrnn.unconvert(copy.deepcopy(model)))")

    def _get_name(self) -> str:
        name = super()._get_name()
        return f"tritonrnn.{name}" if type(self).__module__ == __name__ else name

    def _refuse_expanded_weights(self) -> None:
        # torch.nn.utils._per_sample_grad.call_for_per_sample_grads swaps the parameters for
        # ExpandedWeights, which handle only torch's own functions op by op.
        if any(isinstance(p, ExpandedWeight) for p in self.parameters()):
            raise RuntimeError(
                f"tritonrnn.{type(self).__name__} does not support ExpandedWeights "
                "(torch.nn.utils._per_sample_grad.call_for_per_sample_grads). For per-sample gradients use "
                "torch.func: torch.func.vmap(torch.func.grad(loss)) over torch.func.functional_call(model, "
                "params, inputs), which runs the Triton kernels.")


class RNN(_Tritonrnn, nn.RNNBase):
    """Elman RNN with tanh or ReLU, on Triton kernels. Arguments as torch.nn.RNN:

    RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True, batch_first=False,
        dropout=0.0, bidirectional=False, device=None, dtype=None)

    forward(input, hx=None) -> (output, h_n), with input [T, B, I], [B, T, I] (batch_first), [T, I]
    (unbatched) or a PackedSequence, and hx [num_layers * num_directions, B, H] ([L * D, H] unbatched).
    """

    def __init__(self, *args, **kwargs):
        # The argument handling of torch.nn.RNN: nonlinearity is the 4th positional argument.
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)

    def forward(self, input, hx: Tensor | None = None):
        self._refuse_expanded_weights()
        self._update_flat_weights()
        num_directions = 2 if self.bidirectional else 1
        is_packed = isinstance(input, PackedSequence)
        is_batched = True
        batch_dim = 0 if self.batch_first else 1
        if is_packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            max_batch_size = input.size(batch_dim)
        if hx is None:
            hx = torch.zeros(self.num_layers * num_directions, max_batch_size, self.hidden_size,
                             dtype=input.dtype, device=input.device)
        else:
            # Each row of hx belongs to the sequence the user passed at that position.
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(input, hx, batch_sizes)

        output, hidden = functional.rnn(
            input, hx, self._flat_weights, self.bias, self.num_layers, self.dropout, self.training,
            self.bidirectional, self.batch_first, self.nonlinearity, batch_sizes)

        if is_packed:
            return (PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if not is_batched:
            return output.squeeze(batch_dim), hidden.squeeze(1)
        return output, hidden


class RNNCell(_Tritonrnn, nn.RNNCell):
    """Elman RNN cell with tanh or ReLU, on a Triton kernel. Arguments as torch.nn.RNNCell:

    RNNCell(input_size, hidden_size, bias=True, nonlinearity='tanh', device=None, dtype=None)

    forward(input, hx=None) -> h', with input [B, I] or [I] and hx [B, H] or [H].
    """

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        self._refuse_expanded_weights()
        if input.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        elif not is_batched:
            hx = hx.unsqueeze(0)
        if self.nonlinearity not in functional.NONLINEARITIES:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        out = functional.rnn_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                  self.nonlinearity)
        return out if is_batched else out.squeeze(0)


def convert(model: nn.Module) -> nn.Module:
    """Replace, in place, every torch.nn.RNN and torch.nn.RNNCell inside `model` with the tritonrnn
    equivalent holding the very same Parameter objects (and hooks, mode, settings). Returns `model`;
    a bare nn.RNN or nn.RNNCell cannot be replaced in place, so its replacement is returned.
    """
    return _swap(model, {nn.RNN: RNN, nn.RNNCell: RNNCell})


def unconvert(model: nn.Module) -> nn.Module:
    """The inverse of `convert`: replace, in place, every tritonrnn.RNN and tritonrnn.RNNCell inside
    `model` with torch.nn.RNN / torch.nn.RNNCell holding the very same Parameter objects, for code that
    should not depend on tritonrnn (a checkpoint's state_dict is the same either way). Returns `model`,
    or the replacement of a bare layer.
    """
    return _swap(model, {RNN: nn.RNN, RNNCell: nn.RNNCell})


def _swap(model: nn.Module, classes: dict) -> nn.Module:
    """Replace every module whose exact type is a key of `classes` with an instance of its value."""
    replacement = _swapped(model, classes)
    if replacement is not None:
        return replacement
    for name, child in list(model.named_children()):
        replacement = _swapped(child, classes)
        if replacement is not None:
            setattr(model, name, replacement)
        else:
            _swap(child, classes)
    return model


def _swapped(module: nn.Module, classes: dict):
    cls = classes.get(type(module))
    if cls is None:
        return None
    new = cls.__new__(cls)
    # Share state (parameters, hooks, training flag, config) rather than re-initialising.
    new.__dict__.update({key: value.copy() if isinstance(value, (dict, list)) else value
                         for key, value in module.__dict__.items()})
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()
    return new
