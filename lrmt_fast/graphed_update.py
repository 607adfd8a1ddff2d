"""The meta-test update of a whole student, captured once as a CUDA graph and replayed.

On a GPU the fused no-grad step (:func:`lrmt_fast.ops.network_step_`) is a long row of small
kernels: for ResNet-32 GN about 14 launches (GEMMs and pointwise stages) for each of its 93
adapted layers, each of them microseconds of GPU work, so the step is bound by the host's
launch rate. :class:`GraphedMetaUpdate` captures that step once and replays it: one launch
of the whole graph a step. The graph reads fixed buffers, so every call copies the step's
gradients and activations into them; the student's adapted weights and the LSTM state are
updated in place (their storage must stay the same tensors for as long as the object lives),
and theta is read from the meta-learner's parameters at every replay (no optimiser may
replace them; in-place changes are seen).

On the CPU, or with ``use_graph=False``, the same object runs the step eagerly through the
same buffers, so its bookkeeping is tested without a GPU (tests/test_graphed_update.py).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import _ext, ops

Tensor = torch.Tensor


class GraphedMetaUpdate:
    """``upd = GraphedMetaUpdate(ml, params, grads, acts, state, lr)``, then each step
    ``deltas = upd(grads, acts)``: the same update as ``ml.step_(params, grads, acts, state, lr,
    impl="fused")``. ``grads`` / ``acts`` of the first call only give the buffers' shapes.

    Capturing runs one warm-up step (which sizes the op's workspace) on copies of the weights
    and the state, and puts the originals back: building the object changes nothing. The
    returned deltas are the object's own buffers, overwritten by the next call.
    """

    def __init__(self, ml, params: Dict[str, Tensor], grads: Dict[str, Tensor],
                 acts: Dict[str, Tuple[Tensor, Tensor]], state, lr: float, use_graph: Optional[bool] = None):
        if not ml.layers:
            raise ValueError("GraphedMetaUpdate: the meta-learner adapts no layer")
        self.ml, self.params, self.state, self.lr = ml, params, state, float(lr)
        self._plan = plan = ml.plan
        dev = params[plan.weights[0]].device
        if not ops.available(dev):
            raise RuntimeError(f"GraphedMetaUpdate needs the fused extension on {dev}: {ops.build_info()}")
        self.grads = {k: grads[k].detach().clone() for k in (*plan.weights, *plan.biases)}
        self.acts = {m: (acts[m][0].detach().clone(), acts[m][1].detach().clone()) for m in plan.modules}
        ref = params[plan.weights[0]]
        self.deltas = [torch.empty(s, dtype=ref.dtype, device=ref.device) for s in plan.delta_shapes]
        self.use_graph = dev.type == "cuda" if use_graph is None else bool(use_graph)
        if self.use_graph and dev.type != "cuda":
            raise ValueError(f"GraphedMetaUpdate: CUDA graphs need a CUDA student, got {dev}")
        self.graph = None
        self._workspace = []
        if self.use_graph:
            self._capture()

    def _eager(self) -> None:
        ops.network_step_(self._plan, self.ml.theta_list(), self.params, self.grads, self.acts, self.state,
                          self.lr, delta_out=self.deltas)

    @torch.no_grad()
    def _capture(self) -> None:
        plan = self._plan
        keys = (*plan.weights, *plan.biases)
        saved_p = {k: self.params[k].clone() for k in keys}
        saved_s = {k: (h.clone(), c.clone()) for k, (h, c) in self.state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._eager()  # warm-up: sizes the workspace, loads the kernels
        torch.cuda.current_stream().wait_stream(side)
        for k in keys:
            self.params[k].copy_(saved_p[k])
        for k, (h, c) in saved_s.items():
            self.state[k][0].copy_(h)
            self.state[k][1].copy_(c)
        # the graph writes into this thread's workspace buffers: hold them, so that a later op
        # call that grows the workspace cannot free the memory the graph uses
        self._workspace = _ext.workspace_buffers()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._eager()
        self.graph = graph

    @torch.no_grad()
    def __call__(self, grads: Dict[str, Tensor], acts: Dict[str, Tuple[Tensor, Tensor]]) -> Dict[str, Tensor]:
        for k, buf in self.grads.items():
            buf.copy_(grads[k])
        for m, (pre, post) in self.acts.items():
            pre.copy_(acts[m][0])
            post.copy_(acts[m][1])
        if self.graph is not None:
            self.graph.replay()
        else:
            self._eager()
        return dict(zip(self._plan.keys, self.deltas))
