"""The cluster form of the persistent recurrence (kernels/cluster.py), as far as a CPU can check it.

On a GPU a group is one thread-block cluster waiting at the hardware cluster barrier, which the
interpreter cannot run (inline PTX). Here the same programs run with the counter barrier instead
(BARRIER="counter"), every program of a launch at once (tests/concurrent_interpreter.py): several
CTAs a cluster, several clusters, one or two directions, forward and backward, against float64,
outputs NaN-poisoned. That checks the cluster launch's tiling (rank, slices, clusters, batch tiles),
not the cluster barrier: tests/test_static.py checks the barrier's compiled PTX.
"""
from collections import namedtuple

import warnings

import pytest
import torch
import triton

from concurrent_interpreter import concurrent_programs
from conftest import DEVICE, ROOT, assert_close, dtype_id, mutated_checkout
from tritonrnn import kernels, reference
from tritonrnn.kernels import cluster, persistent

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's concurrent harness")

# T = 5, B = 40: 3 clusters of one 16-row tile (the last ragged); H = 40 in 16-column CTAs: clusters
# of 3 CTAs, the last ragged.
T, B, H = 5, 40, 40
VARIANTS = [("tanh", False, False), ("relu", True, True)]  # (nonlinearity, reverse, with lengths)


def _variant_id(variant):
    act, reverse, packed = variant
    return act + ("-reverse" if reverse else "") + ("-lengths" if packed else "")


def _meta(**debug):
    config = triton.Config({"BLOCK_B": 16, "BLOCK_N": 16, "K_SPLIT": 1, **debug}, num_warps=4, num_stages=1)
    return kernels.config.config_to_dict(config)


def _problem(packed, seed, steps=T):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    p = dict(xw=rand(steps, B, H), h0=rand(B, H), w_hh=rand(H, H, scale=1.5 / H ** 0.5))
    p["lengths"] = torch.randint(1, steps + 1, (B,), generator=g).to(torch.int32) if packed else None
    return p


def _reference(p, act, reverse):
    eye = torch.eye(H, dtype=torch.float64)  # xw is already projected: x = xw, W_ih = I
    return reference.forward(p["xw"], p["h0"], eye, p["w_hh"], None, None, act, p["lengths"], reverse)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _launch_forward(p, act, reverse, dtype, meta):
    out, h_n = _nan(*p["xw"].shape, dtype=dtype), _nan(B, H, dtype=dtype)
    chosen = cluster.launch(p["xw"].to(dtype), p["h0"].to(dtype), p["w_hh"].to(dtype), None, out, h_n, p["lengths"],
                            backward=False, reverse=reverse, relu=act == "relu",
                            numerics=kernels.recurrence._numerics(dtype, DEVICE, False), meta=meta)
    return out, h_n, chosen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_forward_in_clusters_matches_reference(variant, dtype):
    act, reverse, packed = variant
    p = _problem(packed, seed=31)
    with concurrent_programs(seed=1):
        out, h_n, chosen = _launch_forward(p, act, reverse, dtype, _meta())
    assert chosen == cluster.Plan(size=3, clusters=3, batch_tiles=1, resident_clusters=(1 << 20) // 3)
    ref_out, ref_hn = _reference(p, act, reverse)
    assert_close(out, ref_out, dtype, "out")
    assert_close(h_n, ref_hn, dtype, "h_n")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_backward_in_clusters_matches_reference(variant, dtype):
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
    dz = _nan(T, B, H, dtype=dtype)
    with concurrent_programs(seed=2):
        chosen = cluster.launch(grad.to(dtype), None, p["w_hh"].to(dtype), out.to(dtype), dz, None, p["lengths"],
                                backward=True, reverse=not reverse, relu=act == "relu",
                                numerics=kernels.recurrence._numerics(dtype, DEVICE, False), meta=_meta())
    assert (chosen.size, chosen.clusters) == (3, 3)
    assert_close(dz, ref.dz, dtype, "dz")


def test_both_directions_and_several_batch_tiles_a_cluster():
    """A bidirectional layer in one launch (grid z), where the device holds 2 clusters of 3 CTAs:
    one cluster a direction, each serving all 3 batch tiles."""
    p = [_problem(True, seed=34), _problem(True, seed=35)]
    p[1]["lengths"] = p[0]["lengths"]
    stack = lambda key: torch.stack([q[key] for q in p]).contiguous()  # noqa: E731
    out, h_n = _nan(2, T, B, H, dtype=torch.float64), _nan(2, B, H, dtype=torch.float64)
    with concurrent_programs(seed=3, capacity=7):
        chosen = cluster.launch(stack("xw"), stack("h0"), stack("w_hh"), None, out, h_n, p[0]["lengths"],
                                backward=False, reverse=False, relu=False,
                                numerics=kernels.recurrence._numerics(torch.float64, DEVICE, False), meta=_meta())
    assert chosen == cluster.Plan(size=3, clusters=1, batch_tiles=3, resident_clusters=2, directions=2)
    assert chosen.grid == (3, 1, 2)
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
            out, _, _ = _launch_forward(p, "tanh", False, torch.float64, _meta(DEBUG_WAIT_SLACK=10 ** 6))
        if out.isnan().any() or not torch.allclose(out, ref_out, rtol=1e-10, atol=1e-10):
            return
    pytest.fail("clusters whose CTAs never wait for each other passed 3 schedules")


def test_the_plain_interpreter_refuses_a_cluster_launch():
    """One program at a time cannot run CTAs that wait for each other: the launch is refused (the
    caller takes another layout) instead of hanging."""
    p = _problem(False, seed=37)
    with pytest.raises(cluster.ClusterUnavailable, match="no cluster of 3 CTAs"):
        _launch_forward(p, "tanh", False, torch.float64, _meta())


def test_plan_takes_the_clusters_the_device_holds():
    assert cluster.plan(256, 512, 16, 32, resident_clusters=8) == cluster.Plan(16, 8, 2, 8)
    assert cluster.plan(256, 256, 16, 32, resident_clusters=64) == cluster.Plan(8, 16, 1, 64)
    assert cluster.plan(1, 1024, 16, 64, resident_clusters=8, directions=2) == cluster.Plan(16, 1, 1, 8, 2)
    assert cluster.plan(100, 1024, 16, 64, resident_clusters=8, directions=2) == cluster.Plan(16, 4, 2, 8, 2)
    for batch in range(1, 300, 7):
        for resident in (1, 3, 8, 33):
            chosen = cluster.plan(batch, 512, 16, 32, resident)
            assert chosen.clusters <= resident and chosen.clusters * chosen.batch_tiles * 16 >= batch
    for hidden, block_n in ((2048, 64), (640, 64), (32, 32)):  # 32, 10 and 1 CTAs: no launchable cluster
        with pytest.raises(cluster.ClusterUnavailable, match="launches clusters of 2-8 or 16"):
            cluster.plan(16, hidden, 16, block_n, resident_clusters=8)
    with pytest.raises(cluster.ClusterUnavailable, match="holds no cluster of 16"):
        cluster.plan(16, 1024, 16, 64, resident_clusters=0)


def test_fits_follows_cluster_sizes_and_shared_memory():
    # The persistent path's default config: 64 columns a CTA where the slice takes <= 128 KB, else 32
    # (K in 4 parts). 16-bit: 4, 8, 16 CTAs at H = 256-1024; 2048: 64 CTAs; H = 64: one CTA, no cluster.
    assert [h for h in (64, 128, 256, 512, 1024, 2048) if cluster.fits(h, torch.bfloat16)] == [128, 256, 512, 1024]
    assert [h for h in (256, 512, 1024) if cluster.fits(h, torch.float32)] == [256, 512]  # 1024: 32 CTAs
    assert [h for h in (256, 512, 1024) if cluster.fits(h, torch.float64)] == [256, 512]  # 512: 16 of 32 columns
    assert not any(cluster.fits(h, torch.float32, allow_tf32=False) for h in (256, 512))  # 3xTF32 spills
    assert cluster.cluster_fits(512, torch.float16) and not cluster.cluster_fits(512, torch.float16, device=DEVICE)
    config = cluster.default_config(64, 1024, torch.bfloat16)
    assert (config.kwargs["BLOCK_N"], config.kwargs["K_SPLIT"], config.num_warps) == (64, 1, 8)  # 16 CTAs, wgmma
    config = cluster.default_config(64, 512, torch.float64)
    assert (config.kwargs["BLOCK_N"], config.kwargs["K_SPLIT"], config.num_warps) == (32, 4, 4)  # a part a warp
    assert cluster.size_of(256, cluster.default_config(64, 256, torch.float32).kwargs["BLOCK_N"]) == 4


def test_launcher_metadata_is_what_triton_packs():
    """The cluster launch hands Triton 3.6's launcher (num_warps, num_ctas, shared) with num_ctas
    set to the cluster size, and every kernel argument in parameter order: both as Triton's own
    launch path makes them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    meta = namedtuple("Meta", "num_warps num_ctas shared")(8, 1, 49152)
    assert make_backend(GPUTarget("cuda", 90, 32)).pack_metadata(meta) == (8, 1, 49152)
    assert cluster.packed_metadata(namedtuple("Compiled", "metadata")(meta), 16) == (8, 16, 49152)
    with pytest.raises(ValueError, match="num_ctas = 1"):
        cluster.packed_metadata(namedtuple("Compiled", "metadata")(meta._replace(num_ctas=2)), 16)
    names = persistent.rnn_persistent_kernel.fn.arg_names
    positional = tuple(f"arg-{name}" for name in names[:names.index("BATCH_TILES") + 1])
    keywords = {name: f"kw-{name}" for name in names[len(positional):] if name != "DEBUG_WAIT_SLACK"}
    values = cluster.bound_arguments(persistent.rnn_persistent_kernel, positional, keywords)
    assert len(values) == len(names) and values[names.index("DEBUG_WAIT_SLACK")] == 0  # its default
    assert all(str(v).endswith(n) for v, n in zip(values, names) if n != "DEBUG_WAIT_SLACK")


def test_barrier_probe_counts_every_arrival():
    """The calibration's probe (empty steps at the kernel's group barrier): the counter form, 2 groups
    of 4 programs at once, ends with steps x programs arrivals a group; the cluster form needs a GPU."""
    with concurrent_programs(seed=5):
        arrivals = cluster.probe_barrier("counter", steps=6, size=4, groups=2, device=DEVICE)
    assert arrivals.tolist() == [24, 24]
    with pytest.raises(cluster.ClusterUnavailable, match="sm_90 or later"):
        cluster.probe_barrier("cluster", steps=6, device=DEVICE)


def test_cluster_plan_for_the_model():
    """Offline plans on an H100/H200 (8 GPCs of at least 16 SMs assumed): the shapes of the
    standard grid the cluster form runs, and None where it does not."""
    bf16 = cluster.cluster_plan(256, 1024, torch.bfloat16)
    assert bf16["cluster_dims"] == [16, 1, 1] and not bf16["portable"] and bf16["barrier_ns"] == 500
    assert bf16["config"] == {"BLOCK_B": 16, "BLOCK_N": 64, "K_SPLIT": 1, "num_warps": 8, "num_stages": 1}
    # 164 KB a CTA: one a SM, one 16-CTA cluster a GPC: 8 clusters, 2 of the 16 batch tiles each.
    assert bf16["plan"] == {"programs_per_group": 16, "groups": 8, "batch_tiles": 2, "resident_capacity": 128,
                            "directions": 1}
    small = cluster.cluster_plan(64, 256, torch.float32)
    assert small["cluster_dims"] == [4, 1, 1] and small["portable"] and small["plan"]["groups"] == 4
    both = cluster.cluster_plan(16, 512, torch.float16, directions=2)
    assert both["cluster_dims"] == [8, 1, 1] and both["plan"]["directions"] == 2
    assert cluster.cluster_plan(16, 1024, torch.float32) is None  # 32 CTAs of 32 columns
    assert cluster.cluster_plan(16, 2048, torch.float16) is None  # 64 CTAs
    assert cluster.cluster_plan(16, 256, torch.float32, allow_tf32=False) is None  # 3xTF32 spills


def _layer(seed, packed, steps=T):
    p = _problem(packed, seed, steps)
    return p, _reference(p, "tanh", False)


def test_cluster_path_falls_back_to_the_persistent_path_with_one_warning(monkeypatch):
    """recurrence_forward/backward with path="cluster": where no cluster launch runs (the plain
    interpreter runs one program at a time: ClusterUnavailable), the launchers warn once and run
    the persistent path, with the same results (float64 reference, NaN-poisoned outputs)."""
    monkeypatch.setattr(kernels.recurrence, "_cluster_refusal_warned", False)
    monkeypatch.setattr(kernels.recurrence, "_empty_like", lambda t: torch.full_like(t, float("nan")))
    p, (ref_out, ref_hn) = _layer(38, True)
    config = triton.Config({"BLOCK_B": 16, "BLOCK_N": 16, "K_SPLIT": 1}, num_warps=4, num_stages=1)
    with pytest.warns(RuntimeWarning, match="no cluster of 3 CTAs.*persistent path instead") as seen:
        out, h_n = kernels.recurrence_forward(p["xw"], p["h0"], p["w_hh"], lengths=p["lengths"], path="cluster",
                                              config=config)
        grad = torch.randn(T, B, H, dtype=torch.float64) * (torch.arange(T)[:, None] < p["lengths"])[..., None]
        dz = kernels.recurrence_backward(grad, ref_out, p["w_hh"], lengths=p["lengths"], path="cluster",
                                         config=config)
    assert sum("persistent path instead" in str(w.message) for w in seen) == 1
    assert_close(out, ref_out, torch.float64, "out")
    assert_close(h_n, ref_hn, torch.float64, "h_n")
    eye = torch.eye(H, dtype=torch.float64)
    ref = reference.backward(p["xw"], p["h0"], eye, p["w_hh"], ref_out, grad, torch.zeros(B, H, dtype=torch.float64),
                             "tanh", p["lengths"], False)
    assert_close(dz, ref.dz, torch.float64, "dz")


def test_cluster_path_runs_clusters_where_they_run(monkeypatch):
    """In the concurrent harness the cluster launch runs: the launchers take it without a fallback
    warning, for one direction and for both (bidirectional_forward/backward with path="cluster"),
    against float64 with NaN-poisoned outputs."""
    launched = []
    real = cluster.launch
    monkeypatch.setattr(cluster, "launch", lambda *a, **k: launched.append(real(*a, **k)) or launched[-1])
    monkeypatch.setattr(kernels.recurrence, "_empty_like", lambda t: torch.full_like(t, float("nan")))
    p, (ref_out, ref_hn) = _layer(39, False)
    q = _problem(False, seed=40)
    ref_out_r, ref_hn_r = _reference(q, "tanh", True)  # direction 1 walks the other way
    config = triton.Config({"BLOCK_B": 16, "BLOCK_N": 16, "K_SPLIT": 1}, num_warps=4, num_stages=1)
    with concurrent_programs(seed=6), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warns
        out, h_n = kernels.recurrence_forward(p["xw"], p["h0"], p["w_hh"], path="cluster", config=config)
        stack = lambda key: torch.stack([p[key], q[key]])  # noqa: E731
        out2, h_n2 = kernels.bidirectional_forward(stack("xw"), stack("h0"), stack("w_hh"), path="cluster",
                                                   config=config)
        dz2 = kernels.bidirectional_backward(torch.ones_like(out2), out2, stack("w_hh"), path="cluster", config=config)
    assert [c.directions for c in launched] == [1, 2, 2] and all(c.size == 3 for c in launched)
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


def test_a_refused_cluster_launch_is_not_offered_again(monkeypatch):
    """After the device refused a cluster launch of a shape, cluster_fits says no for it, so the
    dispatcher (and `tritonrnn info`) name the layout that runs instead of retrying the refused one
    at every call. Before: cluster_fits kept answering yes."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cluster, "_REFUSED", set())
    gpu = torch.device("cuda", 0)
    assert cluster.cluster_fits(512, torch.bfloat16, True, gpu)
    cluster.remember_refusal(512, torch.bfloat16, gpu)
    assert not cluster.cluster_fits(512, torch.bfloat16, True, gpu)
    assert cluster.cluster_fits(256, torch.bfloat16, True, gpu)  # other shapes are still offered


# Counts the cluster form's barriers in the interpreter: the barrier (inline PTX there) replaced by a
# counter, one program a group (the plain interpreter), both directions and the backward too.
_COUNT_BARRIERS = """
import json, torch
from tritonrnn.kernels import cluster, persistent, recurrence
calls = []
cluster.barrier = lambda: calls.append(1)
T, B, H = 5, 3, 24
numerics = recurrence._numerics(torch.float64, torch.device("cpu"), False)
meta = {"BLOCK_B": 16, "BLOCK_N": 16, "K_SPLIT": 1, "num_warps": 4, "num_stages": 1, "BARRIER": "cluster"}
counts = []
for backward in (False, True):
    xw, h0, w = torch.randn(2, T, B, H, dtype=torch.float64), torch.randn(2, B, H, dtype=torch.float64), \\
        torch.randn(2, H, H, dtype=torch.float64)
    calls.clear()
    chosen = persistent.launch(xw, None if backward else h0, w, xw if backward else None, torch.empty_like(xw),
                               None if backward else torch.empty_like(h0), None, backward=backward, reverse=False,
                               relu=False, numerics=numerics, meta=meta)
    counts.append([len(calls), chosen.programs * (T - 1)])
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
    where the barrier is replaced by a counter. (tests/test_static.py checks that the compiled barrier
    sits in the step loop, unpredicated; not that each step takes it.) A mutated copy that skips every
    other step's barrier is caught."""
    assert all(seen == expected > 0 for seen, expected in _barrier_counts(ROOT))
    mutant = mutated_checkout(tmp_path, "kernels/persistent.py", "        if i < T - 1:  # no barrier after the last",
                              "        if (i < T - 1) & ((i % 2 == 0) | (BARRIER == 'counter')):  # no barrier after")
    assert all(seen < expected for seen, expected in _barrier_counts(mutant))
