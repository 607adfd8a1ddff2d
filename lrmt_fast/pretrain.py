"""Task A pretraining (paper 5.2: SGD, lr 1e-2, momentum 0.5) and its cached checkpoint.

The checkpoint is written atomically and reused: its file name carries a key made
of the training config and the fingerprint of the Task A data, so a different
config never silently reuses another's weights. ``head_b`` of the checkpoint is
an untrained, seeded head; every meta-training episode and every meta-test run
draws its own fresh ``head_b`` (:func:`lrmt_fast.student.fresh_head_b`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict

import torch
from tqdm.auto import tqdm
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .data.tasks import BatchStream, TaskData
from .models import build_model

Tensor = torch.Tensor


@dataclass
class PretrainConfig:
    model: str = "lenet"
    model_kw: Dict = field(default_factory=dict)
    epochs: float = 3.0           # passes over Task A's training set (fractions allowed)
    lr: float = 1e-2
    momentum: float = 0.5
    batch: int = 64
    weight_decay: float = 0.0
    seed: int = 0

    POSITIVE = ("epochs", "lr", "batch")
    NONNEGATIVE = ("momentum", "weight_decay", "seed")



def make_model(cfg: PretrainConfig, num_classes_a: int, num_classes_b: int) -> nn.Module:
    return build_model(cfg.model, num_classes_a, num_classes_b, **cfg.model_kw)


def cache_key(cfg: PretrainConfig, data_fp: str) -> str:
    blob = json.dumps({"cfg": dataclasses.asdict(cfg), "data": data_fp}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, head: str = "a", batch: int = 2000) -> float:
    """Test accuracy in percent of ``model``'s ``head`` on (x, y)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i:i + batch], head).argmax(1) == y[i:i + batch]).sum())
    model.train(was)
    return 100.0 * correct / max(1, x.shape[0])


def pretrain(model: nn.Module, task: TaskData, cfg: PretrainConfig, device="cpu", progress: bool = True) -> Dict:
    """Train ``model`` (trunk + head_a) on Task A with SGD; returns {test_acc, steps, history}."""
    model.to(device).train()
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [p for n, p in model.named_parameters() if not n.startswith("head_b.")]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(task.train_x.shape[0] / cfg.batch)
    total = max(1, int(round(cfg.epochs * steps_per_epoch)))
    stream = BatchStream(task.train_x, task.train_y, cfg.batch, gen, device=device)
    bar = None
    if progress:
        bar = tqdm(total=total, desc="pretrain task A", unit="step", dynamic_ncols=True, leave=False)
    history = []
    running = 0.0
    for step in range(total):
        x, y = stream.next()
        loss = F.cross_entropy(model(x, "a"), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        running = 0.98 * running + 0.02 * lv if step else lv
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % steps_per_epoch == 0 or step + 1 == total:
            history.append({"step": step + 1, "loss": running,
                            "test_acc": accuracy(model, task.test_x.to(device), task.test_y.to(device))})
    if bar is not None:
        bar.close()
    return {"test_acc": history[-1]["test_acc"], "steps": total, "history": history}


def load_or_pretrain(cache_dir: str, task: TaskData, num_classes_b: int, cfg: PretrainConfig, device="cpu",
                     progress: bool = True, log=print):
    """The Task A model from ``cache_dir/taskA-<key>.pt``, training and saving it first if absent.

    Returns (model on ``device``, info dict with path, key, test_acc).
    """
    key = cache_key(cfg, task.fp)
    path = os.path.join(cache_dir, f"taskA-{key}.pt")
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, task.num_classes, num_classes_b)
    if os.path.exists(path):
        ck = load_checkpoint(path, ("state_dict", "key", "test_acc"), "Task A checkpoint")
        if ck["key"] != key:
            raise CheckpointError(f"Task A checkpoint {path} has key {ck['key']}, expected {key}; delete it")
        try:
            model.load_state_dict(ck["state_dict"])
        except Exception as e:
            raise CheckpointError(f"Task A checkpoint {path} does not fit the {cfg.model} model: "
                                  f"{str(e).splitlines()[0]}; delete it") from None
        log(f"task A: reusing {path} (test accuracy {ck['test_acc']:.2f}%)")
        return model.to(device), {"path": path, "key": key, "test_acc": ck["test_acc"], "cached": True}
    info = pretrain(model, task, cfg, device, progress)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"kind": "lrmt_taskA", "key": key, "config": dataclasses.asdict(cfg), "data_fp": task.fp,
                 "state_dict": sd, "test_acc": info["test_acc"], "history": info["history"]}, path)
    log(f"task A: trained {info['steps']} steps, test accuracy {info['test_acc']:.2f}% -> {path}")
    return model.to(device), {"path": path, "key": key, "test_acc": info["test_acc"], "cached": False}
