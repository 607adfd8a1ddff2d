"""A trained meta-learner as the optimiser of a model: :class:`GatedSGD`.

    meta = lrmt_fast.load_meta("runs/exp1_mnist/quick/cache/meta-*/meta_ckpt.pt")
    opt = lrmt_fast.GatedSGD(model, meta, lr=0.05)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x, "b"), y).backward()
        opt.step()

Every layer the meta-learner was trained for (matched by module path and shape) is updated as
in the paper's meta-test: ``w <- w - lr * delta * g`` with the gate ``delta`` from the layer's
LSTM learner, which sees the weights, the gradient and the mean input and output of the layer
on the batch of the last forward pass (captured by forward hooks). Every other parameter (the
classification heads, layers the meta-learner does not know) takes plain SGD at ``lr``. The
LSTM state is carried from step to step (as in a meta-test rollout) and reset by
:meth:`GatedSGD.reset_state`. A freshly initialised meta-learner has ``delta == 1``: the
optimiser is then exactly ``torch.optim.SGD(model.parameters(), lr)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .capture import channel_mean
from .meta_learner import MetaLearner

Tensor = torch.Tensor


class GatedSGD(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` updating ``model`` with the trained meta-learner ``meta``."""

    def __init__(self, model: nn.Module, meta: MetaLearner, lr: float, impl: Optional[str] = None):
        if not lr > 0:
            raise ValueError(f"GatedSGD: lr must be > 0, got {lr}")
        super().__init__(list(model.parameters()), {"lr": float(lr)})
        self.model, self.impl = model, impl
        self.meta = meta.requires_grad_(False)
        named_mods = dict(model.named_modules())
        named_params = dict(model.named_parameters())
        for lay in meta.layers:
            if lay.module not in named_mods:
                raise ValueError(f"GatedSGD: the meta-learner adapts {lay.module!r}, which {type(model).__name__} "
                                 f"does not have; its modules: {sorted(m for m in named_mods if m)[:12]} ...")
            for p in (lay.weight, lay.bias):
                if p is not None and p not in named_params:
                    raise ValueError(f"GatedSGD: the meta-learner adapts the parameter {p!r}, which the model lacks")
            w = named_params[lay.weight]
            p_model = w[0].numel() + (1 if lay.bias is not None else 0) if lay.kind in ("conv", "linear") else 1
            if w.shape[0] != lay.cout or p_model != lay.p:
                raise ValueError(f"GatedSGD: layer {lay.module!r} has {w.shape[0]} x {p_model} synapses; the "
                                 f"meta-learner was trained for {lay.cout} x {lay.p}")
        self._paths = {id(p): name for name, p in named_params.items()}
        self._adapted = {p for lay in meta.layers for p in (lay.weight, lay.bias) if p is not None}
        self._acts: Dict[str, Tuple[Tensor, Tensor]] = {}
        self._hooks = [named_mods[m].register_forward_hook(self._hook(m))
                       for m in sorted({lay.module for lay in meta.layers})]
        self.lstm_state = None
        self.reset_state()

    def _hook(self, path: str):
        def fn(_mod, inputs, output):
            if torch.is_grad_enabled():      # the forward whose gradient step() will use
                self._acts[path] = (channel_mean(inputs[0]), channel_mean(output))
        return fn

    def reset_state(self) -> None:
        """Zero the meta-learner's LSTM state (a new sequence of updates, like a new meta-test run)."""
        dev = next(self.model.parameters()).device
        self.lstm_state = self.meta.to(dev).init_state(device=dev)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self.param_groups[0]["lr"]
        params: Dict[str, Tensor] = {}
        grads: Dict[str, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                name = self._paths.get(id(p))
                if name in self._adapted:
                    params[name] = p.detach()
                    grads[name] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                elif p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        if self.meta.layers:
            missing = sorted({lay.module for lay in self.meta.layers} - set(self._acts))
            if missing:
                raise RuntimeError(f"GatedSGD.step: no forward pass with gradients through {missing} since the "
                                   f"last step (the gate needs the layers' inputs and outputs)")
            self.meta.step_(params, grads, self._acts, self.lstm_state, lr, impl=self.impl)
        self._acts = {}
        return loss
