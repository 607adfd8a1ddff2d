"""Figures 6 and 7 of the paper, for every meta-training run.

* Figure 6 ("training curve"): the curriculum loss threshold and the number of
  unrolled T-BPTT steps against the meta-training episode, from the meta-training
  history; a second panel shows how many inner steps each episode lasted before the
  curriculum restarted it (max = ``max_steps``) and the mean scaled meta-loss.
* Figure 7 ("meta-learner outputs"): the histogram of the gate ``delta`` (the
  gradient multiplier) over every synapse and every update step of the meta-test
  rollouts of "ours", with the negative part (update against the gradient)
  coloured and its share printed, for all adapted layers and split by layer kind.

The histogram is accumulated on the fly (:class:`DeltaHistogram`, fixed bins over
``[-|s|max, |s|max]``, the range of ``delta = s * tanh(.)``) while the rollouts
run inside :func:`record_deltas`, which records every meta-test (graph-free)
update of any meta-learner, so the shared rollout code is recorded unchanged.
"""
from __future__ import annotations

import contextlib
import json
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .checkpoint import atomic_save_figure, atomic_write_json
from .meta_learner import MetaLearner

Tensor = torch.Tensor

KIND_GROUPS = {"conv": "conv / linear", "linear": "conv / linear", "gn_weight": "GroupNorm gamma / beta",
               "gn_bias": "GroupNorm gamma / beta"}


# --------------------------------------------------------------------------- delta histogram
_STATS = ("n", "neg", "sum", "sumsq")


class DeltaHistogram:
    """Counts of delta values in fixed bins, overall and per layer-kind group, plus moments.

    Accumulates on the deltas' own device (no host sync per step); ``to_dict`` reads it out."""

    def __init__(self, lo: float = -1.5, hi: float = 1.5, bins: int = 240):
        if not hi > lo:
            raise ValueError("DeltaHistogram needs hi > lo")
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self._acc: Dict[str, Dict[str, Tensor]] = {}     # live accumulators (tensors)
        self._done: Dict[str, Dict] = {}                 # loaded / merged plain values

    @classmethod
    def for_meta(cls, meta, bins: int = 240) -> "DeltaHistogram":
        """Bins over [-m, m], m = max |scale| over the learners (+2%): delta = s*tanh(.) can't leave it."""
        m = max(float(p.detach().abs().max()) for n, p in meta.named_parameters() if n.endswith("scale"))
        m = max(m, 1e-3) * 1.02
        return cls(-m, m, bins)

    def add(self, delta: Tensor, group: str) -> None:
        d = delta.detach().reshape(-1).to(torch.float64)
        if d.numel() == 0:
            return
        counts = torch.histc(d, bins=self.bins, min=self.lo, max=self.hi)
        vals = {"counts": counts, "n": torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device),
                "neg": (d < 0).sum().to(torch.float64), "sum": d.sum(), "sumsq": d.pow(2).sum(),
                "min": d.min(), "max": d.max()}
        for name in ("all", group):
            acc = self._acc.get(name)
            if acc is None:
                self._acc[name] = {k: v.clone() for k, v in vals.items()}
                continue
            for k in ("counts",) + _STATS:
                acc[k] += vals[k]
            acc["min"] = torch.minimum(acc["min"], vals["min"])
            acc["max"] = torch.maximum(acc["max"], vals["max"])

    def add_step(self, deltas: Dict[str, Tensor], kinds: Dict[str, str]) -> None:
        for key, d in deltas.items():
            self.add(d, KIND_GROUPS.get(kinds.get(key, ""), "other"))

    @property
    def groups(self) -> Dict[str, Dict]:
        """{group: {counts: [bins], n, neg, sum, sumsq, min, max}} as plain numbers."""
        out = {k: dict(v) for k, v in self._done.items()}
        for name, acc in self._acc.items():
            g = {"counts": [int(round(c)) for c in acc["counts"].cpu().tolist()],
                 **{k: float(acc[k]) for k in _STATS}, "min": float(acc["min"]), "max": float(acc["max"])}
            g["n"], g["neg"] = int(g["n"]), int(g["neg"])
            out[name] = _merge_group(out[name], g) if name in out else g
        return out

    def summary(self) -> Dict[str, Dict]:
        out = {}
        for name, g in self.groups.items():
            n = max(1, g["n"])
            mean = g["sum"] / n
            out[name] = {"n": g["n"], "frac_negative": g["neg"] / n, "mean": mean,
                         "std": math.sqrt(max(0.0, g["sumsq"] / n - mean * mean)), "min": g["min"], "max": g["max"]}
        return out

    def to_dict(self) -> Dict:
        return {"lo": self.lo, "hi": self.hi, "bins": self.bins, "groups": self.groups, "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: Dict) -> "DeltaHistogram":
        h = cls(d["lo"], d["hi"], d["bins"])
        h._done = {k: dict(v) for k, v in d["groups"].items()}
        return h

    def merge(self, other: "DeltaHistogram") -> None:
        if (other.lo, other.hi, other.bins) != (self.lo, self.hi, self.bins):
            raise ValueError("cannot merge histograms with different bins")
        mine = self.groups
        for name, g in other.groups.items():
            mine[name] = _merge_group(mine[name], g) if name in mine else dict(g)
        self._acc, self._done = {}, mine

    def save(self, path: str) -> None:
        atomic_write_json(path, self.to_dict(), what="histogram", indent=None)

    @classmethod
    def load(cls, path: str) -> "DeltaHistogram":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _merge_group(a: Dict, b: Dict) -> Dict:
    return {"counts": [x + y for x, y in zip(a["counts"], b["counts"])],
            **{k: a[k] + b[k] for k in _STATS}, "min": min(a["min"], b["min"]), "max": max(a["max"], b["max"])}


@contextlib.contextmanager
def observe_meta_updates(fn: Callable):
    """Within the block, ``fn(meta_learner, deltas, grads, state, params)`` is called after every
    *meta-test* update of any :class:`MetaLearner`: ``step_`` (in place, reference or fused),
    and ``step`` when it builds no graph to theta (theta frozen or grad disabled, as in the
    rollouts of "ours"); ``deltas`` = {layer key: delta [Cout, P]}, ``grads`` the student's
    gradients the update used, ``state`` the LSTM state and ``params`` the adapted weights after it. Meta-training steps (theta
    requiring grad) are not observed. The two methods are wrapped on the class for the duration
    of the block only, so the shared rollout code is observed unchanged."""

    orig_step, orig_step_ = MetaLearner.step, MetaLearner.step_
    depth = {"step_": 0}

    def step(self, params, grads, acts, state, lr, impl=None, snapshot=False):
        out = orig_step(self, params, grads, acts, state, lr, impl=impl, snapshot=snapshot)
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not training and depth["step_"] == 0:
            fn(self, out[2], grads, out[1], out[0])
        return out

    def step_(self, params, grads, acts, state, lr, impl=None):
        depth["step_"] += 1
        try:
            deltas = orig_step_(self, params, grads, acts, state, lr, impl=impl)
        finally:
            depth["step_"] -= 1
        if depth["step_"] == 0:
            fn(self, deltas, grads, state, params)
        return deltas

    MetaLearner.step, MetaLearner.step_ = step, step_
    try:
        yield fn
    finally:
        MetaLearner.step, MetaLearner.step_ = orig_step, orig_step_


@contextlib.contextmanager
def record_deltas(hist: DeltaHistogram):
    """Within the block, every meta-test update of any :class:`MetaLearner` adds its deltas to
    ``hist`` (:func:`observe_meta_updates`)."""
    def add(ml, deltas, grads, state, params):
        hist.add_step(deltas, {l.key: l.kind for l in ml.layers})

    with observe_meta_updates(add):
        yield hist


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib       # only when a figure is drawn: a second of start-up for every command
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _moving_average(v: Sequence[float], k: int) -> List[float]:
    out, acc = [], 0.0
    q: List[float] = []
    for x in v:
        q.append(x)
        acc += x
        if len(q) > k:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def figure6(history: List[Dict], path: str, title: str = "Meta-training curve", max_steps: Optional[int] = None) -> str:
    """Curriculum threshold and unrolled steps vs episode (+ episode length and loss). Returns ``path``."""
    if not history:
        raise ValueError("figure6: empty meta-training history")
    plt = _plt()
    ep = [h["episode"] for h in history]
    thr = [h["threshold"] for h in history]
    bptt = [h["bptt"] for h in history]
    steps = [h["steps"] for h in history]
    loss = [h["mean_loss"] for h in history]
    fig, (ax1, ax3) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    # each episode's value holds until the next episode: extend the step plots by one episode so
    # that the last value (often a new schedule level) is drawn as a segment, not a lone vertex
    ep_x = ep + [ep[-1] + 1]
    ax1.step(ep_x, thr + thr[-1:], where="post", color="tab:red", lw=2.4, label="curriculum threshold")
    ax1.set_ylabel("curriculum loss threshold", color="tab:red")
    ax2 = ax1.twinx()
    ax2.step(ep_x, bptt + bptt[-1:], where="post", color="tab:blue", ls="--", lw=1.4,
             label="unrolled steps (T-BPTT)")
    ax2.set_ylabel("unrolled steps", color="tab:blue")
    lines = ax1.get_lines() + ax2.get_lines()
    ax1.legend(lines, [l.get_label() for l in lines], loc="lower right", fontsize=8)
    ax1.set_title(title)
    k = max(1, len(ep) // 50)
    ax3.plot(ep, steps, ".", ms=2, color="0.6", label="inner steps per episode")
    ax3.plot(ep, _moving_average(steps, k), color="k", lw=1.2, label=f"moving average ({k})")
    if max_steps:
        ax3.axhline(max_steps, color="0.3", ls=":", lw=1, label=f"T = {max_steps}")
    ax3.set_ylabel("inner steps before restart")
    ax3.set_xlabel("meta-training episode")
    ax4 = ax3.twinx()
    fin = [(e, l) for e, l in zip(ep, loss) if l == l and abs(l) != math.inf]
    if fin:
        ax4.plot([e for e, _ in fin], _moving_average([l for _, l in fin], k), color="tab:green", lw=1,
                 label="mean scaled meta-loss")
        ax4.set_ylabel("mean meta-loss", color="tab:green")
    lines = ax3.get_lines() + ax4.get_lines()
    ax3.legend(lines, [l.get_label() for l in lines], loc="upper left", fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def figure7(hist: DeltaHistogram, path: str, title: str = "Meta-learner outputs (meta-test)") -> str:
    """Histogram of delta, negative part coloured, overall and per layer kind. Returns ``path``."""
    if "all" not in hist.groups or hist.groups["all"]["n"] == 0:
        raise ValueError("figure7: no deltas were recorded")
    plt = _plt()
    width = (hist.hi - hist.lo) / hist.bins
    centers = [hist.lo + (i + 0.5) * width for i in range(hist.bins)]
    others = [g for g in hist.groups if g != "all"]
    fig, axes = plt.subplots(1, 1 + len(others), figsize=(4.2 * (1 + len(others)), 3.6), squeeze=False)
    summ = hist.summary()
    for ax, name in zip(axes[0], ["all"] + sorted(others)):
        g = hist.groups[name]
        n = max(1, g["n"])
        dens = [c / n for c in g["counts"]]
        neg = [c < 0 for c in centers]
        ax.bar([c for c, m in zip(centers, neg) if not m], [d for d, m in zip(dens, neg) if not m], width=width,
               color="tab:blue", label="delta >= 0")
        ax.bar([c for c, m in zip(centers, neg) if m], [d for d, m in zip(dens, neg) if m], width=width,
               color="tab:red", label="delta < 0 (against the gradient)")
        ax.axvline(0.0, color="k", lw=0.8)
        ax.axvline(1.0, color="0.4", ls=":", lw=0.8, label="delta = 1 (SGD)")
        ax.set_yscale("log")
        s = summ[name]
        ax.set_title(f"{'all adapted layers' if name == 'all' else name}\n"
                     f"negative {100 * s['frac_negative']:.2f}%, mean {s['mean']:.3f}, std {s['std']:.3f}",
                     fontsize=9)
        ax.set_xlabel("gradient multiplier delta")
        ax.set_ylabel("fraction of synapse updates")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: str) -> None:
    atomic_save_figure(fig, path, dpi=130)
