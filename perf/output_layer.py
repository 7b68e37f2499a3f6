"""The output layer's benchmark: tritonrnn.functional.linear_cross_entropy against
F.cross_entropy(F.linear(...)), forward + backward, time and peak memory.

    output_layer_rows(rows=(8192, 16384, 32768), vocab=32768, hidden=1024, dtype="bfloat16")

Peak memory on CUDA is the caching allocator's peak above what was allocated before the call. On
the CPU (the interpreter: times there are not a speed measurement) it is TensorMemoryTracker's
peak: the bytes of every tensor storage created during the call and still alive, at their largest.
"""
import datetime
import json
import re
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import tritonrnn
from tritonrnn.functional import linear_cross_entropy
from . import measure
from .providers import DTYPES
from .table import Columns

ROWS = (8192, 16384, 32768)  # the row counts T*B `bench --output-layer` measures by default
INTERPRETER_MAX_LOGITS = 1 << 22  # rows x vocabulary the interpreter gets through in about a minute
OUTPUT_PROVIDERS = ("torch", "tritonrnn")  # the first is the reference of max_rel_error
KIND = "output-layer"  # results files say what they hold: `tritonrnn report` renders this kind in its own section
REQUIRED_TYPES = {"case": (str,), "dtype": (str,), "provider": (str,), "status": (str,), "rows": (int,),
                  "vocab": (int,), "hidden": (int,)}
OPTIONAL_TYPES = {"device": (str,), "backend": (str,), "error": (str,), "median_ms": (int, float),
                  "peak_memory_bytes": (int, float), "loss": (int, float), "max_rel_error": (int, float)}


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created by torch ops inside the `with` block, on
    the CPU: each new storage is counted when an op returns it and uncounted when it is freed (a
    weakref finalizer). Custom ops (tritonrnn::...) are run with the mode still on, so the buffers
    they allocate inside count too. Memory that is not a torch tensor (e.g. the Triton
    interpreter's numpy tiles) is not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "aten":
            out = func(*args, **kwargs)
        else:  # a custom op: run its implementation with this mode on, to see the tensors it makes
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    self._seen[storage] = nbytes = storage.nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, nbytes)
        return out

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated by one call of fn above what was allocated before it."""
    if device.type == "cuda":
        return measure.peak_memory(fn, device)
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak


def loss_fn(provider: str, chunk_size=None):
    """The loss of a provider: (h, weight, bias, target) -> scalar mean cross-entropy."""
    if provider == "tritonrnn":
        return lambda h, weight, bias, target: linear_cross_entropy(h, weight, bias, target, chunk_size=chunk_size)
    return lambda h, weight, bias, target: F.cross_entropy(F.linear(h, weight, bias), target)


def problem(rows: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Fresh random rows, weights and targets, with gradients required (a language model's output layer)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape, scale: (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)
    return {"h": rand(rows, hidden, scale=1.0).requires_grad_(),
            "weight": rand(vocab, hidden, scale=hidden ** -0.5).requires_grad_(),
            "bias": rand(vocab, scale=0.1).requires_grad_(),
            "target": torch.randint(0, vocab, (rows,), generator=generator, device=device)}


def training_step(provider: str, p: dict, chunk_size=None):
    """A callable running forward + backward of the loss into fresh gradients; returns the loss."""
    fn = loss_fn(provider, chunk_size)
    leaves = (p["h"], p["weight"], p["bias"])

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss = fn(p["h"], p["weight"], p["bias"], p["target"])
        loss.backward()
        return loss

    return step


def output_layer_rows(rows=ROWS, vocab: int = 32768, hidden: int = 1024, dtype: str = "bfloat16",
                      device=None, timer=None, providers=OUTPUT_PROVIDERS) -> list:
    """One result row per (rows, provider): time of forward + backward, peak memory, the loss and
    the largest gradient error relative to torch's (same inputs). Failures (e.g. out of memory)
    become rows with status "error"."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timer = timer or measure.timer_for(device)
    results = []
    for n in rows:
        p = problem(n, vocab, hidden, DTYPES[dtype], device)
        reference = None
        for provider in providers:
            row = {"case": f"output-N{n}-V{vocab}-H{hidden}", "group": "output-layer", "dtype": dtype, "rows": n,
                   "vocab": vocab, "hidden": hidden, "mode": "training", "provider": provider,
                   "backend": tritonrnn.backend(device) if provider == "tritonrnn" else "torch",
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "triton": triton.__version__,
                   "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                   "status": "ok", "error": None}
            try:
                step = training_step(provider, p)
                row["peak_memory_bytes"] = peak_memory(step, device)
                row["loss"] = step().item()
                grads = [p[k].grad.float() for k in ("h", "weight", "bias")]
                if reference is None:
                    reference = grads
                else:
                    row["max_rel_error"] = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                                               for a, b in zip(grads, reference, strict=True))
                row.update(timer(step))
            except Exception as exc:  # noqa: BLE001 - a row per failure, e.g. torch out of memory
                row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
            results.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def run_to_file(directory: Path, command: str = "", dtypes=("bfloat16",), **kwargs) -> tuple[list, Path]:
    """output_layer_rows(dtype=d, **kwargs) for each of `dtypes`, written to
    directory/output_layer-<device>-<time>.json (a file of its own kind: `tritonrnn report` renders it
    in a section of its own)."""
    rows = [row for dtype in dtypes for row in output_layer_rows(dtype=dtype, **kwargs)]
    device = rows[0]["device"] if rows else "none"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(directory) / f"output_layer-{re.sub(r'[^A-Za-z0-9]+', '_', device)}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": KIND, "command": command, "rows": rows}, indent=1))
    return rows, path


def is_results_file(path) -> bool:
    """Whether `path` holds output-layer results (by its kind; files from before the kind field: by
    their rows' group), not grid results or anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict):
        return False
    rows = data.get("rows")
    return data.get("kind") == KIND or (isinstance(rows, list) and bool(rows) and
                                        all(isinstance(r, dict) and r.get("group") == "output-layer" for r in rows))


def load(paths) -> list:
    """Rows of output-layer results files; ValueError naming the file (and field) that is wrong."""
    from .bench import check_types

    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text()) if is_results_file(path) else None
        if not data or not data.get("rows"):
            raise ValueError(f"{path} is not an output-layer results file (`tritonrnn bench --output-layer`)")
        check_types(path, data["rows"], REQUIRED_TYPES, OPTIONAL_TYPES)
        rows += data["rows"]
    return rows


def _number(value, spec: str, divisor: float = 1) -> str:
    return "-" if value is None else format(value / divisor, spec)


def step_table(results: list, label: str, width: int, mib: str) -> list:
    """The lines of a table of timed training steps (this benchmark's, privacy's): case, the rows' field
    `label` (`width` wide), median ms, peak MiB (format spec `mib`), loss, status."""
    columns = Columns(("case", "<28"), (label, f"<{width}"), ("median ms", ">10"), ("peak MiB", ">10"),
                      ("loss", ">8"), rest="status", gap="  ")
    return [columns.header()] + [
        columns.line(r["case"], r[label], _number(r.get("median_ms"), ".3f"),
                     _number(r.get("peak_memory_bytes"), mib, 2 ** 20), _number(r.get("loss"), ".4f"),
                     f"{r['status']}{': ' + r['error'] if r['error'] else ''}") for r in results]


def format_rows(results: list) -> str:
    """A text table of output_layer_rows' results."""
    lines = step_table(results, "provider", 10, ".1f")
    if any(r["backend"] == "triton-interpreter" for r in results):
        lines.append("(CPU: tritonrnn ran in Triton's interpreter; its times are not a speed measurement)")
    return "\n".join(lines)


def command(rows=(), vocab: int = 32768, hidden: int = 1024, dtypes=(), out_dir=None, command_line: str = ""):
    """`tritonrnn bench --output-layer`: output_layer_rows at `rows` (default ROWS) for each of `dtypes` (default
    bfloat16), written to out_dir (default: where bench writes); returns an Outcome: the table and where the
    results went, not ok if a row failed. UsageError where it cannot run here (no GPU and no interpreter, or
    sizes the interpreter would take hours on)."""
    from tritonrnn.dispatch import interpreter_enabled
    from . import Outcome, UsageError, bench_output_dir

    rows = tuple(rows) or ROWS
    if not torch.cuda.is_available():
        if not interpreter_enabled():
            raise UsageError("--output-layer needs a CUDA GPU; without one, TRITON_INTERPRET=1 with small sizes "
                             "(e.g. --output-layer 256 --vocab 2048 --hidden 64) checks it on the CPU")
        if max(rows) * vocab > INTERPRETER_MAX_LOGITS:
            raise UsageError(f"{max(rows)} rows x {vocab} classes under the interpreter would take hours; "
                             f"keep rows x vocabulary within {INTERPRETER_MAX_LOGITS}")
    results, path = run_to_file(out_dir or bench_output_dir(), command_line, dtypes=tuple(dtypes) or ("bfloat16",),
                                rows=rows, vocab=vocab, hidden=hidden)
    failed = [r for r in results if r["status"] != "ok"]
    return Outcome([format_rows(results), f"results: {path} ({len(results)} rows, {len(failed)} failed)"],
                   ok=not failed)


def compile_for_hopper() -> list:
    """The output kernel's GPU variants (kernels/output.py's launch config at V = 32768) compiled
    offline for sm_90: registers, spilled bytes, shared memory. Run without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tritonrnn.kernels import output
    from .static import HOPPER, _POINTER, resource_usage

    fn = output.cross_entropy_kernel.fn  # below @triton.heuristics
    block_c, block_v, num_warps = output._blocks(32768, torch.device("cuda"))
    results = []
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        for write_grad, scale, smoothing in ((False, False, False), (True, True, True)):
            signature = {"p_logits": _POINTER[dtype], "p_target": "*i64", "p_scale": acc if scale else "constexpr",
                         "p_smoothing": acc if smoothing else "constexpr", "p_loss": acc, "C": "i32", "V": "i32",
                         "stride_c": "i32", "ignore_index": "i32"}
            constants = {"BLOCK_C": block_c, "BLOCK_V": block_v, "WRITE_GRAD": write_grad, "HAS_SCALE": scale,
                         "HAS_SMOOTHING": smoothing, "ACC_DTYPE": output._ACC.get(dtype, output.tl.float32)}
            constants.update({name: None for name in ("p_scale", "p_smoothing") if signature[name] == "constexpr"})
            compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", *HOPPER),
                                      options={"num_warps": num_warps})
            results.append({"dtype": str(dtype).removeprefix("torch."), "write_grad": write_grad, "scale": scale,
                            "smoothing": smoothing, **resource_usage(compiled.asm["cubin"])})
    return results


def main(argv=None) -> None:
    """python -m tritonrnn.perf.output_layer: the output kernel's GPU variants compiled offline for sm_90 (no GPU
    needed; run without TRITON_INTERPRET), one JSON line each: registers, spilled bytes, shared memory. The
    benchmark itself is `tritonrnn bench --output-layer`."""
    import argparse

    argparse.ArgumentParser(prog="python -m tritonrnn.perf.output_layer",
                            description=main.__doc__.split(": ", 1)[1]).parse_args(argv)  # --help: before compiling
    for variant in compile_for_hopper():
        print(json.dumps(variant), flush=True)


if __name__ == "__main__":
    main()
