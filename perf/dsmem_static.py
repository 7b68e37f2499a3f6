"""Compile the distributed-shared-memory kernel (kernels/dsmem.py, Gluon, Triton >= 3.9) for sm_90a
without a GPU, and check its exchange in the PTX.

    python -m tritonrnn.perf.dsmem_static      # one JSON line a variant (defaults, then the test mutants)

The variants: the forward and the backward (M = W_hh), with and without lengths (kernels/dsmem.py).

exchange_problems(ptx, ...) lists what is wrong with the exchange (empty: nothing):
- push: every st.async of the step loop is `st.async.shared::cluster.mbarrier::complete_tx::bytes`, its
  address an offset from a `mapa.shared::cluster` result (the peer's slot) and its mbarrier a `mapa`
  result (the peer's mbarrier), both mapped to the same rank; S pushes, to ranks 0 .. S-1 (immediates
  the block sets), and the bytes they send (st.async's width x threads x S) are what each CTA's
  mbarrier is armed to expect (the expect_tx immediate);
- wait: a try_wait.parity spin (acquire, cluster scope) on a local mbarrier in the step loop, the one
  the loop arms, before every shared-memory read of the loop (no path from the loop's entry to an
  ldmatrix / ld.shared avoids it);
- parity: the wait's parity and its mbarrier's address change with the step (both computed from the
  loop's counter: two mbarriers, each phase awaited in turn), not constants;
- global: no global access on the exchange path (the pushes, the arming and wait, the wait to the
  first MMA) and no global atomic, fence or acquire load anywhere in the kernel;
- init: fence.mbarrier_init.release.cluster, then the cluster barrier's arrive and wait, before the
  first push.
A text check of Triton 3.9's lowering, like perf/static.py's: blocks split at labels and branches.
Run without TRITON_INTERPRET (the compiler needs the real kernels).
"""
import json
import os
import re

import triton

from tritonrnn.kernels import dsmem

from .static import HOPPER, ptx_blocks, resource_usage

_DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
# The default variants: (dtype, H, S, backward, lengths, reverse); B = 16 (one batch tile), tanh. The
# forward without lengths at every shape; the backward (walking T-1 .. 0, as after a forward walking
# 0 .. T-1) and lengths at the smallest and largest slices.
DEFAULT_VARIANTS = tuple((d, h, s, False, False, False) for d, h, s in (
    ("bf16", 256, 4), ("bf16", 512, 8), ("bf16", 1024, 16), ("bf16", 256, 2), ("bf16", 256, 16), ("fp32", 256, 4),
    ("fp32", 512, 8))) + (
    ("bf16", 256, 4, True, False, True), ("bf16", 256, 4, False, True, True), ("bf16", 256, 4, True, True, True),
    ("bf16", 1024, 16, False, True, False), ("bf16", 1024, 16, True, True, True), ("fp32", 512, 8, False, True, True),
    ("fp32", 512, 8, True, True, True))
MUTANTS = ("no_wait", "fixed_phase")  # kernels/dsmem.py's DEBUG_MUTATION, on bf16 H = 256, S = 4


def compile_variant(dtype: str = "bf16", hidden: int = 256, cluster: int = 4, cell: str = "tanh",
                    mutation: str = "", target=HOPPER, num_warps: int = None, backward: bool = False,
                    lengths: bool = False, reverse: bool = False) -> dict:
    """Compile elman_dsmem_kernel at its default config (`num_warps` overrides its warps) for `target`
    (sm_90: the cubin is sm_90a's, the arch Triton picks for Hopper), the forward or the `backward`, with
    or without `lengths`; its resources, MMA instructions and PTX."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    element_bytes = _DTYPES[dtype]
    config = dsmem.default_config(hidden, cluster, element_bytes)
    config["num_warps"] = num_warps or config["num_warps"]
    # The pointers each variant takes (the others are None: constexprs): h0 and h_n in the forward, h_t of
    # the forward in the backward, the lengths where given.
    pointers = {"p_xw": dtype, "p_w": dtype, "p_h0": None if backward else dtype, "p_act": dtype if backward else None,
                "p_out": dtype, "p_hn": None if backward else dtype, "p_len": "i32" if lengths else None}
    signature = {name: f"*{kind}" if kind else "constexpr" for name, kind in pointers.items()}
    signature.update({"T": "i32", "B": "i32"})
    constants = {name: None for name, kind in pointers.items() if kind is None}
    constants.update({"H": hidden, "CLUSTER": cluster, "BLOCK_B": config["BLOCK_B"], "BLOCK_K": config["BLOCK_K"],
                      "CELL": cell, "INPUT_PRECISION": "tf32" if dtype == "fp32" else None, "BACKWARD": backward,
                      "REVERSE": reverse, "HAS_LENGTHS": lengths, "DEBUG_MUTATION": mutation})
    signature.update({name: "constexpr" for name in constants})
    # aligned, as torch allocates
    attrs = {(index,): [["tt.divisibility", 16]] for index, kind in enumerate(pointers.values()) if kind}
    compiled = triton.compile(GluonASTSource(dsmem.elman_dsmem_kernel, signature, constants, attrs),
                              target=GPUTarget("cuda", *target), options={"num_warps": config["num_warps"]})
    ptx = compiled.asm["ptx"]
    return {"dtype": dtype, "hidden": hidden, "cluster": cluster, "cell": cell, "mutation": mutation,
            "backward": backward, "lengths": lengths, "reverse": reverse, **config,
            **resource_usage(compiled.asm["cubin"]), "shared_bytes": compiled.metadata.shared,
            "arch": re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1),
            "mma": sorted(set(re.findall(r"(wgmma\.mma_async\.[\w.]+|mma\.sync\.[\w.]+)", ptx))),
            "expect_bytes": dsmem.state_slot_bytes(config["BLOCK_B"], hidden, element_bytes), "ptx": ptx}


def variant_problems(variant: dict) -> list:
    """exchange_problems of a compile_variant result."""
    return exchange_problems(variant["ptx"], variant["cluster"], variant["num_warps"] * 32, variant["expect_bytes"])


_ST_ASYNC = re.compile(r"^\s*(@!?%p\d+\s+)?st\.async\.([\w:.]+)\s+\[(\S+?)\],\s*(\{[^}]*\}|\S+),\s*\[(\S+?)\];")
_ST_ASYNC_ANY = re.compile(r"\bst\.async\b")
_MAPA = re.compile(r"^\s*mapa\.shared::cluster\.u32\s+(\S+),")
_EXPECT = re.compile(r"mbarrier\.arrive\.expect_tx\.shared::cta\.b64\s+_,\s*\[(\S+?)\],\s*(\d+);")
_TRY_WAIT = re.compile(r"^\s*mbarrier\.try_wait\.parity((?:\.\w+)*)\.shared::cta\.b64\s+(\w+),\s*\[(\S+?)\],\s*(\S+);")
_SHARED_READ = re.compile(r"\b(ldmatrix\.|ld\.shared\b)")
_GLOBAL = re.compile(r"\b(ld|st|atom|red)\.global\b|\b(atom|red)\.|\bmembar\.|\bcp\.async\.bulk\.global\b")
_SYNC_ANYWHERE = re.compile(r"\b(atom|red)\.global\b|\bmembar\.|\bfence\.(acq_rel|sc)\b|\bld\.\S*acquire\b|"
                            r"\bld\.volatile\.global\b")
_DEBUG_LABEL = re.compile(r"^\$L__tmp\d+:")
_MMA = re.compile(r"\b(mma\.sync|wgmma\.mma_async)\b")
_SIZES = {"b32": 4, "f32": 4, "u32": 4, "s32": 4, "b64": 8, "f64": 8}


def _operands(line: str) -> list:
    """The registers an instruction reads and writes, in order (%r1, %rd2, named ones of inline asm)."""
    body = line.split("//")[0]
    body = re.sub(r"^\s*(@!?%?\w+\s+)?[\w:.]+", "", body, count=1)  # predicate and opcode
    return re.findall(r"%?[A-Za-z_]\w*", body)


_WRITES_NOTHING = re.compile(r"^\s*(@!?%p\d+\s+)?(st|bra|mbarrier|bar|barrier|ret|fence)\b|^\s*\.reg\b")


def _written(line: str):
    """The register an instruction writes: its first operand (ld/mov/add/mapa/bfe ...; st, bra, mbarrier
    ops and declarations write none)."""
    line = line.split("//")[0]
    ops = None if _WRITES_NOTHING.match(line) else _operands(line)
    return ops[0] if ops else None


def _definition(lines: list, end: int, register: str):
    """The line (index, text) that last wrote `register` before lines[end], or None."""
    for index in range(end - 1, -1, -1):
        if _written(lines[index]) == register:
            return index, lines[index].split("//")[0]
    return None


_MOV_IMMEDIATE = re.compile(r"^\s*mov\.[bu]32\s+(%\w+),\s*(\d+);")


def _rank(block: list, number: int, line: str, lines: list):
    """The CTA rank a mapa at block[number] maps to: its last operand, an immediate or a register set to
    one (by a mov in the block before it, else by the kernel's only writes of that register: LLVM
    reuses a constant's register across blocks); None where the text does not say."""
    rank = line.split("//")[0].split(",")[-1].strip(" ;")
    if not rank.startswith("%"):
        return int(rank) if rank.isdigit() else None
    found = _definition(block, number, rank)
    writes = [found[1]] if found else [text for text in lines if _written(text) == rank]
    values = {m.group(2) for text in writes if (m := _MOV_IMMEDIATE.match(text))}
    return int(values.pop()) if writes and len(values) == 1 and all(_MOV_IMMEDIATE.match(t) for t in writes) else None


def _loop(ptx: str) -> tuple:
    """The step loop: (blocks, successors, loop block indices, entry block index). The loop is the
    largest strongly connected set of blocks (blocks on a cycle through each other); its entry the
    block with a predecessor outside it (among the blocks reachable from the kernel's start). Debug
    labels ($L__tmp: line-table marks, never branched to) do not split blocks."""
    blocks, successors = ptx_blocks("\n".join(line for line in ptx.splitlines() if not _DEBUG_LABEL.match(line)))
    reach = []
    for start in range(len(blocks)):
        seen, todo = set(), list(successors[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(successors[node])
        reach.append(seen)
    on_cycle = {i for i in range(len(blocks)) if i in reach[i]}
    components = []
    for i in sorted(on_cycle):
        component = {j for j in on_cycle if j in reach[i] and i in reach[j]}
        if component not in components:
            components.append(component)
    loop = max(components, key=len, default=set())
    reachable = reach[0] | {0}
    entries = [j for j in loop if any(j in successors[i] for i in reachable if i not in loop)]
    return blocks, successors, loop, entries[0] if len(entries) == 1 else None


def _induction_registers(blocks: list, loop: set) -> set:
    """Registers the loop steps (`add %r, %r, imm` on itself in a loop block): its counters."""
    found = set()
    for index in loop:
        for line in blocks[index]:
            match = re.match(r"^\s*add\.[su]\d+\s+(%\w+),\s*(%\w+),\s*-?\d+;", line)
            if match and match.group(1) == match.group(2):
                found.add(match.group(1))
    return found


def _expression(block: list, end: int, register: str, depth: int = 0) -> str:
    """How the block computes `register` read at block[end], as a nested expression over the registers
    it does not define (two names for the same address compare equal)."""
    found = None if depth > 20 else _definition(block, end, register)
    if found is None:
        return register
    index, line = found
    opcode = re.match(r"^\s*(?:@!?%p\d+\s+)?([\w:.]+)", line).group(1)
    body = re.sub(r"^\s*(@!?%?\w+\s+)?[\w:.]+", "", line.split("//")[0], count=1)
    sources = [s.strip() for s in body.strip().rstrip(";").split(",")[1:]]
    operands = [_expression(block, index, s, depth + 1) if s.startswith("%") else s for s in sources]
    return f"{opcode}({', '.join(operands)})"


def _unmasked(expression: str) -> str:
    """An address without the mask Gluon applies when it passes a shared-memory descriptor to inline
    asm (and.b32 with a constant: the 24-bit, 8-byte aligned shared address)."""
    match = re.fullmatch(r"and\.b32\((.*), \d+\)", expression)
    return match.group(1) if match else expression


def _depends_on_counter(block: list, end: int, register: str, counters: set, depth: int = 0) -> bool:
    """Whether `register`, read at block[end], is computed in the block from a loop counter (or is one
    that the block does not redefine)."""
    if register in counters and _definition(block, end, register) is None:
        return True
    found = _definition(block, end, register)
    if found is None or depth > 20:
        return False
    index, line = found
    return any(_depends_on_counter(block, index, source, counters, depth + 1) for source in _operands(line)[1:]
               if source.startswith("%") and not source.startswith("%p"))


def exchange_problems(ptx: str, cluster: int, threads: int, expect_bytes: int) -> list:
    """What is wrong with the DSMEM exchange in `ptx` (the module docstring's list); empty: nothing.
    `cluster`: S; `threads`: the CTA's threads; `expect_bytes`: BLOCK_B x H x e."""
    problems = []
    lines = ptx.splitlines()
    blocks, successors, loop, entry = _loop(ptx)
    if not loop or entry is None:
        return ["no step loop with a single entry"]

    # push: st.async onto mapa'd peer addresses, S pushes, their bytes what the mbarrier expects
    per_peer, peers = {}, {}
    for index in sorted(loop):
        block = blocks[index]
        for number, line in enumerate(block):
            if not _ST_ASYNC_ANY.search(line):
                continue
            match = _ST_ASYNC.match(line)
            if not match or not match.group(2).startswith("shared::cluster.mbarrier::complete_tx::bytes"):
                problems.append(f"a st.async that does not complete its bytes on a cluster mbarrier: {line.strip()}")
                continue
            address, barrier = match.group(3), match.group(5)
            found = _definition(block, number, barrier)
            if found is None or not _MAPA.match(found[1]):
                problems.append(f"a st.async whose mbarrier is not a mapa of a peer's: {line.strip()}")
                continue
            source = _definition(block, number, address)
            slot_mapa = source and (source if _MAPA.match(source[1]) else next(
                (d for r in _operands(source[1])[1:] if (d := _definition(block, source[0], r)) and _MAPA.match(d[1])),
                None) if re.match(r"^\s*add\.[su]32\s", source[1]) else None)
            if not slot_mapa:
                problems.append(f"a st.async whose address is not in a mapa'd peer window: {line.strip()}")
                continue
            ranks = {_rank(block, *slot_mapa, lines), _rank(block, *found, lines)}
            if len(ranks) != 1:
                problems.append(f"a st.async into one CTA's slot completing another's mbarrier: {line.strip()}")
            width = match.group(2).split(".")
            size = _SIZES[width[-1]] * (int(width[-2][1:]) if width[-2].startswith("v") else 1)
            per_peer[(index, found[0])] = per_peer.get((index, found[0]), 0) + size
            peers[(index, found[0])] = ranks.pop()
    ranks = sorted(peers.values(), key=lambda rank: (rank is None, rank or 0))
    if len(per_peer) != cluster or ranks != list(range(cluster)):
        problems.append(f"pushes in the step loop to the CTAs of rank {ranks}, not one to each of the {cluster} CTAs")
    sent = {bytes_ * threads for bytes_ in per_peer.values()}
    if per_peer and sent != {expect_bytes // cluster}:
        problems.append(f"each push sends {sorted(sent)} bytes a CTA, not {expect_bytes // cluster} (expect / S)")
    expects = [(index, number, m) for index in loop for number, line in enumerate(blocks[index])
               if (m := _EXPECT.search(line))]
    if len(expects) != 1 or int(expects[0][2].group(2)) != expect_bytes:
        problems.append(f"the step loop arms its mbarrier {[int(e[2].group(2)) for e in expects]} bytes, "
                        f"expected once {expect_bytes}")

    # wait: a spin on a local mbarrier before every shared read of the loop
    waits = [(index, number, m) for index in loop for number, line in enumerate(blocks[index])
             if (m := _TRY_WAIT.match(line))]
    if len(waits) != 1:
        problems.append(f"{len(waits)} mbarrier try_wait.parity in the step loop, expected 1")
    else:
        wait_block, wait_line, match = waits[0]
        block = blocks[wait_block]
        if match.group(1) != ".acquire.cluster":
            problems.append(f"the wait acquires with '{match.group(1) or 'the default (.acquire.cta)'}', not "
                            ".acquire.cluster: the bytes come from other CTAs' st.async")
        spin = block[wait_line + 1].strip() if wait_line + 1 < len(block) else ""
        label = re.match(rf"^@!{match.group(2)}\s+bra(?:\.uni)?\s+(\w+);", spin)
        if not label or not any(line.strip() == f"{label.group(1)}:" for line in block[:wait_line]):
            problems.append("the try_wait does not spin until its phase completes")
        # No shared read on a path from the loop's entry that does not pass the wait.
        reads_before = [line for line in block[:wait_line] if _SHARED_READ.search(line)]
        seen, todo = set(), [] if wait_block == entry else [entry]
        while todo:
            node = todo.pop()
            if node in seen or node not in loop or node == wait_block:
                continue
            seen.add(node)
            reads_before += [line for line in blocks[node] if _SHARED_READ.search(line)]
            todo.extend(successors[node])
        if reads_before:
            problems.append(f"a shared-memory read in the step loop before the wait: {reads_before[0].strip()}")

        # parity: the wait's parity and mbarrier follow the step counter
        counters = _induction_registers(blocks, loop)
        parity, barrier = match.group(4), match.group(3)
        if not parity.startswith("%") or not _depends_on_counter(block, wait_line, parity, counters):
            problems.append(f"the wait's parity ({parity}) does not follow the step: the same phase every step")
        if not _depends_on_counter(block, wait_line, barrier, counters):
            problems.append(f"the wait's mbarrier ({barrier}) does not follow the step: one buffer, not two")
        armed = [e for e in expects if e[0] == wait_block and e[1] < wait_line]
        if expects and (not armed or _unmasked(_expression(block, armed[0][1], armed[0][2].group(1)))
                        != _unmasked(_expression(block, wait_line, barrier))):
            problems.append("the mbarrier the loop arms is not the one it waits on (or is armed after the wait)")

        # global: nothing global from the arming to the first MMA after the wait
        first = min((e[1] for e in expects if e[0] == wait_block), default=wait_line)
        path = []
        for line in block[first:]:
            if _MMA.search(line):
                break
            path.append(line)
        bad = [line.strip() for line in path if _GLOBAL.search(line)]
        if bad:
            problems.append(f"global memory between the arming, the wait and the MMA: {bad[0]}")
    for index in loop:
        block = blocks[index]
        pushing = [n for n, line in enumerate(block) if _MAPA.match(line) or _ST_ASYNC_ANY.search(line)]
        if pushing:
            bad = [line.strip() for line in block[pushing[0]:pushing[-1] + 1] if _GLOBAL.search(line)]
            if bad:
                problems.append(f"global memory within a push: {bad[0]}")
    anywhere = [line.strip() for line in lines if _SYNC_ANYWHERE.search(line)]
    if anywhere:
        problems.append(f"a global synchronisation in the kernel: {anywhere[0]}")

    # init: fence.mbarrier_init, then the cluster barrier's arrive and wait, before the first push (in the
    # text: the kernel's prologue is straight-line code)
    first_push = next((n for n, line in enumerate(lines) if _ST_ASYNC_ANY.search(line)), len(lines))
    marks = [next((n for n in range(first_push) if mark in lines[n]), None) for mark in
             ("fence.mbarrier_init.release.cluster", "barrier.cluster.arrive.release", "barrier.cluster.wait.acquire")]
    if None in marks or marks != sorted(marks):
        problems.append("no fence.mbarrier_init then cluster barrier (arrive, wait) before the first push")
    return problems


def main() -> None:
    """One JSON line a variant: the defaults, then the mutants (what exchange_problems must reject)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels the compiler needs")
    work = [dict(dtype=d, hidden=h, cluster=s, backward=b, lengths=n, reverse=r)
            for d, h, s, b, n, r in DEFAULT_VARIANTS]
    work += [dict(mutation=m) for m in MUTANTS]
    for variant in work:
        result = compile_variant(**variant)
        print(json.dumps({**result, "problems": variant_problems(result)}), flush=True)


if __name__ == "__main__":
    main()
