"""Step-by-step trace of the meta-learner's gate during a meta-test rollout of "ours".

Figure 7 (:mod:`lrmt_fast.figures`) pools the gate ``delta`` over all steps; this records,
after every update step, how the gate acts on that step's Task B gradient ``g`` and how the
LSTM state has grown, so that one can see *when* the meta-learner's update changes, e.g. past
the episode length it was meta-trained on. Per layer-kind group ("all", "conv / linear",
"GroupNorm gamma / beta"):

- ``descent_ratio`` = sum(delta * g^2) / sum(g^2): the share of plain SGD's first-order
  decrease of the Task B loss that the gated update achieves (SGD 1, a frozen trunk 0, < 0 the
  update climbs the Task B loss);
- ``frac_negative``: the share of synapses with delta < 0 (updated against their gradient);
- ``mean``: the mean delta;
- ``gate_change``: the mean |delta_t - delta_{t-1}| (0 on the first step): how much the gate
  still reacts to its inputs;
- with the starting weights given (``GateTrace(w0)``, as "ours" does), ``drift_neg`` and
  ``drift_pos``: ||w_t - w_0|| / ||w_0|| over the synapses whose gate is now < 0 and >= 0:
  whether the weights updated against their gradient run away from Task A's;

and over every layer and LSTM cell ``c_absmax`` / ``c_absmean``, the largest and the mean
|c| of the LSTM cell state after the step. Values stay on the device until :meth:`to_dict`
(no host sync per step).

Asked for with the method option ``"trace": true`` of "ours" (:mod:`lrmt_fast.baselines`):
each run then carries ``gate_trace``, results.json a per-method mean over seeds
(:func:`mean_trace`), and the results folder ``gate_trace.png`` (:func:`plot_gate_traces`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch

from .figures import KIND_GROUPS, _plt, _save
from .meta_learner import pack_rows

Tensor = torch.Tensor
GROUP_METRICS = ("descent_ratio", "frac_negative", "mean", "gate_change", "drift_neg", "drift_pos")
DRIFT_METRICS = ("drift_neg", "drift_pos")
STATE_METRICS = ("c_absmax", "c_absmean")
GROUP_ORDER = ("all", "conv / linear", "GroupNorm gamma / beta")


class GateTrace:
    """Collects the metrics above after each observed update (:meth:`record`)."""

    def __init__(self, w0: Optional[Dict[str, Tensor]] = None):
        """``w0``: the student's weights before the first update (for the drift metrics)."""
        self._groups: Optional[List[str]] = None
        self._rows: List[Tensor] = []          # per step: [n_groups * 6 + 2] on the device
        self._prev: Dict[str, Tensor] = {}
        self._w0 = None if w0 is None else {k: v.detach().clone() for k, v in w0.items()}
        self._w0_rows: Dict[str, Tensor] = {}

    def record(self, ml, deltas: Dict[str, Tensor], grads: Dict[str, Tensor], state,
               params: Optional[Dict[str, Tensor]] = None) -> None:
        """One update step of meta-learner ``ml``: ``deltas`` {layer key: [Cout, P]}, the
        gradients it gated, the LSTM state and the adapted weights after the step (the signature
        of :func:`lrmt_fast.figures.observe_meta_updates`' callback)."""

        drift = self._w0 is not None and params is not None
        acc: Dict[str, List[Tensor]] = {}
        for lay in ml.layers:
            d = deltas[lay.key].detach().to(torch.float64, copy=True)   # kept as the next step's prev
            g2 = pack_rows(grads, lay).detach().to(torch.float64).pow(2)
            prev = self._prev.get(lay.key)
            change = (d - prev).abs().sum() if prev is not None else d.new_zeros(())
            self._prev[lay.key] = d
            vals = [d.new_tensor(float(d.numel())), (d < 0).sum().to(d.dtype), d.sum(), (d * g2).sum(), g2.sum(),
                    change]
            if drift:
                if lay.key not in self._w0_rows:
                    self._w0_rows[lay.key] = pack_rows(self._w0, lay).to(torch.float64)
                w0 = self._w0_rows[lay.key]
                dw2 = (pack_rows(params, lay).detach().to(torch.float64) - w0).pow(2)
                neg = d < 0
                vals += [(dw2 * neg).sum(), (w0.pow(2) * neg).sum(), (dw2 * ~neg).sum(), (w0.pow(2) * ~neg).sum()]
            else:
                vals += [d.new_zeros(())] * 4
            for name in ("all", KIND_GROUPS.get(lay.kind, "other")):
                acc.setdefault(name, []).append(torch.stack(vals))
        if self._groups is None:
            self._groups = [g for g in GROUP_ORDER if g in acc] + sorted(g for g in acc if g not in GROUP_ORDER)
        row = []
        for name in self._groups:
            n, neg, s, dg2, g2, change, dwn, wn, dwp, wp = torch.stack(acc[name]).sum(0)
            row += [dg2 / g2.clamp_min(1e-300), neg / n, s / n, change / n,
                    (dwn / wn.clamp_min(1e-300)).sqrt(), (dwp / wp.clamp_min(1e-300)).sqrt()]
        cs = [c.detach().abs() for _, c in state.values()]
        row += [torch.stack([c.max() for c in cs]).max().to(torch.float64),
                sum(c.sum().to(torch.float64) for c in cs) / sum(c.numel() for c in cs)]
        self._rows.append(torch.stack(row))

    def __len__(self) -> int:
        return len(self._rows)

    def to_dict(self) -> Dict:
        """{"steps": [1..n], "groups": {group: {metric: [per step]}}, metric: [per step] for the
        state metrics}; plain floats."""
        if not self._rows:
            return {"steps": [], "groups": {}, **{m: [] for m in STATE_METRICS}}
        cols = torch.stack(self._rows).cpu().T.tolist()
        out: Dict = {"steps": list(range(1, len(self._rows) + 1)), "groups": {}}
        k = len(GROUP_METRICS)
        metrics = [m for m in GROUP_METRICS if self._w0 is not None or m not in DRIFT_METRICS]
        for i, name in enumerate(self._groups):
            out["groups"][name] = {m: cols[k * i + j] for j, m in enumerate(GROUP_METRICS) if m in metrics}
        k = k * len(self._groups)
        for j, m in enumerate(STATE_METRICS):
            out[m] = cols[k + j]
        return out


def mean_trace(traces: Sequence[Dict]) -> Dict:
    """The step-wise mean of several runs' traces (same steps and groups), as :meth:`GateTrace.to_dict`."""
    if not traces:
        raise ValueError("mean_trace: no traces")
    steps = traces[0]["steps"]
    groups = list(traces[0]["groups"])
    metrics = list(traces[0]["groups"][groups[0]]) if groups else []
    for t in traces:
        if t["steps"] != steps or list(t["groups"]) != groups or any(list(g) != metrics for g in t["groups"].values()):
            raise ValueError("mean_trace: the runs' traces differ in steps, layer groups or metrics")

    def mean(cols):
        return [round(sum(c) / len(c), 6) for c in zip(*cols)]

    out: Dict = {"steps": list(steps), "runs": len(traces),
                 "groups": {g: {m: mean([t["groups"][g][m] for t in traces]) for m in metrics} for g in groups}}
    for m in STATE_METRICS:
        out[m] = mean([t[m] for t in traces])
    return out


def plot_gate_traces(traces: Dict[str, Dict], path: str, title: str = "The meta-learner's gate, step by step",
                     horizon: Optional[int] = None) -> str:
    """One colour per method (its :func:`mean_trace`), against the meta-test step: descent ratio,
    share of negative delta, gate change and (when traced) weight drift on the synapses with
    negative (solid) and positive (dashed) gate, all adapted layers; the largest and the mean |c|;
    a dotted line at ``horizon`` (e.g. the meta-training episode length). Returns ``path``."""
    if not traces:
        raise ValueError("plot_gate_traces: no traces")
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(12.0, 6.4), sharex=True)
    panels = [(axes[0][0], ["descent_ratio"], "descent ratio sum(delta g^2) / sum(g^2)"),
              (axes[0][1], ["frac_negative"], "share of delta < 0"),
              (axes[0][2], ["drift_neg", "drift_pos"], "||w_t - w_0|| / ||w_0||, delta < 0 (solid), >= 0 (dashed)"),
              (axes[1][0], ["gate_change"], "mean |delta_t - delta_t-1|"),
              (axes[1][1], ["c_absmax"], "largest |c| (LSTM cell state)"),
              (axes[1][2], ["c_absmean"], "mean |c| (LSTM cell state)")]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, tr) in enumerate(traces.items()):
        col = colours[i % len(colours)]
        for ax, metrics, _ in panels:
            for metric, ls in zip(metrics, ("-", "--")):
                ys = tr.get(metric) if metric in STATE_METRICS else tr["groups"]["all"].get(metric)
                if ys is not None:
                    ax.plot(tr["steps"], ys, lw=1.0, ls=ls, color=col, label=name if ls == "-" else None)
    for ax, _, label in panels:
        ax.set_ylabel(label, fontsize=7)
        if horizon:
            ax.axvline(horizon, color="0.4", ls=":", lw=0.8)
    axes[0][0].axhline(1.0, color="0.6", ls="--", lw=0.7)
    axes[0][0].axhline(0.0, color="k", lw=0.6)
    for ax in axes[1]:
        ax.set_xlabel("meta-test step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title + (f" (dotted: step {horizon})" if horizon else ""), fontsize=10)
    fig.tight_layout()
    _save(fig, os.fspath(path))
    plt.close(fig)
    return path
