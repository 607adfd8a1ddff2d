"""Pure-PyTorch reference of the meta-learner update step (docs/method.md section 2).

This module *defines correctness*: the fused C++/CUDA kernels in ``csrc/`` must
reproduce :func:`meta_step` within the tolerance rule (fused error at most 2x the
reference's own float32 error, both measured against float64).

Layout of the meta-parameters ``theta`` of one layer learner (a tuple, in this
order; ``L`` = number of stacked LSTM cells, 3 by default):

    for l in 0..L-1:  w_ih[l] [4H, D_l], w_hh[l] [4H, H], b[l] [4H]
    then:             w_out [P, H], b_out [P], scale [1]

``D_0 = 2P + Cin' + 1`` (features), ``D_l = H`` for l > 0. Gate order is
PyTorch's (input, forget, cell, output), so that the cells can be checked against
``torch.nn.LSTM`` (with ``bias_ih = b`` and ``bias_hh = 0``).

Per neuron j (one row of the batched problem):

    x_j    = [w_j * fs[0] | g_j * fs[1] | pre_j * fs[2] | post_j * fs[3]]
    h1, c1 = LSTMCell_0(x_j,        h[0], c[0])
    h2, c2 = LSTMCell_1(relu(h1),   h[1], c[1])
    h3, c3 = LSTMCell_2(relu(h2),   h[2], c[2])
    delta_j = scale * tanh(w_out relu(h3) + b_out)
    w_new_j = w_j - lr * delta_j * g_j

``fs`` (``fscale``, shape [4]) is the detached per-group feature scaling; it is
a constant of the step (no gradient flows into it), as are ``g``, ``pre`` and
``post`` (first-order meta-gradient).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

THETA_PER_CELL = 3  # w_ih, w_hh, b


def num_cells(theta: Sequence[Tensor]) -> int:
    """Number of stacked LSTM cells encoded in ``theta``."""
    return (len(theta) - 3) // THETA_PER_CELL


def build_features(w: Tensor, g: Tensor, pre: Tensor, post: Tensor, fscale: Tensor) -> Tensor:
    """x = [w*fs0 | g*fs1 | pre*fs2 (broadcast over neurons) | post*fs3], [Cout, 2P+Cin'+1]."""
    cout = w.shape[0]
    fs = fscale.to(w.dtype)
    pre_b = pre.expand(cout, pre.shape[1]) if pre.shape[0] == 1 else pre
    return torch.cat([w * fs[0], g * fs[1], pre_b * fs[2], post * fs[3]], dim=1)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor):
    """One LSTM cell in PyTorch's gate order (i, f, g, o)."""
    gates = torch.addmm(b, x, w_ih.t()) + h @ w_hh.t()
    i, f, gg, o = gates.chunk(4, dim=1)
    i = torch.sigmoid(i)
    f = torch.sigmoid(f)
    gg = torch.tanh(gg)
    o = torch.sigmoid(o)
    c_new = f * c + i * gg
    h_new = o * torch.tanh(c_new)
    return h_new, c_new


def meta_gate(x: Tensor, h: Tensor, c: Tensor, theta: Sequence[Tensor]):
    """Run the stacked LSTM and the output layer: returns delta [Cout, P], h_new, c_new."""
    L = num_cells(theta)
    hs, cs = [], []
    inp = x
    for l in range(L):
        w_ih, w_hh, b = theta[THETA_PER_CELL * l: THETA_PER_CELL * (l + 1)]
        h_l, c_l = lstm_cell(inp, h[l], c[l], w_ih, w_hh, b)
        hs.append(h_l)
        cs.append(c_l)
        inp = F.relu(h_l)
    w_out, b_out, scale = theta[-3], theta[-2], theta[-1]
    delta = scale * torch.tanh(torch.addmm(b_out, inp, w_out.t()))
    return delta, torch.stack(hs), torch.stack(cs)


def meta_step(w: Tensor, g: Tensor, pre: Tensor, post: Tensor, h: Tensor, c: Tensor,
              theta: Sequence[Tensor], lr: float, fscale: Tensor):
    """One meta-learner update step for one layer (differentiable, out of place).

    Shapes: w, g [Cout, P]; pre [1 or Cout, Cin']; post [Cout, 1]; h, c [L, Cout, H];
    fscale [4]. Returns (w_new [Cout, P], delta [Cout, P], h_new, c_new [L, Cout, H]).
    g, pre, post and fscale are constants of the step: they are detached here.
    """
    g = g.detach()
    x = build_features(w, g, pre.detach(), post.detach(), fscale.detach())
    delta, h_new, c_new = meta_gate(x, h, c, theta)
    w_new = w - lr * delta * g
    return w_new, delta, h_new, c_new


@torch.no_grad()
def meta_step_(w: Tensor, g: Tensor, pre: Tensor, post: Tensor, h: Tensor, c: Tensor,
               theta: Sequence[Tensor], lr: float, fscale: Tensor, delta_out: Tensor | None = None):
    """In-place no-grad variant (meta-test): overwrites w, h and c; returns delta.

    The reference allocates temporaries freely; only the fused kernel promises a
    fixed workspace. ``delta_out``, if given, receives delta.
    """
    w_new, delta, h_new, c_new = meta_step(w, g, pre, post, h, c, theta, lr, fscale)
    w.copy_(w_new)
    h.copy_(h_new)
    c.copy_(c_new)
    if delta_out is not None:
        delta_out.copy_(delta)
        return delta_out
    return delta
