"""Is the teacher stable, and can Algorithm 1's curriculum be passed? One tool for every experiment.

Gradient descent on a loss is stable near a minimum only while ``lr < 2 / lambda_max``, with
``lambda_max`` the top eigenvalue of the loss's Hessian. On the Task A checkpoint a profile uses
this measures:

1. ``lambda_max`` of Task A's cross-entropy on a fixed batch of Task A training images (power
   iteration on Hessian-vector products) against ``2 / lr``;
2. for every learning rate of ``--lrs``: the teacher's CE_A after each of ``--steps`` teacher steps
   (the profile's teacher, ``metatrain.teacher``: by default one cross-entropy over the union
   batch), on its own Task A batch (as meta-training records it) and on the fixed probe batch;
3. with ``--episodes E``: Algorithm 1's meta-training loss ``loss_coef * Huber(h_student,
   h_teacher)`` per step over E episodes of the profile's meta-training stream, for the students
   ``freeze`` (the Task A trunk: how far the teacher moves), ``sgd`` (a fresh meta-learner = plain
   SGD) and, with ``--meta CKPT``, a trained meta-learner; beside them the teacher's CE_A per step;
   and the step at which each episode would end under the first and the last curriculum threshold.

    python -m experiments.studies.stability_check --experiment exp1-mnist --profile quick --data-root data
        [--lrs 0.05,0.025] [--steps 8] [--episodes 8] [--curriculum-steps 60] [--meta CKPT]
        [--teacher-loss union|sum] [--out FILE]

docs/findings.md reports what it showed (the teacher before and after the union-batch loss).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from lrmt_fast.checkpoint import atomic_write_json
from lrmt_fast.meta_training import build_meta_learner, load_meta
from lrmt_fast.steps import make_teacher, meta_loss, student_meta_update
from lrmt_fast.student import fresh_head_b, logits

from .tools import add_task_a_arguments, prepare

Tensor = torch.Tensor


def top_hessian_eigenvalue(loss_fn: Callable[[List[Tensor]], Tensor], params: Sequence[Tensor], iters: int = 20,
                           seed: int = 0) -> float:
    """The eigenvalue of largest magnitude of the Hessian of ``loss_fn(params)`` with respect to
    ``params`` (power iteration on Hessian-vector products from a seeded random start; the
    Rayleigh quotient of the last iterate)."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    grads = torch.autograd.grad(loss_fn(ps), ps, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in ps]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    lam = 0.0
    for _ in range(iters):
        hv = torch.autograd.grad(grads, ps, v, retain_graph=True)
        lam = float(sum((a * b).sum() for a, b in zip(hv, v)))
        norm = torch.sqrt(sum((x * x).sum() for x in hv))
        if float(norm) == 0.0:
            return 0.0
        v = [x / norm for x in hv]
    return lam


def task_a_loss(model, params: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits(model, params, x, "a"), y)


def teacher_run(model, teacher, w0: Dict[str, Tensor], a_batches, b_batches, probe, lr: float, seed: int = 0):
    """(the teacher's CE_A on its own Task A batch, Task A's loss on ``probe``) after each step."""
    p = fresh_head_b(w0, torch.Generator().manual_seed(1000 + seed))
    own, probed = [], []
    for (xa, ya), (xb, yb) in zip(a_batches, b_batches):
        p, ce = teacher.step(p, xa, ya, xb, yb, lr)
        own.append(ce)
        with torch.no_grad():
            probed.append(float(task_a_loss(model, p, *probe)))
    return own, probed


def check(model, teacher, w0: Dict[str, Tensor], task_a, task_b, lrs: Sequence[float], steps: int = 8,
          batch: int = 128, iters: int = 20, seed: int = 0) -> Dict:
    """Items 1 and 2 of the module docstring on normalised tasks (``TaskData``); a JSON-able dict."""
    g = torch.Generator().manual_seed(seed)
    dev = next(iter(w0.values())).device
    idx = torch.randperm(task_a.train_x.shape[0], generator=g)[:batch].to(dev)
    probe = (task_a.train_x[idx], task_a.train_y[idx])
    keys = [k for k in w0 if not k.startswith("head_b")]

    def loss_of(ps):
        p = dict(w0)
        p.update(zip(keys, ps))
        return task_a_loss(model, p, *probe)

    lam = top_hessian_eigenvalue(loss_of, [w0[k] for k in keys], iters=iters, seed=seed)
    a_batches, b_batches = [], []
    for _ in range(steps):
        ia = torch.randint(0, task_a.train_x.shape[0], (64,), generator=g).to(dev)
        ib = torch.randint(0, task_b.train_x.shape[0], (64,), generator=g).to(dev)
        a_batches.append((task_a.train_x[ia], task_a.train_y[ia]))
        b_batches.append((task_b.train_x[ib], task_b.train_y[ib]))
    with torch.no_grad():
        start = float(task_a_loss(model, w0, *probe))
    runs = {str(lr): teacher_run(model, teacher, w0, a_batches, b_batches, probe, float(lr), seed) for lr in lrs}
    return {"batch": batch, "power_iterations": iters, "task_a_loss": start, "lambda_max": lam,
            "max_stable_lr": (2.0 / lam) if lam > 0 else None,
            "teacher_ce_a_own_batch": {k: v[0] for k, v in runs.items()},
            "teacher_task_a_loss": {k: v[1] for k, v in runs.items()}}


def rollout(model, meta_students: Dict, teacher, stream, episode: int, steps: int, mcfg, seed: int) -> Dict:
    """One episode without meta-updates: {student: [meta-loss at step 1..steps]} against the same
    teacher and batches, and ``teacher_ce_a`` (the teacher's CE_A per step; None for teachers
    without Task A batches)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + episode)
    ep = stream.new_episode(episode, gen)
    w0 = {k: v.clone() for k, v in ep.w0.items()}
    tw = dict(w0)
    students = {name: (dict(w0), m.init_state(device=next(iter(w0.values())).device))
                for name, m in meta_students.items()}
    out: Dict[str, List] = {"freeze": [], **{name: [] for name in meta_students}, "teacher_ce_a": []}
    for _ in range(steps):
        xa, ya = ep.next_a()
        xb, yb = ep.next_b()
        tw, ce = teacher.step(tw, xa, ya, xb, yb, mcfg.lr)
        out["teacher_ce_a"].append(ce)
        x = torch.cat([xa, xb])
        with torch.no_grad():
            out["freeze"].append(float(meta_loss(model, tw, w0, x, mcfg.loss_coef, mcfg.huber_delta)))
        for name, m in meta_students.items():
            params, state = students[name]
            params, state, _, _ = student_meta_update(model, m, params, state, xb, yb, mcfg.lr)
            students[name] = ({k: v.detach() for k, v in params.items()}, m.detach_state(state))
            with torch.no_grad():
                out[name].append(float(meta_loss(model, tw, students[name][0], x, mcfg.loss_coef, mcfg.huber_delta)))
    return out


def first_over(curve: List[float], threshold: float) -> Optional[int]:
    """1-based step at which Algorithm 1 would end the episode (NaN counts as over), or None."""
    for i, v in enumerate(curve):
        if not v <= threshold:
            return i + 1
    return None


def summarize(per_ep: List[Dict[str, List]], thresholds: Dict[str, float]):
    """(mean per step of each curve over the episodes, {student: {threshold name: end steps}})."""
    names = [n for n in per_ep[0] if per_ep[0][n] and per_ep[0][n][0] is not None]
    steps = len(per_ep[0]["freeze"])
    mean = {n: [sum(ep[n][t] for ep in per_ep) / len(per_ep) for t in range(steps)] for n in names}
    ends = {n: {k: [first_over(ep[n], v) for ep in per_ep] for k, v in thresholds.items()}
            for n in names if n != "teacher_ce_a"}
    return mean, ends


def curriculum(model, teacher, stream, mcfg, lrs: Sequence[float], episodes: int, steps: int, seed: int = 1,
               meta=None) -> Dict:
    """Item 3 of the module docstring, per learning rate."""
    dev = next(model.parameters()).device
    students = {"sgd": build_meta_learner(model, mcfg.hidden, mcfg.hidden_gn).to(dev)}
    if meta is not None:
        students["meta"] = meta.to(dev)
    for m in students.values():    # rolled out only: no graph to theta
        m.requires_grad_(False)
    thr = {"start": mcfg.thresh_start, "max": mcfg.thresh_max}
    out = {}
    for lr in lrs:
        c = dataclasses.replace(mcfg, lr=float(lr))
        per_ep = [rollout(model, students, teacher, stream, e, steps, c, seed) for e in range(episodes)]
        mean, ends = summarize(per_ep, thr)
        out[str(lr)] = {"mean_per_step": mean, "episode_end_step": ends}
    return {"thresholds": thr, "loss_coef": mcfg.loss_coef, "episodes": episodes, "steps": steps, "by_lr": out}


def _shown(n: int) -> List[int]:
    return sorted({t for t in (1, 2, 3, 4, 5, 8, 10, 20, 30, 40, 60, *range(100, n + 1, 100), n) if t <= n})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.studies.stability_check",
                                description=__doc__.split("\n")[0])
    add_task_a_arguments(p, "exp1-mnist", "quick")
    p.add_argument("--teacher-loss", choices=["union", "sum"], default=None,
                   help="the multi-task teacher's loss (default: the profile's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the profile's and half)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=20, help="power iterations")
    p.add_argument("--episodes", type=int, default=0, help="meta-training episodes rolled out per lr (0: none)")
    p.add_argument("--curriculum-steps", type=int, default=60, help="steps of each rolled-out episode")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--meta", default=None, metavar="CKPT", help="a meta-training checkpoint rolled out as a student")
    p.add_argument("--out", default=None, help="JSON output")
    args = p.parse_args(argv)
    if args.meta and args.episodes <= 0:
        p.error("--meta rolls out a meta-learner in the curriculum episodes: give --episodes E > 0 too")
    exp, spec, prep = prepare(args, device=args.device)
    mcfg = spec.metatrain
    if args.teacher_loss:
        mcfg = dataclasses.replace(mcfg, teacher=dataclasses.replace(mcfg.teacher, loss=args.teacher_loss))
    model, w0 = prep.model, prep.w0
    tasks, _ = prep.metatest_tasks([0])[0]
    meta = load_meta(args.meta, device=args.device) if args.meta else None
    teacher = make_teacher(mcfg.teacher, model, meta or build_meta_learner(model, mcfg.hidden, mcfg.hidden_gn))
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [mcfg.lr, mcfg.lr / 2]
    ta, tb = tasks.a.to(args.device), tasks.b.to(args.device)
    res = check(model, teacher, w0, ta, tb, lrs, steps=args.steps, batch=args.batch, iters=args.iters)
    res.update(experiment=exp.name, profile=args.profile, teacher=dataclasses.asdict(mcfg.teacher),
               task_a_test_acc=prep.task_a.get("test_acc"), lrs=lrs)
    print(f"{exp.name} ({args.profile}): Task A checkpoint {prep.task_a.get('path', '')} "
          f"({prep.task_a.get('test_acc', float('nan')):.2f}% test); teacher {dataclasses.asdict(mcfg.teacher)}")
    print(f"Task A cross-entropy on {args.batch} training images: {res['task_a_loss']:.4f}; lambda_max of its "
          f"Hessian ~ {res['lambda_max']:.1f}: plain SGD on Task A is stable for lr < {res['max_stable_lr']:.4f}")
    for k in res["teacher_task_a_loss"]:
        own = res["teacher_ce_a_own_batch"][k]
        print(f"teacher at lr {k}: CE_A on its own batch {[None if v is None else round(v, 3) for v in own]}; "
              f"on the probe {[round(v, 3) for v in res['teacher_task_a_loss'][k]]}")
    if args.episodes > 0:
        res["curriculum"] = curriculum(model, teacher, prep.stream, mcfg, lrs, args.episodes, args.curriculum_steps,
                                       seed=args.seed, meta=meta)
        res["curriculum"]["meta"] = args.meta
        cur = res["curriculum"]
        shown = _shown(args.curriculum_steps)
        for k, v in cur["by_lr"].items():
            print(f"lr {k}: mean of {args.episodes} episodes, loss_coef * Huber(student, teacher) after step")
            print("step          " + " ".join(f"{t:>6d}" for t in shown))
            for n, curve in v["mean_per_step"].items():
                print(f"{n:13s} " + " ".join(f"{curve[t - 1]:6.2f}" if n == "teacher_ce_a" else f"{curve[t - 1]:6.1f}"
                                            for t in shown))
            for n, e in v["episode_end_step"].items():
                print(f"{n:13s} episode ends at step (threshold {cur['thresholds']['start']:g}): {e['start']}; "
                      f"(threshold {cur['thresholds']['max']:g}): {e['max']}")
    if args.out:
        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
