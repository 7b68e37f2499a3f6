"""A character-level language model trained with differential privacy (DP-SGD through Opacus) on
tritonrnn.RNN, against the same model trained without privacy.

    characters -> nn.Embedding -> tritonrnn.RNN -> nn.Linear -> cross-entropy of the next character

Each training sample is one window of the corpus (the docstrings of Python's standard library, as in
examples/char_rnn.py). The private run wraps model, optimizer and data loader with Opacus's
PrivacyEngine: every sample's gradient is clipped to --max-grad-norm, Gaussian noise of
--noise-multiplier times that norm is added to their sum, and batches are Poisson-sampled. The
per-sample gradients of the RNN come from tritonrnn.privacy (the Triton kernels, one batched pass);
--ghost uses ghost clipping instead (per-sample gradient norms only). Both runs start from the same
weights; the script prints the privacy spent (epsilon at --delta) and plots both loss curves.

    pip install "tritonrnn[dp]"     # Opacus
    python examples/dp_char_rnn.py                        # plot and JSON in examples/results/
    python examples/dp_char_rnn.py --ghost --steps 200 --noise-multiplier 0.8

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set before tritonrnn is
imported): the defaults are small enough for a minute or so on a CPU.
"""
import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import tritonrnn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from char_rnn import checked_args, stdlib_corpus  # noqa: E402


class CharModel(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, device):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden, device=device)
        self.rnn = tritonrnn.RNN(hidden, hidden, batch_first=True, device=device)
        self.head = nn.Linear(hidden, vocab_size, device=device)

    def forward(self, chars):  # chars [B, T] -> logits [B, T, V]
        output, _ = self.rnn(self.embedding(chars))
        return self.head(output)


def sequence_loss(logits, targets, reduction: str = "mean"):
    """Cross-entropy per character of each window; averaged over the batch ("mean": Opacus's
    loss_reduction) or per sample ("none": what ghost clipping reweights)."""
    per_sample = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    return per_sample.mean() if reduction == "mean" else per_sample


class SequenceLoss(nn.Module):
    """sequence_loss as a criterion with a `reduction` attribute (Opacus's ghost clipping sets it)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits, targets):
        return sequence_loss(logits, targets, self.reduction)


def train(private: bool, windows: torch.Tensor, vocab_size: int, args, device) -> dict:
    torch.manual_seed(args.seed)
    model = CharModel(vocab_size, args.hidden, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    dataset = torch.utils.data.TensorDataset(windows[:, :-1], windows[:, 1:])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    criterion, engine = SequenceLoss(), None
    if private:
        from opacus import PrivacyEngine

        engine = PrivacyEngine()
        kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=args.noise_multiplier,
                      max_grad_norm=args.max_grad_norm)
        if args.ghost:
            model, optimizer, criterion, loader = engine.make_private(**kwargs, criterion=criterion,
                                                                      grad_sample_mode="ghost")
        else:
            model, optimizer, loader = engine.make_private(**kwargs)
    name = ("private, ghost clipping" if args.ghost else "private") if private else "non-private"
    print(f"{name}: {type(model).__name__} holding tritonrnn.RNN ({tritonrnn.backend(device)})", file=sys.stderr)
    losses, step = [], 0
    while step < args.steps:
        for chars, targets in loader:
            if len(chars) == 0:  # Poisson sampling can draw an empty batch
                continue
            chars, targets = chars.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = criterion(model(chars), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 10 == 0 or step == args.steps:
                print(f"  step {step}/{args.steps}: loss {losses[-1]:.3f}", file=sys.stderr)
            if step == args.steps:
                break
    result = {"run": name, "losses": losses}
    if engine is not None:
        result["epsilon"] = engine.get_epsilon(delta=args.delta)
    return result


def plot(results: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        label = r["run"] + (f" (epsilon = {r['epsilon']:.2f})" if "epsilon" in r else "")
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy per character (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="expected batch size (Poisson sampling)")
    parser.add_argument("--windows", type=int, default=1024, help="training samples (windows of the corpus)")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--ghost", action="store_true", help="ghost clipping (per-sample norms, no gradients)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = checked_args(parser, argv, positive=("steps", "seq_len", "batch", "windows", "hidden"))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = stdlib_corpus()
    alphabet = "".join(sorted(set(text)))
    data = torch.tensor([alphabet.index(c) for c in text], dtype=torch.long)
    offsets = torch.randint(0, len(data) - args.seq_len - 1, (args.windows,),
                            generator=torch.Generator().manual_seed(args.seed))
    windows = torch.stack([data[o:o + args.seq_len + 1] for o in offsets])  # [N, T + 1]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        results = [train(private, windows, len(alphabet), args, device) for private in (True, False)]

    private, plain = results
    print(f"private run: epsilon = {private['epsilon']:.3f} at delta = {args.delta} "
          f"(noise multiplier {args.noise_multiplier}, clipping norm {args.max_grad_norm}, "
          f"sample rate {args.batch / args.windows:.4f}, {args.steps} steps)")
    print(f"final loss per character: private {private['losses'][-1]:.3f}, non-private {plain['losses'][-1]:.3f}")
    png = args.out_dir / f"dp_char_rnn_{'ghost' if args.ghost else 'hooks'}.png"
    plot(results, png, f"DP-SGD char-RNN, H={args.hidden}, T={args.seq_len}, B~{args.batch}, "
                       f"sigma={args.noise_multiplier}, C={args.max_grad_norm}; {tritonrnn.backend(device)}")
    summary = {"command": " ".join(["python", *sys.argv]), "args": {k: str(v) for k, v in vars(args).items()},
               "backend": tritonrnn.backend(device), "plot": png.name, "results": results}
    png.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"plot: {png}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
