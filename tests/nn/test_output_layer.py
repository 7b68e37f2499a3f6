"""The fused output layer (tritonrnn.functional.linear_cross_entropy) against
F.cross_entropy(F.linear(...)) in float64: the loss and every gradient, across reductions,
ignore_index, label smoothing and odd sizes; torch's errors; memory independent of N x V."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, DTYPES, ON_GPU, assert_close, dtype_id
from tritonrnn import loss as fused
from tritonrnn.functional import linear_cross_entropy
from tritonrnn.kernels import output
from tritonrnn.perf import static
from tritonrnn.perf.output_layer import format_rows, peak_memory, problem, run_to_file, training_step

# (N, H, V, chunk_size): N not a multiple of the chunk, V not a multiple of the tile (the
# interpreter's BLOCK_V is min(next_pow2(V), 4096): V = 4100 takes two tiles, the last nearly empty).
SHAPES = [(1, 1, 1, None), (37, 9, 300, 10), (20, 7, 4100, 8), (16, 24, 33, 16)]
REDUCTIONS = ["mean", "sum", "none"]


def _shape_id(shape):
    N, H, V, chunk = shape
    return f"N{N}-H{H}-V{V}-chunk{chunk}"


@pytest.fixture(autouse=True)
def poison_loss_buffers(monkeypatch):
    """The kernel's loss buffers start as NaN, so a row it fails to write fails the test."""
    monkeypatch.setattr(output, "_empty",
                        lambda shape, like, dtype: torch.full(shape, float("nan"), dtype=dtype, device=like.device))


@pytest.fixture
def kernel_calls(monkeypatch):
    """(rows, dtype) of the logits of each launch of the Triton kernel (so a test can tell it ran,
    not torch's fallback)."""
    calls = []
    launch = output.cross_entropy_chunk

    def counted(*args, **kwargs):
        calls.append((args[0].shape[0], args[0].dtype))
        return launch(*args, **kwargs)

    monkeypatch.setattr(output, "cross_entropy_chunk", counted)
    return calls


def _problem(N, H, V, seed, bias=True, ignored=()):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)
    target = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    target[list(ignored)] = -100
    return {"h": rand(N, H), "weight": rand(V, H, scale=2.0 / H ** 0.5), "bias": rand(V) if bias else None,
            "target": target}


def _loss_and_grads(fn, p, dtype, reduction, seed=0, **kwargs):
    """fn's loss and the gradients of (loss * g).sum() for a fixed random g, for h, weight and bias."""
    leaves = [p[k].to(dtype).requires_grad_() for k in ("h", "weight", "bias") if p[k] is not None]
    args = leaves if p["bias"] is not None else [*leaves, None]
    loss = fn(*args, p["target"], reduction=reduction, **kwargs)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((loss * g.to(loss.dtype)).sum(), leaves)
    return [loss, *grads]


def _torch_loss(h, weight, bias, target, **kwargs):
    return F.cross_entropy(F.linear(h, weight, bias), target, **kwargs)


def _check(p, dtype, reduction, chunk_size=None, **kwargs):
    expected = _loss_and_grads(_torch_loss, p, torch.float64, reduction, **kwargs)
    actual = _loss_and_grads(linear_cross_entropy, p, dtype, reduction, chunk_size=chunk_size, **kwargs)
    for name, a, e in zip(("loss", "dh", "dweight", "dbias"), actual, expected):
        assert a.dtype == dtype, name
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("smoothing", [0.0, 0.3], ids=["eps0", "eps0.3"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_torch(shape, dtype, reduction, smoothing, kernel_calls):
    N, H, V, chunk = shape
    p = _problem(N, H, V, seed=N + H + V, ignored=range(0, N, 3)[1:])
    _check(p, dtype, reduction, chunk, label_smoothing=smoothing)
    assert kernel_calls and max(rows for rows, _ in kernel_calls) <= (chunk or N)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_bias_and_custom_ignore_index(reduction):
    p = _problem(23, 5, 50, seed=1, bias=False)
    p["target"][[2, 7]] = 4  # rows of class 4 are ignored; -100 would now be out of range
    _check(p, torch.float64, reduction, 6, ignore_index=4, label_smoothing=0.1)


@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["eps0", "eps0.2"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored(reduction, smoothing):
    """torch: "mean" is NaN (0 / 0 rows), "sum" 0, "none" zeros; every gradient 0."""
    p = _problem(9, 4, 11, seed=2, ignored=range(9))
    expected = _loss_and_grads(_torch_loss, p, torch.float64, reduction, label_smoothing=smoothing)
    actual = _loss_and_grads(linear_cross_entropy, p, torch.float64, reduction, chunk_size=4,
                             label_smoothing=smoothing)
    assert expected[0].isnan().all() == (reduction == "mean")
    torch.testing.assert_close(actual[0], expected[0], equal_nan=True, rtol=0, atol=0)
    for a, e in zip(actual[1:], expected[1:], strict=True):
        assert (a == 0).all() and (e == 0).all()


def test_empty_batch():
    h = torch.zeros(0, 3, dtype=torch.float64, device=DEVICE)
    w = torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    target = torch.zeros(0, dtype=torch.long, device=DEVICE)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(linear_cross_entropy(h, w, None, target, reduction=reduction),
                                   _torch_loss(h, w, None, target, reduction=reduction), equal_nan=True)


def test_unbatched_broadcast_bias_and_uint8_target():
    """h [H] with a 0-d target, a bias of one element (F.linear broadcasts it), uint8 targets."""
    p = _problem(6, 4, 9, seed=3)
    w = p["weight"].requires_grad_()
    for h, bias, target in ((p["h"][0], p["bias"][:1], p["target"][0]),
                            (p["h"], p["bias"][:1], p["target"].to(torch.uint8))):
        for reduction in REDUCTIONS:
            b = bias.clone().requires_grad_()
            ours = linear_cross_entropy(h, w, b, target, reduction=reduction)
            ours_grads = torch.autograd.grad(ours.sum(), (w, b))
            ref = _torch_loss(h, w, b, target, reduction=reduction)
            ref_grads = torch.autograd.grad(ref.sum(), (w, b))
            for a, e in zip((ours, *ours_grads), (ref, *ref_grads), strict=True):
                assert_close(a, e, torch.float64)


def test_non_contiguous_inputs():
    """Transposed h and weight (views, as a model may pass them)."""
    p = _problem(9, 20, 30, seed=11)
    h = p["h"].T.contiguous().T.requires_grad_()  # [9, 20] in column-major memory
    w = p["weight"].T.contiguous().T.requires_grad_()
    assert not h.is_contiguous() and not w.is_contiguous()
    ours = linear_cross_entropy(h, w, None, p["target"], chunk_size=4)
    ref = _torch_loss(h, w, None, p["target"])
    for a, e in zip((ours, *torch.autograd.grad(ours, (h, w))), (ref, *torch.autograd.grad(ref, (h, w))), strict=True):
        assert_close(a, e, torch.float64)


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test compares whatever torch raises
        return exc
    raise AssertionError("expected an error")


BAD_ARGS = {  # name: (h, weight, bias, target) changes and keyword arguments
    "target-float": ({"target": lambda t: t.double()}, {}),
    "target-int32": ({"target": lambda t: t.int()}, {}),
    "target-too-short": ({"target": lambda t: t[:-1]}, {}),
    "target-2d": ({"target": lambda t: t[:, None]}, {}),
    "target-above-V": ({"target": lambda t: torch.where(t == t[3], 11, t)}, {}),
    "target-negative": ({"target": lambda t: torch.where(t == t[3], -3, t)}, {}),
    "ignore-index-moved": ({}, {"ignore_index": 5}),  # the -100 rows are now out of range
    "hidden-mismatch": ({"weight": lambda w: w[:, :-1]}, {}),
    "weight-dtype": ({"weight": lambda w: w.float()}, {}),
    "reduction": ({}, {"reduction": "avg"}),
    "smoothing": ({}, {"label_smoothing": 1.5}),
    # issue 18: each of these raised another error than torch's
    "vocabulary-empty": ({"weight": lambda w: w[:0], "bias": lambda b: b[:0]}, {}),  # was ZeroDivisionError
    "target-2d-rows": ({"target": lambda t: t[None, :]}, {}),
    "target-0d": ({"target": lambda t: t[0]}, {}),
    "target-class-shaped-long": ({"target": lambda t: t[:, None].expand(8, 11).contiguous()}, {}),
    "target-probabilities-ignore-index": ({"target": lambda t: torch.full((8, 11), 1 / 11, dtype=torch.float64,
                                                                          device=t.device)}, {"ignore_index": 1}),
    "smoothing-before-target": ({"target": lambda t: t[:, None]}, {"label_smoothing": 1.5}),
    "bias-size": ({"bias": lambda b: b[:-1]}, {}),
    "bias-rows": ({"bias": lambda b: b.expand(2, 11)}, {}),
    "bias-dtype": ({"bias": lambda b: b.float()}, {}),
    "weight-float64-input-float32": ({"h": lambda h: h.float()}, {}),
    "weight-float64-input-float32-no-bias": ({"h": lambda h: h.float(), "bias": lambda b: None}, {}),
}


@pytest.mark.parametrize("name", BAD_ARGS)
def test_errors_match_torch(name):
    p = _problem(8, 4, 11, seed=4, ignored=[1])
    changes, kwargs = BAD_ARGS[name]
    args = {k: changes.get(k, lambda t: t)(p[k]) for k in ("h", "weight", "bias", "target")}
    expected = _raised(lambda: _torch_loss(*args.values(), **kwargs))
    actual = _raised(lambda: linear_cross_entropy(*args.values(), **kwargs))  # default chunk size (V = 0 divided)
    assert type(actual) is type(expected)
    assert str(actual) == str(expected), (str(actual), str(expected))


TORCH_ACCEPTS = {  # name: (changes, keyword arguments, whether the fused path runs): issue 18's refusals
    "smoothing-one": ({}, {"label_smoothing": 1.0}, True),
    "smoothing-negative": ({}, {"label_smoothing": -0.1}, True),  # torch: not > 0 means none
    "smoothing-nan": ({}, {"label_smoothing": float("nan")}, True),
    "smoothing-bool": ({}, {"label_smoothing": True}, True),
    "vocabulary-empty-every-row-ignored": ({"weight": lambda w: w[:0], "bias": lambda b: b[:0],
                                            "target": lambda t: torch.full_like(t, -100)}, {"reduction": "sum"}, True),
    "target-probabilities": ({"target": lambda t: torch.softmax(torch.randn(8, 11, dtype=torch.float64), 1).to(
        t.device)}, {"label_smoothing": 0.2}, False),
    "bias-per-row": ({"bias": lambda b: b.expand(8, 11).contiguous()}, {}, False),
}


@pytest.mark.parametrize("name", TORCH_ACCEPTS)
def test_what_torch_accepts_gives_torch_results(name, kernel_calls):
    """Same inputs, same outcome as F.cross_entropy(F.linear(...)): the loss and every gradient."""
    p = _problem(8, 4, 11, seed=4, ignored=[1])
    changes, kwargs, fused_path = TORCH_ACCEPTS[name]
    args = {k: changes.get(k, lambda t: t)(p[k]) for k in ("h", "weight", "bias", "target")}
    results = []
    for fn in (_torch_loss, linear_cross_entropy):
        leaves = [args[k].clone().requires_grad_() for k in ("h", "weight", "bias")]
        loss = fn(*leaves, args["target"], **kwargs)
        results.append([loss, *torch.autograd.grad(loss.sum(), leaves)])
    for what, a, e in zip(("loss", "dh", "dweight", "dbias"), results[1], results[0], strict=True):
        assert a.shape == e.shape, what
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, equal_nan=True, msg=what)
    assert bool(kernel_calls) == fused_path


def test_three_dimensional_h_is_refused():
    """torch would read dim 1 of 3-D logits as the classes: a different loss, so ours refuses it."""
    p = _problem(8, 4, 11, seed=5)
    with pytest.raises(ValueError, match=re.escape("flatten time and batch first")):
        linear_cross_entropy(p["h"].view(2, 4, 4), p["weight"], p["bias"], p["target"].view(2, 4))


def test_double_backward_raises():
    p = _problem(5, 3, 7, seed=6)
    h = p["h"].requires_grad_()
    loss = linear_cross_entropy(h, p["weight"], p["bias"], p["target"])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_no_gradients_computed_without_grad(kernel_calls, monkeypatch):
    """Under no_grad (and for inputs that need none) the kernel writes no gradient."""
    p = _problem(10, 3, 7, seed=7)
    flags = []
    launch = output.cross_entropy_chunk
    monkeypatch.setattr(output, "cross_entropy_chunk", lambda *a, **k: flags.append(k["write_grad"]) or launch(*a, **k))
    linear_cross_entropy(p["h"], p["weight"], p["bias"], p["target"])
    with torch.no_grad():
        linear_cross_entropy(p["h"], p["weight"].requires_grad_(), p["bias"], p["target"])
    assert flags == [False, False]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_custom_ops_pass_opcheck(reduction):
    p = _problem(7, 3, 9, seed=8, ignored=[2])
    h, w, b = (p[k].requires_grad_() for k in ("h", "weight", "bias"))
    torch.library.opcheck(fused.linear_cross_entropy_op, (h, w, b, p["target"], -100, reduction, 0.1, True, 3))
    torch.library.opcheck(fused.linear_cross_entropy_backward,
                          (torch.randn(7, dtype=torch.float64, device=DEVICE), h.detach(), w.detach(), b.detach(),
                           p["target"], -100, 0.1, 3))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    p = _problem(12, 5, 13, seed=9, ignored=[0])
    fn = lambda h, w, b, t: linear_cross_entropy(h, w, b, t, label_smoothing=0.1, chunk_size=5)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (compiled, fn):
        leaves = [p[k].clone().requires_grad_() for k in ("h", "weight", "bias")]
        loss = f(*leaves, p["target"])
        results.append([loss, *torch.autograd.grad(loss, leaves)])
    for a, e in zip(*results, strict=True):
        assert_close(a, e, torch.float64)


def test_peak_memory_independent_of_rows_times_vocabulary():
    """Forward + backward: torch's peak grows by ~3 N x V floats (logits, log-softmax, their
    gradient) when N doubles; the fused path's by the gradient of h only, and stays far below one
    N x V array. Measured with TensorMemoryTracker (every tensor storage torch allocates, custom
    ops included)."""
    V, H, chunk = 4096, 8, 64
    peaks = {}
    for N in (256, 512):
        p = problem(N, V, H, torch.float32, DEVICE)
        for provider in ("torch", "tritonrnn"):
            peaks[provider, N] = peak_memory(training_step(provider, p, chunk_size=chunk), DEVICE)
    logits_bytes = 256 * V * 4
    assert peaks["torch", 512] - peaks["torch", 256] >= 2 * logits_bytes
    # per added row: a few rows of h's size (dh, its scaled copy h.grad) and a few per-row scalars
    # (losses, scales, masks); torch: 3 * V * 4 bytes, 256 times more
    per_row = 4 * H * 4 + 16 * 4
    assert peaks["tritonrnn", 512] - peaks["tritonrnn", 256] <= 256 * per_row
    # one [chunk, V] buffer, plus the gradients of weight and bias (fp32, a scaled copy each) and of h
    budget = chunk * V * 4 + 4 * (V * H + V) * 4 + 512 * per_row
    assert peaks["tritonrnn", 512] <= budget < logits_bytes * 2


def test_default_chunk_size():
    assert fused.default_chunk_size(32768, 32768, 1024) == 1024  # logits chunk as large as h
    assert fused.default_chunk_size(1000, 50000, 64) == 256  # at least 256 rows
    assert fused.default_chunk_size(10, 50000, 64) == 10
    assert fused.default_chunk_size(0, 5, 3) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_gpu_realistic_size_and_memory(dtype):
    """N = 4096 rows, V = 32000: the loss and gradients against float64, and the peak memory of
    forward + backward below one [N, V] logits array (torch's holds several)."""
    N, H, V = 4096, 512, 32000
    p = _problem(N, H, V, seed=10, ignored=range(0, N, 7))
    _check(p, dtype, "mean", label_smoothing=0.1)
    q = problem(N, V, H, dtype, DEVICE)
    logits_bytes = N * V * dtype.itemsize
    torch_peak = peak_memory(training_step("torch", q), DEVICE)
    fused_peak = peak_memory(training_step("tritonrnn", q), DEVICE)
    assert fused_peak < logits_bytes < torch_peak / 2, (fused_peak, logits_bytes, torch_peak)


@pytest.mark.skipif(not static.available(), reason="this triton has no bundled NVIDIA toolchain")
def test_gpu_config_compiles_for_hopper_without_spills():
    """The output kernel's GPU launch config, compiled offline for sm_90: no spills in the 16-bit and fp32
    variants, and (fp32 accumulation) few enough registers for several programs per SM. The fp64 forward
    may spill a few bytes: Triton 3.9 gives it 128 registers and 8 spilled bytes (168 and none in 3.6 to 3.8);
    fp64 is the reference dtype, not a speed target."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tritonrnn.perf.output_layer"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    variants = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(variants) == 6
    assert all(v["stack_bytes"] == 0 for v in variants if v["dtype"] != "float64"), variants
    assert all(v["stack_bytes"] <= 8 for v in variants), variants
    assert all(v["registers"] <= 96 for v in variants if v["dtype"] != "float64"), variants


def test_torch_backend_is_plain_torch(monkeypatch, kernel_calls):
    """Where the Triton kernels do not run (CPU without the interpreter), F.cross_entropy(F.linear)."""
    monkeypatch.setattr(fused, "backend", lambda device: "torch")
    p = _problem(6, 3, 5, seed=12)
    torch.testing.assert_close(linear_cross_entropy(p["h"], p["weight"], p["bias"], p["target"], label_smoothing=0.1),
                               _torch_loss(p["h"], p["weight"], p["bias"], p["target"], label_smoothing=0.1))
    assert not kernel_calls


def test_autocast_runs_in_its_dtype_and_returns_float32(kernel_calls):
    """As torch: under autocast the linear runs in the autocast dtype and the loss comes back in fp32."""
    p = _problem(10, 8, 12, seed=13)
    args = [p[k].float() for k in ("h", "weight", "bias")] + [p["target"]]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        ours = linear_cross_entropy(*args)
        ref = _torch_loss(*args)
    assert ours.dtype == ref.dtype == torch.float32
    assert kernel_calls == [(10, torch.bfloat16)]
    assert_close(ours, ref, torch.bfloat16)


def test_benchmark_case_rows(tmp_path):
    """perf/output_layer.py's case, tiny: both providers ok, the same gradients, the fused peak lower."""
    rows, path = run_to_file(tmp_path, "test", rows=(300,), vocab=1000, hidden=8, dtypes=["float32"],
                             timer=lambda fn: {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0})
    assert json.loads(path.read_text()) == {"kind": "output-layer", "command": "test", "rows": rows}
    unfused, fused_row = rows
    assert [r["provider"] for r in rows] == ["torch", "tritonrnn"] and all(r["status"] == "ok" for r in rows)
    assert fused_row["backend"] == ("triton" if ON_GPU else "triton-interpreter")
    assert fused_row["max_rel_error"] < 1e-4 and abs(fused_row["loss"] - unfused["loss"]) < 1e-4
    assert fused_row["peak_memory_bytes"] < unfused["peak_memory_bytes"] / 2
    assert "tritonrnn" in format_rows(rows)


def test_bench_cli_output_layer(tmp_path, capsys):
    """`tritonrnn bench --output-layer ROWS`: the case's rows in a results file of their own."""
    from tritonrnn import cli

    argv = ["bench", "--output-layer", "64", "--vocab", "300", "--hidden", "8", "--dtypes", "float32",
            "--out-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    (path,) = tmp_path.glob("output_layer-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["provider"], r["rows"], r["vocab"], r["status"]) for r in rows] == [
        ("torch", 64, 300, "ok"), ("tritonrnn", 64, 300, "ok")]
    assert "output-N64-V300-H8" in capsys.readouterr().out
    if not ON_GPU:  # the sizes would take hours in the interpreter
        assert cli.main(["bench", "--output-layer", "--out-dir", str(tmp_path)]) == 2
