"""Known-answer meta-training: can Algorithm 1 learn a gate whose right answer is known?

    python -m experiments.studies.known_answer --data-root data --out runs/known_answer
           [--cases scaled0.5,scaled0.2,frozen_conv2] [--budget 4000] [--every 100]
           [--metatrain '{"meta_lr": 1e-4}'] [--rollout-seeds 3] [--readout-seeds 3] [--resume]

Each case meta-trains LeNet on Exp 1 MNIST (the data, Task A network and meta-training settings
of an ``exp1_mnist.json`` profile, ``--profile``) against a known-answer teacher
(:mod:`lrmt_fast.steps`): ``scaled<c>`` = ``sgd_scaled`` with that c (the optimal gate is c on
every synapse), ``frozen_<module>`` = ``sgd_frozen`` freezing that module (the optimal gate is 0
there and 1 on the other adapted layers). It records, every ``--every`` meta-steps, each
layer's mean gate and its spread over synapses, the meta-loss and the episode lengths; then it
rolls the learned meta-learner out for the meta-test's 500 steps on D_B2 (fresh ``head_b`` per
seed, as at meta-test) and records the gate per step; for ``scaled0.5`` it also compares the
readouts at step 500 of ``ours`` with those of ``sgd_x0.5`` (the same update, done exactly).

The criterion (written down before the runs, docs/findings.md): a case passes when, in every
50-step window of the 500-step rollout, the gate of every adapted layer is within ``--tol``
(0.05) of its target, and the frozen layer's mean |gate| is under 0.1. It is judged twice: on
the plain mean gate over the layer's synapses (the issue's measure) and on the effective gate
sum(delta g^2) / sum(g^2), which weighs each synapse by how far its update moves it
(:func:`gate_stats`).

Output (``--out``): ``results.json``, ``known_answer.png`` (gate per layer against meta-steps
with the targets drawn in, and the rollout), ``<case>/meta_ckpt.pt`` and ``<case>/trace.json``
(resumable with ``--resume``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from lrmt_fast.checkpoint import atomic_write_json, load_checkpoint
from lrmt_fast.config import ConfigError
from lrmt_fast.meta_test import MetaTestConfig, run_meta_test, run_start
from lrmt_fast.meta_learner import pack_rows
from lrmt_fast.meta_training import CKPT_NAME, MetaTrainConfig, load_meta
from lrmt_fast.pipeline import metatrain_with_budget
from lrmt_fast.linear_readout import Readout, ReadoutData
from lrmt_fast.results import mean_sem
from lrmt_fast.steps import TeacherConfig, student_meta_update

from .tools import add_task_a_arguments, prepare

ROLLOUT_WINDOW = 50


# --------------------------------------------------------------------------- cases
def parse_case(name: str) -> Dict:
    """``scaled0.5`` -> sgd_scaled c=0.5; ``frozen_conv2`` (or ``frozen_conv1+conv2``) -> sgd_frozen."""
    if name.startswith("scaled"):
        try:
            c = float(name[len("scaled"):])
        except ValueError:
            raise ValueError(f"case {name!r}: expected scaled<c>, e.g. scaled0.5") from None
        return {"kind": "sgd_scaled", "c": c}
    if name.startswith("frozen_") and len(name) > len("frozen_"):
        return {"kind": "sgd_frozen", "layers": name[len("frozen_"):].split("+")}
    raise ValueError(f"unknown case {name!r}: use scaled<c> or frozen_<module>[+<module>...]")


def targets(teacher: Dict, meta) -> Dict[str, float]:
    """{layer key: the optimal gate} for a known-answer teacher."""
    t = TeacherConfig.from_value(teacher)
    return {lay.key: t.optimal_gate(lay.module) for lay in meta.layers}


# --------------------------------------------------------------------------- gate statistics
def gate_stats(delta: torch.Tensor, g: torch.Tensor):
    """(mean gate, its spread over synapses, the effective gate sum(delta g^2) / sum(g^2)) of one
    layer. The effective gate weighs each synapse by how much its update moves the weights: a
    synapse whose gradient is ~0 is updated by ~nothing whatever its gate, so its gate has no
    effect on the student and gets no meta-gradient (docs/findings.md)."""
    g2 = g.detach().double().pow(2)
    d = delta.detach().double()
    den = float(g2.sum())
    eff = float((d * g2).sum()) / den if den > 0 else float("nan")
    return float(d.mean()), (float(d.std()) if d.numel() > 1 else 0.0), eff


class GateTrace:
    """Per meta-step: the meta-loss and, per layer, the gate's mean, its spread (std over the
    layer's synapses) and the effective gate (:func:`gate_stats`), averaged over the episodes
    of the step. Rows are kept per step so that a resumed run can cut them at its checkpoint."""

    def __init__(self, rows: Optional[List] = None):
        self.rows: List = list(rows or [])

    def __call__(self, step: int, loss: float, gates: Sequence[Dict]) -> None:
        layers = {}
        for k in gates[0]:
            st = [gate_stats(d, g) for d, g in (e[k] for e in gates)]
            layers[k] = [round(_mean([x[i] for x in st]), 5) for i in range(3)]
        self.rows.append([len(self.rows) + 1, loss, layers])

    def cut(self, steps: int) -> None:
        del self.rows[steps:]

    def blocks(self, every: int) -> Dict:
        """Means over blocks of ``every`` meta-steps: {"step": [...], "loss": [...],
        "gate": {layer: {"mean": [...], "spread": [...], "effective": [...]}}}."""
        out: Dict = {"step": [], "loss": [], "gate": {}}
        for i in range(0, len(self.rows), every):
            blk = self.rows[i:i + every]
            out["step"].append(blk[-1][0])
            out["loss"].append(_mean([r[1] for r in blk]))
            for k in blk[0][2]:
                g = out["gate"].setdefault(k, {"mean": [], "spread": [], "effective": []})
                for j, name in enumerate(("mean", "spread", "effective")):
                    g[name].append(_mean([r[2][k][j] for r in blk]))
        return out


def _mean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


# --------------------------------------------------------------------------- rollout
def gate_rollout(model, meta, w0, xb2, yb2, steps: int, seeds: Sequence[int], lr: float, batch: int = 64,
                 impl: Optional[str] = None) -> Dict[str, Dict[str, List[float]]]:
    """The learned meta-learner rolled out for ``steps`` meta-test updates per seed (fresh
    head_b, D_B2 batches: :func:`lrmt_fast.meta_test.run_start`): {layer: {"mean", "abs" (mean
    |gate|), "spread", "effective" (:func:`gate_stats`): one value per step}}, each averaged
    over the seeds."""
    meta = meta.requires_grad_(False)
    acc: Dict[str, Dict[str, List[float]]] = {}
    names = ("mean", "abs", "spread", "effective")
    for s in seeds:
        params, stream = run_start(w0, xb2, yb2, MetaTestConfig(steps=steps, batch=batch, lr=lr), s)
        params = {k: v.clone() for k, v in params.items()}
        state = meta.init_state(device=next(iter(params.values())).device)
        for t in range(steps):
            xb, yb = stream.next()
            seen = {}
            student_meta_update(model, meta, params, state, xb, yb, lr, impl=impl, in_place=True,
                                observe=lambda _m, d, g, _s, _p: seen.update(d=d, g=g))
            for lay in meta.layers:
                d = seen["d"][lay.key]
                mean, spread, eff = gate_stats(d, pack_rows(seen["g"], lay))
                a = acc.setdefault(lay.key, {n: [0.0] * steps for n in names})
                for n, v in zip(names, (mean, float(d.abs().mean()), spread, eff)):
                    a[n][t] += v / len(seeds)
    return acc


def judge(rollout: Dict[str, Dict[str, List[float]]], target: Dict[str, float], tol: float = 0.05,
          frozen_abs: float = 0.1, window: int = ROLLOUT_WINDOW) -> Dict:
    """The criterion, for the mean gate and for the effective gate alike: every ``window``-step
    window of the rollout has each layer's gate within ``tol`` of its target, and a layer whose
    target is 0 has mean |gate| under ``frozen_abs``. Returns {"pass": {"mean": bool,
    "effective": bool}, "layers": {layer: {target, mean, effective, window_means,
    window_effective, worst_mean, worst_effective, pass_mean, pass_effective}}}."""
    out, ok_all = {}, {"mean": True, "effective": True}
    for k, r in rollout.items():
        n = len(r["mean"])
        entry = {"target": target[k]}
        for name in ("mean", "effective"):
            wins = [_mean(r[name][i:i + window]) for i in range(0, n, window)]
            worst = max(abs(w - target[k]) for w in wins)
            ok = worst <= tol
            if target[k] == 0.0 and name == "mean":
                abs_wins = [_mean(r["abs"][i:i + window]) for i in range(0, n, window)]
                entry["window_abs"] = abs_wins
                ok = ok and max(abs_wins) < frozen_abs
            entry.update({name: _mean(r[name]), f"window_{name}": wins, f"worst_{name}": worst,
                          f"pass_{name}": bool(ok)})
            ok_all[name] = ok_all[name] and ok
        out[k] = entry
    return {"pass": ok_all, "tol": tol, "window": window, "layers": out}


def first_reached(blocks: Dict, target: Dict[str, float], tol: float, measure: str = "mean") -> Optional[int]:
    """The first meta-step (block end) from which every layer's block-mean gate (``measure``:
    "mean" or "effective") stays within ``tol`` of its target to the end of the trace, or None."""
    n = len(blocks["step"])
    ok = [all(abs(blocks["gate"][k][measure][i] - target[k]) <= tol for k in target) for i in range(n)]
    first = None
    for i in range(n - 1, -1, -1):
        if not ok[i]:
            break
        first = blocks["step"][i]
    return first


# --------------------------------------------------------------------------- one case
def run_case(name: str, model, stream, mcfg, out_dir: str, budget: int, resume: bool, progress: bool, log=print):
    """Meta-train against the case's teacher until ``budget`` meta-steps (at an episode end);
    returns (meta-learner, history, trace)."""

    os.makedirs(out_dir, exist_ok=True)
    trace_path = os.path.join(out_dir, "trace.json")
    ckpt = os.path.join(out_dir, CKPT_NAME)
    trace = GateTrace()
    if resume and os.path.exists(ckpt) and os.path.exists(trace_path):
        with open(trace_path) as f:
            trace = GateTrace(json.load(f)["rows"])
        done = sum(h["steps"] for h in load_checkpoint(ckpt, ("history",), "meta-training checkpoint")["history"])
        trace.cut(done)             # steps after the checkpoint are run again
    elif not resume and os.path.exists(ckpt):
        os.remove(ckpt)

    def save_trace(_rec):
        atomic_write_json(trace_path, {"rows": trace.rows}, indent=None)

    cfg = dataclasses.replace(mcfg, episodes=10 ** 6)
    hist = metatrain_with_budget(model, stream, cfg, out_dir, True, {"max_total_steps": budget, "chunk_episodes": 1},
                                 progress, log, on_step=trace, on_episode=save_trace)
    save_trace(None)
    return load_meta(ckpt, device=mcfg.device), hist, trace


def readout_compare(model, w0, tasks, meta, meta_path, spec, seeds, out_dir, progress, log=print, c: float = 0.5):
    """Meta-test of ``ours`` (the meta-learner trained on sgd_scaled c) and ``sgd`` at lr x c: the
    readouts at the last step, per method {task_a_readout, task_b_readout: (mean, sem)}."""
    mtest = spec.metatest
    readout = Readout(model, ReadoutData(tasks, spec.readout))
    methods = {"ours": {"kind": "ours"}, f"sgd_x{c:g}": {"kind": "sgd", "lr_scale": c}}
    runs = run_meta_test(model, w0, tasks, readout, mtest, methods, seeds, meta=meta, meta_path=meta_path,
                         cache_dir=os.path.join(out_dir, "runs"), progress=progress, log=log)
    out = {}
    for m, rs in runs.items():
        out[m] = {k: mean_sem([r[k][-1] for r in rs]) for k in ("task_a_readout", "task_b_readout")}
        out[m]["joint_readout"] = mean_sem([r["joint_readout"] for r in rs])
    return out


# --------------------------------------------------------------------------- figure
def plot(results: Dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cases = results["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 3.6 * len(cases)), squeeze=False)
    for row, (name, c) in enumerate(cases.items()):
        ax, axr = axes[row]
        blocks = c["blocks"]
        for i, (k, g) in enumerate(blocks["gate"].items()):
            col = f"C{i}"
            m = g["mean"]
            lo = [a - b for a, b in zip(m, g["spread"])]
            hi = [a + b for a, b in zip(m, g["spread"])]
            ax.plot(blocks["step"], m, color=col, label=f"{k}")
            ax.fill_between(blocks["step"], lo, hi, color=col, alpha=0.12)
            ax.axhline(c["target"][k], color=col, ls="--", lw=0.8)
            r = c["rollout"][k]["mean"]
            axr.plot(range(1, len(r) + 1), r, color=col, label=k)
            axr.plot(range(1, len(r) + 1), c["rollout"][k]["effective"], color=col, ls=":")
            ax.plot(blocks["step"], g["effective"], color=col, ls=":")
            axr.axhline(c["target"][k], color=col, ls="--", lw=0.8)
        ax.set_title(f"{name}: gate in meta-training\n(solid mean ± spread, dotted effective, dashed target)",
                     fontsize=9)
        ax.set_xlabel("meta-steps")
        ax.set_ylabel("gate δ")
        ax.legend(fontsize=8)
        p = c["judge"]["pass"]
        axr.set_title(f"{name}: {len(r)}-step rollout of the learned gate\n(mean {'pass' if p['mean'] else 'fail'}, "
                      f"effective {'pass' if p['effective'] else 'fail'})", fontsize=9)
        axr.set_xlabel("meta-test update step")
        axr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.studies.known_answer",
                                description=__doc__.split("\n")[0])
    add_task_a_arguments(p, "exp1-mnist", "quick")
    p.add_argument("--out", default=os.path.join("runs", "known_answer"), help="output folder (default %(default)s)")
    p.add_argument("--cases", default="scaled0.5,scaled0.2,frozen_conv2",
                   help="comma-separated: scaled<c>, frozen_<module> (default %(default)s)")
    p.add_argument("--budget", type=int, default=4000, help="meta-steps per case (stops at the episode end "
                                                            "that reaches it; default %(default)s)")
    p.add_argument("--every", type=int, default=100, help="meta-steps per reported block (default %(default)s)")
    p.add_argument("--metatrain", default="{}", metavar="JSON",
                   help="meta-training options over the profile's, e.g. '{\"meta_lr\": 1e-4}'")
    p.add_argument("--rollout-steps", type=int, default=500)
    p.add_argument("--rollout-seeds", type=int, default=3)
    p.add_argument("--readout-seeds", type=int, default=3, help="seeds of the ours vs sgd_x<c> readout comparison "
                                                               "(scaled cases; 0: skip)")
    p.add_argument("--tol", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="continue each case from its checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for opt in ("budget", "every", "rollout_steps", "rollout_seeds"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.cache = args.out              # the Task A network is cached in <out>/cache
    try:
        cases = {c: parse_case(c) for c in args.cases.split(",") if c}
        over = json.loads(args.metatrain)
        if not isinstance(over, dict):
            raise ValueError("--metatrain must be a JSON object")
        _, spec, prep = prepare(args, progress=not args.no_progress)
        base = dataclasses.asdict(spec.metatrain)
        for k in ("impl", "device", "teacher"):
            base.pop(k)
        MetaTrainConfig.from_dict({**base, **over})       # checked before any run
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"known_answer: error: {e}", file=sys.stderr)
        return 1
    progress = not args.no_progress
    model, w0 = prep.model, prep.w0
    tasks, _ = prep.metatest_tasks([0])[0]
    xb2, yb2 = tasks.b2
    results = {"experiment": args.experiment, "profile": args.profile, "metatrain_overrides": over,
               "budget": args.budget, "every": args.every, "task_a_test_acc": prep.task_a.get("test_acc"),
               "criterion": {"tol": args.tol, "window": ROLLOUT_WINDOW, "frozen_abs": 0.1}, "cases": {},
               "threads": torch.get_num_threads()}
    for name, teacher in cases.items():
        t0 = time.time()
        mcfg = MetaTrainConfig.from_dict({**base, **over, "teacher": teacher})
        cdir = os.path.join(args.out, name)
        print(f"== {name}: teacher {teacher}, {args.budget} meta-steps")
        meta, hist, trace = run_case(name, model, prep.stream, mcfg, cdir, args.budget, args.resume, progress)
        tgt = targets(teacher, meta)
        blocks = trace.blocks(args.every)
        t_train = time.time() - t0
        roll = gate_rollout(model, meta, w0, xb2, yb2, args.rollout_steps, list(range(args.rollout_seeds)), mcfg.lr)
        verdict = judge(roll, tgt, args.tol)
        entry = {"teacher": teacher, "target": tgt, "blocks": blocks, "rollout": roll, "judge": verdict,
                 "meta_steps": sum(h["steps"] for h in hist), "episodes": len(hist),
                 "episode_steps": [h["steps"] for h in hist],
                 "reached_step": {m: first_reached(blocks, tgt, args.tol, m) for m in ("mean", "effective")},
                 "train_seconds": round(t_train, 1)}
        if teacher["kind"] == "sgd_scaled" and args.readout_seeds > 0:
            entry["readouts"] = readout_compare(model, w0, tasks, meta, os.path.join(cdir, CKPT_NAME), spec,
                                                list(range(args.readout_seeds)), cdir, progress, c=teacher["c"])
        entry["seconds"] = round(time.time() - t0, 1)
        results["cases"][name] = entry
        for k, j in verdict["layers"].items():
            print(f"  {k}: target {j['target']:g}; rollout mean gate {j['mean']:.3f} (worst 50-step window off by "
                  f"{j['worst_mean']:.3f}: {'pass' if j['pass_mean'] else 'FAIL'}), effective gate "
                  f"{j['effective']:.3f} ({j['worst_effective']:.3f}: {'pass' if j['pass_effective'] else 'FAIL'})")
        if "readouts" in entry:
            for m, r in entry["readouts"].items():
                print(f"  {m}: Task A {r['task_a_readout'][0]:.2f} ± {r['task_a_readout'][1]:.2f}, "
                      f"Task B {r['task_b_readout'][0]:.2f} ± {r['task_b_readout'][1]:.2f}")
        atomic_write_json(os.path.join(args.out, "results.json"), results)
    plot(results, os.path.join(args.out, "known_answer.png"))
    print(f"wrote {os.path.join(args.out, 'results.json')} and known_answer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
