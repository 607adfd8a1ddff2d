"""Regenerate ``lrmt_fast/assets/mnist_fashion_subset.npz``: the small real subset of MNIST
and FashionMNIST shipped inside the package for ``lrmt demo`` (and for tests).

    python experiments/make_demo_subset.py --data-root data      # after ../shared/data/unpack.py data

A fixed, seeded, class-balanced draw: ``--train`` images per dataset from the
training set and ``--test`` from the test set, kept as uint8 in a compressed npz.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lrmt_fast.data.sources import SUBSET_FILE, load_torchvision, resolve_data_root  # noqa: E402


def balanced_draw(y: torch.Tensor, n: int, seed: int) -> np.ndarray:
    """``n`` indices with (nearly) equal counts per class, fixed by ``seed``, in ascending order."""
    g = torch.Generator().manual_seed(seed)
    classes = sorted(int(c) for c in torch.unique(y))
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    out = []
    for c, k in zip(classes, per):
        idx = torch.nonzero(y == c).flatten()
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    return torch.cat(out).sort().values.numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="torchvision data root (else $LRMT_DATA)")
    ap.add_argument("--train", type=int, default=4000, help="training images per dataset")
    ap.add_argument("--test", type=int, default=1000, help="test images per dataset")
    ap.add_argument("--seed", type=int, default=20200101)
    ap.add_argument("--out", default=SUBSET_FILE)
    a = ap.parse_args(argv)
    root = resolve_data_root(a.data_root)
    arrays = {}
    for k, name in enumerate(("mnist", "fashion")):
        for train, n in ((True, a.train), (False, a.test)):
            x, y = load_torchvision(name, root, train, download=False)
            idx = balanced_draw(y, n, a.seed + 10 * k + int(train))
            split = "train" if train else "test"
            arrays[f"{name}_{split}_x"] = x.numpy()[idx].astype(np.uint8)
            arrays[f"{name}_{split}_y"] = y.numpy()[idx].astype(np.uint8)
            arrays[f"{name}_{split}_index"] = idx.astype(np.int32)   # where each image came from
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, a.out)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.2f} MB): "
          + ", ".join(f"{k} {v.shape[0]}" for k, v in arrays.items() if k.endswith("_x")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
