"""Launch configurations of the RNN kernels: defaults, tuning spaces, and shipped tuned configs.

Dimensions: B batch, H hidden. Everything a launch may vary is declared here once:
- the layouts: "sequence" (rnn_sequence_kernel, W_hh held on chip), "persistent"
  (rnn_persistent_kernel, W_hh in column slices over programs that stay resident), "cluster" (the
  persistent kernel, each group one thread-block cluster: its configs are the persistent kernel's),
  "streamed" (the persistent kernel with nothing held: each step reads its slice and the state from
  L2 in STREAM_K-row chunks; one launch where a slice does not fit on chip) and "stepwise"
  (rnn_step_kernel, one launch per step);
- the size rules: up to which H each layout runs and is weighed (layout_allowed, default_layout),
  and the shared-memory budget every launch must fit (layout_fits, config_fits: what a layout can
  run; they prune the tuning spaces);
- the default config of each layout (used under the interpreter, and as the baseline a tuned
  config must beat);
- the tuning space of each layout (searched by `tritonrnn tune`, and by Triton's autotuner at run
  time on a GPU with no shipped config, keyed by H and the batch bucket, never by T);
- the tuned configs shipped per GPU in kernels/tuned/<GPU>.json (written by `tritonrnn tune`).
"""
import functools
import json
import os
import re
from pathlib import Path

import torch
import triton

from . import occupancy

# Largest H at which the sequence layout is the default: W_hh is held across the loop by each
# program, in shared memory (Triton hoists its copy there) and in registers (its dot-operand
# fragments); these are the sizes that compile spill-free on sm_90 (docs/DESIGN.md D6).
SEQUENCE_MAX_H = {8: 64, 4: 128, 2: 128}
# Up to where the cost model (tritonrnn.costmodel) also weighs the sequence layout: all of a 16-bit
# W_hh at H = 256 (128 KB) fits one program's shared memory, and its 4-warp default (BLOCK_B 16)
# compiles spill-free forward and backward on sm_90 (kernels/offline/sm_90.json).
SEQUENCE_CANDIDATE_MAX_H = {2: 256}

# Largest H of the persistent layout, by element size: W_hh split over programs of 32 to 64 columns
# (a slice of up to 128 KB each, on chip), every one resident on an SM of an H100/H200. fp32 stops at
# 1024: at 2048 a 32-column slice is 256 KB (over 227 KB) and 16 columns leave a 16-row MMA tile
# whose staged operands spill kilobytes (docs/DESIGN.md D8). fp64 runs only in tests (gradcheck),
# where its slices must stay small. Exact fp32 (TF32 off) multiplies in 3xTF32: its three chained
# dots make Triton lay every warp along M and spill hundreds of bytes at every slice width (v0.5), so
# it takes the stepwise layout by default (an explicit layout="persistent" still runs it).
PERSISTENT_MAX_H = {8: 512, 4: 1024, 2: 2048}
PERSISTENT_EXACT_FP32_MAX_H = 0
# From where the cost model weighs the streamed layout: below, a held slice fits on chip (the persistent and
# cluster layouts), and streaming it from L2 every step only adds L2 traffic. It runs any H a resident group
# holds (kernels.occupancy.plan); exact fp32 (3xTF32) nowhere, as the persistent layout (D8).
STREAMED_MIN_H = 1024

# Dynamic shared memory one program may use on sm_90 (H100, H200): the opt-in maximum
# (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, 227 KB). Above it a kernel compiles but
# fails to load (OutOfResources), which the interpreter never checks: every launch is held to it.
SHARED_MEMORY_BUDGET = 232_448

# tl.dot on a GPU needs every dimension >= 16, so batch tiles are padded up to it.
MIN_DOT = 16
LAYOUTS = ("sequence", "persistent", "cluster", "streamed", "stepwise")
# The layouts whose groups of programs meet at a barrier every step (the persistent kernel): both
# directions of a layer run in one launch there.
GROUPED = ("persistent", "cluster", "streamed")
# The grouped layouts whose groups meet at the counter barrier: a cooperative launch within the compiled
# kernel's resident capacity (kernels.launch.persistent_plan).
COUNTER_GROUPED = ("persistent", "streamed")
# The layouts with a tuning space of their own (the cluster's CTA is a persistent program).
TUNED_LAYOUTS = ("sequence", "persistent", "streamed", "stepwise")
# The layouts Triton's autotuner may launch (the persistent kernel's grid depends on its compiled resources).
AUTOTUNED = ("sequence", "stepwise")
TUNED_DIR = Path(__file__).parent / "tuned"


def kernel_layout(layout: str) -> str:
    """The layout whose kernel and configs `layout` launches: a cluster's CTA is a persistent program."""
    return "persistent" if layout == "cluster" else layout


def max_hidden(layout: str, dtype: torch.dtype, allow_tf32: bool = True, weighed: bool = False) -> float:
    """The largest H `layout` takes by default (`weighed`: the largest the cost model weighs it at).
    sequence: SEQUENCE_MAX_H (weighed: SEQUENCE_CANDIDATE_MAX_H too); persistent and cluster:
    PERSISTENT_MAX_H, exact fp32 (TF32 off) PERSISTENT_EXACT_FP32_MAX_H; streamed: any (the plan checks
    that a group is resident) but exact fp32; stepwise: any."""
    if layout == "sequence":
        limit = SEQUENCE_MAX_H[dtype.itemsize]
        return max(limit, SEQUENCE_CANDIDATE_MAX_H.get(dtype.itemsize, 0)) if weighed else limit
    exact_fp32 = dtype == torch.float32 and not allow_tf32
    if layout == "streamed":
        return PERSISTENT_EXACT_FP32_MAX_H if exact_fp32 else float("inf")
    if layout in GROUPED:
        return PERSISTENT_EXACT_FP32_MAX_H if exact_fp32 else PERSISTENT_MAX_H[dtype.itemsize]
    return float("inf")


def default_layout(hidden_size: int, dtype: torch.dtype, allow_tf32: bool = True) -> str:
    """The layout of a multi-step recurrence by size alone (the baseline `tritonrnn tune` measures;
    the layers ask the cost model, tritonrnn.dispatch): "sequence" where one program holds W_hh on
    chip without spilling for this size and dtype, else "persistent" (W_hh split over resident
    programs) up to its limit, else "stepwise"."""
    for layout in ("sequence", "persistent"):
        if hidden_size <= max_hidden(layout, dtype, allow_tf32):
            return layout
    return "stepwise"


def layout_allowed(layout: str, hidden: int, dtype: torch.dtype, allow_tf32: bool = True) -> bool:
    """Whether the cost model weighs `layout` at this H and dtype: within its size limit (max_hidden,
    weighed), the streamed layout from STREAMED_MIN_H, and, for the sequence layout, with its default
    tile in shared memory."""
    if hidden > max_hidden(layout, dtype, allow_tf32, weighed=True):
        return False
    if layout == "streamed" and hidden < STREAMED_MIN_H:
        return False
    return layout != "sequence" or layout_fits("sequence", hidden, dtype, allow_tf32)


def batch_bucket(batch: int) -> int:
    """The batch size rounded up to a power of two: configs are chosen per bucket, not per B."""
    return triton.next_power_of_2(max(batch, 1))


def block_h(hidden: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(hidden))


def shared_memory_budget(device: torch.device = None) -> int:
    """Dynamic shared memory a program may use: the CUDA device's opt-in maximum, else sm_90's
    (the interpreter holds launches to the GPU the kernels are written for)."""
    if device is not None and device.type == "cuda":
        return _device_shared_memory(device.index if device.index is not None else torch.cuda.current_device())
    return SHARED_MEMORY_BUDGET


@functools.lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def shared_memory_bytes(layout: str, config: triton.Config, hidden: int, dtype: torch.dtype, allow_tf32: bool) -> int:
    """The dynamic shared memory a launch of `layout` with `config` needs (an upper bound).

    Triton stages tl.dot operands through shared memory. Fitted to `compiled.metadata.shared` of
    offline sm_90 compiles (docs/DESIGN.md D5; tests/perf/test_static.py holds every default and
    edge variant to it under each Triton release), with e the element size of the dot operands and a
    that of the accumulator:
    - sequence: all of W_hh [BLOCK_H, BLOCK_H], hoisted out of the loop, twice in 3xTF32 (high and
      low parts), plus the state tile [BLOCK_B, BLOCK_H] up to twice:
      e * BLOCK_H * (w * BLOCK_H + 2 * BLOCK_B), w = 2 in 3xTF32 else 1.
    - persistent (and cluster): the transposed W_hh slice [BLOCK_N, BLOCK_H], hoisted (twice in
      3xTF32), the state tile [BLOCK_H, BLOCK_B] (whole, in K_SPLIT parts too) and the accumulator's
      layout change [BLOCK_N, BLOCK_B]: e * BLOCK_H * w * (BLOCK_N + BLOCK_B) + a * BLOCK_B * BLOCK_N.
    - stepwise: num_stages pipelined copies of both operand tiles, in 3xTF32 one more of the
      batch tile: e * BLOCK_K * (num_stages * (BLOCK_B + BLOCK_N) + BLOCK_B if 3xTF32).
    - streamed: as stepwise, its chunks STREAM_K rows of K (the mma.sync variants take num_stages - 1
      copies, the wgmma ones num_stages).
    """
    kwargs = config.kwargs
    tf32x3 = dtype == torch.float32 and not allow_tf32
    layout = kernel_layout(layout)
    if layout == "sequence":
        width = block_h(hidden)
        return dtype.itemsize * width * ((2 if tf32x3 else 1) * width + 2 * kwargs["BLOCK_B"])
    if layout == "persistent":
        acc_bytes = 8 if dtype == torch.float64 else 4
        width, block_n, block_b = block_h(hidden), kwargs["BLOCK_N"], kwargs["BLOCK_B"]
        return dtype.itemsize * width * (2 if tf32x3 else 1) * (block_n + block_b) + acc_bytes * block_b * block_n
    stages = max(config.num_stages, 1)
    chunk = kwargs["STREAM_K"] if layout == "streamed" else kwargs["BLOCK_K"]
    tiles = stages * (kwargs["BLOCK_B"] + kwargs["BLOCK_N"]) + (kwargs["BLOCK_B"] if tf32x3 else 0)
    return dtype.itemsize * chunk * tiles


# Without a dtype, a config must fit for every dtype and precision: fp64 and fp32 in 3xTF32 need the most.
_DEMANDING = ((torch.float64, False), (torch.float32, False))


def config_fits(layout: str, config: triton.Config, hidden: int, dtype: torch.dtype = None, allow_tf32: bool = False,
                budget: int = SHARED_MEMORY_BUDGET) -> bool:
    """Whether a launch of `layout` with `config` loads: its shared memory within `budget`."""
    numerics = [(dtype, allow_tf32)] if dtype is not None else _DEMANDING
    return all(shared_memory_bytes(layout, config, hidden, d, tf32) <= budget for d, tf32 in numerics)


def layout_fits(layout: str, hidden: int, dtype: torch.dtype = None, allow_tf32: bool = False,
                config: triton.Config = None, budget: int = SHARED_MEMORY_BUDGET) -> bool:
    """Whether `layout` can run this hidden size at all: the stepwise layout runs any; the others need
    their tile (`config`, else the default) to fit in shared memory (the sequence layout's W_hh: fp32
    and fp64 to H = 128, fp16 and bf16 to H = 256 on sm_90), and the persistent kernel H <= 2048
    (beyond, its 16-column programs outnumber the SMs). A cluster also needs a cluster size a launch
    may ask for (occupancy.CLUSTER_SIZES), and runs exact fp32 (3xTF32) only up to
    PERSISTENT_EXACT_FP32_MAX_H (nowhere: it spills at every slice width)."""
    if layout == "stepwise":
        return True
    if layout in ("persistent", "cluster") and hidden > max(PERSISTENT_MAX_H.values()):
        return False
    config = config or default_config(layout, 1, hidden, dtype)
    if layout == "cluster":
        if occupancy.cluster_size(hidden, config.kwargs["BLOCK_N"]) not in occupancy.CLUSTER_SIZES:
            return False
        if dtype == torch.float32 and not allow_tf32 and hidden > PERSISTENT_EXACT_FP32_MAX_H:
            return False
    return config_fits(layout, config, hidden, dtype, allow_tf32, budget)


def _persistent_default(hidden: int, dtype: torch.dtype = None) -> triton.Config:
    """64 columns a program (the MMA's M side: wgmma m64nN on sm_90, one warpgroup per 64 rows) where
    the transposed slice [64, BLOCK_H] takes at most 128 KB (8 warps from BLOCK_H = 512: [4, 2]
    warpgroups over the 16-row batch tile, no spills); else 32 columns, K in 4 parts over 4 warps
    (mma.sync m16n8, warps [4, 1, 1]: each warp its own part, 4 independent accumulator chains of
    BLOCK_H / 4). `dtype` None: a config every dtype can load (fp64's 8-byte elements, 3xTF32's two
    copies)."""
    width = block_h(hidden)
    element = 8 if dtype is None else dtype.itemsize
    wide = 64 * width * element <= 128 * 1024
    return triton.Config({"BLOCK_B": MIN_DOT, "BLOCK_N": 64 if wide else 32, "K_SPLIT": 1 if wide else 4},
                         num_warps=8 if wide and width >= 512 else 4, num_stages=1)


def _streamed_default(batch: int, dtype: torch.dtype = None) -> triton.Config:
    """32 columns a program (a group's L2 traffic a step is its slices plus programs x state: fewer programs
    re-read the state less), the batch tile growing with the batch to 64 rows (each tile re-reads the
    slice), chunks of K pipelined over 3 stages, 128 bytes of a state row each (32 fp32 or 64 16-bit
    elements): the pipeliner then copies the state in 16-byte cp.async.cg, which bypasses L1 (narrower
    copies are .ca, which may read a stale line of the state other programs wrote; tests/perf/test_static.py
    reads the PTX), and fp32 stays spill-free. `dtype` None: fp64's (tests)."""
    element = 8 if dtype is None else dtype.itemsize
    return triton.Config({"BLOCK_B": min(max(MIN_DOT, batch_bucket(batch)), 64), "BLOCK_N": 32, "K_SPLIT": 1,
                          "STREAM_K": max(MIN_DOT, 128 // element)}, num_warps=4, num_stages=3)


def default_config(layout: str, batch: int, hidden: int, dtype: torch.dtype = None) -> triton.Config:
    """The untuned launch config of `layout` (`dtype`: the persistent layout's slice width depends on it;
    None gives one that loads for every dtype).

    Chosen so that no variant spills registers on sm_90 (checked offline by tests/perf/test_static.py):
    the sequence layout holds W_hh on chip, so its batch tile shrinks as H grows.
    """
    bb = max(MIN_DOT, batch_bucket(batch))
    layout = kernel_layout(layout)
    if layout == "sequence":
        # At H = 256 (16-bit) 8 warps spill 8 B; 4 hold the 16-row tile in 168 registers. At H = 128, 8:
        # with 4, exact fp32 (3xTF32) spills 24-48 B; with 8, only the TF32 forward without lengths spills
        # 8 B (since the next step's input is prefetched; the cost model takes 4 warps there on a GPU).
        return triton.Config({"BLOCK_B": min(bb, 16 if block_h(hidden) >= 128 else 32)},
                             num_warps=8 if 64 <= block_h(hidden) <= 128 else 4, num_stages=1)
    if layout == "persistent":
        return _persistent_default(hidden, dtype)
    if layout == "streamed":
        return _streamed_default(batch, dtype)
    block_n = min(64, block_h(hidden))
    return triton.Config({"BLOCK_B": min(bb, 64), "BLOCK_N": block_n, "BLOCK_K": min(block_n, 32)}, num_warps=8,
                         num_stages=3)


def tuning_space(layout: str, batch: int, hidden: int, dtype: torch.dtype = None, allow_tf32: bool = False,
                 budget: int = SHARED_MEMORY_BUDGET) -> list:
    """Every config worth trying for this shape that loads within the shared-memory budget (for
    every dtype and precision when `dtype` is None); tiles never exceed the (padded) batch and
    hidden. Where none does, the default config alone: whether the layout runs this shape at all is
    layout_fits's answer."""
    max_bb = max(MIN_DOT, batch_bucket(batch))
    max_n = max(32, block_h(hidden))
    layout = kernel_layout(layout)
    if layout == "sequence":
        space = [triton.Config({"BLOCK_B": bb}, num_warps=w, num_stages=1)
                 for bb in (16, 32, 64) if bb <= max_bb and bb * block_h(hidden) <= 64 * 128
                 for w in (4, 8, 16)]
    elif layout == "streamed":
        space = [triton.Config({"BLOCK_B": bb, "BLOCK_N": bn, "K_SPLIT": 1, "STREAM_K": sk}, num_warps=w, num_stages=3)
                 for bb in (16, 32, 64) if bb <= max_bb
                 for bn in (32, 64) if bn <= max_n
                 for sk in (32, 64)
                 for w in (4, 8)]
    elif layout == "persistent":
        space = [triton.Config({"BLOCK_B": bb, "BLOCK_N": bn, "K_SPLIT": ks}, num_warps=w, num_stages=1)
                 for bb in (16, 32, 64) if bb <= max_bb
                 for bn in (32, 64, 128) if bn <= max_n
                 for w in (4, 8)
                 # K parts: one warp each (more warps than parts repeat work), parts of >= 64 rows
                 for ks in (1, w) if block_h(hidden) >= 64 * ks]
    else:
        space = [triton.Config({"BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3)
                 for bb in (16, 64, 128) if bb <= max_bb
                 for bn in (32, 64, 128) if bn <= max_n
                 for bk in (32, 64) if bk <= max_n
                 for w in (4, 8)]
    space = [c for c in space if config_fits(layout, c, hidden, dtype, allow_tf32, budget)]
    return space or [default_config(layout, batch, hidden)]


def prune_space(layout: str):
    """early_config_prune for Triton's autotuner: the space for the actual B, H, dtype, precision
    and device."""
    def prune(configs, named_args, **kwargs):
        named_args = {**named_args, **kwargs}  # the launchers pass every argument by name
        tensor = named_args.get("p_in")  # absent: fit every dtype and precision on sm_90
        dtype, device = (tensor.dtype, tensor.device) if tensor is not None else (None, None)
        space = tuning_space(layout, named_args["B"], named_args["H"], dtype,
                             named_args.get("INPUT_PRECISION") == "tf32", shared_memory_budget(device))
        allowed = {_config_key(c) for c in space}
        return [c for c in configs if _config_key(c) in allowed] or configs[:1]
    return prune


def full_space(layout: str) -> list:
    """The union of the spaces over all shapes, before the shared-memory budget (what the autotuner
    is built with; prune_space applies the budget of each launch's dtype, precision and device)."""
    seen, space = set(), []
    for batch in (1, 1 << 20):
        for hidden in (16, 1 << 20):
            for c in tuning_space(layout, batch, hidden, budget=float("inf")):
                if _config_key(c) not in seen:
                    seen.add(_config_key(c))
                    space.append(c)
    return space


def _config_key(config: triton.Config) -> tuple:
    return tuple(sorted(config.kwargs.items())) + (config.num_warps, config.num_stages)


def config_to_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_from_dict(values: dict) -> triton.Config:
    values = dict(values)
    return triton.Config(values, num_warps=values.pop("num_warps"), num_stages=values.pop("num_stages"))


def gpu_slug(name: str) -> str:
    """The tuned-file name of a GPU: 'NVIDIA H100 80GB HBM3' -> 'H100', else the sanitised name."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return match.group(1) if match else re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the tables, the cost model and the JSON files name it: 'float32', 'bfloat16', ..."""
    return str(dtype).removeprefix("torch.")


def tuned_key(dtype: torch.dtype, hidden: int, batch: int, direction: str) -> str:
    return f"{dtype_name(dtype)}/H{hidden}/B{batch_bucket(batch)}/{direction}"


@functools.lru_cache(maxsize=None)
def _tuned_table(slug: str) -> dict:
    path = TUNED_DIR / f"{slug}.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())["entries"]


def tuned(dtype: torch.dtype, hidden: int, batch: int, direction: str, device: torch.device):
    """The shipped tuned choice (layout, triton.Config) for this shape on this GPU, or None."""
    if device.type != "cuda" or os.environ.get("TRITONRNN_TUNED", "1") == "0":
        return None
    entry = _tuned_table(gpu_slug(torch.cuda.get_device_name(device))).get(
        tuned_key(dtype, hidden, batch, direction))
    if entry is None:
        return None
    return entry["path"], config_from_dict(entry["config"])  # the file names the layout "path"


def autotunes(layout: str, device: torch.device) -> bool:
    """Whether an untuned launch of `layout` goes through Triton's autotuner: on a GPU, where enabled,
    and where the layout has one (AUTOTUNED)."""
    return device.type == "cuda" and autotune_enabled() and layout in AUTOTUNED


def autotune_enabled() -> bool:
    """Triton's autotuner runs where no tuned config ships (TRITONRNN_AUTOTUNE=0 turns it off)."""
    return os.environ.get("TRITONRNN_AUTOTUNE", "1") != "0"
