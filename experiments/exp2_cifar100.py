"""Experiment 2, CIFAR-5A -> 5 unseen CIFAR-100 classes (paper 5.3, Table 1 column 3, Figure 5
left), and the pipeline it shares with Experiment 3 (``exp3_unseen_init.py``).

    lrmt exp2-cifar100 --profile {smoke,quick,cpu,cpu_finish,cpu_finish_avg,paper} --data-root DIR --out DIR [--seeds N] [--resume]
    torchrun --nproc_per_node 2 -m lrmt_fast exp2-cifar100 ...

Meta-training: every episode draws Task B1 = 5 random classes of CIFAR-100 0-49 (all their
training images, labels 0-4 in the order drawn) with the episode generator, so each rank
of a distributed run sees its own class draws. Meta-test: Task B2 = 5 random classes of
CIFAR-100 50-99; meta-test seed ``s`` uses draw ``s`` of a fixed sequence of draws
(:func:`lrmt_fast.data.cifar.b2_class_draws`), so the paper's "5 draws" are seeds 0-4. A
meta-test run trains on the draw's CIFAR-100 training images (500 per class) and reads out
on its test images; Task A readouts as in Exp 1. Other settings as Exp 1 (paper), with the
curriculum 20 -> 50 (+5) and T-BPTT 5 -> 17 (+2) every 300 episodes, 2000 episodes.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict

import torch

from . import common
from . import exp1_cifar as E

NAME = "exp2-cifar100"
HELP = "Experiment 2: CIFAR-5A -> 5 random CIFAR-100 classes, unseen at meta-test (ResNet-32 GN)"
CONFIG = os.path.join(common.CONFIG_DIR, "exp2_cifar100.json")
DEFAULT_OUT = os.path.join("runs", "exp2_cifar100")


def add_arguments(p: argparse.ArgumentParser) -> None:
    E.add_cifar_arguments(p, CONFIG, DEFAULT_OUT)


def _b2_task(src, classes, d: Dict, seed: int):
    from lrmt_fast.data.cifar import cifar100_task
    t = cifar100_task(classes, src, name=f"CIFAR-100 {classes}")
    return E._subset(t, d.get("max_train"), d.get("max_test"), seed)


def run_cifar100(args: argparse.Namespace, name: str, config: str, default_out: str, unseen_init: bool) -> int:
    """Exp 2 (``unseen_init=False``: one Task A checkpoint) or Exp 3 (``True``: meta-train on a pool
    of checkpoints, one per episode; meta-test every method from a held-out checkpoint)."""
    from lrmt_fast.data.cifar import B1_POOL, CifarTaskStream, b2_class_draws, to_task_data
    from lrmt_fast.data.tasks import TwoTasks, fingerprint
    from lrmt_fast.distributed import shutdown
    from lrmt_fast.evaluate import MetaTestConfig
    from lrmt_fast.readout import ReadoutConfig

    cfg, seeds, sync, device, out, progress = E.setup(args, config, default_out)
    log = E._log_for(sync)
    t_start = time.time()
    src = E.source(args)
    d = cfg.get("data", {})
    split_seed = int(d.get("split_seed", 0))
    try:
        task_a = E.load_task_a(args, cfg)
        x100, y100 = src.load("cifar100", True)
        sel = torch.isin(y100, torch.tensor(B1_POOL))
        xb1, yb1 = x100[sel], y100[sel]
        mtest = common.dataclass_from(MetaTestConfig, cfg.get("metatest"), "metatest")
        rcfg = common.dataclass_from(ReadoutConfig, cfg.get("readout"), "readout")
        methods = cfg.get("methods") or {}
        if not methods:
            raise common.ConfigError("the profile lists no methods")
        if unseen_init:
            from experiments.exp3_unseen_init import pool_weights
            train_states, test_state, ainfo, pcfg = pool_weights(args, cfg, task_a, sync, device, progress, log)
        else:
            test_state, ainfo, pcfg = E.task_a_weights(args, cfg, task_a, sync, device, progress, log)
            train_states = [test_state]
        model = E.build_model(pcfg, test_state, device)
        w0_test = {k: v.detach().clone() for k, v in model.named_parameters()}
        pnames = set(w0_test)
        w0s = [{k: v for k, v in s.items() if k in pnames} for s in train_states]
        t_pre = time.time() - t_start
        mt = cfg.get("metatrain") or {}
        stream = CifarTaskStream(w0s, (task_a.train_x, task_a.train_y), (xb1, yb1), int(mt.get("batch_a", 64)),
                                 int(mt.get("batch_b", 64)), device, b_class_pool=B1_POOL, k=5)
        key_parts = {"taskA": ainfo["key"], "data": fingerprint(xb1, yb1), "experiment": name}
        t0 = time.time()
        meta, meta_path, history = E.run_metatraining(args, cfg, model, stream, out, key_parts, sync, device,
                                                      args.impl, progress, log, methods)
        t_meta = time.time() - t0
    finally:
        shutdown(sync)
    if getattr(sync, "rank", 0) != 0:
        return 0
    del stream, xb1, yb1
    t0 = time.time()
    draws = b2_class_draws(split_seed, n_draws=max(seeds) + 1)
    a_data = to_task_data(task_a)
    tasks_list, seeds_list, b2_info = [], [], {}
    for s in seeds:
        tb = _b2_task(src, draws[s], d, split_seed + 7 + s)
        n = tb.train_x.shape[0]
        tasks_list.append(TwoTasks(a_data, to_task_data(tb), torch.zeros(0, dtype=torch.long), torch.arange(n),
                                   source=f"cifar:{src.root or ''}", info={"b2_classes": draws[s]}))
        seeds_list.append([s])
        b2_info[str(s)] = draws[s]
    common._write_json(os.path.join(out, "config.json"),
                       {**cfg, "seeds": seeds, "device": device, "impl": args.impl,
                        "world_size": getattr(sync, "world_size", 1), "b2_classes": b2_info,
                        "data_info": [t.describe() for t in tasks_list]})
    runs, hist, rdesc = E.meta_test(model, w0_test, tasks_list, seeds_list, rcfg, mtest, methods, meta, meta_path,
                                    args.impl, device, os.path.join(out, "cache", "runs"),
                                    {"taskA": ainfo["key"]}, progress, log, os.path.join(out, "cache",
                                                                                        "delta_hist.json"))
    extra = {"timings": {"pretrain_s": round(t_pre, 1), "metatrain_s": round(t_meta, 1),
                         "metatest_s": round(time.time() - t0, 1), "total_s": round(time.time() - t_start, 1)},
             "world_size": getattr(sync, "world_size", 1),
             "b2_classes": b2_info,
             "config_extra": {"device": device, "impl": args.impl, "impl_resolved": common.resolved_impl(args.impl, device),
                              "precision": args.precision, "readout_data": rdesc,
                              "task_a_test_acc": ainfo["test_acc"], "task_a_checkpoint": ainfo["path"],
                              **({"pool": ainfo.get("pool")} if unseen_init else {})}}
    title = "Exp 3 CIFAR-5A -> 100, unseen init" if unseen_init else "Exp 2 CIFAR-5A -> 100"
    res = E.finish(cfg, runs, seeds, out, history, hist, extra, log, title)
    from lrmt_fast.results import format_table
    print(format_table(res))
    return 0


def run(args: argparse.Namespace) -> int:
    return run_cifar100(args, NAME, CONFIG, DEFAULT_OUT, unseen_init=False)
