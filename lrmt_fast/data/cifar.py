"""CIFAR-10 / CIFAR-100 for the paper's CIFAR experiments (docs/cifar.md).

Data come from torchvision's dataset classes reading the standard pickle layout
under a *data root* (``--data-root`` or the environment variable ``LRMT_DATA``):

    ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    ROOT/cifar-100-python/{train, test, meta}

and are held in memory as uint8 tensors ``[N, 3, 32, 32]`` (labels int64); they
are converted to normalised float only batch by batch, on the compute device.

Integrity (``check``):

* ``"md5"``   torchvision's own md5 check; refuse anything else.
* ``"skip"``  no md5 check (a local copy you trust).
* ``"auto"``  (default) md5 if it passes; otherwise accept the copy *only* if it
  is recognisably the offline reconstruction described in
  ``../shared/data/README.md`` (all files present, pickles readable, and the
  ``filenames`` key absent from every batch, which that reconstruction lacks and
  every genuine or corrupted download has), with a warning. Anything else fails
  with a message that names ``--cifar-check skip``.

Task splits (section 5.2-5.4 of the paper):

* CIFAR-5A = CIFAR-10 classes 0-4, CIFAR-5B = classes 5-9, labels remapped to 0-4.
* D_B1 / D_B2: an even split of Task B's *training* images by a seeded
  permutation (meta-train on D_B1, meta-test on D_B2). Task B's test images are
  used only for readout accuracy.
* Exp 2/3: Task B1 = 5 classes of CIFAR-100 0-49, drawn anew each meta-training
  episode with the episode's generator; Task B2 = 5 classes of CIFAR-100 50-99,
  ``n_draws`` (5) seeded draws at meta-test. Labels remapped to 0-4 in the order
  drawn.
"""
from __future__ import annotations

import os
import pickle
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..student import fresh_head_b
from .sources import DataNotFoundError, _socket_timeout, download_allowed
from .tasks import TaskData, fingerprint

Tensor = torch.Tensor

ENV_VAR = "LRMT_DATA"
CHECKS = ("auto", "md5", "skip")

# Standard CIFAR-10 channel statistics (of the CIFAR-10 training set, on [0, 1]).
# Used for CIFAR-100 too: every network here is pretrained on CIFAR-5A and must
# see Task B images on the same input scale.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
_FILES = {
    "cifar10": {True: [f"data_batch_{i}" for i in range(1, 6)], False: ["test_batch"], "meta": "batches.meta"},
    "cifar100": {True: ["train"], False: ["test"], "meta": "meta"},
}
_DIRS = {"cifar10": CIFAR10_DIR, "cifar100": CIFAR100_DIR}


class DataRootError(DataNotFoundError):
    """The data root is not given, or does not hold the dataset asked for (or fails its check)."""


# --------------------------------------------------------------------------- root
def resolve_data_root(data_root: Optional[str] = None) -> str:
    """``data_root`` if given, else ``$LRMT_DATA``; a clear error naming both otherwise."""
    root = data_root or os.environ.get(ENV_VAR)
    if not root:
        raise DataRootError(f"no data root: pass --data-root DIR or set the environment variable {ENV_VAR} "
                            f"(e.g. `python ../shared/data/unpack.py data` then --data-root data)")
    return os.path.abspath(os.path.expanduser(root))


def _missing_files(name: str, root: str) -> List[str]:
    f = _FILES[name]
    want = f[True] + f[False] + [f["meta"]]
    d = os.path.join(root, _DIRS[name])
    return [os.path.join(d, x) for x in want if not os.path.isfile(os.path.join(d, x))]


# --------------------------------------------------------------------------- torchvision classes
def _unchecked(base):
    """A subclass of a torchvision CIFAR class that skips every md5 check."""

    class Unchecked(base):
        def _check_integrity(self) -> bool:   # the data files
            return True

        def _load_meta(self) -> None:         # the label-name file (also md5-checked upstream)
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as fh:
                data = pickle.load(fh, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    Unchecked.__name__ = Unchecked.__qualname__ = f"Unchecked{base.__name__}"
    return Unchecked


def _tv_class(name: str):
    from torchvision import datasets    # only when a dataset is read: torchvision's import is slow
    return datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100


def is_offline_reconstruction(name: str, root: str) -> bool:
    """True when every data pickle lacks the ``filenames`` key: the signature of the
    offline copy of ``../shared/data`` (its README: the key "could not be recovered")."""
    f = _FILES[name]
    d = os.path.join(root, _DIRS[name])
    try:
        for fn in f[True] + f[False]:
            with open(os.path.join(d, fn), "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            if "filenames" in entry or "data" not in entry:
                return False
    except Exception:
        return False
    return True


def md5_ok(name: str, root: str) -> bool:
    """torchvision's own md5 check of the data files and the label-name file."""
    cls = _tv_class(name)
    obj = cls.__new__(cls)     # run torchvision's own check without loading the data
    obj.root = root
    from torchvision.datasets.utils import check_integrity    # (as above)
    if not cls._check_integrity(obj):
        return False
    return check_integrity(os.path.join(root, cls.base_folder, cls.meta["filename"]), cls.meta["md5"])


def _download(name: str, root: str) -> None:
    try:
        with _socket_timeout(30):
            _tv_class(name)(root, train=True, download=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataRootError(f"{name} not found under data root {root!r} and the download failed ({reason}). "
                            f"Pass --data-root DIR or set {ENV_VAR} to the folder holding {_DIRS[name]}/ "
                            f"(offline: python ../shared/data/unpack.py DIR)") from None


_WARNED: set = set()


def dataset_class(name: str, root: str, check: str = "auto", download: Optional[bool] = None):
    """The torchvision class to read ``name`` under ``root`` with, after the integrity policy.

    Missing files are downloaded by torchvision when downloads are allowed (``download``, else
    ``$LRMT_NO_DOWNLOAD`` unset), as on a machine with internet."""
    if name not in _DIRS:
        raise ValueError(f"unknown dataset {name!r}: expected 'cifar10' or 'cifar100'")
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    missing = _missing_files(name, root)
    if missing and download_allowed(download):
        _download(name, root)
        missing = _missing_files(name, root)
    if missing:
        raise DataRootError(f"{name} not found under data root {root!r}: missing {missing[:3]}"
                            f"{' ...' if len(missing) > 3 else ''}. Pass --data-root DIR or set {ENV_VAR} to the "
                            f"folder holding {_DIRS[name]}/ (offline: python ../shared/data/unpack.py DIR)")
    if check == "skip":
        return _unchecked(_tv_class(name))
    if md5_ok(name, root):
        return _tv_class(name)
    if check == "auto" and is_offline_reconstruction(name, root):
        if (name, root) not in _WARNED:          # once per dataset and root, not per split / process call
            _WARNED.add((name, root))
            warnings.warn(f"{name} under {root!r} fails torchvision's md5 check but is the offline reconstruction "
                          f"(no 'filenames' key, see ../shared/data/README.md); loading it without the md5 check "
                          f"(docs/cifar.md). Use --cifar-check md5 to refuse it.", stacklevel=3)
        return _unchecked(_tv_class(name))
    raise DataRootError(f"{name} under {root!r} fails torchvision's md5 check"
                        f"{'' if check == 'md5' else ' and is not the known offline copy'}; if you trust "
                        f"these files pass --cifar-check skip (docs/cifar.md)")


# --------------------------------------------------------------------------- in-memory tensors
_CACHE: Dict[Tuple[str, str, bool, str], Tuple[Tensor, Tensor]] = {}
_LOCK = threading.Lock()


def load_cifar(name: str, root: Optional[str] = None, train: bool = True, check: str = "auto",
               cache: bool = True, download: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] of CIFAR-10/100 (fine labels)."""
    root = resolve_data_root(root)
    key = (name, os.path.abspath(root), bool(train), check)
    with _LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
    cls = dataset_class(name, root, check, download)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", getattr(np, "VisibleDeprecationWarning", DeprecationWarning))
        ds = cls(root, train=train, download=False)
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2)))
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    if x.shape[1:] != (3, 32, 32) or x.shape[0] != y.shape[0]:
        raise DataRootError(f"{name} under {root!r}: unexpected shapes {tuple(x.shape)} / {tuple(y.shape)}")
    if cache:
        with _LOCK:
            _CACHE[key] = (x, y)
    return x, y


def clear_cache() -> None:
    """Forget the loaded tensors (and which offline copies were already warned about)."""
    with _LOCK:
        _CACHE.clear()
        _WARNED.clear()


# --------------------------------------------------------------------------- transforms
def normalize(x: Tensor) -> Tensor:
    """uint8 [N, 3, H, W] (any device) -> float32, standard CIFAR normalisation."""
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean) / std


def augment(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a uint8 batch, per image,
    with randomness from ``gen`` (a CPU generator). Used for pretraining only."""
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    dev = x.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = (oy.to(dev)[:, None] + ar_h[None, :])                       # [n, h]
    cols = ox.to(dev)[:, None] + ar_w[None, :]                          # [n, w]
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]   # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- splits
def select_classes(x: Tensor, y: Tensor, classes: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """The images of ``classes``, labels remapped to 0..len(classes)-1 in the given order."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"repeated classes in {classes}")
    lut = torch.full((int(y.max()) + 1 if y.numel() else 1,), -1, dtype=torch.int64)
    for i, c in enumerate(classes):
        if c < lut.numel():
            lut[c] = i
    new = lut[y]
    keep = new >= 0
    return x[keep], new[keep]


def even_split(n: int, seed: int) -> Tuple[Tensor, Tensor]:
    """Disjoint index sets (D_B1, D_B2) of sizes floor(n/2), ceil(n/2), from a seeded permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[: n // 2].sort().values, perm[n // 2:].sort().values


CIFAR5A = tuple(range(0, 5))
CIFAR5B = tuple(range(5, 10))
B1_POOL = tuple(range(0, 50))
B2_POOL = tuple(range(50, 100))


def draw_classes(pool: Sequence[int], k: int, gen: torch.Generator) -> List[int]:
    """``k`` distinct classes of ``pool``, drawn with ``gen``."""
    idx = torch.randperm(len(pool), generator=gen)[:k]
    return [int(pool[i]) for i in idx]


def draw_b1_classes(gen: torch.Generator, k: int = 5) -> List[int]:
    """Task B1 of one meta-training episode: ``k`` of CIFAR-100 classes 0-49."""
    return draw_classes(B1_POOL, k, gen)


def b2_class_draws(seed: int, n_draws: int = 5, k: int = 5) -> List[List[int]]:
    """The meta-test Task B2 draws: ``n_draws`` sets of ``k`` classes of CIFAR-100 50-99."""
    g = torch.Generator().manual_seed(int(seed) * 7919 + 50)
    return [draw_classes(B2_POOL, k, g) for _ in range(n_draws)]


@dataclass
class Task:
    """One classification task in memory: uint8 images, labels 0..K-1."""

    name: str
    classes: Tuple[int, ...]
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset_train(self, idx: Tensor) -> "Task":
        return Task(self.name, self.classes, self.train_x[idx], self.train_y[idx], self.test_x, self.test_y)


@dataclass
class CifarSource:
    """Where and how to read CIFAR: data root (else ``$LRMT_DATA``), integrity check, download."""

    root: Optional[str] = None
    check: str = "auto"
    download: Optional[bool] = None

    def load(self, dataset: str, train: bool) -> Tuple[Tensor, Tensor]:
        return load_cifar(dataset, self.root, train, self.check, download=self.download)

    def task(self, name: str, dataset: str, classes: Sequence[int]) -> Task:
        trx, tr_y = self.load(dataset, True)
        tex, te_y = self.load(dataset, False)
        a, b = select_classes(trx, tr_y, classes)
        c, d = select_classes(tex, te_y, classes)
        return Task(name, tuple(int(k) for k in classes), a, b, c, d)


def cifar5a(src: Optional[CifarSource] = None) -> Task:
    return (src or CifarSource()).task("CIFAR-5A", "cifar10", CIFAR5A)


def cifar5b(src: Optional[CifarSource] = None) -> Task:
    return (src or CifarSource()).task("CIFAR-5B", "cifar10", CIFAR5B)


def cifar100_task(classes: Sequence[int], src: Optional[CifarSource] = None, name: Optional[str] = None) -> Task:
    return (src or CifarSource()).task(name or f"CIFAR-100{list(classes)}", "cifar100", classes)


def split_b(task_b: Task, seed: int) -> Tuple[Task, Task]:
    """(D_B1, D_B2): Task B's training images split evenly by a seeded permutation;
    both keep Task B's test set for readout."""
    i1, i2 = even_split(task_b.train_x.shape[0], seed)
    b1, b2 = task_b.subset_train(i1), task_b.subset_train(i2)
    b1.name, b2.name = f"{task_b.name}/D_B1", f"{task_b.name}/D_B2"
    return b1, b2


# --------------------------------------------------------------------------- writing (tests, exports)
def write_torchvision_layout(root: str, name: str, train_x, train_y, test_x, test_y,
                             label_names: Optional[Sequence[str]] = None, filenames: bool = False) -> str:
    """Write ``train/test`` uint8 images [N, 3, 32, 32] (or [N, 32, 32, 3]) and labels as the
    pickles torchvision reads (CIFAR-10: 5 train batches + test_batch + batches.meta;
    CIFAR-100: train, test, meta). ``filenames=False`` mimics the offline copy (no key).
    Returns the dataset folder."""
    d = os.path.join(root, _DIRS[name])
    os.makedirs(d, exist_ok=True)

    def rows(x):
        x = np.asarray(x, dtype=np.uint8)
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x.reshape(x.shape[0], -1))

    def dump(fn, obj):
        tmp = os.path.join(d, fn + ".tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
        os.replace(tmp, os.path.join(d, fn))

    trx, tex = rows(train_x), rows(test_x)
    try_, tey = [int(v) for v in np.asarray(train_y)], [int(v) for v in np.asarray(test_y)]
    nclass = 10 if name == "cifar10" else 100
    names = list(label_names) if label_names else [f"class_{i}" for i in range(nclass)]
    if name == "cifar10":
        parts = np.array_split(np.arange(trx.shape[0]), 5)
        for i, p in enumerate(parts):
            e = {"batch_label": f"training batch {i + 1} of 5", "labels": [try_[j] for j in p], "data": trx[p]}
            if filenames:
                e["filenames"] = [f"img_{j}.png" for j in p]
            dump(f"data_batch_{i + 1}", e)
        e = {"batch_label": "testing batch 1 of 1", "labels": tey, "data": tex}
        if filenames:
            e["filenames"] = [f"test_{j}.png" for j in range(len(tey))]
        dump("test_batch", e)
        dump("batches.meta", {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072})
    else:
        for fn, x, y in (("train", trx, try_), ("test", tex, tey)):
            e = {"fine_labels": y, "coarse_labels": [v // 5 for v in y], "data": x}
            if filenames:
                e["filenames"] = [f"{fn}_{j}.png" for j in range(len(y))]
            dump(fn, e)
        dump("meta", {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    return d


def write_tiny_cifar(root: str, n_train_per_class: int = 6, n_test_per_class: int = 3, seed: int = 0,
                     which: Sequence[str] = ("cifar10", "cifar100")) -> str:
    """A tiny CIFAR-shaped dataset (class-dependent colour blobs, learnable) in torchvision's
    pickle layout, for tests and smoke runs. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for name in which:
        nclass = 10 if name == "cifar10" else 100
        proto = rng.integers(0, 256, size=(nclass, 3, 1, 1))

        def make(n):
            y = np.repeat(np.arange(nclass), n)
            x = np.clip(proto[y] + rng.normal(0, 40, size=(y.size, 3, 32, 32)), 0, 255).astype(np.uint8)
            p = rng.permutation(y.size)
            return x[p], y[p]

        trx, try_ = make(n_train_per_class)
        tex, tey = make(n_test_per_class)
        write_torchvision_layout(root, name, trx, try_, tex, tey)
    clear_cache()
    return root


# --------------------------------------------------------------------------- meta-training streams
class CifarEpisode:
    """One meta-training episode: its start weights ``w0`` and Task A / Task B batches
    (uint8 in memory, normalised on the device as drawn), all from the episode generator."""

    def __init__(self, w0, a: Tuple[Tensor, Tensor], b: Tuple[Tensor, Tensor], batch_a: int, batch_b: int,
                 device, gen: torch.Generator, info: Optional[Dict] = None):
        self.w0 = w0
        self._a, self._b = a, b
        self.batch_a, self.batch_b = batch_a, batch_b
        self.device, self.gen = device, gen
        self.info = info or {}

    def _draw(self, data, n):
        x, y = data
        idx = torch.randint(0, x.shape[0], (n,), generator=self.gen).to(x.device)
        return normalize(x[idx].to(self.device, non_blocking=True)), y[idx].to(self.device, non_blocking=True)

    def next_a(self):
        return self._draw(self._a, self.batch_a)

    def next_b(self):
        return self._draw(self._b, self.batch_b)


class CifarTaskStream:
    """Episodes of the CIFAR experiments (a :class:`lrmt_fast.meta_training.TaskStream`).

    * ``w0s``: one start checkpoint (Exp 1, 2) or the pool of training checkpoints (Exp 3;
      each episode picks one with its generator);
    * Task A: ``a = (x uint8, y)``, CIFAR-5A's training set;
    * Task B: ``b = (x uint8, y)``; with ``b_class_pool`` None (Exp 1) these are D_B1 with
      labels 0-4; otherwise (Exp 2, 3) ``b`` is the whole labelled pool (CIFAR-100 train) and
      each episode draws ``k`` classes of ``b_class_pool`` (CIFAR-100 0-49) with its generator;
    * every episode starts with a fresh ``head_b`` drawn with the episode generator.

    Order of draws from the episode generator: checkpoint, classes, head_b, then batches.
    """

    def __init__(self, w0s: Sequence[Dict[str, Tensor]], a: Tuple[Tensor, Tensor], b: Tuple[Tensor, Tensor],
                 batch_a: int = 64, batch_b: int = 64, device="cpu", b_class_pool: Optional[Sequence[int]] = None,
                 k: int = 5, fresh_head: bool = True, data_device=None):
        if not w0s:
            raise ValueError("CifarTaskStream needs at least one start checkpoint")
        self.w0s = [{kk: v.to(device) for kk, v in w.items()} for w in w0s]
        dd = data_device if data_device is not None else device
        self.a = (a[0].to(dd), a[1].to(dd))
        self.b = (b[0].to(dd), b[1].to(dd))
        self.batch_a, self.batch_b, self.device = batch_a, batch_b, device
        self.pool = list(b_class_pool) if b_class_pool is not None else None
        self.k, self.fresh_head = k, fresh_head
        if self.pool is not None:
            by = self.b[1].cpu()
            self._idx = {c: torch.nonzero(by == c).flatten() for c in self.pool}
            empty = [c for c, i in self._idx.items() if i.numel() == 0]
            if empty:
                raise ValueError(f"Task B pool has no images of classes {empty[:5]}")

    @property
    def w0(self):
        return self.w0s[0]

    def new_episode(self, episode: int, gen: torch.Generator) -> CifarEpisode:
        info: Dict = {"episode": episode}
        ci = int(torch.randint(0, len(self.w0s), (1,), generator=gen)) if len(self.w0s) > 1 else 0
        info["checkpoint"] = ci
        w0 = self.w0s[ci]
        if self.pool is None:
            b = self.b
        else:
            classes = draw_classes(self.pool, self.k, gen)
            info["classes"] = classes
            idx = torch.cat([self._idx[c] for c in classes])
            lab = torch.cat([torch.full((self._idx[c].numel(),), i, dtype=torch.int64)
                             for i, c in enumerate(classes)])
            idx = idx.to(self.b[0].device)
            b = (self.b[0][idx], lab.to(self.b[1].device))
        if self.fresh_head:
            w0 = fresh_head_b(w0, gen)
        return CifarEpisode(w0, self.a, b, self.batch_a, self.batch_b, self.device, gen, info)


def to_task_data(task: Task, name: Optional[str] = None):
    """A :class:`lrmt_fast.data.tasks.TaskData` (normalised float32) of a CIFAR task, for the shared
    meta-test / readout code, which holds float images."""
    return TaskData(name or task.name, task.num_classes, normalize(task.train_x), task.train_y.clone(),
                    normalize(task.test_x), task.test_y.clone(),
                    fingerprint(task.train_x, task.train_y, task.test_x, task.test_y))
