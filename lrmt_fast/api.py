"""The Python API for one's own model and data (exported from :mod:`lrmt_fast`).

A model works with lrmt_fast when it has ``features(x)`` (the representation) and two linear heads
``head_a`` and ``head_b`` with ``forward(x, head)`` choosing one (:class:`TwoHeadNet` wraps a trunk
that lacks them). Data are anything indexable that yields ``(x, y)`` pairs: a ``Dataset``, a
``DataLoader``, or a tuple of two tensors.

    model = lrmt_fast.TwoHeadNet(trunk, feature_dim=64, classes_a=10, classes_b=10)   # trained on Task A
    meta, history = lrmt_fast.metatrain(model, task_a_train, task_b_train,
                                        lrmt_fast.MetaTrainConfig(episodes=200, lr=0.05), out_dir="runs/mine")
    opt = lrmt_fast.GatedSGD(model, meta, lr=0.05)        # the meta-learner as an optimiser
    acc = lrmt_fast.readout(model, task_a_train, task_a_test)   # representational forgetting, in %
    res = lrmt_fast.evaluate(model, (task_a_train, task_a_test), (task_b_train, task_b_test),
                             {"sgd": {"kind": "sgd"}, "ours": {"kind": "ours"}}, meta=meta, seeds=[0, 1])
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .data.tasks import TaskData, TwoTasks, fingerprint
from .meta_test import MetaTestConfig, run_meta_test
from .meta_training import FreshHeadStream, MetaTrainConfig, TensorTaskStream, metatrain as _metatrain
from .linear_readout import Readout, ReadoutConfig, ReadoutData, compute_features, readout_accuracy
from .results import aggregate
from .student import param_dict

Tensor = torch.Tensor
Data = Union[Tuple[Tensor, Tensor], torch.utils.data.Dataset, torch.utils.data.DataLoader]


class TwoHeadNet(nn.Module):
    """A trunk (any module mapping inputs to ``[N, feature_dim]``) with the two linear heads
    lrmt_fast expects: ``features(x)`` is the trunk's output, ``forward(x, head)`` one head's logits."""

    def __init__(self, trunk: nn.Module, feature_dim: int, classes_a: int, classes_b: int):
        super().__init__()
        self.trunk = trunk
        self.head_a = nn.Linear(feature_dim, classes_a)
        self.head_b = nn.Linear(feature_dim, classes_b)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def forward(self, x: Tensor, head: str = "a") -> Tensor:
        z = self.features(x)
        return self.head_a(z) if head == "a" else self.head_b(z)


def check_model(model: nn.Module) -> None:
    if not callable(getattr(model, "features", None)):
        raise ValueError(f"{type(model).__name__} has no features(x); wrap its trunk in lrmt_fast.TwoHeadNet")
    for h in ("head_a", "head_b"):
        if not isinstance(getattr(model, h, None), nn.Linear):
            raise ValueError(f"{type(model).__name__} has no linear {h}; wrap its trunk in lrmt_fast.TwoHeadNet")


def as_tensors(data: Data, what: str = "data") -> Tuple[Tensor, Tensor]:
    """(x, y) tensors from a tuple, a Dataset or a DataLoader (held in memory)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    else:
        xs, ys = [], []
        if isinstance(data, torch.utils.data.DataLoader):
            for xb, yb in data:
                xs.append(torch.as_tensor(xb))
                ys.append(torch.as_tensor(yb))
        else:
            try:
                n = len(data)
            except TypeError:
                raise ValueError(f"{what}: expected (x, y) tensors, a Dataset or a DataLoader, "
                                 f"got {type(data).__name__}") from None
            for i in range(n):
                xi, yi = data[i]
                xs.append(torch.as_tensor(xi).unsqueeze(0))
                ys.append(torch.as_tensor(yi).reshape(1))
        if not xs:
            raise ValueError(f"{what} is empty")
        x, y = torch.cat(xs), torch.cat(ys)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{what}: {x.shape[0]} inputs and {y.shape[0]} labels")
    return x.float() if not x.is_floating_point() else x, y.long()


def metatrain(model: nn.Module, task_a: Data, task_b: Data, config: Union[MetaTrainConfig, Dict, None] = None, *,
              out_dir: Optional[str] = None, resume: bool = False, device: Optional[str] = None,
              progress: bool = True, log: Callable[[str], None] = print, fresh_head_b: bool = True):
    """Algorithm 1 on one's own model (trained on Task A: it is the checkpoint every episode starts
    from) and data: Task A's training data (the teacher's Task A batches) and Task B's meta-training
    data (D_B1). Returns (meta-learner, history: one dict per episode). With ``out_dir`` a resumable
    checkpoint ``out_dir/meta_ckpt.pt`` is written (``resume=True`` continues from it);
    ``fresh_head_b`` draws a new ``head_b`` for every episode, as the experiments do."""
    check_model(model)
    cfg = config if isinstance(config, MetaTrainConfig) else MetaTrainConfig.from_dict(dict(config or {}))
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    xa, ya = as_tensors(task_a, "task_a")
    xb, yb = as_tensors(task_b, "task_b")
    w0 = param_dict(model.to(cfg.device))
    cls = FreshHeadStream if fresh_head_b else TensorTaskStream
    stream = cls(w0, xa, ya, xb, yb, cfg.batch_a, cfg.batch_b, cfg.device)
    return _metatrain(model, stream, cfg, out_dir=out_dir, resume=resume, progress=progress, log=log)


def readout(model: nn.Module, train: Data, test: Data, params: Optional[Dict[str, Tensor]] = None,
            steps: int = 100, lr: float = 0.1, seed: int = 0) -> float:
    """The paper's readout measure: a fresh linear layer trained (full-batch Adam, ``steps`` at
    ``lr``) on the frozen representation of ``train``, its accuracy on ``test`` in percent."""
    check_model(model)
    xtr, ytr = as_tensors(train, "train")
    xte, yte = as_tensors(test, "test")
    classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    ftr, fte = compute_features(model, params, xtr), compute_features(model, params, xte)
    return readout_accuracy(ftr, ytr, fte, yte, classes, steps, lr, seed)


def _task(name: str, pair, what: str) -> TaskData:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ValueError(f"{what}: expected (train data, test data)")
    (xtr, ytr), (xte, yte) = as_tensors(pair[0], f"{what} train"), as_tensors(pair[1], f"{what} test")
    classes = int(max(int(ytr.max()), int(yte.max())) + 1)
    return TaskData(name, classes, xtr, ytr, xte, yte, fingerprint(xtr, ytr, xte, yte))


def evaluate(model: nn.Module, task_a, task_b, methods: Dict[str, Dict], meta=None, seeds: Sequence[int] = (0,),
             metatest: Union[MetaTestConfig, Dict, None] = None, readout_config: Union[ReadoutConfig, Dict, None] = None,
             impl: Optional[str] = None, device: str = "cpu", cache_dir: Optional[str] = None,
             progress: bool = True) -> Dict:
    """The paper's meta-test on one's own model and data: every method of ``methods`` (name ->
    ``{"kind": ...}``: freeze, sgd, lwf, ewc, teacher, ours) updates the model from its current weights
    for ``metatest.steps`` steps on Task B's training data (``task_b = (train, test)``), with readouts
    of Task A (``task_a = (train, test)``) and Task B every ``metatest.every`` steps. Returns the
    results dict of the experiments' ``results.json`` (mean and s.e.m. over ``seeds``)."""
    check_model(model)
    mtest = metatest if isinstance(metatest, MetaTestConfig) else MetaTestConfig(**dict(metatest or {}))
    rcfg = readout_config if isinstance(readout_config, ReadoutConfig) else ReadoutConfig(**dict(readout_config or {}))
    a, b = _task("task A", task_a, "task_a"), _task("task B", task_b, "task_b")
    n = b.train_x.shape[0]
    tasks = TwoTasks(a, b, torch.zeros(0, dtype=torch.long), torch.arange(n), source="user")
    w0 = param_dict(model)
    ro = Readout(model, ReadoutData(tasks, rcfg, device))
    runs = run_meta_test(model, w0, tasks, ro, mtest, methods, list(seeds), meta=meta, impl=impl, device=device,
                         cache_dir=cache_dir, progress=progress, log=lambda *_: None)
    return aggregate(runs, "user", "", list(seeds), {"metatest": dataclasses.asdict(mtest),
                                                    "readout": dataclasses.asdict(rcfg)})
