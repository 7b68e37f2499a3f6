"""The layers' numerics settings, read at call time (below dispatch and functional: both import it)."""
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
