"""The three providers of a case, each run on the same device, dtype, layout and TF32 setting:

    tritonrnn      tritonrnn.RNN
    cudnn          torch.nn.RNN with cuDNN enabled (what users run today)
    torch-native   torch.nn.RNN with cuDNN disabled (torch's own kernels)

All three hold the same weights. Inference is a forward under no_grad; training is a forward and
the backward of all parameters and the input.
"""
import contextlib
import math

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import tritonrnn
from .grid import PROVIDERS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Largest error against cuDNN, relative to the largest magnitude of each compared tensor.
CHECK_TOLERANCE = {torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float64: 1e-8}

L2_BYTES = 50 << 20  # inputs are rotated when a few copies fit in L2 (H100: 50 MB)


@contextlib.contextmanager
def _cudnn_enabled(enabled: bool):
    # Only this switch: torch.backends.cudnn.flags() would also reset allow_tf32 and the rest.
    saved = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = saved


def available(provider: str, device: torch.device) -> bool:
    if provider == "cudnn":
        return device.type == "cuda" and torch.backends.cudnn.is_available()
    return provider in PROVIDERS


class Run:
    """One provider on one case: `inference()` and `training()` callables, and `outputs(mode)`."""

    def __init__(self, provider: str, case, device: torch.device, seed: int = 0):
        self.provider, self.case, self.device = provider, case, device
        self.dtype = DTYPES[case.dtype]
        torch.manual_seed(seed)
        kwargs = dict(num_layers=case.layers, bidirectional=case.bidirectional)
        reference = torch.nn.RNN(case.inputs, case.hidden, **kwargs).to(device, self.dtype)
        if provider == "tritonrnn":
            self.model = tritonrnn.RNN(case.inputs, case.hidden, **kwargs, device=device, dtype=self.dtype)
            self.model.load_state_dict(reference.state_dict())
        else:
            self.model = reference
        self.params = list(self.model.parameters())
        # Fresh random inputs (never zeros), rotated when they fit in L2; the same for every provider.
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        randn = lambda *shape: torch.randn(shape, generator=generator, device=device, dtype=self.dtype)  # noqa: E731
        shape = (case.seq_len, case.batch, case.inputs)
        copies = max(1, min(4, math.ceil(2 * L2_BYTES / (math.prod(shape) * self.dtype.itemsize))))
        self.inputs = [randn(*shape) for _ in range(copies)]
        self.lengths = None
        if case.packed:  # lengths spread evenly from T/8 to T, in shuffled order
            low = max(1, case.seq_len // 8)
            self.lengths = torch.linspace(low, case.seq_len, case.batch).round().long()
            self.lengths = self.lengths[torch.randperm(case.batch, generator=torch.Generator().manual_seed(seed))]
        directions = 2 if case.bidirectional else 1
        self.grad_hn = randn(case.layers * directions, case.batch, case.hidden)
        self._randn = randn
        self._grad_out = {}
        self._next = 0

    def _context(self):
        if self.provider == "tritonrnn":
            return contextlib.nullcontext()
        return _cudnn_enabled(self.provider == "cudnn")

    def _input(self, requires_grad: bool):
        x = self.inputs[self._next % len(self.inputs)]
        self._next += 1
        x = x.detach().requires_grad_(requires_grad)
        model_input = x if self.lengths is None else pack_padded_sequence(x, self.lengths, enforce_sorted=False)
        return x, model_input

    def _forward(self, model_input):
        with self._context():
            out, h_n = self.model(model_input)
        return (out if self.lengths is None else out.data), h_n

    def inference(self):
        with torch.no_grad():
            return self._forward(self._input(False)[1])

    def training(self):
        x, model_input = self._input(True)
        out, h_n = self._forward(model_input)
        grad_out = self._grad_out.get(out.shape)
        if grad_out is None:
            grad_out = self._grad_out[out.shape] = self._randn(*out.shape)
        with self._context():
            grads = torch.autograd.grad([out, h_n], [x, *self.params], [grad_out, self.grad_hn])
        return (out, h_n, *grads)

    def outputs(self, mode: str):
        """The results of one call on the first input, to compare providers."""
        self._next = 0
        return self.fn(mode)()

    def fn(self, mode: str):
        # eval() for inference: in training mode cuDNN runs its training forward (reserve space).
        self.model.train(mode == "training")
        return self.inference if mode == "inference" else self.training


def compare(outputs, reference, dtype: torch.dtype):
    """(ok, largest relative error) of one provider's outputs against the reference provider's."""
    worst = 0.0
    for actual, expected in zip(outputs, reference, strict=True):
        actual, expected = actual.detach().double(), expected.detach().double()
        if not torch.isfinite(actual).all():
            return False, math.inf
        scale = max(expected.abs().max().item(), 1e-6)
        worst = max(worst, (actual - expected).abs().max().item() / scale)
    return worst <= CHECK_TOLERANCE[dtype], worst
