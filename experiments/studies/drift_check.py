"""How far do the trunk weights drift from Task A's during a meta-test rollout?

Rolls out, for one meta-test seed of a profile, from exactly the start and over
exactly the D_B2 batches of that seed's meta-test (:func:`lrmt_fast.meta_test.run_start`), a
meta-learner at its initialisation (gate 1 everywhere: exactly the "sgd" method,
tests/test_gate_trace.py) and, with ``--meta``, a trained meta-learner, each with the gate trace
on (lrmt_fast/gate_trace.py). Every ``--every`` steps it prints ||w_t - w_0|| / ||w_0|| over
the adapted layers' synapses whose gate is negative and non-negative at that step, and the mean
Task B training loss of the last ``--every`` steps. docs/cifar.md ("Why the readouts fall past
the horizon") and experiments/results/archive/exp1_cifar_cpu_finish_avg_budget/ report what it
showed (2026-12-05, the summed-loss teacher): SGD drifts 0.17 in 500 steps where the x4
meta-learner drifts 0.76 / 0.50.

    python -m experiments.studies.drift_check --data-root data [--experiment exp1-cifar]
        [--profile cpu_finish_avg] [--seed 0] [--meta CKPT] [--every 100] [--out rows.json]
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import torch

from lrmt_fast.baselines import OursLearner
from lrmt_fast.meta_test import run_start
from lrmt_fast.meta_training import build_meta_learner, load_meta

from .tools import add_task_a_arguments, prepare, run_command


def drift_rows(args, seed: int = 0, meta_path: Optional[str] = None, every: int = 100, log=print) -> List[Dict]:
    """One row per learner and reported step: name, seed, step, drift_neg, drift_pos, and
    train_loss (the mean Task B loss of the steps since the last row)."""
    _, spec, prep = prepare(args, log=log)
    model, w0 = prep.model, prep.w0
    tasks, _ = prep.metatest_tasks([seed])[0]
    mtest = spec.metatest
    metas = {"sgd (meta-learner at init)": build_meta_learner(model, spec.metatrain.hidden, spec.metatrain.hidden_gn)}
    if meta_path:
        metas[f"ours ({meta_path})"] = load_meta(meta_path)
    rows = []
    for name, meta in metas.items():
        start, stream = run_start(w0, *tasks.b2, mtest, seed)
        learner = OursLearner(model, start, meta, mtest.lr, trace=True)
        losses = []
        for t in range(1, mtest.steps + 1):
            losses.append(learner.step(*stream.next()))
            if t % every == 0 or t == mtest.steps:
                tr = learner.trace.to_dict()["groups"]["all"]
                row = {"name": name, "seed": seed, "step": t, "drift_neg": tr["drift_neg"][-1],
                       "drift_pos": tr["drift_pos"][-1], "train_loss": sum(losses) / len(losses)}
                rows.append(row)
                log(f"{name} seed {seed} step {t}: drift (delta < 0) {row['drift_neg']:.4f}, (delta >= 0) "
                    f"{row['drift_pos']:.4f}; Task B training loss, mean of the last {len(losses)} steps "
                    f"{row['train_loss']:.3f}")
                losses = []
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.studies.drift_check",
                                description=__doc__.split("\n\n")[0])
    add_task_a_arguments(p, "exp1-cifar", "cpu_finish_avg")
    p.add_argument("--seed", type=int, default=0, help="meta-test seed whose start and batches to use (default 0)")
    p.add_argument("--meta", default=None, metavar="CKPT", help="a trained meta-learner (meta-training checkpoint)")
    p.add_argument("--every", type=int, default=100, help="report every N steps (default 100)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the rows as JSON to FILE")
    args = p.parse_args(argv)
    if args.every < 1:
        p.error("--every must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_command("drift_check", lambda: drift_rows(args, args.seed, args.meta, args.every,
                                                        log=lambda m: print(m, flush=True)), args.out)


if __name__ == "__main__":
    sys.exit(main())
