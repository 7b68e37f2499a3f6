"""Per-sample gradients: torch.func's vmap(grad(loss)) with functional_call over tritonrnn.RNN and
RNNCell, against torch.nn's per-sample gradients in float64.

torch.nn.RNN itself cannot run under vmap ("Batching rule not implemented for aten::rnn_tanh"), so
the oracle is its definition: one torch.nn forward and backward per sample.
"""
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import tritonrnn
from conftest import DEVICE, assert_close
from tritonrnn import kernels

N, T, I, H = 3, 4, 5, 6
F64 = torch.float64


def _pair(torch_class, our_class, **kwargs):
    torch.manual_seed(0)
    oracle = torch_class(I, H, **kwargs).to(DEVICE, F64)
    ours = our_class(I, H, **kwargs, device=DEVICE, dtype=F64)
    ours.load_state_dict(oracle.state_dict())
    return ours, oracle


def _loss(model, params, *inputs):
    """A loss that reaches every gradient: the output (with weights, so that rows differ) and h_n."""
    result = functional_call(model, params, inputs)
    out, h_n = result if isinstance(result, tuple) else (result, result)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    return (out * weights).sum() + (h_n ** 2).sum()


def _per_sample_grads(ours, oracle, samples, in_dims):
    """(ours through vmap(grad), torch.nn's through one backward per sample), per parameter."""
    params = {name: p.detach() for name, p in ours.named_parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tritonrnn")  # the fused backward, not the fallback BPTT
        actual = vmap(grad(lambda p, *inputs: _loss(ours, p, *inputs)), in_dims=(None, *in_dims))(params, *samples)
    expected = {name: [] for name in params}
    for i in range(N):
        sample = [s if dim is None else s.select(dim, i) for s, dim in zip(samples, in_dims, strict=True)]
        oracle.zero_grad()
        _loss(oracle, dict(oracle.named_parameters()), *sample).backward()
        for name, p in oracle.named_parameters():
            expected[name].append(p.grad.clone())
    return actual, {name: torch.stack(grads) for name, grads in expected.items()}


def _compare(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], F64, name)
    weight_ih = next(iter(actual.values()))
    assert not torch.allclose(weight_ih[0], weight_ih[1]), "the samples got the same gradient"


RNN_CASES = {
    "unbatched": {},
    "unbatched-h0": {"h0": "per-sample"},
    "B2-shared-h0": {"batch": 2, "h0": "shared"},
    "B2-h0-batch_first-2layers-bidir-relu": {"batch": 2, "h0": "per-sample", "batch_first": True, "num_layers": 2,
                                              "bidirectional": True, "nonlinearity": "relu"},
}


@pytest.mark.parametrize("case", RNN_CASES, ids=str)
def test_rnn_per_sample_grads_match_torch(case):
    kwargs = dict(RNN_CASES[case])
    batch, h0 = kwargs.pop("batch", None), kwargs.pop("h0", None)
    ours, oracle = _pair(nn.RNN, tritonrnn.RNN, **kwargs)
    D, L = 2 if kwargs.get("bidirectional") else 1, kwargs.get("num_layers", 1)
    # Each sample: [T, I] unbatched (the module runs it as B = 1), or [T, batch, I] / [batch, T, I].
    shape = (T, I) if batch is None else (batch, T, I) if kwargs.get("batch_first") else (T, batch, I)
    samples, in_dims = [torch.randn(N, *shape, dtype=F64, device=DEVICE)], [0]
    hx_shape = (L * D, H) if batch is None else (L * D, batch, H)
    if h0 == "per-sample":
        samples.append(torch.randn(N, *hx_shape, dtype=F64, device=DEVICE)), in_dims.append(0)
    elif h0 == "shared":
        samples.append(torch.randn(*hx_shape, dtype=F64, device=DEVICE)), in_dims.append(None)
    _compare(*_per_sample_grads(ours, oracle, samples, in_dims))


@pytest.mark.parametrize("with_h0", [False, True], ids=["no-h0", "h0"])
def test_rnn_cell_per_sample_grads_match_torch(with_h0):
    ours, oracle = _pair(nn.RNNCell, tritonrnn.RNNCell, nonlinearity="relu")
    samples = [torch.randn(N, I, dtype=F64, device=DEVICE)] + [torch.randn(N, H, dtype=F64, device=DEVICE)] * with_h0
    _compare(*_per_sample_grads(ours, oracle, samples, [0] * len(samples)))


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_rnn_layer_with_lengths_per_sample_grads(reverse):
    """Lengths (a PackedSequence's) under vmap, against the layer's eager autograd once per sample."""
    torch.manual_seed(1)
    B = 3
    x, h0 = torch.randn(N, T, B, I, dtype=F64, device=DEVICE), torch.randn(N, B, H, dtype=F64, device=DEVICE)
    weights = {"w_ih": torch.randn(H, I, dtype=F64, device=DEVICE), "w_hh": torch.randn(H, H, dtype=F64, device=DEVICE)}
    lengths = torch.tensor([T, 1, T - 1], device=DEVICE)

    def loss(weights, x, h0):
        out, h_n = tritonrnn.functional.rnn_layer(x, h0, **weights, lengths=lengths, reverse=reverse)
        return (out * out.detach().cos()).sum() + (h_n ** 2).sum()

    actual = vmap(grad(loss), in_dims=(None, 0, 0))(weights, x, h0)
    for i in range(N):
        params = {name: w.clone().requires_grad_() for name, w in weights.items()}
        expected = torch.autograd.grad(loss(params, x[i], h0[i]), list(params.values()))
        for name, expected_grad in zip(weights, expected, strict=True):
            assert_close(actual[name][i], expected_grad, F64, f"{name}[{i}]")


def test_ensemble_of_models_under_vmap():
    """vmap over stacked parameters (torch.func.stack_module_state): one W_hh per model."""
    torch.manual_seed(2)
    models = [tritonrnn.RNN(I, H, device=DEVICE, dtype=F64) for _ in range(2)]
    params, _ = torch.func.stack_module_state(models)
    x = torch.randn(T, 2, I, dtype=F64, device=DEVICE)

    def loss(params, x):
        return _loss(models[0], params, x)

    actual = vmap(grad(loss), in_dims=(0, None))(params, x)
    for i, model in enumerate(models):
        model.zero_grad()
        _loss(model, dict(model.named_parameters()), x).backward()
        for name, p in model.named_parameters():
            assert_close(actual[name][i], p.grad, F64, f"{name}[{i}]")


@pytest.mark.filterwarnings("ignore:tritonrnn. double backward")
def test_second_derivative_under_torch_func():
    """grad of grad: the inner gradient must stay differentiable (the PyTorch BPTT), as with create_graph."""
    torch.manual_seed(3)
    model = tritonrnn.RNN(I, H, device=DEVICE, dtype=F64)
    x = torch.randn(T, 2, I, dtype=F64, device=DEVICE)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def grad_norm(params):
        return sum(g.pow(2).sum() for g in grad(lambda p: _loss(model, p, x))(params).values())

    actual = grad(grad_norm)(params)
    first = torch.autograd.grad(_loss(model, dict(model.named_parameters()), x), list(model.parameters()),
                                create_graph=True)
    expected = torch.autograd.grad(sum(g.pow(2).sum() for g in first), list(model.parameters()))
    for (name, _), expected_grad in zip(model.named_parameters(), expected, strict=True):
        assert_close(actual[name], expected_grad, F64, name)


def test_samples_share_one_kernel_launch(monkeypatch):
    """vmap folds the samples into the kernels' batch: as many launches as for a single sample."""
    launches = []
    for layout in ("sequence", "stepwise"):
        monkeypatch.setitem(kernels.launch.KERNELS, layout, _Counted(kernels.launch.KERNELS[layout], launches))
    ours, _ = _pair(nn.RNN, tritonrnn.RNN)
    params = {name: p.detach() for name, p in ours.named_parameters()}
    x = torch.randn(N, T, I, dtype=F64, device=DEVICE)
    grad(lambda p, x: _loss(ours, p, x))(params, x[0])
    single = len(launches)
    vmap(grad(lambda p, x: _loss(ours, p, x)), in_dims=(None, 0))(params, x)
    assert single > 0 and len(launches) == 2 * single


class _Counted:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]
