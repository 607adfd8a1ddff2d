"""Experiment 1, MNIST -> FashionMNIST (paper section 5.2, Table 1 column 1, Figure 4 left).

    lrmt exp1-mnist --profile {smoke,quick,paper} --data-root DIR --out DIR --seeds N
                    [--resume] [--device cpu|cuda] [--impl reference|fused]

Profiles live in ``experiments/configs/exp1_mnist.json``. The CIFAR experiments
are sibling modules with the same two functions, reusing
:func:`experiments.common.run_two_task_pipeline`.
"""
from __future__ import annotations

import argparse
import os

from . import common

NAME = "exp1-mnist"
HELP = "Experiment 1: MNIST (Task A) -> FashionMNIST (Task B) with LeNet"
CONFIG = os.path.join(common.CONFIG_DIR, "exp1_mnist.json")
DEFAULT_OUT = os.path.join("runs", "exp1_mnist")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_arguments(p, CONFIG, DEFAULT_OUT)


def load_tasks(cfg: dict, data_root=None, download=None):
    from lrmt_fast.data import load_two_tasks

    d = cfg.get("data", {})
    return load_two_tasks(d.get("task_a", "mnist"), d.get("task_b", "fashion"), d.get("source", "torchvision"),
                          data_root, download, d.get("split_seed", 0), d.get("max_train"), d.get("max_test"))


def run(args: argparse.Namespace) -> int:
    cfg = common.resolve_profile(args.config or CONFIG, args.profile)
    seeds = args.seeds or list(range(int(cfg.get("seeds", 1))))
    device = common.pick_device(args.device)
    out = args.out or os.path.join(DEFAULT_OUT, args.profile)
    tasks = load_tasks(cfg, args.data_root, False if args.no_download else None)
    res = common.run_two_task_pipeline(cfg, tasks, out, seeds, device=device, impl=args.impl, resume=args.resume,
                                       progress=not args.no_progress)
    from lrmt_fast.results import format_table
    print(format_table(res))
    return 0
