"""The cluster form of the persistent recurrence: a group of programs is one Hopper thread-block
cluster, and the group barrier is the cluster's hardware barrier instead of counters in global memory.

Dimensions: B batch, H hidden. rnn_persistent_kernel with BARRIER="cluster" is the kernel of
kernels/persistent.py unchanged but for its one barrier function (_group_barrier): each program (one
CTA) owns BLOCK_N columns (its slice of M^T, the MMA's M side), a group is `cdiv(H, BLOCK_N)`
programs, and the launch makes each group one cluster of that many CTAs (cluster dims (programs per
group, 1, 1), grid (groups x directions) clusters), so

    program_id(0) = the CTA's rank in its cluster   (CUDA numbers a (N, 1, 1) cluster's CTAs by x)
    group barrier = barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned

executed once by every thread of every CTA (`.aligned`: never under a branch). The release orders
each thread's stores of its columns (to the ring) before its arrival; the acquire orders its loads of
the next state after the wait; the state still travels through L2 (.cg loads of the ring), as in the
counter form. Clusters are gang-scheduled, so no cooperative launch is needed, nothing counts
arrivals (no sync words) and no wait is bounded (no timeout, no NaN poison); clusters of a launch
never wait for each other.

Why each CTA is its own Triton program, compiled with num_ctas = 1: with num_ctas = N, Triton 3.6
makes one program span the cluster and splits every tensor over the CTAs by its own layout choice
(CGALayout), so a program cannot pick its W_hh slice by rank (perf/NOTES.md, v0.5). The launch here
instead tells Triton's launcher num_ctas = N for a kernel compiled with num_ctas = 1 (the launcher
multiplies grid x by it and sets the cluster dimension; at 16 it allows the non-portable size).

The interpreter cannot run PTX: there the same programs run with the counter barrier
(BARRIER="counter"), which needs every CTA of a cluster at once (tests/concurrent_interpreter.py);
the plain interpreter (one program at a time) refuses the launch (ClusterUnavailable). Nothing the
CPU runs exercises the cluster barrier itself: tests/test_static.py checks its PTX.
"""
import dataclasses
import inspect

import torch
import triton
import triton.language as tl

# persistent.py's kernel calls barrier() below: each module imports the other (neither uses the
# other at import time).
from . import config as configs
from . import persistent, toolchain

# Cluster sizes a launch may ask for: up to 8 CTAs is portable; 16 is Hopper's non-portable
# maximum, which Triton 3.6's launcher allows only at exactly 16 (CU_FUNC_ATTRIBUTE_NON_PORTABLE_...).
SIZES = (2, 3, 4, 5, 6, 7, 8, 16)
MAX_SIZE = 16
PORTABLE_SIZE = 8


@triton.jit
def barrier():
    """Every thread of every CTA of the cluster: arrive (release), then wait (acquire).

    A scalar inline asm with no operands runs once per thread, unpredicated; is_pure=False keeps it
    in place (it has effects the compiler cannot see)."""
    tl.inline_asm_elementwise("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
                              "\n\tmov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["STEPS", "wait_limit"])
def barrier_probe_kernel(p_sync, STEPS, wait_limit, BARRIER: tl.constexpr, TIMER: tl.constexpr):
    """STEPS empty steps, each ending at the persistent kernel's group barrier (_group_barrier) in
    its BARRIER form: program_id(0) is the rank in the group (the cluster), program_id(1) the group.
    p_sync: [groups, SYNC_LINE] int32, zero at launch (the counter form's), or None (cluster)."""
    p_group = p_sync + tl.program_id(1) * persistent.SYNC_LINE if BARRIER == "counter" else p_sync
    persistent.init_sync(p_group, BARRIER)
    failed = 0
    for i in range(STEPS):
        failed = persistent._group_barrier(p_group, (i + 1) * tl.num_programs(0), failed, wait_limit, TIMER, -1,
                                           BARRIER)


class ClusterUnavailable(ValueError):
    """This cluster launch cannot run here: a cluster size Hopper or Triton's launcher does not
    allow, a device that holds no cluster of this kernel (its CTAs do not fit in one GPC), a device
    before sm_90, a launch the driver refused, or the plain interpreter (one program at a time).
    A ValueError, as the persistent path's refusals are: the caller takes the next layout."""


def size_of(hidden: int, block_n: int) -> int:
    """CTAs a cluster: programs of BLOCK_N columns that cover H."""
    return triton.cdiv(hidden, block_n)


def default_config(batch: int, hidden: int, dtype: torch.dtype = None) -> triton.Config:
    """The cluster form's config: the persistent path's default (its CTA is a persistent program):
    64 columns a CTA (wgmma m64, 4 warps, 8 from BLOCK_H 512) where the slice takes at most 128 KB,
    else 32 with K in 4 parts over 4 warps; 16-row batch tiles. So bf16/fp16 H = 256, 512, 1024 make
    clusters of 4, 8, 16 CTAs, fp32 (TF32) 256 and 512 of 4 and 8, fp64 256 and 512 of 4 and 16.
    Every such variant compiles spill-free on sm_90 (tests/test_static.py, perf/NOTES.md v0.5)."""
    return configs.default_config("persistent", batch, hidden, dtype)


def fits(hidden: int, dtype: torch.dtype, allow_tf32: bool = True, config: triton.Config = None,
         budget: int = None) -> bool:
    """Whether the cluster form runs this H and dtype at all: its cluster size is one a launch may
    ask for (SIZES), and each CTA's slice and state fit in shared memory (the persistent path's
    budget model); exact fp32 (3xTF32) only where the persistent path takes it by default (nowhere:
    it spills at every slice width)."""
    config = config or default_config(1, hidden, dtype)
    if size_of(hidden, config.kwargs["BLOCK_N"]) not in SIZES:
        return False
    if dtype == torch.float32 and not allow_tf32 and hidden > configs.PERSISTENT_EXACT_FP32_MAX_H:
        return False
    budget = configs.SHARED_MEMORY_BUDGET if budget is None else budget
    return configs.config_fits("persistent", config, hidden, dtype, allow_tf32, budget)


def cluster_fits(hidden: int, dtype: torch.dtype, allow_tf32: bool = True, device: torch.device = None) -> bool:
    """Whether a cluster launch may be tried for this H and dtype on `device` (None: an sm_90 GPU):
    `fits`, on a CUDA device of compute capability 9.0 or later. Whether the device then holds a
    cluster of this kernel is known only from the compiled kernel: `launch` raises
    ClusterUnavailable where it does not."""
    if device is not None and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9):
        return False
    if toolchain.cluster_launch_refusal():
        return False  # the launch goes through Triton's launcher, checked on the supported releases only
    if _refusal_key(hidden, dtype, device) in _REFUSED:
        return False  # a launch of this shape was refused here: the dispatcher takes the next layout
    return fits(hidden, dtype, allow_tf32)


# (device, H, dtype) whose cluster launch was refused in this process (remember_refusal).
_REFUSED = set()


def _refusal_key(hidden: int, dtype: torch.dtype, device) -> tuple:
    return (None if device is None else str(device), hidden, dtype)


def remember_refusal(hidden: int, dtype: torch.dtype, device: torch.device) -> None:
    """A cluster launch of this H and dtype was refused on `device`: cluster_fits answers False for it
    from now on, so the dispatcher (and `tritonrnn info`) name the layout that runs, not this one."""
    _REFUSED.add(_refusal_key(hidden, dtype, device))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A cluster launch, per direction: `clusters` clusters of `size` CTAs (one program of BLOCK_N
    columns each), each serving `batch_tiles` tiles of BLOCK_B rows; `resident_clusters` of them
    fit on the device at once."""

    size: int
    clusters: int
    batch_tiles: int
    resident_clusters: int
    directions: int = 1

    @property
    def cluster_dims(self) -> tuple:
        return (self.size, 1, 1)

    @property
    def grid(self) -> tuple:
        """Programs (CTAs) along x, y, z: x is the rank in the cluster, y the cluster, z the direction."""
        return (self.size, self.clusters, self.directions)

    @property
    def programs(self) -> int:
        return self.size * self.clusters * self.directions

    @property
    def programs_per_group(self) -> int:  # as persistent.Plan's (the CPU form checks its sync words)
        return self.size

    @property
    def waits(self) -> bool:
        return True


def plan(batch: int, hidden: int, block_b: int, block_n: int, resident_clusters: int, directions: int = 1) -> Plan:
    """The most clusters (batch parallelism) that the device holds at once, more batch tiles per
    cluster where it holds fewer than the batch tiles. Clusters never wait for each other, so a
    launch of more clusters than fit would still finish (in waves); the plan does not ask for it."""
    size = size_of(hidden, block_n)
    if size not in SIZES:
        raise ClusterUnavailable(f"a cluster of {size} CTAs (H = {hidden}, BLOCK_N = {block_n}): Triton 3.6 "
                                 f"launches clusters of 2-{PORTABLE_SIZE} or {MAX_SIZE} CTAs")
    if resident_clusters < 1:
        raise ClusterUnavailable(f"the device holds no cluster of {size} CTAs of this kernel at once")
    tiles = triton.cdiv(batch, block_b)
    batch_tiles = triton.cdiv(tiles, min(tiles, max(1, resident_clusters // directions)))
    return Plan(size, triton.cdiv(tiles, batch_tiles), batch_tiles, resident_clusters, directions)


def resident_clusters(compiled, size: int, device: torch.device) -> int:
    """Clusters of `size` CTAs of this compiled kernel that the device runs at once: the driver's
    cuOccupancyMaxActiveClusters (which knows the GPCs a cluster must fit in, but assumes 128 threads
    a CTA), held to what the SMs' registers, threads and shared memory allow (persistent.programs_per_sm)."""
    limits = persistent.SMLimits.of(device)
    compiled._init_handles()
    per_sm = persistent.programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared, limits)
    try:
        by_driver = triton.runtime.driver.active.utils.cuOccupancyMaxActiveClusters(
            compiled.function, compiled.metadata.shared, size)
    except RuntimeError as error:  # e.g. CUDA_ERROR_INVALID_CLUSTER_SIZE
        raise ClusterUnavailable(f"the driver refuses clusters of {size} CTAs of this kernel: {error}") from error
    return min(by_driver, limits.sms * per_sm // size)


def launch(p_in, p_h0, w_hh, p_act, out, h_n, lengths, timeout_s: float = None, **options) -> Plan:
    """Run the whole recurrence in one launch of clusters, as persistent.launch does with groups
    (same tensors and options; meta's BLOCK_N sets the cluster size, cdiv(H, BLOCK_N)). On a GPU:
    the kernel with BARRIER="cluster", launched with cluster dims (size, 1, 1). Under the
    interpreter: the same programs with the counter barrier (BARRIER="counter", bounded by
    timeout_s), which needs every CTA of a cluster at once (tests/concurrent_interpreter.py).
    Raises ClusterUnavailable where the device (or the interpreter) cannot run it; returns the plan."""
    on_gpu = out.device.type == "cuda"
    if on_gpu and torch.cuda.get_device_capability(out.device)[0] < 9:
        raise ClusterUnavailable(f"thread-block clusters need sm_90 or later; {out.device} is "
                                 f"sm_{''.join(map(str, torch.cuda.get_device_capability(out.device)))}")
    if options["meta"].get("COLUMN_BLOCKS", 1) != 1:
        raise ClusterUnavailable("a cluster's CTA holds one slice (COLUMN_BLOCKS = 1)")
    directions, (args, scalars, kwargs) = persistent.launch_inputs(p_in, p_h0, w_hh, p_act, out, h_n, lengths,
                                                                   **options)
    T, B, H = scalars[:3]
    size = size_of(H, kwargs["BLOCK_N"])
    if not on_gpu:
        # CTAs of a cluster wait for each other at the counter barrier: all must run at once.
        chosen = plan(B, H, kwargs["BLOCK_B"], kwargs["BLOCK_N"], persistent.INTERPRETED_RESIDENT_PROGRAMS // size,
                      directions)
        timeout_s = persistent.WAIT_TIMEOUT_S if timeout_s is None else timeout_s
        sync = torch.zeros(directions, chosen.clusters, persistent.SYNC_LINE.value, dtype=torch.int32,
                           device=out.device)
        persistent.rnn_persistent_kernel[chosen.grid](*args, sync, *scalars, chosen.batch_tiles,
                                                      persistent._wait_limit(out.device, timeout_s),
                                                      BARRIER="counter", **kwargs)
        persistent._check_sync_status(sync, chosen, timeout_s)
        return chosen
    kwargs = dict(kwargs, BARRIER="cluster")
    compiled = persistent.rnn_persistent_kernel.warmup(*args, None, *scalars, 1, 1, grid=(1, 1, 1), **kwargs)
    chosen = plan(B, H, kwargs["BLOCK_B"], kwargs["BLOCK_N"], resident_clusters(compiled, size, out.device), directions)
    values = bound_arguments(persistent.rnn_persistent_kernel, (*args, None, *scalars, chosen.batch_tiles, 1),
                             dict(kwargs, HAS_LENGTHS=lengths is not None))
    _launch_clusters(compiled, chosen, values)
    return chosen


def bound_arguments(kernel, args: tuple, kwargs: dict) -> list:
    """Every argument of the @triton.jit function below `kernel` (heuristics included in kwargs),
    in its parameter order, defaults filled in: what Triton's launcher takes after the metadata."""
    fn = kernel
    while not inspect.isfunction(fn):  # below @triton.heuristics and @triton.jit
        fn = fn.fn
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def packed_metadata(compiled, size: int) -> tuple:
    """Triton's launcher metadata (num_warps, num_ctas, shared), num_ctas set to the cluster size: the
    launcher then launches grid x times `size` CTAs in clusters (size, 1, 1) and, at 16, allows the
    non-portable size. The kernel itself is compiled with num_ctas = 1. Refused (ClusterUnavailable)
    on a Triton whose launcher was not checked (kernels/toolchain.py) and for a kernel with global
    scratch, which the launcher sizes by the compiled num_ctas (1), not by the cluster."""
    refusal = toolchain.cluster_launch_refusal()
    if refusal:
        raise ClusterUnavailable(refusal)
    meta = compiled.metadata
    if meta.num_ctas != 1:
        raise ValueError(f"a cluster launch takes a kernel compiled with num_ctas = 1, got {meta.num_ctas}")
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise ClusterUnavailable("the kernel needs global scratch, which Triton's launcher sizes for one CTA a "
                                 "program, not for a cluster")
    return (meta.num_warps, size, meta.shared)


def launch_grid(chosen) -> tuple:
    """The grid Triton's launcher takes for the Plan `chosen`: in clusters along x (it multiplies x by num_ctas = the cluster size), so that its CTAs are chosen.grid, the
    programs the counter form runs."""
    size, groups, directions = chosen.grid
    return (size // chosen.size, groups, directions)


def _launch_clusters(compiled, chosen, values: list) -> None:
    """Launch `compiled` (num_ctas = 1) as the clusters of `chosen` (chosen.grid CTAs, clusters of
    chosen.size along x); values: every kernel argument (bound_arguments)."""
    from triton import knobs
    from triton.runtime import driver
    metadata = packed_metadata(compiled, chosen.size)
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    grid = launch_grid(chosen)
    try:
        compiled.run(*grid, stream, compiled.function, metadata, compiled.launch_metadata(grid, stream, *values),
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)
    except RuntimeError as error:  # cuLaunchKernelEx's refusal, e.g. CUDA_ERROR_CLUSTER_OUT_OF_RESOURCES
        raise ClusterUnavailable(f"the driver refused {grid[1]} x {grid[2]} clusters of {chosen.size} CTAs: "
                                 f"{error}") from error


def probe_barrier(barrier_kind: str, steps: int, size: int = MAX_SIZE, groups: int = 1,
                  device: torch.device = None) -> torch.Tensor:
    """Launch barrier_probe_kernel: `groups` groups of `size` programs (one CTA each, 4 warps) taking
    `steps` empty steps at the barrier `barrier_kind` ("cluster": each group one cluster, GPU only;
    "counter": a cooperative launch). Returns each group's arrival counter (the counter form's:
    steps x size; 0 in the cluster form). Time it with CUDA events, at two step counts to cancel the
    launch: calibration."""
    device = device or torch.device("cuda")
    on_gpu = device.type == "cuda"
    wait_limit = persistent._wait_limit(device, persistent.WAIT_TIMEOUT_S)
    sync = torch.zeros(groups, persistent.SYNC_LINE.value, dtype=torch.int32, device=device)
    if barrier_kind == "counter":
        cooperative = {"launch_cooperative_grid": True} if on_gpu else {}
        barrier_probe_kernel[(size, groups)](sync, steps, wait_limit, BARRIER="counter", TIMER=on_gpu, num_warps=4,
                                             **cooperative)
        return sync[:, persistent.COUNTER.value]
    if not on_gpu or torch.cuda.get_device_capability(device)[0] < 9:
        raise ClusterUnavailable(f"the cluster barrier runs on sm_90 or later GPUs only, not on {device}")
    compiled = barrier_probe_kernel.warmup(None, steps, wait_limit, BARRIER="cluster", TIMER=True, num_warps=4,
                                           grid=(1,))
    groups_of_size = Plan(size, groups, batch_tiles=1, resident_clusters=groups)  # the counter form's grid
    _launch_clusters(compiled, groups_of_size, bound_arguments(barrier_probe_kernel, (None, steps, wait_limit),
                                                               {"BARRIER": "cluster", "TIMER": True}))
    return sync[:, persistent.COUNTER.value]


# Offline sm_90 figures for cluster_plan (a model without a GPU; on a GPU, resident_clusters asks
# the driver). H100 SXM and H200: 132 SMs in 8 GPCs; a cluster runs inside one GPC.
SM90_GPCS = 8
SM90_SMS_PER_GPC = 16  # assumed: the fewest SMs an enabled GPC keeps (132 = 8 x 16.5 on average)
# Registers a thread of the default cluster variant (the most of forward and backward, lengths) by
# (dtype, H): offline sm_90 compiles of the rebuilt kernel (perf/NOTES.md v0.5 cluster path; held to
# the compiler by tests/test_static.py). With warps and shared memory they set the CTAs an SM holds.
REGISTERS = {("float32", 256): 192, ("float32", 512): 209, ("bfloat16", 256): 113, ("bfloat16", 512): 140,
             ("bfloat16", 1024): 225, ("float16", 256): 111, ("float16", 512): 140, ("float16", 1024): 225,
             ("float64", 256): 167, ("float64", 512): 254}
ASSUMED_REGISTERS = 255  # a shape not compiled offline: the most a thread may have
# The cluster barrier's cost a step, assumed until the calibration's probe (probe_barrier) measures
# it. There is no published barrier.cluster latency; what it must at least take: the release makes the
# CTA's stores of its columns visible before its arrival counts, so it waits for them to reach L2 (the
# model's dependent L2 latency, costmodel.Hardware.l2_latency_ns: 300 ns); then the handshake, the
# arrival carried to every CTA of the cluster over the GPC's SM-to-SM network and the wait's release
# back, two one-way trips assumed about 200 cycles each (a remote access inside the GPC: of the order
# of an L2 hit) = 200 ns at 1.98 GHz. So L2 latency + handshake = 500 ns (costmodel charges the L2
# latency of its Hardware plus ASSUMED_HANDSHAKE_NS); the counter barrier's assumed figure: 1,000 ns.
ASSUMED_HANDSHAKE_NS = 200
ASSUMED_BARRIER_NS = 300 + ASSUMED_HANDSHAKE_NS


def cluster_plan(batch: int, hidden: int, dtype: torch.dtype, allow_tf32: bool = True, directions: int = 1):
    """The cluster launch of this shape on an H100/H200, without a GPU (for the cost model): None
    where the cluster form does not run it (fits), else a dict shaped like static.persistent_fit's
    rows ("config"; "plan" with programs_per_group = the cluster size, groups = clusters,
    batch_tiles) plus cluster_dims, portable (size <= 8), resident_clusters (assumed GPCs, see
    above; CTAs an SM holds from REGISTERS, warps and shared memory), the modelled shared memory of a
    CTA and the assumed barrier cost (barrier_ns)."""
    config = default_config(batch, hidden, dtype)
    if not fits(hidden, dtype, allow_tf32, config):
        return None
    size = size_of(hidden, config.kwargs["BLOCK_N"])
    shared = configs.shared_memory_bytes("persistent", config, hidden, dtype, allow_tf32)
    registers = REGISTERS.get((str(dtype).removeprefix("torch."), hidden), ASSUMED_REGISTERS)
    per_sm = persistent.programs_per_sm(registers, config.num_warps, shared)
    resident = SM90_GPCS * (SM90_SMS_PER_GPC * per_sm // size)
    chosen = plan(batch, hidden, config.kwargs["BLOCK_B"], config.kwargs["BLOCK_N"], resident, directions)
    return {"path": "cluster", "dtype": str(dtype).removeprefix("torch."), "batch": batch, "hidden": hidden,
            "config": configs.config_to_dict(config), "cluster_dims": list(chosen.cluster_dims),
            "portable": size <= PORTABLE_SIZE, "resident_clusters": resident, "shared_bytes": shared,
            "registers": registers, "barrier_ns": ASSUMED_BARRIER_NS,
            "plan": {"programs_per_group": size, "groups": chosen.clusters, "batch_tiles": chosen.batch_tiles,
                     "resident_capacity": resident * size, "directions": directions}}
