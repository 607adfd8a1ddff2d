"""Is plain SGD at the profile's learning rate stable on the CIFAR Task A network?

In the CIFAR experiments the students, the multi-task teacher and the meta-learner's student
take plain SGD steps (no momentum) at the profile's ``metatrain.lr`` / ``metatest.lr`` (the
paper: 0.1). Gradient descent on a loss is stable near a minimum only while
``lr < 2 / lambda_max``, with ``lambda_max`` the top eigenvalue of the loss's Hessian (its
sharpness). This measures, on the Task A checkpoint the profile uses:

- ``lambda_max`` of Task A's cross-entropy on a fixed batch of CIFAR-5A training images (no
  augmentation), by power iteration on Hessian-vector products, and the largest stable
  plain-SGD learning rate ``2 / lambda_max``;
- Task A's cross-entropy on that batch after each of ``--steps`` teacher steps (multi-task SGD
  on 64 Task A + 64 Task B images with a fresh ``head_b``, as in meta-training and the
  "Teacher" baseline), for every learning rate of ``--lrs``: a stable rate keeps it near its
  start, an unstable one makes it jump within a few steps;
- with ``--episodes E`` (> 0), for every learning rate, Algorithm 1's meta-training loss
  ``loss_coef * Huber(h_student, h_teacher)`` over ``--curriculum-steps`` steps of E episodes
  of the profile's meta-training stream (:func:`experiments.curriculum_check.rollout`) for two
  students, ``freeze`` (the Task A trunk; it measures how far the teacher moves) and ``sgd``
  (a freshly initialised meta-learner, i.e. plain SGD on Task B), and the step at which the
  first curriculum threshold would end each episode: the episode lengths meta-training can
  start from. With ``--meta CKPT`` a trained meta-learner (a meta-training checkpoint) is rolled
  out as a third student, ``meta``: run past the episode length it was trained on, it shows
  how its loss behaves beyond that horizon.

    python -m experiments.cifar_stability_check --data-root data [--profile cpu]
        [--taskA-ckpt FILE] [--lrs 0.1,0.03,0.01] [--steps 8] [--episodes 4] [--meta CKPT] [--out FILE]

docs/cifar.md (section 2, "Is the paper's lr 0.1 stable on this Task A network?" and "The
finish phase") reports what it shows.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

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
    from lrmt_fast.student import logits
    return F.cross_entropy(logits(model, params, x, "a"), y)


def teacher_run(model, w0: Dict[str, Tensor], a_batches, b_batches, probe, lr: float, seed: int = 0) -> List[float]:
    """Task A's loss on ``probe = (x, y)`` after each teacher step on the paired batches."""
    from lrmt_fast.steps import teacher_sgd_step
    from lrmt_fast.pretrain import fresh_head_b
    p = fresh_head_b(w0, torch.Generator().manual_seed(1000 + seed))
    out = []
    for (xa, ya), (xb, yb) in zip(a_batches, b_batches):
        p, _ = teacher_sgd_step(model, p, xa, ya, xb, yb, lr)
        with torch.no_grad():
            out.append(float(task_a_loss(model, p, *probe)))
    return out


def check(model, w0: Dict[str, Tensor], task_a, task_b, lrs: Sequence[float], steps: int = 8, batch: int = 128,
          iters: int = 20, seed: int = 0) -> Dict:
    """The measurements above on normalised tasks (``TaskData``); returns a JSON-able dict."""
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
    runs = {str(lr): teacher_run(model, w0, a_batches, b_batches, probe, float(lr), seed) for lr in lrs}
    return {"batch": batch, "power_iterations": iters, "task_a_loss": start, "lambda_max": lam,
            "max_stable_lr": (2.0 / lam) if lam > 0 else None, "teacher_task_a_loss": runs}


def curriculum(model, stream, mcfg, lrs: Sequence[float], episodes: int, steps: int, seed: int = 1,
               meta=None) -> Dict:
    """Per learning rate: the mean meta-training loss per step of the ``freeze`` and ``sgd``
    students (and of ``meta``, a trained meta-learner, if given) over ``episodes`` episodes, and
    the step at which each episode would end under the first curriculum threshold (None: it
    would not end within ``steps``)."""
    import dataclasses
    from experiments.curriculum_check import rollout, summarize
    from lrmt_fast.metatrain import build_meta_learner
    dev = next(model.parameters()).device
    students = {"sgd": build_meta_learner(model, mcfg.hidden, mcfg.hidden_gn).to(dev)}
    if meta is not None:
        students["meta"] = meta.to(dev)
    for m in students.values():    # rolled out only: no graph to theta
        m.requires_grad_(False)
    out = {}
    for lr in lrs:
        c = dataclasses.replace(mcfg, lr=float(lr))
        per_ep = [rollout(model, students, stream, e, steps, c, seed) for e in range(episodes)]
        mean, ends = summarize(per_ep, {"start": mcfg.thresh_start})
        out[str(lr)] = {"mean_loss_per_step": mean,
                        "episode_end_step": {n: e["start"] for n, e in ends.items()}}
    return {"threshold": mcfg.thresh_start, "loss_coef": mcfg.loss_coef, "episodes": episodes, "steps": steps,
            "by_lr": out}


def _shown_steps(n: int) -> List[int]:
    """The steps printed of a long curve: 1, 5, 10, 25, 50 and every 50th up to ``n``, and ``n``."""
    return sorted({t for t in (1, 5, 10, 25, *range(50, n + 1, 50), n) if t <= n})


def main(argv=None) -> int:
    from experiments import common
    from experiments import exp1_cifar as E
    from lrmt_fast.data.cifar import to_task_data

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    E.add_task_a_arguments(p, "cpu")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the profile's, /3, /10)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=20, help="power iterations")
    p.add_argument("--episodes", type=int, default=0, help="meta-training episodes rolled out per lr (0: none)")
    p.add_argument("--curriculum-steps", type=int, default=20, help="steps of each rolled-out episode")
    p.add_argument("--meta", default=None, metavar="CKPT",
                   help="with --episodes: a meta-training checkpoint rolled out as a third student")
    p.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = p.parse_args(argv)
    if args.meta and args.episodes <= 0:
        p.error("--meta rolls out a meta-learner in the curriculum episodes: give --episodes E > 0 too")

    cfg = common.resolve_profile(args.config or E.CONFIG, args.profile)
    device = common.pick_device(args.device)
    task_a = E.load_task_a(args, cfg)
    state, info, pcfg = E.task_a_weights(args, cfg, task_a, None, device, True, print)
    model = E.build_model(pcfg, state, device)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    lr = float((cfg.get("metatest") or {}).get("lr", 0.1))
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [lr, lr / 3, lr / 10]
    task_b = E.load_task_b(args, cfg)
    ta, tb = to_task_data(task_a).to(device), to_task_data(task_b).to(device)
    res = check(model, w0, ta, tb, lrs, steps=args.steps, batch=args.batch, iters=args.iters)
    if args.episodes > 0:
        from lrmt_fast.data.cifar import split_b
        from lrmt_fast.metatrain import MetaTrainConfig
        mcfg = MetaTrainConfig.from_dict(cfg.get("metatrain") or {})
        b1, _ = split_b(task_b, int(cfg.get("data", {}).get("split_seed", 0)))
        stream = E.b1_stream(cfg, task_a, b1, w0, device)
        meta = None
        if args.meta:
            from lrmt_fast.metatrain import load_meta
            meta = load_meta(args.meta, device=device)
        res["curriculum"] = curriculum(model, stream, mcfg, lrs, args.episodes, args.curriculum_steps, meta=meta)
        res["curriculum"]["meta"] = args.meta
    res.update(profile=args.profile, task_a_checkpoint=info["path"], task_a_test_acc=info["test_acc"])
    print(f"Task A checkpoint {info['path']} ({info['test_acc']:.2f}% test)")
    print(f"Task A cross-entropy on {args.batch} training images: {res['task_a_loss']:.4f}; "
          f"lambda_max of its Hessian ~ {res['lambda_max']:.1f}: plain SGD is stable for lr < {res['max_stable_lr']:.4f}")
    for k, v in res["teacher_task_a_loss"].items():
        print(f"teacher at lr {k}: Task A loss after each step {[round(x, 3) for x in v]}")
    cur = res.get("curriculum")
    for k, v in (cur or {}).get("by_lr", {}).items():
        for n, curve in v["mean_loss_per_step"].items():
            shown = (f"{[round(x, 1) for x in curve]}" if len(curve) <= 30 else
                     ", ".join(f"step {t}: {curve[t - 1]:.1f}" for t in _shown_steps(len(curve))))
            print(f"lr {k}, student {n}: meta-training loss per step (mean of {cur['episodes']}) "
                  f"{shown}; episodes end (threshold {cur['threshold']:g}) at step "
                  f"{v['episode_end_step'][n]}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
