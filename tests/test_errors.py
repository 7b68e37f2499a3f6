"""Bad arguments, shapes and dtypes raise what torch.nn raises: the same type, the same message.

The oracle is torch.nn on the CPU (cuDNN words some of its errors differently); ours runs on the
device under test.
"""
import pytest
import torch
from torch import nn

import tritonrnn
from conftest import DEVICE


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
