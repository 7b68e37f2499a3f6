"""What a GPU holds at once, and the one plan of a launch whose programs wait for each other.

Dimensions: B batch, H hidden. The persistent kernel (kernels/persistent.py) splits W_hh by columns
over the programs of a group, which meet at a barrier every step, so every program of a group must
be resident at once. This module answers how many are: the driver's figures for a compiled kernel
(cuOccupancyMaxActiveBlocksPerMultiprocessor, cuOccupancyMaxActiveClusters), the hand model of an
SM (programs_per_sm: offline plans, the cost model) and the interpreter's one program at a time;
and it plans a launch within that capacity (`plan`, one `Plan` for both barriers: a group of
programs meeting at counters in global memory, or one thread-block cluster at its hardware barrier).
"""
import ctypes
import dataclasses
import functools
import math

import torch
import triton


class LaunchRefused(ValueError):
    """The persistent launch cannot run here: the device cannot hold every program of a group, or the
    driver refused the cooperative launch. The op level takes the next layout."""


class ClusterUnavailable(ValueError):
    """This cluster launch cannot run here: a cluster size Hopper or Triton's launcher does not
    allow, a device that holds no cluster of this kernel (its CTAs do not fit in one GPC), a device
    before sm_90, a launch the driver refused, or the plain interpreter (one program at a time).
    The op level takes the next layout."""


class BarrierTimeout(RuntimeError):
    """A group of the persistent kernel waited past the limit at a step barrier; its outputs are NaN."""


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """What one streaming multiprocessor holds at once (defaults: sm_90, H100/H200)."""

    registers: int = 65536
    threads: int = 2048
    shared_bytes: int = 233472  # 228 KB, of which each resident program reserves RESERVED_SHARED
    programs: int = 32
    sms: int = 132

    RESERVED_SHARED = 1024  # the driver's shared memory per resident program (sm_80+)
    REGISTER_UNIT = 256  # registers are allocated per warp in units of 256

    @classmethod
    def of(cls, device: torch.device) -> "SMLimits":
        p = torch.cuda.get_device_properties(device)
        # Older torch builds lack regs_per_multiprocessor: 64 K registers an SM since sm_50.
        return cls(registers=getattr(p, "regs_per_multiprocessor", cls.registers),
                   threads=p.max_threads_per_multi_processor, shared_bytes=p.shared_memory_per_multiprocessor,
                   sms=p.multi_processor_count)


def programs_per_sm(registers: int, num_warps: int, shared_bytes: int, limits: SMLimits = SMLimits()) -> int:
    """How many programs of a compiled kernel (registers per thread, warps, dynamic shared memory)
    one SM holds at once: the tightest of its register file, threads, shared memory and slots."""
    warp_registers = math.ceil(max(registers, 1) * 32 / limits.REGISTER_UNIT) * limits.REGISTER_UNIT
    by_registers = limits.registers // warp_registers // num_warps
    by_threads = limits.threads // (32 * num_warps)
    by_shared = limits.shared_bytes // (shared_bytes + limits.RESERVED_SHARED)
    return min(by_registers, by_threads, by_shared, limits.programs)


# Without a GPU, Triton's interpreter runs the programs of a launch one after another: only one is
# ever resident. tests/concurrent_interpreter.py runs them all at once and raises this.
INTERPRETED_RESIDENT_PROGRAMS = 1
# The interpreter's largest tensor (triton.language.TRITON_MAX_TENSOR_NUMEL): a single program's
# [BLOCK_N, BLOCK_H] slice must stay below it, so from H = 1025 it serves its columns in blocks.
INTERPRETED_MAX_NUMEL = 1 << 20

# Cluster sizes a launch may ask for: up to 8 CTAs is portable; 16 is Hopper's non-portable
# maximum, which Triton's launcher allows only at exactly 16 (CU_FUNC_ATTRIBUTE_NON_PORTABLE_...).
CLUSTER_SIZES = (2, 3, 4, 5, 6, 7, 8, 16)
MAX_CLUSTER_SIZE = 16
PORTABLE_CLUSTER_SIZE = 8
# Offline sm_90 figures (a model without a GPU; on a GPU, resident_clusters asks the driver). H100 SXM
# and H200: 132 SMs in 8 GPCs; a cluster runs inside one GPC.
SM90_GPCS = 8
SM90_SMS_PER_GPC = 16  # assumed: the fewest SMs an enabled GPC keeps (132 = 8 x 16.5 on average)


def cluster_size(hidden: int, block_n: int) -> int:
    """CTAs a cluster: programs of BLOCK_N columns that cover H."""
    return triton.cdiv(hidden, block_n)


def offline_resident_clusters(per_sm: int, size: int) -> int:
    """Clusters of `size` CTAs an sm_90 GPU holds at once, counted per GPC (a cluster runs inside one),
    from the CTAs an SM holds: the assumed GPCs above."""
    return SM90_GPCS * (SM90_SMS_PER_GPC * per_sm // size)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a launch tiles the problem: per direction, `groups` groups of `programs_per_group`
    programs (one per BLOCK_N columns), each group serving `batch_tiles` tiles of BLOCK_B rows;
    `resident_capacity` programs fit on the device at once. `cluster`: each group is one
    thread-block cluster (its CTAs meet at the hardware barrier) instead of programs meeting at
    counters in global memory."""

    programs_per_group: int
    groups: int
    batch_tiles: int
    resident_capacity: int
    directions: int = 1
    cluster: bool = False
    # On a GPU: the hand model's capacity (modelled_capacity) beside the driver's, for the GPU tests.
    modelled_capacity: int = dataclasses.field(default=None, compare=False)

    @property
    def grid(self) -> tuple:
        """Programs along x, y, z: x the rank in the group (the cluster), y the group, z the direction."""
        return (self.programs_per_group, self.groups, self.directions)

    @property
    def programs(self) -> int:
        return self.programs_per_group * self.groups * self.directions

    @property
    def cluster_dims(self) -> tuple:
        return (self.programs_per_group, 1, 1)

    @property
    def resident_clusters(self) -> int:
        return self.resident_capacity // self.programs_per_group

    @property
    def waits(self) -> bool:
        """Whether programs wait for each other: then all of a group must be resident at once (a
        cooperative launch, or a cluster); programs alone in their group never wait."""
        return self.cluster or self.programs_per_group > 1


def plan(batch: int, hidden: int, block_b: int, block_n: int, capacity: int, directions: int = 1,
         cluster: bool = False) -> Plan:
    """The most groups (batch parallelism) whose programs all fit in `capacity` resident programs at
    once; more batch tiles per group where they do not. Counter groups of one program wait for no one:
    one per batch tile. Clusters never wait for each other, so a launch of more clusters than fit would
    still finish (in waves); the plan does not ask for it. Raises LaunchRefused (ClusterUnavailable)
    where the device cannot hold one group (cluster)."""
    per_group = triton.cdiv(hidden, block_n)
    tiles = triton.cdiv(batch, block_b)
    if cluster:
        if per_group not in CLUSTER_SIZES:
            raise ClusterUnavailable(f"a cluster of {per_group} CTAs (H = {hidden}, BLOCK_N = {block_n}): Triton "
                                     f"launches clusters of 2-{PORTABLE_CLUSTER_SIZE} or {MAX_CLUSTER_SIZE} CTAs")
        if capacity < per_group:
            raise ClusterUnavailable(f"the device holds no cluster of {per_group} CTAs of this kernel at once")
        groups_at_once = max(1, capacity // per_group // directions)
    else:
        if per_group == 1:
            return Plan(1, tiles, 1, capacity, directions)
        if per_group * directions > capacity:
            raise LaunchRefused(f"the persistent layout needs {per_group} resident programs per group (H = {hidden}, "
                                f"BLOCK_N = {block_n}) in each of {directions} direction(s), but the device holds "
                                f"{capacity} of this kernel at once")
        groups_at_once = capacity // (per_group * directions)
    batch_tiles = triton.cdiv(tiles, min(tiles, groups_at_once))
    return Plan(per_group, triton.cdiv(tiles, batch_tiles), batch_tiles, capacity, directions, cluster)


def modelled_capacity(compiled, device: torch.device) -> int:
    """The hand model's resident programs of this compiled kernel (programs_per_sm over the SMs): what
    offline plans use; the GPU tests hold it against the driver's answer."""
    limits = SMLimits.of(device)
    compiled._init_handles()  # loads the binary: n_regs is known from here
    return limits.sms * programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                                        limits)


@functools.lru_cache(maxsize=None)
def libcuda():
    return ctypes.CDLL("libcuda.so.1")


def resident_capacity(compiled, device: torch.device) -> int:
    """Programs of this compiled kernel that the CUDA device runs at once (all of them must be), from
    the driver: cuOccupancyMaxActiveBlocksPerMultiprocessor on the loaded kernel (its registers,
    warps and dynamic shared memory, and the driver's own reservations) times the SMs."""
    compiled._init_handles()  # loads the binary: compiled.function is the CUfunction from here
    per_sm = ctypes.c_int()
    error = libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(per_sm), ctypes.c_void_p(compiled.function), ctypes.c_int(32 * compiled.metadata.num_warps),
        ctypes.c_size_t(compiled.metadata.shared))
    if error != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed with CUresult {error}")
    return per_sm.value * torch.cuda.get_device_properties(device).multi_processor_count


def resident_clusters(compiled, size: int, device: torch.device) -> int:
    """Clusters of `size` CTAs of this compiled kernel that the device runs at once: the driver's
    cuOccupancyMaxActiveClusters (which knows the GPCs a cluster must fit in, but assumes 128 threads
    a CTA), held to what the SMs' registers, threads and shared memory allow (programs_per_sm)."""
    limits = SMLimits.of(device)
    compiled._init_handles()
    per_sm = programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared, limits)
    try:
        by_driver = triton.runtime.driver.active.utils.cuOccupancyMaxActiveClusters(
            compiled.function, compiled.metadata.shared, size)
    except RuntimeError as error:  # e.g. CUDA_ERROR_INVALID_CLUSTER_SIZE
        raise ClusterUnavailable(f"the driver refuses clusters of {size} CTAs of this kernel: {error}") from error
    return min(by_driver, limits.sms * per_sm // size)
