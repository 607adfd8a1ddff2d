"""The paper's experiments: each is a config file of profiles (``lrmt_fast/configs``) plus a short
adapter that knows its data and its Task A network; :func:`lrmt_fast.pipeline.run_experiment`
does the rest.

=================  ===========================================================  ===================
name               what                                                         adapter
=================  ===========================================================  ===================
exp1-mnist         Exp 1: MNIST -> FashionMNIST, LeNet                          :class:`MnistExperiment`
demo               Exp 1's pipeline on the MNIST/Fashion subset in the package  :class:`MnistExperiment`
exp1-cifar         Exp 1: CIFAR-5A -> CIFAR-5B, ResNet-32 GN                    :class:`Cifar5Experiment`
exp2-cifar100      Exp 2: CIFAR-5A -> 5 unseen CIFAR-100 classes                :class:`Cifar100Experiment`
exp3-unseen-init   Exp 3: as Exp 2, meta-trained on a pool of Task A nets       :class:`Cifar100Experiment`
=================  ===========================================================  ===================
"""
from __future__ import annotations

from typing import Dict

from .cifar import Cifar5Experiment, Cifar100Experiment
from .mnist import MnistExperiment
from .sources import Sources

EXPERIMENTS: Dict[str, object] = {
    e.name: e for e in (
        MnistExperiment("exp1-mnist", "exp1_mnist.json", "Exp 1 MNIST -> FashionMNIST",
                        "Experiment 1: MNIST (Task A) -> FashionMNIST (Task B) with LeNet"),
        MnistExperiment("demo", "demo.json", "demo (MNIST/Fashion subset)",
                        "run the whole pipeline on the MNIST/FashionMNIST subset shipped in the package "
                        "(offline, minutes)"),
        Cifar5Experiment(),
        Cifar100Experiment("exp2-cifar100", "exp2_cifar100.json", unseen_init=False),
        Cifar100Experiment("exp3-unseen-init", "exp3_unseen_init.json", unseen_init=True),
    )
}


def get(name: str):
    """The experiment called ``name`` (KeyError listing the known ones)."""
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}") from None


__all__ = ["EXPERIMENTS", "get", "Sources", "MnistExperiment", "Cifar5Experiment", "Cifar100Experiment"]
