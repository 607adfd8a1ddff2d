"""Where the datasets come from: a data root read through torchvision, or the small
subset shipped inside the package (``lrmt_fast/assets``).

The data root is ``--data-root`` on the command line, else the environment
variable ``LRMT_DATA``. Under it the standard torchvision layouts are expected
(``MNIST/raw/...``, ``FashionMNIST/raw/...``); where the network allows,
torchvision downloads missing files (pass ``download=False`` / ``--no-download``
or set ``LRMT_NO_DOWNLOAD=1`` to forbid it).
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Optional, Tuple

import numpy as np
import torch

ENV_DATA = "LRMT_DATA"
ENV_NO_DOWNLOAD = "LRMT_NO_DOWNLOAD"
ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SUBSET_FILE = os.path.join(ASSET_DIR, "mnist_fashion_subset.npz")
UNPACK_HINT = "on the project's machines: python ../shared/data/unpack.py DIR"

# torchvision class name -> (folder, nice name)
TORCHVISION_SETS = {
    "mnist": ("MNIST", "MNIST"),
    "fashion": ("FashionMNIST", "FashionMNIST"),
}


class DataNotFoundError(RuntimeError):
    """The requested dataset is not where it was looked for (message says where and how to fix)."""


def resolve_data_root(data_root: Optional[str] = None) -> str:
    """``data_root`` if given, else ``$LRMT_DATA``; a clear error naming both if neither is set."""
    root = data_root or os.environ.get(ENV_DATA)
    if not root:
        raise DataNotFoundError(
            f"no data root: pass --data-root DIR or set the environment variable {ENV_DATA}=DIR "
            f"(a folder with torchvision's MNIST/ and FashionMNIST/ layouts; {UNPACK_HINT})")
    return os.path.abspath(os.path.expanduser(root))


def download_allowed(download: Optional[bool] = None) -> bool:
    if download is not None:
        return bool(download)
    return os.environ.get(ENV_NO_DOWNLOAD, "") in ("", "0", "false", "False")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _raw_files_present(raw: str, cls) -> dict:
    """{raw file name: present?} for the (uncompressed) files torchvision's MNIST-style class reads."""
    names = [os.path.splitext(os.path.basename(url))[0] for url, _md5 in getattr(cls, "resources", [])]
    return {n: os.path.isfile(os.path.join(raw, n)) for n in names}


def load_torchvision(name: str, root: str, train: bool, download: Optional[bool] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of MNIST (``name='mnist'``) or
    FashionMNIST (``'fashion'``) from ``root`` in torchvision's layout."""
    from torchvision import datasets    # only when a dataset is read: torchvision's import is slow

    if name not in TORCHVISION_SETS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(TORCHVISION_SETS)}")
    folder, cls_name = TORCHVISION_SETS[name]
    cls = getattr(datasets, cls_name)
    split = "train" if train else "test"
    raw = os.path.join(root, folder, "raw")
    try:
        ds = cls(root, train=train, download=False)
    except (RuntimeError, ValueError, AssertionError, OSError, EOFError) as first:
        present = _raw_files_present(raw, cls)
        missing = [f for f, ok in present.items() if not ok]
        if present and not missing:  # every file is there: torchvision could not read one of them
            raise DataNotFoundError(
                f"{cls_name} ({split}) under {raw} is corrupt or unreadable ({_first_line(first)}); restore the "
                f"files ({UNPACK_HINT})") from None
        if not download_allowed(download):
            what = f"missing {', '.join(missing)}" if missing else "not found"
            raise DataNotFoundError(
                f"{cls_name} ({split}) {what} under {raw}; downloads are "
                f"off. Point --data-root or {ENV_DATA} at a folder that holds it ({UNPACK_HINT})") from None
        try:
            with _socket_timeout(30):
                ds = cls(root, train=train, download=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DataNotFoundError(
                f"{cls_name} ({split}) not found under {os.path.join(root, folder, 'raw')} and the download "
                f"failed ({reason}). Point --data-root or {ENV_DATA} at a folder that holds it "
                f"({UNPACK_HINT})") from None
    try:
        x = ds.data
        y = ds.targets
    except (RuntimeError, ValueError, OSError) as e:
        raise DataNotFoundError(f"{cls_name} ({split}) under {raw} is corrupt or unreadable ({_first_line(e)}); "
                                f"restore the files ({UNPACK_HINT})") from None
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(np.asarray(y))
    return x.to(torch.uint8), y.to(torch.int64)


def load_subset_arrays(path: str = SUBSET_FILE) -> dict:
    """The shipped subset: {'mnist_train_x', 'mnist_train_y', 'mnist_test_x', ..., 'fashion_test_y'}."""
    if not os.path.exists(path):
        raise DataNotFoundError(f"the shipped data subset {path} is missing; regenerate it with "
                                f"python experiments/make_demo_subset.py (needs the real data)")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise DataNotFoundError(f"the shipped data subset {path} is unreadable ({type(e).__name__}: {e})") from None


def load_subset(name: str, train: bool, path: str = SUBSET_FILE) -> Tuple[torch.Tensor, torch.Tensor]:
    arr = load_subset_arrays(path)
    split = "train" if train else "test"
    return (torch.from_numpy(np.array(arr[f"{name}_{split}_x"], dtype=np.uint8)),
            torch.from_numpy(np.array(arr[f"{name}_{split}_y"], dtype=np.int64)))
