"""Tasks as in-memory tensors: normalisation, the even D_B1 / D_B2 split of Task B,
subsets, fingerprints (for caches) and a seeded mini-batch stream.

MNIST-sized data fits in memory (60k x 784 floats = 188 MB), so everything is
held as tensors; images are [N, 1, 28, 28] float32, normalised with the mean and
std of their own dataset's training set, labels int64.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from . import sources

Tensor = torch.Tensor

# (mean, std) of each dataset's training images in [0, 1]
NORM: Dict[str, Tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion": (0.2860, 0.3530),
}
NUM_CLASSES = {"mnist": 10, "fashion": 10}


def to_float(images_u8: Tensor, name: str) -> Tensor:
    """uint8 [N, H, W] -> normalised float32 [N, 1, H, W]."""
    mean, std = NORM[name]
    x = images_u8.to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return x.unsqueeze(1)


def fingerprint(*tensors: Tensor) -> str:
    """sha1 over shapes and bytes: identifies a dataset (or a subset) in cache keys."""
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def split_even(n: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """A fixed random split of ``range(n)`` into two halves (D_B1: meta-train, D_B2: meta-test)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return perm[:half].sort().values, perm[half:].sort().values


def fixed_subset(n: int, size: Optional[int], seed: int) -> Tensor:
    """Indices of a fixed random subset of ``size`` of ``range(n)`` (all of it when size is None or >= n)."""
    if size is None or size >= n:
        return torch.arange(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:size].sort().values


@dataclass
class TaskData:
    """One classification task: float images and labels, train and test."""

    name: str
    num_classes: int
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    fp: str = ""

    def to(self, device) -> "TaskData":
        return TaskData(self.name, self.num_classes, self.train_x.to(device), self.train_y.to(device),
                        self.test_x.to(device), self.test_y.to(device), self.fp)


@dataclass
class TwoTasks:
    """Task A and Task B; Task B's training set split evenly into D_B1 and D_B2."""

    a: TaskData
    b: TaskData
    b1_idx: Tensor
    b2_idx: Tensor
    source: str = ""
    info: Dict = field(default_factory=dict)

    @property
    def b1(self) -> Tuple[Tensor, Tensor]:
        return self.b.train_x[self.b1_idx], self.b.train_y[self.b1_idx]

    @property
    def b2(self) -> Tuple[Tensor, Tensor]:
        return self.b.train_x[self.b2_idx], self.b.train_y[self.b2_idx]

    def fingerprint(self) -> str:
        return hashlib.sha1(f"{self.a.fp}/{self.b.fp}/{fingerprint(self.b1_idx)}".encode()).hexdigest()[:16]

    def describe(self) -> Dict:
        return {"source": self.source, "task_a": self.a.name, "task_b": self.b.name,
                "task_a_train": int(self.a.train_x.shape[0]), "task_a_test": int(self.a.test_x.shape[0]),
                "task_b_train": int(self.b.train_x.shape[0]), "task_b_test": int(self.b.test_x.shape[0]),
                "d_b1": int(self.b1_idx.numel()), "d_b2": int(self.b2_idx.numel()),
                "fingerprint": self.fingerprint(), **self.info}


def validation_tasks(tasks: TwoTasks, fraction: float = 0.2, seed: int = 0) -> TwoTasks:
    """Task pairs for choosing what the paper leaves open without touching D_B2 or a test set.

    Task A: a fixed ``fraction`` of its training images becomes its test set (readout test), the rest
    its training set. Task B: only D_B1 is used; a fixed ``fraction`` of it is held out of
    meta-training and split evenly into the meta-test's stream (the validation "D_B2", also the Task B
    readout's training set) and the Task B readout's test set; the rest is the validation "D_B1".
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be between 0 and 1, got {fraction}")
    g = torch.Generator().manual_seed(10_000 + seed)
    na = tasks.a.train_x.shape[0]
    pa = torch.randperm(na, generator=g)
    a_val, a_rest = pa[: int(na * fraction)].sort().values, pa[int(na * fraction):].sort().values
    a = TaskData(tasks.a.name + "/val", tasks.a.num_classes, tasks.a.train_x[a_rest], tasks.a.train_y[a_rest],
                 tasks.a.train_x[a_val], tasks.a.train_y[a_val], fingerprint(tasks.a.train_x[a_val][:64], a_val))
    bx, by = tasks.b1
    nb = bx.shape[0]
    pb = torch.randperm(nb, generator=g)
    held = int(nb * fraction)
    stream, test, rest = pb[: held // 2], pb[held // 2: held], pb[held:]
    b = TaskData(tasks.b.name + "/D_B1-val", tasks.b.num_classes, bx, by, bx[test], by[test],
                 fingerprint(bx[test][:64], test))
    return TwoTasks(a, b, rest.sort().values, stream.sort().values, source=tasks.source,
                    info={**tasks.info, "validation": {"fraction": fraction, "seed": seed}})


def _task(name: str, tr: Tuple[Tensor, Tensor], te: Tuple[Tensor, Tensor], max_train=None, max_test=None,
          seed: int = 0) -> TaskData:
    itr = fixed_subset(tr[0].shape[0], max_train, seed)
    ite = fixed_subset(te[0].shape[0], max_test, seed + 1)
    trx, tr_y, tex, te_y = tr[0][itr], tr[1][itr], te[0][ite], te[1][ite]
    return TaskData(name, NUM_CLASSES[name], to_float(trx, name), tr_y.long(), to_float(tex, name), te_y.long(),
                    fingerprint(trx, tr_y, tex, te_y))


def load_task(name: str, source: str = "torchvision", root: Optional[str] = None, download=None,
              max_train: Optional[int] = None, max_test: Optional[int] = None, seed: int = 0) -> TaskData:
    """Task ``name`` ('mnist' | 'fashion') from a data root (``source='torchvision'``) or from the
    subset shipped in the package (``source='subset'``)."""
    if source == "torchvision":
        root = sources.resolve_data_root(root)
        tr = sources.load_torchvision(name, root, True, download)
        te = sources.load_torchvision(name, root, False, download)
    elif source == "subset":
        tr = sources.load_subset(name, True)
        te = sources.load_subset(name, False)
    else:
        raise ValueError(f"unknown data source {source!r}: expected 'torchvision' or 'subset'")
    return _task(name, tr, te, max_train, max_test, seed)


def load_two_tasks(task_a: str = "mnist", task_b: str = "fashion", source: str = "torchvision",
                   root: Optional[str] = None, download=None, split_seed: int = 0,
                   max_train: Optional[int] = None, max_test: Optional[int] = None) -> TwoTasks:
    """Task A and Task B with the fixed even split of Task B's training data."""
    if source == "torchvision":
        root = sources.resolve_data_root(root)
    a = load_task(task_a, source, root, download, max_train, max_test, seed=split_seed)
    b = load_task(task_b, source, root, download, max_train, max_test, seed=split_seed + 7)
    b1, b2 = split_even(b.train_x.shape[0], split_seed)
    return TwoTasks(a, b, b1, b2, source=source if source == "subset" else f"torchvision:{root or ''}")


class BatchStream:
    """Endless seeded mini-batches: shuffled epochs without replacement."""

    def __init__(self, x: Tensor, y: Tensor, batch: int, gen: torch.Generator, device=None):
        if x.shape[0] == 0:
            raise ValueError("BatchStream over an empty dataset")
        self.x, self.y, self.batch, self.gen = x, y, batch, gen
        self.device = device
        self._perm = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def next(self) -> Tuple[Tensor, Tensor]:
        idx = []
        need = self.batch
        while need > 0:
            if self._pos >= self._perm.numel():
                self._perm = torch.randperm(self.x.shape[0], generator=self.gen)
                self._pos = 0
            take = self._perm[self._pos:self._pos + need]
            self._pos += take.numel()
            need -= take.numel()
            idx.append(take)
        i = torch.cat(idx).to(self.x.device)
        xb, yb = self.x[i], self.y[i]
        if self.device is not None:
            xb, yb = xb.to(self.device), yb.to(self.device)
        return xb, yb

    __next__ = next

    def __iter__(self):
        return self
