"""The kernels and the recurrence ops against the step-by-step float64 reference.

Forward: out (every h_t) and h_n from the launcher. Backward: dz (the fused kernel's output), dh_0
and dW_hh from the backward op, given the reference's activations so that only the backward is
under test. Then the whole layer's gradients through autograd, and gradcheck in float64.
"""
import pytest
import torch

from conftest import DEVICE, DTYPES, assert_close, dtype_id, force_layout
from tritonrnn import dispatch, functional, kernels, ops, reference
from tritonrnn.kernels import configs
from tritonrnn.kernels import launch

# (T, B, H): T = 1, B % 16 != 0, H not 2^k; the last two launch several programs (batch tiles of
# the sequence kernel, hidden tiles of the step kernel).
SHAPES = [(1, 1, 1), (9, 17, 19), (4, 3, 32), (6, 2, 40), (3, 70, 20), (3, 5, 70), (3, 5, 200)]
VARIANTS = [  # (nonlinearity, reverse, with lengths)
    ("tanh", False, False), ("relu", False, False), ("tanh", True, False),
    ("tanh", False, True), ("relu", True, True),
]
INPUT = 5


def _case_id(case):
    (T, B, H), (act, reverse, packed) = case
    return f"T{T}-B{B}-H{H}-{act}" + ("-reverse" if reverse else "") + ("-lengths" if packed else "")


CASES = [(shape, variant) for shape in SHAPES for variant in VARIANTS]
# Every case on every layout that loads on a GPU (the sequence path's W_hh must fit in shared memory:
# not fp32/fp64 at H = 200; test_launcher_refuses_what_cannot_load checks the refusal).
LAUNCHABLE = [pytest.param(case, dtype, layout, id=f"{_case_id(case)}-{dtype_id(dtype)}-{layout}")
              for case in CASES for dtype in DTYPES for layout in configs.TUNED_LAYOUTS
              if configs.layout_fits(layout, case[0][2], dtype)]


def _problem(T, B, H, packed, seed):
    """Fresh random float64 data: x, h0, weights, biases and (optionally) unsorted lengths."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)
    w_scale = 1.5 / H ** 0.5  # large enough that tanh saturates somewhere and relu clips
    p = dict(x=rand(T, B, INPUT), h0=rand(B, H), w_ih=rand(H, INPUT, scale=0.5), w_hh=rand(H, H, scale=w_scale),
             b_ih=rand(H, scale=0.1), b_hh=rand(H, scale=0.1))
    p["lengths"] = torch.randint(1, T + 1, (B,), generator=g).to(DEVICE) if packed else None
    if packed:
        p["lengths"][0] = T
    return p


def _projected(p):
    return p["x"] @ p["w_ih"].T + p["b_ih"] + p["b_hh"]


@pytest.mark.parametrize(("case", "dtype", "layout"), LAUNCHABLE)
def test_forward_matches_reference(case, dtype, layout):
    (T, B, H), (act, reverse, packed) = case
    p = _problem(T, B, H, packed, seed=T * 1000 + B * 10 + H)
    ref_out, ref_hn = reference.forward(p["x"], p["h0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], act,
                                        p["lengths"], reverse)
    out, h_n = kernels.recurrence_forward(_projected(p).to(dtype), p["h0"].to(dtype), p["w_hh"].to(dtype),
                                          lengths=p["lengths"], reverse=reverse, cell=act, layout=layout)
    assert out.dtype == h_n.dtype == dtype
    assert_close(out, ref_out, dtype, "out")
    assert_close(h_n, ref_hn, dtype, "h_n")


@pytest.mark.parametrize(("case", "dtype", "layout"), LAUNCHABLE)
def test_backward_matches_reference(case, dtype, layout, monkeypatch):
    (T, B, H), (act, reverse, packed) = case
    p = _problem(T, B, H, packed, seed=T * 1000 + B * 10 + H + 1)
    out, _ = reference.forward(p["x"], p["h0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], act,
                               p["lengths"], reverse)
    grad_out = torch.randn_like(out)
    grad_hn = torch.randn_like(p["h0"])
    if packed:  # padding is not part of the output
        grad_out = grad_out * (torch.arange(T, device=DEVICE)[:, None] < p["lengths"])[..., None]
    ref = reference.backward(p["x"], p["h0"], p["w_ih"], p["w_hh"], out, grad_out, grad_hn, act,
                             p["lengths"], reverse)
    lengths = None if p["lengths"] is None else p["lengths"].to(torch.int32)
    cast = lambda t: t.to(dtype)
    force_layout(monkeypatch, layout)  # the op's run-time choice
    dz, dh0, dw_hh = (g[0] for g in ops.recurrence_backward(cast(grad_out)[None], cast(grad_hn)[None],
                                                            cast(out)[None], cast(p["h0"])[None],
                                                            cast(p["w_hh"])[None], lengths, reverse, act, False))
    assert_close(dz, ref.dz, dtype, "dz")
    assert_close(dh0, ref.dh0, dtype, "dh0")
    assert_close(dw_hh, ref.dw_hh, dtype, "dW_hh")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] == (9, 17, 19)], ids=_case_id)
def test_layer_gradients_match_reference(case, dtype):
    """Every gradient of one layer (x, h0, W_ih, W_hh, b_ih, b_hh) through the autograd op."""
    (T, B, H), (act, reverse, packed) = case
    p = _problem(T, B, H, packed, seed=7)
    leaves = {k: p[k].to(dtype).requires_grad_() for k in ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")}
    out, h_n = functional.rnn_layer(**leaves, nonlinearity=act, lengths=p["lengths"], reverse=reverse)
    ref_out, ref_hn = reference.forward(*(p[k] for k in ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")), act,
                                        p["lengths"], reverse)
    grad_out, grad_hn = torch.randn_like(ref_out), torch.randn_like(ref_hn)
    if packed:
        grad_out = grad_out * (torch.arange(T, device=DEVICE)[:, None] < p["lengths"])[..., None]
    ((out * grad_out.to(dtype)).sum() + (h_n * grad_hn.to(dtype)).sum()).backward()
    ref = reference.backward(p["x"], p["h0"], p["w_ih"], p["w_hh"], ref_out, grad_out, grad_hn, act,
                             p["lengths"], reverse)
    assert_close(out, ref_out, dtype, "out")
    assert_close(h_n, ref_hn, dtype, "h_n")
    expected = dict(x=ref.dx, h0=ref.dh0, w_ih=ref.dw_ih, w_hh=ref.dw_hh, b_ih=ref.db, b_hh=ref.db)
    for name, leaf in leaves.items():
        assert_close(leaf.grad, expected[name], dtype, f"d{name}")


@pytest.mark.parametrize("layout", configs.TUNED_LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v))
def test_gradcheck_float64(variant, layout, monkeypatch):
    act, reverse, packed = variant
    force_layout(monkeypatch, layout)
    p = _problem(3, 2, 4, packed, seed=3)
    if packed:
        p["lengths"] = torch.tensor([3, 2], device=DEVICE)
    names = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")
    inputs = tuple(p[k].clone().requires_grad_() for k in names)
    fn = lambda *args: functional.rnn_layer(*args, nonlinearity=act, lengths=p["lengths"], reverse=reverse)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.filterwarnings("ignore:tritonrnn. double backward")
@pytest.mark.parametrize("variant", VARIANTS[1:4], ids=lambda v: "-".join(str(x) for x in v))
def test_double_backward_gradgradcheck_float64(variant):
    """create_graph=True differentiates the (differentiable) PyTorch BPTT; checked numerically."""
    act, reverse, packed = variant
    p = _problem(3, 2, 4, packed, seed=5)
    names = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")
    inputs = tuple(p[k].clone().requires_grad_() for k in names)
    fn = lambda *args: functional.rnn_layer(*args, nonlinearity=act, lengths=p["lengths"], reverse=reverse)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_double_backward_warns_that_it_leaves_the_fused_kernel():
    p = _problem(3, 2, 4, False, seed=4)
    x = p["x"].requires_grad_()
    out, _ = functional.rnn_layer(x, p["h0"], p["w_ih"], p["w_hh"])
    with pytest.warns(UserWarning, match="differentiable PyTorch BPTT"):
        (dx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.sum(), x)
    assert ddx.abs().sum() > 0


def test_layer_rejects_bad_lengths():
    p = _problem(3, 2, 4, False, seed=6)
    for lengths in ([0, 3], [4, 1], [1, 2, 3]):
        with pytest.raises(ValueError, match="lengths must be a"):
            functional.rnn_layer(p["x"], p["h0"], p["w_ih"], p["w_hh"], lengths=torch.tensor(lengths))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU dispatch")
def test_rnn_layer_without_kernels_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = _problem(3, 2, 4, False, seed=8)
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        functional.rnn_layer(p["x"], p["h0"], p["w_ih"], p["w_hh"])


@pytest.mark.parametrize("packed", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("layout", configs.LAYOUTS)
def test_every_launcher_takes_an_empty_batch(layout, packed):
    """B = 0 on every layout (the ops give any of them a batch-0 call, should a choice ever be made for one):
    empty outputs, h_n the empty h0, one or both directions."""
    T, H = 3, 8
    xw, h0, w = torch.randn(T, 0, H, device=DEVICE), torch.randn(0, H, device=DEVICE), torch.randn(H, H, device=DEVICE)
    lengths = torch.zeros(0, dtype=torch.int32, device=DEVICE) if packed else None
    out, h_n = kernels.recurrence_forward(xw, h0, w, lengths=lengths, layout=layout)
    dz = kernels.recurrence_backward(xw, xw, w, lengths=lengths, layout=layout)
    assert out.shape == dz.shape == (T, 0, H) and h_n.shape == (0, H)
    both = torch.stack([xw, xw])
    out, h_n = kernels.recurrence_forward(both, torch.stack([h0, h0]), torch.stack([w, w]), lengths=lengths,
                                          layout=layout)
    dz = kernels.recurrence_backward(both, both, torch.stack([w, w]), lengths=lengths, layout=layout)
    assert out.shape == dz.shape == (2, T, 0, H) and h_n.shape == (2, 0, H)


def test_ops_run_an_empty_batch_without_choosing_a_layout(monkeypatch):
    """The custom ops take B = 0 before the dispatcher (the cost model has no rows to weigh): forward and
    backward of one and of both directions, whichever layout the dispatcher would have taken."""
    monkeypatch.setattr(dispatch, "choose", lambda *args: pytest.fail("a layout was chosen for batch 0"))
    T, H = 3, 8
    xw, h0, w = torch.randn(T, 0, H, device=DEVICE), torch.randn(0, H, device=DEVICE), torch.randn(H, H, device=DEVICE)
    for d in (1, 2):
        stack = lambda t: torch.stack([t] * d)  # noqa: E731
        out, h_n = ops.recurrence(stack(xw), stack(h0), stack(w), None, False, "tanh", False)
        dz, dh0, dw_hh = ops.recurrence_backward(stack(xw), stack(h0), out, stack(h0), stack(w), None, False, "tanh",
                                                 False)
        assert out.shape == dz.shape == (d, T, 0, H) and h_n.shape == dh0.shape == (d, 0, H)
        assert torch.equal(dw_hh, torch.zeros(d, H, H, device=DEVICE))


def test_launcher_rejects_bad_shapes():
    xw = torch.randn(3, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="h0 must have shape"):
        kernels.recurrence_forward(xw, torch.zeros(2, 5, device=DEVICE), torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="w_hh must have shape"):
        kernels.recurrence_forward(xw, torch.zeros(2, 4, device=DEVICE), torch.zeros(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="layout must be one of"):
        kernels.recurrence_forward(xw, torch.zeros(2, 4, device=DEVICE), torch.zeros(4, 4, device=DEVICE),
                                   layout="fast")
    with pytest.raises(ValueError, match="cell must be one of"):
        kernels.recurrence_forward(xw, torch.zeros(2, 4, device=DEVICE), torch.zeros(4, 4, device=DEVICE),
                                   cell="sigmoid")
    with pytest.raises(TypeError, match="support float16"):
        kernels.recurrence_forward(xw.int(), torch.zeros(2, 4, device=DEVICE).int(),
                                   torch.zeros(4, 4, device=DEVICE).int())


def test_launcher_refuses_what_cannot_load():
    """fp32/fp64 W_hh at H = 200 (BLOCK_H 256) needs 278,528-557,056 B of shared memory on sm_90: the
    interpreter would run it, a GPU would not load it, so no device takes it."""
    H = 200
    for dtype, tf32 in ((torch.float32, True), (torch.float32, False), (torch.float64, False)):
        xw = torch.randn(3, 2, H, device=DEVICE, dtype=dtype)
        with pytest.raises(ValueError, match="shared memory a program may use"):
            kernels.recurrence_forward(xw, xw[0], torch.zeros(H, H, device=DEVICE, dtype=dtype), layout="sequence",
                                       allow_tf32=tf32)
    too_wide = triton_config(BLOCK_B=16, BLOCK_N=64, K_SPLIT=1)  # 335,872 B of fp64 slice and state at H = 512
    xw = torch.randn(3, 2, 512, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="B of shared memory"):
        kernels.recurrence_forward(xw, xw[0], torch.zeros(512, 512, device=DEVICE, dtype=torch.float64),
                                   layout="persistent", config=too_wide)


def triton_config(**kwargs):
    return configs.config_from_dict({**kwargs, "num_warps": 8, "num_stages": 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("layout", ["sequence", "stepwise"])
def test_tanh_within_a_few_ulps_of_torch(layout, dtype):
    """h = tanh(xw) (W_hh = 0, h0 = 0) on tiny, moderate and huge arguments, both signs: within 4 ulps
    of torch.tanh in the same dtype. (1 - e) / (1 + e) alone gave tanh(1e-8) = 0 and 3e-4 relative
    error at 1e-4."""
    magnitudes = [1e-30, 1e-8, 1e-6, 1e-4, 1e-2, 0.1, 0.124, 0.125, 0.126, 0.25, 0.49, 0.5, 0.51, 1.0, 3.0, 10.0,
                  20.0, 100.0, 1e4, 1e30]  # and the series' thresholds: 1/8 (fp64), 1/2 (fp32)
    z = torch.tensor(magnitudes + [-m for m in magnitudes] + [0.0], dtype=dtype, device=DEVICE)
    H = z.numel()
    out, _ = kernels.recurrence_forward(z.reshape(1, 1, H), z.new_zeros(1, H), z.new_zeros(H, H), layout=layout)
    expected = torch.tanh(z)
    finfo = torch.finfo(dtype)
    ulps = (out.flatten() - expected).abs() / (finfo.eps * expected.abs()).clamp_min(finfo.tiny)
    worst = ulps.argmax().item()
    assert ulps.max().item() <= 4, f"tanh({z[worst].item()!r}) = {out.flatten()[worst].item()!r}, torch: " \
                                   f"{expected[worst].item()!r} ({ulps[worst].item():.1f} ulps)"


def test_relu_propagates_nan_as_torch_does():
    """A NaN input: relu keeps NaN in the forward (the GPU's max would make it 0), and the backward
    passes the gradient where h_t is NaN, as torch's relu backward does (result <= 0 ? 0 : grad)."""
    torch.manual_seed(0)
    oracle = torch.nn.RNN(INPUT, 6, nonlinearity="relu").double()
    x = torch.randn(4, 3, INPUT, dtype=torch.float64)
    x[1, 0, 2] = float("nan")
    g = torch.randn(4, 3, 6, dtype=torch.float64)
    weights = [w.detach().clone().to(DEVICE).requires_grad_() for w in oracle._flat_weights]
    x_ours, x_torch = x.clone().to(DEVICE).requires_grad_(), x.clone().requires_grad_()
    out, h_n = functional.rnn_layer(x_ours, torch.zeros(3, 6, dtype=torch.float64, device=DEVICE), *weights,
                                    nonlinearity="relu")
    (out * g.to(DEVICE)).sum().backward()
    ref_out, ref_hn = oracle(x_torch)
    (ref_out * g).sum().backward()
    ours = [out, h_n, x_ours.grad, *(w.grad for w in weights)]
    theirs = [ref_out, ref_hn[0], x_torch.grad, *(w.grad for w in oracle._flat_weights)]
    for name, a, b in zip(("out", "h_n", "dx", "dw_ih", "dw_hh", "db_ih", "db_hh"), ours, theirs, strict=True):
        a, b = a.detach().cpu(), b.detach()
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN where torch has none, or the reverse"
        assert b.isnan().any() or name in ("dx", "db_ih", "db_hh"), name  # the case reaches NaN
        torch.testing.assert_close(a, b, equal_nan=True, atol=1e-10, rtol=1e-10, msg=name)


def test_lengths_checked_on_the_host_only_where_they_live(monkeypatch):
    """CPU lengths (a PackedSequence's): checked on the host, a ValueError with the values. Device
    lengths: torch._assert_async, never a host sync (it fires at the device's next sync;
    tests/nn/test_modules_gpu.py checks that valid CUDA lengths do not synchronise)."""
    with pytest.raises(ValueError, match=r"values in \[1, 3\], got \[0, 3\]"):
        functional._check_lengths(torch.tensor([0, 3]), 3, 2)
    functional._check_lengths(torch.tensor([1, 3]), 3, 2)
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda valid, message: asserted.append((valid.device, message)))
    functional._check_lengths(torch.tensor([0, 9], device="meta"), 3, 2)  # meta: no values a host could read
    assert asserted == [(torch.device("meta"), "lengths must be values in [1, 3]")]


def test_autotune_key_separates_every_variant():
    """A config tuned for tanh must not be reused for relu, reverse or packed input: every constexpr
    a launch sets (its heuristics' flags too, which must run before the autotuner) is in the key."""
    for layout in configs.AUTOTUNED:  # the persistent kernel never autotunes (its grid depends on its resources)
        heuristics = launch._autotuned(layout)
        keys = set(heuristics.fn.keys)
        assert "HAS_LENGTHS" in heuristics.values  # derived before the autotuner sees the arguments
        assert {"H", "B_BUCKET", "BACKWARD", "CELL", "HAS_LENGTHS", "INPUT_PRECISION"} <= keys
        assert ("REVERSE" in keys) == (layout != "stepwise")  # the step kernel has no direction
        assert "T" not in keys and "B" not in keys


def test_autotuner_prunes_by_each_launch_budget():
    """The autotuner holds every config of the spaces; each launch keeps those that load for its
    dtype and precision (a 128 x 128 x 64 step tile: 98,304 B in bf16, 393,216 B in fp64)."""
    prune, full = configs.prune_space("stepwise"), configs.full_space("stepwise")

    def largest_tile_kept(dtype, precision):
        kept = prune(full, {"p_in": torch.empty(0, dtype=dtype), "B": 256, "H": 1024}, INPUT_PRECISION=precision)
        return any((c.kwargs["BLOCK_B"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) == (128, 128, 64) for c in kept)

    assert largest_tile_kept(torch.bfloat16, "ieee") and largest_tile_kept(torch.float32, "tf32")
    assert not largest_tile_kept(torch.float64, "ieee")
    for dtype, precision in ((torch.float32, "tf32"), (torch.float32, "tf32x3"), (torch.float64, "ieee")):
        kept = configs.prune_space("sequence")(configs.full_space("sequence"),
                                               {"p_in": torch.empty(0, dtype=dtype), "B": 256, "H": 128},
                                               INPUT_PRECISION=precision)
        assert kept and all(configs.config_fits("sequence", c, 128, dtype, precision == "tf32") for c in kept)
