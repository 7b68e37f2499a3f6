"""What only a GPU can show of the kernels: TF32 numerics, 64-bit offsets, the persistent and cluster
layouts at realistic sizes (their plans, barriers and time-outs), relu's NaN, the barrier probe."""
import pytest
import torch

from conftest import TOLERANCE, assert_close, dtype_id
from tritonrnn import kernels, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_recurrence_close(dtype: torch.dtype, **pairs) -> None:
    """Each (actual, expected) of `pairs` within `dtype`'s tolerance; fp32 multiplies in TF32 here, held to the
    bound of test_tf32_recurrence_within_tf32_tolerance."""
    for name, (actual, expected) in pairs.items():
        if dtype == torch.float32:
            error = (actual.double() - expected).abs().max().item() / expected.abs().max().item()
            assert error < 1e-2, (name, error)
        else:
            assert_close(actual, expected, dtype, name)


@pytest.mark.parametrize("B", [16, 64])
@pytest.mark.parametrize("path", kernels.configs.TUNED_LAYOUTS)
def test_tf32_recurrence_within_tf32_tolerance(path, B):
    """TF32 (cuDNN's default for fp32 RNNs): forward and backward against float64."""
    torch.manual_seed(0)
    T, H = 32, 128
    eye = torch.eye(H, device="cuda", dtype=torch.float64)
    xw = torch.randn(T, B, H, device="cuda", dtype=torch.float64)
    h0 = torch.randn(B, H, device="cuda", dtype=torch.float64)
    w = torch.randn(H, H, device="cuda", dtype=torch.float64) / H ** 0.5
    ref_out, _ = reference.forward(xw, h0, eye, w)
    grad = torch.randn_like(ref_out)
    ref = reference.backward(xw, h0, eye, w, ref_out, grad, torch.zeros_like(h0))
    out, _ = kernels.recurrence_forward(xw.float(), h0.float(), w.float(), layout=path, allow_tf32=True)
    dz = kernels.recurrence_backward(grad.float(), ref_out.float(), w.float(), layout=path, allow_tf32=True)
    for name, actual, expected in (("out", out, ref_out), ("dz", dz, ref.dz)):
        error = (actual.double() - expected).abs().max().item() / expected.abs().max().item()
        assert error < 1e-2, (name, error)


@pytest.mark.parametrize("path", kernels.configs.TUNED_LAYOUTS)
def test_offsets_past_2_31_elements(path):
    """T*B*H > 2^31: the last rows must match a run of those rows alone (small offsets), at the
    steps past 2^31 elements (the forward's last, the backward's first) and at the other end."""
    T, B, H = 8200, 2048, 128  # 2.15e9 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * T * B * H * 2 + (1 << 30):
        pytest.skip("not enough GPU memory")
    torch.manual_seed(0)
    xw = torch.randn(T, B, H, device="cuda", dtype=torch.float16)
    h0 = torch.randn(B, H, device="cuda", dtype=torch.float16)
    w = (torch.randn(H, H, device="cuda") / H ** 0.5).half()
    out, h_n = kernels.recurrence_forward(xw, h0, w, layout=path)
    tail = slice(B - 16, B)
    out_tail, h_n_tail = kernels.recurrence_forward(xw[:, tail].contiguous(), h0[tail].contiguous(), w, layout=path)
    atol, rtol = TOLERANCE[torch.float16]
    torch.testing.assert_close(out[-4:, tail], out_tail[-4:], atol=atol, rtol=rtol)
    torch.testing.assert_close(h_n[tail], h_n_tail, atol=atol, rtol=rtol)
    del xw
    dz = kernels.recurrence_backward(out, out, w, layout=path)  # any [T, B, H] gradient will do
    dz_tail = kernels.recurrence_backward(out[:, tail].contiguous(), out[:, tail].contiguous(), w, layout=path)
    # The backward walks from t = T-1: its first steps are the ones past 2^31 elements (by the walk's
    # end, dz[:4], thousands of contracting steps have erased any error made there).
    torch.testing.assert_close(dz[-4:, tail], dz_tail[-4:], atol=atol, rtol=rtol)
    torch.testing.assert_close(dz[:4, tail], dz_tail[:4], atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B", [1, 40, 300])
@pytest.mark.parametrize("H", [256, 1024, 2048])
def test_persistent_path_with_lengths_matches_reference(H, B, dtype):
    """The persistent path's programs exchange the state through L2 and a group barrier each step,
    with the default tiling (fp32 in TF32, as cuDNN runs it), against float64: both directions."""
    torch.manual_seed(H + B)
    T = 48
    eye = torch.eye(H, device="cuda", dtype=torch.float64)
    xw = torch.randn(T, B, H, device="cuda", dtype=torch.float64)
    h0 = torch.randn(B, H, device="cuda", dtype=torch.float64)
    w = torch.randn(H, H, device="cuda", dtype=torch.float64) / H ** 0.5
    lengths = torch.randint(1, T + 1, (B,), device="cuda")
    for reverse in (False, True):
        ref_out, ref_hn = reference.forward(xw, h0, eye, w, lengths=lengths, reverse=reverse)
        grad = torch.randn_like(ref_out) * (torch.arange(T, device="cuda")[:, None] < lengths)[..., None]
        ref = reference.backward(xw, h0, eye, w, ref_out, grad, torch.zeros_like(h0), lengths=lengths,
                                 reverse=reverse)
        out, h_n = kernels.recurrence_forward(xw.to(dtype), h0.to(dtype), w.to(dtype), lengths=lengths,
                                              reverse=reverse, layout="persistent", allow_tf32=True)
        dz = kernels.recurrence_backward(grad.to(dtype), ref_out.to(dtype), w.to(dtype), lengths=lengths,
                                         reverse=reverse, layout="persistent", allow_tf32=True)
        _assert_recurrence_close(dtype, out=(out, ref_out), h_n=(h_n, ref_hn), dz=(dz, ref.dz))


def test_persistent_plan_fits_this_gpu():
    """The launcher's plan never exceeds what this GPU holds of the compiled kernel (the driver's
    occupancy answer), and the hand model (SMLimits, programs_per_sm: what offline plans use) agrees
    with the driver on every default variant."""
    disagreements = []
    for dtype in DTYPES:
        for H in (256, 512, 1024, 2048):
            if kernels.default_layout(H, dtype) != "persistent":
                continue
            for direction in ("forward", "backward"):
                for B in (1, 16, 64, 256):
                    plan = kernels.launch.persistent_plan(512, B, H, dtype, torch.device("cuda"), direction)
                    assert plan.waits and plan.programs <= plan.resident_capacity, (dtype, H, B, plan)
                    if plan.modelled_capacity != plan.resident_capacity:
                        disagreements.append((dtype, H, direction, plan.modelled_capacity, plan.resident_capacity))
    assert not disagreements, f"hand model != driver (dtype, H, direction, model, driver): {disagreements}"


def test_persistent_wait_times_out_instead_of_hanging(monkeypatch):
    """A program that never arrives (DEBUG_ABSENT): the group's waits end after the limit
    (%globaltimer), its outputs are NaN and the launcher raises, in about the limit, not a hang."""
    import time

    import triton
    from tritonrnn.kernels import launch
    from tritonrnn.kernels.occupancy import BarrierTimeout
    T, B, H = 8, 16, 256
    xw = torch.randn(T, B, H, device="cuda", dtype=torch.bfloat16)
    h0 = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(H, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5
    outputs = []  # out and h_n, allocated as zeros: the kernel must write the NaN
    monkeypatch.setattr(launch, "_empty_like", lambda t: outputs.append(torch.zeros_like(t)) or outputs[-1])
    monkeypatch.setattr(launch, "WAIT_TIMEOUT_S", 0.5)
    default = kernels.configs.default_config("persistent", B, H, torch.bfloat16)
    config = triton.Config({**default.kwargs, "DEBUG_ABSENT": 1}, num_warps=default.num_warps,
                           num_stages=default.num_stages)
    start = time.monotonic()
    with pytest.raises(BarrierTimeout, match="group 0 of direction 0"):
        kernels.recurrence_forward(xw, h0, w, layout="persistent", config=config)
    assert time.monotonic() - start < 30
    out, h_n = outputs
    assert out.isnan().all() and h_n.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("path", kernels.configs.TUNED_LAYOUTS)
def test_relu_keeps_nan_on_the_gpu(path, dtype):
    """relu(NaN) is NaN as in torch (max.f32 without NaN propagation would give 0), and the backward
    passes the gradient through it as torch's relu backward does."""
    torch.manual_seed(0)
    T, B, H = 6, 16, 64
    eye = torch.eye(H, device="cuda", dtype=torch.float64)
    xw = torch.randn(T, B, H, device="cuda", dtype=torch.float64)
    xw[2, 3, 5] = float("nan")
    h0 = torch.randn(B, H, device="cuda", dtype=torch.float64)
    w = torch.randn(H, H, device="cuda", dtype=torch.float64) / H ** 0.5
    ref_out, _ = reference.forward(xw, h0, eye, w, nonlinearity="relu")
    grad = torch.randn_like(ref_out)
    ref = reference.backward(xw, h0, eye, w, ref_out, grad, torch.zeros_like(h0), nonlinearity="relu")
    out, _ = kernels.recurrence_forward(xw.to(dtype), h0.to(dtype), w.to(dtype), cell="relu", layout=path)
    dz = kernels.recurrence_backward(grad.to(dtype), ref_out.to(dtype), w.to(dtype), cell="relu", layout=path)
    for name, actual, expected in (("out", out, ref_out), ("dz", dz, ref.dz)):
        assert torch.equal(actual.isnan(), expected.isnan()), name
        finite = ~expected.isnan()
        assert_close(actual[finite], expected[finite], dtype, name)


def test_w_hh_offsets_past_2_31_elements():
    """H = 46,400: W_hh has H^2 > 2^31 elements, so its rows past 46,341 sit at offsets int32 wraps
    (forward: every output column reads one; backward: every chunk past that row). One step of each,
    against torch's matmul on the same fp16 inputs."""
    H = 46_400
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * H * H * 2 + (1 << 30):
        pytest.skip("not enough GPU memory")
    torch.manual_seed(0)
    w = torch.empty(H, H, device="cuda", dtype=torch.float16).normal_(std=H ** -0.5)
    xw = torch.randn(2, 1, H, device="cuda", dtype=torch.float16)
    h0 = torch.randn(1, H, device="cuda", dtype=torch.float16)
    out, _ = kernels.recurrence_forward(xw, h0, w, layout="stepwise")
    for t, prev in ((0, h0), (1, out[0])):
        expected = torch.tanh(xw[t].float() + (prev @ w.T).float())
        assert_close(out[t], expected, torch.float16, f"h_{t}")
    grad = torch.randn_like(out)
    dz = kernels.recurrence_backward(grad, out, w, layout="stepwise")
    h = out.float()
    expected = (grad[0].float() + (dz[1] @ w).float()) * (1 - h[0] ** 2)
    assert_close(dz[0], expected, torch.float16, "dz_0")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B", [1, 40, 300])
@pytest.mark.parametrize("H", [256, 512, 1024])
def test_cluster_path_with_lengths_matches_reference(H, B, dtype, monkeypatch):
    """The cluster form (kernels/launch.py): each batch group one thread-block cluster of 4 to 16
    CTAs waiting at the hardware cluster barrier, several clusters a launch; forward and fused
    backward, both directions, against float64 (NaN-poisoned outputs). Where this GPU holds no such
    cluster the launch must say so (ClusterUnavailable), not hang."""
    from tritonrnn.kernels import launch
    if not kernels.configs.layout_fits("cluster", H, dtype):
        pytest.skip(f"the cluster form does not run H = {H} in {dtype}")
    torch.manual_seed(H + B)
    T = 48
    eye = torch.eye(H, device="cuda", dtype=torch.float64)
    xw = torch.randn(T, B, H, device="cuda", dtype=torch.float64)
    h0 = torch.randn(B, H, device="cuda", dtype=torch.float64)
    w = torch.randn(H, H, device="cuda", dtype=torch.float64) / H ** 0.5
    lengths = torch.randint(1, T + 1, (B,), device="cuda", dtype=torch.int32)
    options = dict(lengths=lengths, layout="cluster", allow_tf32=True)
    launched, run = [], launch._launch_clusters_of
    monkeypatch.setattr(launch, "_launch_clusters_of", lambda *a, **k: launched.append(run(*a, **k)) or launched[-1])
    for reverse in (False, True):
        ref_out, ref_hn = reference.forward(xw, h0, eye, w, lengths=lengths, reverse=reverse)
        grad = torch.randn_like(ref_out) * (torch.arange(T, device="cuda")[:, None] < lengths)[..., None]
        ref = reference.backward(xw, h0, eye, w, ref_out, grad, torch.zeros_like(h0), lengths=lengths,
                                 reverse=reverse)
        out, h_n = kernels.recurrence_forward(xw.to(dtype), h0.to(dtype), w.to(dtype), reverse=reverse, **options)
        dz = kernels.recurrence_backward(grad.to(dtype), ref_out.to(dtype), w.to(dtype), reverse=reverse, **options)
        chosen = launched[-2]
        assert chosen.cluster and chosen.programs_per_group in (4, 8, 16), chosen
        assert chosen.groups <= chosen.resident_clusters, chosen
        _assert_recurrence_close(dtype, out=(out, ref_out), h_n=(h_n, ref_hn), dz=(dz, ref.dz))


def test_cluster_barrier_probe_runs_16_ctas():
    """The calibration's probe: 16-CTA clusters (non-portable) at the hardware barrier, and the
    counter barrier's 16 programs counting every arrival."""
    from tritonrnn.kernels import launch
    assert launch.probe_barrier("cluster", steps=1000, size=16, groups=4).tolist() == [0] * 4
    assert launch.probe_barrier("counter", steps=1000, size=16, groups=4).tolist() == [16000] * 4
    torch.cuda.synchronize()


def test_cluster_path_runs_without_falling_back():
    """recurrence_forward/backward with layout="cluster", one direction and both, launch clusters on an
    sm_90 GPU (no refusal) and match the persistent layout's results."""
    from tritonrnn.kernels import launch
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90")
    torch.manual_seed(1)
    T, B, H = 32, 40, 512
    xw = torch.randn(2, T, B, H, device="cuda", dtype=torch.bfloat16)
    h0 = torch.randn(2, B, H, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(2, H, H, device="cuda") / H ** 0.5).to(torch.bfloat16)
    out, h_n = kernels.recurrence_forward(xw[0], h0[0], w[0], layout="cluster")
    dz = kernels.recurrence_backward(torch.ones_like(out), out, w[0], layout="cluster")
    out2, h_n2 = kernels.recurrence_forward(xw, h0, w, layout="cluster")
    ref_out, ref_hn = kernels.recurrence_forward(xw[0], h0[0], w[0], layout="persistent")
    ref_dz = kernels.recurrence_backward(torch.ones_like(out), out, w[0], layout="persistent")
    ref_out2, _ = kernels.recurrence_forward(xw, h0, w, layout="persistent")
    for name, actual, expected in (("out", out, ref_out), ("h_n", h_n, ref_hn), ("dz", dz, ref_dz),
                                   ("out2", out2, ref_out2)):
        assert_close(actual.double(), expected.double(), torch.bfloat16, name)
    assert launch.cluster_refusal(xw.device) is None
