"""The layers' numerics: the settings read at call time, autocast, dtype checks with torch's messages (below
dispatch, functional and loss: they import it)."""
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


def autocast(device_type: str, *tensors):
    """Under torch.autocast, run in its dtype (weights cast differentiably), as torch's RNNs do;
    like autocast, leave float64 alone."""
    if not torch.is_autocast_enabled(device_type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in tensors]


def torch_type_name(dtype: torch.dtype) -> str:
    """torch's scalar type name, as its error messages write it: Float, Long, Int, BFloat16, ..."""
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def check_same_dtype(tensor: torch.Tensor, weight: torch.Tensor) -> None:
    """The error torch's matmul raises for operands of different dtypes."""
    if tensor.dtype != weight.dtype:
        raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {torch_type_name(tensor.dtype)} "
                           f"and {torch_type_name(weight.dtype)}")
