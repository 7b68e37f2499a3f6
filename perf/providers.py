"""The three providers of a case, each run on the same device, dtype, layout and TF32 setting:

    tritonrnn      tritonrnn.RNN
    cudnn          torch.nn.RNN with cuDNN enabled (what users run today; torch may still route a
                   case to its native kernels, e.g. bf16 before cuDNN 9.13: the profiler pass says)
    torch-native   torch.nn.RNN with cuDNN disabled (torch's own kernels)

All three hold the same weights and inputs, and every one is checked against one float64 run of
the case (torch-native, same weights and inputs upcast): see `compare`. Inference is a forward
under no_grad; training is a forward and the backward of all parameters and the input.
"""
import contextlib
import math

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import tritonrnn
from .grid import PROVIDERS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Norm-wise relative error against the float64 run, ||actual - expected|| / ||expected|| for each
# output and gradient, largest allowed. Measured (torch-native on the CPU, fp32 accumulation, like
# cuBLAS; training, worst output or gradient, T x B x H = 512x16x256, 2048x16x256, 512x64x512):
# bf16 2.9e-2, 5.3e-2, 2.7e-2 norm-wise (5.3e-2 to 1.2e-1 max-relative, in dW_hh: hence norm-wise);
# fp16 3.4e-3, 6.9e-3, 3.5e-3; fp32 (IEEE) below 1e-6. TF32 has fp16's unit roundoff (2^-11), so fp32
# gets fp16's bound, as cuDNN runs fp32 RNNs in TF32 by default. Bounds: about 3x the worst measured.
# A wrong kernel (a missed step, a race, a wrong gradient) is off by O(1).
CHECK_TOLERANCE = {torch.float32: 2e-2, torch.float16: 2e-2, torch.bfloat16: 0.15, torch.float64: 1e-8}

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
    """One provider on one case: `inference()` and `training()` callables, and `outputs(mode)`.

    `reference=True` builds the float64 run the providers are checked against: the same weights
    and inputs (drawn in the case's dtype, then upcast), torch's native kernels, one input copy.
    """

    def __init__(self, provider: str, case, device: torch.device, seed: int = 0, reference: bool = False):
        self.provider, self.case, self.device = provider, case, device
        self.dtype = DTYPES[case.dtype]
        torch.manual_seed(seed)
        kwargs = dict(num_layers=case.layers, bidirectional=case.bidirectional)
        oracle = torch.nn.RNN(case.inputs, case.hidden, **kwargs).to(device, self.dtype)
        if provider == "tritonrnn":
            self.model = tritonrnn.RNN(case.inputs, case.hidden, **kwargs, device=device, dtype=self.dtype)
            self.model.load_state_dict(oracle.state_dict())
        else:
            self.model = oracle
        # Fresh random inputs (never zeros), rotated when they fit in L2; the same for every provider.
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        randn = lambda *shape: torch.randn(shape, generator=generator, device=device, dtype=self.dtype)  # noqa: E731
        shape = (case.seq_len, case.batch, case.inputs)
        copies = max(1, min(4, math.ceil(2 * L2_BYTES / (math.prod(shape) * self.dtype.itemsize))))
        inputs = [randn(*shape) for _ in range(copies)]
        directions = 2 if case.bidirectional else 1
        self.grad_hn = randn(case.layers * directions, case.batch, case.hidden)
        rows = (sum(case.lengths()),) if case.packed else (case.seq_len, case.batch)
        self.grad_out = randn(*rows, directions * case.hidden)
        if reference:
            self.model = self.model.double()
            self.dtype = torch.float64
            inputs = [inputs[0].double()]
            self.grad_hn, self.grad_out = self.grad_hn.double(), self.grad_out.double()
        self.params = list(self.model.parameters())
        self.packs = None
        if case.packed:  # packed once here, never in a timed call (the lengths' order is shuffled)
            order = torch.randperm(case.batch, generator=torch.Generator().manual_seed(seed))
            lengths = torch.tensor(case.lengths())[order]
            packed = [pack_padded_sequence(x, lengths, enforce_sorted=False) for x in inputs]
            inputs = [p.data for p in packed]
            self.packs = packed[0][1:]  # batch_sizes, sorted_indices, unsorted_indices
        self.inputs = inputs
        self._next = 0

    def _context(self):
        if self.provider == "tritonrnn":
            return contextlib.nullcontext()
        return _cudnn_enabled(self.provider == "cudnn")

    def _input(self, requires_grad: bool):
        """(the tensor gradients are taken of: the input or the packed data, the model's input)"""
        x = self.inputs[self._next % len(self.inputs)].detach().requires_grad_(requires_grad)
        self._next += 1
        return x, x if self.packs is None else PackedSequence(x, *self.packs)

    def _forward(self, model_input):
        with self._context():
            out, h_n = self.model(model_input)
        return (out if self.packs is None else out.data), h_n

    def inference(self):
        with torch.no_grad():
            return self._forward(self._input(False)[1])

    def training(self):
        x, model_input = self._input(True)
        out, h_n = self._forward(model_input)
        with self._context():
            grads = torch.autograd.grad([out, h_n], [x, *self.params], [self.grad_out, self.grad_hn])
        return (out, h_n, *grads)

    def outputs(self, mode: str):
        """The results of one call on the first input, to compare providers."""
        self._next = 0
        return self.fn(mode)()

    def fn(self, mode: str):
        # eval() for inference: in training mode cuDNN runs its training forward (reserve space).
        self.model.train(mode == "training")
        return self.inference if mode == "inference" else self.training


OUTPUT_NAMES = ("out", "h_n", "d_input")  # then one gradient per parameter


def output_names(model) -> list:
    return list(OUTPUT_NAMES) + [f"d_{name}" for name, _ in model.named_parameters()]


def check_reference(reference) -> None:
    """The float64 run must be finite, or nothing can be checked against it."""
    for i, expected in enumerate(reference):
        if not torch.isfinite(expected).all():
            raise ValueError(f"the float64 reference's output {i} is not finite")


def compare(outputs, reference, dtype: torch.dtype, names=None):
    """(ok, largest norm-wise relative error, what is wrong or None) of one provider's outputs
    against the float64 run's: same count, same shapes, finite, within CHECK_TOLERANCE[dtype]."""
    if len(outputs) != len(reference):
        return False, math.inf, f"{len(outputs)} outputs, the reference has {len(reference)}"
    names = names or [str(i) for i in range(len(reference))]
    worst, worst_name = 0.0, None
    for name, actual, expected in zip(names, outputs, reference, strict=True):
        if actual.shape != expected.shape:
            return False, math.inf, f"{name} has shape {tuple(actual.shape)}, the reference {tuple(expected.shape)}"
        actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
        if not torch.isfinite(actual).all():
            return False, math.inf, f"{name} is not finite"
        error = (torch.linalg.vector_norm(actual - expected) /
                 max(torch.linalg.vector_norm(expected).item(), 1e-30)).item()
        if error > worst:
            worst, worst_name = error, name
    if worst > CHECK_TOLERANCE[dtype]:
        return False, worst, f"{worst_name} differs from the float64 run by {worst:.3g} (norm-wise relative), " \
                             f"over the {str(dtype).removeprefix('torch.')} tolerance {CHECK_TOLERANCE[dtype]:g}"
    return True, worst, None
