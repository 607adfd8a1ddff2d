"""Where an experiment finds its data and Task A checkpoints (the command line's options, typed)."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Optional

# Task A checkpoints committed with the repository (experiments/results/cifar5a_pretrain_*/): used
# when the cache has none for the same pretraining config and data. Found by path, in a checkout.
REPO_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "experiments", "results")


@dataclass
class Sources:
    data_root: Optional[str] = None       # torchvision's dataset layouts (default: $LRMT_DATA)
    download: Optional[bool] = None       # False: never download (None: where the network allows)
    cifar_check: str = "auto"             # integrity check of the CIFAR files: auto | md5 | skip
    cache_dir: str = os.path.join("runs", "cifar_cache")   # CIFAR Task A checkpoints (and Exp 3's pool)
    task_a_ckpt: Optional[str] = None     # use (or write) the Task A checkpoint at this file
    pool_dir: Optional[str] = None        # Exp 3's checkpoint pool (default: under cache_dir)

    def shipped_checkpoint(self, name: str) -> Optional[str]:
        """A committed Task A checkpoint with file name ``name`` (the same config and data key)."""
        for d in sorted(glob.glob(os.path.join(REPO_RESULTS, "cifar5a_pretrain_*"))):
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
        return None
