"""The layers' numerics settings, read at call time (below dispatch and functional: both import it)."""
import functools

import numpy
import torch


def allow_tf32() -> bool:
    """Whether fp32 recurrences may multiply in TF32: the switch cuDNN's RNNs follow (on by default).

    torch >= 2.9 has torch.backends.cudnn.rnn.fp32_precision ("tf32", "ieee", or "none": inherit
    from cudnn, then from the generic setting; the getter resolves it, as cuDNN's RNN does). Once a
    user sets it, reading the legacy cudnn.allow_tf32 raises ("mix of the legacy and new APIs")."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is None:
        return bool(torch.backends.cudnn.allow_tf32)
    return rnn.fp32_precision == "tf32"


def quiet_interpreter(fn):
    """Run `fn` (an op that launches kernels) with numpy's floating-point warnings off. Triton's CPU
    interpreter computes with numpy, which warns ("invalid value encountered in matmul") where a NaN or
    an inf in the data makes another; the outputs carry them, as on a GPU, which does not warn."""
    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with numpy.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return quiet
