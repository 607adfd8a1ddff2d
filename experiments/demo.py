"""``lrmt demo``: the whole pipeline of Experiment 1 on the small real subset of MNIST and
FashionMNIST shipped in the package (``lrmt_fast/assets``), offline, in a few minutes
on a CPU; prints the results table. Numbers from so little data and training are a
demonstration of the pipeline, not a reproduction of the paper (see README.md).
"""
from __future__ import annotations

import argparse
import os

from . import common

NAME = "demo"
HELP = "run the whole pipeline on the MNIST/FashionMNIST subset shipped in the package (offline, minutes)"
CONFIG = os.path.join(common.CONFIG_DIR, "demo.json")
DEFAULT_OUT = os.path.join("runs", "demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--seeds", type=common.parse_seeds, default=None, metavar="N",
                   help="number of meta-test seeds (default: the config's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--impl", choices=["reference", "fused"], default=None)
    p.add_argument("--resume", action="store_true", help="continue an interrupted meta-training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from lrmt_fast.data import load_two_tasks
    from lrmt_fast.results import format_table

    cfg = common.resolve_profile(CONFIG, "demo")
    seeds = args.seeds or list(range(int(cfg.get("seeds", 1))))
    device = common.pick_device(args.device)
    d = cfg.get("data", {})
    tasks = load_two_tasks(d.get("task_a", "mnist"), d.get("task_b", "fashion"), "subset",
                           split_seed=d.get("split_seed", 0))
    print(f"demo: {tasks.describe()['task_a_train']} MNIST and {tasks.describe()['task_b_train']} FashionMNIST "
          f"training images shipped in the package; output in {args.out}")
    res = common.run_two_task_pipeline(cfg, tasks, args.out, seeds, device=device, impl=args.impl,
                                       resume=args.resume, progress=not args.no_progress)
    print()
    print(format_table(res))
    t = res.get("timings", {})
    print(f"total {t.get('total_s', 0):.0f} s; results in {os.path.abspath(args.out)} "
          f"(results.json, table.md, curves.png)")
    return 0
