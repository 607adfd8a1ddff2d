"""Entry point of the meta-update op: dispatches to the fused extension or the reference.

``impl`` (argument) or ``LRMT_IMPL`` (environment) = ``reference`` | ``fused`` | ``auto``.

- ``reference``: :mod:`lrmt_fast.reference` (plain PyTorch; defines correctness).
- ``fused``: the C++/CUDA extension ``lrmt_fast._C`` (``torch.ops.lrmt_fast.*``); an
  error if it is not built (or not built with CUDA, for CUDA tensors).
- ``auto`` (default): fused when the extension supports the tensors' device, else
  the reference, with one warning.

Per-layer ops: :func:`meta_step` (differentiable) and :func:`meta_step_` (no grad, in
place). Whole-network ops (one call for every adapted layer of a student):
:func:`network_step` / :func:`network_step_` / :func:`network_feature_scale`, used by
:meth:`lrmt_fast.meta_learner.MetaLearner.step` / ``step_``. They take plain tensors and a
:class:`NetworkPlan` (the layers' parameter paths, keys and flags; ``MetaLearner.plan``)
with theta packed in the op's order (``MetaLearner.theta_list()``); this module knows
nothing of the meta-learner (it imports only ``_ext`` and ``reference``).

The whole-network fused step computes the per-layer feature scale
(:func:`lrmt_fast.meta_learner.feature_scale`) inside the extension: the same
formula (float32 evaluation, sum of squares accumulated in double), equal to the
Python one to about one float32 ulp rather than bit for bit.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from . import _ext, reference

Tensor = torch.Tensor
IMPLS = ("auto", "reference", "fused")
_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def available(device=None) -> bool:
    """True when the fused extension can run on ``device`` (default: CPU)."""
    if not _ext.AVAILABLE:
        return False
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return _ext.cuda_compiled()
    return False


def _why_unavailable(dev: torch.device) -> str:
    if not _ext.AVAILABLE:
        return (f"the fused extension lrmt_fast._C is not built ({_ext.ERROR}); "
                "build it with `pip install --no-build-isolation -e .`")
    return (f"lrmt_fast._C was built without {dev.type.upper()} support"
            + ("; rebuild with a CUDA toolkit (LRMT_CUDA=1, CUDA_HOME)" if dev.type == "cuda" else ""))


def resolve_impl(impl: Optional[str] = None, device=None, warn: bool = True) -> str:
    """'reference' or 'fused' for tensors on ``device`` (default CPU)."""
    impl = impl or os.environ.get("LRMT_IMPL", "auto") or "auto"
    impl = impl.strip().lower()
    if impl not in IMPLS:
        raise ValueError(f"impl (or LRMT_IMPL) must be 'auto', 'reference' or 'fused', got {impl!r}")
    if impl == "reference":
        return "reference"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if available(dev):
        return "fused"
    if impl == "fused":
        raise RuntimeError(f"impl='fused' (LRMT_IMPL) was requested but {_why_unavailable(dev)}")
    if warn:
        _warn_once(f"fallback-{dev.type}",
                   f"lrmt_fast: {_why_unavailable(dev)}; using the pure-PyTorch reference path")
    return "reference"


def build_info() -> dict:
    """Facts about the build and which path a run will use (printed by ``lrmt info``)."""
    facts = _ext.build_facts()
    info = {
        "extension_built": _ext.AVAILABLE,
        "extension_error": _ext.ERROR,
        "cpu_compiled": bool(facts.get("cpu_compiled", False)),
        "cuda_compiled": bool(facts.get("cuda_compiled", False)),
        "cuda_arch_list": facts.get("cuda_arch_list") or None,
        "openmp": facts.get("openmp"),
        "cpu_avx2_kernels": facts.get("cpu_avx2_kernels"),
        "torch_version": torch.__version__,
        "torch_version_built": facts.get("torch_version_built"),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "num_threads": torch.get_num_threads(),
        "LRMT_IMPL": os.environ.get("LRMT_IMPL"),
    }
    for dev in ("cpu", "cuda"):
        try:
            info[f"impl_{dev}"] = resolve_impl(None, dev, warn=False)
        except (RuntimeError, ValueError) as exc:
            info[f"impl_{dev}"] = f"error: {exc}"
    info["impl"] = info["impl_cuda"] if torch.cuda.is_available() else info["impl_cpu"]
    return info


def _c(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _requires_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


# --------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------
def meta_step(w, g, pre, post, h, c, theta, lr, fscale, impl=None, snapshot: bool = False):
    """Differentiable meta-update of one layer: (w_new, delta, h_new, c_new); see reference.meta_step."""
    if resolve_impl(impl, w.device) == "reference":
        if snapshot:
            theta = tuple(t.clone() for t in theta)
        return reference.meta_step(w, g, pre, post, h, c, theta, lr, fscale)
    theta = [_c(t) for t in theta]
    w, h, c = _c(w), _c(h), _c(c)
    fs = _c(fscale.detach().to(device=w.device, dtype=w.dtype))
    need = _requires_grad(w, h, c, *theta)
    w_new, delta, h_new, c_new, _, _ = torch.ops.lrmt_fast.meta_step(
        w, _c(g.detach()), _c(pre.detach()), _c(post.detach()), h, c, theta, float(lr), fs, need,
        bool(snapshot and need))
    return w_new, delta, h_new, c_new


def meta_step_(w, g, pre, post, h, c, theta, lr, fscale, delta_out=None, impl=None):
    """No-grad in-place meta-update of one layer (overwrites w, h, c); returns delta."""
    if resolve_impl(impl, w.device) == "reference":
        return reference.meta_step_(w, g, pre, post, h, c, theta, lr, fscale, delta_out)
    with torch.no_grad():
        fs = _c(fscale.detach().to(device=w.device, dtype=w.dtype))
        if delta_out is None:
            delta_out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        torch.ops.lrmt_fast.meta_step_(w, _c(g), _c(pre), _c(post), h, c, [_c(t) for t in theta], float(lr), fs,
                                       delta_out)
    return delta_out


# --------------------------------------------------------------------------------------
# whole network (every adapted layer of a student in one call)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkPlan:
    """What the network op needs to know about a student's adapted layers, in the op's layer
    order: where each layer's tensors are found in the ``params`` / ``grads`` / ``acts`` /
    ``state`` dicts, and its flags. Static for a meta-learner (``MetaLearner.plan`` builds it
    once); theta is passed beside it, packed in the same layer order (3L + 3 tensors a layer)."""

    weights: Tuple[str, ...]                  # parameter path of each layer's weight
    biases: Tuple[str, ...]                   # parameter paths of the bias synapses (layers with one)
    modules: Tuple[str, ...]                  # module path of each layer (its ``acts`` key)
    keys: Tuple[str, ...]                     # layer key of each layer (its ``state`` / delta key)
    flags: Tuple[int, ...]                    # HAS_BIAS | PER_NEURON_PRE of each layer
    delta_shapes: Tuple[Tuple[int, int], ...]  # [Cout, P] of each layer's delta

    @property
    def n(self) -> int:
        return len(self.keys)

    @classmethod
    def from_layers(cls, layers: Iterable) -> "NetworkPlan":
        """From layer descriptions with ``key``, ``module``, ``weight``, ``bias`` (path or
        None), ``per_neuron_pre``, ``cout`` and ``p`` (``meta_learner.AdaptedLayer``)."""
        layers = list(layers)
        return cls(
            weights=tuple(l.weight for l in layers),
            biases=tuple(l.bias for l in layers if l.bias is not None),
            modules=tuple(l.module for l in layers),
            keys=tuple(l.key for l in layers),
            flags=tuple((_ext.HAS_BIAS if l.bias is not None else 0)
                        | (_ext.PER_NEURON_PRE if l.per_neuron_pre else 0) for l in layers),
            delta_shapes=tuple((l.cout, l.p) for l in layers))


def _net_inputs(plan: NetworkPlan, params, grads, acts, state):
    w = [params[k] for k in plan.weights]
    wb = [params[k] for k in plan.biases]
    g = [_c(grads[k].detach()) for k in plan.weights]
    gb = [_c(grads[k].detach()) for k in plan.biases]
    pre = [_c(acts[m][0].detach()) for m in plan.modules]
    post = [_c(acts[m][1].detach()) for m in plan.modules]
    h = [state[k][0] for k in plan.keys]
    c = [state[k][1] for k in plan.keys]
    return w, wb, g, gb, pre, post, h, c


def network_step(plan: NetworkPlan, theta: Sequence[Tensor], params: Dict[str, Tensor],
                 grads: Dict[str, Tensor], acts, state, lr: float, snapshot: bool = False,
                 fscale: Optional[Tensor] = None):
    """Fused, differentiable :meth:`MetaLearner.step`: one op call for every adapted layer.

    ``plan`` / ``theta``: ``MetaLearner.plan`` and ``MetaLearner.theta_list()``.
    Returns (new adapted params {path: tensor}, new state {key: (h, c)}, {key: delta}).
    ``snapshot`` makes the op keep its own copy of theta for the backward, so an
    optimiser may update theta in place while this step's graph is retained.
    ``fscale`` ([n_layers, 4]) overrides the feature scale the op computes itself.
    """
    w, wb, g, gb, pre, post, h, c = _net_inputs(plan, params, grads, acts, state)
    w, wb, h, c = [_c(t) for t in w], [_c(t) for t in wb], [_c(t) for t in h], [_c(t) for t in c]
    theta = [_c(t) for t in theta]
    need = _requires_grad(*w, *wb, *h, *c, *theta)
    w_new, wb_new, delta, h_new, c_new, _fs, _saved, _snap = torch.ops.lrmt_fast.meta_step_net(
        w, wb, g, gb, pre, post, h, c, theta, plan.flags, float(lr), fscale, need, bool(snapshot and need))
    new_params = dict(zip(plan.weights, w_new))
    new_params.update(zip(plan.biases, wb_new))
    new_state = {k: (hn, cn) for k, hn, cn in zip(plan.keys, h_new, c_new)}
    return new_params, new_state, dict(zip(plan.keys, delta))


def network_step_(plan: NetworkPlan, theta: Sequence[Tensor], params: Dict[str, Tensor],
                  grads: Dict[str, Tensor], acts, state, lr: float,
                  delta_out: Optional[Sequence[Tensor]] = None, fscale: Optional[Tensor] = None):
    """Fused, no-grad, in-place :meth:`MetaLearner.step_`: writes the adapted parameters
    and the state in place (their storage is kept) and returns {key: delta}.

    ``delta_out`` (one [Cout, P] tensor per layer) receives delta; by default fresh tensors.
    """
    with torch.no_grad():
        w, wb, g, gb, pre, post, h, c = _net_inputs(plan, params, grads, acts, state)
        # in-place targets must be contiguous: write through a contiguous copy otherwise
        copies = []
        for lst in (w, wb, h, c):
            for i, t in enumerate(lst):
                if not t.is_contiguous():
                    tc = t.contiguous()
                    copies.append((t, tc))
                    lst[i] = tc
        theta = [_c(t) for t in theta]
        if delta_out is None:
            ref = w[0]
            delta_out = [torch.empty(s, dtype=ref.dtype, device=ref.device) for s in plan.delta_shapes]
        delta_out = list(delta_out)
        torch.ops.lrmt_fast.meta_step_net_(w, wb, g, gb, pre, post, h, c, theta, plan.flags, float(lr), fscale,
                                           delta_out)
        for dst, src in copies:
            dst.copy_(src)
    return dict(zip(plan.keys, delta_out))


def network_feature_scale(plan: NetworkPlan, theta: Sequence[Tensor], params, grads, acts, state) -> Tensor:
    """The fused path's per-layer feature scale [n_layers, 4] (for tests and diagnostics)."""
    w, wb, g, gb, pre, post, h, c = _net_inputs(plan, params, grads, acts, state)
    theta = [_c(t.detach()) for t in theta]
    with torch.no_grad():
        return torch.ops.lrmt_fast.feature_scale_net([_c(t) for t in w], [_c(t) for t in wb], g, gb, pre, post,
                                                     [_c(t) for t in h], [_c(t) for t in c], theta, plan.flags)
