"""End to end: wall time of Exp 1 MNIST meta-training (the ``quick`` profile's settings) with
the fused path against the reference path, in the same process on the same episodes.

    python -m lrmt_fast.bench.e2e_exp1_metatrain --data-root data --episodes 40 [--threads 1]

Both paths meta-train the same number of episodes from the same seed (the same Task A
checkpoint, batches and curriculum; the episodes' lengths can differ only where the two
paths' float32 results differ). It prints the seconds per inner step of each path and, from
them, the estimated wall time of the whole ``quick`` meta-training (``max_total_steps`` of the
profile), and writes ``runs/bench/e2e_exp1_metatrain_<device>.json`` (``--update-records``: also
``benchmarks/results/``).
"""
from __future__ import annotations

import argparse
import os

import torch

from .e2e import time_impls, write_record


def main(argv=None) -> int:
    from lrmt_fast import suite
    from lrmt_fast.config import config_path, load_spec
    from lrmt_fast.meta_training import FreshHeadStream
    from lrmt_fast.pretrain import load_or_pretrain
    from lrmt_fast.student import param_dict

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cache", default=os.path.join("runs", "e2e_cache"), help="Task A checkpoint cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="record file (default runs/bench/<name>_<device>.json)")
    p.add_argument("--update-records", action="store_true",
                   help="also write the committed copy under benchmarks/results/")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    exp = suite.get("exp1-mnist")
    spec = load_spec(config_path(exp.config), "quick", exp.pretrain_cls)
    cfg = spec.raw
    tasks = exp.load_tasks(spec, suite.Sources(data_root=a.data_root, download=False))
    model, _ = load_or_pretrain(a.cache, tasks.a, tasks.b.num_classes, spec.pretrain, a.device, True, print)
    w0 = param_dict(model)
    xb1, yb1 = tasks.b1
    mt = cfg["metatrain"]

    def stream():
        return FreshHeadStream(w0, tasks.a.train_x, tasks.a.train_y, xb1, yb1, spec.metatrain.batch_a,
                               spec.metatrain.batch_b, a.device)

    rows = time_impls(model, stream, mt, a.episodes, a.device)
    cap = cfg.get("metatrain_budget", {}).get("max_total_steps")
    for r in rows:
        if cap:
            r["quick_metatrain_estimate_s"] = round(cap * r["s_per_step"], 1)
        print(f"{r['impl']:9s}: {1e3 * r['s_per_step']:.1f} ms/step, x{r['speedup_vs_reference']:.2f} vs reference"
              + (f", quick meta-training ({cap} steps) ~ {r['quick_metatrain_estimate_s'] / 60:.1f} min" if cap else ""))
    write_record("exp1_mnist_quick_metatrain", "e2e_exp1_metatrain", a.device, rows, a.out,
                 update_records=a.update_records, episodes=a.episodes,
                 quick_max_total_steps=cap)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
