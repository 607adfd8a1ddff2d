"""pytest-benchmark of one meta-test step of "ours" on the CIFAR student, with and without the
gate trace: ``pytest benchmarks/test_meta_test_step.py --benchmark-only``.

One call = :meth:`lrmt_fast.baselines.OursLearner.step` on ResNet-32 GN (Task B head, H = 64 for
the convolutions and 32 for GroupNorm, as the CIFAR profiles), a batch of 64 CIFAR-shaped
images: the student's forward and backward, the fused meta-update in place, and with
``trace`` the per-step statistics of lrmt_fast/gate_trace.py (kept on the device). Both
variants run in the same session from the same seed (group ``ours_step-<device>``), so their
ratio is the trace's overhead; ``extra_info`` holds the peak memory of one warm step above
what is held before it (:func:`lrmt_fast.bench.measure.peak_memory`, as the op's cases).
"""
from types import SimpleNamespace

import pytest
import torch

from lrmt_fast.bench.measure import device_name, git_commit, now, peak_memory
from lrmt_fast import ops
from lrmt_fast.baselines import OursLearner
from lrmt_fast.meta_training import build_meta_learner
from lrmt_fast.models import resnet32_gn
from lrmt_fast.student import fresh_head_b
from lrmt_fast.student import param_dict

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
BATCH = 64


def _learner(device, trace):
    torch.manual_seed(0)
    model = resnet32_gn(num_classes_a=5, num_classes_b=5).to(device)
    meta = build_meta_learner(model, 64, 32).to(device)
    params = fresh_head_b(param_dict(model), torch.Generator().manual_seed(1))
    params = {k: v.detach().to(device).clone() for k, v in params.items()}
    learner = OursLearner(model, params, meta, 0.1, impl="fused", trace=trace)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 5, (BATCH,), generator=g).to(device)
    return learner, x, y


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trace", [False, True], ids=["plain", "trace"])
def test_ours_meta_test_step(benchmark, device, trace):
    if not ops.available(device):
        pytest.skip(f"fused extension unavailable on {device}")
    learner, x, y = _learner(device, trace)
    step = lambda: (learner.step(x, y), _sync(device))
    mem = peak_memory(SimpleNamespace(fn=step, sync=lambda: _sync(device), device=device))   # also warms up
    benchmark.group = f"ours_step-{device}"
    benchmark.extra_info.update({"device": device_name(device), "trace": trace, "batch": BATCH,
                                 "num_threads": torch.get_num_threads(), "commit": git_commit(), "date": now(), **mem})
    benchmark.pedantic(step, rounds=5 if device == "cpu" else 30, iterations=1, warmup_rounds=1)
    if trace:                                                # the trace recorded every step it was asked to
        assert len(learner.trace.to_dict()["groups"]["all"]["descent_ratio"]) == learner.steps_done
