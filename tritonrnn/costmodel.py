"""The cost model the dispatcher runs: the predicted step time of every layout that fits a shape.

Dimensions: T steps, B batch, H hidden; e the element size. A layout is one way to run the
recurrence of one layer and direction:

- "sequence": one program per batch tile of BLOCK_B rows holds all of W_hh on chip; no barrier.
- "persistent": program (n, g) holds the W_hh columns n*BLOCK_N ... (a slice [BLOCK_N, BLOCK_H] in
  shared memory) as the MMA's M side, the batch tile (BLOCK_B rows) is its N side: wgmma from 64
  columns, else mma.sync with K in K_SPLIT (= warps) independent chains; a group is H / BLOCK_N
  programs, each reading the group's whole state^T [BLOCK_H, BLOCK_B] from L2 every step; after
  every step they meet at a counter barrier. Groups = batch tiles until the resident capacity
  (kernels.occupancy.plan) runs out.
- "cluster": the persistent kernel's cluster form (kernels/launch.py): a group is one Hopper
  thread-block cluster of H / BLOCK_N CTAs (2-8, or 16), meeting at the hardware cluster barrier
  instead of the counter barrier; the state still goes through L2; no cooperative launch (clusters
  are gang-scheduled and never wait for each other).
- "streamed": the persistent kernel with nothing held (STREAM_K): every step each program reads its
  W slice and its group's state from L2 in K chunks, pipelined; counter groups as "persistent". For
  the H whose slice does not fit on chip (fp32 H = 2048): one launch instead of a launch a step.
- "stepwise": one launch of rnn_step_kernel per step.

Per step, from the compiled kernel's resources (registers, warps, shared memory, the matmul
instruction) and the constants of `Hardware` (CONSTANTS: each with a baseline, a pessimistic value and its
source; `Hardware.pessimistic()` the set that moves every one against us, plan_cell predicts under both;
a calibration file measured on the GPU replaces them in both, kernels/calibration/<GPU>.json):

    sequence   = waves * (shared(W + state staging) + max(mma, chain) + epilogue
                          + the input's latency beyond them: it is loaded one step ahead)
    persistent = barrier + tiles * (dependent L2 latency of the state + epilogue)
                 + state bytes (re-read by every program of the group) over the SM's L2 share
                 + shared(W slice per tile + state staging) + max(mma, chain / K_SPLIT) + K parts' sum
                 (the next tile's input is loaded before the wait: off the chain)
    cluster    = persistent with the cluster barrier (Hardware.cluster_barrier()) and clusters
                 resident per GPC (kernels.occupancy's assumed sm_90 GPCs)
    streamed   = barrier + tiles * (dependent L2 latency + epilogue)
                 + max(slice and state bytes over the SM's L2 share, shared staging, mma)
                 (the chunks' loads are pipelined under the MMAs: the slowest of the three, not their sum)
    stepwise   = max(host launch, device step)

Resources come from a table of offline sm_90 compiles shipped in the package
(kernels/offline/sm_90.json, written by `python -m tritonrnn.perf.resources --write`, the table's
only source); shapes and GPUs the table lacks get an estimate (shared memory from
kernels.configs.shared_memory_bytes). Nothing here compiles: dispatch checks the chosen persistent
layout against the compiled kernel's capacity on a GPU (tritonrnn.dispatch.choose).

cuDNN's side (`cudnn_algorithm`, `cudnn_step_ns`) follows PyTorch's choice of algorithm (its
cudnn/RNN.cpp, get_algo) and published per-step figures (the sources in `Hardware`; docs/DESIGN.md D18).
"""
import dataclasses
import functools
import json
import math
import os
from pathlib import Path

import torch
import triton

from tritonrnn.kernels import configs
from tritonrnn.kernels import occupancy
from tritonrnn.kernels.persistent import GAVE_UP

LAYOUTS = configs.LAYOUTS
KERNELS_DIR = Path(configs.__file__).resolve().parent
OFFLINE_DIR = KERNELS_DIR / "offline"  # resource tables of offline compiles, one per target
CALIBRATION_DIR = KERNELS_DIR / "calibration"  # measured constants, one file per GPU (slug)
CALIBRATION_SCHEMA = 1
ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
SPILL_FREE = 0  # a candidate must compile without spilling (stack bytes)


# The cluster barrier's cost a step, assumed until the calibration's probe (kernels.launch.probe_barrier)
# measures it. There is no published barrier.cluster latency; what it must at least take: the release makes
# the CTA's stores of its columns visible before its arrival counts, so it waits for them to reach L2 (the
# model's dependent L2 latency, Hardware.l2_latency_ns: 300 ns); then the handshake, the arrival carried to
# every CTA of the cluster over the GPC's SM-to-SM network and the wait's release back, two one-way trips
# assumed about 200 cycles each (a remote access inside the GPC: of the order of an L2 hit) = 200 ns at
# 1.98 GHz. So L2 latency + handshake = 500 ns; the counter barrier's assumed figure: 1,000 ns. The pessimistic
# set (CONSTANTS) doubles the handshake: with its L2 latency of 600 ns, a cluster barrier of 1,000 ns.
ASSUMED_CLUSTER_HANDSHAKE_NS = 200.0
# An A100's boost clock over an H100 SXM5's: a figure measured on an A100 (PR 62143 names no GPU), scaled
# to an H100's clock, is what the pessimistic set takes for cuDNN's small-H step.
A100_TO_H100_CLOCK = 1.41 / 1.98


@dataclasses.dataclass(frozen=True)
class Constant:
    """One constant the model charges: its baseline, its pessimistic value (moved against tritonrnn within
    its published spread; where none is published the source says so) and where both come from. `field`
    is Hardware's field, the values in its unit (ns; `unit` 1e3 where the name says us), `dtypes` the
    entries of a per-dtype field it is; `worse` "higher" or "lower": which way a value moves against us
    (for cuDNN's figures: lower, cuDNN faster). A derived constant (values None) follows from others."""

    field: str
    baseline: float
    pessimistic: float
    worse: str
    source: str
    dtypes: tuple = ()
    unit: float = 1.0


_16BIT = ("bfloat16", "float16")
_NOT_MOVED = "; not moved in the pessimistic set"
# Every constant of Hardware the model charges, by the name the plan's JSON gives it (the names;
# `counter_barrier_ns` is the field barrier_ns, the calibration file's key). The SM limits (occupancy.SMLimits)
# are the chip's, read from the device on a GPU: they decide what fits, not what it costs.
CONSTANTS = {
    "clock_ghz": Constant("clock_ghz", 1.98, 1.98, "lower", "H100 SXM5 boost clock (NVIDIA datasheet)" + _NOT_MOVED
                          + " (no published spread; a sustained clock below boost lengthens every cycle term)"),
    "peak_tflops_16bit": Constant("peak_tflops", 989.0, 989.0, "lower", "dense 16-bit tensor-core peak, H100 SXM5 "
                                  "datasheet (read by both sides: our MMA and cuDNN's GEMM)" + _NOT_MOVED, _16BIT),
    "peak_tflops_tf32": Constant("peak_tflops", 495.0, 495.0, "lower", "dense TF32 tensor-core peak, H100 SXM5 "
                                 "datasheet" + _NOT_MOVED, ("float32",)),
    "peak_tflops_fp64": Constant("peak_tflops", 67.0, 67.0, "lower", "fp64 tensor-core peak, H100 SXM5 datasheet"
                                 + _NOT_MOVED, ("float64",)),
    "wgmma_efficiency": Constant("wgmma_efficiency", 0.7, 0.35, "lower",
                                 "assumed, no source: cuBLAS-class wgmma kernels at these small N; pessimistic "
                                 "halved (an independent review's count: 25-45% of peak at N = 8-16 with the W "
                                 "slice read from shared memory)"),
    "mma_sync_efficiency": Constant("mma_sync_efficiency", 0.5, 0.25, "lower",
                                    "mma.sync at about half of wgmma's peak on Hopper (Luo et al., 2024, "
                                    "\"Benchmarking and Dissecting the Nvidia Hopper GPU Architecture\"); "
                                    "pessimistic halved, as wgmma's"),
    "cudnn_gemm_efficiency": Constant("cudnn_gemm_efficiency", 0.7, 0.7, "higher",
                                      "cuDNN's GEMM work a step (cudnn_step_ns): the wgmma baseline's assumption"
                                      + _NOT_MOVED + " (halving it with ours would speed us up against cuDNN)"),
    "mma_latency_cycles": Constant("mma_latency_cycles", 33.0, 35.0, "higher",
                                   "one dependent mma.sync m16n8k16, ~30-35 cycles (Luo et al., 2024); pessimistic "
                                   "the range's top"),
    "shared_bytes_per_cycle": Constant("shared_bytes_per_cycle", 128.0, 128.0, "lower",
                                       "per SM: 32 banks x 4 B a clock (CUDA C Programming Guide)" + _NOT_MOVED),
    "l2_bytes_per_cycle_per_sm": Constant("l2_bytes_per_cycle_per_sm", 64.0, 64.0, "lower",
                                          "one SM's port to L2, 64 B a clock (NVIDIA Hopper tuning guide)"
                                          + _NOT_MOVED),
    "l2_total_bytes_per_ns": Constant("l2_total_bytes_per_ns", 5500.0, 5500.0, "lower",
                                      "aggregate L2 read bandwidth ~5.5 TB/s (Chips and Cheese, \"Nvidia's H100: "
                                      "Funny L2, and Tons of Bandwidth\", 2023; read by both sides: our stepwise "
                                      "W reads and cuDNN STANDARD's)" + _NOT_MOVED + " (one measurement, no spread)"),
    "l2_latency_ns": Constant("l2_latency_ns", 300.0, 600.0, "higher",
                              "assumed: a dependent load served by L2, ~260 cycles near, more from the far "
                              "partition (Chips and Cheese, 2023), plus a tile's ramp; pessimistic 600 ns (the "
                              "review's bound); calibrated: the state round trip"),
    "counter_barrier_ns": Constant("barrier_ns", 1000.0, 1500.0, "higher",
                                   "assumed: the group barrier's release add, acquire polls through L2 and the last "
                                   "arrival's skew (docs/DESIGN.md D9, D17); pessimistic 1.5 us (the review's "
                                   "bound); calibrated: the empty-step barrier"),
    "cluster_handshake_ns": Constant("cluster_handshake_ns", ASSUMED_CLUSTER_HANDSHAKE_NS, 400.0, "higher",
                                     "assumed, no published figure: the cluster barrier's arrival carried to every "
                                     "CTA over the GPC's SM-to-SM network and the wait's release back, two one-way "
                                     "trips of ~200 cycles (an L2 hit's order); pessimistic doubled"),
    "cluster_barrier_ns": Constant("cluster_barrier_ns", None, None, "higher",
                                   "no published barrier.cluster latency: the L2 latency (the release waits for the "
                                   "CTA's stores to reach L2) plus the handshake, l2_latency_ns + "
                                   "cluster_handshake_ns in either set; calibrated: launch.probe_barrier"),
    "launch_ns": Constant("launch_ns", 8000.0, 10000.0, "higher",
                          "host cost of one Triton launch from Python, 4.5-18 us a call in public reports of Triton "
                          "3.x (a bare CUDA launch ~3 us); pessimistic 10 us (the review's bound); calibrated: "
                          "the fastest stepwise step"),
    "epilogue_ns": Constant("epilogue_ns", 100.0, 200.0, "higher",
                            "no source: assumed (activation, store and loop bookkeeping a step); pessimistic "
                            "doubled, also assumed"),
    "cudnn_small_h_fp32_us": Constant("cudnn_small_h_ns", 780.0, 780.0 * A100_TO_H100_CLOCK, "lower",
                                      "cuDNN's small-H persistent step, PyTorch PR 62143's benchmark (xwang233/"
                                      "code-snippet, Elman tanh I = H = 120, B = 34, no GPU named); pessimistic: "
                                      "scaled by an A100-to-H100 clock ratio (1.41 / 1.98); calibrated",
                                      ("float32",), 1e3),
    "cudnn_small_h_16bit_us": Constant("cudnn_small_h_ns", 620.0, 620.0 * A100_TO_H100_CLOCK, "lower",
                                       "as cudnn_small_h_fp32_us, its fp16 figure", _16BIT, 1e3),
    "cudnn_standard_floor_fp32_us": Constant("cudnn_standard_floor_ns", 8960.0, 6100.0, "lower",
                                             "cuDNN STANDARD (a GEMM and a pointwise kernel a step), the same "
                                             "benchmark; pessimistic 6.1 us, the same PR's other figure; "
                                             "calibrated", ("float32",), 1e3),
    "cudnn_standard_floor_16bit_us": Constant("cudnn_standard_floor_ns", 7900.0, 6100.0, "lower",
                                              "as cudnn_standard_floor_fp32_us, its fp16 figure", _16BIT, 1e3),
    "cudnn_lstm768_ns": Constant("cudnn_lstm768_ns", 1960.0, 1960.0, "lower",
                                 "cuDNN's persistent LSTM H = 768, B = 16, fp16 on an H100 (NX-AI/flashrnn's "
                                 "published figures): PERSIST_STATIC for Elman scaled from it by W's size (one gate, "
                                 "not four); measured on the target GPU" + _NOT_MOVED + "; calibrated"),
    "cudnn_boundaries_ns": Constant("cudnn_boundaries_ns", 2000.0, 1000.0, "lower",
                                    "no source: assumed, two kernel boundaries a STANDARD step (GEMM, pointwise); "
                                    "pessimistic halved, also assumed"),
}
DERIVED = {"cluster_barrier_ns": "cluster_barrier"}  # Hardware's method that gives the value where none is measured


def _baseline(field: str):
    """Hardware's default for `field`: the baselines of CONSTANTS, per dtype where the field is a table."""
    named = [c for c in CONSTANTS.values() if c.field == field]
    if named[0].dtypes:
        return tuple((d, c.baseline) for c in named for d in c.dtypes)
    return named[0].baseline


def _per_dtype(table: tuple, dtype: str) -> float:
    """A per-dtype figure; a dtype the table lacks (a calibration measured some) takes the largest."""
    values = dict(table)
    return values.get(dtype, max(values.values()))


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What the model needs of a GPU. Defaults: H100 SXM5 (sm_90), the baselines of CONSTANTS (each
    with its source). Times in ns, rates per ns."""

    name: str = "H100"
    target: str = "sm_90"
    # 132 SMs, 65536 registers, 2048 threads, 228 KB shared memory, 32 programs an SM (NVIDIA H100
    # datasheet / CUDA C Programming Guide, compute capability 9.0 table).
    limits: occupancy.SMLimits = occupancy.SMLimits()
    clock_ghz: float = _baseline("clock_ghz")
    peak_tflops: tuple = _baseline("peak_tflops")  # dense tensor-core TFLOP/s per dtype
    mma_sync_efficiency: float = _baseline("mma_sync_efficiency")
    wgmma_efficiency: float = _baseline("wgmma_efficiency")
    cudnn_gemm_efficiency: float = _baseline("cudnn_gemm_efficiency")
    mma_latency_cycles: float = _baseline("mma_latency_cycles")
    shared_bytes_per_cycle: float = _baseline("shared_bytes_per_cycle")  # per SM
    l2_bytes_per_cycle_per_sm: float = _baseline("l2_bytes_per_cycle_per_sm")
    l2_total_bytes_per_ns: float = _baseline("l2_total_bytes_per_ns")
    l2_latency_ns: float = _baseline("l2_latency_ns")  # a dependent load served by L2
    barrier_ns: float = _baseline("barrier_ns")  # the counter group barrier ("counter_barrier_ns")
    # The cluster layout's barrier: barrier.cluster.arrive.release + wait.acquire among the CTAs of one
    # thread-block cluster (hardware, inside a GPC). None until the calibration's cluster probe
    # (kernels.launch.probe_barrier) measures it: then cluster_barrier() charges the L2 latency plus
    # the handshake (no published figure).
    cluster_barrier_ns: float = None
    cluster_handshake_ns: float = _baseline("cluster_handshake_ns")
    launch_ns: float = _baseline("launch_ns")  # host cost of one Triton launch from Python
    epilogue_ns: float = _baseline("epilogue_ns")  # activation, store and loop bookkeeping per step
    cudnn_small_h_ns: tuple = _baseline("cudnn_small_h_ns")  # per dtype
    cudnn_standard_floor_ns: tuple = _baseline("cudnn_standard_floor_ns")  # per dtype
    cudnn_lstm768_ns: float = _baseline("cudnn_lstm768_ns")
    cudnn_boundaries_ns: float = _baseline("cudnn_boundaries_ns")
    calibrated: bool = False  # constants from a calibration file, not the defaults above
    layout_scale: tuple = ()  # (layout, measured / predicted) from a calibration file
    measured: tuple = ()  # the fields a calibration file set: baseline = pessimistic = the measurement

    def cluster_barrier(self) -> float:
        """The cluster barrier a step: measured, else at least the L2 latency (the release waits for the
        CTA's stores to reach L2) plus the arrive/wait handshake."""
        if self.cluster_barrier_ns is not None:
            return self.cluster_barrier_ns
        return self.l2_latency_ns + self.cluster_handshake_ns

    def peak_per_sm(self, dtype: str) -> float:
        """Dense tensor-core flop/ns of one SM."""
        return dict(self.peak_tflops)[dtype] * 1e3 / self.limits.sms

    def cycles(self, n: float) -> float:
        return n / self.clock_ghz

    def scale(self, layout: str) -> float:
        return dict(self.layout_scale).get(layout, 1.0)

    def value(self, name: str) -> float:
        """The constant `name` of CONSTANTS, in its name's unit."""
        c = CONSTANTS[name]
        if name in DERIVED:
            return getattr(self, DERIVED[name])() / c.unit
        held = getattr(self, c.field)
        return (_per_dtype(held, c.dtypes[0]) if c.dtypes else held) / c.unit

    def pessimistic(self) -> "Hardware":
        """This hardware with every constant at its pessimistic value, or this one's where that is already
        worse; a measured constant (`measured`, from a calibration file) stays as measured."""
        values = {}
        for name, c in CONSTANTS.items():
            if c.field in self.measured or c.pessimistic is None:
                continue
            worst = (max if c.worse == "higher" else min)(self.value(name) * c.unit, c.pessimistic)
            if c.dtypes:
                table = dict(values.get(c.field, getattr(self, c.field)))
                values[c.field] = tuple({**table, **{d: worst for d in c.dtypes}}.items())  # its order kept
            else:
                values[c.field] = worst
        return dataclasses.replace(self, **values)

    def constants(self) -> dict:
        """{name: {"baseline", "pessimistic", "source"}} of every constant charged (the plan's JSON)."""
        worst = self.pessimistic()
        return {name: {"baseline": round(self.value(name), 6), "pessimistic": round(worst.value(name), 6),
                       "source": ("measured by this GPU's calibration file (both sets); default: " + c.source
                                  if c.field in self.measured else c.source)}
                for name, c in CONSTANTS.items()}


# The GPUs `tritonrnn info --offline` knows: H100 SXM5 and H200 (same GH100 die, 132 SMs, same
# clocks, L2 and shared memory; the H200's HBM3e is faster, which no term here reads).
OFFLINE_GPUS = {"h100": Hardware(name="H100"), "h200": Hardware(name="H200")}
# What `info --offline` says of a GPU whose predictions need explaining.
OFFLINE_NOTES = {"h200": "H200: the H100's chip (132 SMs, same clocks, L2 and shared memory) with faster HBM3e; "
                         "no term of a step reads HBM (W_hh stays on chip, the state goes through L2), so every "
                         "prediction equals the H100's"}

# Constants a calibration file may replace (their names in Hardware), and the other names a file may give them
# (the plan's: CONSTANTS).
CALIBRATED_CONSTANTS = ("barrier_ns", "cluster_barrier_ns", "l2_latency_ns", "launch_ns", "cudnn_small_h_ns",
                        "cudnn_standard_floor_ns", "cudnn_lstm768_ns")
CALIBRATION_ALIASES = {"counter_barrier_ns": "barrier_ns"}


def calibration_path(slug: str, directory: Path = None) -> Path:
    return (directory or CALIBRATION_DIR) / f"{slug}.json"


def read_calibration(path: Path) -> dict:
    """A calibration file (schema in kernels/calibration/README.md), checked."""
    data = json.loads(Path(path).read_text())
    if data.get("schema") != CALIBRATION_SCHEMA or not isinstance(data.get("constants"), dict):
        raise ValueError(f"{path} is not a tritonrnn calibration file of schema {CALIBRATION_SCHEMA}")
    unknown = set(data["constants"]) - set(CALIBRATED_CONSTANTS) - set(CALIBRATION_ALIASES)
    if unknown:
        raise ValueError(f"{path}: unknown constants {sorted(unknown)}")
    twice = [f"{alias} and {name}" for alias, name in CALIBRATION_ALIASES.items()
             if {alias, name} <= set(data["constants"])]
    if twice:
        raise ValueError(f"{path}: one constant under two names: {', '.join(twice)}")
    return data


def calibrated(hardware: Hardware, data: dict) -> Hardware:
    """`hardware` with the constants of a calibration document in place of its defaults: measured, so
    the pessimistic set keeps them."""
    values = {}
    for name, value in data["constants"].items():
        name = CALIBRATION_ALIASES.get(name, name)
        values[name] = tuple(sorted(value.items())) if isinstance(value, dict) else float(value)
    scale = tuple(sorted((k, float(v)) for k, v in data.get("layout_scale", {}).items()))
    return dataclasses.replace(hardware, calibrated=True, layout_scale=scale, measured=tuple(sorted(values)), **values)


@functools.lru_cache(maxsize=None)
def _calibration_for(slug: str):
    path = calibration_path(slug)
    if os.environ.get("TRITONRNN_CALIBRATION", "1") == "0" or not path.exists():
        return None
    return read_calibration(path)


def offline_hardware(gpu: str) -> Hardware:
    """The Hardware of an offline GPU name ('h100', 'h200'), calibrated where a file ships."""
    key = gpu.lower()
    if key not in OFFLINE_GPUS:
        raise ValueError(f"unknown GPU {gpu!r}: --offline knows {', '.join(sorted(OFFLINE_GPUS))}")
    hardware = OFFLINE_GPUS[key]
    data = _calibration_for(hardware.name)
    return calibrated(hardware, data) if data else hardware


@functools.lru_cache(maxsize=None)
def device_hardware(index: int) -> Hardware:
    """The Hardware of a CUDA device: its limits, its target, and its calibration file if one ships."""
    props = torch.cuda.get_device_properties(index)
    name = configs.gpu_slug(props.name)
    base = OFFLINE_GPUS.get(name.lower(), Hardware(name=name))
    limits = occupancy.SMLimits.of(torch.device("cuda", index))
    hardware = dataclasses.replace(base, name=name, target=f"sm_{props.major}{props.minor}", limits=limits)
    data = _calibration_for(name)
    return calibrated(hardware, data) if data else hardware


# ---------------------------------------------------------------------------------------------
# Candidates and their resources


def _config(kwargs: dict, warps: int) -> triton.Config:
    return triton.Config(dict(kwargs), num_warps=warps, num_stages=1 if "BLOCK_K" not in kwargs else 3)


def candidate_configs(layout: str, hidden: int, dtype: str, allow_tf32: bool = True) -> list:
    """The configs the model weighs for `layout` at this H (padded to a power of two) and dtype: those
    whose shared memory (configs.shared_memory_bytes) fits the sm_90 budget. The resource table
    compiles exactly these (one source).

    Persistent: the kernel's own rules, kernels.configs's default for this dtype first (what the
    launcher runs without a choice), then its tuning space (K_SPLIT 1 or equal to the warps, parts of
    >= 64 rows), trimmed to what can win: K_SPLIT 1 from 64 columns (wgmma takes no 3D operand and
    pipelines its K steps itself); at 32 columns the split where one exists (one chain of BLOCK_H / 16
    dependent mma.sync against 4 or 8 independent ones); accumulator tiles [BLOCK_N, BLOCK_B] of at most
    64 x 64; at BLOCK_H <= 128 the default alone (the sequence layout holds all of W_hh there with no
    barrier: a persistent step, barrier included, never beats it)."""
    torch_dtype = getattr(torch, dtype)
    width = configs.block_h(hidden)
    if layout == "stepwise":
        return [configs.default_config("stepwise", 16, hidden)]
    if layout == "cluster":
        return _cluster_configs(hidden, dtype, allow_tf32)
    if layout == "streamed":
        return _streamed_configs(hidden, torch_dtype, allow_tf32)
    space = [configs.default_config(layout, 16, hidden, torch_dtype)]
    if layout == "sequence":
        if width > 256:  # all of W_hh on chip: beyond 256 not even 16-bit fits
            return []
        space += [_config({"BLOCK_B": bb}, w) for bb in (16, 32, 64) for w in (4, 8)]
    elif width > 128:
        for config in configs.tuning_space("persistent", PERSISTENT_MAX_BATCH, hidden, torch_dtype, allow_tf32):
            bb, bn, ks = config.kwargs["BLOCK_B"], config.kwargs["BLOCK_N"], config.kwargs.get("K_SPLIT", 1)
            if (bn >= 64 and ks > 1) or (bn < 64 and ks == 1 and width >= 256) or bb * bn > 64 * 64:
                continue
            space.append(config)
    seen, out = set(), []
    for c in space:  # the default once, and only where it loads
        if config_key(c) not in seen and configs.config_fits(layout, c, hidden, torch_dtype, allow_tf32):
            seen.add(config_key(c))
            out.append(c)
    return out


def _cluster_configs(hidden: int, dtype: str, allow_tf32: bool) -> list:
    """The cluster form's configs: the layout's default first, then the persistent candidates
    (the same kernel) whose cluster size (H / BLOCK_N CTAs) a launch may ask for, where the form fits."""
    torch_dtype = getattr(torch, dtype)
    space = [configs.default_config("cluster", 16, hidden, torch_dtype),
             *candidate_configs("persistent", hidden, dtype, allow_tf32)]
    seen, out = set(), []
    for c in space:
        if config_key(c) not in seen and configs.layout_fits("cluster", hidden, torch_dtype, allow_tf32, config=c):
            seen.add(config_key(c))
            out.append(c)
    return out


def _streamed_configs(hidden: int, dtype: torch.dtype, allow_tf32: bool) -> list:
    """The streamed layout's configs: its default per batch tile (16, 32, 64 rows: kernels.configs, chunks of
    128 bytes a state row) and the same at 64 columns a program (wgmma m64; half the programs re-read the
    state, each reads twice the slice)."""
    out = []
    for batch in (16, 32, 64):
        default = configs.default_config("streamed", batch, hidden, dtype)
        out += [default, triton.Config({**default.kwargs, "BLOCK_N": 64}, num_warps=default.num_warps,
                                       num_stages=default.num_stages)]
    return [c for c in out if configs.config_fits("streamed", c, hidden, dtype, allow_tf32)]


PERSISTENT_MAX_BATCH = 256  # the tuning space's batch bucket the candidates come from (BLOCK_B up to 64)


def config_key(config) -> str:
    """A config as a stable string: 'BLOCK_B=16,BLOCK_N=32,K_SPLIT=1,w4,s1'."""
    values = config if isinstance(config, dict) else configs.config_to_dict(config)
    kwargs = {k: v for k, v in values.items() if k not in ("num_warps", "num_stages")}
    return ",".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + f",w{values['num_warps']},s{values['num_stages']}"


def resource_key(layout: str, dtype: str, hidden: int, direction: str, config) -> str:
    """The resource table's key: the kernel compiles per BLOCK_H, so H is padded to a power of two."""
    return f"{layout}/{dtype}/H{configs.block_h(hidden)}/{direction}/{config_key(config)}"


@functools.lru_cache(maxsize=None)
def _resource_document(target: str) -> dict:
    path = OFFLINE_DIR / f"{target}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def resource_table(target: str = "sm_90") -> dict:
    """The shipped offline-compile table of `target` ({} where none ships)."""
    return _resource_document(target).get("entries", {})


def resource_table_triton(target: str = "sm_90") -> str:
    """The Triton release that compiled the shipped table of `target` (None where none ships)."""
    return _resource_document(target).get("triton")


def resources(layout: str, dtype: str, hidden: int, direction: str, config, target: str = "sm_90",
              allow_tf32: bool = True) -> dict:
    """Registers, warps, spilled bytes, shared memory and matmul kind of a compiled variant: from the
    shipped table, else an estimate (source 'estimate': shared memory from the budget model, 255
    registers, mma.sync below 64-wide tiles)."""
    config = config if isinstance(config, triton.Config) else configs.config_from_dict(config)
    exact = dtype == "float32" and not allow_tf32
    # A cluster's CTA is the persistent program with the cluster barrier in place of the counter one (a
    # few instructions, no tile): the table holds it once, as the persistent entry.
    compiled = "persistent" if layout == "cluster" else layout
    entry = None if exact else resource_table(target).get(resource_key(compiled, dtype, hidden, direction, config))
    if entry is not None:
        return {**entry, "source": f"offline {target} compile"}
    shared = configs.shared_memory_bytes(compiled, config, hidden, getattr(torch, dtype), allow_tf32)
    m_side = config.kwargs.get("BLOCK_N", 0) if compiled in configs.GROUPED else config.kwargs.get("BLOCK_B", 0)
    wgmma = m_side >= 64 and config.kwargs.get("K_SPLIT", 1) == 1 and target == "sm_90"  # no 3D wgmma
    return {"registers": 255, "stack_bytes": 0, "shared_bytes": shared, "num_warps": config.num_warps,
            "mma": "wgmma" if wgmma else "mma.sync", "source": "estimate"}


# ---------------------------------------------------------------------------------------------
# Step times


@dataclasses.dataclass(frozen=True)
class Shape:
    seq_len: int
    batch: int
    hidden: int
    dtype: str  # 'float32', 'bfloat16', 'float16', 'float64'
    direction: str = "forward"
    allow_tf32: bool = True
    directions: int = 1  # 2: both directions of a layer in one launch
    cell: str = "tanh"  # kernels/cells.py (the Elman cell's step costs the same with either nonlinearity)


dtype_name = configs.dtype_name


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout and config for a shape: whether it fits, its predicted step and the terms of it."""

    layout: str
    config: dict
    fits: bool
    step_ns: float
    terms: tuple = ()  # (name, ns)
    why: str = ""  # why it does not fit
    resources: tuple = ()
    plan: tuple = ()

    @property
    def step_us(self) -> float:
        return self.step_ns / 1e3

    def describe(self) -> str:
        c = {k: v for k, v in self.config.items() if k != "num_stages"}
        return f"{self.layout} " + " ".join(f"{k}={v}" for k, v in c.items())


def _mma_ns(hw: Hardware, dtype: str, flops: float, kind: str) -> float:
    efficiency = hw.wgmma_efficiency if kind == "wgmma" else hw.mma_sync_efficiency
    return flops / (hw.peak_per_sm(dtype) * efficiency)


def _k_step(dtype: str) -> int:
    """K of one mma.sync: m16n8k16 in 16-bit, m16n8k8 in TF32 (fp32), m8n8k4 in fp64."""
    return {"float32": 8, "float64": 4}.get(dtype, 16)


def _chain_ns(hw: Hardware, hidden: int, kind: str, dtype: str = "bfloat16", k_split: int = 1) -> float:
    """The dependent chain of one tile's dot. mma.sync: BLOCK_H / k accumulating instructions, in
    K_SPLIT independent chains (the persistent kernel's batched dot gives each warp one part of K):
    BLOCK_H / (k * K_SPLIT) deep. wgmma pipelines its K steps in the tensor core: about one
    instruction's latency, ~4 mma.sync, beyond its throughput."""
    steps = configs.block_h(hidden) / (_k_step(dtype) * k_split) if kind != "wgmma" else 4
    return hw.cycles(steps * hw.mma_latency_cycles)


def _operand_reads(res: dict) -> tuple:
    """(M side, N side): how many times a step's dot reads each operand from shared memory, from the compiled
    warp layout (TTGIR warpsPerCTA [wm, wn], the resource table's `warps_per_cta`). Each warp reads its rows
    of the M side for every column block: the M side is read wn times, the N side wm times (wgmma: each
    warpgroup along N reads the whole M side). A batched dot ([K_SPLIT, 1, 1]: a K part a warp) reads each
    once; so does an estimate without a compiled layout."""
    layouts = [layout for layout in res.get("warps_per_cta") or () if len(layout) == 2]
    if not layouts:
        return 1, 1
    wm, wn = max(layouts, key=lambda layout: layout[0] * layout[1])
    return wn, wm


def _kind(res: dict) -> str:
    mma = res["mma"]
    if isinstance(mma, list):
        mma = "wgmma" if any(m.startswith("wgmma") for m in mma) else "mma.sync" if mma else "fma"
    return mma


def _unfit(layout, config, why, res=None) -> Candidate:
    return Candidate(layout, configs.config_to_dict(config), False, math.inf, why=why,
                     resources=tuple(sorted((res or {}).items())))


def _step(terms: dict, hw: Hardware, layout: str, waves: int = 1) -> tuple[float, tuple]:
    """The step a layout's terms add up to (`waves` of programs run one after another), and the terms,
    the calibration's measured / predicted scale as one of them: the terms always add up to the step."""
    terms = {name: waves * ns for name, ns in terms.items()}
    total = sum(terms.values())
    if hw.scale(layout) != 1.0:
        terms["calibration"] = total * (hw.scale(layout) - 1.0)
    return total * hw.scale(layout), tuple(terms.items())


def _sequence(shape: Shape, hw: Hardware, config, res) -> Candidate:
    e, width, bb = ELEMENT[shape.dtype], configs.block_h(shape.hidden), config.kwargs["BLOCK_B"]
    per_sm = occupancy.programs_per_sm(res["registers"], res["num_warps"], res["shared_bytes"], hw.limits)
    if per_sm < 1:
        return _unfit("sequence", config, "does not load: one program needs more than an SM holds", res)
    programs = triton.cdiv(shape.batch, bb)
    capacity = per_sm * hw.limits.sms
    waves = triton.cdiv(programs, capacity)  # programs that are not resident run after the others
    sharing = min(per_sm, triton.cdiv(programs, hw.limits.sms))  # programs an SM runs at once
    kind = _kind(res)
    # The dot state [BLOCK_B, BLOCK_H] @ W_hh^T [BLOCK_H, BLOCK_H]: W_hh is its N side (read once per warp row),
    # the state its M side (staged once, read once per warp column).
    w_reads, state_reads = _operand_reads(res)[::-1]
    shared = sharing * e * width * (w_reads * width + (1 + state_reads) * bb) / hw.shared_bytes_per_cycle
    terms = {"shared": hw.cycles(shared),
             "mma": max(sharing * _mma_ns(hw, shape.dtype, 2 * bb * width * width, kind),
                        _chain_ns(hw, shape.hidden, kind, shape.dtype)),
             "epilogue": hw.epilogue_ns}
    # The kernel loads step t + 1's input during step t: its latency shows only where it is longer.
    terms["input latency"] = max(0.0, hw.l2_latency_ns - sum(terms.values()))
    step, terms = _step(terms, hw, "sequence", waves)
    return Candidate("sequence", configs.config_to_dict(config), True, step, terms,
                     resources=tuple(sorted(res.items())), plan=(("programs", programs), ("waves", waves)))


def _persistent(shape: Shape, hw: Hardware, config, res, layout: str = "persistent") -> Candidate:
    """The counter groups' layouts: the persistent one (its slice held) and the streamed one."""
    bb, bn = config.kwargs["BLOCK_B"], config.kwargs["BLOCK_N"]
    per_sm = occupancy.programs_per_sm(res["registers"], res["num_warps"], res["shared_bytes"], hw.limits)
    try:
        chosen = occupancy.plan(shape.batch, shape.hidden, bb, bn, per_sm * hw.limits.sms, shape.directions)
    except ValueError as exc:
        return _unfit(layout, config, str(exc), res)
    if T_COUNTER_LIMIT <= shape.seq_len * chosen.programs_per_group:
        return _unfit(layout, config, "the arrival counters would overflow", res)
    streamed = layout == "streamed"
    terms = _group_step(shape, hw, config, res, per_sm, chosen.programs, chosen.batch_tiles, chosen.groups,
                        hw.barrier_ns if chosen.waits else 0.0, slice_from_l2=streamed)
    step, terms = _step(_pipelined(terms) if streamed else terms, hw, layout)
    return Candidate(layout, configs.config_to_dict(config), True, step, terms,
                     resources=tuple(sorted(res.items())), plan=tuple(sorted(dataclasses.asdict(chosen).items())))


def _pipelined(terms: dict) -> dict:
    """The streamed layout's step from its group-step terms: the chunks' loads are pipelined under the MMAs
    (num_stages), so the L2 transfer (state and W slice), the shared-memory staging and the MMA overlap and the
    slowest of them counts; the barrier, the dependent latency of the first chunk and the epilogue stay on the
    chain."""
    terms = dict(terms)
    chunks = {name: terms.pop(name) for name in ("l2", "shared", "mma")}
    slowest = max(chunks, key=chunks.get)
    return {**terms, f"pipelined ({slowest})": chunks[slowest]}


def _group_step(shape: Shape, hw: Hardware, config, res, per_sm: int, programs: int, tiles: int, groups: int,
                barrier_ns: float, slice_from_l2: bool = False) -> dict:
    """One step of a layout whose groups of H / BLOCK_N programs (kernels/persistent.py) meet at a
    barrier, each group serving `tiles` batch tiles one after another. Per tile and program: the
    group's state^T [BLOCK_H, BLOCK_B] read from L2 (a dependent load after the barrier; every program
    of the group reads all of it, so the group re-reads it H / BLOCK_N times) and staged through
    shared memory; the W slice [BLOCK_N, BLOCK_H] read by the MMA from shared memory (wgmma or
    mma.sync, from the compile), as many times as the compiled warp layout reads it (_operand_reads);
    the dot's chain, K_SPLIT independent chains in parallel, then their sum across warps through shared
    memory; the epilogue. The next tile's inputs are loaded before the wait: their latency is off the
    chain, their bytes (one input tile forward, two backward: dL/dh_t and h_t) share the L2 term. Then
    the barrier. The backward's step differs from the forward's by those bytes and its compiled
    resources (registers, warp layout). `slice_from_l2` (the streamed layout): each tile also reads the
    program's W slice from L2, through the same port."""
    e, width = ELEMENT[shape.dtype], configs.block_h(shape.hidden)
    bb, bn, ks = config.kwargs["BLOCK_B"], config.kwargs["BLOCK_N"], config.kwargs.get("K_SPLIT", 1)
    kind = _kind(res)
    sharing = min(per_sm, triton.cdiv(programs, hw.limits.sms))  # programs an SM runs at once
    rows = min(tiles * bb, triton.cdiv(shape.batch, groups))  # masked rows of a short tile are not read
    # Every program reads its group's whole state, and its own columns of the step's inputs (loaded before the
    # wait: off the chain, but through the same port): x W_ih^T in the forward; dL/dh_t and h_t in the backward.
    inputs = 2 if shape.direction == "backward" else 1
    l2_bytes = sharing * rows * (width + inputs * bn) * e
    if slice_from_l2:
        l2_bytes += sharing * tiles * bn * width * e
    l2_rate = min(hw.l2_bytes_per_cycle_per_sm * hw.clock_ghz, hw.l2_total_bytes_per_ns * sharing / programs)
    # The dot slice^T [BLOCK_N, BLOCK_H] @ state^T [BLOCK_H, BLOCK_B]: the slice is its M side (read once per warp
    # column), the state its N side (staged once, read once per warp row).
    slice_reads, state_reads = _operand_reads(res)
    shared = sharing * tiles * e * width * (slice_reads * bn + (1 + state_reads) * bb) / hw.shared_bytes_per_cycle
    terms = {"barrier": barrier_ns,
             "latency": tiles * hw.l2_latency_ns,
             "l2": l2_bytes / l2_rate,
             "shared": hw.cycles(shared),
             "mma": max(sharing * tiles * _mma_ns(hw, shape.dtype, 2 * bb * width * bn, kind),
                        tiles * _chain_ns(hw, shape.hidden, kind, shape.dtype, ks)),
             "epilogue": tiles * hw.epilogue_ns}
    if ks > 1:  # the K parts' fp32 sums written and read back through shared memory, then a bar.sync
        terms["k sum"] = tiles * hw.cycles(2 * ks * bn * bb * 4 / hw.shared_bytes_per_cycle + hw.mma_latency_cycles)
    return terms


T_COUNTER_LIMIT = GAVE_UP.value  # arrivals stay below the give-up bit (kernels.launch.check_counters)


def _cluster(shape: Shape, hw: Hardware, config, res) -> Candidate:
    bb, bn = config.kwargs["BLOCK_B"], config.kwargs["BLOCK_N"]
    per_sm = occupancy.programs_per_sm(res["registers"], res["num_warps"], res["shared_bytes"], hw.limits)
    size = occupancy.cluster_size(shape.hidden, bn)
    # A cluster runs inside one GPC: the clusters resident at once are counted per GPC (sm_90's, assumed).
    resident = occupancy.offline_resident_clusters(per_sm, size)
    try:
        chosen = occupancy.plan(shape.batch, shape.hidden, bb, bn, resident * size, shape.directions, cluster=True)
    except ValueError as exc:  # ClusterUnavailable: a size Triton's launcher refuses, no resident cluster
        return _unfit("cluster", config, str(exc), res)
    # Clusters never wait for each other: more than are resident would run in waves (plan asks for none).
    terms = _group_step(shape, hw, config, res, per_sm, chosen.programs, chosen.batch_tiles, chosen.groups,
                        hw.cluster_barrier())
    step, terms = _step(terms, hw, "cluster")
    return Candidate("cluster", configs.config_to_dict(config), True, step, terms,
                     resources=tuple(sorted(res.items())), plan=tuple(sorted(dataclasses.asdict(chosen).items())))


def _stepwise(shape: Shape, hw: Hardware, config, res) -> Candidate:
    e, width = ELEMENT[shape.dtype], configs.block_h(shape.hidden)
    # The launcher's batch tile for this B (its default grows with the batch bucket up to 64).
    launched = configs.default_config("stepwise", shape.batch, shape.hidden)
    bb = launched.kwargs["BLOCK_B"]
    tiles = triton.cdiv(shape.batch, bb)
    # Every batch tile re-reads W_hh from L2; the GEMM runs over the whole chip.
    device = (tiles * width * width * e / hw.l2_total_bytes_per_ns + hw.l2_latency_ns
              + 2 * shape.batch * width * width / (hw.peak_per_sm(shape.dtype) * hw.mma_sync_efficiency
                                                   * hw.limits.sms) + hw.epilogue_ns)
    # The device runs a step while the host launches the next: a step is the longer of the two.
    step, terms = _step({"launch": hw.launch_ns, "device beyond the launch": max(0.0, device - hw.launch_ns)},
                        hw, "stepwise")
    return Candidate("stepwise", configs.config_to_dict(launched), True, step, terms,
                     resources=tuple(sorted(res.items())))


_LAYOUT_COST = {"sequence": _sequence, "persistent": _persistent, "cluster": _cluster,
                "streamed": functools.partial(_persistent, layout="streamed"), "stepwise": _stepwise}


def predict(shape: Shape, hw: Hardware, layout: str, config, res: dict = None) -> Candidate:
    """The predicted step of `layout` with `config` for `shape` on `hw` (resources: looked up)."""
    config = config if isinstance(config, triton.Config) else configs.config_from_dict(config)
    res = res or resources(layout, shape.dtype, shape.hidden, shape.direction, config, hw.target, shape.allow_tf32)
    if res["stack_bytes"] > SPILL_FREE:
        return _unfit(layout, config, f"spills {res['stack_bytes']} B of registers", res)
    if res["shared_bytes"] > configs.SHARED_MEMORY_BUDGET or res["shared_bytes"] > hw.limits.shared_bytes:
        return _unfit(layout, config, f"needs {res['shared_bytes']} B of shared memory", res)
    return _LAYOUT_COST[layout](shape, hw, config, res)


def candidates(shape: Shape, hw: Hardware) -> list:
    """Every layout and config the model weighs for `shape`, fitting or not, fastest first."""
    out = []
    for layout in LAYOUTS:
        if not configs.layout_allowed(layout, shape.hidden, getattr(torch, shape.dtype), shape.allow_tf32):
            continue
        for config in candidate_configs(layout, shape.hidden, shape.dtype, shape.allow_tf32):
            candidate = predict(shape, hw, layout, config)
            if shape.seq_len == 1 and layout != "stepwise" and candidate.fits:  # dispatch's rule, as _choose's
                candidate = dataclasses.replace(candidate, fits=False, step_ns=math.inf,
                                                why=f"T = 1: a single step runs the step kernel (predicted "
                                                    f"{candidate.step_us:.2f} us a step for T > 1)")
            out.append(candidate)
    return sorted(out, key=lambda c: (not c.fits, c.step_ns))


def limits_key() -> tuple:
    """The layout size limits of kernels/configs.py the choice depends on (tests change them): part of the cache key."""
    return tuple(tuple(sorted(table.items())) for table in (
        configs.SEQUENCE_MAX_H, configs.SEQUENCE_CANDIDATE_MAX_H, configs.PERSISTENT_MAX_H)) + (
        configs.PERSISTENT_EXACT_FP32_MAX_H,)


def choose(shape: Shape, hw: Hardware, exclude: tuple = ()) -> Candidate:
    """The fitting candidate predicted fastest (cached per shape, hardware and layout limits); layouts
    in `exclude` are skipped. A single step is always the step kernel."""
    return _choose(shape, hw, tuple(exclude), limits_key())


@functools.lru_cache(maxsize=4096)
def _choose(shape: Shape, hw: Hardware, exclude: tuple, limits: tuple) -> Candidate:
    fitting = [c for c in candidates(shape, hw) if c.fits and c.layout not in exclude]
    if shape.seq_len == 1 or not fitting:  # the stepwise layout runs any shape
        return predict(shape, hw, "stepwise", candidate_configs("stepwise", shape.hidden, shape.dtype)[0])
    return fitting[0]


# ---------------------------------------------------------------------------------------------
# cuDNN


def cudnn_algorithm(dtype: str, batch: int, hidden: int, direction: str = "forward") -> str:
    """What torch.nn.RNN runs there (PyTorch's aten/src/ATen/native/cudnn/RNN.cpp, get_algo; docs/DESIGN.md D18)."""
    if dtype == "float64":
        return "STANDARD"
    if hidden <= (384 if direction == "forward" else 256):
        return "PERSIST_STATIC_SMALL_H"
    if dtype == "float16" and hidden <= 1024 and hidden % 128 == 0 and batch % 8 == 0 and batch <= 128:
        return "PERSIST_STATIC"
    return "STANDARD"


def cudnn_step_ns(dtype: str, batch: int, hidden: int, hw: Hardware, direction: str = "forward") -> float:
    """cuDNN's predicted step: the published figures, grown by the work they did not include."""
    algorithm = cudnn_algorithm(dtype, batch, hidden, direction)
    e = ELEMENT[dtype]
    work = 2 * batch * hidden * hidden / (hw.peak_per_sm(dtype) * hw.cudnn_gemm_efficiency * hw.limits.sms)
    small_h = _per_dtype(hw.cudnn_small_h_ns, dtype)
    if algorithm == "PERSIST_STATIC_SMALL_H":
        return small_h + work
    if algorithm == "PERSIST_STATIC":  # the LSTM's 4 gates of 768: one gate of H
        return max(small_h, hw.cudnn_lstm768_ns * hidden * hidden / (4 * 768 * 768)) + work
    floor = _per_dtype(hw.cudnn_standard_floor_ns, dtype)
    gemm = max(work, hidden * hidden * e / hw.l2_total_bytes_per_ns)  # W_hh read from L2 once a step
    return max(floor, gemm + hw.cudnn_boundaries_ns)


# DeepBench (baidu-research/DeepBench, cuDNN 7, V100), vanilla RNN forward H=2048 B=16: 85 us a step fp32,
# 60 fp16. Scaled to an H100 by the ratio of HBM bandwidths (0.9 -> 3.35 TB/s), an upper bound
# that cudnn_step_ns stays below (tests/dispatch/test_costmodel.py): the model does not flatter us.
DEEPBENCH_V100_NS = {"float32": 85_000.0, "float16": 60_000.0}
V100_TO_H100 = 3.35 / 0.9


# A cell's verdict (plan_cell) from its predicted speedups over cuDNN, baseline and pessimistic: a win holds under
# the pessimistic set; short of that, likely from 1.25x under the baseline; a tie within the band of 1.25x either
# side of 1 (0.8x <= baseline < 1.25x); a loss below it.
WIN_AT = 1.0  # pessimistic speedup
LIKELY_AT = 1.25  # baseline speedup
TIE_FROM = 0.8  # baseline speedup: 1 / LIKELY_AT
VERDICTS = ("win", "likely", "tie", "loss")


def verdict(speedup: float, speedup_pessimistic: float) -> str:
    """"win", "likely", "tie" or "loss" of a cell whose predicted speedups these are."""
    if speedup_pessimistic >= WIN_AT:
        return "win"
    if speedup >= LIKELY_AT:
        return "likely"
    return "tie" if speedup >= TIE_FROM else "loss"


def plan_cell(shape: Shape, hw: Hardware) -> dict:
    """One row of the offline plan: the chosen layout, its predicted step, cuDNN's, every candidate; the
    same under the pessimistic constants (Hardware.pessimistic: the layout chosen there, which may differ),
    and the cell's verdict."""
    chosen = choose(shape, hw)
    theirs = cudnn_step_ns(shape.dtype, shape.batch, shape.hidden, hw, shape.direction)
    worst = hw.pessimistic()
    chosen_worst = choose(shape, worst)
    theirs_worst = cudnn_step_ns(shape.dtype, shape.batch, shape.hidden, worst, shape.direction)
    speedup, speedup_worst = round(theirs / chosen.step_ns, 3), round(theirs_worst / chosen_worst.step_ns, 3)
    return {"dtype": shape.dtype, "batch": shape.batch, "hidden": shape.hidden, "seq_len": shape.seq_len,
            "direction": shape.direction, "gpu": hw.name, "calibrated": hw.calibrated,
            "resources_triton": resource_table_triton(),
            "path": chosen.layout, "config": chosen.config, "predicted_us": round(chosen.step_us, 3),
            "cudnn_algorithm": cudnn_algorithm(shape.dtype, shape.batch, shape.hidden, shape.direction),
            "cudnn_predicted_us": round(theirs / 1e3, 3), "predicted_speedup": speedup,
            "path_pessimistic": chosen_worst.layout, "config_pessimistic": chosen_worst.config,
            "predicted_us_pessimistic": round(chosen_worst.step_us, 3),
            "cudnn_predicted_us_pessimistic": round(theirs_worst / 1e3, 3),
            "predicted_speedup_pessimistic": speedup_worst, "verdict": verdict(speedup, speedup_worst),
            "candidates": [{"layout": c.layout, "config": c.config, "fits": c.fits,
                            "predicted_us": round(c.step_us, 3) if c.fits else None, "why": c.why or None,
                            "terms_us": {k: round(v / 1e3, 3) for k, v in c.terms}}
                           for c in candidates(shape, hw)]}
