"""lrmt_fast: Learning to Remember from a Multi-Task Teacher, with fused meta-update kernels.

The public API (docs in README.md, "Python API"):

- :func:`metatrain` (Algorithm 1 on one's own model and data) and :class:`MetaTrainConfig`;
- :class:`GatedSGD` (a trained meta-learner as a ``torch.optim.Optimizer``) and :func:`load_meta`;
- :func:`readout` (the readout measure) and :func:`evaluate` (meta-test rollouts of named methods);
- :class:`TwoHeadNet` (a trunk with the two heads lrmt_fast expects);
- the experiment spec types (:class:`ExperimentSpec` and its sections) and :func:`run_experiment`
  (the paper's experiments: :data:`suite.EXPERIMENTS`).
"""
__version__ = "0.1.0"

from .api import TwoHeadNet, evaluate, metatrain, readout
from .config import BudgetConfig, ConfigError, DataConfig, ExperimentSpec, PoolConfig, load_spec
from .meta_test import MetaTestConfig
from .meta_learner import MetaLearner
from .meta_training import MetaTrainConfig, load_meta
from .optim import GatedSGD
from .pipeline import RunOptions, run_experiment
from .linear_readout import ReadoutConfig
from .steps import TeacherConfig

__all__ = ["metatrain", "MetaTrainConfig", "TeacherConfig", "GatedSGD", "load_meta", "MetaLearner", "readout",
           "evaluate", "TwoHeadNet", "ExperimentSpec", "DataConfig", "BudgetConfig", "PoolConfig", "MetaTestConfig",
           "ReadoutConfig", "ConfigError", "load_spec", "RunOptions", "run_experiment", "__version__"]
