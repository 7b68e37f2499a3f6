"""What only a GPU can show of the dispatcher: Triton's autotuner as the fallback, a cooperative launch
the driver refuses, the self-test gate on a device and during CUDA-graph capture."""
import pytest
import torch

from conftest import assert_close
from tritonrnn import kernels, reference

pytestmark = pytest.mark.gpu


def test_autotuner_fallback_runs_and_matches(monkeypatch):
    """With no shipped config, Triton's autotuner picks one (the suite otherwise turns it off)."""
    monkeypatch.setenv("TRITONRNN_AUTOTUNE", "1")
    monkeypatch.setenv("TRITONRNN_TUNED", "0")
    torch.manual_seed(0)
    xw = torch.randn(16, 40, 96, device="cuda")
    h0 = torch.randn(40, 96, device="cuda")
    w = torch.randn(96, 96, device="cuda") / 10
    ref_out, _ = reference.forward(xw.double(), h0.double(), torch.eye(96, device="cuda", dtype=torch.float64),
                                   w.double())
    for path in kernels.configs.TUNED_LAYOUTS:
        out, _ = kernels.recurrence_forward(xw, h0, w, layout=path, allow_tf32=False)
        assert_close(out, ref_out, torch.float32, path)


def test_refused_cooperative_launch_runs_the_next_layout(monkeypatch):
    """A plan the GPU cannot hold (the capacity faked large: far more groups than fit) is refused by
    the driver at the cooperative launch: the launcher raises LaunchRefused, and the op (through the
    dispatcher, forced to the persistent layout first) warns once and runs the next layout."""
    from tritonrnn import dispatch, ops
    from tritonrnn.kernels import occupancy
    monkeypatch.setattr(occupancy, "resident_capacity", lambda compiled, device: 1 << 20)
    monkeypatch.setattr(kernels.launch, "_CAPACITIES", {})  # not what an earlier launch of the kernel was told
    T, B, H = 4, 4096, 1024
    xw = torch.randn(T, B, H, device="cuda", dtype=torch.float64)
    h0 = torch.randn(B, H, device="cuda", dtype=torch.float64)
    w = torch.randn(H, H, device="cuda", dtype=torch.float64) / H ** 0.5
    ref_out, ref_hn = reference.forward(xw, h0, torch.eye(H, device="cuda", dtype=torch.float64), w)
    half = lambda t: t.to(torch.bfloat16)[None]  # noqa: E731
    with pytest.raises(occupancy.LaunchRefused, match="refused a cooperative launch"):
        kernels.recurrence_forward(half(xw)[0], half(h0)[0], half(w)[0], layout="persistent")
    choices = iter([dispatch.Choice("persistent", None, "test"), dispatch.Choice("stepwise", None, "test")])
    monkeypatch.setattr(dispatch, "choose", lambda shape, device: next(choices))
    with pytest.warns(RuntimeWarning, match="refused a cooperative launch"):
        out, h_n = ops.recurrence(half(xw), half(h0), half(w), None, False, "tanh", False)
    assert_close(out[0], ref_out, torch.bfloat16, "out")
    assert_close(h_n[0], ref_hn, torch.bfloat16, "h_n")


# The self-test gate (tritonrnn.selftest) on a real device: written before any GPU ran it.

def test_every_layout_passes_its_selftest_here(monkeypatch, tmp_path):
    """`tritonrnn selftest`'s checks on this GPU: every layout passes in every dtype it serves (the
    cluster only from sm_90: refused before), and once compiled a layout's checks take well under a
    second."""
    from tritonrnn import selftest

    monkeypatch.setenv("TRITONRNN_CACHE_DIR", str(tmp_path))
    selftest.reset()
    try:
        for run in range(2):  # the first compiles
            rows = selftest.run_all(torch.device("cuda"))
            for row in rows[1:]:
                sm90 = torch.cuda.get_device_capability()[0] >= 9
                expected = ("passed", "not run") if row["layout"] != "cluster" or sm90 else ("refused", "not run")
                assert row["status"] in expected, row
                assert run == 0 or row["seconds"] < 1.0, row
    finally:
        selftest.reset()


def test_no_selftest_runs_during_graph_capture(monkeypatch, tmp_path):
    """While a CUDA graph is captured an untested layout is not taken (one warning) and nothing runs;
    after a check outside the capture, its verdict is used inside one."""
    from tritonrnn import selftest

    monkeypatch.setenv("TRITONRNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(selftest, "check", lambda *args: pytest.fail("no self-test during capture"))
    selftest.reset()
    graph, x = torch.cuda.CUDAGraph(), torch.zeros(4, device="cuda")
    try:
        with pytest.warns(RuntimeWarning, match="no self-test can run while a CUDA graph is captured"):
            with torch.cuda.graph(graph):
                assert not selftest.usable("sequence", torch.float32, torch.device("cuda"), allow_tf32=True)
                x += 1
        monkeypatch.undo()
        monkeypatch.setenv("TRITONRNN_CACHE_DIR", str(tmp_path))
        assert selftest.usable("sequence", torch.float32, torch.device("cuda"), allow_tf32=True)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            assert selftest.usable("sequence", torch.float32, torch.device("cuda"), allow_tf32=True)
            x += 1
    finally:
        selftest.reset()
