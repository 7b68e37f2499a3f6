"""tritonrnn.RNN and tritonrnn.RNNCell against torch.nn.RNN and torch.nn.RNNCell.

The oracle is torch.nn in float64 with the same state_dict; every test compares outputs, h_n and
the gradients of the input, h0 and every parameter, using the loss (out*g).sum() + (h_n*g_n).sum().
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, PackedSequence

import tritonrnn
from conftest import DEVICE, DTYPES, assert_close, dtype_id
from tritonrnn import kernels

I, H = 7, 19

CONFIGS = {
    "default": {},
    "relu": {"nonlinearity": "relu"},
    "nobias": {"bias": False},
    "batch_first": {"batch_first": True},
    "2layers": {"num_layers": 2},
    "bidirectional": {"bidirectional": True},
    "3layers-bidir-relu-batch_first": {"num_layers": 3, "bidirectional": True, "nonlinearity": "relu",
                                       "batch_first": True},
    "2layers-dropout-eval": {"num_layers": 2, "dropout": 0.5},
}


def _pair(dtype, **kwargs):
    """(ours in dtype on DEVICE, torch.nn's float64 oracle) with the same parameters."""
    torch.manual_seed(0)
    oracle = nn.RNN(I, H, **kwargs).double().to(DEVICE)
    ours = tritonrnn.RNN(I, H, **kwargs, device=DEVICE, dtype=dtype)
    ours.load_state_dict(oracle.state_dict())
    return ours, oracle


def _run(module, x, h0, g, g_n, dtype):
    """Forward and backward with the loss that reaches every gradient; returns everything compared."""
    x = x.to(dtype).detach().requires_grad_()
    h0 = None if h0 is None else h0.to(dtype).detach().requires_grad_()
    out, h_n = module(x, h0) if not isinstance(x, PackedSequence) else module(x, h0)
    ((out * g.to(dtype)).sum() + (h_n * g_n.to(dtype)).sum()).backward()
    grads = {f"d{name}": p.grad for name, p in module.named_parameters()}
    grads["dx"] = x.grad
    if h0 is not None:
        grads["dh0"] = h0.grad
    return {"out": out, "h_n": h_n, **grads}


def _compare(ours, oracle, dtype):
    assert ours.keys() == oracle.keys()
    for name in oracle:
        assert ours[name].dtype == dtype, name
        assert_close(ours[name], oracle[name], dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_h0", [False, True], ids=["no-h0", "h0"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_rnn_matches_torch(config, with_h0, dtype):
    kwargs = CONFIGS[config]
    ours, oracle = _pair(dtype, **kwargs)
    if "dropout" in kwargs:
        ours.eval(), oracle.eval()
    T, B = 6, 5
    D = 2 if kwargs.get("bidirectional") else 1
    L = kwargs.get("num_layers", 1)
    shape = (B, T, I) if kwargs.get("batch_first") else (T, B, I)
    x = torch.randn(*shape, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(L * D, B, H, dtype=torch.float64, device=DEVICE) if with_h0 else None
    g = torch.randn(*shape[:2], D * H, dtype=torch.float64, device=DEVICE)
    g_n = torch.randn(L * D, B, H, dtype=torch.float64, device=DEVICE)
    _compare(_run(ours, x, h0, g, g_n, dtype), _run(oracle, x, h0, g, g_n, torch.float64), dtype)


@pytest.mark.parametrize("with_h0", [False, True], ids=["no-h0", "h0"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_rnn_empty_batch_as_torch(config, with_h0):
    """Batch 0 (Opacus's Poisson sampling draws such batches; torch's test_RNN_input_size_zero): empty
    outputs of torch's shapes, and a backward that gives torch's empty and zero gradients."""
    kwargs = CONFIGS[config]
    ours, oracle = _pair(torch.float64, **kwargs)
    T, D, L = 4, 2 if kwargs.get("bidirectional") else 1, kwargs.get("num_layers", 1)
    shape = (0, T, I) if kwargs.get("batch_first") else (T, 0, I)
    x = torch.randn(*shape, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(L * D, 0, H, dtype=torch.float64, device=DEVICE) if with_h0 else None
    g = torch.randn(*shape[:2], D * H, dtype=torch.float64, device=DEVICE)
    g_n = torch.randn(L * D, 0, H, dtype=torch.float64, device=DEVICE)
    _compare(_run(ours, x, h0, g, g_n, torch.float64), _run(oracle, x, h0, g, g_n, torch.float64), torch.float64)


@pytest.mark.parametrize(("batch", "input_size"), [(0, I), (3, 0)], ids=["batch-0", "input_size-0"])
def test_rnn_cell_degenerate_shapes_as_torch(batch, input_size):
    """A cell takes batch 0 and (unlike torch.nn.RNN, as torch.nn.RNNCell) input_size 0."""
    torch.manual_seed(0)
    oracle = nn.RNNCell(input_size, H).double().to(DEVICE)
    ours = tritonrnn.RNNCell(input_size, H, device=DEVICE, dtype=torch.float64)
    ours.load_state_dict(oracle.state_dict())
    x0 = torch.randn(batch, input_size, dtype=torch.float64, device=DEVICE)
    h00, g = (torch.randn(batch, H, dtype=torch.float64, device=DEVICE) for _ in range(2))
    results = []
    for module in (ours, oracle):
        x, h0 = x0.clone().requires_grad_(), h00.clone().requires_grad_()
        out = module(x, h0)
        (out * g).sum().backward()
        results.append({"out": out, "dx": x.grad, "dh0": h0.grad,
                        **{f"d{n}": p.grad for n, p in module.named_parameters()}})
    _compare(*results, torch.float64)


@pytest.mark.parametrize("config", ["default", "2layers", "bidirectional"])
def test_rnn_unbatched(config):
    ours, oracle = _pair(torch.float64, **CONFIGS[config])
    D = 2 if oracle.bidirectional else 1
    x = torch.randn(4, I, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(oracle.num_layers * D, H, dtype=torch.float64, device=DEVICE)
    g = torch.randn(4, D * H, dtype=torch.float64, device=DEVICE)
    g_n = torch.randn_like(h0)
    _compare(_run(ours, x, h0, g, g_n, torch.float64), _run(oracle, x, h0, g, g_n, torch.float64), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("config", ["default", "3layers-bidir-relu-batch_first"])
def test_rnn_packed_sequence(config, enforce_sorted, dtype):
    kwargs = CONFIGS[config]
    ours, oracle = _pair(dtype, **kwargs)
    T, B = 7, 5
    D = 2 if kwargs.get("bidirectional") else 1
    L = kwargs.get("num_layers", 1)
    lengths = torch.tensor([7, 5, 5, 2, 1]) if enforce_sorted else torch.tensor([2, 7, 1, 5, 4])
    batch_first = kwargs.get("batch_first", False)
    padded = torch.randn(*((B, T) if batch_first else (T, B)), I, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(L * D, B, H, dtype=torch.float64, device=DEVICE)
    g_n = torch.randn(L * D, B, H, dtype=torch.float64, device=DEVICE)
    results = []
    for module, run_dtype in ((ours, dtype), (oracle, torch.float64)):
        x = padded.to(run_dtype).requires_grad_()
        h = h0.to(run_dtype).requires_grad_()
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted)
        out, h_n = module(packed, h)
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        g = torch.randn(out.data.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        ((out.data * g.to(DEVICE, run_dtype)).sum() + (h_n * g_n.to(run_dtype)).sum()).backward()
        unpacked, out_lengths = pad_packed_sequence(out, batch_first=batch_first)
        assert torch.equal(out_lengths, lengths)
        results.append({"out": unpacked, "h_n": h_n, "dx": x.grad, "dh0": h.grad,
                        **{f"d{n}": p.grad for n, p in module.named_parameters()}})
    _compare(*results, dtype)


def test_rnn_stepwise_path_matches_torch(monkeypatch):
    """Hidden sizes too large for one program take the per-step kernel: force it at a small H."""
    monkeypatch.setitem(kernels.configs.SEQUENCE_MAX_H, 8, 0)
    monkeypatch.setitem(kernels.configs.PERSISTENT_MAX_H, 8, 0)
    assert tritonrnn.kernel_path(6, H, torch.float64) == "stepwise"
    kwargs = CONFIGS["3layers-bidir-relu-batch_first"]
    ours, oracle = _pair(torch.float64, **kwargs)
    x = torch.randn(5, 6, I, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(6, 5, H, dtype=torch.float64, device=DEVICE)
    g = torch.randn(5, 6, 2 * H, dtype=torch.float64, device=DEVICE)
    g_n = torch.randn_like(h0)
    _compare(_run(ours, x, h0, g, g_n, torch.float64), _run(oracle, x, h0, g, g_n, torch.float64), torch.float64)


def test_dropout_applies_between_layers_in_training_only():
    """With p = 1 dropout zeroes every input of layer 2 but not the output: deterministic to compare."""
    ours, oracle = _pair(torch.float64, num_layers=2, dropout=1.0)
    x = torch.randn(4, 3, I, dtype=torch.float64, device=DEVICE)
    out, h_n = ours(x)
    ref_out, ref_hn = oracle(x)
    assert_close(out, ref_out, torch.float64, "out")
    assert_close(h_n, ref_hn, torch.float64, "h_n")
    assert out.abs().sum() > 0  # not applied after the last layer
    ours.eval(), oracle.eval()
    assert_close(ours(x)[0], oracle(x)[0], torch.float64, "eval out")
    assert not torch.allclose(ours(x)[0], out)


def test_dropout_between_layers_p_and_shapes(monkeypatch):
    """Dropout hits each layer's whole output (both directions) but the last, with p, in training."""
    calls = []

    def spy(x, p, training):
        calls.append((tuple(x.shape), p, training))
        return x * 2  # deterministic stand-in, to see that its result is what the next layer reads

    monkeypatch.setattr(tritonrnn.functional.F, "dropout", spy)
    model = tritonrnn.RNN(I, H, num_layers=3, bidirectional=True, dropout=0.3, device=DEVICE, dtype=torch.float64)
    oracle = nn.RNN(I, H, num_layers=3, bidirectional=True, device=DEVICE, dtype=torch.float64)
    oracle.load_state_dict(model.state_dict())
    x = torch.randn(4, 2, I, dtype=torch.float64, device=DEVICE)
    out, _ = model(x)
    assert calls == [((4, 2, 2 * H), 0.3, True)] * 2
    # The same with torch: scale the layer inputs of layers 1 and 2 by 2 by hand.
    h = x
    for layer in range(3):
        single = nn.RNN(h.shape[-1], H, bidirectional=True, device=DEVICE, dtype=torch.float64)
        single.load_state_dict({k.replace(f"_l{layer}", "_l0"): v for k, v in oracle.state_dict().items()
                                if f"_l{layer}" in k})
        h = single(h)[0]
        if layer < 2:
            h = h * 2
    assert_close(out, h, torch.float64, "out")
    calls.clear()
    model.eval()
    model(x)
    assert calls == []


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kwargs", [{}, {"nonlinearity": "relu"}, {"bias": False}], ids=str)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no-h0"])
def test_rnn_cell_matches_torch(with_h0, batched, kwargs, dtype):
    torch.manual_seed(0)
    oracle = nn.RNNCell(I, H, **kwargs).double().to(DEVICE)
    ours = tritonrnn.RNNCell(I, H, **kwargs, device=DEVICE, dtype=dtype)
    ours.load_state_dict(oracle.state_dict())
    shape = (3,) if batched else ()
    x0 = torch.randn(*shape, I, dtype=torch.float64, device=DEVICE)
    h00 = torch.randn(*shape, H, dtype=torch.float64, device=DEVICE) if with_h0 else None
    g = torch.randn(*shape, H, dtype=torch.float64, device=DEVICE)
    results = []
    for module, run_dtype in ((ours, dtype), (oracle, torch.float64)):
        x = x0.to(run_dtype).requires_grad_()
        h0 = None if h00 is None else h00.to(run_dtype).requires_grad_()
        out = module(x, h0)
        (out * g.to(run_dtype)).sum().backward()
        results.append({"out": out, "dx": x.grad, **({"dh0": h0.grad} if h0 is not None else {}),
                        **{f"d{n}": p.grad for n, p in module.named_parameters()}})
    _compare(*results, dtype)


# The examples users start from (torch.nn's documentation), run with both implementations.

def test_example_rnn_100_20():
    torch.manual_seed(1)
    oracle = nn.RNN(100, 20).double().to(DEVICE)
    ours = tritonrnn.RNN(100, 20, device=DEVICE, dtype=torch.float64)
    ours.load_state_dict(oracle.state_dict())
    x = torch.randn(10, 3, 100, dtype=torch.float64, device=DEVICE)
    h0 = torch.zeros(1, 3, 20, dtype=torch.float64, device=DEVICE)
    out, h_n = ours(x, h0)
    ref_out, ref_hn = oracle(x, h0)
    assert out.shape == (10, 3, 20) and h_n.shape == (1, 3, 20)
    assert_close(out, ref_out, torch.float64, "out")
    assert_close(h_n, ref_hn, torch.float64, "h_n")


def test_example_two_layers():
    torch.manual_seed(2)
    oracle = nn.RNN(10, 20, 2).double().to(DEVICE)
    ours = tritonrnn.RNN(10, 20, 2, device=DEVICE, dtype=torch.float64)
    ours.load_state_dict(oracle.state_dict())
    x = torch.randn(5, 3, 10, dtype=torch.float64, device=DEVICE)
    h0 = torch.randn(2, 3, 20, dtype=torch.float64, device=DEVICE)
    for a, b in zip(ours(x, h0), oracle(x, h0), strict=True):
        assert_close(a, b, torch.float64)


def test_example_cell_loop_and_stacked_cells():
    torch.manual_seed(3)
    cells = [nn.RNNCell(10, 20).double().to(DEVICE), nn.RNNCell(20, 20).double().to(DEVICE)]
    ours = [tritonrnn.RNNCell(10, 20, device=DEVICE, dtype=torch.float64),
            tritonrnn.RNNCell(20, 20, device=DEVICE, dtype=torch.float64)]
    for a, b in zip(ours, cells, strict=True):
        a.load_state_dict(b.state_dict())
    x = torch.randn(8, 3, 10, dtype=torch.float64, device=DEVICE)

    def loop(layers):  # 8 steps of one cell, and two stacked cells
        h1 = h2 = None
        single, stacked = [], []
        h = torch.zeros(3, 20, dtype=torch.float64, device=DEVICE)
        for t in range(8):
            h = layers[0](x[t], h)
            single.append(h)
            h1 = layers[0](x[t], h1)
            h2 = layers[1](h1, h2)
            stacked.append(h2)
        return torch.stack(single), torch.stack(stacked)

    for a, b in zip(loop(ours), loop(cells), strict=True):
        assert_close(a, b, torch.float64)


# The module contract: parameters, state_dict, init, repr, conversion.

@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_rnn_parameters_and_state_dict_as_torch(config):
    kwargs = CONFIGS[config]
    oracle, ours = nn.RNN(I, H, **kwargs), tritonrnn.RNN(I, H, **kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in oracle.named_parameters()]
    assert list(ours.state_dict()) == list(oracle.state_dict())
    assert repr(ours) == f"tritonrnn.{oracle!r}"  # the same arguments, named as ours
    bound = 1 / H ** 0.5
    for p in ours.parameters():
        assert p.abs().max() <= bound and p.std() > bound / 3  # U(-1/sqrt(H), 1/sqrt(H)), like torch
    ours.load_state_dict(oracle.state_dict())
    for a, b in zip(ours.parameters(), oracle.parameters(), strict=True):
        assert torch.equal(a, b)


def test_positional_arguments_as_torch():
    oracle = nn.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    ours = tritonrnn.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    assert repr(ours) == f"tritonrnn.{oracle!r}"  # the same arguments, named as ours
    assert ours.nonlinearity == "relu" and ours.batch_first and ours.bidirectional and not ours.bias
    cell = tritonrnn.RNNCell(3, 4, False, "relu")
    assert repr(cell) == f"tritonrnn.{nn.RNNCell(3, 4, False, 'relu')!r}"


def test_module_survives_deepcopy_and_dtype_moves():
    ours, oracle = _pair(torch.float32)
    x = torch.randn(3, 2, I, device=DEVICE)
    clone = copy.deepcopy(ours)
    assert_close(clone(x)[0], ours(x)[0], torch.float32)
    ours.double()
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    assert_close(ours(x.double())[0], oracle(x.double())[0], torch.float64)


def test_convert_replaces_modules_and_keeps_parameters():
    torch.manual_seed(4)
    model = nn.Sequential(nn.RNN(I, H, num_layers=2), nn.Linear(H, 3)).double().to(DEVICE)
    nested = nn.ModuleDict({"inner": nn.ModuleList([nn.RNNCell(I, H).double().to(DEVICE)])})
    x = torch.randn(4, 2, I, dtype=torch.float64, device=DEVICE)
    expected = model[0](x)
    params = list(model.parameters())
    assert tritonrnn.convert(model) is model
    assert type(model[0]) is tritonrnn.RNN
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    for a, b in zip(model[0](x), expected, strict=True):
        assert_close(a, b, torch.float64)
    tritonrnn.convert(nested)
    assert type(nested["inner"][0]) is tritonrnn.RNNCell
    bare = tritonrnn.convert(nn.RNN(I, H))
    assert type(bare) is tritonrnn.RNN


def test_unconvert_gives_back_torch_modules_with_the_same_parameters():
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": tritonrnn.RNN(I, H, num_layers=2, nonlinearity="relu", bidirectional=True),
                           "cells": nn.ModuleList([tritonrnn.RNNCell(I, H, nonlinearity="relu")])})
    model.double().to(DEVICE).eval()
    x = torch.randn(4, 2, I, dtype=torch.float64, device=DEVICE)
    expected = model["rnn"](x), model["cells"][0](x[0])
    params, keys = list(model.parameters()), list(model.state_dict())
    assert tritonrnn.unconvert(model) is model
    assert type(model["rnn"]) is nn.RNN and type(model["cells"][0]) is nn.RNNCell
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys and not model.training
    assert model["rnn"].nonlinearity == model["cells"][0].nonlinearity == "relu"
    for a, b in zip((*model["rnn"](x), model["cells"][0](x[0])), (*expected[0], expected[1]), strict=True):
        assert_close(a, b, torch.float64)
    assert type(tritonrnn.convert(model)["rnn"]) is tritonrnn.RNN  # and back again
    assert type(tritonrnn.unconvert(tritonrnn.RNN(I, H))) is nn.RNN  # a bare layer: its replacement


def test_converted_model_prints_as_tritonrnn_with_torch_state_dict_keys():
    model = nn.Sequential(nn.RNN(100, 20, num_layers=2, bidirectional=True), nn.RNNCell(20, 8, nonlinearity="relu"))
    keys = list(model.state_dict())
    expected = repr(model).replace(": RNN(", ": tritonrnn.RNN(").replace(": RNNCell(", ": tritonrnn.RNNCell(")
    tritonrnn.convert(model)
    assert repr(model) == expected
    assert "(0): tritonrnn.RNN(100, 20, num_layers=2, bidirectional=True)" in repr(model)
    assert list(model.state_dict()) == keys
    assert repr(tritonrnn.RNN(100, 20)) == "tritonrnn.RNN(100, 20)"


# Which implementation ran.

class _LaunchCounter:
    """Wraps a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def counted_kernels(monkeypatch):
    counters = {}
    for layout, name in (("sequence", "rnn_sequence_kernel"), ("stepwise", "rnn_step_kernel")):
        counters[name] = _LaunchCounter(kernels.launch.KERNELS[layout])
        monkeypatch.setitem(kernels.launch.KERNELS, layout, counters[name])
    for name in ("rnn_tanh", "rnn_relu", "rnn_tanh_cell", "rnn_relu_cell"):
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"torch._VF.{_name} ran instead of the Triton kernels")
        monkeypatch.setattr(torch._VF, name, refuse)
    return counters


def test_triton_kernels_ran_not_torch(counted_kernels):
    model = tritonrnn.RNN(I, H, num_layers=2, bidirectional=True, device=DEVICE)
    out, h_n = model(torch.randn(5, 3, I, device=DEVICE))
    (out.sum() + h_n.sum()).backward()
    # 2 layers x 2 directions, forward and backward: one launch each of the sequence kernel.
    assert counted_kernels["rnn_sequence_kernel"].launches == 8
    cell = tritonrnn.RNNCell(I, H, device=DEVICE)
    cell(torch.randn(3, I, device=DEVICE)).sum().backward()
    assert counted_kernels["rnn_step_kernel"].launches == 2


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU dispatch")
def test_plain_cpu_runs_torch(monkeypatch):
    """Without the interpreter, CPU tensors run torch's own RNN (as `tritonrnn info` says)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tritonrnn.backend(torch.device("cpu")) == "torch"
    counter = _LaunchCounter(kernels.launch.KERNELS["sequence"])
    monkeypatch.setitem(kernels.launch.KERNELS, "sequence", counter)
    ours, oracle = _pair(torch.float64, num_layers=2)
    x = torch.randn(4, 2, I, dtype=torch.float64)
    assert torch.equal(ours(x)[0], oracle(x)[0])
    assert counter.launches == 0
