"""A character-level language model, built as the textbook Elman network, trained with tritonrnn.

    h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)      x_t: one-hot character
    o_t = V h_t + c        y_t = softmax(o_t)        L = sum_t CE(y_t, next character)

`--backend tritonrnn` trains tritonrnn.ElmanLM (the RNN kernels and the fused output layer and
loss, which never holds all T*B x V logits); `--backend torch` the same network from torch.nn alone
(nn.RNN, nn.Linear, F.cross_entropy). The corpus is the docstrings of Python's standard library:
real English text on every machine, nothing to download. With the same seed, both backends start
from the same weights and see the same batches, so their loss curves coincide to float32 noise;
the default runs both and plots them with the tokens per second of each (none for a run in
Triton's interpreter: that is not a speed measurement).

    python examples/char_rnn.py                       # both backends, plot in examples/results/
    python examples/char_rnn.py --backend torch --steps 300

Without CUDA the tritonrnn backend runs its kernels in Triton's interpreter (slow, but the same
kernels), so TRITON_INTERPRET=1 is set before tritonrnn is imported.
"""
import argparse
import importlib
import inspect
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import tritonrnn  # noqa: E402
from tritonrnn.lm import TorchElmanLM  # noqa: E402

CORPUS_MODULES = ("argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
                  "difflib", "email", "fractions", "functools", "heapq", "inspect", "itertools", "json",
                  "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string",
                  "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "zipfile")


def stdlib_corpus() -> str:
    """Docstrings of some standard-library modules and their public members, in a fixed order."""
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CORPUS_MODULES:
            module = importlib.import_module(name)
            docs.append(inspect.getdoc(module) or "")
            for member_name in sorted(dir(module)):
                if member_name.startswith("_"):
                    continue
                member = getattr(module, member_name, None)
                if inspect.isclass(member) or inspect.isfunction(member):
                    docs.append(inspect.getdoc(member) or "")
    text = "\n\n".join(d for d in docs if d)
    return "".join(c for c in text if c.isascii())


def char_rnn(backend: str, vocab_size: int, args, device: torch.device) -> nn.Module:
    """One-hot characters -> Elman RNN -> output layer o_t = V h_t + c -> summed cross-entropy.

    tritonrnn: tritonrnn.ElmanLM (the RNN kernels and the fused output layer); torch: the same
    network from torch.nn alone (tritonrnn.lm.TorchElmanLM: nn.RNN, nn.Linear, F.cross_entropy).
    Same seed, same weights.
    """
    torch.manual_seed(args.seed)
    cls = tritonrnn.ElmanLM if backend == "tritonrnn" else TorchElmanLM
    return cls(vocab_size, args.hidden, args.layers, embedding=False, reduction="sum", device=device)


def progress(step: int, total: int, loss: float, start: float) -> None:
    width = 30
    done = int(width * step / total)
    rate = step / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f"\r  [{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.3f} "
                     f"({rate:.1f} steps/s)")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def train(backend: str, data: torch.Tensor, vocab_size: int, args, device: torch.device) -> dict:
    model = char_rnn(backend, vocab_size, args, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = torch.Generator().manual_seed(args.seed)
    losses, tokens, seconds = [], 0, 0.0
    print(f"{backend}: {type(model).__name__} ({type(model.rnn).__module__}.{type(model.rnn).__name__}) on {device}",
          file=sys.stderr)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=batches)
        window = torch.stack([data[o:o + args.seq_len + 1] for o in offsets], dim=1).to(device)  # [T+1, B]
        tic = time.perf_counter()
        # L = sum_t CE(y_t): summed over time, averaged over the batch.
        loss = model(window[:-1], window[1:]) / args.batch
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 1:  # the first step compiles kernels
            seconds += time.perf_counter() - tic
            tokens += args.seq_len * args.batch
        losses.append(loss.item() / args.seq_len)
        progress(step, args.steps, losses[-1], start)
    # The interpreter runs the kernels in numpy, program by program: its time measures nothing.
    interpreted = backend == "tritonrnn" and tritonrnn.backend(device) == "triton-interpreter"
    return {"backend": backend, "losses": losses, "interpreted": interpreted,
            "tokens_per_second": tokens / seconds if seconds and not interpreted else None, "model": model}


@torch.no_grad()
def sample(model: TorchElmanLM, alphabet: str, length: int, device: torch.device, seed: int) -> str:
    generator = torch.Generator(device=device).manual_seed(seed)
    char = torch.tensor([[alphabet.index("T")]], device=device)
    h, text = None, "T"
    for _ in range(length):
        logits, h = model.logits(char, h)
        char = torch.multinomial(F.softmax(logits[-1], dim=-1), 1, generator=generator)
        text += alphabet[char.item()]
    return text


def speed(result: dict) -> str:
    if result["interpreted"]:
        return "Triton interpreter: not a speed measurement"
    rate = result["tokens_per_second"]
    return f"{rate:.0f} tokens/s" if rate else "tokens/s n/a"


def loss_figure(results: list, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in sorted(results, key=lambda r: r["backend"] != "torch"):  # tritonrnn dashed, on top
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['backend']} ({speed(r)})",
                linestyle="-" if r["backend"] == "torch" else "--", linewidth=3 if r["backend"] == "torch" else 1.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy per character (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    return fig


def plot(results: list, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = loss_figure(results, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checked_args(parser: argparse.ArgumentParser, argv, positive=("steps", "batch", "seq_len", "hidden")):
    """parse_args, and what would fail later fails now, in one line: a count below 1, an --out-dir that
    cannot be made (made here, before training, not after it)."""
    args = parser.parse_args(argv)
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out-dir {args.out_dir}: {error.strerror or error}")
    return args


def device_label(device: torch.device) -> str:
    """Where tritonrnn ran, for titles: the GPU, or the CPU with the backend it took there."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name()}"
    return {"triton-interpreter": "cpu (interpreter)"}.get(tritonrnn.backend(device), "cpu (torch's own RNN)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["tritonrnn", "torch", "both"], default="both")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=300, help="characters to sample at the end")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 (off: the curves compare in fp32)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = checked_args(parser, argv, positive=("steps", "batch", "seq_len", "hidden", "layers"))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    text = stdlib_corpus()
    alphabet = "".join(sorted(set(text)))
    data = torch.tensor([alphabet.index(c) for c in text], dtype=torch.long)
    print(f"corpus: {len(text):,} characters of standard-library docstrings, {len(alphabet)} symbols",
          file=sys.stderr)

    backends = ["tritonrnn", "torch"] if args.backend == "both" else [args.backend]
    results = [train(b, data, len(alphabet), args, device) for b in backends]
    for r in results:
        print(f"\n--- {r['backend']} sample ---\n{sample(r['model'], alphabet, args.sample, device, args.seed)}")

    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name().replace(" ", "_")
    where = device_label(device)
    png = args.out_dir / f"char_rnn_{name}.png"
    plot(results, png, f"char-RNN, H={args.hidden}, T={args.seq_len}, B={args.batch}; {where}; "
                       f"torch {torch.__version__}")
    summary = {
        "device": where, "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
        "args": {k: str(v) for k, v in vars(args).items()}, "plot": png.name,
        "results": [{k: v for k, v in r.items() if k != "model"} for r in results],
    }
    if len(results) == 2:
        a, b = (torch.tensor(r["losses"]) for r in results)
        summary["max_loss_difference"] = (a - b).abs().max().item()
    (args.out_dir / f"char_rnn_{name}.json").write_text(json.dumps(summary, indent=1))
    for r in results:
        print(f"{r['backend']}: final loss {r['losses'][-1]:.4f}, {speed(r)}", file=sys.stderr)
    if "max_loss_difference" in summary:
        print(f"largest difference between the loss curves: {summary['max_loss_difference']:.2e}", file=sys.stderr)
    print(f"plot: {png}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
