"""Atomic checkpoint files and clear errors for missing or corrupt ones.

A checkpoint is written to ``<path>.tmp`` and moved into place with
:func:`os.replace`, so a crash while writing never leaves a half-written file
where a good one was.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not what was expected."""


def atomic_save(obj, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, required: Iterable[str] = (), what: str = "checkpoint",
                    map_location="cpu") -> dict:
    """Load a dict checkpoint; raise :class:`CheckpointError` naming the file and the fault."""
    if not os.path.exists(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"{what} {path} is corrupt or not a torch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              f"delete it to start again") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, expected a dict")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"{what} {path} lacks the keys {missing}; it was not written by lrmt_fast "
                              f"or is from an incompatible version")
    return obj


def atomic_write_json(path: str, obj, indent=1) -> None:
    """``obj`` as JSON at ``path``, written to a temporary file first and moved into place."""
    import json
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
