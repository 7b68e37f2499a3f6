"""The cluster form of the persistent recurrence (kernels/launch.py), as far as a CPU can check it.

On a GPU a group is one thread-block cluster waiting at the hardware cluster barrier, which the
interpreter cannot run (inline PTX). Here the same programs run with the counter barrier instead
(BARRIER="counter"), every program of a launch at once (tests/concurrent_interpreter.py): several
CTAs a cluster, several clusters, one or two directions, forward and backward, against float64,
outputs NaN-poisoned. That checks the cluster launch's tiling (rank, slices, clusters, batch tiles),
not the cluster barrier: tests/perf/test_static.py checks the barrier's compiled PTX.
"""
from collections import namedtuple


import pytest
import torch
import triton

from concurrent_interpreter import concurrent_programs
from conftest import DEVICE, ROOT, assert_close, dtype_id, mutated_checkout
from tritonrnn import dispatch, kernels, ops, reference
from tritonrnn.kernels import launch, occupancy, persistent
from tritonrnn.kernels.occupancy import ClusterUnavailable, Plan

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's concurrent harness")

# T = 5, B = 40: 3 clusters of one 16-row tile (the last ragged); H = 40 in 16-column CTAs: clusters
# of 3 CTAs, the last ragged.
T, B, H = 5, 40, 40
VARIANTS = [("tanh", False, False), ("relu", True, True)]  # (nonlinearity, reverse, with lengths)


def _variant_id(variant):
    act, reverse, packed = variant
    return act + ("-reverse" if reverse else "") + ("-lengths" if packed else "")


def _config(**debug):
    return triton.Config({"BLOCK_B": 16, "BLOCK_N": 16, "K_SPLIT": 1, **debug}, num_warps=4, num_stages=1)


@pytest.fixture
def clusters(monkeypatch):
    """The plans the cluster launches ran."""
    ran, run = [], launch._launch_clusters_of
    monkeypatch.setattr(launch, "_launch_clusters_of", lambda *a, **k: ran.append(run(*a, **k)) or ran[-1])
    return ran


def _problem(packed, seed, steps=T):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    p = dict(xw=rand(steps, B, H), h0=rand(B, H), w_hh=rand(H, H, scale=1.5 / H ** 0.5))
    p["lengths"] = torch.randint(1, steps + 1, (B,), generator=g).to(torch.int32) if packed else None
    return p


def _reference(p, act, reverse):
    eye = torch.eye(H, dtype=torch.float64)  # xw is already projected: x = xw, W_ih = I
    return reference.forward(p["xw"], p["h0"], eye, p["w_hh"], None, None, act, p["lengths"], reverse)


def _launch_forward(p, act, reverse, dtype, config):
    return kernels.recurrence_forward(p["xw"].to(dtype), p["h0"].to(dtype), p["w_hh"].to(dtype),
                                      lengths=p["lengths"], reverse=reverse, cell=act, layout="cluster", config=config)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_forward_in_clusters_matches_reference(variant, dtype, clusters):
    act, reverse, packed = variant
    p = _problem(packed, seed=31)
    with concurrent_programs(seed=1):
        out, h_n = _launch_forward(p, act, reverse, dtype, _config())
    assert clusters == [Plan(3, 3, 1, 1 << 20, cluster=True)] and clusters[0].resident_clusters == (1 << 20) // 3
    ref_out, ref_hn = _reference(p, act, reverse)
    assert_close(out, ref_out, dtype, "out")
    assert_close(h_n, ref_hn, dtype, "h_n")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_backward_in_clusters_matches_reference(variant, dtype, clusters):
    """The fused backward: dz_t = (g_t + dz_{t+1} W_hh) * act'(h_t), walking against the forward."""
    act, reverse, packed = variant
    p = _problem(packed, seed=32)
    out, _ = _reference(p, act, reverse)
    g = torch.Generator().manual_seed(33)
    grad = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    if packed:  # padding is not part of the output
        grad = grad * (torch.arange(T)[:, None] < p["lengths"])[..., None]
    eye = torch.eye(H, dtype=torch.float64)
    ref = reference.backward(p["xw"], p["h0"], eye, p["w_hh"], out, grad, torch.zeros(B, H, dtype=torch.float64), act,
                             p["lengths"], reverse)
    with concurrent_programs(seed=2):
        dz = kernels.recurrence_backward(grad.to(dtype), out.to(dtype), p["w_hh"].to(dtype), lengths=p["lengths"],
                                         reverse=reverse, cell=act, layout="cluster", config=_config())
    assert [(c.programs_per_group, c.groups) for c in clusters] == [(3, 3)]
    assert_close(dz, ref.dz, dtype, "dz")


def test_both_directions_and_several_batch_tiles_a_cluster(clusters):
    """A bidirectional layer in one launch (grid z), where the device holds 2 clusters of 3 CTAs:
    one cluster a direction, each serving all 3 batch tiles."""
    p = [_problem(True, seed=34), _problem(True, seed=35)]
    p[1]["lengths"] = p[0]["lengths"]
    stack = lambda key: torch.stack([q[key] for q in p]).contiguous()  # noqa: E731
    with concurrent_programs(seed=3, capacity=7):
        out, h_n = kernels.recurrence_forward(stack("xw"), stack("h0"), stack("w_hh"), lengths=p[0]["lengths"],
                                              layout="cluster", config=_config())
    assert clusters == [Plan(3, 1, 3, 7, directions=2, cluster=True)] and clusters[0].resident_clusters == 2
    assert clusters[0].grid == (3, 1, 2)
    for d in range(2):
        ref_out, ref_hn = _reference(p[d], "tanh", reverse=d == 1)
        assert_close(out[d], ref_out, torch.float64, f"out[{d}]")
        assert_close(h_n[d], ref_hn, torch.float64, f"h_n[{d}]")


def test_harness_catches_a_cluster_that_does_not_wait():
    """The CPU form with its wait removed (DEBUG_WAIT_SLACK beyond every arrival) must fail here: a
    CTA reads state columns before the other CTAs of its cluster stored them (NaN-poisoned). Over
    12 steps a no-wait persistent launch was wrong in 20 of 20 schedules; 3 are tried."""
    p = _problem(False, seed=36, steps=12)
    ref_out, _ = _reference(p, "tanh", False)
    for seed in range(3):
        with concurrent_programs(seed=seed):
            out, _ = _launch_forward(p, "tanh", False, torch.float64, _config(DEBUG_WAIT_SLACK=10 ** 6))
        if out.isnan().any() or not torch.allclose(out, ref_out, rtol=1e-10, atol=1e-10):
            return
    pytest.fail("clusters whose CTAs never wait for each other passed 3 schedules")


def test_the_plain_interpreter_refuses_a_cluster_launch():
    """One program at a time cannot run CTAs that wait for each other: the launch is refused (the
    caller takes another layout) instead of hanging."""
    p = _problem(False, seed=37)
    with pytest.raises(ClusterUnavailable, match="no cluster of 3 CTAs"):
        _launch_forward(p, "tanh", False, torch.float64, _config())


def test_plan_takes_the_clusters_the_device_holds():
    def plan(batch, hidden, block_b, block_n, resident_clusters, directions=1):  # capacity in programs
        size = occupancy.cluster_size(hidden, block_n)
        return occupancy.plan(batch, hidden, block_b, block_n, resident_clusters * size, directions, cluster=True)

    assert plan(256, 512, 16, 32, resident_clusters=8) == Plan(16, 8, 2, 8 * 16, cluster=True)
    assert plan(256, 256, 16, 32, resident_clusters=64) == Plan(8, 16, 1, 64 * 8, cluster=True)
    assert plan(1, 1024, 16, 64, resident_clusters=8, directions=2) == Plan(16, 1, 1, 8 * 16, 2, cluster=True)
    assert plan(100, 1024, 16, 64, resident_clusters=8, directions=2) == Plan(16, 4, 2, 8 * 16, 2, cluster=True)
    for batch in range(1, 300, 7):
        for resident in (1, 3, 8, 33):
            chosen = plan(batch, 512, 16, 32, resident)
            assert chosen.groups <= resident == chosen.resident_clusters
            assert chosen.groups * chosen.batch_tiles * 16 >= batch and chosen.waits
    for hidden, block_n in ((2048, 64), (640, 64), (32, 32)):  # 32, 10 and 1 CTAs: no launchable cluster
        with pytest.raises(ClusterUnavailable, match="launches clusters of 2-8 or 16"):
            plan(16, hidden, 16, block_n, resident_clusters=8)
    with pytest.raises(ClusterUnavailable, match="holds no cluster of 16"):
        plan(16, 1024, 16, 64, resident_clusters=0)


def test_fits_follows_cluster_sizes_and_shared_memory():
    # The persistent path's default config: 64 columns a CTA where the slice takes <= 128 KB, else 32
    # (K in 4 parts). 16-bit: 4, 8, 16 CTAs at H = 256-1024; 2048: 64 CTAs; H = 64: one CTA, no cluster.
    def fits(hidden, dtype, allow_tf32=True):
        return kernels.configs.layout_fits("cluster", hidden, dtype, allow_tf32)

    assert [h for h in (64, 128, 256, 512, 1024, 2048) if fits(h, torch.bfloat16)] == [128, 256, 512, 1024]
    assert [h for h in (256, 512, 1024) if fits(h, torch.float32)] == [256, 512]  # 1024: 32 CTAs
    assert [h for h in (256, 512, 1024) if fits(h, torch.float64)] == [256, 512]  # 512: 16 of 32 columns
    assert not any(fits(h, torch.float32, allow_tf32=False) for h in (256, 512))  # 3xTF32 spills
    assert launch.cluster_refusal(DEVICE)  # the interpreter: no cluster launch is tried
    config = kernels.configs.default_config("cluster", 64, 1024, torch.bfloat16)
    assert (config.kwargs["BLOCK_N"], config.kwargs["K_SPLIT"], config.num_warps) == (64, 1, 8)  # 16 CTAs, wgmma
    config = kernels.configs.default_config("cluster", 64, 512, torch.float64)
    assert (config.kwargs["BLOCK_N"], config.kwargs["K_SPLIT"], config.num_warps) == (32, 4, 4)  # a part a warp
    config = kernels.configs.default_config("cluster", 64, 256, torch.float32)
    assert occupancy.cluster_size(256, config.kwargs["BLOCK_N"]) == 4


def test_launcher_metadata_is_what_triton_packs():
    """The cluster launch hands Triton 3.6's launcher (num_warps, num_ctas, shared) with num_ctas
    set to the cluster size, and every kernel argument in parameter order: both as Triton's own
    launch path makes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    meta = namedtuple("Meta", "num_warps num_ctas shared")(8, 1, 49152)
    assert make_backend(GPUTarget("cuda", 90, 32)).pack_metadata(meta) == (8, 1, 49152)
    assert launch.packed_metadata(namedtuple("Compiled", "metadata")(meta), 16) == (8, 16, 49152)
    with pytest.raises(ValueError, match="num_ctas = 1"):
        launch.packed_metadata(namedtuple("Compiled", "metadata")(meta._replace(num_ctas=2)), 16)
    names = persistent.rnn_persistent_kernel.fn.arg_names
    keywords = {name: f"kw-{name}" for name in reversed(names) if name != "DEBUG_WAIT_SLACK"}  # any order
    values = launch.bound_arguments(persistent.rnn_persistent_kernel, {**keywords, "not_an_argument": 0})
    assert len(values) == len(names) and values[names.index("DEBUG_WAIT_SLACK")] == 0  # its default
    assert all(str(v).endswith(n) for v, n in zip(values, names) if n != "DEBUG_WAIT_SLACK")


def test_barrier_probe_counts_every_arrival():
    """The calibration's probe (empty steps at the kernel's group barrier): the counter form, 2 groups
    of 4 programs at once, ends with steps x programs arrivals a group; the cluster form needs a GPU."""
    with concurrent_programs(seed=5):
        arrivals = launch.probe_barrier("counter", steps=6, size=4, groups=2, device=DEVICE)
    assert arrivals.tolist() == [24, 24]
    with pytest.raises(ClusterUnavailable, match="run on CUDA GPUs of sm_90 or later"):
        launch.probe_barrier("cluster", steps=6, device=DEVICE)


def test_cluster_plan_for_the_model():
    """The cost model's cluster candidates on an H100/H200 (8 GPCs of at least 16 SMs assumed): the plans
    of the standard grid's shapes the cluster form runs, and no candidate where it does not."""
    from tritonrnn import costmodel
    hw = costmodel.Hardware()

    def plan(batch, hidden, dtype, directions=1, allow_tf32=True):
        if not kernels.configs.layout_fits("cluster", hidden, getattr(torch, dtype), allow_tf32):
            return None
        config = kernels.configs.default_config("cluster", batch, hidden, getattr(torch, dtype))
        shape = costmodel.Shape(32, batch, hidden, dtype, allow_tf32=allow_tf32, directions=directions)
        return costmodel.predict(shape, hw, "cluster", config)

    bf16 = plan(256, 1024, "bfloat16")
    assert bf16.fits and bf16.config == {"BLOCK_B": 16, "BLOCK_N": 64, "K_SPLIT": 1, "num_warps": 8, "num_stages": 1}
    # 164 KB a CTA: one a SM, one 16-CTA cluster a GPC: 8 clusters, 2 of the 16 batch tiles each.
    assert dict(bf16.plan) == {"programs_per_group": 16, "groups": 8, "batch_tiles": 2, "resident_capacity": 128,
                               "directions": 1, "cluster": True, "modelled_capacity": None}
    assert dict(bf16.terms)["barrier"] == hw.cluster_barrier() == 500
    small = dict(plan(64, 256, "float32").plan)
    assert (small["programs_per_group"], small["groups"]) == (4, 4)
    both = dict(plan(16, 512, "float16", directions=2).plan)
    assert (both["programs_per_group"], both["directions"]) == (8, 2)
    assert plan(16, 1024, "float32") is None  # 32 CTAs of 32 columns
    assert plan(16, 2048, "float16") is None  # 64 CTAs
    assert plan(16, 256, "float32", allow_tf32=False) is None  # 3xTF32 spills


def _layer(seed, packed, steps=T):
    p = _problem(packed, seed, steps)
    return p, _reference(p, "tanh", False)


def test_cluster_layout_falls_back_to_the_persistent_layout_with_one_warning(monkeypatch):
    """Where the dispatcher takes the cluster layout and the device refuses the launch (here the plain
    interpreter, one program at a time: ClusterUnavailable), the op tells the dispatcher, which warns once
    and takes its next layout (persistent) for this shape from then on, with the same results (float64
    reference, NaN-poisoned outputs); the next call does not try the cluster launch again."""
    monkeypatch.setattr(launch, "cluster_refusal", lambda device: None)  # as if clusters could run here
    monkeypatch.setitem(kernels.configs.SEQUENCE_MAX_H, 8, 0)
    default = kernels.configs.default_config  # groups of 3 programs of 16 columns
    monkeypatch.setattr(kernels.configs, "default_config", lambda layout, batch, hidden, dtype=None: _config()
                        if layout in ("persistent", "cluster") else default(layout, batch, hidden, dtype))
    tries, run = [], launch._launch_clusters_of
    monkeypatch.setattr(launch, "_launch_clusters_of", lambda *a, **k: tries.append(1) or run(*a, **k))
    p, (ref_out, ref_hn) = _layer(38, True)
    assert dispatch.choose(dispatch.shape_of(p["xw"], "forward", False), DEVICE).layout == "cluster"
    args = (p["xw"][None], p["h0"][None], p["w_hh"][None], p["lengths"], False, "tanh", False)
    with pytest.warns(RuntimeWarning, match="no cluster of 3 CTAs.*cluster layout is not taken") as seen:
        out, h_n = ops.recurrence(*args)
        ops.recurrence(*args)
    assert sum("cluster layout is not taken" in str(w.message) for w in seen) == 1 and len(tries) == 1
    assert dispatch.choose(dispatch.shape_of(p["xw"], "forward", False), DEVICE).layout == "persistent"
    assert_close(out[0], ref_out, torch.float64, "out")
    assert_close(h_n[0], ref_hn, torch.float64, "h_n")


def test_cluster_layout_runs_clusters_where_they_run(clusters):
    """In the concurrent harness the cluster launch runs: one direction and both (stacked [2, ...]),
    forward and backward, against float64 with NaN-poisoned outputs."""
    p, (ref_out, ref_hn) = _layer(39, False)
    q = _problem(False, seed=40)
    ref_out_r, ref_hn_r = _reference(q, "tanh", True)  # direction 1 walks the other way
    options = dict(layout="cluster", config=_config())
    with concurrent_programs(seed=6):
        out, h_n = kernels.recurrence_forward(p["xw"], p["h0"], p["w_hh"], **options)
        stack = lambda key: torch.stack([p[key], q[key]])  # noqa: E731
        out2, h_n2 = kernels.recurrence_forward(stack("xw"), stack("h0"), stack("w_hh"), **options)
        dz2 = kernels.recurrence_backward(torch.ones_like(out2), out2, stack("w_hh"), **options)
    assert [c.directions for c in clusters] == [1, 2, 2] and all(c.programs_per_group == 3 for c in clusters)
    assert_close(out, ref_out, torch.float64, "out")
    assert_close(h_n, ref_hn, torch.float64, "h_n")
    for d, (r_out, r_hn) in enumerate(((ref_out, ref_hn), (ref_out_r, ref_hn_r))):
        assert_close(out2[d], r_out, torch.float64, f"out[{d}]")
        assert_close(h_n2[d], r_hn, torch.float64, f"h_n[{d}]")
    eye = torch.eye(H, dtype=torch.float64)
    for d, (r, r_out) in enumerate(((p, ref_out), (q, ref_out_r))):
        ref = reference.backward(r["xw"], r["h0"], eye, r["w_hh"], r_out, torch.ones(T, B, H, dtype=torch.float64),
                                 torch.zeros(B, H, dtype=torch.float64), "tanh", None, d == 1)
        assert_close(dz2[d], ref.dz, torch.float64, f"dz[{d}]")


# Counts the cluster form's barriers in the interpreter: the barrier (inline PTX there) replaced by a
# counter, one program a group (the plain interpreter), both directions and the backward too.
_COUNT_BARRIERS = """
import json, torch, triton
from tritonrnn import kernels
from tritonrnn.kernels import launch, persistent
calls, plans = [], []
persistent.cluster_barrier = lambda: calls.append(1)
run = launch._launch_persistent
launch._launch_persistent = lambda *a, **k: plans.append(run(*a, **k)) or plans[-1]
T, B, H = 5, 3, 24
config = triton.Config({"BLOCK_B": 16, "BLOCK_N": 16, "K_SPLIT": 1, "BARRIER": "cluster"}, num_warps=4, num_stages=1)
counts = []
for backward in (False, True):
    xw, h0, w = torch.randn(2, T, B, H, dtype=torch.float64), torch.randn(2, B, H, dtype=torch.float64), \\
        torch.randn(2, H, H, dtype=torch.float64)
    calls.clear()
    if backward:
        kernels.recurrence_backward(xw, xw, w, layout="persistent", config=config)
    else:
        kernels.recurrence_forward(xw, h0, w, layout="persistent", config=config)
    counts.append([len(calls), plans[-1].programs * (T - 1)])
print(json.dumps(counts))
"""


def _barrier_counts(root) -> list:
    import json
    import os
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", _COUNT_BARRIERS], capture_output=True, text=True, timeout=300,
                            cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_the_cluster_barrier_is_taken_at_every_step(tmp_path):
    """Issue 24 item 2: every program of the cluster form waits at the cluster barrier once a step, every
    step but the last (nothing reads the last state), forward and backward: counted in the interpreter,
    where the barrier is replaced by a counter. (tests/perf/test_static.py checks that the compiled barrier
    sits in the step loop, unpredicated; not that each step takes it.) A mutated copy that skips every
    other step's barrier is caught."""
    assert all(seen == expected > 0 for seen, expected in _barrier_counts(ROOT))
    mutant = mutated_checkout(tmp_path, "kernels/persistent.py", "        if i < T - 1:  # no barrier after the last",
                              "        if (i < T - 1) & ((i % 2 == 0) | (BARRIER == 'counter')):  # no barrier after")
    assert all(seen < expected for seen, expected in _barrier_counts(mutant))
