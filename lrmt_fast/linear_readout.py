"""The readout measure of representational forgetting (paper section 3, docs/method.md section 4).

Freeze the trunk, take the representation (the last layer before the
classifiers), train a *fresh* linear layer on the task's training data with
Adam (full batch; MNIST: 100 steps, lr 0.1; CIFAR: 500 steps, lr 0.1) and report
its test accuracy in percent. Alongside:

- ``task_a_original``: the network's own Task A head, as it is, on the Task A
  test set (the "Original" curve of the paper's Figure 1);
- ``task_b_head``: the network's own Task B head on the Task B test set;
- joint readout (Table 1): one linear layer over the union of the Task A and
  Task B classes (labels of B shifted by the number of A classes), trained on
  the union of both readout training sets and tested on both test sets.

Which training examples feed the readout is fixed once (:class:`ReadoutData`);
with ``train_size`` a fixed random subset is used when the full set is too slow
(the experiment configs say which).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data.tasks import TaskData, TwoTasks, fixed_subset
from .student import features

Tensor = torch.Tensor


@dataclass
class ReadoutConfig:
    steps: int = 100
    lr: float = 0.1
    train_size: Optional[int] = None   # readout training examples per task (None = all)
    test_size: Optional[int] = None    # test examples per task (None = all)
    feature_batch: int = 2000
    subset_seed: int = 0

    POSITIVE = ("steps", "lr", "train_size", "test_size", "feature_batch")
    NONNEGATIVE = ("subset_seed",)


@torch.no_grad()
def compute_features(model: nn.Module, params: Optional[Dict[str, Tensor]], x: Tensor, batch: int = 2000) -> Tensor:
    """The representation of ``x`` (batched, no grad) under ``params`` (or the module's own weights)."""
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        out.append(model.features(xb) if params is None else features(model, params, xb))
    return torch.cat(out) if out else x.new_zeros(0, 0)


def train_linear(feats: Tensor, labels: Tensor, num_classes: int, steps: int = 100, lr: float = 0.1,
                 seed: int = 0) -> nn.Linear:
    """A fresh linear layer fitted to (feats, labels) with full-batch Adam."""
    gen = torch.Generator().manual_seed(seed)
    d = feats.shape[1]
    lin = nn.Linear(d, num_classes).to(feats.device, feats.dtype)
    bound = 1.0 / (d ** 0.5)
    with torch.no_grad():   # nn.Linear's default init, drawn from our own generator
        lin.weight.copy_((torch.rand(lin.weight.shape, generator=gen) * 2 - 1) * bound)
        lin.bias.copy_((torch.rand(lin.bias.shape, generator=gen) * 2 - 1) * bound)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    feats = feats.detach()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(lin(feats), labels).backward()
            opt.step()
    return lin


@torch.no_grad()
def linear_accuracy(lin: nn.Module, feats: Tensor, labels: Tensor) -> float:
    if feats.shape[0] == 0:
        return float("nan")
    return 100.0 * float((lin(feats).argmax(1) == labels).float().mean())


def readout_accuracy(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, num_classes: int,
                     steps: int = 100, lr: float = 0.1, seed: int = 0) -> float:
    """Train a fresh linear readout on (train_f, train_y); test accuracy in percent on (test_f, test_y)."""
    lin = train_linear(train_f, train_y, num_classes, steps, lr, seed)
    return linear_accuracy(lin, test_f, test_y)


@dataclass
class _Split:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int


class ReadoutData:
    """The fixed examples that every readout of a run uses, for Task A and Task B.

    Task A readouts train on Task A's training set; Task B readouts train on D_B2
    (the meta-test half of Task B's training set, the only Task B data a
    meta-test run sees). Both test on their task's test set.
    """

    def __init__(self, tasks: TwoTasks, cfg: ReadoutConfig, device="cpu"):
        self.cfg = cfg
        self.device = device
        xb2, yb2 = tasks.b2
        self.a = self._make(tasks.a.train_x, tasks.a.train_y, tasks.a, cfg, 0)
        self.b = self._make(xb2, yb2, tasks.b, cfg, 1)

    def _make(self, trx, tr_y, task: TaskData, cfg: ReadoutConfig, k: int) -> _Split:
        itr = fixed_subset(trx.shape[0], cfg.train_size, cfg.subset_seed + 10 * k)
        ite = fixed_subset(task.test_x.shape[0], cfg.test_size, cfg.subset_seed + 10 * k + 1)
        d = self.device
        return _Split(trx[itr].to(d), tr_y[itr].to(d), task.test_x[ite].to(d), task.test_y[ite].to(d),
                      task.num_classes)

    def describe(self) -> Dict:
        return {"steps": self.cfg.steps, "lr": self.cfg.lr, "optimizer": "Adam (full batch)",
                "task_a_train": int(self.a.train_x.shape[0]), "task_a_test": int(self.a.test_x.shape[0]),
                "task_b_train": int(self.b.train_x.shape[0]), "task_b_train_from": "D_B2",
                "task_b_test": int(self.b.test_x.shape[0])}


def _head_acc(params: Dict[str, Tensor], head: str, feats: Tensor, y: Tensor) -> float:
    w, b = params[f"head_{head}.weight"], params.get(f"head_{head}.bias")
    with torch.no_grad():
        return 100.0 * float((F.linear(feats, w, b).argmax(1) == y).float().mean())


def trunk_fingerprint(params: Dict[str, Tensor]) -> str:
    """Identifies the trunk weights (everything but the heads): equal trunks give equal readouts."""
    h = hashlib.sha1()
    for k in sorted(params):
        if k.startswith("head_"):
            continue
        t = params[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class Readout:
    """Readouts of a network's representation on fixed data, with a cache keyed by the trunk's
    weights (a frozen trunk, or step 0 shared by every method, is read out once)."""

    def __init__(self, model: nn.Module, data: ReadoutData, keep_features: int = 2):
        self.model = model
        self.data = data
        self.cfg = data.cfg
        self._scores: Dict[tuple, Dict[str, float]] = {}
        self._test_feats: "OrderedDict[str, tuple]" = OrderedDict()
        self._keep = keep_features

    def _feats(self, params, x):
        return compute_features(self.model, params, x, self.cfg.feature_batch)

    def _test_features(self, fp: str, params):
        if fp in self._test_feats:
            self._test_feats.move_to_end(fp)
        else:
            self._remember(fp, (self._feats(params, self.data.a.test_x), self._feats(params, self.data.b.test_x)))
        return self._test_feats[fp]

    def _remember(self, fp, feats):
        self._test_feats[fp] = feats
        while len(self._test_feats) > self._keep:
            self._test_feats.popitem(last=False)

    def evaluate(self, params: Dict[str, Tensor], seed: int = 0, joint: bool = False) -> Dict[str, float]:
        """{task_a_readout, task_b_readout, task_a_original, task_b_head[, joint_readout]} in percent."""
        fp = trunk_fingerprint(params)
        key = (fp, seed, joint)
        if key not in self._scores:
            A, B = self.data.a, self.data.b
            fa_te, fb_te = self._test_features(fp, params)
            fa_tr, fb_tr = self._feats(params, A.train_x), self._feats(params, B.train_x)
            c = self.cfg
            sc = {"task_a_readout": readout_accuracy(fa_tr, A.train_y, fa_te, A.test_y, A.num_classes,
                                                     c.steps, c.lr, seed),
                  "task_b_readout": readout_accuracy(fb_tr, B.train_y, fb_te, B.test_y, B.num_classes,
                                                     c.steps, c.lr, seed + 1)}
            if joint:
                na = A.num_classes
                sc["joint_readout"] = readout_accuracy(
                    torch.cat([fa_tr, fb_tr]), torch.cat([A.train_y, B.train_y + na]),
                    torch.cat([fa_te, fb_te]), torch.cat([A.test_y, B.test_y + na]),
                    na + B.num_classes, c.steps, c.lr, seed + 2)
            self._scores[key] = sc
        fa, fb = self._test_features(fp, params)
        out = dict(self._scores[key])
        # the heads can change while the trunk does not (Freeze trains head_b): never cached
        out["task_a_original"] = _head_acc(params, "a", fa, self.data.a.test_y)
        out["task_b_head"] = _head_acc(params, "b", fb, self.data.b.test_y)
        return out

    def clear(self):
        self._scores.clear()
        self._test_feats.clear()
