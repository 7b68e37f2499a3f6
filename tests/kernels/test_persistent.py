"""The persistent path: programs that wait for each other at a per-group barrier every step.

Triton's interpreter runs programs one after another, so these tests run every program of a
launch at once, one thread per program, with a random short sleep at each atomic
(tests/concurrent_interpreter.py), against the float64 reference: several groups of several
programs and several batch tiles, forward and backward, both directions, lengths, tanh and relu,
float64 and float32, NaN-poisoned outputs. The same kernel with its wait broken (the target off
by one, or no wait) must fail here; a program that never arrives must end in an error, not a
hang. What the harness cannot see (the memory order of the compiled barrier) is checked in the
offline sm_90 PTX at the end.
"""
import inspect
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton

from concurrent_interpreter import CONCURRENT_CAPACITY, concurrent_programs
from conftest import (DEVICE, ROOT, assert_close, dtype_id, force_layout, load_test_module, mutated_checkout,
                      offline_compile)
from tritonrnn import dispatch, kernels, ops, reference
from tritonrnn.kernels import launch, occupancy, persistent
from tritonrnn.kernels.occupancy import Plan

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's concurrent harness")

# T = 5, B = 20 (2 groups of 16 rows, the second ragged), H = 40: 3 programs of 16 columns per
# group, the last ragged; K_SPLIT = 2 multiplies in two K parts of 32 (a batched dot, summed).
T, B, H = 5, 20, 40
VARIANTS = [  # (nonlinearity, reverse, with lengths, K_SPLIT)
    ("tanh", False, False, 1), ("relu", False, True, 2), ("tanh", True, True, 1), ("relu", True, False, 2),
]


def _variant_id(variant):
    act, reverse, packed, k_split = variant
    return act + ("-reverse" if reverse else "") + ("-lengths" if packed else "") + f"-ksplit{k_split}"


def _problem(packed, seed, steps=T):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    p = dict(xw=rand(steps, B, H), h0=rand(B, H), w_hh=rand(H, H, scale=1.5 / H ** 0.5))
    p["lengths"] = torch.randint(1, steps + 1, (B,), generator=g) if packed else None
    return p


def _config(k_split, **debug):
    return triton.Config({"BLOCK_B": 16, "BLOCK_N": 16, "K_SPLIT": k_split, **debug}, num_warps=4, num_stages=1)


def _forward(p, act, reverse, dtype, config):
    return kernels.recurrence_forward(p["xw"].to(dtype), p["h0"].to(dtype), p["w_hh"].to(dtype),
                                      lengths=p["lengths"], reverse=reverse, cell=act, layout="persistent",
                                      config=config)


def _reference_forward(p, act, reverse):
    eye = torch.eye(H, dtype=torch.float64)  # xw is already projected: x = xw, W_ih = I
    return reference.forward(p["xw"], p["h0"], eye, p["w_hh"], None, None, act, p["lengths"], reverse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_forward_with_concurrent_programs_matches_reference(variant, dtype):
    act, reverse, packed, k_split = variant
    p = _problem(packed, seed=11)
    with concurrent_programs(seed=1):
        out, h_n = _forward(p, act, reverse, dtype, _config(k_split))
    ref_out, ref_hn = _reference_forward(p, act, reverse)
    assert_close(out, ref_out, dtype, "out")
    assert_close(h_n, ref_hn, dtype, "h_n")


@pytest.mark.parametrize("dtype", [torch.float64], ids=dtype_id)  # float32: test_both_directions_in_one_launch
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_backward_with_concurrent_programs_matches_reference(variant, dtype, monkeypatch):
    act, reverse, packed, k_split = variant
    p = _problem(packed, seed=12)
    out, _ = _reference_forward(p, act, reverse)
    g = torch.Generator().manual_seed(13)
    grad_out = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    grad_hn = torch.randn(B, H, generator=g, dtype=torch.float64)
    if packed:  # padding is not part of the output
        grad_out = grad_out * (torch.arange(T)[:, None] < p["lengths"])[..., None]
    eye = torch.eye(H, dtype=torch.float64)
    ref = reference.backward(p["xw"], p["h0"], eye, p["w_hh"], out, grad_out, grad_hn, act, p["lengths"], reverse)
    force_layout(monkeypatch, "persistent", _config(k_split))  # the op's choice
    cast = lambda t: t.to(dtype)[None]  # noqa: E731  (one direction)
    lengths = None if p["lengths"] is None else p["lengths"].to(torch.int32)
    with concurrent_programs(seed=2):
        dz, dh0, dw_hh = (g[0] for g in ops.recurrence_backward(cast(grad_out), cast(grad_hn), cast(out),
                                                                cast(p["h0"]), cast(p["w_hh"]), lengths, reverse,
                                                                act, False))
    assert_close(dz, ref.dz, dtype, "dz")
    assert_close(dh0, ref.dh0, dtype, "dh0")
    assert_close(dw_hh, ref.dw_hh, dtype, "dW_hh")


@pytest.fixture
def plans(monkeypatch):
    """The plans the persistent launches ran (to check that programs really waited for each other)."""
    ran, run = [], launch._launch_persistent
    monkeypatch.setattr(launch, "_launch_persistent", lambda *args, **kw: ran.append(run(*args, **kw)) or ran[-1])
    return ran


def test_launches_several_groups_of_several_programs(plans):
    p = _problem(False, seed=14)
    with concurrent_programs(seed=3):
        _forward(p, "tanh", False, torch.float64, _config(1))
    assert plans == [Plan(programs_per_group=3, groups=2, batch_tiles=1,
                                     resident_capacity=CONCURRENT_CAPACITY)]


def test_groups_take_several_batch_tiles_where_programs_do_not_fit(plans):
    """Capacity for one group only: one group of 3 programs serves both batch tiles."""
    p = _problem(True, seed=15)
    with concurrent_programs(seed=4, capacity=5):
        out, h_n = _forward(p, "tanh", True, torch.float64, _config(1))
    assert plans == [Plan(programs_per_group=3, groups=1, batch_tiles=2, resident_capacity=5)]
    ref_out, ref_hn = _reference_forward(p, "tanh", True)
    assert_close(out, ref_out, torch.float64, "out")
    assert_close(h_n, ref_hn, torch.float64, "h_n")


@pytest.mark.parametrize("slack", [1, 10 ** 6], ids=["target-off-by-one", "no-wait"])
def test_harness_catches_a_broken_barrier(slack):
    """The same kernel, its wait target lowered (DEBUG_WAIT_SLACK), must give wrong results: a
    program reads a state row before its writer stored it (NaN-poisoned).

    A race shows only in some schedules: over 12 steps, 19 of 20 off-by-one runs and 20 of 20
    no-wait runs were wrong (seeds 0-19), so up to 3 schedules are tried (a broken barrier passing
    all 3 was never seen); the correct kernel passes every schedule (the tests above)."""
    p = _problem(False, seed=16, steps=12)
    ref_out, _ = _reference_forward(p, "tanh", False)
    for seed in range(3):
        with concurrent_programs(seed=seed):
            out, _ = _forward(p, "tanh", False, torch.float64, _config(1, DEBUG_WAIT_SLACK=slack))
        if out.isnan().any() or not torch.allclose(out, ref_out, rtol=1e-10, atol=1e-10):
            return
    pytest.fail(f"a barrier that waits for {slack} arrival(s) too few passed 3 schedules")


def test_plan_never_exceeds_the_resident_capacity():
    # H = 2048 in 16-column slices: 128 programs a group; B = 256 in 16-row tiles.
    assert occupancy.plan(256, 2048, 16, 16, capacity=132) == Plan(128, 1, 16, 132)
    assert occupancy.plan(256, 1024, 16, 32, capacity=264) == Plan(32, 8, 2, 264)
    assert occupancy.plan(1, 512, 16, 32, capacity=132) == Plan(16, 1, 1, 132)
    for batch in range(1, 300, 7):
        for capacity in (16, 100, 132, 264):
            chosen = occupancy.plan(batch, 512, 16, 32, capacity)
            assert chosen.programs_per_group * chosen.groups <= capacity
            assert chosen.groups * chosen.batch_tiles * 16 >= batch
    with pytest.raises(ValueError, match="needs 128 resident programs per group"):
        occupancy.plan(16, 2048, 16, 16, capacity=100)
    with pytest.raises(ValueError, match="in each of 2 direction"):
        occupancy.plan(16, 1024, 16, 16, capacity=100, directions=2)
    assert occupancy.plan(256, 1024, 16, 32, capacity=132, directions=2) == Plan(32, 2, 8, 132, 2)
    # A group of one program waits for no one: one group per batch tile, no co-residency needed.
    alone = occupancy.plan(300, 32, 16, 32, capacity=1, directions=2)
    assert alone == Plan(1, 19, 1, 1, 2) and not alone.waits


def test_programs_per_sm_takes_the_tightest_resource():
    sm = occupancy.SMLimits()
    assert occupancy.programs_per_sm(registers=128, num_warps=4, shared_bytes=98304, limits=sm) == 2  # shared
    assert occupancy.programs_per_sm(registers=255, num_warps=8, shared_bytes=0, limits=sm) == 1  # registers
    assert occupancy.programs_per_sm(registers=32, num_warps=4, shared_bytes=0, limits=sm) == 16  # threads
    assert occupancy.programs_per_sm(registers=16, num_warps=1, shared_bytes=0, limits=sm) == 32  # slots


def test_info_says_how_the_persistent_path_tiles(capsys, monkeypatch):
    from tritonrnn import cli, kernel_path
    assert kernel_path(32, 512, torch.float32) == "persistent"
    assert kernel_path(1, 512, torch.float32) == "stepwise"  # one step (RNNCell): the step kernel
    assert kernel_path(32, 512, torch.float32, allow_tf32=False) == "stepwise"  # 3xTF32 spills there
    assert kernel_path(32, 2048, torch.bfloat16) == "persistent"
    assert kernel_path(32, 4096, torch.bfloat16) == "streamed"  # no slice on chip: streamed from L2 each step
    assert kernel_path(32, 8192, torch.bfloat16) == "stepwise"  # a group of 256 programs is not resident
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # fp32 as cuDNN runs it: TF32
    cli.main(["info", "--hidden-size", "512", "--seq-len", "32", "--batch", "40"])
    # The plain interpreter runs one program at a time: a group is one program, one per tile.
    text = capsys.readouterr().out
    assert "forward: persistent path" in text
    assert "3 group(s) of 1 program(s), 1 batch tile(s) a group, no program waits for another" in text, text
    with concurrent_programs():
        cli.main(["info", "--hidden-size", "512", "--seq-len", "32", "--batch", "40"])
    text = capsys.readouterr().out
    assert f"3 group(s) of 8 program(s), 1 batch tile(s) a group, 24 of a resident capacity of " \
           f"{CONCURRENT_CAPACITY}" in text, text


def test_module_on_the_persistent_path_matches_torch(monkeypatch, plans):
    """tritonrnn.RNN (2 layers, bidirectional, lengths) by default dispatch on the persistent path,
    both directions of a layer in one launch with groups of several concurrent programs, against
    torch.nn.RNN in float64."""
    import tritonrnn
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    monkeypatch.setitem(kernels.configs.SEQUENCE_MAX_H, 8, 0)
    default = kernels.configs.default_config  # the cost model reads the other paths' defaults too
    monkeypatch.setattr(kernels.configs, "default_config",
                        lambda layout, batch, hidden, dtype=None: _config(2) if layout == "persistent"
                        else default(layout, batch, hidden, dtype))
    assert tritonrnn.kernel_path(T, H, torch.float64) == "persistent"
    torch.manual_seed(0)
    oracle = nn.RNN(7, H, num_layers=2, bidirectional=True).double()
    ours = tritonrnn.RNN(7, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(oracle.state_dict())
    x = torch.randn(T, B, 7, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,))
    g = torch.randn(T, B, 2 * H, dtype=torch.float64) * (torch.arange(T)[:, None] < lengths)[..., None]
    results = []
    for module in (ours, oracle):
        leaf = x.clone().requires_grad_()
        with concurrent_programs(seed=6):
            out, h_n = module(pack_padded_sequence(leaf, lengths, enforce_sorted=False))
            out, _ = pad_packed_sequence(out, total_length=T)
            ((out * g).sum() + h_n.sum()).backward()
        results.append({"out": out, "h_n": h_n, "dx": leaf.grad, **{n: p.grad for n, p in module.named_parameters()}})
    for name, expected in results[1].items():
        assert_close(results[0][name], expected, torch.float64, name)
    # Per layer one launch forward and one backward, both directions in each.
    assert plans == [Plan(3, 2, 1, CONCURRENT_CAPACITY, directions=2)] * 4


def test_module_falls_back_where_the_device_cannot_hold_every_program(monkeypatch, plans):
    """A device that holds 3 programs at once (a smaller GPU, in miniature): one direction's group of
    3 programs fits, so each direction of a bidirectional layer gets a launch of its own; a device
    that holds 2 takes the stepwise path. Outputs and gradients against torch.nn.RNN either way."""
    import tritonrnn
    from torch import nn
    monkeypatch.setitem(kernels.configs.SEQUENCE_MAX_H, 8, 0)
    default = kernels.configs.default_config
    monkeypatch.setattr(kernels.configs, "default_config",
                        lambda layout, batch, hidden, dtype=None: _config(2) if layout == "persistent"
                        else default(layout, batch, hidden, dtype))
    torch.manual_seed(0)
    oracle = nn.RNN(7, H, bidirectional=True).double()
    ours = tritonrnn.RNN(7, H, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(oracle.state_dict())
    x = torch.randn(T, B, 7, dtype=torch.float64)
    for capacity, path, expected_plans in ((3, "persistent", [Plan(3, 1, 2, 3)] * 4), (2, "stepwise", [])):
        with concurrent_programs(seed=8, capacity=capacity):
            # Both directions' programs do not fit at once: each direction takes the layout it takes alone.
            assert tritonrnn.kernel_path(T, H, torch.float64, B, directions=2) == path
            assert tritonrnn.kernel_path(T, H, torch.float64, B) == path
            results = []
            for module in (ours, oracle):
                leaf = x.clone().requires_grad_()
                out, h_n = module(leaf)
                (out.sum() + h_n.sum()).backward()
                results.append({"out": out, "h_n": h_n, "dx": leaf.grad,
                                **{n: p.grad for n, p in module.named_parameters()}})
                module.zero_grad()
        for name, expected in results[1].items():
            assert_close(results[0][name], expected, torch.float64, name)
        assert plans == expected_plans
        plans.clear()


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_rows_of_length_zero_end_in_h0(reverse):
    """The kernels accept length 0 (the layers do not): the row never steps, outputs 0, h_n = h0."""
    p = _problem(True, seed=17)
    p["lengths"][:3] = 0
    with concurrent_programs(seed=7):
        out, h_n = _forward(p, "tanh", reverse, torch.float64, _config(1))
    ref_out, ref_hn = _reference_forward(p, "tanh", reverse)
    assert_close(out, ref_out, torch.float64, "out")
    assert_close(h_n, ref_hn, torch.float64, "h_n")
    assert torch.equal(h_n[:3], p["h0"][:3])


@pytest.mark.parametrize("dtype", [torch.float32], ids=dtype_id)  # float64: the test below
def test_both_directions_in_one_launch(dtype, plans):
    """A bidirectional layer's two directions in one launch (grid axis 2, inputs stacked [2, ...],
    each its own W_hh and h0; direction 1 walks the other way), forward and backward, lengths."""
    p = [_problem(True, seed=18), _problem(True, seed=19)]
    p[1]["lengths"] = p[0]["lengths"]
    refs = [_reference_forward(p[d], "relu", reverse=d == 1) for d in range(2)]
    g = torch.Generator().manual_seed(20)
    active = (torch.arange(T)[:, None] < p[0]["lengths"])[..., None]
    grads = [torch.randn(T, B, H, generator=g, dtype=torch.float64) * active for _ in range(2)]
    eye = torch.eye(H, dtype=torch.float64)
    ref_dz = [reference.backward(p[d]["xw"], p[d]["h0"], eye, p[d]["w_hh"], refs[d][0], grads[d],
                                 torch.zeros(B, H, dtype=torch.float64), "relu", p[d]["lengths"], d == 1).dz
              for d in range(2)]
    stack = lambda tensors: torch.stack(tensors).to(dtype).contiguous()  # noqa: E731
    w, lengths = stack([q["w_hh"] for q in p]), p[0]["lengths"].to(torch.int32)
    options = dict(lengths=lengths, cell="relu", layout="persistent", config=_config(2))
    with concurrent_programs(seed=8):
        out, h_n = kernels.recurrence_forward(stack([q["xw"] for q in p]), stack([q["h0"] for q in p]), w, **options)
        dz = kernels.recurrence_backward(stack(grads), stack([r[0] for r in refs]), w, **options)
    assert plans[0].grid == (3, 2, 2)
    for d in range(2):
        assert_close(out[d], refs[d][0], dtype, f"out[{d}]")
        assert_close(h_n[d], refs[d][1], dtype, f"h_n[{d}]")
        assert_close(dz[d], ref_dz[d], dtype, f"dz[{d}]")


@pytest.mark.parametrize("lengths", [None, [4, 2, 1]], ids=["dense", "lengths"])
def test_bidirectional_ops_pass_opcheck(lengths):
    torch.manual_seed(0)
    steps, batch, hidden = 4, 3, 6
    xw = torch.randn(2, steps, batch, hidden, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, batch, hidden, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(2, hidden, hidden, dtype=torch.float64) / hidden ** 0.5).requires_grad_()
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
    torch.library.opcheck(ops.recurrence, (xw, h0, w, lens, False, "relu", False))
    out, _ = ops.recurrence(xw, h0, w, lens, False, "relu", False)
    args = (torch.randn_like(out), torch.randn_like(h0), out.detach(), h0.detach(), w.detach(), lens, False, "relu",
            False)
    torch.library.opcheck(ops.recurrence_backward, args)


def test_per_sample_gradients_of_bidirectional_layers_on_the_persistent_path(monkeypatch):
    """Under torch.func transforms a bidirectional layer runs both directions through the op's vmap rule
    (its batch axis after the directions): test_per_sample_grad's bidirectional case on this layout."""
    test_per_sample_grad = load_test_module("ecosystem/test_per_sample_grad.py")
    monkeypatch.setitem(kernels.configs.SEQUENCE_MAX_H, 8, 0)
    assert kernels.default_layout(test_per_sample_grad.H, torch.float64) == "persistent"
    test_per_sample_grad.test_rnn_per_sample_grads_match_torch("B2-h0-batch_first-2layers-bidir-relu")


def test_arrival_counters_never_overflow(monkeypatch):
    """int32 counters reach T x (programs per group): a longer launch is refused, not wrapped."""
    steps = persistent.GAVE_UP.value // 3 + 1  # 3 programs a group (H = 40 in 16 columns)
    with concurrent_programs():
        with pytest.raises(occupancy.LaunchRefused, match="overflow the int32 arrival counters"):
            launch.persistent_plan(steps, 1, 40, torch.float64, DEVICE, "forward", config=_config(1))  # as launch's
        assert launch.persistent_plan(steps - 1, 1, 40, torch.float64, DEVICE, "forward", config=_config(1)).waits


def _bidirectional_problem(steps, batch, seed):
    """Both directions' inputs, references (float64) and backward gradients, with lengths."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    xw, h0, w = rand(2, steps, batch, H), rand(2, batch, H), rand(2, H, H, scale=1.5 / H ** 0.5)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    active = (torch.arange(steps)[:, None] < lengths)[..., None]
    grads = rand(2, steps, batch, H) * active
    eye = torch.eye(H, dtype=torch.float64)
    refs = [reference.forward(xw[d], h0[d], eye, w[d], None, None, "tanh", lengths, d == 1) for d in range(2)]
    dz = [reference.backward(xw[d], h0[d], eye, w[d], refs[d][0], grads[d], torch.zeros(batch, H, dtype=torch.float64),
                             "tanh", lengths, d == 1).dz for d in range(2)]
    return dict(xw=xw, h0=h0, w=w, lengths=lengths.to(torch.int32), grads=grads, out=[r[0] for r in refs],
                h_n=[r[1] for r in refs], dz=dz)


@pytest.mark.parametrize("dtype", [torch.float64], ids=dtype_id)  # float32: the test above
def test_several_groups_of_several_batch_tiles_both_directions(dtype, plans):
    """Both directions in one launch, forward and backward, each direction 2 groups of 3 programs
    and each group 2 batch tiles of 16 rows (B = 50: the last tile ragged), lengths: the capacity
    (12 programs) allows 2 groups a direction, so the 4 batch tiles of a direction are served 2 a group."""
    steps, batch = 4, 50
    p = _bidirectional_problem(steps, batch, seed=21)
    cast = lambda t: t.to(dtype).contiguous()  # noqa: E731
    options = dict(lengths=p["lengths"], layout="persistent", config=_config(1))
    with concurrent_programs(seed=9, capacity=12):
        out, h_n = kernels.recurrence_forward(cast(p["xw"]), cast(p["h0"]), cast(p["w"]), **options)
        dz = kernels.recurrence_backward(cast(p["grads"]), cast(torch.stack(p["out"])), cast(p["w"]), **options)
    assert plans == [Plan(3, 2, 2, 12, directions=2)] * 2
    for d in range(2):
        assert_close(out[d], p["out"][d], dtype, f"out[{d}]")
        assert_close(h_n[d], p["h_n"][d], dtype, f"h_n[{d}]")
        assert_close(dz[d], p["dz"][d], dtype, f"dz[{d}]")


def test_single_program_groups_serve_column_blocks_in_turn(monkeypatch):
    """Issue 18: the plain interpreter runs one program a group, which must serve all H columns; from
    H = 1025 a [BLOCK_H, BLOCK_H] slice passes the interpreter's largest tensor, so the program takes
    its columns in blocks, one after another each step. Here the largest tensor is made small (1024
    elements: 4 blocks of 16 columns at BLOCK_H = 64), forward and backward, both directions."""
    monkeypatch.setattr(occupancy, "INTERPRETED_MAX_NUMEL", 1024)
    scheduled, schedule = [], launch.schedule
    monkeypatch.setattr(launch, "schedule", lambda *a, **kw: scheduled.append(schedule(*a, **kw)) or scheduled[-1])
    steps, batch = 3, 5
    p = _bidirectional_problem(steps, batch, seed=22)
    out, h_n = kernels.recurrence_forward(p["xw"], p["h0"], p["w"], lengths=p["lengths"], layout="persistent")
    dz = kernels.recurrence_backward(p["grads"], torch.stack(p["out"]), p["w"], lengths=p["lengths"],
                                     layout="persistent")
    for d in range(2):
        assert_close(out[d], p["out"][d], torch.float64, f"out[{d}]")
        assert_close(h_n[d], p["h_n"][d], torch.float64, f"h_n[{d}]")
        assert_close(dz[d], p["dz"][d], torch.float64, f"dz[{d}]")
    assert [(plan.programs_per_group, kw["BLOCK_N"], kw["COLUMN_BLOCKS"]) for plan, kw in scheduled] == [(1, 16, 4)] * 2


def test_interpreted_persistent_path_runs_h_1025():
    """Issue 18's case: H = 1025 on the interpreted persistent path (BLOCK_H 2048) failed with
    "numel (4194304) exceeds triton maximum tensor numel"; fp16 (its default path there), T = 2, B = 1."""
    steps, batch, hidden = 2, 1, 1025
    g = torch.Generator().manual_seed(23)
    xw = torch.randn(steps, batch, hidden, generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, hidden, generator=g)
    w = torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / hidden ** 0.5
    assert kernels.default_layout(hidden, torch.float16) == "persistent"
    half = torch.float16
    out, h_n = kernels.recurrence_forward(xw.to(half), h0.to(half), w.to(half), layout="persistent")
    ref_out, ref_hn = reference.forward(xw, h0.double(), torch.eye(hidden, dtype=torch.float64), w)
    assert_close(out, ref_out, half, "out")
    assert_close(h_n, ref_hn, half, "h_n")


def test_a_group_whose_program_never_arrives_raises_instead_of_hanging(monkeypatch):
    """Column block 1 of every group never arrives (DEBUG_ABSENT): its peers' waits end at the limit
    (polls in the interpreter: %globaltimer cannot run here), every program of the group writes NaN
    over its outputs, and the launcher raises naming the groups, within seconds, not a hang."""
    p = _problem(False, seed=24)
    outputs = []  # out and h_n, allocated as zeros: the kernel must write the NaN
    monkeypatch.setattr(launch, "_empty_like", lambda t: outputs.append(torch.zeros_like(t)) or outputs[-1])
    monkeypatch.setattr(launch, "WAIT_TIMEOUT_S", 0.05)
    start = time.monotonic()
    with concurrent_programs(seed=10), pytest.raises(occupancy.BarrierTimeout) as caught:
        kernels.recurrence_forward(p["xw"], p["h0"], p["w_hh"], layout="persistent",
                                   config=_config(1, DEBUG_ABSENT=1))
    assert time.monotonic() - start < 20
    out, h_n = outputs
    message = str(caught.value)
    assert "group 0 of direction 0, group 1 of direction 0" in message and "0.05 s" in message, message
    assert out.isnan().all() and h_n.isnan().all()


def test_a_refused_cooperative_launch_runs_the_stepwise_path_with_one_warning(monkeypatch):
    """The driver refuses a cooperative launch that cannot be co-resident (Triton raises its CUDA error,
    CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE): the launcher raises LaunchRefused, the op tells the
    dispatcher, which warns once and takes its next layout (stepwise here) for this shape from then on:
    the second call does not try the persistent launch again."""
    tries = []

    class Refusing:
        def __getitem__(self, grid):
            def refuse(*args, launch_cooperative_grid=False, **kwargs):
                assert launch_cooperative_grid
                tries.append(grid)
                raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
            return refuse

    monkeypatch.setattr(launch, "rnn_persistent_kernel", Refusing())
    monkeypatch.setitem(kernels.configs.SEQUENCE_MAX_H, 8, 0)
    default = kernels.configs.default_config  # groups of 3 programs: a cooperative launch
    monkeypatch.setattr(kernels.configs, "default_config",
                        lambda layout, batch, hidden, dtype=None: _config(1) if layout == "persistent"
                        else default(layout, batch, hidden, dtype))
    p = _problem(True, seed=25)
    ref_out, ref_hn = _reference_forward(p, "tanh", False)
    args = (p["xw"][None], p["h0"][None], p["w_hh"][None], p["lengths"].to(torch.int32), False, "tanh", False)
    with concurrent_programs():
        assert kernels.configs.default_layout(H, torch.float64) == "persistent"
        assert dispatch.choose(dispatch.shape_of(p["xw"], "forward", False), DEVICE).layout == "persistent"
        with pytest.warns(RuntimeWarning, match="refused a cooperative launch.*persistent layout is not taken") as seen:
            out, h_n = ops.recurrence(*args)
            ops.recurrence(*args)
        assert dispatch.choose(dispatch.shape_of(p["xw"], "forward", False), DEVICE).layout == "stepwise"
    assert sum("refused a cooperative launch" in str(w.message) for w in seen) == 1
    assert len(tries) == 1
    assert_close(out[0], ref_out, torch.float64, "out")
    assert_close(h_n[0], ref_hn, torch.float64, "h_n")


@pytest.fixture(scope="module")
def compiled_for_hopper():
    """The persistent kernel compiled offline for sm_90 (bf16, H = 1001: not a multiple of 16; the
    forward with lengths): its PTX and resources, from a subprocess without TRITON_INTERPRET (the
    compiler needs the real @triton.jit objects)."""
    code = ("import json, torch; from tritonrnn.perf import static; "
            "r = static.compile_kernel('persistent', torch.bfloat16, 256, 1001, lengths=True, asm=True); "
            "print(json.dumps({k: r[k] for k in ('ptx', 'ring_param', 'registers', 'stack_bytes', 'mma')}))")
    return offline_compile(code, None)


def _without_group_barrier_syncs(ptx: str) -> str:
    """The PTX with the CTA barriers around the wait removed: the bar.sync lines that the two
    tl.debug_barrier() calls of _group_barrier became, and any bar.sync the compiler emits at the release
    arrival itself (Triton 3.9 puts one there; 3.6 to 3.8 do not), found by their .loc source lines."""
    source, first = inspect.getsourcelines(persistent._group_barrier.fn)
    lines = {first + i for i, line in enumerate(source)
             if "tl.debug_barrier()" in line or 'sem="release"' in line}
    kept, loc = [], None
    for line in ptx.splitlines():
        found = re.search(r"persistent\.py:(\d+):", line)
        if line.lstrip().startswith(".loc") and found:
            loc = int(found.group(1))
        if not (re.match(r"\s*bar\.sync", line) and loc in lines):
            kept.append(line)
    assert len(kept) <= len(ptx.splitlines()) - 2, "expected two bar.sync lines from the group barrier"
    return "\n".join(kept)


def test_barrier_order_in_the_compiled_ptx(compiled_for_hopper):
    """What the concurrent harness cannot see (the interpreter has no memory model): the compiled
    barrier's order. The real kernel passes; PTX with relaxed atomics, without the CTA barriers
    around the wait, or with plain state loads is reported."""
    from tritonrnn.perf import static
    ptx = compiled_for_hopper["ptx"]
    problems = lambda text: static.barrier_order_problems(text, compiled_for_hopper["ring_param"])  # noqa: E731
    assert problems(ptx) == []
    relaxed = problems(re.sub(r"\.(release|acquire)\b", ".relaxed", ptx))
    assert any("release" in p for p in relaxed) and any("acquire" in p for p in relaxed), relaxed
    unsynced = problems(_without_group_barrier_syncs(ptx))
    assert unsynced == ["no CTA barrier before the arrival", "no CTA barrier after the acquire"], unsynced
    plain = problems(ptx.replace("ld.global.cg", "ld.global"))
    assert plain and all("stale L1" in p for p in plain), plain


# Variants that compile a different branch of the state loads: K_SPLIT 1 and > 1, forward and backward,
# with and without lengths (fp16, H = 256: a few seconds each).
BRANCH_VARIANTS = [dict(backward=backward, lengths=lengths, k_split=k_split)
                   for k_split in (1, 4) for backward in (False, True) for lengths in (False, True)]
_COMPILE = """
import json, sys, torch, triton
from concurrent.futures import ProcessPoolExecutor
from tritonrnn import kernels
from tritonrnn.perf import static

def compile(variant):
    config = kernels.configs.default_config("persistent", 64, 256, torch.float16)
    config = triton.Config({**config.kwargs, "K_SPLIT": variant["k_split"]}, num_warps=config.num_warps,
                           num_stages=config.num_stages)
    r = static.compile_kernel("persistent", torch.float16, 64, 256, backward=variant["backward"],
                              lengths=variant["lengths"], config=config, asm=True)
    return {"variant": variant, **{k: r[k] for k in ("ptx", "ring_param", "barrier_problems")}}

if __name__ == "__main__":
    with ProcessPoolExecutor(2) as pool:
        print(json.dumps(list(pool.map(compile, json.loads(sys.argv[1])))))
"""


def _compile_variants(root: Path, variants: list) -> list:
    """static.compile_kernel of the persistent kernel in the checkout at `root`, per variant of BRANCH_VARIANTS'
    form: its PTX, ring_param and barrier_problems (a subprocess without TRITON_INTERPRET)."""
    return offline_compile(_COMPILE, variants, cwd=root)


@pytest.fixture(scope="module")
def compiled_branches():
    return _compile_variants(ROOT, BRANCH_VARIANTS)


def test_every_state_load_of_every_branch_bypasses_l1(compiled_branches):
    """Issue 24 item 2: each load of state other programs wrote is .cg in every variant, not one load
    anywhere: each made plain alone is reported; a row's re-read of its own columns (forward with
    lengths: the address depends on program_id(0)) is no such load and may stay plain."""
    from tritonrnn.perf import static
    for compiled in compiled_branches:
        ptx, ring, variant = compiled["ptx"], compiled["ring_param"], compiled["variant"]
        assert compiled["barrier_problems"] == [], variant
        loads = static.state_loads(ptx, ring)
        assert len(loads) >= 1 and all(opcode.startswith("ld.global.cg") for _, opcode in loads), (variant, loads)
        lines = ptx.splitlines()
        for number, _ in loads:
            plain = "\n".join(line.replace("ld.global.cg", "ld.global") if n == number - 1 else line
                              for n, line in enumerate(lines))
            assert static.barrier_order_problems(plain, ring) == [
                f"a state load that may hit a stale L1 line (line {number}: "
                f"{lines[number - 1].split()[1].replace('.cg', '')}, not .cg)"], (variant, number)
        own = [n for n, line in enumerate(lines) if "ld.global.cg" in line and n + 1 not in dict(loads)]
        assert bool(own) == (variant["lengths"] and not variant["backward"]), (variant, own)
        plain_own = "\n".join(line.replace("ld.global.cg", "ld.global") if n in own else line
                              for n, line in enumerate(lines))
        assert static.barrier_order_problems(plain_own, ring) == [], variant


# The review's planted bug: the wait's loop also ends on a value each thread takes from its own clock.
_PER_THREAD_EXIT = ("        while (failed == 0) & (seen < target):\n",
                    "        mine = 0\n        while (failed == 0) & (seen < target) & (mine == 0):\n"
                    "            mine = (_clock(polls, TIMER) % 2).to(tl.int32)\n")


def test_a_wait_that_ends_on_each_threads_clock_is_reported(compiled_branches, tmp_path):
    """Issue 24 item 2: the poll loop's exit followed through the PTX's data flow. The kernel's branches
    depend on the broadcast poll and the counter only; the review's mutation (`& (mine == 0)`, `mine` from
    %globaltimer inside the loop: a per-thread branch between two bar.sync) compiled from a mutated copy
    is reported, as is the poll's broadcast bypassed in the PTX."""
    from tritonrnn.perf import static
    assert all(static.clock_branch_problems(c["ptx"]) == [] for c in compiled_branches)
    mutant = _compile_variants(mutated_checkout(tmp_path, "kernels/persistent.py", *_PER_THREAD_EXIT),
                               BRANCH_VARIANTS[:1])[0]
    assert mutant["barrier_problems"] and all("%globaltimer" in p for p in mutant["barrier_problems"]), mutant[
        "barrier_problems"]
    # The poll's value taken from the thread's own load (each thread's address holds its own clock's
    # verdict) instead of the broadcast: the exit depends on that thread's clock.
    ptx = compiled_branches[0]["ptx"]
    loaded = re.search(r"@%p\d+ ld\.global\.gpu\.relaxed\.b32 (%r\d+), \[ (%rd\d+) \+ 0 \];", ptx.split(
        "%globaltimer", 2)[2])
    assert loaded, "no poll after the loop's clock read"
    bypassed = re.sub(r"ld\.shared\.b32 \t?(%r\d+), \[global_smem\+\d+\];",
                      lambda m: f"ld.global.b32 {m.group(1)}, [ {loaded.group(2)} + 0 ];", ptx)
    assert any("%globaltimer" in p for p in static.clock_branch_problems(bypassed))


def test_hidden_sizes_off_16_load_in_vectors_without_spills(compiled_for_hopper):
    """Issue 16 item 3d: at H = 1001 the state (HP-padded ring) and the W slice (padded_slices) load
    in 16-byte vectors, on the tensor cores, without spills; only the small per-tile inputs
    [BLOCK_N, BLOCK_B] (prefetched before the wait) are read element by element."""
    ptx = compiled_for_hopper["ptx"]
    assert compiled_for_hopper["stack_bytes"] == 0 and compiled_for_hopper["mma"]
    assert re.findall(r"ld\.global\.cg\.(v\d)\.b32", ptx) and re.findall(r"ld\.global\.v4\.b32", ptx)
    scalar = re.findall(r"ld\.global(?:\.cg)?\.b16", ptx)
    assert len(scalar) <= 16, f"{len(scalar)} scalar 2-byte loads"
