"""The meta-learner: one stacked-LSTM learner per adapted student layer.

A student layer is "adapted" when its update comes from the meta-learner (every
conv and linear layer of the trunk, and the gamma and beta of every GroupNorm);
the classification heads are updated with plain SGD and are not adapted.

The per-layer maths lives in :mod:`lrmt_fast.reference` (and its fused twin,
reached through :mod:`lrmt_fast.ops`); this module owns the parameters, the
recurrent state, and the packing of student parameters into the op's [Cout, P]
rows (the bias is one more synapse whose pre-activation is the constant 1). For the
fused whole-network op it owns the layer plan (:attr:`MetaLearner.plan`) and hands theta
over packed in the op's order (:meth:`MetaLearner.theta_list`); :mod:`lrmt_fast.ops` takes
plain tensors and knows nothing of this module.
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import ops

Tensor = torch.Tensor
KINDS = ("conv", "linear", "gn_weight", "gn_bias")

@dataclass(frozen=True)
class AdaptedLayer:
    """What the meta-learner needs to know about one adapted student layer."""

    key: str            # unique name of the learner, e.g. "conv1" or "layer1.0.gn1.weight"
    kind: str           # one of KINDS
    module: str         # module path in the student (activations are captured there)
    weight: str         # parameter path of the weight (GN: of gamma or beta)
    bias: Optional[str]  # parameter path of the bias synapse, or None
    cout: int           # neurons (rows)
    p: int              # synapses per neuron, bias included
    cin_feat: int       # Cin' : width of the 'pre' feature (Cin, +1 with a bias; 1 for GN)
    hidden: int         # LSTM hidden size H

    @property
    def per_neuron_pre(self) -> bool:
        return self.kind in ("gn_weight", "gn_bias")

    @property
    def d_in(self) -> int:
        return 2 * self.p + self.cin_feat + 1


def find_adapted_layers(model: nn.Module, hidden: int = 32, hidden_gn: int = 32,
                        exclude: Iterable[str] = ("head_a", "head_b")) -> List[AdaptedLayer]:
    """Every Conv2d, Linear and affine GroupNorm of ``model`` outside ``exclude``."""
    excl = tuple(exclude)
    layers: List[AdaptedLayer] = []
    for name, mod in model.named_modules():
        if any(name == e or name.startswith(e + ".") for e in excl):
            continue
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.weight
            cout = w.shape[0]
            cin = w.shape[1]
            has_b = mod.bias is not None
            p = w[0].numel() + int(has_b)
            kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
            layers.append(AdaptedLayer(name, kind, name, f"{name}.weight",
                                       f"{name}.bias" if has_b else None,
                                       cout, p, cin + int(has_b), hidden))
        elif isinstance(mod, nn.GroupNorm) and mod.affine:
            c = mod.num_channels
            layers.append(AdaptedLayer(f"{name}.weight", "gn_weight", name, f"{name}.weight",
                                       None, c, 1, 1, hidden_gn))
            layers.append(AdaptedLayer(f"{name}.bias", "gn_bias", name, f"{name}.bias",
                                       None, c, 1, 1, hidden_gn))
    return layers


def pack_rows(params: Dict[str, Tensor], layer: AdaptedLayer) -> Tensor:
    """Student parameters of one layer as the op's rows [Cout, P]."""
    w = params[layer.weight].reshape(layer.cout, -1)
    if layer.bias is not None:
        w = torch.cat([w, params[layer.bias].reshape(layer.cout, 1)], dim=1)
    return w


def unpack_rows(rows: Tensor, layer: AdaptedLayer, like: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Inverse of :func:`pack_rows`: {param path: tensor of the student's shape}."""
    wshape = like[layer.weight].shape
    if layer.bias is None:
        return {layer.weight: rows.reshape(wshape)}
    return {layer.weight: rows[:, :-1].reshape(wshape), layer.bias: rows[:, -1]}


def op_pre_post(layer: AdaptedLayer, pre_mean: Tensor, post_mean: Tensor) -> Tuple[Tensor, Tensor]:
    """Captured channel means -> the op's ``pre`` [1|Cout, Cin'] and ``post`` [Cout, 1]."""
    post = post_mean.reshape(layer.cout, 1)
    if layer.per_neuron_pre:
        return pre_mean.reshape(layer.cout, 1), post
    pre = pre_mean.reshape(1, -1)
    if layer.bias is not None:
        pre = torch.cat([pre, pre.new_ones(1, 1)], dim=1)
    return pre, post


def feature_scale(w: Tensor, g: Tensor, pre: Tensor, post: Tensor, eps: float = 1e-8) -> Tensor:
    """Detached per-group scaling [4]: 1 / RMS of each feature group over the layer.

    Gradients are orders of magnitude smaller than weights; without this the
    LSTM sees g as zero. Computed once per step in Python and passed to either
    path, so reference and fused agree exactly (docs/method.md).
    """
    with torch.no_grad():
        groups = (w, g, pre, post)
        return torch.stack([1.0 / (t.float().pow(2).mean().sqrt() + eps) for t in groups]).to(w.dtype)


class LayerLearner(nn.Module):
    """Meta-parameters theta_l of one adapted layer, in the op's order."""

    def __init__(self, p: int, cin_feat: int, hidden: int, num_cells: int = 3):
        super().__init__()
        self.p, self.cin_feat, self.hidden, self.num_cells = p, cin_feat, hidden, num_cells
        d0 = 2 * p + cin_feat + 1
        self.w_ih = nn.ParameterList()
        self.w_hh = nn.ParameterList()
        self.b = nn.ParameterList()
        k = 1.0 / math.sqrt(hidden)
        for l in range(num_cells):
            d = d0 if l == 0 else hidden
            self.w_ih.append(nn.Parameter(torch.empty(4 * hidden, d).uniform_(-k, k)))
            self.w_hh.append(nn.Parameter(torch.empty(4 * hidden, hidden).uniform_(-k, k)))
            self.b.append(nn.Parameter(torch.empty(4 * hidden).uniform_(-k, k)))
        # output layer: weight 0, bias 1, so tanh(.) = tanh(1) and scale*tanh(1) = 1 (plain SGD)
        self.w_out = nn.Parameter(torch.zeros(p, hidden))
        self.b_out = nn.Parameter(torch.ones(p))
        self.scale = nn.Parameter(torch.full((1,), 1.0 / math.tanh(1.0)))

    def theta(self) -> Tuple[Tensor, ...]:
        """theta_l in the op's order (w_ih, w_hh, b of each cell, then w_out, b_out, scale):
        this learner's current Parameter objects, read from its own parameter dicts (indexing
        the ParameterLists is a Python getattr per tensor: ~9 ms a step for ResNet-32's 93
        learners, docs/performance.md)."""
        wi = self.w_ih._parameters
        wh = self.w_hh._parameters
        b = self.b._parameters
        out: List[Tensor] = []
        for l in range(self.num_cells):
            k = str(l)
            out += (wi[k], wh[k], b[k])
        p = self._parameters
        out += (p["w_out"], p["b_out"], p["scale"])
        return tuple(out)


class MetaLearner(nn.Module):
    """One :class:`LayerLearner` per adapted layer, plus the per-episode state."""

    def __init__(self, layers: List[AdaptedLayer], num_cells: int = 3):
        super().__init__()
        self.layers = list(layers)
        self.num_cells = num_cells
        self.learners = nn.ModuleDict()
        for lay in self.layers:
            if lay.kind not in KINDS:
                raise ValueError(f"unknown adapted-layer kind {lay.kind!r} for {lay.key!r}")
            self.learners[self._mkey(lay.key)] = LayerLearner(lay.p, lay.cin_feat, lay.hidden, num_cells)

    @staticmethod
    def _mkey(key: str) -> str:
        return key.replace(".", "__")

    def learner(self, layer: AdaptedLayer) -> LayerLearner:
        return self.learners[self._mkey(layer.key)]

    # --- the fused whole-network op's view: layer plan and packed theta -----------------
    @property
    def plan(self) -> ops.NetworkPlan:
        """The layers as the fused network op takes them (:class:`lrmt_fast.ops.NetworkPlan`),
        built once and rebuilt only if ``layers`` changes."""
        cache = self.__dict__.get("_plan_cache")
        if cache is None or len(cache[0]) != len(self.layers) or not all(map(operator.is_, cache[0], self.layers)):
            cache = (tuple(self.layers), ops.NetworkPlan.from_layers(self.layers))
            self.__dict__["_plan_cache"] = cache
        return cache[1]

    def theta_list(self) -> List[Tensor]:
        """Every layer's theta (:meth:`LayerLearner.theta`), concatenated in the order of
        :attr:`plan`: the network op's ``theta`` (3L + 3 tensors a layer)."""
        flat: List[Tensor] = []
        for lay in self.layers:
            flat.extend(self.learners[self._mkey(lay.key)].theta())
        return flat

    # --- (de)serialisation of the architecture, for checkpoints -------------------
    def config(self) -> dict:
        return {"num_cells": self.num_cells, "layers": [asdict(l) for l in self.layers]}

    @classmethod
    def from_config(cls, cfg: dict) -> "MetaLearner":
        return cls([AdaptedLayer(**d) for d in cfg["layers"]], cfg.get("num_cells", 3))

    # --- state ------------------------------------------------------------------------
    def init_state(self, device=None, dtype=torch.float32) -> Dict[str, Tuple[Tensor, Tensor]]:
        """Zero (h, c) [L, Cout, H] per layer: the state at the start of an episode."""
        st = {}
        for lay in self.layers:
            z = torch.zeros(self.num_cells, lay.cout, lay.hidden, device=device, dtype=dtype)
            st[lay.key] = (z, z.clone())
        return st

    @staticmethod
    def detach_state(state):
        return {k: (h.detach(), c.detach()) for k, (h, c) in state.items()}

    # --- one update step of the whole student -----------------------------------------
    def step(self, params: Dict[str, Tensor], grads: Dict[str, Tensor],
             acts: Dict[str, Tuple[Tensor, Tensor]], state, lr: float,
             impl: Optional[str] = None, snapshot: bool = False):
        """Differentiable update of every adapted layer (meta-train).

        params/grads: {param path: tensor}; acts: {module path: (pre_mean, post_mean)};
        state: from :meth:`init_state`. ``snapshot`` clones theta first, so that an
        optimiser may update theta in place while graphs of earlier steps are kept
        for T-BPTT. Returns (new adapted params, new state, {layer key: delta}).
        """
        new_params: Dict[str, Tensor] = {}
        new_state = {}
        deltas = {}
        dev = params[self.layers[0].weight].device if self.layers else None
        if ops.resolve_impl(impl, dev) == "fused":
            # one op call for every adapted layer (lrmt_fast._C), same results
            return ops.network_step(self.plan, self.theta_list(), params, grads, acts, state, lr,
                                    snapshot=snapshot)
        impl = "reference"
        for lay in self.layers:
            theta = self.learner(lay).theta()
            if snapshot:
                theta = tuple(t.clone() for t in theta)
            w = pack_rows(params, lay)
            g = pack_rows(grads, lay)
            pre, post = op_pre_post(lay, *acts[lay.module])
            fs = feature_scale(w, g, pre, post)
            h, c = state[lay.key]
            w_new, delta, h_new, c_new = ops.meta_step(w, g, pre, post, h, c, theta, lr, fs, impl=impl)
            new_params.update(unpack_rows(w_new, lay, params))
            new_state[lay.key] = (h_new, c_new)
            deltas[lay.key] = delta
        return new_params, new_state, deltas

    @torch.no_grad()
    def step_(self, params: Dict[str, Tensor], grads: Dict[str, Tensor],
              acts: Dict[str, Tuple[Tensor, Tensor]], state, lr: float, impl: Optional[str] = None):
        """No-grad update (meta-test): writes the new values into ``params`` and ``state``."""
        dev = params[self.layers[0].weight].device if self.layers else None
        if ops.resolve_impl(impl, dev) == "fused":
            # in place, one op call for every adapted layer (lrmt_fast._C)
            return ops.network_step_(self.plan, self.theta_list(), params, grads, acts, state, lr)
        impl = "reference"
        new_params, new_state, deltas = self.step(params, grads, acts, state, lr, impl=impl)
        for k, v in new_params.items():
            params[k].copy_(v)
        for k, (h, c) in new_state.items():
            state[k][0].copy_(h)
            state[k][1].copy_(c)
        return deltas
