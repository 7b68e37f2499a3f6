"""The hidden state in distributed shared memory (kernels/dsmem.py), as far as a CPU can check it.

(a) The protocol's twins in the interpreter against float64, outputs NaN-poisoned: the ranks in turn
    (dsmem_twin_kernel: columns, slots, the mbarriers' byte counts and phases) and one program per
    CTA in the concurrent harness (dsmem_cta_twin_kernel: CTAs drifting apart, which the double
    buffer must absorb). Each planted protocol bug (wrong slot, parity, columns, one buffer, a phase
    helper that alternates every step) must fail.
    The forward (out, h_n) and the backward (dz: M = W_hh, act' from the forward's h_t), walking
    either way, with lengths, and both directions in one launch (inputs stacked [2, ...]), against
    reference.forward / reference.backward.
(b) The Gluon kernel compiled offline for sm_90a (Triton >= 3.9), forward and backward, with and
    without lengths: spill-free at its default configs,
    on mma.sync, its shared memory as modelled, and its exchange as perf/dsmem_static.exchange_problems
    checks it in the PTX. Each check must reject a kernel or a PTX text with that bug planted; the
    kernel's compile-time layout checks must refuse a wrong push address or replicated elements. Its
    GPU launches (forward, backward, lengths, both directions) are checked against a recording launcher.
"""
import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from concurrent_interpreter import concurrent_programs
from conftest import DEVICE, ROOT, assert_close, mutated_checkout
from tritonrnn import reference
from tritonrnn.kernels import dsmem

def _problem(hidden, batch, steps, seed):
    g = torch.Generator().manual_seed(seed)
    xw = torch.randn(steps, batch, hidden, generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, hidden, generator=g, dtype=torch.float64)
    w_hh = torch.randn(hidden, hidden, generator=g, dtype=torch.float64) * (1.5 / hidden ** 0.5)
    return xw, h0, w_hh


def _reference(xw, h0, w_hh, cell):
    eye = torch.eye(xw.shape[-1], dtype=torch.float64)  # xw is already projected: x = xw, W_ih = I
    out, _ = reference.forward(xw, h0, eye, w_hh, None, None, cell, None, False)
    return out


twin = pytest.mark.skipif(DEVICE.type == "cuda", reason="the twin is the interpreter's stand-in for the Gluon kernel")


# (H, S, B, T, cell, e): B = 33 spans three clusters; e = 4 takes the fp32 swizzle (4-element vectors).
TWIN_CASES = [(64, 2, 1, 1, "tanh", 2), (64, 4, 5, 3, "relu", 2), (128, 4, 16, 7, "tanh", 2),
              (256, 8, 5, 3, "relu", 2), (256, 16, 16, 7, "tanh", 2), (128, 8, 16, 3, "tanh", 4),
              (64, 2, 33, 3, "relu", 4)]


@twin
@pytest.mark.parametrize("case", TWIN_CASES, ids=lambda c: "H{}-S{}-B{}-T{}-{}-e{}".format(*c))
def test_twin_matches_float64(case):
    hidden, cluster, batch, steps, cell, element_bytes = case
    xw, h0, w_hh = _problem(hidden, batch, steps, seed=((hidden * 31 + cluster) * 37 + batch) * 41 + steps)
    out = dsmem.twin_forward(xw, w_hh, h0, cluster, cell=cell, element_bytes=element_bytes)
    assert_close(out, _reference(xw, h0, w_hh, cell), torch.float64, "out")


@twin
@pytest.mark.parametrize("mutation", ["slot", "parity", "columns"])
def test_twin_rejects_a_planted_protocol_bug(mutation):
    """Pushing into the slot being read, waiting for the other phase, or pushing into the next rank's
    columns: each gives NaN (a wait the mbarrier model does not pass) or wrong values."""
    xw, h0, w_hh = _problem(64, 5, 4, seed=7)
    out = dsmem.twin_forward(xw, w_hh, h0, 4, cell="tanh", debug_mutation=mutation)
    ref = _reference(xw, h0, w_hh, "tanh")
    assert out.isnan().any() or not torch.allclose(out, ref, rtol=1e-10, atol=1e-10)


@twin
@pytest.mark.parametrize("case", [(64, 4, 5, 8, "tanh", 2), (128, 8, 33, 5, "relu", 4)],
                         ids=lambda c: "H{}-S{}-B{}-T{}-{}-e{}".format(*c))
def test_twin_with_one_program_a_cta_matches_float64(case):
    """Every CTA a program, all running at once (tests/concurrent_interpreter.py, random delays at each
    atomic): the ranks drift apart by up to a step, pushes land while slower CTAs still read the other
    slot, and the results stay right in each of 3 schedules."""
    hidden, cluster, batch, steps, cell, element_bytes = case
    xw, h0, w_hh = _problem(hidden, batch, steps, seed=hidden + batch + steps)
    ref = _reference(xw, h0, w_hh, cell)
    for seed in range(3):
        with concurrent_programs(seed=seed):
            out = dsmem.twin_forward(xw, w_hh, h0, cluster, cell=cell, element_bytes=element_bytes, per_cta=True)
        assert_close(out, ref, torch.float64, f"out (schedule {seed})")


@twin
def test_one_state_buffer_is_not_enough():
    """The same with a single slot (each step reads and pushes slot 0): a CTA that runs ahead overwrites
    columns a slower one is still reading. Wrong in 3 of 3 schedules when written; one must fail."""
    xw, h0, w_hh = _problem(64, 5, 8, seed=5)
    ref = _reference(xw, h0, w_hh, "tanh")
    for seed in range(3):
        with concurrent_programs(seed=seed):
            out = dsmem.twin_forward(xw, w_hh, h0, 4, per_cta=True, debug_mutation="one_slot")
        if out.isnan().any() or not torch.allclose(out, ref, rtol=1e-10, atol=1e-10):
            return
    pytest.fail("a single state buffer gave the right results in 3 schedules")


# (backward, reverse, lengths, cell, e, per_cta): reverse is the walk (t = T-1 .. 0), so a backward
# with reverse False is that of a reverse forward. B = 20: two clusters, the second ragged.
VARIANT_CASES = [(False, True, True, "tanh", 2, False), (False, False, True, "relu", 4, False),
                 (True, True, False, "tanh", 2, False), (True, False, True, "relu", 2, False),
                 (True, True, True, "tanh", 4, False), (False, True, True, "relu", 2, True),
                 (True, True, True, "tanh", 2, True)]


def _variant_id(case):
    backward, reverse, lengths, cell, element_bytes, per_cta = case
    return "-".join(["backward" if backward else "forward", "reverse" if reverse else "forwards",
                     "lengths" if lengths else "dense", cell, f"e{element_bytes}"] + (["per-cta"] if per_cta else []))


@twin
@pytest.mark.parametrize("case", VARIANT_CASES, ids=_variant_id)
def test_twin_variants_match_float64(case):
    """The forward (out and h_n) or the backward (dz from g and the forward's h_t; the state 0 at first),
    walking either way, with lengths (0 and T among them: rows past their length output 0, keep their
    state in the forward and have state 0 in the backward), against reference.forward / backward."""
    backward, reverse, with_lengths, cell, element_bytes, per_cta = case
    hidden, cluster, batch, steps = 64, 4, 20, 6
    seed = VARIANT_CASES.index(case) + 100
    xw, h0, w_hh = _problem(hidden, batch, steps, seed)
    g = torch.Generator().manual_seed(seed)
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, steps + 1, (batch,), generator=g)
        lengths[:2] = torch.tensor([0, steps])
    eye = torch.eye(hidden, dtype=torch.float64)
    lens32 = None if lengths is None else lengths.to(torch.int32)
    run = dict(cell=cell, element_bytes=element_bytes, per_cta=per_cta, lengths=lens32)
    forward_walk = reverse != backward  # the backward walks the forward's steps the other way
    ref, ref_hn = reference.forward(xw, h0, eye, w_hh, None, None, cell, lengths, forward_walk)
    with concurrent_programs(seed=seed) if per_cta else contextlib.nullcontext():
        if not backward:
            out, h_n = dsmem.twin_run(xw, w_hh, h0, cluster, reverse=reverse, **run)
            assert_close(out, ref, torch.float64, "out")
            assert_close(h_n, ref_hn, torch.float64, "h_n")
            return
        grad = torch.randn(steps, batch, hidden, generator=g, dtype=torch.float64)
        if lengths is not None:  # dL/dh_t of steps past a row's length is 0 (those outputs are constants)
            grad = grad * (torch.arange(steps)[:, None] < lengths)[..., None]
        dz, h_n = dsmem.twin_run(grad, w_hh, None, cluster, act=ref, reverse=reverse, **run)
    expected = reference.backward(xw, h0, eye, w_hh, ref, grad, torch.zeros(batch, hidden, dtype=torch.float64), cell,
                                  lengths, forward_walk).dz
    assert h_n is None
    assert_close(dz, expected, torch.float64, "dz")


@twin
@pytest.mark.parametrize("per_cta", [False, True], ids=["ranks-in-turn", "per-cta"])
def test_twin_runs_both_directions_in_one_launch(per_cta):
    """Inputs stacked [2, T, B, H] (each direction its own W_hh and h0; grid axis 2 the direction),
    direction 0 walking forwards, direction 1 backwards, lengths shared: the forward (out, h_n) and the
    backward (dz; each direction walking its forward's steps the other way) against float64."""
    hidden, cluster, batch, steps, cell = 64, 4, 18, 5, "tanh"
    g = torch.Generator().manual_seed(61 + per_cta)
    problems = [_problem(hidden, batch, steps, seed=62 + 2 * d + per_cta) for d in range(2)]
    lengths = torch.randint(0, steps + 1, (batch,), generator=g)
    eye = torch.eye(hidden, dtype=torch.float64)
    refs = [reference.forward(xw, h0, eye, w, None, None, cell, lengths, d == 1)
            for d, (xw, h0, w) in enumerate(problems)]
    grads = [torch.randn(steps, batch, hidden, generator=g, dtype=torch.float64)
             * (torch.arange(steps)[:, None] < lengths)[..., None] for _ in range(2)]
    dz_refs = [reference.backward(xw, h0, eye, w, refs[d][0], grads[d], torch.zeros(batch, hidden, dtype=torch.float64),
                                  cell, lengths, d == 1).dz for d, (xw, h0, w) in enumerate(problems)]
    xw, h0, w = (torch.stack(parts) for parts in zip(*problems))
    run = dict(cell=cell, per_cta=per_cta, lengths=lengths.to(torch.int32))
    with concurrent_programs(seed=3) if per_cta else contextlib.nullcontext():
        out, h_n = dsmem.twin_run(xw, w, h0, cluster, **run)
        # The backward walks direction 0 from T-1 (reverse), direction 1 from 0.
        dz, _ = dsmem.twin_run(torch.stack(grads), w, None, cluster, act=torch.stack([r[0] for r in refs]),
                               reverse=True, **run)
    for d in range(2):
        assert_close(out[d], refs[d][0], torch.float64, f"out[{d}]")
        assert_close(h_n[d], refs[d][1], torch.float64, f"h_n[{d}]")
        assert_close(dz[d], dz_refs[d], torch.float64, f"dz[{d}]")


# The twin on one problem in a checkout `root`: prints "nan", "wrong" or "right" (run with the interpreter).
_RUN_TWIN = """
import torch
from tritonrnn import reference
from tritonrnn.kernels import dsmem
g = torch.Generator().manual_seed(11)
xw, h0 = torch.randn(5, 3, 64, generator=g, dtype=torch.float64), torch.randn(3, 64, generator=g, dtype=torch.float64)
w = torch.randn(64, 64, generator=g, dtype=torch.float64) / 8
out = dsmem.twin_forward(xw, w, h0, 4)
ref, _ = reference.forward(xw, h0, torch.eye(64, dtype=torch.float64), w, None, None, "tanh", None, False)
print("nan" if out.isnan().any() else "right" if torch.allclose(out, ref, rtol=1e-10, atol=1e-10) else "wrong")
"""


def _twin_verdict(root) -> str:
    result = subprocess.run([sys.executable, "-c", _RUN_TWIN], capture_output=True, text=True, timeout=120, cwd=root,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()[-1]


@twin
def test_twin_checks_the_helpers_it_shares_with_the_gluon_kernel(tmp_path):
    """The slot and phase helpers are the Gluon kernel's own: a checkout whose wait_phase alternates every
    step (completions_before(i) = i; a slot's mbarrier completes every other step) fails the twin's
    mbarrier model."""
    assert _twin_verdict(ROOT) == "right"
    mutant = mutated_checkout(tmp_path, "kernels/dsmem.py", "    return i // 2", "    return i")
    assert _twin_verdict(mutant) == "nan"


# ---- (b) the Gluon kernel, compiled offline ----

gluon = pytest.mark.skipif(not dsmem.available(), reason=f"no Gluon kernel here: {dsmem.GLUON_PROBLEM}")


@pytest.fixture(scope="module")
def compiled():
    """Every default variant and kernel mutant (perf/dsmem_static.py), compiled in one process without
    the interpreter; keyed by (dtype, H, S, backward, lengths, mutation)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tritonrnn.perf.dsmem_static"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    variants = [json.loads(line) for line in result.stdout.splitlines()]
    return {(v["dtype"], v["hidden"], v["cluster"], v["backward"], v["lengths"], v["mutation"]): v for v in variants}


def _problems(variant, ptx=None):
    from tritonrnn.perf import dsmem_static
    return dsmem_static.exchange_problems(variant["ptx"] if ptx is None else ptx, variant["cluster"],
                                          variant["num_warps"] * 32, variant["expect_bytes"])


@gluon
def test_default_variants_compile_spill_free_on_mma_with_a_sound_exchange(compiled):
    from tritonrnn.perf import dsmem_static
    defaults = [v for v in compiled.values() if not v["mutation"]]
    assert len(defaults) == len(dsmem_static.DEFAULT_VARIANTS)
    for v in defaults:
        name = f"{v['dtype']} H={v['hidden']} S={v['cluster']} backward={v['backward']} lengths={v['lengths']}"
        assert v["arch"] == "sm_90a", name
        assert v["stack_bytes"] == 0 and v["local_bytes"] == 0, f"{name} spills: {v['stack_bytes']} B"
        modelled = dsmem.shared_memory_bytes(v["hidden"], v["cluster"], 4 if v["dtype"] == "fp32" else 2, v["BLOCK_B"])
        assert v["shared_bytes"] == modelled <= dsmem.SHARED_MEMORY_LIMIT, f"{name}: {v['shared_bytes']} B"
        kind = "m16n8k8.row.col.f32.tf32" if v["dtype"] == "fp32" else "m16n8k16.row.col.f32.bf16"
        assert any(kind in m for m in v["mma"]), f"{name}: {v['mma']}"
        assert _problems(v) == [], name
    # both directions, each with and without lengths
    assert {(v["backward"], v["lengths"]) for v in defaults} == {(b, n) for b in (False, True) for n in (False, True)}


@pytest.fixture
def base(compiled):
    return compiled[("bf16", 256, 4, False, False, "")]


# The wait's try_wait line: (opcode and predicate) ([mbarrier], ) (parity;)
_TRY_WAIT = r"(mbarrier\.try_wait\.parity\.acquire\.cluster\.shared::cta\.b64 complete, )(\[%r\d+\], )"


def _mutate(ptx, pattern, replacement, count=None):
    mutated, done = re.subn(pattern, replacement, ptx, flags=re.M)
    assert done and (count is None or done == count), f"the mutation's anchor {pattern!r} matched {done} times"
    return mutated


def _assert_rejected(variant, ptx, expected):
    problems = _problems(variant, ptx)
    assert any(expected in p for p in problems), f"expected {expected!r} among {problems}"


@gluon
@pytest.mark.parametrize("mutation, expected", [("no_wait", "try_wait.parity in the step loop"),
                                                ("fixed_phase", "wait's parity")])
def test_check_rejects_a_mutated_kernel(compiled, mutation, expected):
    """The kernel compiled without its wait, or waiting for parity 0 every step."""
    variant = compiled[("bf16", 256, 4, False, False, mutation)]
    _assert_rejected(variant, variant["ptx"], expected)


@gluon
def test_check_rejects_a_push_onto_the_local_mbarrier(base):
    ptx = _mutate(base["ptx"], r"mapa\.shared::cluster\.u32 peer_barrier, (%r\d+), %r\d+;",
                  r"mov.u32 peer_barrier, \1;")
    _assert_rejected(base, ptx, "mbarrier is not a mapa")


@gluon
def test_check_rejects_a_push_into_the_local_slot(base):
    ptx = _mutate(base["ptx"], r"mapa\.shared::cluster\.u32 peer_slot, (%r\d+), %r\d+;", r"mov.u32 peer_slot, \1;")
    _assert_rejected(base, ptx, "not in a mapa'd peer window")


@gluon
def test_check_rejects_two_pushes_to_one_peer(base):
    """The push meant for rank 1 mapped to rank 0 (rank 0 twice, rank 1 never)."""
    lines = base["ptx"].splitlines()
    # pushes 0-3: h0's, before the loop; 4 + 1: the step loop's push to rank 1
    loop_push = [n for n, line in enumerate(lines) if line.startswith("mapa.shared::cluster.u32 peer_barrier")][4 + 1]
    rank = lines[loop_push].split(",")[-1].strip(" ;")
    ptx = _mutate(base["ptx"], rf"^(\s*mov\.b32\s+{re.escape(rank)}), 1;$", r"\1, 0;", 1)
    _assert_rejected(base, ptx, "to the CTAs of rank [0, 0, 2, 3]")


@gluon
def test_check_rejects_a_slot_and_mbarrier_of_different_peers(base):
    """The step loop's first push (rank 0) writing into rank 1's slot while completing rank 0's mbarrier."""
    lines = base["ptx"].splitlines()
    slots = [n for n, line in enumerate(lines) if line.startswith("mapa.shared::cluster.u32 peer_slot")]
    rank1 = lines[slots[4 + 1]].split(",")[-1].strip(" ;")  # pushes 0-3: h0's, before the loop
    lines[slots[4]] = re.sub(r", %r\d+;$", f", {rank1};", lines[slots[4]])
    _assert_rejected(base, "\n".join(lines), "a st.async into one CTA's slot completing another's mbarrier")


@gluon
def test_check_rejects_stores_that_complete_no_bytes(base):
    ptx = _mutate(base["ptx"], r"st\.async\.shared::cluster\.mbarrier::complete_tx::bytes\.b32 \[address\], word, "
                  r"\[peer_barrier\];", "st.shared::cluster.b32 [address], word;")
    _assert_rejected(base, ptx, "pushes in the step loop")


@gluon
def test_check_rejects_a_push_short_of_what_the_mbarrier_expects(base):
    lines = base["ptx"].splitlines()
    last = max(n for n, line in enumerate(lines) if line.startswith("st.async"))
    _assert_rejected(base, "\n".join(lines[:last] + lines[last + 1:]), "bytes a CTA")


@gluon
def test_check_rejects_an_mbarrier_armed_for_other_bytes(base):
    ptx = _mutate(base["ptx"], r"(mbarrier\.arrive\.expect_tx\.shared::cta\.b64 _, \[%r\d+\]), 8192;", r"\1, 4096;", 1)
    _assert_rejected(base, ptx, "arms its mbarrier [4096] bytes")


@gluon
def test_check_rejects_a_constant_parity(base):
    ptx = _mutate(base["ptx"], _TRY_WAIT + r"%r\d+;", r"\1\g<2>0;", 1)
    _assert_rejected(base, ptx, "wait's parity (0)")


@gluon
def test_check_rejects_one_mbarrier_for_both_slots(base):
    """The wait always on the mbarrier the h0 push (before the loop) completes: slot 0's."""
    slot0 = re.search(r"mapa\.shared::cluster\.u32 peer_barrier, (%r\d+),", base["ptx"]).group(1)
    ptx = _mutate(base["ptx"], _TRY_WAIT + r"(%r\d+;)", rf"\1[{slot0}], \3", 1)
    _assert_rejected(base, ptx, "one buffer, not two")
    _assert_rejected(base, ptx, "the mbarrier the loop arms is not the one it waits on")


@gluon
def test_check_rejects_a_wait_that_acquires_at_cta_scope(base):
    """Gluon's own mbarrier.wait: try_wait.parity with the default .acquire.cta."""
    ptx = _mutate(base["ptx"], r"mbarrier\.try_wait\.parity\.acquire\.cluster\.", "mbarrier.try_wait.parity.", 1)
    _assert_rejected(base, ptx, "not .acquire.cluster")


@gluon
def test_check_rejects_a_wait_that_does_not_spin(base):
    ptx = _mutate(base["ptx"], r"^\s*@!complete bra\.uni wait_for_phase;\n", "", 1)
    _assert_rejected(base, ptx, "does not spin")


@gluon
def test_check_rejects_a_shared_read_before_the_wait(base):
    lines = base["ptx"].splitlines()
    expect = next(n for n, line in enumerate(lines) if "mbarrier.arrive.expect_tx" in line and "8192" in line)
    read = next(line for line in lines[expect:] if "ldmatrix" in line)
    _assert_rejected(base, "\n".join(lines[:expect] + [read] + lines[expect:]), "read in the step loop before the wait")


@gluon
def test_check_rejects_global_memory_after_the_wait(base):
    ptx = _mutate(base["ptx"], r"^(\s*@!complete bra\.uni wait_for_phase;)$", r"\1\nld.global.b32 %r1, [%rd1];", 1)
    _assert_rejected(base, ptx, "global memory between the arming, the wait and the MMA")


@gluon
def test_check_rejects_a_global_atomic_in_a_push(base):
    lines = base["ptx"].splitlines()
    last_mapa = max(n for n, line in enumerate(lines) if line.startswith("mapa.shared::cluster.u32 peer_slot"))
    ptx = "\n".join(lines[:last_mapa + 1] + ["atom.global.add.u32 %r1, [%rd1], 1;"] + lines[last_mapa + 1:])
    _assert_rejected(base, ptx, "global memory within a push")
    _assert_rejected(base, ptx, "a global synchronisation in the kernel")


@gluon
def test_check_rejects_pushes_before_the_mbarrier_init_fence(base):
    ptx = _mutate(base["ptx"], r"^\s*fence\.mbarrier_init\.release\.cluster;\n", "", 1)
    _assert_rejected(base, ptx, "fence.mbarrier_init")


@gluon
def test_layout_checks_reject_other_layouts():
    """The kernel's compile-time checks (gl.static_assert on Triton's linear layouts), fed layouts as
    to_linear_layout gives them: the state slot of H = 256 bf16 (offset bit -> (row, col)) and the
    accumulator of 16 x 64 on 4 warps; then each with one thing changed."""
    from types import SimpleNamespace
    slot = [[0, 1 << b] for b in range(8)] + [[1, 8], [2, 16], [4, 32], [8, 0]]
    assert dsmem._state_layout_problem(SimpleNamespace(offset_bases=slot), 16, 256, 8, 8) == ""
    unswizzled = slot[:8] + [[1, 0], [2, 0], [4, 0], [8, 0]]
    assert "state_offset puts at 264" in dsmem._state_layout_problem(SimpleNamespace(offset_bases=unswizzled), 16,
                                                                     256, 8, 8)
    acc = dict(reg_bases=[[0, 1], [8, 0], [0, 32]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
               warp_bases=[[0, 8], [0, 16]])
    assert dsmem._accumulator_layout_problem(SimpleNamespace(**acc)) == ""
    swapped = dict(acc, reg_bases=[[8, 0], [0, 1], [0, 32]])
    assert "not the next column" in dsmem._accumulator_layout_problem(SimpleNamespace(**swapped))
    replicated = dict(acc, warp_bases=[[0, 8], [0, 0]])
    assert "replicated" in dsmem._accumulator_layout_problem(SimpleNamespace(**replicated))


@gluon
def test_kernel_refuses_warps_that_would_push_an_element_twice():
    """H = 256 over 16 CTAs is 16 columns a CTA: 4 warps of 8 columns would hold each element twice (and
    push it twice: bytes the mbarrier does not expect); the compile must fail, 2 warps (the default) pass."""
    code = ("from tritonrnn.perf.dsmem_static import compile_variant\n"
            "try:\n    compile_variant('bf16', 256, 16, num_warps=4)\n    print('compiled')\n"
            "except Exception as error:\n    print('refused', error)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "refused" in result.stdout and "does not suit the push" in result.stdout, result.stdout[-2000:]


@gluon
def test_gpu_launch_against_a_recording_launcher(monkeypatch):
    """forward's and backward's GPU branch, the compiler and the driver replaced by recorders: 33 rows over
    clusters of 4 CTAs are 3 clusters along y of 4 CTAs (the launcher's grid (1, 3, 1) times num_ctas 4),
    and the launcher gets every kernel argument in the kernel's order: the forward's h0 and h_n, the
    backward's h_t (walking the other way from the forward it differentiates), the lengths where given.
    On this CPU, unpatched, it is refused."""
    from tritonrnn.kernels import launch
    from tritonrnn.kernels.occupancy import ClusterUnavailable, Plan
    xw, h0, w_hh = (t.to(torch.bfloat16) for t in _problem(256, 33, 3, seed=3))
    lengths = torch.tensor([3, 0, 1] * 11, dtype=torch.int32)
    with pytest.raises(ClusterUnavailable, match="CUDA GPUs"):
        dsmem.forward(xw, w_hh, h0, 4)
    compiles, launches = [], []
    monkeypatch.setattr(launch, "cluster_refusal", lambda device: None)
    monkeypatch.setattr(dsmem.elman_dsmem_kernel, "warmup", lambda **kwargs: compiles.append(kwargs) or "compiled")
    monkeypatch.setattr(launch, "launch_clusters", lambda *args: launches.append(args))
    out, h_n = dsmem.forward(xw, w_hh, h0, 4, cell="relu")
    (compiled, plan, values), = launches
    assert compiled == "compiled" and compiles[0]["num_warps"] == 4 and compiles[0]["grid"] == (4, 1)
    assert plan == Plan(4, 3, 1, 12, cluster=True) and launch.launch_grid(plan) == (1, 3, 1)
    assert plan.cluster_dims == (4, 1, 1)
    assert len(values) == 19 and all(a is b for a, b in zip(values, (xw, w_hh, h0, None, out, h_n, None)))
    assert h_n.shape == h0.shape and out.shape == xw.shape
    assert values[7:] == [3, 33, 256, 4, 16, 64, "relu", None, False, False, False, ""]
    launches.clear()
    out, h_n = dsmem.forward(xw, w_hh, h0, 4, lengths=lengths, reverse=True)
    (_, _, values), = launches
    assert values[6] is lengths and values[15:] == [False, True, True, ""]
    launches.clear()
    dz = dsmem.backward(xw, out, w_hh, 4, lengths=lengths)  # a forward walking 0 .. T-1: T-1 .. 0 back
    (_, plan, values), = launches
    assert plan == Plan(4, 3, 1, 12, cluster=True)
    assert all(a is b for a, b in zip(values, (xw, w_hh, None, out, dz, None, lengths)))
    assert values[7:] == [3, 33, 256, 4, 16, 64, "tanh", None, True, True, True, ""]
    launches.clear()
    stacked = [torch.stack([t, t]) for t in (xw, w_hh, h0)]
    out, h_n = dsmem.forward(*stacked, 4)  # both directions: grid axis 2
    (_, plan, values), = launches
    assert plan == Plan(4, 3, 1, 24, directions=2, cluster=True) and launch.launch_grid(plan) == (1, 3, 2)
    assert out.shape == (2, 3, 33, 256) and h_n.shape == (2, 33, 256) and values[7:10] == [3, 33, 256]
    with pytest.raises(ValueError, match="T >= 1"):
        dsmem.forward(xw[:0], w_hh, h0, 4)
    with pytest.raises(ValueError, match="int32"):
        dsmem.backward(xw, xw, w_hh, 4, lengths=lengths.long())


@gluon
def test_kernel_refuses_a_push_address_formula_other_than_its_layout(tmp_path):
    """A checkout whose state_offset drops the swizzle (the pushes would land where the MMA does not read):
    the Gluon compile fails at the kernel's static assert against Triton's layout of the slot."""
    mutant = mutated_checkout(tmp_path, "kernels/dsmem.py", "    return o_row * H + (o_col ^ ((o_row % PHASES) * VEC))",
                              "    return o_row * H + o_col")
    code = ("from tritonrnn.perf.dsmem_static import compile_variant\n"
            "try:\n    compile_variant('bf16', 256, 4)\n    print('compiled')\n"
            "except Exception as error:\n    print('refused', error)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            cwd=mutant)
    assert "refused" in result.stdout and "not state_offset's" in result.stdout, result.stdout[-2000:]


def test_default_config_refuses_what_does_not_fit():
    assert dsmem.default_config(1024, 16, 2)["num_warps"] == 4  # 196,624 B a CTA
    for hidden, cluster, element_bytes in ((2048, 16, 2), (1024, 16, 4), (192, 4, 2), (256, 32, 2), (32, 2, 2)):
        with pytest.raises(ValueError):
            dsmem.default_config(hidden, cluster, element_bytes)


def test_module_imports_without_gluon():
    """On a Triton older than 3.9 (its version string faked: CI's 3.6 to 3.8 runs test the real ones),
    kernels/dsmem.py still imports, says why the Gluon kernel is unavailable, and the twin is there."""
    code = ("import sys, triton; triton.__version__ = '3.6.0'\n"
            "from tritonrnn.kernels import dsmem\n"
            "assert callable(dsmem.twin_forward)\n"
            "assert not dsmem.available() and '3.6.0' in dsmem.GLUON_PROBLEM, dsmem.GLUON_PROBLEM\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
