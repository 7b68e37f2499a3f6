"""tritonrnn in the PyTorch ecosystem: torch.compile, custom-op checks, autocast, DDP, determinism,
saving and loading, parametrizations."""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import tritonrnn
from conftest import DEVICE, EXAMPLES, ON_GPU, assert_close, force_layout, load_example
from tritonrnn import numerics, ops
from tritonrnn.kernels import configs
from tritonrnn.kernels import toolchain

I, H = 5, 12


def _pair(**kwargs):
    torch.manual_seed(0)
    oracle = nn.RNN(I, H, **kwargs).double().to(DEVICE)
    ours = tritonrnn.RNN(I, H, **kwargs, device=DEVICE, dtype=torch.float64)
    ours.load_state_dict(oracle.state_dict())
    return ours, oracle


class Tagger(nn.Module):
    """A small model around the layers: RNN, a linear head, and an RNNCell loop."""

    def __init__(self):
        super().__init__()
        self.rnn = tritonrnn.RNN(I, H, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * H, 3)
        self.cell = tritonrnn.RNNCell(3, H, nonlinearity="relu")

    def forward(self, x):
        out, h_n = self.rnn(x)
        logits = self.head(out)
        h = None
        for t in range(logits.shape[1]):
            h = self.cell(logits[:, t], h)
        return logits, h_n, h


@pytest.mark.skipif(ON_GPU, reason="the CPU's inductor (C++) is enough: the check is in its lowering")
def test_inductor_compiles_the_layers_where_ci_is_set(tmp_path):
    """torch.compile(backend="inductor") of a layer in an environment with CI set (CI services set it): inductor
    raised 'make_fallback(tritonrnn.bidirectional_recurrence.default): a decomposition exists' for the ops
    that carry tritonrnn.onnx's decomposition (seen for both, whenever inductor's cache did not hold the graph)."""
    code = ("import os; os.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch, tritonrnn\n"
            "for bidirectional in (False, True):\n"
            "    rnn = tritonrnn.RNN(5, 7, bidirectional=bidirectional, batch_first=True).double()\n"
            "    x = torch.randn(3, 4, 5, dtype=torch.float64)\n"
            "    out, h_n = torch.compile(rnn, fullgraph=True, backend='inductor')(x)\n"
            "    expected = rnn(x)\n"
            "    assert torch.allclose(out, expected[0]) and torch.allclose(h_n, expected[1])\n"
            "print('ok')")
    # A fresh inductor cache: a cached graph skips the lowering where the check is (why it failed by chance).
    env = {**os.environ, "CI": "true", "PYTHONPATH": str(EXAMPLES.parent), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tagger().double().to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(3, 6, I, dtype=torch.float64, device=DEVICE)
    results = []
    for fn in (compiled, model):
        model.zero_grad()
        outputs = fn(x)
        sum(o.sum() for o in outputs).backward()
        results.append([*outputs, *(p.grad.clone() for p in model.parameters())])
    for a, b in zip(*results, strict=True):
        assert_close(a, b, torch.float64)


def test_compile_traces_no_device_query_and_no_file_read(monkeypatch):
    """The kernel path is chosen inside the custom op when it runs, never while Dynamo traces: the
    shipped tuned configs (a device-name query and a file read on a GPU, kernels.configs.tuned) are
    looked up at run time only, so the traced code is the same on a GPU and here."""
    torch._dynamo.reset()
    lookups = []
    tuned = configs.tuned

    def spy(dtype, hidden, batch, direction, device):
        assert not torch.compiler.is_compiling(), "tuned configs looked up while tracing"
        lookups.append(direction)
        return tuned(dtype, hidden, batch, direction, device)

    monkeypatch.setattr(configs, "tuned", spy)
    model = tritonrnn.RNN(I, H, device=DEVICE, dtype=torch.float64)
    x = torch.randn(6, 3, I, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out, h_n = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    (out.sum() + h_n.sum()).backward()
    assert "forward" in lookups and "backward" in lookups  # at run time, in both directions
    for op in (ops.recurrence, ops.recurrence_backward):
        arguments = {a.name for a in op._opoverload._schema.arguments}
        assert not {"path", "layout", "config"} & arguments  # no layout argument for traced code to fill


@pytest.mark.parametrize("lengths", [None, [4, 2, 1]], ids=["dense", "lengths"])
@pytest.mark.parametrize("path", ["sequence", "persistent", "stepwise"])
def test_custom_ops_pass_opcheck(path, lengths, monkeypatch):
    force_layout(monkeypatch, path)
    torch.manual_seed(0)
    T, B = 4, 3
    xw = torch.randn(1, T, B, H, dtype=torch.float64, device=DEVICE, requires_grad=True)
    # h0 transposed in memory: the fake must still promise the contiguous outputs the op returns.
    h0 = torch.randn(H, B, dtype=torch.float64, device=DEVICE).T[None].requires_grad_()
    w = (torch.randn(1, H, H, dtype=torch.float64, device=DEVICE) / H ** 0.5).requires_grad_()
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(ops.recurrence, (xw, h0, w, lens, lengths is not None, "tanh", False))
    out, _ = ops.recurrence(xw, h0, w, lens, False, "relu", False)
    args = (torch.randn_like(out), torch.randn_like(h0), out.detach(), h0.detach(), w.detach(), lens, False, "relu",
            False)
    torch.library.opcheck(ops.recurrence_backward, args)


@pytest.fixture
def fp32_precision_api():
    """Leave cuDNN's TF32 settings as found, set through the new API (torch >= 2.9)."""
    saved = (torch.backends.fp32_precision, torch.backends.cudnn.fp32_precision,
             torch.backends.cudnn.rnn.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    yield torch.backends
    (torch.backends.fp32_precision, torch.backends.cudnn.fp32_precision,
     torch.backends.cudnn.rnn.fp32_precision, torch.backends.cudnn.conv.fp32_precision) = saved


def test_tf32_follows_cudnn_rnn_fp32_precision(fp32_precision_api):
    """torch.backends.cudnn.rnn.fp32_precision decides TF32, as for cuDNN's RNN ("none" inherits
    from cudnn, then from the generic setting); once it is set, reading the legacy
    torch.backends.cudnn.allow_tf32 raises, and a layer must still run."""
    backends = fp32_precision_api
    backends.cudnn.rnn.fp32_precision = "tf32"
    backends.cudnn.conv.fp32_precision = "ieee"  # conv and rnn differ: the legacy flag now raises
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.backends.cudnn.allow_tf32  # noqa: B018
    assert numerics.allow_tf32()
    ours, oracle = _pair()
    x = torch.randn(4, 3, I, dtype=torch.float64, device=DEVICE)
    assert_close(ours(x)[0], oracle(x)[0], torch.float64)
    backends.cudnn.rnn.fp32_precision = "ieee"
    assert not numerics.allow_tf32()
    backends.fp32_precision = "none"
    backends.cudnn.fp32_precision = "tf32"
    backends.cudnn.rnn.fp32_precision = "none"  # inherits cudnn's
    assert numerics.allow_tf32()
    backends.cudnn.fp32_precision = "none"
    backends.cudnn.rnn.fp32_precision = "none"  # nothing set anywhere: not TF32, as cuDNN decides
    assert not numerics.allow_tf32()


def test_autocast_cpu_behaves_as_torch():
    """On the CPU torch autocasts RNNs to bfloat16; so do the layers (kernels interpreted here)."""
    ours, oracle = _pair(num_layers=2)
    ours.float(), oracle.float()
    x = torch.randn(4, 3, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_n = ours(x.to(DEVICE)) if DEVICE.type == "cpu" else ours.cpu()(x)
        ref_out, ref_hn = oracle.cpu()(x)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert h_n.dtype == ref_hn.dtype
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), atol=3e-2, rtol=0)
    out.float().sum().backward()
    ref_out.float().sum().backward()
    for a, b in zip(ours.parameters(), oracle.parameters(), strict=True):
        assert a.grad.dtype == b.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad.cpu(), b.grad, atol=0.05 * b.grad.abs().max().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_cuda_runs_kernels_in_autocast_dtype(dtype):
    ours, oracle = _pair(num_layers=2)
    ours.float()
    x = torch.randn(16, 8, I, device="cuda", dtype=torch.float64)
    with torch.autocast("cuda", dtype=dtype):
        out, h_n = ours(x.float())
    assert out.dtype == h_n.dtype == dtype
    ref_out, _ = oracle(x)
    assert_close(out, ref_out, dtype, "out")


def _train_step_grads(model, x):
    model.zero_grad()
    out, h_n = model(x)
    (out.pow(2).mean() + h_n.pow(2).mean()).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.skipif(ON_GPU and bool(toolchain.interpreter_problem()),
                    reason="2 processes on one GPU: gloo on the CPU would need Triton's interpreter, which "
                           "cannot run here (kernels.toolchain.interpreter_problem)")
def test_ddp_gloo_matches_single_process_on_the_combined_batch(tmp_path):
    """The README's torchrun command with 2 CPU processes (gloo): gradients as one process, full batch."""
    grads_file = tmp_path / "grads.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLES / "ddp.py"), "--steps", "1", "--batch", "4", "--seq-len", "6",
               "--save-grads", str(grads_file)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo"}  # loopback only
    logs = []
    # One retry: about 1 run in 25 aborts at exit here, in gloo's teardown ("terminate called without
    # an active exception"), after the work is done and the gradients are saved.
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        logs.append(result.stdout[-2000:] + result.stderr[-4000:])
        if result.returncode == 0:
            break
    assert result.returncode == 0, "\n---\n".join(logs)
    ddp = load_example("ddp")
    torch.manual_seed(0)
    model = ddp.Recaller()
    x, target = ddp.global_batch(0, 4, 6, 0)
    nn.functional.mse_loss(model(x), target).backward()
    for a, b in zip(torch.load(grads_file), model.parameters(), strict=True):
        assert_close(a, b.grad, torch.float32)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "use_deterministic_algorithms"])
def test_bitwise_identical_across_runs(deterministic):
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        torch.manual_seed(0)
        model = tritonrnn.RNN(I, H, num_layers=2, bidirectional=True, device=DEVICE)
        x = torch.randn(7, 5, I, device=DEVICE, requires_grad=True)
        runs = []
        for _ in range(2):
            x.grad = None
            grads = _train_step_grads(model, x)
            runs.append([*model(x), x.grad.clone(), *grads])
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(saved)


def test_save_load_module_and_state_dict():
    ours, oracle = _pair(num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, I, dtype=torch.float64, device=DEVICE)
    expected = ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is tritonrnn.RNN
    for a, b in zip(loaded(x), expected, strict=True):
        assert torch.equal(a, b)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    fresh = nn.RNN(I, H, num_layers=2, bidirectional=True).double().to(DEVICE)
    fresh.load_state_dict(torch.load(buffer))  # our checkpoints load into torch.nn.RNN too
    for a, b in zip(fresh(x), expected, strict=True):
        assert_close(a, b, torch.float64)
    for a, b in zip(copy.deepcopy(ours)(x), expected, strict=True):
        assert torch.equal(a, b)


def test_half_and_to_dtype():
    ours, oracle = _pair()
    x = torch.randn(4, 3, I, dtype=torch.float64, device=DEVICE)
    ours.half()
    assert all(p.dtype == torch.float16 for p in ours.parameters())
    out, _ = ours(x.half())
    assert out.dtype == torch.float16
    assert_close(out, oracle(x)[0], torch.float16)
    ours.to(torch.float64)
    oracle.load_state_dict(ours.state_dict())  # the weights went through float16
    assert_close(ours(x)[0], oracle(x)[0], torch.float64)


def test_weight_norm_parametrization_on_weight_hh():
    ours, oracle = _pair()
    for module in (ours, oracle):
        parametrizations.weight_norm(module, "weight_hh_l0")
    ours.load_state_dict(oracle.state_dict())
    x = torch.randn(4, 3, I, dtype=torch.float64, device=DEVICE)
    results = []
    for module in (ours, oracle):
        out, h_n = module(x)
        (out.sum() + h_n.sum()).backward()
        results.append([out, h_n, *(p.grad for p in module.parameters())])
    for a, b in zip(*results, strict=True):
        assert_close(a, b, torch.float64)
