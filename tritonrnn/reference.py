"""Plain-PyTorch reference of one RNN layer in one direction: the equations, written step by step.

No autograd: forward and backward (BPTT) are explicit loops, so the tests can compare the kernels'
intermediate results (dz_t, dh_0) as well as the end results. Works in float64.

Dimensions: T steps, B batch, I input, H hidden.

    z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh        h_t = act(z_t)
    dh_t = g_t + dz_{t+1} W_hh    (dz_{T+1} W_hh := dL/dh_n)
    dz_t = dh_t * act'(z_t)        dh_0 = dz_1 W_hh
    dW_hh = sum_t dz_t^T h_{t-1}   dW_ih = sum_t dz_t^T x_t   db = sum_t dz_t   dx_t = dz_t W_ih

With lengths, row b takes part in steps t < lengths[b] only: its output there is 0 and h_n is its
state after its own last step. With reverse, the steps run from t = T-1 down to 0.
"""
from dataclasses import dataclass

import torch


def _act(z, nonlinearity):
    return torch.tanh(z) if nonlinearity == "tanh" else torch.relu(z)


def _act_grad(h, nonlinearity):
    # tanh' = 1 - h^2; relu' = [z > 0], which equals [h > 0], and 1 where h is NaN, as torch's relu
    # backward passes the gradient wherever the result is not <= 0.
    return 1 - h * h if nonlinearity == "tanh" else (~(h <= 0)).to(h.dtype)


def _order(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _active(lengths, t, B, like):
    if lengths is None:
        return torch.ones(B, 1, dtype=torch.bool, device=like.device)
    return (t < lengths.to(like.device))[:, None]


def forward(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh", lengths=None, reverse=False):
    """Returns out [T, B, H] (h_t, 0 at inactive steps) and h_n [B, H]."""
    T, B, _ = x.shape
    h = h0
    out = x.new_zeros(T, B, w_hh.shape[0])
    for t in _order(T, reverse):
        z = x[t] @ w_ih.T + h @ w_hh.T
        if b_ih is not None:
            z = z + b_ih + b_hh
        active = _active(lengths, t, B, x)
        h_new = _act(z, nonlinearity)
        out[t] = torch.where(active, h_new, 0)
        h = torch.where(active, h_new, h)
    return out, h


@dataclass
class Gradients:
    dz: torch.Tensor  # [T, B, H] pre-activation gradients (0 at inactive steps)
    dh0: torch.Tensor
    dx: torch.Tensor
    dw_ih: torch.Tensor
    dw_hh: torch.Tensor
    db: torch.Tensor  # the gradient of b_ih, and of b_hh (they are equal)


def recurrence_backward(out, h0, w_hh, grad_out, grad_hn, nonlinearity="tanh", lengths=None, reverse=False):
    """BPTT of the recurrence alone, given the forward's out: returns dz [T, B, H], dh0, dW_hh.

    Written with differentiable torch operations, so autograd can differentiate it again: the
    layers use it for double backward.
    """
    T, B, _ = out.shape
    dz = torch.zeros_like(out)
    dh_next = torch.zeros_like(h0)  # dz_{t+1} W_hh for rows still running, else dL/dh_n
    dw_hh = torch.zeros_like(w_hh)
    dh0 = torch.zeros_like(h0)
    order = list(_order(T, reverse))
    for i in reversed(range(T)):
        t = order[i]
        active = _active(lengths, t, B, out)
        # A row's last step is where it is active and the next step in order is not.
        nxt = order[i + 1] if i + 1 < T else None
        ends = active & ~_active(lengths, nxt, B, out) if nxt is not None else active
        dh = grad_out[t] + torch.where(ends, grad_hn, dh_next)
        dz_t = torch.where(active, dh * _act_grad(out[t], nonlinearity), 0)
        dz[t] = dz_t
        # The state before step t: h_{t-1} in walk order, or h0 where row b starts here.
        prev = order[i - 1] if i > 0 else None
        starts = active & ~_active(lengths, prev, B, out) if prev is not None else active
        h_prev = torch.where(starts, h0, out[prev] if prev is not None else h0)
        dw_hh = dw_hh + dz_t.T @ h_prev
        dh_next = torch.where(active, dz_t @ w_hh, dh_next)
        dh0 = torch.where(starts, dz_t @ w_hh, dh0)
    return dz, dh0, dw_hh


def backward(x, h0, w_ih, w_hh, out, grad_out, grad_hn, nonlinearity="tanh", lengths=None, reverse=False):
    """BPTT for `forward`, given dL/d out and dL/d h_n. Returns Gradients."""
    T, B, _ = x.shape
    dz, dh0, dw_hh = recurrence_backward(out, h0, w_hh, grad_out, grad_hn, nonlinearity, lengths, reverse)
    flat = dz.reshape(T * B, -1)
    return Gradients(dz=dz, dh0=dh0, dx=dz @ w_ih, dw_ih=flat.T @ x.reshape(T * B, -1),
                     dw_hh=dw_hh, db=flat.sum(0))
