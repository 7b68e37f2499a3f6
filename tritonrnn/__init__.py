"""tritonrnn: Triton GPU kernels for Elman RNNs, behind drop-in torch.nn.RNN / RNNCell modules."""
from tritonrnn import functional, reference
from tritonrnn.dispatch import backend, kernel_path
from tritonrnn.modules import RNN, RNNCell, convert
from tritonrnn.lm import ElmanLM

__version__ = "0.1.0"
__all__ = ["ElmanLM", "RNN", "RNNCell", "backend", "convert", "functional", "kernel_path", "reference"]
