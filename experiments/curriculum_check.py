"""Is the curriculum of Exp 1 MNIST reachable? The meta-training loss of simple students.

Rolls out meta-training episodes exactly as Algorithm 1 does (the teacher's multi-task SGD on
x_A u x_B, a fresh head_b per episode, the same batches for everyone), without updating any
meta-parameters, and records at every step the meta-training loss
``loss_coef * Huber(h_student, h_teacher)`` of three students:

- ``freeze``: the trunk stays at the Task A checkpoint (no student can forget less);
- ``sgd``: plain SGD on Task B (= a freshly initialised meta-learner);
- ``meta``: a trained meta-learner (``--meta CKPT``, optional).

It prints, for each student, the mean loss at a few steps and the first step at which the loss
exceeds the profile's initial and final curriculum thresholds (where Algorithm 1 would end the
episode), and writes the per-step means to ``--out`` as JSON. docs/method.md ("The curriculum
threshold on Exp 1 MNIST") reports what it shows.

    python -m experiments.curriculum_check --data-root data --profile quick \
        [--meta runs/exp1_mnist/quick/cache/meta-*/meta_ckpt.pt] [--episodes 8] [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch


def rollout(model, meta_students: Dict, stream, episode: int, steps: int, mcfg, seed: int) -> Dict[str, List[float]]:
    """One episode: {student: [loss at step 1..steps]} against the same teacher and batches."""
    from lrmt_fast.steps import meta_loss, student_meta_update, teacher_sgd_step

    gen = torch.Generator().manual_seed(seed * 1_000_003 + episode)
    ep = stream.new_episode(episode, gen)
    w0 = {k: v.clone() for k, v in ep.w0.items()}
    teacher = dict(w0)
    students = {name: (dict(w0), m.init_state()) for name, m in meta_students.items()}
    losses: Dict[str, List[float]] = {"freeze": []}
    losses.update({name: [] for name in meta_students})
    for _ in range(steps):
        xa, ya = ep.next_a()
        xb, yb = ep.next_b()
        teacher, _ = teacher_sgd_step(model, teacher, xa, ya, xb, yb, mcfg.lr)
        x = torch.cat([xa, xb])
        with torch.no_grad():
            losses["freeze"].append(float(meta_loss(model, teacher, w0, x, mcfg.loss_coef, mcfg.huber_delta)))
        for name, m in meta_students.items():
            params, state = students[name]
            params, state, _, _ = student_meta_update(model, m, params, state, xb, yb, mcfg.lr)
            params = {k: v.detach() for k, v in params.items()}
            state = m.detach_state(state)
            students[name] = (params, state)
            with torch.no_grad():
                losses[name].append(float(meta_loss(model, teacher, params, x, mcfg.loss_coef, mcfg.huber_delta)))
    return losses


def first_over(curve: List[float], threshold: float):
    """1-based step at which Algorithm 1 would end the episode, or None if it never does."""
    for i, v in enumerate(curve):
        if not v <= threshold:
            return i + 1
    return None


def summarize(per_ep: List[Dict[str, List[float]]], thresholds: Dict[str, float]):
    """(mean loss per step of each student over the episodes, {student: {threshold name: the step
    at which each episode would end}}) of :func:`rollout`'s results."""
    names = list(per_ep[0])
    steps = len(per_ep[0][names[0]])
    mean = {n: [sum(ep[n][t] for ep in per_ep) / len(per_ep) for t in range(steps)] for n in names}
    ends = {n: {k: [first_over(ep[n], v) for ep in per_ep] for k, v in thresholds.items()} for n in names}
    return mean, ends


def main(argv=None) -> int:
    from experiments import common
    from experiments.exp1_mnist import CONFIG, DEFAULT_OUT, load_tasks
    from lrmt_fast.metatrain import MetaTrainConfig, build_meta_learner, load_meta
    from lrmt_fast.pretrain import PretrainConfig, load_or_pretrain
    from lrmt_fast.student import param_dict

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--profile", default="quick")
    p.add_argument("--cache", default=None, help="Task A checkpoint cache (default: runs/exp1_mnist/<profile>/cache)")
    p.add_argument("--meta", default=None, help="a meta-training checkpoint to roll out as a third student")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON output (default: <cache>/../curriculum_check.json)")
    args = p.parse_args(argv)

    cfg = common.resolve_profile(CONFIG, args.profile)
    tasks = load_tasks(cfg, args.data_root)
    cache = args.cache or os.path.join(DEFAULT_OUT, args.profile, "cache")
    pcfg = common.dataclass_from(PretrainConfig, cfg.get("pretrain"), "pretrain")
    model, _ = load_or_pretrain(cache, tasks.a, tasks.b.num_classes, pcfg, "cpu", True, print)
    w0 = {k: v.detach().clone() for k, v in param_dict(model).items()}
    mcfg = MetaTrainConfig.from_dict(cfg.get("metatrain") or {})
    xb1, yb1 = tasks.b1
    stream = common.FreshHeadStream(w0, tasks.a.train_x, tasks.a.train_y, xb1, yb1, mcfg.batch_a, mcfg.batch_b)
    students = {"sgd": build_meta_learner(model, mcfg.hidden, mcfg.hidden_gn)}
    if args.meta:
        students["meta"] = load_meta(args.meta)
    for m in students.values():   # rolled out only: no graph to theta
        m.requires_grad_(False)

    per_ep = [rollout(model, students, stream, e, args.steps, mcfg, args.seed) for e in range(args.episodes)]
    names = list(per_ep[0])
    thr = {"start": mcfg.thresh_start, "max": mcfg.thresh_max}
    mean, ends = summarize(per_ep, thr)
    shown = [t for t in (1, 2, 3, 4, 5, 8, 10, 20, 30, 40, 50, 60, 100, 200, 500) if t <= args.steps]
    print(f"loss_coef * Huber(student, teacher), mean of {args.episodes} episodes, lr {mcfg.lr}; "
          f"curriculum thresholds {thr['start']:g} -> {thr['max']:g}")
    print("step      " + " ".join(f"{t:>6d}" for t in shown))
    for n in names:
        print(f"{n:9s} " + " ".join(f"{mean[n][t - 1]:6.1f}" for t in shown))
    for n in names:
        print(f"{n:9s} episode ends at step (threshold {thr['start']:g}): {ends[n]['start']}; "
              f"(threshold {thr['max']:g}): {ends[n]['max']}")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(cache)), "curriculum_check.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"profile": args.profile, "lr": mcfg.lr, "loss_coef": mcfg.loss_coef, "thresholds": thr,
                   "episodes": args.episodes, "meta": args.meta, "mean_loss_per_step": mean,
                   "episode_end_step": ends}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
