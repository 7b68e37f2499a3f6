"""Differentially private training with Opacus (tritonrnn/privacy.py): per-sample gradients against
Opacus's own DPRNN / DPRNNCell (the same weights, float64), per-sample gradient norms of ghost clipping
against the norms of the materialised per-sample gradients, and PrivacyEngine training runs.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

opacus = pytest.importorskip("opacus", reason="the dp extra (pip install tritonrnn[dp]) is not installed")
from opacus import GradSampleModule, PrivacyEngine  # noqa: E402
from opacus.grad_sample import GradSampleModuleFastGradientClipping  # noqa: E402
from opacus.layers import DPRNN  # noqa: E402
from opacus.layers.dp_rnn import DPRNNCell  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

import tritonrnn  # noqa: E402
from conftest import DEVICE, assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
B, T, I, H = 3, 4, 3, 5
F64 = torch.float64

# Opacus warns that a full backward hook fires at the outputs when no input needs a gradient: expected here.
pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Secure RNG turned off")]


class Model(nn.Module):
    """An RNN and a linear head over its output and its h_n (so both gradients reach the RNN)."""

    def __init__(self, rnn, uses=("output", "h_n")):
        super().__init__()
        self.rnn, self.uses = rnn, uses
        directions = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(directions * H, 2, dtype=F64, device=DEVICE)
        self.time_dim = 1 if rnn.batch_first else 0

    def forward(self, x, h0=None):
        # (Opacus detaches every forward argument: no None among them)
        output, h_n = self.rnn(x) if h0 is None else self.rnn(x, h0)
        score = 0
        if "output" in self.uses:
            score = self.head(output).sum(self.time_dim)
        if "h_n" in self.uses:
            score = score + h_n.sum(0)[:, :2].pow(2)
        return score


CASES = {
    # GradSampleModule(batch_first, loss_reduction) as Opacus configures it, the layer's arguments, the outputs used
    "L1-tanh-time_major-sum": dict(gsm_batch_first=False, loss_reduction="sum", rnn={}, h0=False),
    "L2-bidir-relu-batch_first-h0": dict(rnn=dict(num_layers=2, bidirectional=True, batch_first=True,
                                                  nonlinearity="relu"), h0=True),
    "L2-h_n-only-no_bias": dict(rnn=dict(num_layers=2, batch_first=True, bias=False), h0=True, uses=("h_n",)),
    # An input that needs a gradient: torch runs Opacus's hook after the layer's backward, not before it
    "L1-input-needs-grad": dict(rnn=dict(batch_first=True), h0=True, input_grad=True),
}


def _pair(rnn_kwargs):
    torch.manual_seed(0)
    oracle = nn.RNN(I, H, **rnn_kwargs, dtype=F64, device=DEVICE)
    ours = tritonrnn.RNN(I, H, **rnn_kwargs, dtype=F64, device=DEVICE)
    ours.load_state_dict(oracle.state_dict())
    dprnn = DPRNN(I, H, **rnn_kwargs).to(DEVICE, F64)
    dprnn.load_state_dict(oracle.state_dict())
    return ours, dprnn


def _grad_samples(rnn, case, x, h0, mode="hooks"):
    """Per-sample gradients of the layer's parameters (or, in ghost mode, their norms) after one backward."""
    torch.manual_seed(1)  # the same head for both layers
    model = Model(rnn, case.get("uses", ("output", "h_n")))
    cls = GradSampleModuleFastGradientClipping if mode == "ghost" else GradSampleModule
    gsm = cls(model, batch_first=case.get("gsm_batch_first", True),
              loss_reduction=case.get("loss_reduction", "mean"))
    loss = gsm(x, h0).pow(2).sum(1)
    (loss.sum() if case.get("loss_reduction") == "sum" else loss.mean()).backward()
    samples = {name: p._norm_sample if mode == "ghost" else p.grad_sample for name, p in rnn.named_parameters()}
    gsm.cleanup()  # Opacus's hooks and attributes off the layer
    return samples


def _inputs(ours, case):
    torch.manual_seed(2)
    x = torch.randn(*((B, T) if ours.batch_first else (T, B)), I, dtype=F64, device=DEVICE)
    directions = 2 if ours.bidirectional else 1
    h0 = torch.randn(ours.num_layers * directions, B, H, dtype=F64, device=DEVICE) if case["h0"] else None
    return x.requires_grad_(case.get("input_grad", False)), h0


@pytest.mark.parametrize("name", CASES)
def test_rnn_per_sample_grads_match_dprnn(name):
    case = CASES[name]
    ours, dprnn = _pair(case["rnn"])
    x, h0 = _inputs(ours, case)
    actual, expected = _grad_samples(ours, case, x, h0), _grad_samples(dprnn, case, x, h0)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_close(actual[key], expected[key], F64, key)
    weight_hh = actual["weight_hh_l0"]
    assert weight_hh.shape == (B, H, H) and not torch.allclose(weight_hh[0], weight_hh[1])


@pytest.mark.parametrize("name", ["L2-bidir-relu-batch_first-h0", "L1-tanh-time_major-sum"])
def test_rnn_ghost_norms_match_materialised_grads(name):
    """The norm sampler of ghost clipping against the norms of the hooks mode's per-sample gradients
    (the first case takes the Gram products, T * T <= H * I; the second, T * T > H * I, the gradients)."""
    case = dict(CASES[name])
    if name == "L1-tanh-time_major-sum":
        case["T"] = 9  # T * T = 81 > H * I = 15
    ours, _ = _pair(case["rnn"])
    x, h0 = _inputs(ours, case)
    if "T" in case:
        x = torch.randn(case["T"], B, I, dtype=F64, device=DEVICE)
    grads = _grad_samples(ours, case, x, h0)
    norms = _grad_samples(ours, case, x, h0, mode="ghost")
    for key, grad in grads.items():
        assert_close(norms[key], grad.flatten(1).norm(dim=1), F64, key)


def test_rnn_cell_per_sample_grads_match_dprnn_cell():
    """A cell unrolled over T steps (Opacus sums each step's per-sample gradients), h0 given, relu."""
    torch.manual_seed(0)
    ours = tritonrnn.RNNCell(I, H, nonlinearity="relu", dtype=F64, device=DEVICE)
    oracle = DPRNNCell(I, H, True, nonlinearity="relu").to(DEVICE, F64)
    with torch.no_grad():
        for mine, theirs in [("weight_ih", "ih.weight"), ("weight_hh", "hh.weight"), ("bias_ih", "ih.bias"),
                             ("bias_hh", "hh.bias")]:
            oracle.get_parameter(theirs).copy_(getattr(ours, mine))
    x, h0 = torch.randn(T, B, I, dtype=F64, device=DEVICE), torch.randn(B, H, dtype=F64, device=DEVICE)

    def per_sample(cell):
        gsm = GradSampleModule(cell)
        h = h0
        for t in range(T):
            h = gsm(x[t], h)
        h.pow(2).sum(1).mean().backward()
        return {name: p.grad_sample for name, p in cell.named_parameters()}

    actual, expected = per_sample(ours), per_sample(oracle)
    for mine, theirs in [("weight_ih", "ih.weight"), ("weight_hh", "hh.weight"), ("bias_ih", "ih.bias"),
                         ("bias_hh", "hh.bias")]:
        assert_close(actual[mine], expected[theirs], F64, mine)


def _private_training(engine, mode: str, samples: int, batch_size: int, lr: float, **options) -> tuple:
    """A learnable task for Model(tritonrnn.RNN) made private by `engine` in `mode` ("hooks" or "ghost"):
    the layer, and make_private's model, optimizer, criterion and data loader."""
    torch.manual_seed(0)
    rnn = tritonrnn.RNN(I, H, batch_first=True, dtype=F64, device=DEVICE)
    model = Model(rnn)
    x = torch.randn(samples, T, I, dtype=F64, device=DEVICE)
    y = (x.sum((1, 2)) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    assert ModuleValidator.is_valid(model)
    options.update(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), data_loader=loader,
                   noise_multiplier=0.1, max_grad_norm=1.0)
    if mode == "ghost":
        return rnn, *engine.make_private(**options, criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost")
    model, optimizer, loader = engine.make_private(**options)
    return rnn, model, optimizer, nn.CrossEntropyLoss(), loader


def _cell_pair(nonlinearity="tanh"):
    """A tritonrnn.RNNCell and Opacus's DPRNNCell with the same float64 weights."""
    torch.manual_seed(0)
    ours = tritonrnn.RNNCell(I, H, nonlinearity=nonlinearity, dtype=F64, device=DEVICE)
    oracle = DPRNNCell(I, H, True, nonlinearity=nonlinearity).to(DEVICE, F64)
    with torch.no_grad():
        for mine, theirs in CELL_NAMES.items():
            oracle.get_parameter(theirs).copy_(getattr(ours, mine))
    return ours, oracle


CELL_NAMES = {"weight_ih": "ih.weight", "weight_hh": "hh.weight", "bias_ih": "ih.bias", "bias_hh": "hh.bias"}


class CellLoop(nn.Module):
    """The usual cell loop: h = None, then h = cell(x_t, h) for every step; a head over the last state."""

    def __init__(self, cell, hx_keyword=False):
        super().__init__()
        self.cell, self.hx_keyword = cell, hx_keyword

    def forward(self, x):
        h = None
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], hx=h) if self.hx_keyword else self.cell(x[:, t], h)
        return h[:, :2]


@pytest.mark.parametrize("hx", ["positional", "keyword"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_rnn_cell_loop_from_hx_none_matches_dprnn_cell(mode, hx):
    """A cell loop whose first step passes hx=None (Opacus detaches every forward argument), hx passed
    positionally or by keyword (Opacus's forward hook sees positional arguments only): per-sample gradients
    (hooks) or their norms (ghost) against DPRNNCell's in the same loop."""
    ours, oracle = _cell_pair()
    torch.manual_seed(2)
    x = torch.randn(B, T, I, dtype=F64, device=DEVICE)
    cls = GradSampleModuleFastGradientClipping if mode == "ghost" else GradSampleModule

    def samples(cell):
        gsm = cls(CellLoop(cell, hx_keyword=hx == "keyword"))
        gsm(x).pow(2).sum(1).mean().backward()
        result = {name: p._norm_sample if mode == "ghost" else p.grad_sample for name, p in cell.named_parameters()}
        gsm.cleanup()
        return result

    actual, expected = samples(ours), samples(oracle)
    for mine, theirs in CELL_NAMES.items():
        assert_close(actual[mine], expected[theirs], F64, mine)
    assert actual["weight_hh"].shape[0] == B and not torch.allclose(actual["weight_hh"][0], actual["weight_hh"][1])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_privacy_engine_trains_a_tritonrnn_model(mode):
    """PrivacyEngine.make_private keeps the layer (the validator accepts it), clips and noises the per-sample
    gradients of the kernels, and a few steps lower the loss of a learnable task."""
    engine = PrivacyEngine()
    rnn, model, optimizer, criterion, loader = _private_training(engine, mode, samples=8, batch_size=4, lr=0.5,
                                                                 poisson_sampling=False)
    assert type(model._module.rnn) is tritonrnn.RNN
    losses = []
    for _ in range(3):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert rnn.weight_hh_l0.grad is not None and not rnn.weight_hh_l0.grad.isnan().any()
    assert losses[-1] < losses[0]
    assert 0 < engine.get_epsilon(delta=1e-5) < float("inf")


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_poisson_sampling_trains_through_empty_batches(mode):
    """Opacus's default Poisson sampling draws empty batches (batch_size=1 on 32 samples: about a third of
    them); training runs through them as with Opacus's DPRNN: the layer and its samplers take B = 0."""
    rnn, model, optimizer, criterion, loader = _private_training(PrivacyEngine(), mode, samples=32, batch_size=1,
                                                                 lr=0.1)
    sizes = []
    for xb, yb in loader:
        sizes.append(len(xb))
        optimizer.zero_grad()
        criterion(model(xb), yb).backward()
        optimizer.step()
    assert 0 in sizes and max(sizes) > 0, sizes
    assert all(p.isfinite().all() for p in rnn.parameters())


@pytest.mark.parametrize("first", ["tritonrnn", "opacus"])
def test_opacus_support_needs_only_import_tritonrnn(first):
    """A fresh process that imports tritonrnn and Opacus, in either order, and nothing else of tritonrnn:
    Opacus's validator flags dropout between layers (PrivacyEngine refuses the model before training) and
    knows the layers' grad samplers."""
    # (a find_spec before the import, as `is Opacus installed?` checks do, changes nothing)
    imports = ["import tritonrnn", "assert importlib.util.find_spec('opacus')", "import opacus"]
    code = "\n".join(["import importlib.util, os, sys", "os.environ.setdefault('TRITON_INTERPRET', '1')",
                      *(imports if first == "tritonrnn" else imports[::-1]),
                      "from opacus import GradSampleModule",
                      "from opacus.validators import ModuleValidator",
                      "errors = ModuleValidator.validate(tritonrnn.RNN(3, 5, num_layers=2, dropout=0.3))",
                      "assert len(errors) == 1 and 'dropout' in str(errors[0]), errors",
                      "assert ModuleValidator.validate(tritonrnn.RNN(3, 5, num_layers=2)) == []",
                      "assert tritonrnn.RNN in GradSampleModule.GRAD_SAMPLERS",
                      "print('ok')"])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_validator_refuses_dropout_between_layers():
    model = Model(tritonrnn.RNN(I, H, num_layers=2, dropout=0.5, dtype=F64, device=DEVICE))
    errors = ModuleValidator.validate(model)
    assert len(errors) == 1 and "dropout" in str(errors[0])


def test_other_full_backward_hooks_are_left_alone():
    """Only Opacus's hooks are adapted: a user's hook sees the layer's two output gradients."""
    rnn = tritonrnn.RNN(I, H, dtype=F64, device=DEVICE)
    seen = []
    rnn.register_full_backward_hook(lambda module, grad_input, grad_output: seen.append(grad_output))
    x = torch.randn(T, B, I, dtype=F64, device=DEVICE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output, h_n = rnn(x)
        (output.sum() + 2 * h_n.sum()).backward()
    (grad_output,) = seen
    assert torch.equal(grad_output[0], torch.ones_like(output))
    assert torch.equal(grad_output[1], 2 * torch.ones_like(h_n))


def test_per_sample_grads_where_the_layers_run_torch(monkeypatch):
    """A CPU without TRITON_INTERPRET runs torch's own RNN: the sampler's recomputation then takes the
    plain-PyTorch reference instead of the kernels, with the same per-sample gradients."""
    if DEVICE.type != "cpu":
        pytest.skip("the torch backend is the CPU's")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = CASES["L2-bidir-relu-batch_first-h0"]
    ours, dprnn = _pair(case["rnn"])
    assert tritonrnn.backend(DEVICE) == "torch"
    x, h0 = _inputs(ours, case)
    actual, expected = _grad_samples(ours, case, x, h0), _grad_samples(dprnn, case, x, h0)
    for key in expected:
        assert_close(actual[key], expected[key], F64, key)


def test_benchmark_case_rows(tmp_path):
    """perf/privacy.py's case, tiny: the three modes run, ghost clipping's clipped gradient equals the
    per-sample mode's, and its peak memory is lower (no [B, H, H] per-sample gradients)."""
    from tritonrnn.perf import privacy

    rows, path = privacy.run_to_file(tmp_path, "test", batch=4, hidden=32, seq_len=5, input_size=32,
                                     timer=lambda fn: {"median_ms": 1.0})
    assert json.loads(path.read_text())["rows"] == rows
    assert [r["mode"] for r in rows] == list(privacy.MODES) and all(r["status"] == "ok" for r in rows), rows
    plain, per_sample, ghost = rows
    assert ghost["backend"] == tritonrnn.backend(DEVICE)
    assert ghost["max_rel_error"] < 1e-5
    assert plain["peak_memory_bytes"] < ghost["peak_memory_bytes"] < per_sample["peak_memory_bytes"]
    assert "ghost" in privacy.format_rows(rows)


@pytest.mark.parametrize("ghost", [False, True], ids=["hooks", "ghost"])
def test_dp_char_rnn_example(tmp_path, ghost):
    """examples/dp_char_rnn.py, a few steps: a private run with its epsilon and a non-private run, plotted."""
    from conftest import load_example

    argv = ["--steps", "2", "--seq-len", "4", "--batch", "4", "--windows", "64", "--hidden", "8",
            "--out-dir", str(tmp_path)] + ["--ghost"] * ghost
    summary = load_example("dp_char_rnn").main(argv)
    private, plain = summary["results"]
    assert private["run"].startswith("private") and plain["run"] == "non-private"
    assert len(private["losses"]) == len(plain["losses"]) == 2
    assert 0 < private["epsilon"] < float("inf") and "epsilon" not in plain
    assert (tmp_path / summary["plot"]).stat().st_size > 1000


class PackedModel(nn.Module):
    """Padded batch -> PackedSequence (unsorted lengths) -> RNN -> head over the padded output and/or h_n."""

    def __init__(self, rnn, uses):
        super().__init__()
        self.rnn, self.uses = rnn, uses
        self.head = nn.Linear(2 * H, 2, dtype=F64, device=DEVICE)

    def forward(self, x, lengths, h0):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        output, h_n = self.rnn(packed, h0)
        score = 0  # an output the loss does not use stays out of the graph (no zero gradient reaches it)
        if "output" in self.uses:
            padded = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])[0]
            score = self.head(padded).sum(1)
        if "h_n" in self.uses:
            score = score + h_n.sum(0)[:, :2].pow(2)
        return score


@pytest.mark.parametrize("uses", [("output", "h_n"), ("output",), ("h_n",)], ids=["output-h_n", "output-only",
                                                                                "h_n-only"])
def test_packed_input_per_sample_grads(uses):
    """PackedSequence input (unsorted lengths, h0): per-sample gradients in the caller's sample order,
    against torch.nn.RNN run on each sample alone (float64), and against DPRNN, which returns them in
    the packed batch's sorted order and, measured here, 5e-7 off even in float64."""
    ours, dprnn = _pair(dict(num_layers=2, bidirectional=True, batch_first=True))
    torch.manual_seed(3)
    x, h0 = torch.randn(B, T, I, dtype=F64, device=DEVICE), torch.randn(4, B, H, dtype=F64, device=DEVICE)
    lengths = torch.tensor([2, T, 3])
    results = []
    for rnn in (ours, dprnn):
        torch.manual_seed(1)
        gsm = GradSampleModule(PackedModel(rnn, uses))
        gsm(x, lengths, h0).pow(2).sum(1).mean().backward()
        results.append({name: p.grad_sample for name, p in rnn.named_parameters()})
        gsm.cleanup()
    actual, dprnn_samples = results
    oracle = nn.RNN(I, H, num_layers=2, bidirectional=True, batch_first=True, dtype=F64, device=DEVICE)
    oracle.load_state_dict(ours.state_dict())
    torch.manual_seed(1)
    model = PackedModel(oracle, uses)
    sorted_order = torch.sort(lengths, descending=True, stable=True).indices
    for b in range(B):
        model.zero_grad()
        (model(x[b:b + 1], lengths[b:b + 1], h0[:, b:b + 1]).pow(2).sum()).backward()
        for name, p in oracle.named_parameters():
            assert_close(actual[name][b], p.grad, F64, f"{name}[{b}]")
            sorted_position = (sorted_order == b).nonzero().item()
            torch.testing.assert_close(dprnn_samples[name][sorted_position], p.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("uses", [("output", "h_n"), ("h_n",)], ids=["output-h_n", "h_n-only"])
def test_packed_input_ghost_norms_match_materialised_grads(uses):
    """Ghost clipping's norms of a packed batch (the usual sequence classifier: a loss on h_n alone too)."""
    ours, _ = _pair(dict(batch_first=True, bidirectional=True))
    torch.manual_seed(3)
    x, h0 = torch.randn(B, T, I, dtype=F64, device=DEVICE), torch.randn(2, B, H, dtype=F64, device=DEVICE)
    lengths = torch.tensor([2, T, 3])
    results = []
    for cls in (GradSampleModule, GradSampleModuleFastGradientClipping):
        torch.manual_seed(1)
        gsm = cls(PackedModel(ours, uses))
        gsm(x, lengths, h0).pow(2).sum(1).mean().backward()
        results.append({name: p.grad_sample if cls is GradSampleModule else p._norm_sample
                        for name, p in ours.named_parameters()})
        gsm.cleanup()
    grads, norms = results
    for key, grad in grads.items():
        assert_close(norms[key], grad.flatten(1).norm(dim=1), F64, key)


def test_functorch_mode_is_refused_with_a_message():
    with pytest.raises(NotImplementedError, match="grad_sample_mode='hooks'"):
        GradSampleModule(Model(tritonrnn.RNN(I, H, dtype=F64, device=DEVICE)), force_functorch=True)
