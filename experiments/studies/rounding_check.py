"""How far apart do rollouts of a meta-learner drift under float32 rounding alone?

Rolls "ours" out for ``--steps`` steps on a CIFAR profile's Task A network (random
CIFAR-shaped batches, a fresh head_b, the profile's meta-test lr) three ways that compute the
same arithmetic in a different order: the meta-test's in-place fused step (OursLearner), and
the meta-training update (:func:`lrmt_fast.steps.student_meta_update`) on the fused and on
the reference path. After each step it prints the largest difference of the LSTM cell states
and of the weights between them, and the largest |c| (a saturated LSTM unit adds exactly 1 a
step). experiments/results/archive/exp1_cifar_cpu_finish_avg_budget/README.md ("Rounding
sensitivity") reports what it showed for the x4 meta-learner of 2026-12-05: agreement to 1e-5
for two steps, then differences growing about 10^3 a step.

    python -m experiments.studies.rounding_check --meta CKPT [--experiment exp1-cifar]
        [--profile cpu_finish_avg] [--steps 6] [--data-root data] [--out rows.json]

Without ``--meta``, a freshly initialised meta-learner (gate 1: SGD).
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import torch

from lrmt_fast import ops
from lrmt_fast.baselines import OursLearner
from lrmt_fast.meta_training import build_meta_learner, load_meta
from lrmt_fast.steps import student_meta_update
from lrmt_fast.student import fresh_head_b, param_dict

from .tools import add_task_a_arguments, prepare, run_command


def _worst(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]):
    """(largest |a - b| over all tensors, the key where it is)."""
    return max((float((a[k] - b[k]).abs().max()), k) for k in a)


def rounding_rows(model, meta, lr: float, steps: int, batch: int = 64, seed: int = 0, log=print) -> List[Dict]:
    """One row per step: the largest cell-state and weight differences, in-place vs fused and
    fused vs reference, and the largest |c| (fused path)."""
    torch.manual_seed(seed)
    meta = meta.requires_grad_(False)
    w0 = fresh_head_b(param_dict(model), torch.Generator().manual_seed(seed + 3))
    ours = OursLearner(model, {k: v.clone() for k, v in w0.items()}, meta, lr, impl="fused")
    runs = {i: ({k: v.clone() for k, v in w0.items()}, meta.init_state()) for i in ("fused", "reference")}
    n_classes = w0["head_b.weight"].shape[0]
    g = torch.Generator().manual_seed(seed + 1)
    cells = lambda s: {k: v[1] for k, v in s.items()}
    rows = []
    for t in range(steps):
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, n_classes, (batch,), generator=g)
        ours.step(x, y)
        for impl, (p, s) in list(runs.items()):
            p, s, _, _ = student_meta_update(model, meta, p, s, x, y, lr, impl=impl)
            runs[impl] = ({k: v.detach() for k, v in p.items()}, meta.detach_state(s))
        (pf, sf), (pr, sr) = runs["fused"], runs["reference"]
        row = {"step": t + 1, "cell_inplace_vs_fused": _worst(cells(ours.state), cells(sf)),
               "cell_fused_vs_reference": _worst(cells(sf), cells(sr)),
               "weights_inplace_vs_fused": _worst(ours.params, pf), "weights_fused_vs_reference": _worst(pf, pr),
               "max_abs_c": max(float(v[1].abs().max()) for v in sf.values())}
        rows.append(row)
        log(f"step {row['step']}: cell state, in-place vs fused {row['cell_inplace_vs_fused']}, fused vs reference "
            f"{row['cell_fused_vs_reference']}; weights, in-place vs fused {row['weights_inplace_vs_fused']}, "
            f"fused vs reference {row['weights_fused_vs_reference']}; max |c| {row['max_abs_c']:.1f}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.studies.rounding_check",
                                description=__doc__.split("\n\n")[0])
    add_task_a_arguments(p, "exp1-cifar", "cpu_finish_avg")
    p.add_argument("--meta", default=None, metavar="CKPT", help="a trained meta-learner (meta-training checkpoint; "
                                                                 "default: a fresh one)")
    p.add_argument("--steps", type=int, default=6, help="steps rolled out (default 6)")
    p.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the rows as JSON to FILE")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        p.error("--steps and --batch must be >= 1")
    if not ops.available("cpu"):
        print("rounding_check: error: the fused extension is not built (make install)", file=sys.stderr)
        return 1

    def compute():
        _, spec, prep = prepare(args)
        model = prep.model
        meta = load_meta(args.meta) if args.meta else build_meta_learner(model, spec.metatrain.hidden,
                                                                          spec.metatrain.hidden_gn)
        return rounding_rows(model, meta, spec.metatest.lr, args.steps, args.batch, log=lambda m: print(m, flush=True))

    return run_command("rounding_check", compute, args.out)


if __name__ == "__main__":
    sys.exit(main())
