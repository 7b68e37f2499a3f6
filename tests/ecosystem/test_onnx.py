"""Deployment: torch.export and ONNX export (tritonrnn/onnx.py) of models holding the layers.

The exported files run in onnxruntime and give the outputs of torch.nn's float64 RNN with the same
parameters, as the model itself does on the Triton kernels; each recurrence is one node of ONNX's own
RNN operator. Every export takes seconds: few models, each covering several features.
"""
import copy
import sys

import pytest
import torch
from torch import nn
from torch.export import Dim

import tritonrnn
from conftest import DEVICE, assert_close

I, H = 3, 5
NEEDS = "ONNX export tests need onnxruntime, onnx and onnxscript: pip install 'tritonrnn[onnx]'"


@pytest.fixture
def onnxruntime():
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason=NEEDS)
    return pytest.importorskip("onnxruntime", reason=NEEDS)


class Tagger(nn.Module):
    """A model holding a layer: the RNN's outputs through a linear head."""

    def __init__(self, **kwargs):
        super().__init__()
        self.rnn = tritonrnn.RNN(I, H, **kwargs)
        self.head = nn.Linear(H * (2 if self.rnn.bidirectional else 1), 2)

    def forward(self, x, h0=None):
        out, h_n = self.rnn(x, h0)
        return self.head(out), h_n


def _reference(model: nn.Module, *inputs: torch.Tensor) -> tuple:
    """The model's outputs with torch.nn's layers in float64 (tritonrnn.unconvert of a copy)."""
    oracle = tritonrnn.unconvert(copy.deepcopy(model)).double().cpu()
    outputs = oracle(*(x.double().cpu() for x in inputs))
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _check(onnxruntime, program, model: nn.Module, *inputs: torch.Tensor) -> None:
    """The file runs in onnxruntime with the outputs of torch.nn in float64, as the model does."""
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs, strict=True)}
    got = [torch.from_numpy(y) for y in session.run(None, feed)]
    expected = _reference(model, *inputs)
    device = next(model.parameters()).device
    with torch.no_grad():
        ours = model(*(x.to(device) for x in inputs))
    ours = ours if isinstance(ours, tuple) else (ours,)
    for name, outputs in (("onnxruntime", got), ("tritonrnn", ours)):
        for i, (actual, reference) in enumerate(zip(outputs, expected, strict=True)):
            assert_close(actual, reference, torch.float32, f"{name} output {i}")


def _rnn_nodes(program) -> list:
    """The graph's nodes of ONNX's RNN operator; no node is left in another domain."""
    nodes = program.model_proto.graph.node
    assert all(node.domain in ("", "ai.onnx") for node in nodes), [(n.domain, n.op_type) for n in nodes]
    return [node for node in nodes if node.op_type == "RNN"]


def _attribute(node, name: str):
    import onnx

    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_stacked_bidirectional_batch_first_with_h0_dynamic_batch_and_length(onnxruntime):
    torch.manual_seed(0)
    model = Tagger(num_layers=2, bidirectional=True, batch_first=True).eval()
    batch, steps = Dim("batch"), Dim("steps")
    program = torch.onnx.export(model, (torch.randn(2, 4, I), torch.randn(4, 2, H)), dynamo=True, verbose=False,
                                dynamic_shapes=({0: batch, 1: steps}, {1: batch}))
    nodes = _rnn_nodes(program)
    assert [_attribute(n, "direction") for n in nodes] == [b"bidirectional"] * 2
    assert [_attribute(n, "activations") for n in nodes] == [[b"Tanh", b"Tanh"]] * 2
    for B, T in ((3, 7), (1, 1)):  # neither the sizes it was exported with
        _check(onnxruntime, program, model, torch.randn(B, T, I), torch.randn(4, B, H))


def test_relu_unbatched_without_h0_dynamic_length(onnxruntime):
    torch.manual_seed(1)
    model = tritonrnn.RNN(I, H, nonlinearity="relu").eval()
    program = torch.onnx.export(model, (torch.randn(4, I),), dynamo=True, verbose=False,
                                dynamic_shapes=({0: Dim("steps")},))
    (node,) = _rnn_nodes(program)
    assert _attribute(node, "activations") == [b"Relu"] and _attribute(node, "direction") == b"forward"
    _check(onnxruntime, program, model, torch.randn(9, I))


def test_cell_dynamic_batch(onnxruntime):
    torch.manual_seed(2)
    model = tritonrnn.RNNCell(I, H).eval()
    batch = Dim("batch")
    program = torch.onnx.export(model, (torch.randn(2, I), torch.randn(2, H)), dynamo=True, verbose=False,
                                dynamic_shapes=({0: batch}, {0: batch}))
    assert len(_rnn_nodes(program)) == 1
    _check(onnxruntime, program, model, torch.randn(6, I), torch.randn(6, H))


@pytest.fixture
def exported():
    """torch.export of a model holding a layer, with a dynamic batch and sequence length."""
    torch.manual_seed(3)
    model = Tagger(nonlinearity="relu").eval()
    batch, steps = Dim("batch"), Dim("steps")
    model.to(DEVICE)
    x = torch.randn(4, 2, I, device=DEVICE)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: steps, 1: batch},))
    return model, program


def test_torch_export_dynamic_batch_and_length(exported):
    model, program = exported
    for T, B in ((6, 3), (1, 5)):
        x = torch.randn(T, B, I, device=DEVICE)
        for actual, reference in zip(program.module()(x), _reference(model, x), strict=True):
            assert_close(actual, reference, torch.float32)
    assert any(node.target is torch.ops.tritonrnn.recurrence.default for node in program.graph.nodes)


def test_exported_program_exports_to_onnx(exported, onnxruntime):
    model, program = exported
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    (node,) = _rnn_nodes(onnx_program)
    assert _attribute(node, "activations") == [b"Relu"]
    _check(onnxruntime, onnx_program, model, torch.randn(7, 3, I))


def test_export_without_onnxscript_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"onnxscript.*pip install 'tritonrnn\[onnx\]'"):
        tritonrnn.onnx.export(tritonrnn.RNN(I, H), (torch.randn(2, 1, I),))


class _Bytes:
    """A file the TorchScript exporter wrote, as _check reads a dynamo export's ONNXProgram."""

    def __init__(self, data: bytes):
        import onnx

        self.model_proto = onnx.load_from_string(data)


def _legacy_export(model: nn.Module, args: tuple, **kwargs) -> _Bytes:
    import io

    f = io.BytesIO()
    torch.onnx.export(model, args, f, dynamo=False, **kwargs)
    return _Bytes(f.getvalue())


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_torchscript_exporter_on_the_kernel_path(onnxruntime):
    """torch.onnx.export(..., dynamo=False) where the layers run the kernels: the exporter traces torch's
    own RNN there (it has no translation for the ops), with a dynamic batch and length."""
    assert tritonrnn.backend(DEVICE) != "torch"
    torch.manual_seed(4)
    model = Tagger(num_layers=2, bidirectional=True, batch_first=True).to(DEVICE).eval()
    x, h0 = torch.randn(2, 4, I, device=DEVICE), torch.randn(4, 2, H, device=DEVICE)
    axes = {"x": {0: "batch", 1: "steps"}, "h0": {1: "batch"}}
    program = _legacy_export(model, (x, h0), input_names=["x", "h0"], dynamic_axes=axes)
    assert len(_rnn_nodes(program)) == 2
    _check(onnxruntime, program, model.cpu(), torch.randn(3, 7, I), torch.randn(4, 3, H))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_language_model_loss_exports(onnxruntime, dynamo):
    """ElmanLM's loss (tritonrnn::linear_cross_entropy on the kernel path) exports as ONNX's own
    cross-entropy through either exporter, with the loss of the same network from torch.nn alone."""
    from tritonrnn.lm import TorchElmanLM

    torch.manual_seed(5)
    model = tritonrnn.ElmanLM(11, H, num_layers=2).eval()
    tokens, targets = torch.randint(0, 11, (6, 3)), torch.randint(0, 11, (6, 3))
    if dynamo:
        program = torch.onnx.export(model, (tokens, targets), dynamo=True, verbose=False)
    else:
        program = _legacy_export(model, (tokens, targets))
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), (tokens, targets), strict=True)}
    (loss,) = session.run(None, feed)
    oracle = TorchElmanLM(11, H, num_layers=2, dtype=torch.float64)
    oracle.load_state_dict(model.state_dict())
    assert_close(torch.from_numpy(loss), oracle(tokens, targets), torch.float32, "loss")
