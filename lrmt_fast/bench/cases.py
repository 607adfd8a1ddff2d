"""Benchmark cases of the meta-update op: one whole student per case, each implementation
built from the same seed (same inputs) in the same process.

Cases (``CASES``):

- ``lenet_update`` / ``resnet32_update``: the meta-test update step of a whole student,
  no grad, in place (:meth:`MetaLearner.step_`): LeNet with H=32; ResNet-32 GN with H=64
  for the convs and H=32 for GroupNorm gamma/beta. One call = one step.
- ``{lenet,resnet32}_train_s{5,11}``: meta-train, one T-BPTT window: ``s`` differentiable
  steps (:meth:`MetaLearner.step` with ``snapshot=True``, as in the meta-training loop),
  then one backward from a fixed linear loss on the final student weights and LSTM
  state back through all ``s`` steps to theta. One call = ``s`` steps.

The student's gradients and activations are fixed random inputs (the student's own
forward/backward is not part of the op and is not timed). Implementations (``IMPLS``):

- ``reference``: the pure-PyTorch per-layer reference (``impl="reference"``);
- ``fused``: the fused extension, one op call for the whole network (``impl="fused"``);
- ``nn_lstm``: anchor: the same step with the three LSTM cells run by ``torch.nn.LSTM``
  (one single-layer module per cell, ReLU between, as docs/method.md section 2 checks);
- ``reference_compiled``: anchor: the reference step under ``torch.compile``
  (see :mod:`lrmt_fast.bench.compiled`);
- ``fused_graph`` (update cases on a GPU only, :func:`applies`): the fused update captured
  once as a CUDA graph and replayed (:class:`lrmt_fast.graphed_update.GraphedMetaUpdate`),
  each call copying the step's gradients and activations into the graph's buffers.

FLOPs and bytes per step are computed from the shapes (:func:`op_cost`), for the roofline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from lrmt_fast import reference
from lrmt_fast.meta_learner import AdaptedLayer, MetaLearner, feature_scale, find_adapted_layers, op_pre_post, \
    pack_rows, unpack_rows
from lrmt_fast.models import LeNet, resnet32_gn

Tensor = torch.Tensor
LR = 0.05

CASES = ("lenet_update", "resnet32_update", "lenet_train_s5", "lenet_train_s11", "resnet32_train_s5",
         "resnet32_train_s11")
IMPLS = ("reference", "fused", "nn_lstm", "reference_compiled", "fused_graph")


def applies(name: str, impl: str, device: str) -> bool:
    """Whether ``impl`` is measured for case ``name`` on ``device``: the CUDA-graph replay
    exists for the no-grad update on a GPU only; everything else everywhere."""
    if impl == "fused_graph":
        return parse_case(name)[1] == "update" and str(device).startswith("cuda")
    return True


def parse_case(case: str) -> Tuple[str, str, int]:
    """'lenet_train_s5' -> ('lenet', 'train', 5); 'resnet32_update' -> ('resnet32', 'update', 1)."""
    if case not in CASES:
        raise ValueError(f"unknown benchmark case {case!r}; expected one of {', '.join(CASES)}")
    model, kind, *rest = case.split("_")
    return model, kind, int(rest[0][1:]) if rest else 1


# --------------------------------------------------------------------------------------
# the student: meta-learner, parameters, fixed gradients / activations, mid-episode state
# --------------------------------------------------------------------------------------
def build_student(model: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """(meta-learner, params, grads, acts, state) with realistic magnitudes; deterministic."""
    torch.manual_seed(seed)
    net = LeNet() if model == "lenet" else resnet32_gn()
    H, Hgn = (32, 32) if model == "lenet" else (64, 32)
    gen = torch.Generator().manual_seed(seed)
    layers = find_adapted_layers(net, hidden=H, hidden_gn=Hgn)
    ml = MetaLearner(layers)
    with torch.no_grad():  # away from the SGD-exact initialisation (w_out = 0)
        for lrn in ml.learners.values():
            lrn.w_out.normal_(0, 0.3, generator=gen)
            lrn.b_out.normal_(0, 0.3, generator=gen)
    ml = ml.to(device=device, dtype=dtype)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    grads = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in params.items()}
    mods = dict(net.named_modules())
    acts = {}
    for lay in layers:
        cin = lay.cout if lay.per_neuron_pre else mods[lay.module].weight.shape[1]
        acts[lay.module] = (torch.rand(cin, generator=gen), torch.randn(lay.cout, generator=gen))
    state = {k: (torch.randn(h.shape, generator=gen) * 0.2, torch.randn(h.shape, generator=gen) * 0.5)
             for k, (h, _) in ml.init_state().items()}
    mv = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    params = {k: mv(v) for k, v in params.items()}
    grads = {k: mv(v) for k, v in grads.items()}
    acts = {k: (mv(a), mv(b)) for k, (a, b) in acts.items()}
    state = {k: (mv(h), mv(c)) for k, (h, c) in state.items()}
    return ml, params, grads, acts, state


# --------------------------------------------------------------------------------------
# cost model (per step, whole student)
# --------------------------------------------------------------------------------------
def layer_cost(lay: AdaptedLayer, num_cells: int = 3, elt: int = 4) -> Dict[str, float]:
    """FLOPs and minimum bytes of one meta-update step of one layer (docs/method.md section 2).

    FLOPs: the minimal work of the specified step, the same for every implementation: the
    first cell's input GEMM over the per-neuron features (w, g, post, and pre when it is per
    neuron: 2P + 1 (+ Cin') columns; a ``pre`` shared by all neurons is one [Cin'] x [Cin', 4H]
    product per layer, which the reference instead repeats for every neuron), the
    recurrent GEMMs, the two upper cells and the output layer, plus ~40 flops per LSTM unit
    (gates, exp/tanh) and ~25 per synapse (tanh, gate, update). Bytes: the compulsory
    traffic: read w, g, pre, post, h, c and theta once; write w, h, c and delta.
    Training (one step of a T-BPTT window) adds the backward (2x the GEMM FLOPs), the saved
    activations (written, read back) and the gradients of theta, w, h and c.
    """
    cout, P, cinp, H, L = lay.cout, lay.p, lay.cin_feat, lay.hidden, num_cells
    G4, D0 = 4 * H, 2 * lay.p + lay.cin_feat + 1
    k0 = 2 * P + 1 + (cinp if lay.per_neuron_pre else 0)
    gemm = 2 * cout * G4 * (k0 + H) + (0 if lay.per_neuron_pre else 2 * G4 * cinp) \
        + (L - 1) * 2 * cout * G4 * 2 * H + 2 * cout * P * H
    pointwise = L * cout * H * 40 + cout * P * 25
    theta = G4 * (D0 + H) + G4 + (L - 1) * (G4 * 2 * H + G4) + P * H + P + 1
    state = 2 * L * cout * H
    pre = cout * cinp if lay.per_neuron_pre else cinp
    fwd_bytes = elt * (2 * cout * P + pre + cout + state + theta + cout * P + state + cout * P)
    saved = L * cout * G4 + cout * P
    train_bytes = fwd_bytes + elt * (2 * saved + theta + cout * P + state + 2 * cout * P + state)
    return {"flops_update": float(gemm + pointwise), "bytes_update": float(fwd_bytes),
            "flops_train": float(3 * gemm + 2 * pointwise), "bytes_train": float(train_bytes),
            "synapses": float(cout * P)}


def op_cost(ml: MetaLearner, kind: str, elt: int = 4) -> Dict[str, float]:
    tot: Dict[str, float] = {}
    for lay in ml.layers:
        for k, v in layer_cost(lay, ml.num_cells, elt).items():
            tot[k] = tot.get(k, 0.0) + v
    return {"flops_per_step": tot[f"flops_{kind}"], "bytes_per_step": tot[f"bytes_{kind}"],
            "synapses": tot["synapses"]}


# --------------------------------------------------------------------------------------
# the nn.LSTM anchor
# --------------------------------------------------------------------------------------
class NNLSTMStep(nn.Module):
    """The meta-update step with each LSTM cell run by a single-layer ``torch.nn.LSTM``
    (weights copied from theta, ``bias_hh = 0``), ReLU between cells; output layer, gate
    and update as in the reference."""

    def __init__(self, ml: MetaLearner):
        super().__init__()
        self.layers = ml.layers
        self.cells = nn.ModuleList()
        self.out = nn.ParameterList()
        for lay in ml.layers:
            th = ml.learner(lay).theta()
            L = ml.num_cells
            cells = nn.ModuleList()
            for l in range(L):
                w_ih, w_hh, b = th[3 * l: 3 * l + 3]
                m = nn.LSTM(w_ih.shape[1], w_hh.shape[1], num_layers=1).to(w_ih)
                with torch.no_grad():
                    m.weight_ih_l0.copy_(w_ih)
                    m.weight_hh_l0.copy_(w_hh)
                    m.bias_ih_l0.copy_(b)
                    m.bias_hh_l0.zero_()
                cells.append(m)
            self.cells.append(cells)
            for t in th[3 * L:]:
                self.out.append(nn.Parameter(t.detach().clone()))

    def step(self, params, grads, acts, state, lr):
        new_p, new_s = {}, {}
        for i, lay in enumerate(self.layers):
            w = pack_rows(params, lay)
            g = pack_rows(grads, lay)
            pre, post = op_pre_post(lay, *acts[lay.module])
            fs = feature_scale(w, g, pre, post)
            x = reference.build_features(w, g.detach(), pre, post, fs)[None]
            h, c = state[lay.key]
            hs, cs = [], []
            for l, m in enumerate(self.cells[i]):
                out, (hn, cn) = m(x, (h[l:l + 1], c[l:l + 1]))
                hs.append(hn[0])
                cs.append(cn[0])
                x = torch.relu(out)
            w_out, b_out, scale = self.out[3 * i], self.out[3 * i + 1], self.out[3 * i + 2]
            delta = scale * torch.tanh(torch.addmm(b_out, x[0], w_out.t()))
            new_p.update(unpack_rows(w - lr * delta * g, lay, params))
            new_s[lay.key] = (torch.stack(hs), torch.stack(cs))
        return new_p, new_s

    def parameters_for_grad(self):
        return list(self.parameters())


# --------------------------------------------------------------------------------------
# a benchmark case: a callable doing one call (``steps_per_call`` steps) of one impl
# --------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    impl: str
    device: str
    model: str
    kind: str
    steps_per_call: int
    fn: Callable[[], None]
    ml: MetaLearner
    cost: Dict[str, float]
    extra: Dict = field(default_factory=dict)

    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def _loss_weights(params, state, keys, gen_seed=123):
    gen = torch.Generator().manual_seed(gen_seed)
    rp = {k: torch.randn(params[k].shape, generator=gen).to(params[k]) for k in keys}
    rs = {k: torch.randn(h.shape, generator=gen).to(h) for k, (h, _) in state.items()}
    return rp, rs


def adapted_params(ml: MetaLearner) -> List[str]:
    """Names of the student parameters the meta-learner updates (weights and biases), sorted."""
    return sorted({p for lay in ml.layers for p in (lay.weight, lay.bias) if p is not None})


def make_case(name: str, impl: str, device: str = "cpu", seed: int = 0, dtype=torch.float32) -> Case:
    """Build the inputs of ``name`` for ``impl`` (same seed -> same inputs for every impl)."""
    model, kind, s = parse_case(name)
    if impl not in ("reference", "fused", "nn_lstm", "fused_graph"):
        raise ValueError(f"make_case: impl must be reference, fused, nn_lstm or fused_graph (compiled: "
                         f"lrmt_fast.bench.compiled), got {impl!r}")
    if not applies(name, impl, device):
        raise ValueError(f"make_case: {impl} is measured only for the update cases on a CUDA device, "
                         f"not {name} on {device}")
    ml, params, grads, acts, state = build_student(model, device, dtype=dtype, seed=seed)
    cost = op_cost(ml, kind)
    adapted = adapted_params(ml)
    anchor = NNLSTMStep(ml) if impl == "nn_lstm" else None

    if kind == "update":
        if impl == "nn_lstm":
            @torch.no_grad()
            def fn():
                new_p, new_s = anchor.step(params, grads, acts, state, LR)
                for k, v in new_p.items():
                    params[k].copy_(v)
                for k, (h, c) in new_s.items():
                    state[k][0].copy_(h)
                    state[k][1].copy_(c)
        elif impl == "fused_graph":
            from lrmt_fast.graphed_update import GraphedMetaUpdate
            upd = GraphedMetaUpdate(ml, params, grads, acts, state, LR)

            def fn():
                upd(grads, acts)
        else:
            def fn():
                ml.step_(params, grads, acts, state, LR, impl=impl)
        return Case(name, impl, device, model, kind, 1, fn, ml, cost)

    rp, rs = _loss_weights(params, state, adapted)
    theta = anchor.parameters_for_grad() if anchor is not None else list(ml.parameters())

    def fn():
        for t in theta:
            t.grad = None
        p, st = params, state
        for _ in range(s):
            if anchor is not None:
                new, st = anchor.step(p, grads, acts, st, LR)
            else:
                new, st, _ = ml.step(p, grads, acts, st, LR, impl=impl, snapshot=True)
            p = {**p, **new}
        loss = sum((p[k] * rp[k]).sum() for k in adapted) + sum((h * rs[k]).sum() for k, (h, _) in st.items())
        loss.backward()

    return Case(name, impl, device, model, kind, s, fn, ml, cost)


def train_window_grads(model: str, device: str = "cpu", dtype=torch.float32, impl: str = "fused", s: int = 5,
                       seed: int = 0) -> Dict[str, torch.Tensor]:
    """The meta-gradients of one call of the meta-train case ``<model>_train_s<s>`` (``s``
    unrolled whole-student update steps and the backward of its loss), with the inputs of
    ``seed`` in ``dtype``: {meta-parameter name: d loss / d theta, on the CPU}. Used by the
    tests (tolerance rule) and by benchmarks/tf32_check.py."""
    case = make_case(f"{model}_train_s{s}", impl, device, seed=seed, dtype=dtype)
    case.fn()
    return {n: q.grad.detach().cpu().clone() for n, q in case.ml.named_parameters()}


def layer_summary(ml: MetaLearner) -> List[Dict]:
    return [{"key": l.key, "cout": l.cout, "p": l.p, "cin_feat": l.cin_feat, "hidden": l.hidden} for l in ml.layers]
