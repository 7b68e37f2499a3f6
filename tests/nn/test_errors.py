"""Bad arguments, shapes and dtypes raise what torch.nn raises: the same type, the same message.

The oracle is torch.nn on the CPU (cuDNN words some of its errors differently); ours runs on the
device under test.
"""
import os

import pytest
import torch
from torch import nn

import tritonrnn
from conftest import DEVICE, assert_close


def _raised(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the point is to capture whatever is raised
        return type(error), str(error)
    return None


CONSTRUCTION = {
    "nonlinearity": ((3, 4), {"nonlinearity": "sigmoid"}),
    "proj_size": ((3, 4), {"proj_size": 2}),
    "dropout-range": ((3, 4), {"dropout": 1.5}),
    "dropout-bool": ((3, 4), {"dropout": True}),
    "hidden-zero": ((3, 0), {}),
    "hidden-float": ((3, 4.0), {}),
    "input-zero": ((0, 4), {}),
    "layers-zero": ((3, 4, 0), {}),
    "bias-type": ((3, 4), {"bias": 1}),
}


@pytest.mark.parametrize("case", CONSTRUCTION, ids=str)
def test_rnn_construction_errors(case):
    args, kwargs = CONSTRUCTION[case]
    expected = _raised(lambda: nn.RNN(*args, **kwargs))
    assert expected is not None
    assert _raised(lambda: tritonrnn.RNN(*args, **kwargs)) == expected


def test_dropout_warning_as_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        tritonrnn.RNN(3, 4, dropout=0.5)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _on_device(args):
    return tuple(a.to(DEVICE) for a in args)


RNN_CALLS = {
    "input-4d": (lambda: (_t(2, 3, 4, 5),)),
    "input-size": (lambda: (_t(4, 3, 6),)),
    "hx-batch": (lambda: (_t(4, 3, 5), _t(2, 4, 8))),
    "hx-layers": (lambda: (_t(4, 3, 5), _t(1, 3, 8))),
    "hx-2d-for-3d": (lambda: (_t(4, 3, 5), _t(3, 8))),
    "hx-3d-for-2d": (lambda: (_t(4, 5), _t(2, 1, 8))),
    "input-dtype": (lambda: (_t(4, 3, 5, dtype=torch.float64),)),
    "hx-dtype": (lambda: (_t(4, 3, 5), _t(2, 3, 8, dtype=torch.float64))),
    "empty-sequence": (lambda: (_t(0, 3, 5),)),
    "empty-sequence-and-batch": (lambda: (_t(0, 0, 5),)),
    "input-size-zero": (lambda: (_t(4, 3, 0),)),
    "input-size-zero-empty-batch": (lambda: (_t(4, 0, 0),)),
}


@pytest.mark.parametrize("case", RNN_CALLS, ids=str)
def test_rnn_forward_errors(case):
    torch.manual_seed(0)
    oracle = nn.RNN(5, 8, num_layers=2)
    ours = tritonrnn.RNN(5, 8, num_layers=2, device=DEVICE)
    args = RNN_CALLS[case]()
    expected = _raised(lambda: oracle(*args))
    assert expected is not None
    assert _raised(lambda: ours(*_on_device(args))) == expected


CELL_CALLS = {
    "input-3d": (lambda: (_t(2, 3, 5),)),
    "hidden-3d": (lambda: (_t(3, 5), _t(1, 3, 8))),
    "input-size": (lambda: (_t(3, 6),)),
    "batch": (lambda: (_t(3, 5), _t(4, 8))),
    "hidden-size": (lambda: (_t(3, 5), _t(3, 7))),
    "input-dtype": (lambda: (_t(3, 5, dtype=torch.float64),)),
    "hidden-dtype": (lambda: (_t(3, 5), _t(3, 8, dtype=torch.float64))),
}


@pytest.mark.parametrize("case", CELL_CALLS, ids=str)
def test_rnn_cell_forward_errors(case):
    oracle = nn.RNNCell(5, 8)
    ours = tritonrnn.RNNCell(5, 8, device=DEVICE)
    args = CELL_CALLS[case]()
    expected = _raised(lambda: oracle(*args))
    assert expected is not None
    assert _raised(lambda: ours(*_on_device(args))) == expected


def test_rnn_cell_unknown_nonlinearity():
    oracle, ours = nn.RNNCell(5, 8, nonlinearity="gelu"), tritonrnn.RNNCell(5, 8, nonlinearity="gelu")
    x = torch.randn(2, 5)
    ours.to(DEVICE)
    assert _raised(lambda: ours(x.to(DEVICE))) == _raised(lambda: oracle(x)) is not None


# A tensor on another device than the input: torch.nn's error (never the custom op's fake
# implementation, which a meta tensor among real ones would select). Weights moved with .to("meta").
DEVICE_CALLS = {
    "hx-meta": ((4, 3, 5), (2, 3, 8), "hx"),
    "hx-meta-unbatched": ((4, 5), (2, 8), "hx"),
    "weights-meta": ((4, 3, 5), (2, 3, 8), "module"),
    "weights-meta-no-hx": ((4, 3, 5), None, "module"),
}


def _device_call(module, x_shape, hx_shape, on_meta, device):
    if on_meta == "module":
        module.to("meta")
    x = torch.randn(*x_shape, device=device)
    hx = None if hx_shape is None else torch.randn(*hx_shape, device="meta" if on_meta == "hx" else device)
    return _raised(lambda: module(x) if hx is None else module(x, hx))


@pytest.mark.parametrize("case", DEVICE_CALLS, ids=str)
def test_rnn_tensors_on_another_device(case):
    expected = _device_call(nn.RNN(5, 8, num_layers=2).to(DEVICE), *DEVICE_CALLS[case], DEVICE)
    assert expected is not None and expected[0] is RuntimeError
    assert _device_call(tritonrnn.RNN(5, 8, num_layers=2, device=DEVICE), *DEVICE_CALLS[case], DEVICE) == expected


CELL_DEVICE_CALLS = {
    "hx-meta": ((3, 5), (3, 8), "hx"),
    "hx-meta-unbatched": ((5,), (8,), "hx"),
    "weights-meta": ((3, 5), (3, 8), "module"),
    "weights-meta-no-hx": ((3, 5), None, "module"),
}


@pytest.mark.parametrize("case", CELL_DEVICE_CALLS, ids=str)
def test_rnn_cell_tensors_on_another_device(case):
    expected = _device_call(nn.RNNCell(5, 8).to(DEVICE), *CELL_DEVICE_CALLS[case], DEVICE)
    assert expected is not None and expected[0] is RuntimeError
    assert _device_call(tritonrnn.RNNCell(5, 8, device=DEVICE), *CELL_DEVICE_CALLS[case], DEVICE) == expected


def test_rnn_layer_refuses_tensors_on_two_devices():
    x, w_ih, w_hh = (torch.randn(*shape, device=DEVICE) for shape in ((4, 3, 5), (8, 5), (8, 8)))
    with pytest.raises(RuntimeError, match=f"found at least two devices, {DEVICE.type}.* and meta!"):
        tritonrnn.functional.rnn_layer(x, torch.randn(3, 8, device="meta"), w_ih, w_hh)


@pytest.mark.parametrize("module", [tritonrnn.RNN(5, 8), tritonrnn.RNNCell(5, 8)], ids=["RNN", "RNNCell"])
def test_expanded_weights_refused_naming_torch_func(module):
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads
    x = torch.randn(4, 3, 5) if isinstance(module, nn.RNNBase) else torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"does not support ExpandedWeights .* use torch\.func"):
        call_for_per_sample_grads(module.to(DEVICE), batch_size=3)(x.to(DEVICE))


LATE_INTERPRETER = """
import os, torch, tritonrnn
from tritonrnn.functional import linear_cross_entropy
os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were defined for a GPU at import
calls = (lambda: tritonrnn.RNN(3, 4)(torch.randn(2, 1, 3)), lambda: tritonrnn.RNNCell(3, 4)(torch.randn(2, 3)),
         lambda: linear_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), None, torch.zeros(2, dtype=torch.long)),
         lambda: tritonrnn.backend(torch.device("cpu")))  # agrees with what the layers do
for call in calls:
    try:
        call()
        print("ran")
    except RuntimeError as error:
        print(error)
"""


def test_interpreter_switched_on_after_import_says_so_in_one_line():
    """TRITON_INTERPRET=1 set after `import tritonrnn` (a notebook): one line saying to set it first, not
    Triton's "0 active drivers"; tritonrnn.backend() says the same, not "triton-interpreter"."""
    import subprocess
    import sys
    from pathlib import Path

    from tritonrnn.dispatch import INTERPRET_TOO_LATE

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", LATE_INTERPRETER], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert result.stdout.splitlines() == [INTERPRET_TOO_LATE] * 4, result.stdout + result.stderr[-2000:]
    assert "TRITON_INTERPRET=1 was set after tritonrnn was imported" in INTERPRET_TOO_LATE


@pytest.mark.parametrize("fill", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_propagate_without_numpy_warnings(fill):
    """A NaN or inf in the data flows through as in torch.nn, and the interpreter (which computes with numpy)
    prints no RuntimeWarning about it."""
    import warnings

    from tritonrnn.functional import linear_cross_entropy

    torch.manual_seed(0)
    options = {"device": DEVICE, "dtype": torch.float64}
    ours = tritonrnn.RNN(3, 4, **options)
    theirs = nn.RNN(3, 4, **options)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 3, **options)
    x[1, 0] = fill
    x.requires_grad_()
    h = torch.randn(4, 3, **options)
    h[2] = fill
    h.requires_grad_()
    weight, target = torch.randn(5, 3, **options), torch.tensor([0, 1, 2, 3], device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, h_n = ours(x)
        grad_x, = torch.autograd.grad(out.sum(), x)
        loss = linear_cross_entropy(h, weight, None, target, label_smoothing=0.1)
        grad_h, = torch.autograd.grad(loss, h)
    expected = theirs(x)[0]
    torch.testing.assert_close(out, expected, equal_nan=True)
    torch.testing.assert_close(grad_x, torch.autograd.grad(expected.sum(), x)[0], equal_nan=True)
    assert loss.isnan() and grad_h.isnan().any()


@pytest.mark.parametrize("layer", [lambda: tritonrnn.RNN(3, 4, num_layers=2), lambda: tritonrnn.RNNCell(3, 4)],
                         ids=["RNN", "RNNCell"])
def test_torchscript_is_refused_with_a_message_saying_what_scripts(layer):
    """torch.jit.script of a model holding a layer: one RuntimeError saying TorchScript is not supported and
    how to script torch.nn layers with the same parameters (which then run as the model does)."""
    import copy

    model = nn.Sequential(layer()).to(DEVICE)
    with pytest.raises(RuntimeError, match=r"does not support TorchScript \(torch\.jit\.script\).*"
                                           r"torch\.jit\.script\(tritonrnn\.unconvert\(copy\.deepcopy\(model\)\)\)"):
        torch.jit.script(model)
    scripted = torch.jit.script(tritonrnn.unconvert(copy.deepcopy(model)))
    x = torch.randn(5, 2, 3, device=DEVICE) if isinstance(model[0], nn.RNNBase) else torch.randn(2, 3, device=DEVICE)
    expected, actual = model(x), scripted(x)
    for a, e in zip(*(((t,) if torch.is_tensor(t) else t for t in (actual, expected))), strict=True):
        assert_close(a, e, torch.float32)
