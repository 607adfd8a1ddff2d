"""Entry point of the meta-update op: dispatches to the fused extension or the reference.

``impl`` (argument) or ``LRMT_IMPL`` (environment) = ``reference`` | ``fused`` | ``auto``.
Until the fused extension lands (csrc/), every call goes to :mod:`lrmt_fast.reference`.
"""
from __future__ import annotations

import os

from . import reference


def resolve_impl(impl=None) -> str:
    impl = impl or os.environ.get("LRMT_IMPL", "auto")
    if impl not in ("auto", "reference", "fused"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'fused', got {impl!r}")
    return "reference" if impl == "auto" else impl


def meta_step(w, g, pre, post, h, c, theta, lr, fscale, impl=None):
    if resolve_impl(impl) == "fused":
        raise RuntimeError("the fused extension lrmt_fast._C is not built yet")
    return reference.meta_step(w, g, pre, post, h, c, theta, lr, fscale)


def meta_step_(w, g, pre, post, h, c, theta, lr, fscale, delta_out=None, impl=None):
    if resolve_impl(impl) == "fused":
        raise RuntimeError("the fused extension lrmt_fast._C is not built yet")
    return reference.meta_step_(w, g, pre, post, h, c, theta, lr, fscale, delta_out)
