"""Activation capture: mean input (pre) and mean output (post) per channel of the
adapted layers, from one forward pass of the student.

Means are over the batch and spatial positions (every dim but dim 1). Hooks are
registered only while the context is open and only on the student, so the
teacher's forward is untouched. Captured values are detached.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
from torch import nn


def channel_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but 1: [N, C, ...] -> [C]."""
    dims = [d for d in range(t.dim()) if d != 1]
    return t.detach().mean(dim=dims)


class ActivationCapture:
    """``with ActivationCapture(model, modules) as acts: model(x)`` fills
    ``acts[module_path] = (pre_mean [Cin], post_mean [Cout])``."""

    def __init__(self, model: nn.Module, modules: Iterable[str]):
        self.model = model
        self.modules = sorted(set(modules))
        self.acts: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        named = dict(self.model.named_modules())
        missing = [m for m in self.modules if m not in named]
        if missing:
            raise KeyError(f"ActivationCapture: no module named {missing} in {type(self.model).__name__}")
        for path in self.modules:
            self._handles.append(named[path].register_forward_hook(self._hook(path)))
        return self.acts

    def _hook(self, path: str):
        def fn(_mod, inputs, output):
            self.acts[path] = (channel_mean(inputs[0]), channel_mean(output))
        return fn

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False
