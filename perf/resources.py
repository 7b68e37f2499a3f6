"""The resource table the cost model reads offline: every candidate config of every layout, dtype and
standard-grid H, compiled for sm_90 as launches specialise them (perf/static.compile_kernel), forward
and backward, with its registers, spilled bytes, shared memory and matmul instruction.

    python -m tritonrnn.perf.resources --write     # rewrites kernels/offline/sm_90.json (minutes)
    python -m tritonrnn.perf.resources             # prints the table's rows as JSON lines

This is the table's only source: tritonrnn.costmodel.candidate_configs says what to compile, and
tests/dispatch/test_costmodel.py recompiles a few entries and checks that they match. Run it without
TRITON_INTERPRET (the compiler needs the real @triton.jit objects), again whenever a kernel changes.
"""
import argparse
import concurrent.futures
import contextlib
import json
import os
import sys

import torch
import triton

from tritonrnn import costmodel

from . import grid, static

TARGET = "sm_90"
DIRECTIONS = ("forward", "backward")


def variants(dtypes=grid.DTYPES, hiddens=grid.HIDDENS) -> list:
    """(layout, dtype, H, direction, config) of every entry: the candidates the model weighs."""
    out = []
    for dtype in dtypes:
        for hidden in hiddens:
            for layout in costmodel.LAYOUTS:
                if layout == "cluster":  # its CTA is the persistent program: costmodel.resources reads that entry
                    continue
                for config in costmodel.candidate_configs(layout, hidden, dtype):
                    for direction in DIRECTIONS:
                        out.append((layout, dtype, hidden, direction, config))
    return out


def compile_entry(layout: str, dtype: str, hidden: int, direction: str, config) -> dict:
    """One table entry: the compiled variant's resources (unpacked input, TF32 for fp32, as the grid runs)."""
    result = static.compile_kernel(layout, getattr(torch, dtype), 256, hidden, backward=direction == "backward",
                                   lengths=False, allow_tf32=True, config=config, asm=True)
    kinds = result["mma"]
    kind = "wgmma" if any(m.startswith("wgmma") for m in kinds) else "mma.sync" if kinds else "fma"
    # The dot's warp layout (TTGIR warpsPerCTA): how many times a step reads each operand from shared memory.
    warps = [[int(n) for n in layout.split(",")] for layout in result["warps_per_cta"]]
    return {"registers": result["registers"], "stack_bytes": result["stack_bytes"],
            "shared_bytes": result["shared_bytes"], "num_warps": result["num_warps"], "mma": kind,
            "warps_per_cta": warps}


def _compile(variant) -> dict:
    return compile_entry(*variant)


def build(selection=None, log=None, known=None, jobs: int = 1) -> dict:
    """The table of `selection` (default: every variant); entries in `known` (a previous table's, of the
    same triton) are kept instead of recompiled; `jobs` processes compile the rest."""
    entries = {}
    selection = selection if selection is not None else variants()
    keys = [costmodel.resource_key(*variant) for variant in selection]
    todo = [(key, variant) for key, variant in zip(keys, selection) if key not in (known or {})]
    entries.update({key: known[key] for key in keys if key in (known or {})})
    with concurrent.futures.ProcessPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        compiled = (pool.map if pool else map)(_compile, [variant for _, variant in todo])
        for i, ((key, _), entry) in enumerate(zip(todo, compiled)):
            entries[key] = entry
            if log:
                print(f"[{i + 1}/{len(todo)}] {key} {entry}", file=log, flush=True)
    return {"target": TARGET, "triton": triton.__version__,
            "generator": "python -m tritonrnn.perf.resources --write",
            "note": "offline compiles (perf/static.compile_kernel: aligned pointers, B unspecialised where the "
                    "kernel leaves it so, no lengths, fp32 in TF32); read by tritonrnn.costmodel.resources",
            "entries": dict(sorted(entries.items()))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite kernels/offline/{TARGET}.json")
    parser.add_argument("--keep", action="store_true",
                        help="keep the entries the current table already has (same triton): compile only new "
                             "variants; after a kernel changes, run without it")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels the compiler needs")
    path = costmodel.OFFLINE_DIR / f"{TARGET}.json"
    known = None
    if args.keep and path.exists():
        old = json.loads(path.read_text())
        known = old["entries"] if old.get("triton") == triton.__version__ else None
    table = build(log=sys.stderr, known=known, jobs=args.jobs)
    if args.write:
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
        print(f"wrote {path} ({len(table['entries'])} entries)")
    else:
        for key, entry in table["entries"].items():
            print(json.dumps({"key": key, **entry}))


if __name__ == "__main__":
    main()
