"""Reading and writing the IDX files of MNIST-style datasets (torchvision's raw layout).

``write_torchvision_layout`` writes ``ROOT/<Name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
exactly as :class:`torchvision.datasets.MNIST` and ``FashionMNIST`` read them with
``download=False``. Tests use it to make small fake datasets; ``lrmt`` can also
export the shipped subset this way.
"""
from __future__ import annotations

import os
import struct

import numpy as np

_FILES = {
    (True, "images"): "train-images-idx3-ubyte",
    (True, "labels"): "train-labels-idx1-ubyte",
    (False, "images"): "t10k-images-idx3-ubyte",
    (False, "labels"): "t10k-labels-idx1-ubyte",
}


def write_idx(path: str, arr: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 0x08 = unsigned byte)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(arr.tobytes())
    os.replace(tmp, path)


def read_idx(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_torchvision_layout(root: str, name: str, train_x, train_y, test_x, test_y) -> str:
    """Write ``root/name/raw/*`` IDX files (images uint8 [N, 28, 28], labels [N]). Returns the raw dir."""
    raw = os.path.join(root, name, "raw")
    os.makedirs(raw, exist_ok=True)
    for train, x, y in ((True, train_x, train_y), (False, test_x, test_y)):
        x = np.asarray(x, dtype=np.uint8)
        y = np.asarray(y, dtype=np.uint8)
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected images [N, H, W] and labels [N], got {x.shape} and {y.shape}")
        write_idx(os.path.join(raw, _FILES[(train, "images")]), x)
        write_idx(os.path.join(raw, _FILES[(train, "labels")]), y)
    return raw
