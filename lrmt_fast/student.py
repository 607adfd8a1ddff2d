"""Functional student helpers: parameters as a dict, forward with
:func:`torch.func.functional_call`, first-order gradients and activations."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .capture import ActivationCapture

Tensor = torch.Tensor


def param_dict(model: nn.Module, detach: bool = True) -> Dict[str, Tensor]:
    return {k: (v.detach().clone() if detach else v) for k, v in model.named_parameters()}


def features(model: nn.Module, params: Dict[str, Tensor], x: Tensor) -> Tensor:
    """The representation of ``x`` under ``params`` (differentiable in params)."""
    return _call(model, params, "features", x)


def logits(model: nn.Module, params: Dict[str, Tensor], x: Tensor, head: str) -> Tensor:
    return _call(model, params, "forward", x, head)


def _call(model, params, method, *args):
    # functional_call on a bound method other than forward: swap forward for the call
    if method == "forward":
        return functional_call(model, params, args)
    orig = model.forward
    try:
        model.forward = getattr(model, method)
        return functional_call(model, params, args)
    finally:
        model.forward = orig


class ModuleFunctional:
    """A network evaluated on a parameter dict through its own module code
    (:func:`torch.func.functional_call`; activations by :class:`ActivationCapture` hooks).
    What every caller of this module uses; meta-training's inner step may use a faster
    evaluator of the same function (:func:`functional`)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def features(self, params: Dict[str, Tensor], x: Tensor) -> Tensor:
        return _call(self.model, params, "features", x)

    def logits(self, params: Dict[str, Tensor], x: Tensor, head: str) -> Tensor:
        return _call(self.model, params, "forward", x, head)

    def logits_and_acts(self, params: Dict[str, Tensor], x: Tensor, head: str,
                        modules: Iterable[str]) -> Tuple[Tensor, Dict]:
        with ActivationCapture(self.model, modules) as acts:
            out = self.logits(params, x, head)
        return out, dict(acts)


def functional(model: nn.Module, fast: bool = True):
    """The evaluator of ``model`` on parameter dicts for meta-training's inner step: the
    model's own fast one when it has one and ``fast`` (``model.fast_functional()``, e.g.
    :class:`lrmt_fast.models.lenet.LeNetFunctional`: the same function and activations, float32
    rounding apart), else :class:`ModuleFunctional` (the module's code, bit for bit)."""
    if fast:
        make = getattr(model, "fast_functional", None)
        fn = make() if make is not None else None
        if fn is not None:
            return fn
    return ModuleFunctional(model)


def grads_and_acts(model: nn.Module, params: Dict[str, Tensor], x: Tensor, y: Tensor,
                   head: str, modules: Iterable[str], fn=None) -> Tuple[Tensor, Dict[str, Tensor], Dict]:
    """Cross-entropy loss on (x, y) through ``head``; first-order gradients for every
    parameter (detached), and the captured activations of ``modules``.

    The forward runs on detached leaves, so no graph reaches earlier meta-steps. ``fn``: the
    network's evaluator (:func:`functional`; default: the module's own code).
    """
    fn = fn or ModuleFunctional(model)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    out, acts = fn.logits_and_acts(leaves, x, head, modules)
    loss = F.cross_entropy(out, y)
    names = list(leaves)
    gs = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    grads = {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, gs)}
    return loss.detach(), grads, acts


def fresh_head_b(w0: Dict[str, Tensor], gen: torch.Generator) -> Dict[str, Tensor]:
    """A copy of ``w0`` with ``head_b`` redrawn like ``nn.Linear``'s default init, from ``gen``."""
    out = dict(w0)
    w = w0["head_b.weight"]
    bound = 1.0 / math.sqrt(w.shape[1])
    out["head_b.weight"] = ((torch.rand(w.shape, generator=gen) * 2 - 1) * bound).to(w.device, w.dtype)
    if "head_b.bias" in w0:
        b = w0["head_b.bias"]
        out["head_b.bias"] = ((torch.rand(b.shape, generator=gen) * 2 - 1) * bound).to(b.device, b.dtype)
    return out
