"""Experiment 1 on MNIST -> FashionMNIST with LeNet (paper 5.2, Table 1 column 1, Figure 4 left),
and the demo (the same pipeline on the subset shipped in the package)."""
from __future__ import annotations

import os

from ..data import load_two_tasks
from ..data.tasks import validation_tasks
from ..meta_training import FreshHeadStream
from ..pipeline import Prepared, RunOptions
from ..pretrain import PretrainConfig, load_or_pretrain
from ..student import param_dict
from .sources import Sources


class MnistExperiment:
    """Task A and Task B held in memory (:func:`lrmt_fast.data.load_two_tasks`); the Task A LeNet
    pretrained once and cached in ``<out>/cache``; meta-training on Task A's training set and
    D_B1 with a fresh ``head_b`` per episode; the meta-test on D_B2."""

    pretrain_cls = PretrainConfig
    cifar = False

    def __init__(self, name: str, config: str, title: str, help: str):
        self.name, self.config, self.title, self.help = name, config, title, help

    def load_tasks(self, spec, sources: Sources):
        d = spec.data
        return load_two_tasks(d.task_a, d.task_b, d.source, sources.data_root, sources.download, d.split_seed,
                              d.max_train, d.max_test)

    def prepare(self, spec, sources: Sources, opts: RunOptions) -> Prepared:
        tasks = self.load_tasks(spec, sources)
        model, ainfo = load_or_pretrain(os.path.join(opts.out, "cache"), tasks.a, tasks.b.num_classes, spec.pretrain,
                                        opts.device, opts.progress, opts.log)
        if spec.data.validation:    # the Task A network as in the real runs; then only held-out data
            tasks = validation_tasks(tasks, spec.data.val_fraction, spec.data.split_seed)
        w0 = param_dict(model)
        xb1, yb1 = tasks.b1
        mt = spec.metatrain
        stream = FreshHeadStream(w0, tasks.a.train_x, tasks.a.train_y, xb1, yb1, mt.batch_a, mt.batch_b, opts.device)
        data_fp = tasks.fingerprint()
        return Prepared(
            model=model, w0=w0, task_a=ainfo, stream=stream,
            meta_key=lambda mcfg: {"taskA": ainfo["key"], "data": data_fp, "metatrain": mcfg.key_dict(),
                                   "fresh_head_b": True,
                                   # the budget decides where meta-training stops (absent: the keys of
                                   # runs without one, as before the budget entered the key)
                                   **({"budget": spec.raw.get("metatrain_budget")}
                                      if spec.metatrain_budget.max_total_steps else {})},
            metatest_tasks=lambda seeds: [(tasks, list(seeds))], title=self.title)
