"""One inner step of Algorithm 1, shared by meta-training and the meta-test.

- the teacher's SGD step (:class:`TeacherConfig`, :func:`make_teacher`): the paper's multi-task
  teacher on x_A u x_B, or a known-answer teacher whose optimal gate is known exactly;
- the student's step (:func:`student_meta_update`): the meta-learner on the adapted trunk
  layers, plain SGD on ``head_b``;
- the meta-loss (:func:`meta_loss`): ``loss_coef * Huber(h_student, h_teacher)`` on the
  representation of x_A u x_B.

Teachers (``teacher: {"kind": ...}`` of the meta-training config, docs/method.md):

=============  ==========================================================================
kind           one step from weights w on the step's batches (x_A, y_A), (x_B, y_B)
=============  ==========================================================================
multitask      the paper's teacher (Algorithm 1 line 11). ``loss: "union"`` (default): ONE
               cross-entropy over the union batch x_A u x_B, each example through its own
               task's head, mean over all examples; ``loss: "sum"``: CE_A + CE_B, two
               batch means (this project's teacher before 2026-12-07; it steps Task A at
               the full lr and forgets Task A, docs/findings.md). All parameters at lr.
sgd_scaled     known answer: plain SGD on the student's own Task B batch, the adapted trunk
               layers at lr * c, ``head_b`` at lr. The student equals it iff delta == c on
               every synapse (the meta-loss is then exactly 0).
sgd_frozen     known answer: the same with the adapted layers of the modules named in
               ``layers`` frozen and the other adapted layers at lr: the optimal gate is 0
               on the frozen layers and 1 elsewhere.
=============  ==========================================================================
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .meta_learner import MetaLearner
from .student import ModuleFunctional, grads_and_acts

Tensor = torch.Tensor
Params = Dict[str, Tensor]
TEACHER_KINDS = ("multitask", "sgd_scaled", "sgd_frozen")
TEACHER_LOSSES = ("union", "sum")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher of meta-training (see the module docstring)."""

    kind: str = "multitask"
    loss: str = "union"            # multitask only: "union" | "sum"
    c: float = 0.5                 # sgd_scaled only: the trunk's lr factor = the optimal gate
    layers: Tuple[str, ...] = ()   # sgd_frozen only: module names whose adapted layers are frozen

    def __post_init__(self):
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"teacher kind must be one of {list(TEACHER_KINDS)}, got {self.kind!r}")
        if self.loss not in TEACHER_LOSSES:
            raise ValueError(f"teacher loss must be one of {list(TEACHER_LOSSES)}, got {self.loss!r}")
        if isinstance(self.c, bool) or not isinstance(self.c, (int, float)) or not math.isfinite(self.c):
            raise ValueError(f"teacher c must be a finite number, got {self.c!r}")
        if isinstance(self.layers, str) or not all(isinstance(x, str) for x in self.layers):
            raise ValueError(f"teacher layers must be a list of module names, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.kind == "sgd_frozen" and not self.layers:
            raise ValueError("teacher kind 'sgd_frozen' needs 'layers': the module names to freeze")

    @classmethod
    def from_value(cls, v) -> "TeacherConfig":
        if isinstance(v, cls):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"teacher must be an object like {{\"kind\": \"multitask\"}}, got {v!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(v) - names)
        if unknown:
            raise ValueError(f"unknown teacher option(s) {unknown}; known: {sorted(names)}")
        d = dict(v)
        if "layers" in d and isinstance(d["layers"], list):
            d["layers"] = tuple(d["layers"])
        return cls(**d)

    def key(self) -> Optional[dict]:
        """What identifies this teacher in a cache key; None for the teacher of the runs before
        the option existed (multitask, loss "sum"), so their caches stay recognised."""
        if self.kind == "multitask":
            return None if self.loss == "sum" else {"kind": "multitask", "loss": self.loss}
        d = {"kind": self.kind}
        if self.kind == "sgd_scaled":
            d["c"] = float(self.c)
        else:
            d["layers"] = list(self.layers)
        return d

    def optimal_gate(self, layer_module: str) -> Optional[float]:
        """The gate with which the student equals this teacher on ``layer_module`` (None for
        the multitask teacher, whose optimum is not known)."""
        if self.kind == "sgd_scaled":
            return float(self.c)
        if self.kind == "sgd_frozen":
            return 0.0 if layer_module in self.layers else 1.0
        return None


def head_logits(params: Params, head: str, z: Tensor) -> Tensor:
    pre = f"head_{head}."
    return F.linear(z, params[pre + "weight"], params.get(pre + "bias"))


def _sgd(leaves: Params, loss: Tensor, lrs: Dict[str, float]) -> Params:
    names = [k for k in leaves if lrs.get(k, 0.0) != 0.0]
    gs = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    out = {k: v.detach() for k, v in leaves.items()}
    for k, g in zip(names, gs):
        if g is not None:
            out[k] = (leaves[k] - lrs[k] * g).detach()
    return out


def teacher_sgd_step(model: nn.Module, params: Params, xa: Tensor, ya: Tensor, xb: Tensor, yb: Tensor,
                     lr: float, loss: str = "union", fn=None) -> Tuple[Params, float]:
    """The multi-task teacher's SGD step on x_A u x_B (every parameter at ``lr``).

    ``loss="union"``: one cross-entropy over the union batch, each example through its own
    task's head (= ``F.cross_entropy`` over the concatenated batch); ``loss="sum"``:
    ``CE_A + CE_B``, two batch means. Returns (new params, the teacher's CE_A on x_A before
    the step), the CE_A coming from the same forward pass. ``fn``: the network's evaluator
    (:func:`lrmt_fast.student.functional`; default: the module's own code).
    """
    if loss not in TEACHER_LOSSES:
        raise ValueError(f"teacher loss must be one of {list(TEACHER_LOSSES)}, got {loss!r}")
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    na = xa.shape[0]
    z = (fn or ModuleFunctional(model)).features(leaves, torch.cat([xa, xb]))
    ce_a = F.cross_entropy(head_logits(leaves, "a", z[:na]), ya, reduction="none")
    ce_b = F.cross_entropy(head_logits(leaves, "b", z[na:]), yb, reduction="none")
    if loss == "union":
        total = torch.cat([ce_a, ce_b]).mean()
    else:
        total = ce_a.mean() + ce_b.mean()
    new = _sgd(leaves, total, {k: lr for k in leaves})
    return new, float(ce_a.detach().mean())


class Teacher:
    """A teacher's update rule; ``step`` returns (new params, CE_A of the multi-task teacher or None)."""

    def __init__(self, cfg: TeacherConfig, model: nn.Module, adapted_params: Sequence[str],
                 adapted_modules: Sequence[str]):
        self.cfg, self.model = cfg, model
        self.adapted = set(adapted_params)
        if cfg.kind == "sgd_frozen":
            unknown = sorted(set(cfg.layers) - set(adapted_modules))
            if unknown:
                raise ValueError(f"teacher sgd_frozen: {unknown} are not adapted layers of the network; "
                                 f"adapted: {sorted(set(adapted_modules))}")
        self._lrs: Optional[Dict[str, float]] = None

    def _lr_table(self, params: Params, lr: float) -> Dict[str, float]:
        if self._lrs is None or self._lrs.get("__lr__") != lr:
            cfg, lrs = self.cfg, {"__lr__": lr}
            for k in params:
                module = k.rsplit(".", 1)[0]
                if k.startswith("head_b."):
                    lrs[k] = lr
                elif k in self.adapted:
                    if cfg.kind == "sgd_scaled":
                        lrs[k] = lr * float(cfg.c)
                    else:
                        lrs[k] = 0.0 if module in cfg.layers else lr
                else:
                    lrs[k] = 0.0
            self._lrs = lrs
        return self._lrs

    def step(self, params: Params, xa: Tensor, ya: Tensor, xb: Tensor, yb: Tensor,
             lr: float, fn=None) -> Tuple[Params, Optional[float]]:
        if self.cfg.kind == "multitask":
            return teacher_sgd_step(self.model, params, xa, ya, xb, yb, lr, self.cfg.loss, fn=fn)
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = F.cross_entropy((fn or ModuleFunctional(self.model)).logits(leaves, xb, "b"), yb)
        return _sgd(leaves, loss, self._lr_table(params, lr)), None


def make_teacher(cfg, model: nn.Module, meta: MetaLearner) -> Teacher:
    """The teacher of ``cfg`` (a :class:`TeacherConfig` or its dict) for ``model`` adapted by ``meta``."""
    cfg = TeacherConfig.from_value(cfg)
    params = [p for lay in meta.layers for p in (lay.weight, lay.bias) if p is not None]
    return Teacher(cfg, model, params, [lay.module for lay in meta.layers])


def adapted_modules(meta: MetaLearner) -> List[str]:
    return sorted({l.module for l in meta.layers})


def student_meta_update(model: nn.Module, meta: MetaLearner, params: Params, state,
                        xb: Tensor, yb: Tensor, lr: float, impl: Optional[str] = None,
                        train: bool = False, in_place: bool = False, observe=None, stage=None, fn=None):
    """One student step on Task B: meta-learner on the adapted trunk layers, SGD on head_b.

    ``train=True`` keeps the graph to theta (and snapshots theta so that it may be
    updated in place by the optimiser while older steps' graphs are retained).
    ``in_place=True`` (meta-test) writes the new weights and LSTM state into ``params`` and
    ``state`` without a graph (:meth:`MetaLearner.step_`) and returns those same dicts.
    ``observe(meta, deltas, grads, state, params)``, if given, is called after the meta-learner's
    update with its new state and weights (e.g. :meth:`lrmt_fast.gate_trace.GateTrace.record`).
    ``stage(name)``, if given, is a context manager around the gradient ("student_grad") and the
    meta-learner's update ("op") (:func:`lrmt_fast.meta_training.run_episode`'s stage timer).
    ``fn``: the network's evaluator (:func:`lrmt_fast.student.functional`; default: the module's
    own code, as the meta-test uses it).
    Returns (new_params, new_state, deltas, task-B loss).
    """
    stage = stage or _no_stage
    with stage("student_grad"):
        loss, grads, acts = grads_and_acts(model, params, xb, yb, "b", adapted_modules(meta), fn=fn)
    if in_place:
        with torch.no_grad():
            deltas = meta.step_(params, grads, acts, state, lr, impl=impl)
            if observe is not None:
                observe(meta, deltas, grads, state, params)
            for k, v in params.items():
                if k.startswith("head_b."):
                    v.sub_(grads[k], alpha=lr)
        return params, state, deltas, loss
    with stage("op"):
        new_adapted, new_state, deltas = meta.step(params, grads, acts, state, lr, impl=impl, snapshot=train)
    if observe is not None:
        observe(meta, deltas, grads, new_state, new_adapted)
    new_params = dict(params)
    new_params.update(new_adapted)
    for k in params:
        if k.startswith("head_b."):
            new_params[k] = params[k] - lr * grads[k]
    return new_params, new_state, deltas, loss


def _no_stage(_name: str):
    return _NULL_STAGE


_NULL_STAGE = contextlib.nullcontext()


def meta_loss(model: nn.Module, teacher: Params, student: Params, x: Tensor, loss_coef: float,
              huber_delta: float = 1.0, fn=None) -> Tensor:
    """``loss_coef * Huber(h_student, h_teacher, delta)``, mean over batch and features (``fn``:
    the network's evaluator, :func:`lrmt_fast.student.functional`; default: the module's code)."""
    fn = fn or ModuleFunctional(model)
    with torch.no_grad():
        ht = fn.features(teacher, x)
    hs = fn.features(student, x)
    return loss_coef * F.huber_loss(hs, ht, delta=huber_delta)
