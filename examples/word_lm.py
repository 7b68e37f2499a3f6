"""A word-level language model with a large vocabulary: the fused output layer against nn.Linear +
F.cross_entropy, peak memory and time per training step.

Both models are the same Elman network on the same tritonrnn.RNN kernels, from the same seed, on
the same batches; only the output layer differs:

    fused    tritonrnn.ElmanLM: linear_cross_entropy, [chunk, V] logits at a time
    unfused  TorchElmanLM with tritonrnn.RNN: nn.Linear then F.cross_entropy on all [T*B, V] logits

The corpus is the source code of Python's standard library (words: identifiers, numbers and single
punctuation marks), read from disk: nothing to download, a vocabulary of tens of thousands. The
default vocabulary is the 16384 most frequent words (the rest map to <unk>).

    python examples/word_lm.py                          # CUDA: time and torch.cuda peak memory
    python examples/word_lm.py --steps 3 --batch 8      # CPU: the interpreter (slow)

Peak memory on CUDA is torch.cuda.max_memory_allocated above the start of the step; on the CPU
it is counted by tritonrnn.perf.output_layer.TensorMemoryTracker (every tensor storage torch
allocates during the step). CPU times run Triton's interpreter: they are not a speed measurement.
"""
import argparse
import collections
import json
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tritonrnn  # noqa: E402
from tritonrnn.lm import TorchElmanLM  # noqa: E402
from tritonrnn.perf.output_layer import peak_memory  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from char_rnn import checked_args, device_label  # noqa: E402

WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|[0-9]+|\S")


def stdlib_words(limit_files: int = 400) -> list:
    """The words of the first `limit_files` standard-library modules (sorted paths: the same corpus
    on every machine with the same Python)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:limit_files]
    words = []
    for path in files:
        words += WORD.findall(path.read_text(encoding="utf-8", errors="ignore"))
    return words


def encode(words: list, vocab_size: int) -> tuple[torch.Tensor, list]:
    """Token ids over the `vocab_size - 1` most frequent words; id 0 is <unk>."""
    vocabulary = ["<unk>"] + [w for w, _ in collections.Counter(words).most_common(vocab_size - 1)]
    index = {w: i for i, w in enumerate(vocabulary)}
    return torch.tensor([index.get(w, 0) for w in words], dtype=torch.long), vocabulary


def build(name: str, vocab_size: int, args, device: torch.device):
    torch.manual_seed(args.seed)
    cls = tritonrnn.ElmanLM if name == "fused" else TorchElmanLM
    model = cls(vocab_size, args.hidden, args.layers, reduction="sum", device=device)
    return tritonrnn.convert(model)  # the unfused model's nn.RNN runs the same tritonrnn kernels


def train(name: str, data: torch.Tensor, vocab_size: int, args, device: torch.device) -> dict:
    model = build(name, vocab_size, args, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    batches = torch.Generator().manual_seed(args.seed)
    losses, seconds, peaks = [], [], []
    for _ in range(args.steps):
        offsets = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=batches)
        window = torch.stack([data[o:o + args.seq_len + 1] for o in offsets], dim=1).to(device)  # [T+1, B]
        result = {}

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = model(window[:-1], window[1:]) / args.batch  # summed over time, averaged over the batch
            loss.backward()
            result["loss"] = loss.item() / args.seq_len

        tic = time.perf_counter()
        peaks.append(peak_memory(step, device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - tic)
        optimizer.step()
        losses.append(result["loss"])
        print(f"  {name}: loss {losses[-1]:.4f}, peak {peaks[-1] / 2 ** 20:.1f} MiB, {seconds[-1] * 1e3:.0f} ms",
              file=sys.stderr)
    timed = seconds[1:] or seconds  # the first step compiles kernels
    return {"model": name, "losses": losses, "peak_memory_bytes": max(peaks),
            "median_step_ms": sorted(timed)[len(timed) // 2] * 1e3}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files", type=int, default=400, help="standard-library files in the corpus")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = checked_args(parser, argv, positive=("vocab", "steps", "seq_len", "batch", "hidden", "layers", "files"))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    data, vocabulary = encode(stdlib_words(args.files), args.vocab)
    print(f"corpus: {len(data):,} words of standard-library source, vocabulary {len(vocabulary):,} "
          f"({(data == 0).float().mean().item():.1%} <unk>)", file=sys.stderr)
    results = [train(name, data, len(vocabulary), args, device) for name in ("unfused", "fused")]

    where = device_label(device)
    logits_bytes = args.seq_len * args.batch * len(vocabulary) * 4
    summary = {"device": where, "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
               "args": {k: str(v) for k, v in vars(args).items()}, "vocab_size": len(vocabulary),
               "logits_bytes": logits_bytes, "results": results,
               "times": "CUDA wall time per step" if device.type == "cuda" else
                        "CPU interpreter wall time: not a speed measurement",
               "max_loss_difference": max(abs(a - b) for a, b in zip(*(r["losses"] for r in results), strict=True))}
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
    (args.out_dir / f"word_lm_{name}.json").write_text(json.dumps(summary, indent=1))

    print(f"\nT={args.seq_len} B={args.batch} H={args.hidden} V={len(vocabulary)} on {where}; all [T*B, V] logits "
          f"in fp32: {logits_bytes / 2 ** 20:.1f} MiB")
    print(f"{'output layer':14s} {'peak MiB':>10s} {'step ms':>10s} {'final loss':>11s}")
    for r in results:
        print(f"{r['model']:14s} {r['peak_memory_bytes'] / 2 ** 20:10.1f} {r['median_step_ms']:10.1f} "
              f"{r['losses'][-1]:11.4f}")
    print(f"({summary['times']}; largest difference between the loss curves {summary['max_loss_difference']:.2e})")
    return summary


if __name__ == "__main__":
    main()
