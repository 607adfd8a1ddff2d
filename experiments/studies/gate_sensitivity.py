"""Which layers' gates does the meta-loss pin down, and which way does the truncated meta-gradient push?

Against a known-answer teacher (``sgd_scaled`` c: the right gate is c everywhere), for students
whose gate is a written-out constant per layer (w_out = 0, b_out = atanh(gate / scale): the
meta-learner's own parametrisation, with no dependence on its inputs):

1. ``--sensitivity``: the meta-loss ``loss_coef * Huber(h_student, h_teacher)`` over ``--steps``
   steps (mean of ``--episodes`` episodes of the profile's meta-training stream) when one layer's
   gate is off its target and the others are on it, for each layer and offset in ``--offsets``,
   and for plain SGD: how strongly the loss sees each layer's gate;
2. ``--gradient``: at a point (the gates of ``--at``, e.g. ``conv1=0.65,conv2=0.5,fc1=0.5``) the
   T-BPTT meta-gradient of Algorithm 1 with respect to each layer's b_out (summed over synapses)
   over every step of ``--episodes`` episodes of ``--steps`` steps (window ``--bptt``): its mean,
   its spread and t = mean / std * sqrt(n). A positive mean pushes the gate down.

    python -m experiments.studies.gate_sensitivity --data-root data --c 0.5 --sensitivity --gradient
        --at conv1=0.65,conv2=0.5,fc1=0.5 [--steps 200] [--episodes 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Dict, List

import torch

from lrmt_fast.checkpoint import atomic_write_json
from lrmt_fast.meta_training import _episode_gen, build_meta_learner, run_episode
from lrmt_fast.steps import make_teacher, meta_loss, student_meta_update

from .tools import add_task_a_arguments, prepare


def constant_gate(meta, gates: Dict[str, float]) -> None:
    """Make ``meta``'s gate the constant ``gates[module]`` on every synapse of each layer."""
    with torch.no_grad():
        for lay in meta.layers:
            lrn = meta.learner(lay)
            lrn.w_out.zero_()
            lrn.b_out.fill_(math.atanh(gates[lay.module] / float(lrn.scale)))


def loss_curve(model, stream, mcfg, gates: Dict[str, float], steps: int, episodes: int) -> List[float]:
    """Mean meta-loss per step of a student with constant gates against the config's teacher."""
    meta = build_meta_learner(model, mcfg.hidden, mcfg.hidden_gn).requires_grad_(False)
    constant_gate(meta, gates)
    teacher = make_teacher(mcfg.teacher, model, meta)
    out = [0.0] * steps
    for e in range(episodes):
        ep = stream.new_episode(e, _episode_gen(mcfg, 0, e))
        tw, sw, st = dict(ep.w0), dict(ep.w0), meta.init_state()
        for t in range(steps):
            xa, ya = ep.next_a()
            xb, yb = ep.next_b()
            tw, _ = teacher.step(tw, xa, ya, xb, yb, mcfg.lr)
            sw, st, _, _ = student_meta_update(model, meta, sw, st, xb, yb, mcfg.lr)
            sw, st = {k: v.detach() for k, v in sw.items()}, meta.detach_state(st)
            with torch.no_grad():
                out[t] += float(meta_loss(model, tw, sw, torch.cat([xa, xb]), mcfg.loss_coef,
                                          mcfg.huber_delta)) / episodes
    return out


class _Recorder:
    """An optimiser that records each step's b_out gradients instead of stepping."""

    def __init__(self, meta):
        self.meta, self.rows = meta, {lay.key: [] for lay in meta.layers}

    def zero_grad(self, set_to_none=True):
        self.meta.zero_grad(set_to_none=True)

    def step(self):
        for lay in self.meta.layers:
            self.rows[lay.key].append(float(self.meta.learner(lay).b_out.grad.sum()))


def gradient_at(model, stream, mcfg, gates: Dict[str, float], steps: int, episodes: int, bptt: int) -> Dict:
    """The T-BPTT meta-gradient with respect to each layer's b_out at constant gates."""
    meta = build_meta_learner(model, mcfg.hidden, mcfg.hidden_gn)
    constant_gate(meta, gates)
    rec = _Recorder(meta)
    cfg = dataclasses.replace(mcfg, max_steps=steps)
    for e in range(episodes):
        run_episode(model, meta, rec, stream.new_episode(e, _episode_gen(cfg, 0, e)), cfg, float("inf"), bptt)
    out = {}
    for k, g in rec.rows.items():
        n = len(g)
        m = sum(g) / n
        sd = math.sqrt(sum((x - m) ** 2 for x in g) / max(n - 1, 1))
        out[k] = {"mean": m, "std": sd, "n": n, "t": m / sd * math.sqrt(n) if sd > 0 else float("inf"),
                  "pushes": "down" if m > 0 else "up"}
    return out


def _gates(text: str) -> Dict[str, float]:
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[k.strip()] = float(v)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.studies.gate_sensitivity",
                                description=__doc__.split("\n")[0])
    add_task_a_arguments(p, "exp1-mnist", "quick")
    p.add_argument("--c", type=float, default=0.5, help="the sgd_scaled teacher's c (default %(default)s)")
    p.add_argument("--sensitivity", action="store_true")
    p.add_argument("--offsets", default="0.1,0.2,0.4", help="gate offsets for --sensitivity")
    p.add_argument("--gradient", action="store_true")
    p.add_argument("--at", default=None, help="gates of --gradient, e.g. conv1=0.65,conv2=0.5,fc1=0.5")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--bptt", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, spec, prep = prepare(args)
    mcfg = dataclasses.replace(spec.metatrain, teacher={"kind": "sgd_scaled", "c": args.c})
    modules = sorted({lay.module for lay in build_meta_learner(prep.model, 4, 4).layers})
    res = {"c": args.c, "steps": args.steps, "episodes": args.episodes}
    if args.sensitivity:
        shown = [t for t in (1, 5, 10, 50, 100, 200, 500) if t <= args.steps]
        rows = {}
        on = {m: args.c for m in modules}
        rows["all on target"] = loss_curve(prep.model, prep.stream, mcfg, on, args.steps, args.episodes)
        for m in modules:
            for off in (float(x) for x in args.offsets.split(",")):
                rows[f"{m} {args.c + off:g}"] = loss_curve(prep.model, prep.stream, mcfg, {**on, m: args.c + off},
                                                           args.steps, args.episodes)
        rows["sgd (gate 1)"] = loss_curve(prep.model, prep.stream, mcfg, {m: 1.0 - 1e-6 for m in modules},
                                          args.steps, args.episodes)
        print("meta-loss after step " + " ".join(f"{t:>7d}" for t in shown) + "   mean")
        for name, curve in rows.items():
            print(f"{name:20s} " + " ".join(f"{curve[t - 1]:7.3f}" for t in shown) + f" {sum(curve) / len(curve):7.3f}")
        res["sensitivity"] = rows
    if args.gradient:
        gates = _gates(args.at) if args.at else {m: args.c for m in modules}
        g = gradient_at(prep.model, prep.stream, mcfg, gates, args.steps, args.episodes, args.bptt)
        for k, v in g.items():
            print(f"at {gates}: d meta-loss / d b_out[{k}] (summed over synapses) mean {v['mean']:+.3e}, "
                  f"std {v['std']:.2e}, t = {v['t']:+.1f} over {v['n']} steps: pushes the gate {v['pushes']}")
        res["gradient"] = {"at": gates, "bptt": args.bptt, "layers": g}
    if args.out:
        atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
