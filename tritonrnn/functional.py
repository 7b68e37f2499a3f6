"""Functional RNN API: the layers' maths, dispatched to the Triton kernels or to torch.

Dimensions: T steps, B batch, I input, H hidden, L layers, D directions (1 or 2).
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, PackedSequence

from tritonrnn import ops
from tritonrnn.numerics import allow_tf32, autocast, check_same_dtype
from tritonrnn import dispatch

NONLINEARITIES = ("tanh", "relu")

backend = dispatch.backend  # the package's public `tritonrnn.backend`


def _check_nonlinearity(nonlinearity: str) -> str:
    """The Elman cell of this nonlinearity (its name: tritonrnn.kernels.cells), with torch's error."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return nonlinearity


def _check_cell_args(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor) -> None:
    # The checks and messages of torch's rnn_tanh_cell.
    if input.size(1) != w_ih.size(1):
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {w_ih.size(1)}")
    if input.size(0) != hx.size(0):
        raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden0 batch size {hx.size(0)}")
    if hx.size(1) != w_hh.size(1):
        raise RuntimeError(f"hidden0 has inconsistent hidden_size: got {hx.size(1)}, expected {w_hh.size(1)}")
    check_same_dtype(input, w_ih)
    check_same_dtype(hx, w_hh)


def _torch_runs(device: torch.device) -> bool:
    """Whether torch's own RNN runs on this device (see dispatch.backend). Under ONNX export, on every device:
    never under the dynamo exporter's torch.export (dynamo=True), which traces the ops (tritonrnn/onnx.py
    translates them to ONNX's RNN operator: the file keeps a dynamic sequence length); always under the
    TorchScript exporter (dynamo=False, not exporting in torch.compiler's sense), which translates torch's own
    RNN and has no translation for the ops. Either file is the same whichever device exported it."""
    if torch.onnx.is_in_onnx_export():
        return not torch.compiler.is_exporting()
    return backend(device) == "torch"


def _devices(*tensors: Optional[Tensor]) -> list[torch.device]:
    return list(dict.fromkeys(t.device for t in tensors if t is not None))


def _check_lengths(lengths: Tensor, T: int, B: int) -> None:
    """Every length in [1, T]: on the host when the lengths are there (PackedSequence keeps them on
    the CPU); on a device, an asynchronous assertion (no host sync, so CUDA graphs and compiled
    graphs stay whole; a violation surfaces as a device-side assert at the next sync)."""
    if lengths.shape != (B,):
        raise ValueError(f"lengths must be a [{B}] tensor of values in [1, {T}], got shape {tuple(lengths.shape)}")
    valid = ((lengths >= 1) & (lengths <= T)).all()
    if lengths.device.type != "cpu":
        torch._assert_async(valid, f"lengths must be values in [1, {T}]")
    elif B and not bool(valid):
        raise ValueError(f"lengths must be a [{B}] tensor of values in [1, {T}], got {lengths.tolist()}")


def _project(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Tensor:
    """x W_ih^T + b_ih + b_hh for all timesteps: one GEMM over every row of x."""
    flat = x.flatten(0, -2)  # not reshape(-1, I): an RNNCell's input_size may be 0, as in torch
    xw = flat @ w_ih.T if b_ih is None else torch.addmm(b_ih + b_hh, flat, w_ih.T)
    return xw.view(*x.shape[:-1], w_ih.shape[0])


def rnn_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None, nonlinearity: str = "tanh", lengths: Optional[Tensor] = None,
              reverse: bool = False) -> tuple[Tensor, Tensor]:
    """One layer, one direction, on the Triton kernels.

    Args:
        x: [T, B, I] time-major input. h0: [B, H]. w_ih: [H, I]. w_hh: [H, H]. b_ih, b_hh: [H] or None.
        lengths: optional [B] sequence lengths (sorted or not); steps past a row's length output 0.
        reverse: run from t = T-1 down to 0 (the backward direction of a bidirectional RNN).
    Returns:
        out [T, B, H] (every h_t) and h_n [B, H] (each row's state after its own last step).
    """
    cell = _check_nonlinearity(nonlinearity)
    if _torch_runs(x.device):
        raise RuntimeError(f"tritonrnn.functional.rnn_layer runs the Triton kernels: it needs CUDA tensors, or "
                           f"TRITON_INTERPRET=1 set before import to interpret them on the CPU; got {x.device}")
    # The custom op dispatches on all its tensors at once: a meta h0 would send real inputs to its fake.
    devices = _devices(x, h0, w_ih, w_hh, b_ih, b_hh)
    if len(devices) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{devices[0]} and {devices[1]}!")
    x, h0, w_ih, w_hh, b_ih, b_hh = autocast(x.device.type, x, h0, w_ih, w_hh, b_ih, b_hh)
    xw = _project(x, w_ih, b_ih, b_hh)
    T, B, H = xw.shape
    if lengths is not None:
        _check_lengths(lengths, T, B)
        lengths = lengths.to(device=x.device, dtype=torch.int32)
    out, h_n = ops.recurrence_any_transform(xw[None], h0[None], w_hh[None], lengths, reverse, cell, allow_tf32())
    return out[0], h_n[0]


def rnn(input: Tensor, hx: Tensor, weights: Sequence[Optional[Tensor]], bias: bool, num_layers: int,
        dropout: float, training: bool, bidirectional: bool, batch_first: bool = False,
        nonlinearity: str = "tanh", batch_sizes: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """A stacked (optionally bidirectional) Elman RNN; the contract of torch._VF.rnn_tanh/rnn_relu.

    Args:
        input: [T, B, I] ([B, T, I] with batch_first), or the data of a PackedSequence with
            its batch_sizes (sorted by decreasing length, as PackedSequence keeps it).
        hx: [L * D, B, H] initial states, ordered l0, l0_reverse, l1, ...
        weights: per layer and direction w_ih, w_hh (and b_ih, b_hh with bias), as
            nn.RNN._flat_weights orders them.
        dropout: applied to each layer's output but the last, in training only.
    Returns:
        output ([T, B, D * H], or packed data when batch_sizes is given) and h_n [L * D, B, H].
    """
    cell = _check_nonlinearity(nonlinearity)
    # Tensors on several devices: torch's own RNN raises torch.nn's error for them.
    if _torch_runs(input.device) or len(_devices(input, hx, *weights)) > 1:
        fn = torch._VF.rnn_relu if cell == "relu" else torch._VF.rnn_tanh
        if batch_sizes is None:
            return fn(input, hx, list(weights), bias, num_layers, dropout, training, bidirectional, batch_first)
        return fn(input, batch_sizes, hx, list(weights), bias, num_layers, dropout, training, bidirectional)

    if input.size(0 if batch_sizes is not None or not batch_first else 1) == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    input, hx, *weights = autocast(input.device.type, input, hx, *weights)
    check_same_dtype(input, weights[0])
    check_same_dtype(hx, weights[1])
    lengths = None
    if batch_sizes is not None:
        x, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
    else:
        x = input.transpose(0, 1) if batch_first else input
    directions = 2 if bidirectional else 1
    per_layer = 4 if bias else 2
    h_n = []
    for layer in range(num_layers):
        layer_weights = [list(weights[index * per_layer:(index + 1) * per_layer]) + [None, None]
                         for index in range(layer * directions, (layer + 1) * directions)]
        outputs, h = _layer(x, hx[layer * directions:(layer + 1) * directions], layer_weights, cell, lengths)
        h_n += list(h)
        x = torch.cat(list(outputs), dim=-1) if directions == 2 else outputs[0]
        if dropout > 0 and training and layer < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    if batch_sizes is not None:
        output = pack_padded_sequence(x, lengths).data
    else:
        output = x.transpose(0, 1) if batch_first else x
    return output, torch.stack(h_n)


def _layer(x: Tensor, h0: Tensor, weights: list, cell: str, lengths: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Every direction of one layer through one op call (both in one launch on the persistent kernel's
    layouts).

    Args:
        x: [T, B, I]. h0: [D, B, H]. weights: per direction [w_ih, w_hh, b_ih, b_hh] (biases may be None).
    Returns:
        out [D, T, B, H] (forward direction first) and h_n [D, B, H].
    """
    xw = torch.stack([_project(x, w[0], w[2], w[3]) for w in weights])
    w_hh = torch.stack([w[1] for w in weights])
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int32)
    return ops.recurrence_any_transform(xw, h0, w_hh, lengths, False, cell, allow_tf32())


def rnn_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None, nonlinearity: str = "tanh") -> Tensor:
    """One step h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh); the contract of torch._VF.rnn_tanh_cell.

    Args:
        input: [B, I]. hx: [B, H].
    Returns:
        h' [B, H], from one launch of the step kernel.
    """
    cell = _check_nonlinearity(nonlinearity)
    # Tensors on several devices: torch's own cell raises torch.nn's error for them.
    if _torch_runs(input.device) or len(_devices(input, hx, w_ih, w_hh, b_ih, b_hh)) > 1:
        fn = torch._VF.rnn_relu_cell if cell == "relu" else torch._VF.rnn_tanh_cell
        return fn(input, hx, w_ih, w_hh, b_ih, b_hh)
    input, hx, w_ih, w_hh, b_ih, b_hh = autocast(input.device.type, input, hx, w_ih, w_hh, b_ih, b_hh)
    _check_cell_args(input, hx, w_ih, w_hh)
    out, _ = rnn_layer(input.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return out[0]

from tritonrnn.loss import linear_cross_entropy  # noqa: E402,F401  (the fused output layer; tritonrnn/loss.py)
