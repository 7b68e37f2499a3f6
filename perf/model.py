"""A performance model of the persistent path per standard-grid cell, written before any GPU run.

Per step, each program of the persistent kernel waits at its group barrier, then for each of its
batch tiles loads the whole previous state of its rows from L2 (nothing can prefetch it: it did
not exist before the barrier), stages it through shared memory, multiplies it by its W_hh slice
(read from shared memory) with mma.sync, and stores its columns. cuDNN's side follows GUIDE
section 2 (which algorithm runs where). Every constant below is an assumption to be held
against a measurement; see perf/NOTES.md.

    python -m tritonrnn.perf.static > static.jsonl; python -m tritonrnn.perf.model < static.jsonl
"""
import sys

from . import static

# H100 SXM / H200: 132 SMs of sm_90 at about 1.98 GHz (boost).
SMS = 132
CLOCK_GHZ = 1.98
L2_TOTAL = 5500.0  # bytes/ns: aggregate L2 read bandwidth published for the H100 (about 5.5 TB/s)
L2_PER_SM = 64 * CLOCK_GHZ  # bytes/ns: one SM's port to L2 (64 B/clock)
SHARED_PER_SM = 128 * CLOCK_GHZ  # bytes/ns: shared-memory bandwidth of one SM (128 B/clock)
# flop/ns per SM: dense tensor peak / 132 (989 TFLOP/s 16-bit, 495 TF32); mma.sync at about half,
# wgmma (cuBLAS) at about 70%.
PEAK = {"float32": 495e3 / SMS, "bfloat16": 989e3 / SMS, "float16": 989e3 / SMS}
MMA_SYNC, WGMMA = 0.5, 0.7
BARRIER_NS = 1000.0  # release add + acquire polls through L2 + the skew of the last arrival
TILE_LATENCY_NS = 400.0  # the dependent state load after the barrier: L2 hit latency (~260 clocks) + ramp
# cuDNN: a persistent step (W on chip, grid barrier) and a STANDARD step (a GEMM and a pointwise
# kernel enqueued per step: the host-side floor, or the device time plus two kernel boundaries).
CUDNN_PERSISTENT_STEP_NS = 1500.0
STANDARD_LAUNCH_FLOOR_NS = 5000.0
STANDARD_BOUNDARIES_NS = 2000.0
ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}


def cudnn_algorithm(dtype: str, batch: int, hidden: int) -> str:
    """What torch runs there (GUIDE section 2; forward and backward agree on the standard grid)."""
    if hidden <= 256:
        return "PERSIST_STATIC_SMALL_H"
    if dtype == "float16" and hidden <= 1024 and hidden % 128 == 0 and batch % 8 == 0 and batch <= 128:
        return "PERSIST_STATIC"
    return "STANDARD" if dtype != "bfloat16" else "STANDARD (cuDNN >= 9.13) or torch native"


def cudnn_step_ns(dtype: str, batch: int, hidden: int) -> float:
    if cudnn_algorithm(dtype, batch, hidden).startswith("PERSIST"):
        return CUDNN_PERSISTENT_STEP_NS
    e = ELEMENT[dtype]
    gemm = max(2 * batch * hidden ** 2 / (SMS * PEAK[dtype] * WGMMA), (hidden ** 2 + 2 * batch * hidden) * e / L2_TOTAL)
    return max(STANDARD_LAUNCH_FLOOR_NS, gemm + STANDARD_BOUNDARIES_NS)


def persistent_step_ns(row: dict, backward: bool = False) -> dict:
    """The forward (or backward) step of one persistent_fit row, and what each part costs."""
    dtype, batch, hidden, e = row["dtype"], row["batch"], row["hidden"], ELEMENT[row["dtype"]]
    plan, block_n, block_b = row["plan"], row["config"]["BLOCK_N"], row["config"]["BLOCK_B"]
    tiles = plan["batch_tiles"]
    rows = -(-batch // plan["groups"])  # rows a group serves
    l2_bytes = rows * hidden * e + rows * block_n * e * (3 if backward else 2)  # state; in, out (, act)
    bandwidth = min(L2_PER_SM, L2_TOTAL / (plan["programs_per_group"] * plan["groups"]))
    shared_bytes = tiles * (hidden * block_n * e + 2 * block_b * hidden * e)  # W slice; state staged
    flops = tiles * 2 * block_b * hidden * block_n
    parts = {"barrier": BARRIER_NS, "latency": tiles * TILE_LATENCY_NS, "l2": l2_bytes / bandwidth,
             "shared": shared_bytes / SHARED_PER_SM, "mma": flops / (PEAK[dtype] * MMA_SYNC)}
    return {"step_ns": sum(parts.values()), "l2_bytes": l2_bytes, **parts}


def predict(rows: list) -> list:
    out = []
    for row in rows:
        ours = persistent_step_ns(row)
        theirs = cudnn_step_ns(row["dtype"], row["batch"], row["hidden"])
        out.append({**row, **ours, "cudnn": cudnn_algorithm(row["dtype"], row["batch"], row["hidden"]),
                    "cudnn_step_ns": theirs, "speedup": theirs / ours["step_ns"]})
    return out


def table(predictions: list) -> str:
    lines = ["| dtype | H | B | plan (programs x groups, tiles) | L2 KB/program | barrier+latency | L2 | shared | mma "
             "| step (us) | T=512 (ms) | cuDNN algorithm | cuDNN step (us) | predicted speedup |", "|" + "---|" * 14]
    for p in predictions:
        plan = p["plan"]
        lines.append(f"| {p['dtype']} | {p['hidden']} | {p['batch']} | {plan['programs_per_group']} x {plan['groups']}, "
                     f"{plan['batch_tiles']} | {p['l2_bytes'] / 1024:.0f} | {(p['barrier'] + p['latency']) / 1e3:.1f} | "
                     f"{p['l2'] / 1e3:.2f} | {p['shared'] / 1e3:.2f} | {p['mma'] / 1e3:.2f} | {p['step_ns'] / 1e3:.1f} | "
                     f"{p['step_ns'] * 512 / 1e6:.2f} | {p['cudnn']} | {p['cudnn_step_ns'] / 1e3:.1f} | "
                     f"{p['speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    import json
    variants = [json.loads(line) for line in sys.stdin if line.strip()]
    rows = static.persistent_fit(variants)
    print(static.fit_table(rows))
    print()
    print(table(predict(rows)))


if __name__ == "__main__":
    main()
