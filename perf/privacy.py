"""Differentially private training's benchmark: one training step of a tritonrnn.RNN classifier
(RNN -> linear head on h_n -> cross-entropy) in three modes, time and peak memory.

    non-private   loss.backward(), SGD step
    per-sample    Opacus's hooks mode: every per-sample gradient [B, *param] materialised, then
                  DPOptimizer clips each and sums (noise 0: the same work as with noise, less the RNG)
    ghost         Opacus's ghost clipping: the norm sampler's per-sample norms (T x T Gram products, no
                  [B, H, H] tensor), then a second backward of the loss reweighted by the clipping factors

    python -m tritonrnn.perf.privacy                  # the issue's case: B=64, H=512, T=128, fp32 (a GPU)
    TRITON_INTERPRET=1 python -m tritonrnn.perf.privacy --batch 4 --hidden 32 --seq-len 6 --input-size 32

Peak memory as perf/output_layer.py measures it: CUDA's allocator peak above what was allocated before
the step; on the CPU the TensorMemoryTracker peak of the tensor storages the step creates.
"""
import argparse
import datetime
import json
import re
from pathlib import Path

import torch
import triton
from torch import nn

import tritonrnn
from . import measure
from .output_layer import peak_memory, step_table
from .providers import DTYPES

MODES = ("non-private", "per-sample", "ghost")


class Classifier(nn.Module):
    """tritonrnn.RNN, then a linear head on the last layer's h_n."""

    def __init__(self, input_size: int, hidden: int, classes: int, dtype, device):
        super().__init__()
        self.rnn = tritonrnn.RNN(input_size, hidden, batch_first=True, dtype=dtype, device=device)
        self.head = nn.Linear(hidden, classes, dtype=dtype, device=device)

    def forward(self, x):
        _, h_n = self.rnn(x)
        return self.head(h_n[-1])


def training_step(mode: str, model: nn.Module, x, y, max_grad_norm: float = 1.0):
    """A callable running one training step of `mode` (see the module docstring) on (x, y)."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    criterion = nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    batch = x.shape[0]
    if mode == "non-private":
        module, optimizer = model, sgd
    elif mode == "per-sample":
        module = GradSampleModule(model)
        optimizer = DPOptimizer(sgd, noise_multiplier=0.0, max_grad_norm=max_grad_norm, expected_batch_size=batch)
    elif mode == "ghost":
        module = GradSampleModuleFastGradientClipping(model, max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(sgd, noise_multiplier=0.0, max_grad_norm=max_grad_norm,
                                                    expected_batch_size=batch)
        criterion = DPLossFastGradientClipping(module, optimizer, nn.CrossEntropyLoss(reduction="mean"))
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(module(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    step.module = module
    return step


def privacy_rows(batch: int = 64, hidden: int = 512, seq_len: int = 128, input_size: int = None,
                 classes: int = 10, dtype: str = "float32", device=None, timer=None, modes=MODES) -> list:
    """One row per mode: time of a training step, its peak memory, and the clipped gradient's largest
    difference from the per-sample mode's (ghost: the same clipping, computed without the gradients)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timer = timer or measure.timer_for(device)
    input_size = input_size or hidden
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, seq_len, input_size, generator=generator, device=device).to(DTYPES[dtype])
    y = torch.randint(0, classes, (batch,), generator=generator, device=device)
    results, reference = [], None
    for mode in modes:
        torch.manual_seed(0)
        model = Classifier(input_size, hidden, classes, DTYPES[dtype], device)
        row = {"case": f"dp-B{batch}-T{seq_len}-I{input_size}-H{hidden}", "group": "privacy", "dtype": dtype,
               "batch": batch, "seq_len": seq_len, "input_size": input_size, "hidden": hidden, "mode": mode,
               "backend": tritonrnn.backend(device),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": triton.__version__, "status": "ok", "error": None}
        try:
            step = training_step(mode, model, x, y)
            row["peak_memory_bytes"] = peak_memory(step, device)
            row["loss"] = step().item()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            if mode != "non-private":
                if reference is None:
                    reference = grads
                else:
                    row["max_rel_error"] = ((grads - reference).abs().max() / reference.abs().max()).item()
            row.update(timer(step))
        except Exception as exc:  # noqa: BLE001 - a row per failure, e.g. out of memory
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        results.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def format_rows(results: list) -> str:
    """A text table of privacy_rows' results."""
    lines = step_table(results, "mode", 12, ".2f")
    if any(r["backend"] == "triton-interpreter" for r in results):
        lines.append("(CPU: the kernels ran in Triton's interpreter; times are not a speed measurement)")
    elif any(r["backend"] == "torch" for r in results):
        lines.append("(CPU without TRITON_INTERPRET: torch's own RNN and the PyTorch reference, not the kernels)")
    return "\n".join(lines)


def run_to_file(directory: Path, command: str = "", **kwargs) -> tuple[list, Path]:
    """privacy_rows(**kwargs), written to directory/privacy-<device>-<time>.json."""
    rows = privacy_rows(**kwargs)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(directory) / f"privacy-{re.sub(r'[^A-Za-z0-9]+', '_', rows[0]['device'])}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    return rows, path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonrnn.perf.privacy", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=None, help="default: the hidden size")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--out-dir", type=Path, default=None, help="also write the rows as JSON there")
    args = parser.parse_args(argv)
    kwargs = dict(batch=args.batch, hidden=args.hidden, seq_len=args.seq_len, input_size=args.input_size,
                  dtype=args.dtype)
    if args.out_dir is not None:
        rows, path = run_to_file(args.out_dir, " ".join(["python -m tritonrnn.perf.privacy", *(argv or [])]), **kwargs)
        print(f"wrote {path}")
    else:
        rows = privacy_rows(**kwargs)
    print(format_rows(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
