"""Experiment 3, unseen initialisation (paper 5.4, Table 1 column 4, Figure 5 right).

    lrmt pretrain-cifar-pool --profile paper --data-root DIR            (the checkpoint pool; resumable)
    torchrun --nproc_per_node 8 -m lrmt_fast pretrain-cifar-pool ...    (each rank pretrains every 8th)
    lrmt exp3-unseen-init --profile {smoke,quick,cpu_finish,cpu_finish_avg,paper} --data-root DIR --out DIR [--resume]

As Experiment 2, but meta-training draws, per episode, one of ``pool.n_train`` Task A
checkpoints (paper: 100, seeds ``seed0 .. seed0+99`` of the same pretraining config),
and the meta-test of every method starts from a held-out checkpoint (seed
``seed0 + n_train``) that meta-training never saw.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from . import common
from . import exp1_cifar as E
from .exp2_cifar100 import run_cifar100

NAME = "exp3-unseen-init"
HELP = "Experiment 3: as Exp 2, meta-trained on a pool of Task A checkpoints, tested on a held-out one"
CONFIG = os.path.join(common.CONFIG_DIR, "exp3_unseen_init.json")
DEFAULT_OUT = os.path.join("runs", "exp3_unseen_init")


def add_pool_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool-dir", default=None, metavar="DIR",
                   help="the checkpoint pool (default: <cache-dir>/pool-<key of the pretraining config>)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    E.add_cifar_arguments(p, CONFIG, DEFAULT_OUT)
    add_pool_arguments(p)


def pool_settings(args, cfg, task_a):
    """(pretrain config, pool dir, n_train, seed0)."""
    from lrmt_fast.pretrain_cifar import CifarPretrainConfig, cache_key, data_fingerprint
    pcfg = common.dataclass_from(CifarPretrainConfig, cfg.get("pretrain"), "pretrain")
    pool = dict(cfg.get("pool") or {})
    unknown = sorted(set(pool) - {"n_train", "seed0"})
    if unknown:
        raise common.ConfigError(f"unknown pool option(s) {unknown}; known: ['n_train', 'seed0']")
    n_train, seed0 = int(pool.get("n_train", 100)), int(pool.get("seed0", 0))
    if n_train < 1:
        raise common.ConfigError("pool.n_train must be at least 1")
    key = cache_key(dataclasses.replace(pcfg, seed=0), data_fingerprint(task_a))
    pool_dir = args.pool_dir or os.path.join(args.cache_dir, f"pool-{key}")
    return pcfg, pool_dir, n_train, seed0


def pool_weights(args, cfg, task_a, sync, device, progress, log):
    """(training state dicts, held-out state dict, info, pretrain config), identical on every
    rank (rank 0 loads, or single-process trains the missing ones, and broadcasts)."""
    from lrmt_fast.distributed import DistSync, broadcast_object
    from lrmt_fast.checkpoint import load_checkpoint
    from lrmt_fast.pretrain_cifar import pool_paths, pretrain_pool

    pcfg, pool_dir, n_train, seed0 = pool_settings(args, cfg, task_a)
    paths = pool_paths(pool_dir, n_train + 1, seed0)
    payload = None
    if getattr(sync, "rank", 0) == 0:
        missing = [p for p in paths if not os.path.exists(p)]
        if missing and isinstance(sync, DistSync):
            payload = {"error": f"checkpoint pool {pool_dir}: {len(missing)} of {len(paths)} checkpoints missing; "
                                f"pretrain them first: lrmt pretrain-cifar-pool --profile {cfg.get('profile')} "
                                f"(under torchrun the ranks share the work)"}
        else:
            if missing:
                log(f"exp3: pretraining {len(missing)} missing checkpoint(s) of the pool {pool_dir}")
                pretrain_pool(task_a, pcfg, pool_dir, n_train + 1, seed0, device, shard=(0, 1), progress=progress,
                              log=log)
            cks = [load_checkpoint(p, ("state_dict", "key", "test_acc"), "CIFAR Task A checkpoint") for p in paths]
            accs = [c["test_acc"] for c in cks]
            payload = {"train": [c["state_dict"] for c in cks[:-1]], "test": cks[-1]["state_dict"],
                       "info": {"path": paths[-1], "key": cks[-1]["key"], "test_acc": accs[-1],
                                "pool": {"dir": pool_dir, "n_train": n_train, "seed0": seed0,
                                         "heldout_seed": seed0 + n_train,
                                         "train_test_acc_mean": sum(accs[:-1]) / len(accs[:-1]),
                                         "train_test_acc_min": min(accs[:-1]),
                                         "heldout_test_acc": accs[-1]}}}
    payload = broadcast_object(sync, payload)
    if "error" in payload:
        raise common.ConfigError(payload["error"])
    return payload["train"], payload["test"], payload["info"], pcfg


def run(args: argparse.Namespace) -> int:
    return run_cifar100(args, NAME, CONFIG, DEFAULT_OUT, unseen_init=True)


class PoolCommand:
    HELP = "pretrain Exp 3's pool of CIFAR-5A checkpoints (n_train + 1 held out); resumable, skips finished ones"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        E.add_cifar_arguments(p, CONFIG, DEFAULT_OUT)
        add_pool_arguments(p)
        p.add_argument("--n", type=int, default=None, metavar="N",
                       help="checkpoints in all (default: the profile's pool.n_train + 1)")

    @staticmethod
    def run(args) -> int:
        from lrmt_fast.pretrain_cifar import pretrain_pool, shard_from_env
        cfg = common.resolve_profile(args.config or CONFIG, args.profile)
        device = common.pick_device(args.device)
        rank, world = shard_from_env()
        if device == "cuda" and world > 1:
            import torch
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        E.apply_precision(args, device)
        task_a = E.load_task_a(args, cfg)
        pcfg, pool_dir, n_train, seed0 = pool_settings(args, cfg, task_a)
        n = args.n or n_train + 1
        res = pretrain_pool(task_a, pcfg, pool_dir, n, seed0, device, shard=(rank, world),
                            progress=not args.no_progress)
        accs = [r["test_acc"] for r in res]
        print(f"pool {pool_dir}: rank {rank}/{world} holds {len(res)} checkpoint(s) "
              f"({sum(r['status'] == 'trained' for r in res)} trained now, "
              f"{sum(r['status'] == 'resumed' for r in res)} resumed, {sum(r['status'] == 'exists' for r in res)} "
              f"existed); CIFAR-5A test accuracy mean {sum(accs) / max(1, len(accs)):.2f}%")
        return 0
