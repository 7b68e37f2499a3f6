"""ONNX export of models holding the layers: after `import tritonrnn`, torch.onnx.export(model, args,
dynamo=True) translates each recurrence into ONNX's own RNN operator, which runtimes run as one fused kernel.

Dimensions: T steps, B batch, H hidden.

How: the exporter translates the ops of the exported program through its registry of aten ops; an op
without a translation is first decomposed with torch._decomp's decomposition table. This module
registers there a decomposition of the recurrence ops into ONNX's RNN operator (torch.onnx.ops.
symbolic_multi_out, which only the ONNX exporter translates). Registering needs torch alone (importing
tritonrnn stays light); the export itself needs onnx and onnxscript: pip install 'tritonrnn[onnx]'.
Outside ONNX export nothing changes: torch.export, torch.compile and the default decompositions keep
the ops whole (they take decompositions from that table only by name; inductor is told to run them as
they are, `inductor_fallbacks`), and where fake tensors read the table the entries give the ops' fakes.

The ops take the input already projected (xw = x W_ih^T + b_ih + b_hh, one GEMM over all steps before
them), so the RNN node gets the identity as its input weights W and no bias: ONNX's
H_t = act(X_t W^T + H_{t-1} R^T + Wb + Rb) is then the ops' act(xw_t + h_{t-1} W_hh^T).
"""
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from tritonrnn import ops  # defines torch.ops.tritonrnn.*

EXTRA = "pip install 'tritonrnn[onnx]'"
# What torch.onnx.export(..., dynamo=True) imports beyond torch.
NEEDED = ("onnx", "onnxscript")

try:
    import torch.onnx.ops as _onnx_ops  # torch >= 2.8
except ImportError:  # older torch: no translation, the exporter names the op it cannot translate
    _onnx_ops = None


def _rnn(x: Tensor, w: Tensor, w_hh: Tensor, lengths: Optional[Tensor], h0: Tensor, cell: str,
         direction: str) -> tuple[Tensor, Tensor]:
    """One ONNX RNN node (layout 0). x [T, B, I], w [D, H, I], w_hh [D, H, H], h0 [D, B, H];
    returns Y [T, D, B, H] and Y_h [D, B, H]."""
    T, B, _ = x.shape
    D, H, _ = w_hh.shape
    attributes = {"activations": [cell.capitalize()] * D, "direction": direction, "hidden_size": H}
    # The fourth input, B (biases), is absent: they are folded into xw already.
    y, y_h = _onnx_ops.symbolic_multi_out("RNN", [x, w, w_hh, None, lengths, h0], attributes,
                                          dtypes=[x.dtype, x.dtype], shapes=[[T, D, B, H], [D, B, H]])
    return y, y_h


def recurrence(xw: Tensor, h0: Tensor, w_hh: Tensor, lengths: Optional[Tensor], reverse: bool, cell: str,
               allow_tf32: bool) -> tuple[Tensor, Tensor]:
    """tritonrnn::recurrence as one ONNX RNN node: direction 'forward' or 'reverse' for one direction,
    'bidirectional' for two.

    ONNX's bidirectional RNN reads one X for both directions, where the op has one projected input a
    direction: X is both side by side [T, B, 2H], and each direction's W picks its half."""
    D, _, _, H = xw.shape
    eye = torch.eye(H, dtype=xw.dtype, device=xw.device)
    if D == 1:
        y, y_h = _rnn(xw[0], eye[None], w_hh, lengths, h0, cell, "reverse" if reverse else "forward")
        return y.transpose(0, 1), y_h
    if reverse:
        raise ValueError("ONNX's bidirectional RNN runs direction 0 forward in time, as the layers do")
    zero = xw.new_zeros(H, H)
    w = torch.stack([torch.cat([eye, zero], 1), torch.cat([zero, eye], 1)])  # [2, H, 2H]
    y, y_h = _rnn(torch.cat([xw[0], xw[1]], -1), w, w_hh, lengths, h0, cell, "bidirectional")
    return y.transpose(0, 1), y_h


def _only_under_onnx_export(translation):
    """The table's entry for an op: its ONNX translation under ONNX export, its fake elsewhere.

    FakeTensorMode prefers a table's decomposition to an op's own fake where sizes are symbolic
    (torch.compile(dynamic=True), torch.export's dynamic_shapes): there the entry must give what the
    op's fake gives. Nothing else outside ONNX export reads this table's entries for our ops."""

    def decomposition(xw: Tensor, h0: Tensor, *args):
        if torch.onnx.is_in_onnx_export():
            return translation(xw, h0, *args)
        if not isinstance(xw, torch._subclasses.FakeTensor):
            raise RuntimeError("tritonrnn.onnx's decompositions translate the recurrence for ONNX export only")
        return ops._contiguous_like(xw), ops._contiguous_like(h0)

    return decomposition


# The ops this module gives a decomposition (in torch._decomp's table, which inductor reads too).
DECOMPOSED = (torch.ops.tritonrnn.recurrence.default,)
if _onnx_ops is not None:
    from torch._decomp import register_decomposition

    register_decomposition(DECOMPOSED[0])(_only_under_onnx_export(recurrence))
else:
    DECOMPOSED = ()


def inductor_fallbacks() -> None:
    """Tell inductor to run the recurrence ops as they are (a fallback), the decompositions above being for
    ONNX export only. Without this, inductor's make_fallback finds them in the table and, where the
    environment variable CI is set (as CI services set it), raises 'a decomposition exists, we should switch
    to it' for every torch.compile(backend="inductor") of a layer. Run when inductor's lowering is imported
    (tritonrnn/_after_import.py); the layout constraint is the one inductor gives a custom op by default."""
    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    for op in DECOMPOSED:
        if op not in lowering.lowerings:
            lowering.make_fallback(op, layout_constraint=lowering.tag_to_layout_constraint(
                get_layout_constraint_tag(op, with_default=True)), override_decomp=True)


def require() -> None:
    """Raise ModuleNotFoundError naming the extra to install where ONNX export's packages are missing."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"ONNX export needs {' and '.join(missing)}, which are not installed: {EXTRA}",
                                  name=missing[0])


def export(model: torch.nn.Module, args: tuple, f=None, **kwargs):
    """torch.onnx.export(model, args, f, dynamo=True, **kwargs) (which works as well after `import
    tritonrnn`), with an error that names tritonrnn's `onnx` extra where onnx or onnxscript is missing.
    Returns the torch.onnx.ONNXProgram."""
    require()
    return torch.onnx.export(model, args, f, dynamo=True, **kwargs)
