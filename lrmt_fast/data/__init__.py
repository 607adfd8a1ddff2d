"""Datasets of the experiments: data root handling, torchvision loading, the shipped
subset, in-memory tasks, the D_B1 / D_B2 split and seeded batch streams."""
from .sources import (ENV_DATA, ENV_NO_DOWNLOAD, SUBSET_FILE, DataNotFoundError, download_allowed,
                      load_subset_arrays, load_torchvision, resolve_data_root)
from .tasks import (NORM, NUM_CLASSES, BatchStream, TaskData, TwoTasks, fingerprint, fixed_subset,
                    load_task, load_two_tasks, split_even, to_float)
from .idx import read_idx, write_idx, write_torchvision_layout

__all__ = [
    "ENV_DATA", "ENV_NO_DOWNLOAD", "SUBSET_FILE", "DataNotFoundError", "download_allowed",
    "load_subset_arrays", "load_torchvision", "resolve_data_root", "NORM", "NUM_CLASSES", "BatchStream",
    "TaskData", "TwoTasks", "fingerprint", "fixed_subset", "load_task", "load_two_tasks", "split_even",
    "to_float", "read_idx", "write_idx", "write_torchvision_layout",
]
