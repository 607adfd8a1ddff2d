"""Loader of the compiled extension ``lrmt_fast._C`` and the Python half of its ops.

Importing this module never fails: :data:`AVAILABLE` tells whether the extension
loaded and :data:`ERROR` says why not. When it loaded, this module registers, for
the operators the extension defines with ``TORCH_LIBRARY`` (``torch.ops.lrmt_fast.*``):

- fake (meta) kernels (``torch.library.register_fake``), so the ops work under
  FakeTensor / torch.compile / ``torch.library.opcheck``;
- nothing else: the autograd formulas of ``meta_step`` and ``meta_step_net`` are C++
  (csrc/autograd.cpp, torch::autograd::Function s at the Autograd key); both backwards
  call ``meta_step_net_backward``.

The forward ops return two opaque buffers besides their results: ``saved`` (the
activated LSTM gates and the tanh outputs that the backward needs) and
``theta_snap`` (a copy of theta, when ``snapshot=True``, so that an optimiser may
update theta in place while graphs of earlier steps are retained for T-BPTT).
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

_C = None
ERROR: Optional[str] = None
try:  # pragma: no branch
    from . import _C  # noqa: F401  (loads the .so: runs the TORCH_LIBRARY registrations)
except Exception as exc:  # ImportError, OSError (missing / ABI-incompatible build)
    _C = None
    ERROR = f"{type(exc).__name__}: {exc}"

AVAILABLE = _C is not None

HAS_BIAS = 1
PER_NEURON_PRE = 2


def build_facts() -> dict:
    """What the compiled extension says about itself ({} when not built)."""
    if not AVAILABLE:
        return {}
    return dict(_C._build_info())


def cuda_compiled() -> bool:
    return bool(build_facts().get("cuda_compiled", False))


def workspace_stats() -> dict:
    """Workspace allocations so far (all threads) and this thread's live buffers."""
    return dict(_C._workspace_stats()) if AVAILABLE else {}


def workspace_buffers() -> list:
    """This thread's workspace buffers (one per device and dtype): a captured CUDA graph holds
    them, so that a workspace grown later does not free the memory the graph writes."""
    return list(_C._workspace_buffers()) if AVAILABLE else []


def workspace_clear() -> None:
    """Free this thread's workspaces and the CPU pool's cached blocks."""
    if AVAILABLE:
        _C._workspace_clear()
        _C._pool_clear()


def set_cpu_blas_direct(on: bool) -> bool:
    """CPU GEMMs of the ops straight to libtorch's BLAS, with the CPU-only shortcuts of the
    host code (True, the default where the BLAS is found; env LRMT_CPU_BLAS=aten turns it off),
    or the host code of the CUDA path on the CPU: GEMMs through ``at::addmm_out``, feature scale
    folded into the first-cell weights, one output GEMM (False). Returns the setting now in force."""
    return bool(_C._set_cpu_blas_direct(bool(on))) if AVAILABLE else False


def cpu_pool_stats() -> dict:
    """The CPU caching allocator of the ops' outputs (csrc/cpu_pool.h): blocks taken from the
    system, allocations served from the cache, live and cached bytes, the cache's cap."""
    return dict(_C._pool_stats()) if AVAILABLE else {}


def cpu_pool_set_limit(nbytes: int) -> None:
    """Cap the CPU pool's cache at ``nbytes`` (0 turns the pool off; env LRMT_CPU_POOL_MB)."""
    if AVAILABLE:
        _C._pool_set_limit(int(nbytes))


# --------------------------------------------------------------------------------------
# fake kernels
# --------------------------------------------------------------------------------------
def _single_p(w: Tensor) -> int:
    return w.shape[1]


def _net_dims(w, h, flags):
    out = []
    for wi, hi, f in zip(w, h, flags):
        cout = hi.shape[1]
        pw = wi.numel() // cout
        out.append((cout, pw + (1 if f & HAS_BIAS else 0)))
    return out


if AVAILABLE:

    @torch.library.register_fake("lrmt_fast::meta_step")
    def _meta_step_fake(w, g, pre, post, h, c, theta, lr, fscale, save=True, snapshot=False):
        cout, p = w.shape
        L, _, H = h.shape
        n_saved = L * cout * 4 * H + cout * p if save else 0
        n_snap = sum(t.numel() for t in theta) if snapshot else 0
        return (w.new_empty(w.shape), w.new_empty((cout, p)), h.new_empty(h.shape), c.new_empty(c.shape),
                w.new_empty((n_saved,)), w.new_empty((n_snap,)))

    @torch.library.register_fake("lrmt_fast::meta_step_")
    def _meta_step_inplace_fake(w, g, pre, post, h, c, theta, lr, fscale, delta_out=None):
        return None

    @torch.library.register_fake("lrmt_fast::meta_step_net")
    def _meta_step_net_fake(w, wb, g, gb, pre, post, h, c, theta, flags, lr, fscale=None, save=True,
                            snapshot=False):
        dims = _net_dims(w, h, flags)
        n_saved = 0
        for (cout, p), hi in zip(dims, h):
            n_saved += hi.shape[0] * cout * 4 * hi.shape[2] + cout * p
        n_snap = sum(t.numel() for t in theta) if snapshot else 0
        w0 = w[0]
        return ([wi.new_empty(wi.shape) for wi in w], [b.new_empty(b.shape) for b in wb],
                [w0.new_empty((cout, p)) for cout, p in dims], [hi.new_empty(hi.shape) for hi in h],
                [ci.new_empty(ci.shape) for ci in c], w0.new_empty((len(w), 4)),
                w0.new_empty((n_saved if save else 0,)), w0.new_empty((n_snap,)))

    @torch.library.register_fake("lrmt_fast::meta_step_net_")
    def _meta_step_net_inplace_fake(w, wb, g, gb, pre, post, h, c, theta, flags, lr, fscale, delta_out):
        return None

    @torch.library.register_fake("lrmt_fast::meta_step_net_backward")
    def _meta_step_net_backward_fake(grad_w_new, grad_wb_new, grad_delta, grad_h_new, grad_c_new, w, wb, g, gb,
                                     pre, post, h, c, theta, flags, lr, fscale, h_new, c_new, saved, theta_snap,
                                     need_w, need_hc, need_theta):
        gw = [wi.new_empty(wi.shape) for wi in w] if need_w else []
        gwb = [b.new_empty(b.shape) for b in wb] if need_w else []
        gh = [hi.new_empty(hi.shape) for hi in h] if need_hc else []
        gc = [ci.new_empty(ci.shape) for ci in c] if need_hc else []
        gth = [t.new_empty(t.shape) for t in theta] if need_theta else []
        return gw, gwb, gh, gc, gth

    @torch.library.register_fake("lrmt_fast::feature_scale_net")
    def _feature_scale_net_fake(w, wb, g, gb, pre, post, h, c, theta, flags):
        return w[0].new_empty((len(w), 4))

    if hasattr(torch.ops.lrmt_fast, "relu_max_pool2"):   # csrc/pool.cpp (CPU kernels)
        def _like(x, shape, dtype=None):
            cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            return torch.empty(shape, dtype=dtype or x.dtype, device=x.device,
                               memory_format=torch.channels_last if cl else torch.contiguous_format)

        @torch.library.register_fake("lrmt_fast::relu_max_pool2")
        def _relu_max_pool2_fake(x):
            n, c, h, w = x.shape
            return _like(x, (n, c, h // 2, w // 2)), _like(x, (n, c, h // 2, w // 2), torch.uint8)

        @torch.library.register_fake("lrmt_fast::relu_max_pool2_backward")
        def _relu_max_pool2_backward_fake(grad, out, code):
            n, c, h, w = out.shape
            return _like(out, (n, c, 2 * h, 2 * w))
