"""What the benchmark measures with and against: the work and floor of a case (measure), the providers'
runs and their comparison with the float64 reference (providers), the profiler's backend."""
import math
import os
import subprocess
import sys

import pytest
import torch

from tritonrnn.perf import bench, grid, measure, providers, report


def test_case_work_counts_flops():
    case = grid.Case("float32", 2, 4, seq_len=3, input_size=5)
    work = measure.case_work(case, "inference", 4)
    assert work["flops"] == 2 * 3 * 2 * 4 * (5 + 4)
    assert measure.case_work(case, "training", 4)["flops"] == 3 * work["flops"]
    assert work["chain_steps"] == 3


def test_compare_rejects_nan_reference_wrong_shapes_and_non_finite_outputs():
    reference = (torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64))
    close = tuple((t * (1 + 1e-6)).float() for t in reference)
    assert providers.compare(close, reference, torch.float32)[0]
    broadcastable = (close[0], close[1].expand(5, 3, 4))  # (1,3,4) vs (5,3,4) would broadcast
    ok, error, why = providers.compare(broadcastable[::-1], reference[::-1], torch.float32, ["h_n", "out"])
    assert not ok and "shape" in why and "(5, 3, 4)" in why
    ok, _, why = providers.compare((close[0][:, :1],) + close[1:], reference, torch.float32)
    assert not ok and "shape" in why  # (5,3,1) against (5,3,4)
    ok, _, why = providers.compare((close[0], torch.full_like(close[1], math.nan)), reference, torch.float32)
    assert not ok and "not finite" in why
    assert not providers.compare(close[:1], reference, torch.float32)[0]
    poisoned = (reference[0].clone().fill_(math.nan), reference[1])
    with pytest.raises(ValueError, match="not finite"):
        providers.check_reference(poisoned)
    # Norm-wise: one element off by 10% of itself in a large tensor is within bf16's tolerance.
    big = torch.randn(64, 16, 32, dtype=torch.float64)
    spiked = big.clone()
    spiked.view(-1)[0] *= 1.1
    ok, error, _ = providers.compare((spiked,), (big,), torch.bfloat16)
    assert ok and error < 1e-2
    ok, error, why = providers.compare((big * 1.2,), (big,), torch.bfloat16, ["d_weight_hh_l0"])
    assert not ok and error == pytest.approx(0.2) and "d_weight_hh_l0" in why


def test_nan_float64_reference_leaves_rows_unchecked_not_blamed(monkeypatch):
    honest = providers.Run.outputs

    def nan_reference(self, mode):
        results = honest(self, mode)
        return tuple(torch.full_like(t, math.nan) for t in results) if self.dtype == torch.float64 else results

    monkeypatch.setattr(providers.Run, "outputs", nan_reference)
    rows = bench.run([grid.smoke_grid()[0]], timer=measure.wall_timer, profile=False,
                     providers=("tritonrnn", "torch-native"))["rows"]
    assert {r["status"] for r in rows} == {"unchecked"}
    assert all("float64 reference failed" in r["error"] and r["median_ms"] is None for r in rows)
    for line in report.summary(rows):  # no provider counted as failed
        assert (line["cells"], line["failed"], line["cudnn_failed"], line["unchecked"]) == (0, 0, 0, 1)


def test_packed_case_packs_once_outside_the_timed_call(monkeypatch):
    calls = []
    real = providers.pack_padded_sequence
    monkeypatch.setattr(providers, "pack_padded_sequence", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    case = grid.Case("float32", 5, 8, seq_len=6, packed=True)
    run = providers.Run("torch-native", case, torch.device("cpu"))
    packed_at_setup = len(calls)
    for mode in ("inference", "training"):
        run.fn(mode)()
    assert packed_at_setup == len(run.inputs) and len(calls) == packed_at_setup
    out = run.outputs("training")
    assert out[0].shape == (sum(case.lengths()), 8) and out[2].shape == (sum(case.lengths()), 8)


def test_backend_from_ops_tells_cudnn_from_its_fallback():
    cuda = torch.device("cuda")
    assert measure.backend_from_ops({"aten::rnn_tanh", "aten::_cudnn_rnn"}, cuda) == "cudnn"
    assert measure.backend_from_ops({"aten::rnn_tanh", "aten::addmm", "aten::tanh"}, cuda) == "torch-native"
    assert measure.backend_from_ops({"tritonrnn::recurrence"}, cuda) == "triton"


def test_failing_ceilings_leave_the_cases_running_without_a_floor(monkeypatch):
    def broken(*args):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(measure, "ceilings", broken)
    results = bench.run([grid.smoke_grid()[0]], timer=lambda fn: measure.wall_timer(fn, reps=1), profile=False,
                        providers=("torch-native",))
    assert results["complete"] and "simulated" in results["ceilings"]["float32"]["error"]
    assert all(r["status"] == "ok" and r["floor_ms"] is None for r in results["rows"])


def test_floor_counts_packed_work_at_real_lengths():
    padded, packed = grid.Case("float32", 64, 256), grid.Case("float32", 64, 256, packed=True)
    ratio = measure.case_work(packed, "training", 4)["flops"] / measure.case_work(padded, "training", 4)["flops"]
    assert ratio == pytest.approx(sum(packed.lengths()) / (64 * 512)) and ratio < 0.6
    assert measure.case_work(packed, "training", 4)["chain_steps"] == 2 * 512


CHAIN_PTX = """
import re, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritonrnn.perf import measure
signature = {"p_out": "*bf16", "steps": "i32", "BLOCK": "constexpr", "DTYPE": "constexpr", "TF32": "constexpr"}
source = ASTSource(measure._dependent_chain_kernel, signature, {"BLOCK": 16, "DTYPE": tl.bfloat16, "TF32": False})
ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1}).asm["ptx"]
print(bool(re.search(r"mma.sync.aligned.m16n8k16[.a-z0-9]*bf16", ptx)), "ld.global" in ptx)
"""


def test_floor_chain_is_a_load_free_dependent_matmul_chain(device):
    """The chain term's step compiles (sm_90) to tensor-core matmuls with no global load at all."""
    from tritonrnn.perf import static

    if not static.available():
        pytest.skip("this triton cannot compile for NVIDIA offline")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CHAIN_PTX], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["True", "False"], result.stderr[-2000:]
    assert measure.dependent_step_ms(device, torch.float32, lambda fn: measure.wall_timer(fn, reps=1), 4) >= 0


def test_profiler_failure_keeps_the_time(monkeypatch):
    real_init = providers.Run.__init__
    built = []

    def fails_second_time(self, *args, **kwargs):  # the profiling pass rebuilds the case: out of memory there
        built.append(1)
        if len(built) > 2:
            raise RuntimeError("out of memory (simulated)")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(providers.Run, "__init__", fails_second_time)
    results = bench.run([grid.smoke_grid()[0]], timer=lambda fn: measure.wall_timer(fn, reps=1),
                        providers=("torch-native",), modes=("inference",))
    (row,) = results["rows"]
    assert results["complete"] and row["status"] == "ok" and row["median_ms"] > 0
    assert row["kernels"] == ["profiler failed: RuntimeError: out of memory (simulated)"]
