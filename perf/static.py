"""Compile the kernels for a GPU without one, and read what the compiler made of them.

Triton compiles for any target on the CPU (ASTSource + GPUTarget) with the ptxas it bundles; the
cubin's resource usage (registers, stack: spilled bytes, shared memory) and the matmul
instructions in its PTX tell whether a config fits on chip and runs on the tensor cores, before a
GPU is ever lent. Used by the tests to guard the default configs.

    compile_kernel("sequence", torch.float32, batch=64, hidden=128, backward=False)   # a path
    -> {"registers": 168, "stack_bytes": 0, "shared_bytes": 33280, "mma": ["wgmma..."], ...}

Each result also names the launch's cluster dims and the group barrier's PTX instructions
("barrier"), and says whether the cluster barrier's arrive/wait pair sits in the step loop. The path
"cluster" is the persistent kernel's cluster form (kernels/launch.py).
"""
import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton

from tritonrnn.kernels import configs
from tritonrnn.kernels import launch, occupancy, persistent

from . import grid

_POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
HOPPER = (90, 32)  # compute capability 9.0 (H100, H200), warp size 32
# What each pointer argument of the recurrence kernels holds (by name, for every kernel): absent (None at
# a launch) for some variants, and int32 where it is not the data's dtype.
_ABSENT = {"p_h0": lambda v: v["backward"], "p_act": lambda v: not v["backward"], "p_hn": lambda v: v["backward"],
           "p_len": lambda v: not v["lengths"], "p_state": lambda v: v["backward"] or not v["lengths"],
           "p_sync": lambda v: v["layout"] == "cluster"}
_INT32_POINTERS = ("p_len", "p_sync")


def _arguments(jitted, layout: str, dtype, batch: int, hidden: int, backward: bool, lengths: bool) -> tuple:
    """The kernel's arguments as a launch of `layout` gives them, read from its signature: pointers
    (their types, None where absent), integers (None where the kernel does not specialise them), and
    the constexprs the launchers set besides the config (the others keep their defaults)."""
    fn = jitted.fn if hasattr(jitted, "values") else jitted  # below @triton.heuristics
    variant = {"layout": layout, "backward": backward, "lengths": lengths}
    stride_wk, stride_wn = (launch.slice_strides(hidden, backward) if layout in configs.GROUPED
                            else (hidden, 1) if backward else (1, hidden))
    values = {"B": batch, "H": hidden, "HP": launch.padded(hidden), "stride_wk": stride_wk, "stride_wn": stride_wn,
              "B_BUCKET": configs.batch_bucket(batch)}
    pointers, ints = {}, {}
    for param in fn.params:
        name = param.name
        if name.startswith("p_"):
            absent = _ABSENT.get(name, lambda _: False)(variant)
            pointers[name] = None if absent else "*i32" if name in _INT32_POINTERS else _POINTER[dtype]
        elif not param.is_constexpr:
            ints[name] = None if name in fn.do_not_specialize else values[name]
    # The heuristics' flags (HAS_LENGTHS, HAS_PREV, STORE_STATE) from the pointers a launch passes.
    derived = {name: rule(pointers) for name, rule in getattr(jitted, "values", {}).items()}
    return fn, pointers, ints, derived


def _launch_constants(fn, layout: str, hidden: int, backward: bool, cell: str) -> dict:
    """The constexprs a launch of `layout` sets besides the config, numerics and heuristics, where the
    kernel has them (kernels/launch.py sets the same)."""
    given = {"BACKWARD": backward, "CELL": cell, "REVERSE": False, "BLOCK_H": configs.block_h(hidden),
             "COLUMN_BLOCKS": 1, "TIMER": True, "BARRIER": "cluster" if layout == "cluster" else "counter"}
    names = {param.name for param in fn.params if param.is_constexpr}
    return {name: value for name, value in given.items() if name in names}


def compile_kernel(path: str, dtype: torch.dtype, batch: int, hidden: int, backward: bool = False,
                   lengths: bool = False, cell: str = "tanh", allow_tf32: bool = True, config=None,
                   aligned: bool = True, target=HOPPER, asm: bool = False) -> dict:
    """Compile the kernel of layout `path` for `target`; its resource usage and matmul instructions.

    `aligned`: the variant a launch gets (pointers 16-byte aligned, integers divisible by 16 where
    they are); False compiles the unspecialised one. `asm`: also return the PTX and TTGIR texts
    ("ptx", "ttgir") and the warp layout of the dot ("warps_per_cta")."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    layout = path  # the variants' JSON names the layout "path"
    config = config or configs.default_config(layout, batch, hidden, dtype)
    fn, pointers, ints, derived = _arguments(launch.KERNELS[layout], layout, dtype, batch, hidden, backward, lengths)
    constants = {**launch.numerics(dtype, torch.device("cuda"), allow_tf32), **config.kwargs, **derived,
                 **_launch_constants(fn, layout, hidden, backward, cell)}
    # Specialise as a launch does (triton's JIT, BaseBackend.get_*_specialization): an integer equal
    # to 1 becomes a constant; pointers (fresh torch allocations) are 16-byte aligned and integers
    # divisible by 16 are marked so (tt.divisibility), which lets loads vectorise.
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if pointers.get(name) is not None:
            signature[name] = pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]] if aligned else []
        elif name in ints and ints[name] == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        elif name in ints:
            signature[name] = "i32"
            divisible = aligned and ints[name] is not None and ints[name] % 16 == 0
            attrs[(index,)] = [["tt.divisibility", 16]] if divisible else []
        else:
            signature[name] = "constexpr"
            constants.setdefault(name, None if name in pointers else param.default)
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", *target),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    mma = sorted(set(re.findall(r"(wgmma\.mma_async\.[\w.]+|mma\.sync\.[\w.]+)", ptx)))
    # Cluster dims are the launch's (the cluster form compiles with num_ctas = 1 and is launched in
    # clusters of cdiv(H, BLOCK_N) CTAs); every other launch is one CTA a cluster.
    size = (occupancy.cluster_size(hidden, config.kwargs["BLOCK_N"]) if layout == "cluster"
            else compiled.metadata.num_ctas)
    # Triton's shared memory is dynamic (requested at launch, checked against the device's opt-in
    # maximum at load time): cuobjdump shows only the static 1 KB.
    result = {**usage, "shared_bytes": compiled.metadata.shared, "mma": mma, "fma_only": not mma,
              "num_warps": config.num_warps, "config": configs.config_to_dict(config), "cluster_dims": [size, 1, 1],
              "barrier": barrier_instructions(ptx), "cluster_barrier_in_loop": cluster_barrier_in_loop(ptx)}
    if layout in configs.GROUPED:  # the group barrier's order (the counter's; the cluster form has no counter)
        ring = f"{fn.__name__}_param_{[n for n in fn.arg_names if signature[n] != 'constexpr'].index('p_ring')}"
        result.update(ring_param=ring, barrier_problems=barrier_order_problems(ptx, ring) if layout == "persistent"
                      else state_load_problems(ptx, ring) + clock_branch_problems(ptx))
    if asm:
        ttgir = compiled.asm["ttgir"]
        layouts = re.findall(r"#ttg\.nvidia_mma<\{[^}]*warpsPerCTA = \[([\d, ]+)\]", ttgir)
        result.update(ptx=ptx, ttgir=ttgir, cubin=compiled.asm["cubin"], warps_per_cta=sorted(set(layouts)))
    return result


# The persistent kernel's group barrier in PTX (triton 3.6, sm_90): the CTA barrier, the arrival
# (one thread: release add at gpu scope), the relaxed polls, the acquire read (one thread, its value
# broadcast through shared memory: st.shared, bar.sync, ld.shared), the CTA barrier; the next step's
# state loads from L2 (.cg). LLVM places the blocks in any order, so each check stays in one block.
_BAR = re.compile(r"^\s*(bar\.sync|barrier\.sync)\b")
_ARRIVAL = re.compile(r"\b(atom|red)\.global\.gpu\.release\.add\b")
_ACQUIRE = re.compile(r"\b(ld\.global\.gpu\.acquire|atom\.global\.gpu\.acquire)\b")
_GLOBAL_ACCESS = re.compile(r"\b(st|ld)\.global\b")
_BLOCK_END = re.compile(r"^\s*((@%p\d+\s+)?bra(\.uni)?\b|\$L__BB\w*:|// %bb\.)")
def barrier_order_problems(ptx: str, ring_param: str) -> list:
    """What is wrong with the order of the persistent kernel's group barrier in `ptx` (empty: nothing):
    one arrival, a release add at gpu scope, with a CTA barrier before it in its block (after every
    global store of the step); one acquire read on the wait, its broadcast value followed by a CTA
    barrier in its block before any global access; and what state_load_problems and
    clock_branch_problems report. A text check of the kernel's one barrier, written against Triton
    3.6's lowering (docs/DESIGN.md D9, D20). `ring_param`: the PTX name of the ring's pointer (compile_kernel's
    "ring_param")."""
    lines = ptx.splitlines()
    problems = []
    arrivals = [i for i, line in enumerate(lines) if _ARRIVAL.search(line)]
    if len(arrivals) != 1:
        problems.append(f"expected one release add at gpu scope (the arrival), found {len(arrivals)}")
    else:
        for line in reversed(lines[:arrivals[0]]):
            if _BAR.search(line):
                break
            if _GLOBAL_ACCESS.search(line) or _BLOCK_END.search(line):
                problems.append("no CTA barrier before the arrival")
                break
    acquires = [i for i, line in enumerate(lines) if _ACQUIRE.search(line)]
    if len(acquires) != 1:
        problems.append(f"expected one acquire read on the wait, found {len(acquires)}")
    else:
        after = lines[acquires[0] + 1:]
        read = next((i for i, line in enumerate(after) if "ld.shared" in line or _BLOCK_END.search(line)), None)
        ordered = False
        if read is not None and "ld.shared" in after[read]:
            for line in after[read + 1:]:
                if _BAR.search(line):
                    ordered = True
                if ordered or _GLOBAL_ACCESS.search(line) or _BLOCK_END.search(line):
                    break
        if not ordered:
            problems.append("no CTA barrier after the acquire")
    return problems + state_load_problems(ptx, ring_param) + clock_branch_problems(ptx)


# Register data flow in PTX: every instruction that writes a register, with the registers (and kernel
# parameters) it reads, its guard predicate included. Flow-insensitive: a register written in several
# places depends on all of them (a superset of what any one path reads).
_INSTRUCTION = re.compile(r"^\s*(?:@!?(%p\d+)\s+)?([a-z][\w.:]*)\s*(.*?);")
_OPERAND = re.compile(r"%[a-z]+\d+|%(?:globaltimer|ctaid\.[xyz]|tid\.[xyz])\b|\w+_param_\d+")
_WRITES_NOTHING = ("st.", "red.", "bar.", "barrier.", "bra", "ret", "exit", "fence.", "membar.", "prefetch", "wgmma.",
                   "cp.async.", "mbarrier.", "griddepcontrol")


def _writers(ptx: str) -> dict:
    """{register: [(opcode, operands read)]} over every instruction of the PTX."""
    writers = {}
    for line in ptx.splitlines():
        match = _INSTRUCTION.match(line)
        if not match or match.group(2).startswith(_WRITES_NOTHING):
            continue
        guard, opcode, operands = match.groups()
        depth, end = 0, len(operands)  # the destination: the first operand ({...} for vectors)
        for index, char in enumerate(operands):
            depth += (char in "{[") - (char in "}]")
            if char == "," and depth == 0:
                end = index
                break
        reads = _OPERAND.findall(operands[end:]) + ([guard] if guard else [])
        for register in _OPERAND.findall(operands[:end]):
            writers.setdefault(register, []).append((opcode, reads))
    return writers


def _sources(writers: dict, registers: list, through_shared: bool = True) -> set:
    """Every register, special register and parameter the values of `registers` are computed from;
    through_shared=False stops at shared-memory loads (a value one thread broadcast to all)."""
    seen, todo = set(), list(registers)
    while todo:
        register = todo.pop()
        if register in seen:
            continue
        seen.add(register)
        for opcode, reads in writers.get(register, []):
            if through_shared or not opcode.startswith("ld.shared"):
                todo.extend(reads)
    return seen


_CONDITIONAL_BRANCH = re.compile(r"^\s*@!?(%p\d+)\s+bra(?:\.uni)?\s")


def clock_branch_problems(ptx: str) -> list:
    """Conditional branches whose predicate is computed from a thread's own %globaltimer (not through a
    value broadcast in shared memory): each thread reads its own clock, so such a branch (e.g. a wait's
    exit) splits warps and CTAs between the CTA barriers of a wait."""
    writers = _writers(ptx)
    return [f"a branch depends on a thread's own %globaltimer (line {number + 1}: {line.strip()})"
            for number, line in enumerate(ptx.splitlines()) if (branch := _CONDITIONAL_BRANCH.match(line))
            and "%globaltimer" in _sources(writers, [branch.group(1)], through_shared=False)]


# A global load and its address: ld.global, or cp.async (its source, the second address; num_stages > 1).
_GLOBAL_LOAD = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld\.global[\w.]*|cp\.async\.\w+\.shared\.global[\w.]*)\s"
                          r"(?:\[[^\]]*\],\s*)?[^\[]*\[\s*(%rd\d+)")


def state_loads(ptx: str, ring_param: str) -> list:
    """The loads of state other programs wrote: [(line number, opcode)] of every global load from the ring
    (its address computed from `ring_param`) whose address does not depend on %ctaid.x. A program's
    columns are picked by program_id(0) (%ctaid.x): the state^T tile a step multiplies spans every column
    (the whole group wrote it), while a row that keeps its state re-reads the program's own columns,
    which it wrote itself behind a CTA barrier (that load may use L1)."""
    writers, loads = _writers(ptx), []
    for number, line in enumerate(ptx.splitlines()):
        if (load := _GLOBAL_LOAD.match(line)):
            sources = _sources(writers, [load.group(2)])
            if ring_param in sources and "%ctaid.x" not in sources:
                loads.append((number + 1, load.group(1)))
    return loads


def state_load_problems(ptx: str, ring_param: str) -> list:
    """Every load of state other programs wrote (state_loads) must bypass L1 (ld.global.cg: an L1 line
    holds what this SM read before the other programs' stores, which their release and our acquire do not
    invalidate for plain loads on every architecture); there must be some."""
    loads = state_loads(ptx, ring_param)
    if not loads:
        return [f"no load of the state other programs wrote (from {ring_param})"]
    return [f"a state load that may hit a stale L1 line (line {number}: {opcode}, not .cg)"
            for number, opcode in loads if ".cg" not in opcode]


def compile_probe(barrier_kind: str, target=HOPPER) -> dict:
    """Compile the calibration's barrier probe (kernels/persistent.py, empty steps at the group
    barrier) for `target`: its barrier instructions and whether the cluster pair sits in the loop."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = persistent.barrier_probe_kernel
    counter = barrier_kind == "counter"  # the cluster form has no sync words
    signature = {"p_sync": "*i32" if counter else "constexpr", "STEPS": "i32", "wait_limit": "i32",
                 "BARRIER": "constexpr", "TIMER": "constexpr"}
    constants = {"BARRIER": barrier_kind, "TIMER": True, **({} if counter else {"p_sync": None})}
    source = ASTSource(fn, signature, constants, {(0,): [["tt.divisibility", 16]]} if counter else {})
    ptx = triton.compile(source, target=GPUTarget("cuda", *target), options={"num_warps": 4}).asm["ptx"]
    return {"barrier": barrier_instructions(ptx), "cluster_barrier_in_loop": cluster_barrier_in_loop(ptx),
            "clock_branch_problems": clock_branch_problems(ptx)}


# The group barriers' instructions: the cluster barrier, and the counter barrier's release arrival
# and acquire poll (with their predicates: the counter barrier's are one thread's). The arrival's result
# is unused: Triton 3.6 to 3.8 emit it as atom, 3.9 as red.
_BARRIER = re.compile(r"^\s*(@!?%p\d+\s+)?((?:barrier\.cluster|(?:atom|red)\.global\.gpu\.release|ld\.global\.gpu\.acquire)"
                      r"[\w.]*)")
_LABEL = re.compile(r"^(\$L\w+):")
_BRANCH = re.compile(r"^\s*(@!?%p\d+\s+)?bra(?:\.uni)?\s+(\$L\w+);")


def _mnemonic(instruction: str) -> str:
    """barrier.cluster.arrive.release.aligned -> barrier.cluster.arrive.release; atom...add.u32 -> ...add."""
    return re.sub(r"\.[usbf]\d+$", "", instruction.removesuffix(".aligned"))


def barrier_instructions(ptx: str) -> list:
    """The group barrier's instructions in the PTX, in order of first appearance."""
    found = [_mnemonic(m.group(2)) for line in ptx.splitlines() if (m := _BARRIER.match(line))]
    return list(dict.fromkeys(found))


def ptx_blocks(ptx: str) -> tuple:
    """The PTX's basic blocks (lists of lines, split at every label and after every branch) and each
    block's successors (a branch's target; the next block unless the branch is unconditional or ret)."""
    blocks, labels, current = [], {}, []
    for line in ptx.splitlines():
        label = _LABEL.match(line)
        if label:
            blocks.append(current)
            current = []
            labels[label.group(1)] = len(blocks)
        current.append(line)
        if _BRANCH.match(line) or line.strip() in ("ret;", "exit;"):
            blocks.append(current)
            current = []
    blocks.append(current)
    successors = []
    for index, block in enumerate(blocks):
        last = block[-1] if block else ""
        branch = _BRANCH.match(last)
        after = [] if (branch and not branch.group(1)) or last.strip() in ("ret;", "exit;") else [index + 1]
        successors.append(([labels[branch.group(2)]] if branch else []) + [i for i in after if i < len(blocks)])
    return blocks, successors


def cluster_barrier_in_loop(ptx: str) -> bool:
    """Whether the PTX holds barrier.cluster.arrive.release then barrier.cluster.wait.acquire, neither
    predicated (`.aligned`: every thread executes them), in one basic block that lies on a cycle of
    the control-flow graph (the step loop): the block is reachable from its own successors."""
    blocks, successors = ptx_blocks(ptx)
    for index, block in enumerate(blocks):
        arrivals = [n for n, line in enumerate(block) if (m := _BARRIER.match(line)) and not m.group(1)
                    and _mnemonic(m.group(2)) == "barrier.cluster.arrive.release"]
        waits = [n for n, line in enumerate(block) if (m := _BARRIER.match(line)) and not m.group(1)
                 and _mnemonic(m.group(2)) == "barrier.cluster.wait.acquire"]
        if not (arrivals and waits and arrivals[0] < waits[-1]):
            continue
        seen, todo = set(), list(successors[index])
        while todo:
            block_index = todo.pop()
            if block_index == index:
                return True
            if block_index not in seen:
                seen.add(block_index)
                todo.extend(successors[block_index])
    return False


def resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump gave no resource usage:\n{text}")
    registers, stack, shared, local = map(int, match.groups())
    return {"registers": registers, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def available() -> bool:
    """Whether this triton install can compile for NVIDIA GPUs offline (its bundled ptxas)."""
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


NUMERICS = ((torch.float32, True), (torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
            (torch.float64, False))  # every dtype, fp32 in TF32 and in 3xTF32


def default_variants() -> list:
    """The variants with default configs: every dtype and fp32 precision; the sequence path at the
    largest and a small H, the stepwise path at H = 1024, the persistent path at every standard-grid
    H it takes by default, the cluster and streamed paths where the model weighs them; forward (and
    packed) and backward."""
    variants = []
    for dtype, tf32 in NUMERICS:
        shapes = [("sequence", h) for h in sorted({configs.SEQUENCE_MAX_H[dtype.itemsize], 32})]
        shapes += [("stepwise", 1024)]
        shapes += [("persistent", h) for h in PERSISTENT_HIDDENS
                   if configs.default_layout(h, dtype, tf32) == "persistent"]
        shapes += [("cluster", h) for h in CLUSTER_HIDDENS if configs.layout_fits("cluster", h, dtype, tf32)]
        shapes += [("streamed", h) for h in STREAMED_HIDDENS if h <= configs.max_hidden("streamed", dtype, tf32)]
        for path, hidden in shapes:
            common = dict(path=path, dtype=dtype, batch=256, hidden=hidden, allow_tf32=tf32)
            variants += [dict(common, lengths=True), dict(common, backward=True, lengths=path != "stepwise")]
            if path == "persistent":  # unpacked input, the common launch: its own compiled variant
                variants += [dict(common, lengths=False)]
    return variants


CLUSTER_HIDDENS = (256, 512, 1024)  # where the cluster form fits: 4 to 16 CTAs a cluster
STREAMED_HIDDENS = (1024, 2048)  # where the model weighs the streamed layout (configs.STREAMED_MIN_H)


PERSISTENT_HIDDENS = tuple(h for h in grid.HIDDENS if h > 128)  # H = 128 takes the sequence path


def persistent_fit(variants: list, limits: occupancy.SMLimits = occupancy.SMLimits()) -> list:
    """For every standard-grid cell on the persistent path: programs resident per SM (from the
    compiled forward and backward variants' registers, warps and shared memory), the resident
    capacity, and the plan the launcher chooses there (which never exceeds it)."""
    rows = []
    for dtype_name in grid.DTYPES:
        dtype = getattr(torch, dtype_name)
        for hidden in PERSISTENT_HIDDENS:
            if configs.default_layout(hidden, dtype) != "persistent":
                continue
            compiled = [v for v in variants if v.get("role", "default") == "default" and v["path"] == "persistent"
                        and v["dtype"] == dtype_name and int(v["hidden"]) == hidden
                        and (dtype_name != "float32" or v["allow_tf32"] == "True")]
            per_sm = min(occupancy.programs_per_sm(v["registers"], v["num_warps"], v["shared_bytes"], limits)
                         for v in compiled)
            for batch in grid.BATCHES:
                config = configs.default_config("persistent", batch, hidden, dtype)
                chosen = occupancy.plan(batch, hidden, config.kwargs["BLOCK_B"], config.kwargs["BLOCK_N"],
                                         per_sm * limits.sms)
                rows.append({"dtype": dtype_name, "batch": batch, "hidden": hidden, "variants": len(compiled),
                             "registers": max(v["registers"] for v in compiled),
                             "shared_bytes": max(v["shared_bytes"] for v in compiled),
                             "num_warps": compiled[0]["num_warps"], "programs_per_sm": per_sm,
                             "capacity": per_sm * limits.sms, "config": configs.config_to_dict(config),
                             "plan": {k: v for k, v in dataclasses.asdict(chosen).items() if k != "cluster"}})
    return rows


def summary(variants: list) -> str:
    """One line per path of the default variants: how many, spilled, FMA-only, on wgmma / mma.sync,
    registers, and any barrier problem: what CI prints under each Triton release."""
    lines = [f"Triton {triton.__version__}, sm_90, default variants:"]
    for path in dict.fromkeys(v["path"] for v in variants if v["role"] == "default"):
        rows = [v for v in variants if v["role"] == "default" and v["path"] == path]
        wgmma = sum(any(m.startswith("wgmma") for m in v["mma"]) for v in rows)
        registers = [v["registers"] for v in rows]
        lines.append(f"  {path:10s} {len(rows):3d} variants, {sum(v['stack_bytes'] > 0 for v in rows)} spill, "
                     f"{sum(bool(v['fma_only']) for v in rows)} FMA-only, {wgmma} wgmma, "
                     f"{sum(bool(v['mma']) for v in rows) - wgmma} mma.sync, registers {min(registers)}-{max(registers)}, "
                     f"{sum(bool(v.get('barrier_problems')) for v in rows)} with barrier problems")
    return "\n".join(lines)


def fit_table(rows: list) -> str:
    """persistent_fit's rows as the markdown table of perf/NOTES.md."""
    lines = ["| dtype | H | B | BLOCK_B x BLOCK_N, K_SPLIT, warps | regs | shared | per SM | capacity "
             "| programs/group x groups | batch tiles/group | programs |", "|" + "---|" * 11]
    for r in rows:
        c, p = r["config"], r["plan"]
        lines.append(f"| {r['dtype']} | {r['hidden']} | {r['batch']} | {c['BLOCK_B']} x {c['BLOCK_N']}, "
                     f"{c['K_SPLIT']}, {c['num_warps']} | {r['registers']} | {r['shared_bytes'] // 1024} KB | "
                     f"{r['programs_per_sm']} | {r['capacity']} | {p['programs_per_group']} x {p['groups']} | "
                     f"{p['batch_tiles']} | {p['programs_per_group'] * p['groups']} |")
    return "\n".join(lines)


def limit_variants() -> list:
    """What a launch may ask for at the edge of the shared-memory budget: per dtype, precision and
    path, the largest power-of-two H the path accepts (layout_fits) with the config of its tuning space
    that needs the most shared memory (by configs.shared_memory_bytes); forward, packed."""
    variants = []
    for dtype, tf32 in NUMERICS:
        for path in configs.TUNED_LAYOUTS:
            hidden = max(h for h in (32, 64, 128, 256, 512, 1024) if configs.layout_fits(path, h, dtype, tf32))
            space = configs.tuning_space(path, 256, hidden, dtype, tf32)
            config = max(space, key=lambda c: configs.shared_memory_bytes(path, c, hidden, dtype, tf32))
            variants.append(dict(path=path, dtype=dtype, batch=256, hidden=hidden, allow_tf32=tf32, lengths=True,
                                 config=config))
    return variants


def edge_variants() -> list:
    """The sequence path just past the largest H = 128 of fp32 and fp64 (H = 200, BLOCK_H 256, default
    config): whether each loads is what layout_fits must answer (fp32 and fp64 do not, 16-bit does)."""
    return [dict(path="sequence", dtype=dtype, batch=256, hidden=200, allow_tf32=tf32, lengths=True)
            for dtype, tf32 in NUMERICS]


def _variant_line(role: str, variant: dict) -> str:
    """One JSON line of `main`: a variant's compile, with the shared memory the budget model predicts."""
    import json

    result = compile_kernel(**variant)
    config = variant.get("config") or configs.default_config(variant["path"], variant["batch"], variant["hidden"],
                                                             variant["dtype"])
    modelled = configs.shared_memory_bytes(variant["path"], config, variant["hidden"], variant["dtype"],
                                           variant["allow_tf32"])
    described = {k: str(v).removeprefix("torch.") for k, v in variant.items() if k != "config"}
    return json.dumps({"role": role, **described, **result, "modelled_shared_bytes": modelled})


def main(argv=None) -> None:
    """Compile the default, limit and edge variants (and the barrier probe) for sm_90 and print one
    JSON line each (run without TRITON_INTERPRET: the compiler needs the real @triton.jit objects). Each line carries
    the shared memory the budget model predicts ("modelled_shared_bytes") next to the compiler's. Variants
    compile in one process per core (each compile is single-threaded; lines keep their order)."""
    import argparse
    import json
    from concurrent.futures import ProcessPoolExecutor

    argparse.ArgumentParser(prog="python -m tritonrnn.perf.static", description=main.__doc__.split(". ")[0] + ".",
                            epilog=__doc__.split("\n\n")[0]).parse_args(argv)  # --help: before any compile

    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels the compiler needs")
    work = [(role, variant) for role, variants in (("default", default_variants()), ("limit", limit_variants()),
                                                   ("edge", edge_variants())) for variant in variants]
    with ProcessPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        for line in pool.map(_variant_line, *zip(*work, strict=True)):
            print(line, flush=True)
    for kind in ("cluster", "counter"):  # the calibration's barrier probe
        print(json.dumps({"role": "probe", "path": "barrier_probe", "barrier_kind": kind, **compile_probe(kind)}),
              flush=True)


if __name__ == "__main__":
    main()
