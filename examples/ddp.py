"""Data-parallel training of a model with tritonrnn layers under DistributedDataParallel.

    torchrun --standalone --nproc_per_node=NUM_GPUS examples/ddp.py --steps 100

Each process takes its shard of a global batch; NCCL on GPUs (one per process), gloo on the CPU.
The data are synthetic (the task: recall the input from 3 steps earlier), fixed by --seed, so every
world size trains on the same global batches.
"""
import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import tritonrnn  # noqa: E402

INPUT, HIDDEN, DELAY = 8, 64, 3


class Recaller(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = tritonrnn.RNN(INPUT, HIDDEN, num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, INPUT)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def global_batch(step: int, batch: int, seq_len: int, seed: int):
    """The same [batch, seq_len, INPUT] inputs and delayed targets on every rank and world size."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x = torch.randn(batch, seq_len, INPUT, generator=g)
    target = torch.zeros_like(x)
    target[:, DELAY:] = x[:, :-DELAY]
    return x, target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64, help="global batch, split across processes")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-grads", help="rank 0 saves the first step's gradients here (for tests)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {world} processes")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = nn.parallel.DistributedDataParallel(Recaller().to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    shard = args.batch // world
    for step in range(args.steps):
        x, target = global_batch(step, args.batch, args.seq_len, args.seed)
        x, target = (t[rank * shard:(rank + 1) * shard].to(device) for t in (x, target))
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        if step == 0 and args.save_grads and rank == 0:
            torch.save([p.grad.cpu() for p in model.module.parameters()], args.save_grads)
        optimizer.step()
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f} (rank 0 shard, world size {world})", flush=True)
    dist.barrier()  # both ranks done before teardown (gloo could abort one mid-exchange otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
