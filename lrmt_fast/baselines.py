"""The methods compared at meta-test: each is a *learner* that holds the network's
weights as a dict and takes one update step per Task B mini-batch.

Every method starts from the same Task A checkpoint (with a fresh, seeded
``head_b``) and sees the same Task B batches; only the update rule differs.

=============  ==============================================================
kind           update on a Task B batch (x_B, y_B); alpha = the meta-test lr
=============  ==============================================================
freeze         trunk frozen; only ``head_b`` is trained (SGD, alpha)
sgd            SGD on trunk + head_b, lr ``alpha * lr_scale`` (or an explicit
               ``lr``), optional ``momentum`` (``sgd_x0.1``: lr_scale 0.1)
lwf            Learning without Forgetting: CE_B + coef * T^2 * KL(p_old^T ||
               p_new^T) on the old head for x_B, p_old from the Task A
               network; trunk, head_a and head_b trained (coef 1, T 2)
ewc            CE_B + coef/2 * sum_i F_i (w_i - w*_i)^2 over the trunk, F the
               diagonal Fisher of the Task A model on Task A data (labels
               sampled from the model's own predictions: the true Fisher)
teacher        multi-task SGD on x_A u x_B (Task A batch from Task A's training
               data), the teacher of meta-training (:mod:`lrmt_fast.steps`): option
               ``loss`` "union" (default: one cross-entropy over the union batch) or
               "sum" (CE_A + CE_B, the teacher of this project's runs before 2026-12-07)
ours           the trained meta-learner on the trunk, SGD on head_b
               (:func:`lrmt_fast.steps.student_meta_update`); option
               ``reset_every`` K (not in the paper, a diagnostic): the LSTM
               state is reset to zero after every K steps, as at the start of
               a meta-training episode (docs/cifar.md, "past the horizon");
               option ``trace`` (bool): record the gate step by step
               (:mod:`lrmt_fast.gate_trace`), kept as the run's ``gate_trace``;
               option ``min_gate`` f (a diagnostic): the trunk update uses
               max(delta, f) instead of delta (f = 0: no update against the
               gradient)
=============  ==============================================================
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .gate_trace import GateTrace
from .meta_learner import pack_rows, unpack_rows
from .steps import TEACHER_LOSSES, student_meta_update, teacher_sgd_step
from .student import features, logits

Tensor = torch.Tensor
Params = Dict[str, Tensor]
KINDS = ("freeze", "sgd", "lwf", "ewc", "teacher", "ours")
# the diagnostic options of "ours" that change its update (``trace`` only reads)
OURS_UPDATE_OPTIONS = ("reset_every", "min_gate")


def trunk_keys(params: Params) -> list:
    return [k for k in params if not k.startswith("head_")]


def _head(params: Params, head: str, z: Tensor) -> Tensor:
    return F.linear(z, params[f"head_{head}.weight"], params.get(f"head_{head}.bias"))


# --------------------------------------------------------------------------- losses
def lwf_distillation(new_logits: Tensor, old_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """T^2 * KL(softmax(old/T) || softmax(new/T)), batch mean; zero when new == old."""
    t = temperature
    return F.kl_div(F.log_softmax(new_logits / t, dim=1), F.log_softmax(old_logits.detach() / t, dim=1),
                    log_target=True, reduction="batchmean") * (t * t)


def ewc_penalty(params: Params, anchor: Params, fisher: Params, coef: float = 1.0) -> Tensor:
    """coef/2 * sum_i F_i (w_i - w*_i)^2 over the parameters that have a Fisher entry."""
    total = None
    for k, f in fisher.items():
        term = (f * (params[k] - anchor[k]) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * coef * total


def fisher_diagonal(model: nn.Module, params: Params, x: Tensor, keys: Optional[Iterable[str]] = None,
                    head: str = "a", gen: Optional[torch.Generator] = None, chunk: int = 64) -> Params:
    """Diagonal Fisher E_x E_{y ~ p(y|x)} [(d log p(y|x) / dw)^2] of the parameters ``keys``
    (default: the trunk), from per-example gradients (``torch.func.vmap``) over ``x``."""

    keys = list(keys) if keys is not None else trunk_keys(params)
    fixed = {k: v.detach() for k, v in params.items() if k not in keys}
    sub = {k: params[k].detach() for k in keys}

    def nll(p_sub, xi, yi):
        out = functional_call(model, {**fixed, **p_sub}, (xi.unsqueeze(0), head))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_example = vmap(grad(nll), in_dims=(None, 0, 0))
    acc = {k: torch.zeros_like(v) for k, v in sub.items()}
    n = 0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        with torch.no_grad():
            probs = F.softmax(logits(model, {**fixed, **sub}, xb, head), dim=1)
            yb = torch.multinomial(probs.cpu(), 1, generator=gen).flatten().to(xb.device)
        g = per_example(sub, xb, yb)
        for k in keys:
            acc[k] += g[k].pow(2).sum(0)
        n += xb.shape[0]
    return {k: v / max(n, 1) for k, v in acc.items()}


# --------------------------------------------------------------------------- learners
class Learner:
    """A network's weights as a dict and an update rule. ``params`` always holds the current weights."""

    name = "learner"

    def __init__(self, params: Params):
        self.params = {k: v.detach().clone() for k, v in params.items()}

    def step(self, xb: Tensor, yb: Tensor) -> Optional[float]:
        """One update on the Task B batch; returns the training loss (None if the method has none)."""
        raise NotImplementedError


class GradientLearner(Learner):
    """SGD (with optional momentum) on ``trainable`` keys of a loss ``loss_fn(params, xb, yb)``."""

    def __init__(self, model: nn.Module, params: Params, loss_fn: Callable, trainable: Iterable[str],
                 lr: float, momentum: float = 0.0):
        super().__init__(params)
        self.model, self.loss_fn = model, loss_fn
        self.trainable = [k for k in self.params if k in set(trainable)]
        self.lr, self.momentum = float(lr), float(momentum)
        self.buf: Params = {}

    def step(self, xb, yb) -> float:
        leaves = {k: (v.requires_grad_(True) if k in self.trainable else v)
                  for k, v in ((k, v.detach()) for k, v in self.params.items())}
        loss = self.loss_fn(leaves, xb, yb)
        gs = torch.autograd.grad(loss, [leaves[k] for k in self.trainable], allow_unused=True)
        with torch.no_grad():
            for k, g in zip(self.trainable, gs):
                if g is None:
                    continue
                if self.momentum:
                    b = self.buf.get(k)
                    b = g.clone() if b is None else b.mul_(self.momentum).add_(g)
                    self.buf[k] = b
                    g = b
                self.params[k] = leaves[k].detach() - self.lr * g
        return float(loss.detach())


def ce_b(model):
    return lambda p, xb, yb: F.cross_entropy(logits(model, p, xb, "b"), yb)


class TeacherLearner(Learner):
    """Multi-task SGD on x_A u x_B (the meta-training teacher, :func:`lrmt_fast.steps.teacher_sgd_step`)."""

    name = "teacher"

    def __init__(self, model, params, lr, next_a: Callable, loss: str = "union"):
        super().__init__(params)
        if loss not in TEACHER_LOSSES:
            raise ValueError(f"method 'teacher': loss must be one of {list(TEACHER_LOSSES)}, got {loss!r}")
        self.model, self.lr, self.next_a, self.loss = model, lr, next_a, loss

    def step(self, xb, yb) -> float:
        xa, ya = self.next_a()
        self.params, _ = teacher_sgd_step(self.model, self.params, xa, ya, xb, yb, self.lr, self.loss)
        return None


class OursLearner(Learner):
    """The trained meta-learner on the trunk, SGD on head_b; state reset at the start."""

    name = "ours"

    def __init__(self, model, params, meta, lr, impl=None, reset_every: Optional[int] = None,
                 trace: bool = False, min_gate: Optional[float] = None):
        super().__init__(params)
        if not isinstance(trace, bool):
            raise ValueError(f"method 'ours': trace must be true or false, got {trace!r}")
        if min_gate is not None and (isinstance(min_gate, bool) or not isinstance(min_gate, (int, float))
                                     or not math.isfinite(min_gate)):
            raise ValueError(f"method 'ours': min_gate must be a finite number, got {min_gate!r}")
        if reset_every is not None and (isinstance(reset_every, bool) or not isinstance(reset_every, int)
                                        or reset_every < 1):
            raise ValueError(f"method 'ours': reset_every must be a positive integer (steps), got {reset_every!r}")
        # a private copy whose theta needs no grad: the rollout builds no graph
        self.meta = copy.deepcopy(meta).requires_grad_(False)
        dev = next(iter(self.params.values())).device
        self.state = self.meta.init_state(device=dev)
        self.model, self.lr, self.impl = model, lr, impl
        self.reset_every, self.steps_done = reset_every, 0
        self.trace = None
        if trace:
            self.trace = GateTrace(w0=self.params)
        self.min_gate = None if min_gate is None else float(min_gate)

    def _floor_gate(self, meta, deltas, grads, params) -> Dict[str, Tensor]:
        """Turn the update just made with delta into one with max(delta, min_gate): add back
        ``lr * min(delta - min_gate, 0) * g`` in place; returns the gate in effect."""
        out = {}
        for lay in meta.layers:
            d = deltas[lay.key]
            fix = (d - self.min_gate).clamp_max(0.0) * pack_rows(grads, lay)
            for k, v in unpack_rows(fix, lay, params).items():
                params[k].add_(v, alpha=self.lr)
            out[lay.key] = d.clamp_min(self.min_gate)
        return out

    def _observe(self, meta, deltas, grads, state, params) -> None:
        if self.min_gate is not None:
            deltas = self._floor_gate(meta, deltas, grads, params)
        if self.trace is not None:
            self.trace.record(meta, deltas, grads, state, params)

    def step(self, xb, yb) -> float:
        """The meta-test update, in place and without a graph (docs/method.md section 2): the
        trunk weights and the LSTM state are overwritten (the fused path allocates nothing
        per step), SGD on head_b; the same arithmetic as meta-training's update. With
        ``reset_every`` K the state is zeroed (in place) after every K steps; with ``min_gate``
        the gate is floored after the op's update (:meth:`_floor_gate`)."""
        if self.reset_every and self.steps_done and self.steps_done % self.reset_every == 0:
            for h, c in self.state.values():
                h.zero_()
                c.zero_()
        self.steps_done += 1
        _, _, _, loss = student_meta_update(self.model, self.meta, self.params, self.state, xb, yb, self.lr,
                                            impl=self.impl, in_place=True,
                                            observe=(self._observe if self.trace is not None or self.min_gate is not None
                                                     else None))
        return float(loss)


class MethodContext:
    """What the methods may need beyond the Task B batches; expensive parts computed once, lazily."""

    def __init__(self, model: nn.Module, w0_task_a: Params, lr: float, task_a_x: Optional[Tensor] = None,
                 task_a_y: Optional[Tensor] = None, meta=None, impl: Optional[str] = None,
                 fisher_samples: int = 1000, fisher_seed: int = 0):
        self.model, self.w0, self.lr = model, w0_task_a, lr
        self.task_a_x, self.task_a_y = task_a_x, task_a_y
        self.meta, self.impl = meta, impl
        self.fisher_samples, self.fisher_seed = fisher_samples, fisher_seed
        self._fisher: Optional[Params] = None

    @property
    def fisher(self) -> Params:
        if self._fisher is None:
            if self.task_a_x is None:
                raise ValueError("EWC needs Task A data for its Fisher information")
            g = torch.Generator().manual_seed(self.fisher_seed)
            idx = torch.randperm(self.task_a_x.shape[0], generator=g)[: self.fisher_samples]
            self._fisher = fisher_diagonal(self.model, self.w0, self.task_a_x[idx.to(self.task_a_x.device)], gen=g)
        return self._fisher


def spec_key(spec: Dict) -> Dict:
    """A method's spec as it enters run-cache keys: the teacher's default loss written out
    ("union"), and its "sum" (the default before 2026-12-07) left out, so that cached runs of
    the old teacher are never taken for the new one and stay recognised as what they are."""
    spec = dict(spec)
    if spec.get("kind") == "teacher":
        loss = spec.pop("loss", "union")
        if loss != "sum":
            spec["loss"] = loss
    return spec


# the options each kind takes, with their types (numbers: int or float; None: any)
_NUM = (int, float)
METHOD_OPTIONS = {
    "freeze": {"lr": _NUM, "lr_scale": _NUM, "momentum": _NUM},
    "sgd": {"lr": _NUM, "lr_scale": _NUM, "momentum": _NUM},
    "lwf": {"lr": _NUM, "lr_scale": _NUM, "momentum": _NUM, "coef": _NUM, "temperature": _NUM},
    "ewc": {"lr": _NUM, "lr_scale": _NUM, "momentum": _NUM, "coef": _NUM},
    "teacher": {"lr": _NUM, "lr_scale": _NUM, "loss": (str,)},
    "ours": {"lr": _NUM, "lr_scale": _NUM, "reset_every": (int,), "trace": (bool,), "min_gate": _NUM},
}


def check_method(spec) -> Dict:
    """A method's spec ``{"kind": ..., options}`` checked without building anything: the kind is
    known, every option is one the kind takes, with a value of its type and range. Returns the
    spec; raises ValueError with one line naming the first fault."""
    if not isinstance(spec, dict):
        raise ValueError(f"expected an object like {{\"kind\": \"sgd\"}}, got {spec!r}")
    kind = spec.get("kind")
    if kind not in METHOD_OPTIONS:
        raise ValueError(f"unknown method kind {kind!r}: expected one of {KINDS}")
    known = METHOD_OPTIONS[kind]
    if kind in ("teacher", "ours") and "momentum" in spec:
        raise ValueError(f"method {kind!r}: option 'momentum' is not supported (the teacher and the meta-learner "
                         f"take plain SGD steps, as in Algorithm 1)")
    unknown = sorted(k for k in spec if k != "kind" and k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"method {kind!r}: unknown option(s) {unknown}; its options: {sorted(known)}")
    pre = f"method {kind!r}: "
    for k, v in spec.items():
        if k not in known:
            continue
        if k == "reset_every":
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{pre}reset_every must be a positive integer (steps), got {v!r}")
        elif k == "trace":
            if not isinstance(v, bool):
                raise ValueError(f"{pre}trace must be true or false, got {v!r}")
        elif k == "min_gate":
            if v is not None and (isinstance(v, bool) or not isinstance(v, _NUM) or not math.isfinite(v)):
                raise ValueError(f"{pre}min_gate must be a finite number, got {v!r}")
        elif k == "loss":
            if v not in TEACHER_LOSSES:
                raise ValueError(f"{pre}loss must be one of {list(TEACHER_LOSSES)}, got {v!r}")
        else:       # the numeric options
            if isinstance(v, bool) or not isinstance(v, _NUM) or not math.isfinite(v):
                raise ValueError(f"{pre}{k} must be a finite number, got {v!r}")
            if k in ("lr", "lr_scale", "temperature") and not v > 0:
                raise ValueError(f"{pre}{k} must be > 0, got {v!r}")
            if k == "coef" and not v >= 0:
                raise ValueError(f"{pre}coef must be >= 0, got {v!r}")
            if k == "momentum" and not 0 <= v < 1:
                raise ValueError(f"{pre}momentum must be in [0, 1), got {v!r}")
    return spec


def make_learner(spec: Dict, ctx: MethodContext, params: Params, next_a: Optional[Callable] = None) -> Learner:
    """A learner for one method. ``spec`` = {"kind": ..., options}; ``params`` = the starting
    weights (Task A checkpoint with this run's fresh head_b); ``next_a`` draws Task A batches."""
    check_method(spec)
    spec = dict(spec)
    kind = spec.pop("kind", None)
    model = ctx.model
    lr = float(spec.pop("lr", ctx.lr)) * float(spec.pop("lr_scale", 1.0))
    if kind in ("teacher", "ours") and "momentum" in spec:
        raise ValueError(f"method {kind!r}: option 'momentum' is not supported (the teacher and the meta-learner "
                         f"take plain SGD steps, as in Algorithm 1)")
    momentum = float(spec.pop("momentum", 0.0))
    everything = list(params)
    if kind == "freeze":
        learner = GradientLearner(model, params, ce_b(model), ["head_b.weight", "head_b.bias"], lr, momentum)
    elif kind == "sgd":
        learner = GradientLearner(model, params, ce_b(model), trunk_keys(params) + ["head_b.weight", "head_b.bias"],
                                  lr, momentum)
    elif kind == "lwf":
        coef, t = float(spec.pop("coef", 1.0)), float(spec.pop("temperature", 2.0))
        w0 = {k: v.detach() for k, v in ctx.w0.items()}

        def lwf_loss(p, xb, yb):
            with torch.no_grad():
                old = _head(w0, "a", features(model, w0, xb))
            z = features(model, p, xb)
            return F.cross_entropy(_head(p, "b", z), yb) + coef * lwf_distillation(_head(p, "a", z), old, t)

        learner = GradientLearner(model, params, lwf_loss, everything, lr, momentum)
    elif kind == "ewc":
        coef = float(spec.pop("coef", 1.0))
        fisher = ctx.fisher
        anchor = {k: ctx.w0[k].detach() for k in fisher}
        base = ce_b(model)
        learner = GradientLearner(model, params, lambda p, xb, yb: base(p, xb, yb) + ewc_penalty(p, anchor, fisher, coef),
                                  trunk_keys(params) + ["head_b.weight", "head_b.bias"], lr, momentum)
    elif kind == "teacher":
        if next_a is None:
            raise ValueError("the teacher needs Task A batches (next_a)")
        learner = TeacherLearner(model, params, lr, next_a, loss=spec.pop("loss", "union"))
    elif kind == "ours":
        if ctx.meta is None:
            raise ValueError("method 'ours' needs a trained meta-learner")
        learner = OursLearner(model, params, ctx.meta, lr, ctx.impl, reset_every=spec.pop("reset_every", None),
                              trace=spec.pop("trace", False), min_gate=spec.pop("min_gate", None))
    else:
        raise ValueError(f"unknown method kind {kind!r}: expected one of {KINDS}")
    if spec:
        raise ValueError(f"method {kind!r}: unknown option(s) {sorted(spec)}")
    learner.name = kind
    return learner
