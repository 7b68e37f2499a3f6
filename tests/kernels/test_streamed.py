"""The streamed layout: the persistent kernel's counter groups with nothing held on chip (STREAM_K > 0):
every step each program reads its W slice and its group's state from L2 in STREAM_K-row chunks.

Under the interpreter's concurrent harness (tests/concurrent_interpreter.py: every program of a launch at
once) against the float64 reference, outputs poisoned with NaN: several groups of several programs,
several K chunks (the last masked past H), forward and backward, both directions, lengths, tanh and relu.
What the harness cannot see, the compiled kernel's memory order (its pipelined state copies must bypass
L1), is read in the offline sm_90 PTX.
"""
import pytest
import torch
import triton

from concurrent_interpreter import concurrent_programs
from conftest import DEVICE, assert_close, dtype_id, force_layout, offline_compile
from tritonrnn import costmodel, dispatch, kernels, ops, reference
from tritonrnn.kernels import configs, launch

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's concurrent harness")

# T = 4, B = 20 (2 groups of 16 rows, the second ragged), H = 40 (HP = 48): 3 programs of 16 columns a
# group, the last ragged; chunks of 32 rows of K: the second half past HP, masked.
T, B, H = 4, 20, 40
CONFIG = triton.Config({"BLOCK_B": 16, "BLOCK_N": 16, "K_SPLIT": 1, "STREAM_K": 32}, num_warps=4, num_stages=3)
VARIANTS = [("tanh", False, False), ("relu", False, True), ("tanh", True, True)]  # (cell, reverse, lengths)


def _problem(packed, seed, directions=1):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    lead = (directions,) if directions > 1 else ()
    p = dict(xw=rand(*lead, T, B, H), h0=rand(*lead, B, H), w_hh=rand(*lead, H, H, scale=1.5 / H ** 0.5))
    p["lengths"] = torch.randint(1, T + 1, (B,), generator=g) if packed else None
    return p


def _reference_forward(xw, h0, w_hh, cell, lengths, reverse):
    eye = torch.eye(H, dtype=torch.float64)  # xw is already projected: x = xw, W_ih = I
    return reference.forward(xw, h0, eye, w_hh, None, None, cell, lengths, reverse)


@pytest.fixture
def plans(monkeypatch):
    """The plans the counter launches ran (to check that programs really waited for each other)."""
    ran, run = [], launch._launch_persistent
    monkeypatch.setattr(launch, "_launch_persistent", lambda *args, **kw: ran.append(run(*args, **kw)) or ran[-1])
    return ran


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v))
def test_forward_with_concurrent_programs_matches_reference(variant, dtype, plans):
    cell, reverse, packed = variant
    p = _problem(packed, seed=21)
    with launch.checking(wait_s=60.0), concurrent_programs(seed=3):  # outputs start as NaN
        out, h_n = kernels.recurrence_forward(p["xw"].to(dtype), p["h0"].to(dtype), p["w_hh"].to(dtype),
                                              lengths=p["lengths"], reverse=reverse, cell=cell, layout="streamed",
                                              config=CONFIG)
    ref_out, ref_hn = _reference_forward(p["xw"], p["h0"], p["w_hh"], cell, p["lengths"], reverse)
    assert_close(out, ref_out, dtype, "out")
    assert_close(h_n, ref_hn, dtype, "h_n")
    assert [(plan.programs_per_group, plan.groups) for plan in plans] == [(3, 2)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v))
def test_backward_with_concurrent_programs_matches_reference(variant, monkeypatch, plans):
    cell, reverse, packed = variant
    p = _problem(packed, seed=22)
    out, _ = _reference_forward(p["xw"], p["h0"], p["w_hh"], cell, p["lengths"], reverse)
    g = torch.Generator().manual_seed(23)
    grad_out, grad_hn = torch.randn(T, B, H, generator=g, dtype=torch.float64), torch.randn(B, H, generator=g,
                                                                                            dtype=torch.float64)
    if packed:  # padding is not part of the output
        grad_out = grad_out * (torch.arange(T)[:, None] < p["lengths"])[..., None]
    eye = torch.eye(H, dtype=torch.float64)
    ref = reference.backward(p["xw"], p["h0"], eye, p["w_hh"], out, grad_out, grad_hn, cell, p["lengths"], reverse)
    force_layout(monkeypatch, "streamed", CONFIG)  # the op's choice
    lengths = None if p["lengths"] is None else p["lengths"].to(torch.int32)
    with launch.checking(wait_s=60.0), concurrent_programs(seed=4):
        dz, dh0, dw_hh = (g[0] for g in ops.recurrence_backward(grad_out[None], grad_hn[None], out[None],
                                                                p["h0"][None], p["w_hh"][None], lengths, reverse,
                                                                cell, False))
    assert_close(dz, ref.dz, torch.float64, "dz")
    assert_close(dh0, ref.dh0, torch.float64, "dh0")
    assert_close(dw_hh, ref.dw_hh, torch.float64, "dW_hh")
    assert plans and all(plan.programs_per_group == 3 for plan in plans)


def test_both_directions_in_one_launch(plans):
    p = _problem(True, seed=24, directions=2)
    with launch.checking(wait_s=60.0), concurrent_programs(seed=5):
        out, h_n = kernels.recurrence_forward(p["xw"], p["h0"], p["w_hh"], lengths=p["lengths"], cell="relu",
                                              layout="streamed", config=CONFIG)
    for d in range(2):
        ref_out, ref_hn = _reference_forward(p["xw"][d], p["h0"][d], p["w_hh"][d], "relu", p["lengths"], d == 1)
        assert_close(out[d], ref_out, torch.float64, f"out[{d}]")
        assert_close(h_n[d], ref_hn, torch.float64, f"h_n[{d}]")
    assert [plan.directions for plan in plans] == [2]


def test_interpreted_default_config_streams_in_chunks_of_a_state_row():
    """Without the concurrent harness a group is one program serving every column block in turn; the
    default config's chunks (128 bytes of a state row: 32 fp32 rows of K) stream H = 100 in 4 chunks."""
    p = dict(xw=torch.randn(3, 5, 100, dtype=torch.float64), h0=torch.randn(5, 100, dtype=torch.float64),
             w_hh=torch.randn(100, 100, dtype=torch.float64) / 10)
    assert configs.default_config("streamed", 5, 100, torch.float32).kwargs["STREAM_K"] == 32
    with launch.checking(wait_s=60.0):
        out, h_n = kernels.recurrence_forward(p["xw"].float(), p["h0"].float(), p["w_hh"].float(), layout="streamed")
    eye = torch.eye(100, dtype=torch.float64)
    ref_out, ref_hn = reference.forward(p["xw"], p["h0"], eye, p["w_hh"], None, None, "tanh", None, False)
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(h_n, ref_hn, torch.float32, "h_n")


def test_the_model_weighs_the_streamed_layout_where_no_slice_fits_on_chip():
    """fp32 at H = 2048 (a 32-column slice is 256 KB, over the budget: no persistent or cluster layout)
    gets a one-launch layout again: the streamed one, charged with its own terms (the slice's bytes from
    L2 each step, the pipelined chunks); below STREAMED_MIN_H it is not weighed."""
    hw = costmodel.OFFLINE_GPUS["h100"]
    shape = costmodel.Shape(512, 16, 2048, "float32")
    by_layout = {}
    for candidate in costmodel.candidates(shape, hw):
        by_layout.setdefault(candidate.layout, candidate)
    assert not configs.layout_allowed("persistent", 2048, torch.float32)
    assert by_layout["streamed"].fits and costmodel.choose(shape, hw).layout == "streamed"
    terms = dict(by_layout["streamed"].terms)
    assert {"barrier", "latency", "epilogue"} <= set(terms) and any(t.startswith("pipelined") for t in terms)
    assert "streamed" not in {c.layout for c in costmodel.candidates(costmodel.Shape(512, 16, 512, "float32"), hw)}


def test_the_dispatcher_takes_the_streamed_layout_and_its_plan_on_the_interpreter():
    shape = costmodel.Shape(64, 16, 2048, "float32")
    assert dispatch.choose(shape, DEVICE).layout == "streamed"
    plan = launch.persistent_plan(64, 16, 2048, torch.float32, DEVICE, "forward", layout="streamed")
    assert plan.programs_per_group == 1  # the interpreter: one program serves every column block in turn


_COMPILE = """
import json, sys, torch
from tritonrnn.perf import static
out = []
for dtype, hidden, backward, lengths in json.loads(sys.argv[1]):
    r = static.compile_kernel("streamed", getattr(torch, dtype), 64, hidden, backward=backward, lengths=lengths,
                              asm=True)
    out.append({k: r[k] for k in ("ptx", "ring_param", "barrier_problems", "stack_bytes", "mma")})
print(json.dumps(out))
"""
# The default variants the model weighs (16-bit chunks of 64 rows, fp32 of 32; H = 1001 off 16: padded slices).
PTX_VARIANTS = [("bfloat16", 1001, False, True), ("float32", 2048, True, False)]


@pytest.fixture(scope="module")
def compiled_streamed():
    return offline_compile(_COMPILE, PTX_VARIANTS)


def test_every_pipelined_state_copy_bypasses_l1(compiled_streamed):
    """The pipeliner turns the state chunks' loads into cp.async copies: each must be .cg (L2 only; a .ca
    copy may read a stale L1 line of the state another program wrote), after the barrier's acquire. The
    compiled defaults pass, spill-free; each copy made .ca alone is reported."""
    from tritonrnn.perf import static
    for variant, compiled in zip(PTX_VARIANTS, compiled_streamed):
        ptx, ring = compiled["ptx"], compiled["ring_param"]
        assert compiled["barrier_problems"] == [] and compiled["stack_bytes"] == 0 and compiled["mma"], variant
        loads = static.state_loads(ptx, ring)
        assert loads and all(opcode.startswith(("cp.async.cg", "ld.global.cg")) for _, opcode in loads), (variant,
                                                                                                         loads)
        lines = ptx.splitlines()
        for number, opcode in loads:
            cached = opcode.replace(".cg", ".ca") if opcode.startswith("cp.async") else opcode.replace(".cg", "")
            mutated = "\n".join(line.replace(opcode, cached) if n == number - 1 else line
                                for n, line in enumerate(lines))
            assert any("stale L1" in problem for problem in static.barrier_order_problems(mutated, ring)), (
                variant, number, opcode)


def test_the_streamed_barrier_keeps_its_memory_order(compiled_streamed):
    """The streamed variants meet at the persistent kernel's group barrier: its release arrival and acquire
    read are checked in their PTX too, and made relaxed each is reported."""
    import re

    from tritonrnn.perf import static
    for variant, compiled in zip(PTX_VARIANTS, compiled_streamed):
        relaxed = static.barrier_order_problems(re.sub(r"\.(release|acquire)\b", ".relaxed", compiled["ptx"]),
                                                compiled["ring_param"])
        assert any("release" in p for p in relaxed) and any("acquire" in p for p in relaxed), (variant, relaxed)

