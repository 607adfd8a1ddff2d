"""The CIFAR experiments (paper 5.2 right, 5.3, 5.4): ResNet-32 with GroupNorm pretrained on
CIFAR-5A (Task A), then

* Exp 1 (:class:`Cifar5Experiment`): Task B = CIFAR-5B, split evenly into D_B1 (meta-training)
  and D_B2 (meta-test);
* Exp 2 (:class:`Cifar100Experiment`, ``unseen_init=False``): every meta-training episode draws
  Task B1 = 5 random classes of CIFAR-100 0-49; meta-test seed ``s`` uses draw ``s`` of a fixed
  sequence of 5-class draws from CIFAR-100 50-99 (:func:`lrmt_fast.data.cifar.b2_class_draws`);
* Exp 3 (``unseen_init=True``): as Exp 2, but meta-training draws, per episode, one of
  ``pool.n_train`` Task A checkpoints (seeds ``seed0 ..``), and the meta-test starts every method
  from a held-out one (seed ``seed0 + n_train``).

Task A checkpoints are cached under ``Sources.cache_dir`` (shared by the three experiments, keyed
by pretraining config and data; a committed one with the same key is used where the cache has
none). Under torchrun rank 0 loads them and broadcasts the weights; pretraining itself runs in
one process (``lrmt pretrain-cifar`` / ``pretrain-cifar-pool``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import torch

from ..checkpoint import load_checkpoint
from ..config import ConfigError, PoolConfig
from ..data.cifar import (B1_POOL, CifarSource, CifarTaskStream, Task, b2_class_draws, cifar5a, cifar5b,
                          cifar100_task, even_split, split_b, to_task_data)
from ..data.tasks import TwoTasks, fingerprint, fixed_subset
from ..distributed import DistSync, broadcast_object
from ..pipeline import Prepared, RunOptions
from ..pretrain_cifar import (CifarPretrainConfig, base_config, cache_key, data_fingerprint, default_path, make_model,
                              pool_paths, pretrain_cifar, pretrain_pool)
from .sources import Sources


def cifar_source(sources: Sources) -> CifarSource:
    return CifarSource(sources.data_root, sources.cifar_check, sources.download)


def subset(task: Task, max_train: Optional[int], max_test: Optional[int], seed: int) -> Task:
    """A fixed random subset of a task's train / test images (smoke and quick profiles)."""
    itr = fixed_subset(task.train_x.shape[0], max_train, seed)
    ite = fixed_subset(task.test_x.shape[0], max_test, seed + 1)
    return Task(task.name, task.classes, task.train_x[itr], task.train_y[itr], task.test_x[ite], task.test_y[ite])


def _no_validation(spec) -> None:
    if spec.data.validation:
        raise ConfigError(f"profile {spec.profile!r}: data.validation is implemented for exp1-mnist and the demo "
                          f"only, not for the CIFAR experiments")


def load_task_a(spec, sources: Sources) -> Task:
    _no_validation(spec)
    d = spec.data
    return subset(cifar5a(cifar_source(sources)), d.max_train, d.max_test, d.split_seed)


def load_task_b(spec, sources: Sources) -> Task:
    """CIFAR-5B (the profile's subset), before its D_B1 / D_B2 split."""
    d = spec.data
    return subset(cifar5b(cifar_source(sources)), d.max_train, d.max_test, d.split_seed + 7)


# --------------------------------------------------------------------------- Task A checkpoints
def _cached_or_shipped(sources: Sources, task_a: Task, pcfg: CifarPretrainConfig) -> str:
    path = default_path(sources.cache_dir, task_a, pcfg)
    if not os.path.exists(path) and not os.path.exists(path + ".partial"):
        return sources.shipped_checkpoint(os.path.basename(path)) or path
    return path


def task_a_path(sources: Sources, task_a: Task, pcfg: CifarPretrainConfig) -> str:
    """Where the Task A checkpoint is read (or written): ``task_a_ckpt``, else the cache's file;
    where the cache has neither it nor a partial pretraining, a committed checkpoint with the same
    key (pretraining config and Task A data) is used instead of training again."""
    if sources.task_a_ckpt:
        return sources.task_a_ckpt
    return _cached_or_shipped(sources, task_a, pcfg)


def base_task_a_path(sources: Sources, task_a: Task, pcfg: CifarPretrainConfig) -> Optional[str]:
    """Where the checkpoint a finish phase starts from is read or written (the same lookup as
    :func:`task_a_path` for the config without the finish phase); None without a finish phase."""
    if pcfg.finish_epochs <= 0:
        return None
    return _cached_or_shipped(sources, task_a, base_config(pcfg))


def task_a_weights(spec, sources: Sources, task_a: Task, opts: RunOptions):
    """(Task A state dict, info) identical on every rank: rank 0 loads (or, in one process,
    trains) the checkpoint and broadcasts it."""
    pcfg = spec.pretrain
    path = task_a_path(sources, task_a, pcfg)
    payload = None
    if opts.rank == 0:
        if os.path.exists(path) or not isinstance(opts.sync, DistSync):
            cached = os.path.exists(path)
            ck = pretrain_cifar(task_a, pcfg, path, opts.device, opts.progress, opts.log,
                                base_path=base_task_a_path(sources, task_a, pcfg), owned=not sources.task_a_ckpt)
            if cached:
                opts.log(f"task A: reusing {path} (test accuracy {ck['test_acc']:.2f}%)")
            payload = {"state": ck["state_dict"], "info": {"path": path, "key": ck["key"],
                                                           "test_acc": ck["test_acc"]}}
        else:
            payload = {"error": f"the Task A checkpoint {path} does not exist; under torchrun pretrain it first "
                                f"(`lrmt pretrain-cifar --profile {spec.profile} ...` or a single-process "
                                f"run), then start the distributed job"}
    payload = broadcast_object(opts.sync, payload)
    if "error" in payload:
        raise ConfigError(payload["error"])
    return payload["state"], payload["info"]


def pool_settings(spec, sources: Sources, task_a: Task) -> Tuple[str, int, int]:
    """(pool dir, n_train, seed0) of Exp 3's checkpoint pool."""
    pool = spec.pool or PoolConfig()
    key = cache_key(dataclasses.replace(spec.pretrain, seed=0), data_fingerprint(task_a))
    return sources.pool_dir or os.path.join(sources.cache_dir, f"pool-{key}"), pool.n_train, pool.seed0


def pool_weights(spec, sources: Sources, task_a: Task, opts: RunOptions):
    """(training state dicts, held-out state dict, info), identical on every rank (rank 0 loads,
    or in one process trains the missing ones, and broadcasts)."""
    pool_dir, n_train, seed0 = pool_settings(spec, sources, task_a)
    paths = pool_paths(pool_dir, n_train + 1, seed0)
    payload = None
    if opts.rank == 0:
        missing = [p for p in paths if not os.path.exists(p)]
        if missing and isinstance(opts.sync, DistSync):
            payload = {"error": f"checkpoint pool {pool_dir}: {len(missing)} of {len(paths)} checkpoints missing; "
                                f"pretrain them first: lrmt pretrain-cifar-pool --profile {spec.profile} "
                                f"(under torchrun the ranks share the work)"}
        else:
            if missing:
                opts.log(f"exp3: pretraining {len(missing)} missing checkpoint(s) of the pool {pool_dir}")
                pretrain_pool(task_a, spec.pretrain, pool_dir, n_train + 1, seed0, opts.device, shard=(0, 1),
                              progress=opts.progress, log=opts.log)
            cks = [load_checkpoint(p, ("state_dict", "key", "test_acc"), "CIFAR Task A checkpoint") for p in paths]
            accs = [c["test_acc"] for c in cks]
            payload = {"train": [c["state_dict"] for c in cks[:-1]], "test": cks[-1]["state_dict"],
                       "info": {"path": paths[-1], "key": cks[-1]["key"], "test_acc": accs[-1],
                                "pool": {"dir": pool_dir, "n_train": n_train, "seed0": seed0,
                                         "heldout_seed": seed0 + n_train,
                                         "train_test_acc_mean": sum(accs[:-1]) / len(accs[:-1]),
                                         "train_test_acc_min": min(accs[:-1]),
                                         "heldout_test_acc": accs[-1]}}}
    payload = broadcast_object(opts.sync, payload)
    if "error" in payload:
        raise ConfigError(payload["error"])
    return payload["train"], payload["test"], payload["info"]


def build_model(pcfg: CifarPretrainConfig, state: Dict[str, torch.Tensor], device: str):
    model = make_model(pcfg)
    model.load_state_dict(state)
    return model.to(device)


def _meta_key(name: str, task_a_key: str, data_key: str, spec, world_size: int):
    def key(mcfg) -> Dict:
        return {"taskA": task_a_key, "data": data_key, "experiment": name, "metatrain": mcfg.key_dict(),
                "budget": spec.raw.get("metatrain_budget") or {}, "world_size": world_size}
    return key


# --------------------------------------------------------------------------- Exp 1
class Cifar5Experiment:
    """Exp 1 CIFAR-5A -> CIFAR-5B."""

    name = "exp1-cifar"
    config = "exp1_cifar.json"
    title = "Exp 1 CIFAR-5A -> 5B"
    help = "Experiment 1: CIFAR-5A (Task A) -> CIFAR-5B (Task B) with ResNet-32 GN"
    pretrain_cls = CifarPretrainConfig
    cifar = True

    def prepare(self, spec, sources: Sources, opts: RunOptions) -> Prepared:
        task_a = load_task_a(spec, sources)
        task_b = load_task_b(spec, sources)
        b1, _ = split_b(task_b, spec.data.split_seed)
        state, ainfo = task_a_weights(spec, sources, task_a, opts)
        model = build_model(spec.pretrain, state, opts.device)
        w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        mt = spec.metatrain
        stream = CifarTaskStream([w0], (task_a.train_x, task_a.train_y), (b1.train_x, b1.train_y), mt.batch_a,
                                 mt.batch_b, opts.device)
        source = f"cifar:{cifar_source(sources).root or ''}"

        def metatest_tasks(seeds: List[int]):
            i1, i2 = even_split(task_b.train_x.shape[0], spec.data.split_seed)
            return [(TwoTasks(to_task_data(task_a), to_task_data(task_b), i1, i2, source=source), list(seeds))]

        return Prepared(model=model, w0=w0, task_a=ainfo, stream=stream,
                        meta_key=_meta_key(self.name, ainfo["key"], fingerprint(b1.train_x, b1.train_y),
                                           spec, opts.world_size),
                        metatest_tasks=metatest_tasks, title=self.title)


# --------------------------------------------------------------------------- Exp 2 and 3
class Cifar100Experiment:
    """Exp 2 (one Task A checkpoint) or Exp 3 (``unseen_init``: a pool of them)."""

    pretrain_cls = CifarPretrainConfig
    cifar = True

    def __init__(self, name: str, config: str, unseen_init: bool):
        self.name, self.config, self.unseen_init = name, config, unseen_init
        self.title = "Exp 3 CIFAR-5A -> 100, unseen init" if unseen_init else "Exp 2 CIFAR-5A -> 100"
        self.help = ("Experiment 3: as Exp 2, meta-trained on a pool of Task A checkpoints, tested on a held-out one"
                     if unseen_init else
                     "Experiment 2: CIFAR-5A -> 5 random CIFAR-100 classes, unseen at meta-test (ResNet-32 GN)")

    def prepare(self, spec, sources: Sources, opts: RunOptions) -> Prepared:
        src = cifar_source(sources)
        d = spec.data
        task_a = load_task_a(spec, sources)
        x100, y100 = src.load("cifar100", True)
        sel = torch.isin(y100, torch.tensor(B1_POOL))
        xb1, yb1 = x100[sel], y100[sel]
        if self.unseen_init:
            train_states, test_state, ainfo = pool_weights(spec, sources, task_a, opts)
        else:
            test_state, ainfo = task_a_weights(spec, sources, task_a, opts)
            train_states = [test_state]
        model = build_model(spec.pretrain, test_state, opts.device)
        w0_test = {k: v.detach().clone() for k, v in model.named_parameters()}
        w0s = [{k: v for k, v in s.items() if k in w0_test} for s in train_states]
        mt = spec.metatrain
        stream = CifarTaskStream(w0s, (task_a.train_x, task_a.train_y), (xb1, yb1), mt.batch_a, mt.batch_b,
                                 opts.device, b_class_pool=B1_POOL, k=5)
        data_key = fingerprint(xb1, yb1)
        draws_info: Dict[str, List[int]] = {}

        def metatest_tasks(seeds: List[int]):
            draws = b2_class_draws(d.split_seed, n_draws=max(seeds) + 1)
            a_data = to_task_data(task_a)
            out = []
            for s in seeds:
                tb = subset(cifar100_task(draws[s], src, name=f"CIFAR-100 {draws[s]}"), d.max_train, d.max_test,
                            d.split_seed + 7 + s)
                n = tb.train_x.shape[0]
                out.append((TwoTasks(a_data, to_task_data(tb), torch.zeros(0, dtype=torch.long), torch.arange(n),
                                     source=f"cifar:{src.root or ''}", info={"b2_classes": draws[s]}), [s]))
                draws_info[str(s)] = draws[s]
            return out

        info = {"results": {"b2_classes": draws_info}}
        if self.unseen_init:
            info["pool"] = ainfo.get("pool")
        return Prepared(model=model, w0=w0_test, task_a=ainfo, stream=stream,
                        meta_key=_meta_key(self.name, ainfo["key"], data_key, spec, opts.world_size),
                        metatest_tasks=metatest_tasks, title=self.title, info=info)
