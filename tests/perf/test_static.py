"""The launch configs fit on chip: compiled offline for sm_90 (H100/H200) with Triton's bundled
ptxas, as launches specialise them (aligned pointers, integers divisible by 16). No default variant
spills registers, every one multiplies on the tensor cores, and no variant a launch may ask for (the
defaults, and each path's largest tuning config at the largest H it accepts) needs more shared
memory than a program may use: Triton's dynamic shared memory, not cuobjdump's static 1 KB."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from tritonrnn import costmodel
from tritonrnn.kernels import configs
from tritonrnn.kernels.occupancy import SMLimits, programs_per_sm
from tritonrnn.perf import static

MAX_STACK_BYTES = 32  # a few spilled registers (3xTF32 at H=128 spills 24 bytes), not a spill loop
# fp64 (the reference dtype, not a speed target) may spill a register's worth: Triton 3.8 gives the fp64
# persistent H = 512 forward and cluster H = 256 backward 168 registers and 8 spilled bytes (none in 3.6).
FP64_STACK_BYTES = 8


def _spill_free(v) -> bool:
    return v["stack_bytes"] <= (FP64_STACK_BYTES if v["dtype"] == "float64" else 0)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tritonrnn.perf.static"], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    variants = [json.loads(line) for line in result.stdout.splitlines()]
    if os.environ.get("TRITONRNN_STATIC_SUMMARY"):  # CI prints it under each Triton release
        summary = Path(os.environ["TRITONRNN_STATIC_SUMMARY"])
        summary.write_text(static.summary(variants) + "\n")
        summary.with_name(f"{summary.stem}-{triton.__version__}.jsonl").write_text(result.stdout)
    return variants


def _table(variants) -> str:
    return "\n".join(f"{v['role']:7s} {v['path']:8s} {v['dtype']:8s} tf32={v['allow_tf32']:5s} H={v['hidden']:4s} "
                     f"bw={v.get('backward', 'False'):5s} {v['config']} regs={v['registers']} "
                     f"stack={v['stack_bytes']} shared={v['shared_bytes']} (model {v['modelled_shared_bytes']}) "
                     f"{v['mma'][:1]}" for v in variants)


pytestmark = pytest.mark.skipif(not static.available(), reason="this triton has no bundled NVIDIA toolchain")


def test_default_configs_compile_for_hopper_without_spills(compiled):
    defaults = [v for v in compiled if v["role"] == "default"]
    assert len(defaults) == len(static.default_variants())
    assert all(v["stack_bytes"] <= MAX_STACK_BYTES for v in defaults), "spills:\n" + _table(defaults)
    assert all(v["mma"] for v in defaults), "FMA-only matmuls:\n" + _table(defaults)


def test_every_launchable_variant_fits_in_shared_memory(compiled):
    """Each path's largest tuning config at the largest H it accepts loads: within the budget, and
    within configs.shared_memory_bytes, the model that prunes the tuning spaces."""
    launchable = [v for v in compiled if v["role"] in ("default", "limit")]
    assert len(launchable) == len(static.default_variants()) + len(static.limit_variants())
    too_big = [v for v in launchable if v["shared_bytes"] > configs.SHARED_MEMORY_BUDGET]
    assert not too_big, f"over {configs.SHARED_MEMORY_BUDGET} B of shared memory:\n" + _table(too_big)
    underestimated = [v for v in launchable if v["shared_bytes"] > v["modelled_shared_bytes"]]
    assert not underestimated, "configs.shared_memory_bytes is below the compiler's figure:\n" + _table(underestimated)


def test_path_fits_answers_what_the_compiler_says_loads(compiled):
    """The sequence path at H = 200: fp32 needs 278,528 B (TF32) or 557,056 B (3xTF32), fp64 557,056 B
    of shared memory, over the 232,448 B a program may use; fp16/bf16 139,264 B. path_fits took all of
    them before it followed the budget."""
    edges = [v for v in compiled if v["role"] == "edge"]
    assert len(edges) == len(static.edge_variants())
    def admitted(v):
        return configs.layout_fits("sequence", int(v["hidden"]), getattr(torch, v["dtype"]), v["allow_tf32"] == "True")

    wrong = [v for v in edges if admitted(v) != (v["shared_bytes"] <= configs.SHARED_MEMORY_BUDGET)]
    assert not wrong, "path_fits disagrees with the compiled shared memory:\n" + _table(wrong)
    assert any(v["shared_bytes"] > configs.SHARED_MEMORY_BUDGET for v in edges)  # the case is there


def test_persistent_grids_fit_on_132_sms(compiled):
    """No persistent default variant spills, and every standard-grid cell's plan fits: H100 SXM and
    H200 both have 132 SMs of sm_90 (65536 registers, 228 KB shared memory, 2048 threads each):
    SMLimits' defaults. perf/NOTES.md holds the table."""
    persistent = [v for v in compiled if v["role"] == "default" and v["path"] == "persistent"]
    assert persistent and all(_spill_free(v) for v in persistent), "persistent spills:\n" + _table(persistent)
    rows = static.persistent_fit(persistent)
    assert len(rows) == (3 * 4 - 1) * 4, static.fit_table(rows)  # 3 dtypes x H 256..2048 (fp32 to 1024) x 4 batches
    for row in rows:
        programs = row["plan"]["programs_per_group"] * row["plan"]["groups"]
        assert 1 <= row["programs_per_sm"] and programs <= row["capacity"], static.fit_table(rows)


CLUSTER_BARRIER = ["barrier.cluster.arrive.release", "barrier.cluster.wait.acquire"]
# The counter barrier's release arrival and acquire read (LLVM may place either block first).
# (The arrival's result is unused: Triton 3.6 to 3.8 emit it as atom, 3.9 as red.)
COUNTER_BARRIERS = [sorted([f"{op}.global.gpu.release.add", "ld.global.gpu.acquire"]) for op in ("atom", "red")]


def test_cluster_variants_wait_at_the_cluster_barrier_in_the_step_loop(compiled):
    """The cluster form's defaults (kernels/launch.py): spill-free, on the tensor cores, launched in
    clusters of 4 to 16 CTAs, and their PTX holds the release arrival then the acquire wait,
    unpredicated (every thread: `.aligned`), in a block on the step loop's cycle, and no counter.
    The persistent path's variants keep the counter barrier, one CTA a cluster."""
    clusters = [v for v in compiled if v["role"] == "default" and v["path"] == "cluster"]
    assert len(clusters) == len([v for v in static.default_variants() if v["path"] == "cluster"]) > 0
    assert {v["dtype"] for v in clusters} == {"float16", "bfloat16", "float32", "float64"}
    assert all(_spill_free(v) and v["mma"] for v in clusters), "spills or FMA-only:\n" + _table(clusters)
    for v in clusters:
        # The cost model's figure for this variant (the resource table's persistent entry: a cluster's CTA is a
        # persistent program with the cheaper barrier), compiled by the table's Triton.
        figure = costmodel.resources("cluster", v["dtype"], int(v["hidden"]),
                                     "backward" if v.get("backward") == "True" else "forward", v["config"],
                                     allow_tf32=v["allow_tf32"] == "True")["registers"]
        if triton.__version__ == costmodel.resource_table_triton():
            assert v["registers"] <= figure, v
        else:  # another release may allocate a few registers more or less: the CTAs an SM holds must not drop
            held = programs_per_sm(v["registers"], v["num_warps"], v["shared_bytes"], SMLimits())
            assert held >= programs_per_sm(figure, v["num_warps"], v["shared_bytes"], SMLimits()), v
        assert v["cluster_dims"] in ([4, 1, 1], [8, 1, 1], [16, 1, 1]), v
        assert v["barrier"] == CLUSTER_BARRIER and v["cluster_barrier_in_loop"], v
    persistent = [v for v in compiled if v["path"] == "persistent"]
    assert persistent and all(sorted(v["barrier"]) in COUNTER_BARRIERS and v["cluster_dims"] == [1, 1, 1]
                              and not v["cluster_barrier_in_loop"] for v in persistent)


def test_every_waiting_variant_orders_its_barrier_and_state_loads(compiled):
    """Issue 24 item 2, on every persistent and cluster variant a launch may ask for: the counter barrier's
    order (persistent), every load of the state other programs wrote .cg, and no branch on a thread's own
    %globaltimer (static.barrier_order_problems; tests/kernels/test_persistent.py holds the checks' mutations)."""
    waiting = [v for v in compiled if v["role"] in ("default", "limit") and v["path"] in ("persistent", "cluster")]
    assert waiting and all(v["barrier_problems"] == [] for v in waiting), [
        (v["path"], v["dtype"], v["hidden"], v.get("backward"), v["barrier_problems"]) for v in waiting
        if v["barrier_problems"]]
    probes = [v for v in compiled if v["role"] == "probe"]
    assert probes and all(v["clock_branch_problems"] == [] for v in probes)


_LOOP = """
$L__BB0_1:
\tld.global.cg.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
{barrier}
\tadd.s32 %r5, %r5, 1;
\tsetp.lt.s32 %p1, %r5, %r6;
\t@%p1 bra $L__BB0_1;
{after}
\tret;
"""
_PAIR = "\tbarrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"


@pytest.mark.parametrize("barrier, after, in_loop", [
    (_PAIR, "", True),
    ("", _PAIR, False),  # after the loop: one barrier for all steps
    (_PAIR.replace("\tbarrier", "\t@%p2 barrier"), "", False),  # predicated: not every thread arrives
    ("\tbarrier.cluster.wait.acquire.aligned;\n\tbarrier.cluster.arrive.release.aligned;", "", False),  # wait first
    (_PAIR.replace(".release", "").replace(".acquire", ""), "", False),  # no release/acquire semantics
], ids=["in-loop", "after-loop", "predicated", "wait-first", "relaxed"])
def test_the_loop_check_reads_the_control_flow(barrier, after, in_loop):
    """cluster_barrier_in_loop follows the PTX's branches, so a barrier that left the loop (or lost
    its ordering semantics, or is predicated) fails test_cluster_variants_... above."""
    ptx = _LOOP.replace("{barrier}", barrier).replace("{after}", after)
    assert static.cluster_barrier_in_loop(ptx) is in_loop
    # A rotated loop (the latch placed before the header, as LLVM lays out the step loop) still counts.
    rotated = "\tbra.uni $L__BB0_2;\n$L__BB0_1:\n" + barrier + "\n\t@%p1 bra $L__BB0_3;\n$L__BB0_2:\n" \
              "\tadd.s32 %r5, %r5, 1;\n\tbra.uni $L__BB0_1;\n$L__BB0_3:\n" + after + "\n\tret;\n"
    assert static.cluster_barrier_in_loop(rotated) is in_loop


def test_the_calibration_probe_compiles_both_barriers(compiled):
    """The calibration's probe (empty steps at the group barrier) holds what the kernel holds."""
    probes = {v["barrier_kind"]: v for v in compiled if v["role"] == "probe"}
    assert probes["cluster"]["barrier"] == CLUSTER_BARRIER and probes["cluster"]["cluster_barrier_in_loop"]
    assert sorted(probes["counter"]["barrier"]) in COUNTER_BARRIERS and not probes["counter"]["cluster_barrier_in_loop"]
