"""The kernels and the recurrence ops against the step-by-step float64 reference.

Forward: out (every h_t) and h_n from the launcher. Backward: dz (the fused kernel's output), dh_0
and dW_hh from the backward op, given the reference's activations so that only the backward is
under test. Then the whole layer's gradients through autograd, and gradcheck in float64.
"""
import pytest
import torch

from conftest import DEVICE, DTYPES, assert_close, dtype_id
from tritonrnn import functional, kernels, ops, reference

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


@pytest.mark.parametrize("path", kernels.PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_matches_reference(case, dtype, path):
    (T, B, H), (act, reverse, packed) = case
    p = _problem(T, B, H, packed, seed=T * 1000 + B * 10 + H)
    ref_out, ref_hn = reference.forward(p["x"], p["h0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], act,
                                        p["lengths"], reverse)
    out, h_n = kernels.recurrence_forward(_projected(p).to(dtype), p["h0"].to(dtype), p["w_hh"].to(dtype),
                                          lengths=p["lengths"], reverse=reverse, relu=act == "relu", path=path)
    assert out.dtype == h_n.dtype == dtype
    assert_close(out, ref_out, dtype, "out")
    assert_close(h_n, ref_hn, dtype, "h_n")


@pytest.mark.parametrize("path", kernels.PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_reference(case, dtype, path):
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
    dz, dh0, dw_hh = ops.recurrence_backward(cast(grad_out), cast(grad_hn), cast(out), cast(p["h0"]),
                                             cast(p["w_hh"]), lengths, reverse, act == "relu", path, False)
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


@pytest.mark.parametrize("path", kernels.PATHS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v))
def test_gradcheck_float64(variant, path, monkeypatch):
    act, reverse, packed = variant
    monkeypatch.setattr(functional, "kernel_path", lambda *args, **kwargs: path)
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


def test_launcher_rejects_bad_shapes():
    xw = torch.randn(3, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="h0 must have shape"):
        kernels.recurrence_forward(xw, torch.zeros(2, 5, device=DEVICE), torch.zeros(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="w_hh must have shape"):
        kernels.recurrence_forward(xw, torch.zeros(2, 4, device=DEVICE), torch.zeros(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="path must be one of"):
        kernels.recurrence_forward(xw, torch.zeros(2, 4, device=DEVICE), torch.zeros(4, 4, device=DEVICE),
                                   path="fast")
    with pytest.raises(TypeError, match="support float16"):
        kernels.recurrence_forward(xw.int(), torch.zeros(2, 4, device=DEVICE).int(),
                                   torch.zeros(4, 4, device=DEVICE).int())
