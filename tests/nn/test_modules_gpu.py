"""What only a GPU can show of the modules: torch.nn.RNN's results at realistic sizes, device lengths
checked without a host sync."""
import pytest
import torch
from torch import nn

import tritonrnn
from conftest import assert_close, dtype_id
from tritonrnn import functional, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("B", [1, 64, 130])
@pytest.mark.parametrize("H", [64, 128, 256, 512])
def test_rnn_realistic_sizes_match_torch_float64(H, B, dtype):
    torch.manual_seed(H + B)
    oracle = nn.RNN(H, H, num_layers=2, bidirectional=True).double().cuda()
    ours = tritonrnn.RNN(H, H, num_layers=2, bidirectional=True, device="cuda", dtype=dtype)
    ours.load_state_dict(oracle.state_dict())
    x = torch.randn(64, B, H, device="cuda", dtype=torch.float64)
    g = torch.randn(64, B, 2 * H, device="cuda", dtype=torch.float64)
    results = []
    for module, run_dtype in ((ours, dtype), (oracle, torch.float64)):
        xin = x.to(run_dtype).requires_grad_()
        out, h_n = module(xin)
        (out * g.to(run_dtype)).sum().backward()
        results.append({"out": out, "h_n": h_n, "dx": xin.grad,
                        **{n: p.grad for n, p in module.named_parameters()}})
    for name in results[1]:
        assert_close(results[0][name], results[1][name], dtype, name)


def test_device_lengths_are_checked_without_a_host_sync():
    """CUDA lengths are checked by an asynchronous device assertion: no host sync (which would block,
    and break CUDA-graph capture and compiled graphs); CPU lengths (PackedSequence's) on the host."""
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 4, 8
    x, h0 = torch.randn(T, B, I, device="cuda"), torch.randn(B, H, device="cuda")
    w_ih, w_hh = torch.randn(H, I, device="cuda"), torch.randn(H, H, device="cuda") / H ** 0.5
    lengths = torch.tensor([5, 2, 3], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, h_n = functional.rnn_layer(x, h0, w_ih, w_hh, lengths=lengths)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_out, ref_hn = reference.forward(x.double(), h0.double(), w_ih.double(), w_hh.double(), lengths=lengths)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(h_n, ref_hn, torch.float32, "h_n")
