"""LeNet [20, 50, 500, 10] of the paper's MNIST -> FashionMNIST experiment.

:class:`LeNetFunctional` evaluates the same network on a parameter dict for meta-training's
inner step (:func:`lrmt_fast.student.functional`): the same function, computed faster on a CPU
(:func:`relu_max_pool2`, a channels-last second convolution, no module swapping and no hooks);
its float32 results differ from the module's by rounding only (the convolution's summation
order). The module itself (every method's meta-test, pretraining) is unchanged.
"""
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class LeNet(nn.Module):
    """conv5x5(20) - pool - conv5x5(50) - pool - fc(500) = representation - heads (10 each)."""

    def __init__(self, num_classes_a: int = 10, num_classes_b: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.head_a = nn.Linear(500, num_classes_a)
        self.head_b = nn.Linear(500, num_classes_b)
        self.rep_dim = 500

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor, head: str = "a") -> torch.Tensor:
        z = self.features(x)
        return self.head_a(z) if head == "a" else self.head_b(z)

    def fast_functional(self) -> Optional["LeNetFunctional"]:
        """The inner step's evaluator of this network (None for a subclass that changes it)."""
        cls = type(self)
        if cls.features is not LeNet.features or cls.forward is not LeNet.forward:
            return None
        return LeNetFunctional()


# --------------------------------------------------------------------------------------
# ReLU + 2x2 max-pool, exact and fast
# --------------------------------------------------------------------------------------
class _ReluMaxPool2(torch.autograd.Function):
    """``F.max_pool2d(F.relu(x), 2)`` for even H and W, by the extension's CPU kernel
    (``torch.ops.lrmt_fast.relu_max_pool2``, csrc/pool.cpp).

    ATen's CPU ``max_pool2d_with_indices`` for NCHW handles one window at a time and writes
    int64 indices (6.9 ms for LeNet's [128, 20, 24, 24] at one thread, ~10x one pass over the
    data); the kernel makes one pass, writes the pooled value and a one-byte winner code per
    window, and its backward writes each input-gradient element once.

    Why it is the same function with the same gradient:

    - Values: ReLU is monotone, so max(relu(a), ...) = relu(max(a, ...)); the kernel pools
      first and applies ReLU to the window's maximum (NaN stays NaN, as in both ATen ops).
    - The winner is max_pool2d's: its kernel scans the window row by row and takes a value
      when ``val > maxval || isnan(val)``, i.e. the first maximum, or the last NaN. The
      kernel applies that rule in two stages: within each row the later element wins iff it
      is greater or NaN; then row 1's winner wins iff it is greater than row 0's or NaN. (A
      maximum in row 0 is >= every value of row 1, so row 0 keeps it: the first maximum in
      scan order; a NaN in row 1 makes row 1 win: the last NaN.)
    - The gradient: max_pool2d(relu(x)) sends g to its winner and ReLU's backward keeps it
      unless the ReLU output there is <= 0 (``threshold_backward``). The kernel sends g to
      the same winner and keeps it unless relu(window maximum) <= 0, the same number. Ties at
      a positive maximum (MNIST's blank background gives them: equal conv outputs over zero
      patches) go to the first element in both; where the maximum is <= 0 (ties at ReLU's
      zero included) the whole window's gradient is zero in both, since max_pool2d(relu(.))
      routes g to an element whose ReLU output is 0 and ReLU's backward drops it there. So the
      input gradients are equal element for element (tests/test_inner_step.py checks this on
      tensors full of ties, zeros and NaNs, NCHW and channels-last).
    """

    @staticmethod
    def forward(ctx, x):
        out, code = torch.ops.lrmt_fast.relu_max_pool2(x)
        ctx.save_for_backward(out, code)
        return out

    @staticmethod
    def backward(ctx, g):
        out, code = ctx.saved_tensors
        return torch.ops.lrmt_fast.relu_max_pool2_backward(g, out, code)


def _pool_kernel_available() -> bool:
    from .. import _ext
    return _ext.AVAILABLE and hasattr(torch.ops.lrmt_fast, "relu_max_pool2")


def relu_max_pool2(x: Tensor) -> Tensor:
    """``F.max_pool2d(F.relu(x), 2)``: the same values and gradient, by the extension's CPU
    kernel (:class:`_ReluMaxPool2`) for an even-sized, NCHW- or channels-last-contiguous CPU
    tensor; the plain ops otherwise (a GPU, an odd size, no extension)."""
    if (x.device.type == "cpu" and x.dim() == 4 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            and x.dtype in (torch.float32, torch.float64) and _POOL_KERNEL[0]
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))):
        return _ReluMaxPool2.apply(x)
    return F.max_pool2d(F.relu(x), 2)


_POOL_KERNEL = [False]
try:
    _POOL_KERNEL[0] = _pool_kernel_available()
except Exception:  # pragma: no cover - a broken extension: the plain ops
    _POOL_KERNEL[0] = False


def _channels_last_weight(w: Tensor) -> Tensor:
    """``w`` [Cout, Cin, kH, kW] as a channels-last view. With Cin = 1 (conv1 on MNIST) both
    layouts are the same memory and ``.contiguous(memory_format=channels_last)`` keeps the
    NCHW strides; this view has the NHWC ones, so the convolution (oneDNN) produces an NHWC
    output directly: 1.6 against 2.3 ms forward, 1.8 against 2.0 ms weight gradient for a batch
    of 128 at one thread, and the pooled output is NHWC for conv2 without a copy."""
    if w.dim() != 4 or w.shape[1] != 1:
        return w.contiguous(memory_format=torch.channels_last)
    co, _, kh, kw = w.shape
    return w.reshape(co, kh, kw, 1).permute(0, 3, 1, 2)


def _channel_mean(t: Tensor) -> Tensor:
    dims = [d for d in range(t.dim()) if d != 1]
    return t.detach().mean(dim=dims)


class LeNetFunctional:
    """:class:`LeNet` on a parameter dict, for meta-training's inner step
    (:func:`lrmt_fast.student.functional`): ``features``, ``logits`` and ``logits_and_acts``
    as :mod:`lrmt_fast.student` computes them through ``functional_call``, with the same
    activation means as :class:`lrmt_fast.capture.ActivationCapture` (per channel, of each
    adapted layer's input and raw output).

    What differs is how, not what: :func:`relu_max_pool2` instead of ATen's pooling; both
    convolutions in channels-last layout (oneDNN's NHWC kernels; for conv2 5.7 against 8.6 ms
    forward, 13.9 against 19.3 ms backward for a batch of 128 at one thread), conv1 through a
    channels-last view of its weight (:func:`_channels_last_weight`); plain
    ``F.conv2d`` / ``F.linear`` calls on the dict's tensors (no module swapping per call, no
    hooks). Results equal the module's up to float32 rounding (summation order).
    """

    adapted = ("conv1", "conv2", "fc1")

    def features(self, p: Dict[str, Tensor], x: Tensor, acts: Optional[Dict] = None,
                 capture: Iterable[str] = ()) -> Tensor:
        z = F.conv2d(x, _channels_last_weight(p["conv1.weight"]), p.get("conv1.bias"))
        if "conv1" in capture:
            acts["conv1"] = (_channel_mean(x), _channel_mean(z))
        h = relu_max_pool2(z).contiguous(memory_format=torch.channels_last)   # a no-op when z is NHWC
        z = F.conv2d(h, p["conv2.weight"], p.get("conv2.bias"))
        if "conv2" in capture:
            acts["conv2"] = (_channel_mean(h), _channel_mean(z))
        h = relu_max_pool2(z).flatten(1)
        z = F.linear(h, p["fc1.weight"], p.get("fc1.bias"))
        if "fc1" in capture:
            acts["fc1"] = (_channel_mean(h), _channel_mean(z))
        return torch.relu(z)

    @staticmethod
    def head(p: Dict[str, Tensor], head: str, z: Tensor) -> Tensor:
        return F.linear(z, p[f"head_{head}.weight"], p.get(f"head_{head}.bias"))

    def logits(self, p: Dict[str, Tensor], x: Tensor, head: str) -> Tensor:
        return self.head(p, "a" if head == "a" else "b", self.features(p, x))

    def logits_and_acts(self, p: Dict[str, Tensor], x: Tensor, head: str,
                        modules: Iterable[str]) -> Tuple[Tensor, Dict[str, Tuple[Tensor, Tensor]]]:
        mods = set(modules)
        unknown = sorted(mods - set(self.adapted))
        if unknown:
            raise KeyError(f"ActivationCapture: no module named {unknown} in LeNet")
        acts: Dict[str, Tuple[Tensor, Tensor]] = {}
        out = self.head(p, "a" if head == "a" else "b", self.features(p, x, acts, mods))
        return out, acts
