"""tritonrnn: Triton GPU kernels for Elman RNNs, behind drop-in torch.nn.RNN / RNNCell modules."""
from tritonrnn import functional, reference
from tritonrnn.dispatch import backend, kernel_path
from tritonrnn.modules import RNN, RNNCell, convert

__version__ = "0.1.0"
__all__ = ["RNN", "RNNCell", "backend", "convert", "functional", "kernel_path", "reference"]
