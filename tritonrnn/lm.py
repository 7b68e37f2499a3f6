"""tritonrnn.ElmanLM: the textbook Elman network as one module, trained on its summed cross-entropy.

    x_t = E[token_t] (or the one-hot of token_t)
    h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)     (tritonrnn.RNN, any number of layers)
    o_t = V h_t + c,   L = CE(softmax(o_t), target_t)          (linear_cross_entropy: no [T*B, V] logits)

state_dict keys are those of the same model built from torch.nn (TorchElmanLM below: attributes
`embedding`, `rnn`, `output`), so checkpoints move both ways:

    embedding.weight                                  [vocab, embedding_dim]  (embedding=True only)
    rnn.weight_ih_l{k}, rnn.weight_hh_l{k}, rnn.bias_ih_l{k}, rnn.bias_hh_l{k}   (as torch.nn.RNN)
    output.weight [vocab, hidden], output.bias [vocab]
"""
from typing import Optional

import torch.nn.functional as F
from torch import nn, Tensor

from tritonrnn import functional
from tritonrnn.modules import RNN


class TorchElmanLM(nn.Module):
    """The same network from torch.nn alone: nn.Embedding (or one-hot input), nn.RNN, nn.Linear and
    F.cross_entropy on the materialised [N, V] logits. The reference ElmanLM is tested against, and
    the model whose checkpoints ElmanLM loads (and the other way round). Arguments as ElmanLM.
    """

    rnn_class = nn.RNN

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 embedding: bool = True, embedding_dim: Optional[int] = None, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.vocab_size = vocab_size
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        if embedding:
            self.embedding = nn.Embedding(vocab_size, embedding_dim or hidden_size, **factory)
            input_size = self.embedding.embedding_dim
        else:
            self.embedding = None
            input_size = vocab_size
        self.rnn = self.rnn_class(input_size, hidden_size, num_layers, nonlinearity, bias=bias,
                                  batch_first=batch_first, dropout=dropout, **factory)
        self.output = nn.Linear(hidden_size, vocab_size, bias=bias, **factory)

    def hidden(self, input: Tensor, hx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The RNN's output (every h_t) and final state for token ids `input` ([T, B], [B, T] with
        batch_first, or [T])."""
        if self.embedding is not None:
            x = self.embedding(input)
        else:
            x = F.one_hot(input, self.vocab_size).to(self.output.weight.dtype)
        return self.rnn(x, hx)

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        """The output layer and the cross-entropy of every step: out [..., H], target [...]."""
        return F.cross_entropy(self.output(out).reshape(-1, self.vocab_size), target.reshape(-1),
                               ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing)

    def forward(self, input: Tensor, target: Tensor, hx: Optional[Tensor] = None,
                return_state: bool = False):
        """The loss of predicting `target` (token ids, the shape of `input`) at every step: a
        scalar, or with reduction="none" one per token (the shape of `target`).

        hx: [num_layers, B, H] initial state. With return_state, returns (loss, h_n): pass
        h_n.detach() as the next call's hx for truncated BPTT across calls.
        """
        out, h_n = self.hidden(input, hx)
        loss = self.loss(out, target)
        if self.reduction == "none":
            loss = loss.view(target.shape)  # one loss per token
        return (loss, h_n) if return_state else loss

    def logits(self, input: Tensor, hx: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Every step's logits (materialised: for sampling and evaluation of short inputs) and h_n."""
        out, h_n = self.hidden(input, hx)
        return self.output(out), h_n


class ElmanLM(TorchElmanLM):
    """Embedding (or one-hot input) -> tritonrnn.RNN -> fused output layer and cross-entropy.

    ElmanLM(vocab_size, hidden_size, num_layers=1, nonlinearity='tanh', embedding=True,
            embedding_dim=None, bias=True, batch_first=False, dropout=0.0, ignore_index=-100,
            reduction='mean', label_smoothing=0.0, device=None, dtype=None)

    forward(input, target, hx=None, return_state=False) -> loss, or (loss, h_n)

    embedding_dim defaults to hidden_size; embedding=False feeds the one-hot tokens (input size
    vocab_size). The parameters are created in the order nn.Embedding, RNN, nn.Linear, so with the
    same seed they equal TorchElmanLM's. The loss never materialises the [T*B, V] logits
    (tritonrnn.functional.linear_cross_entropy).
    """

    rnn_class = RNN

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        return functional.linear_cross_entropy(out.reshape(-1, out.shape[-1]), self.output.weight, self.output.bias,
                                               target.reshape(-1), self.ignore_index, self.reduction,
                                               self.label_smoothing)
