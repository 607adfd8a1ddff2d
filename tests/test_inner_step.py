"""The fast inner step of meta-training (docs/performance.md, "The inner step"): LeNet evaluated
by :class:`lrmt_fast.models.lenet.LeNetFunctional` (the extension's ReLU + max-pool kernel,
channels-last convolutions, no functional_call) computes what the module's own code computes.

- ``relu_max_pool2`` = ``F.max_pool2d(F.relu(x), 2)``, values and input gradient element for
  element, on tensors full of ties (at zero and above), signed zeros and NaNs, in both layouts;
- the fast evaluator's representation, logits, activation means and gradients equal the
  module's up to rounding;
- 20 inner steps of Algorithm 1 as it runs now (fast evaluator, fused Adam, the K episodes'
  backward one at a time) give the same theta, losses and episode lengths as the step as it was
  (written out below: module code, Adam's loop, one backward of the mean), episodes that end on
  the curriculum threshold and K = 2 included, within the project's float32 tolerance rule;
- the module path (every meta-test method) is unchanged: bit for bit the old code.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lrmt_fast import ops
from lrmt_fast.capture import ActivationCapture
from lrmt_fast.meta_learner import MetaLearner
from lrmt_fast.models import LeNet
from lrmt_fast.models.lenet import LeNetFunctional, _POOL_KERNEL, relu_max_pool2
from lrmt_fast.student import ModuleFunctional, functional, grads_and_acts, param_dict

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


def _tie_tensor(shape, seed, dtype=F32, nan=0.0, negzero=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).to(dtype)   # few distinct values: ties everywhere
    if nan:
        x[torch.rand(shape, generator=g) < nan] = float("nan")
    if negzero:
        x[torch.rand(shape, generator=g) < negzero] = -0.0
    return x


def _pool_pair(x):
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = F.max_pool2d(F.relu(a), 2), relu_max_pool2(b)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    ya.backward(g)
    yb.backward(g)
    return ya, yb, a.grad, b.grad


def test_pool_kernel_is_used_when_the_extension_is_built():
    assert _POOL_KERNEL[0] == (ops.available("cpu") and hasattr(torch.ops.lrmt_fast, "relu_max_pool2"))
    if _POOL_KERNEL[0]:
        from lrmt_fast.models.lenet import _ReluMaxPool2
        y = relu_max_pool2(torch.randn(2, 3, 4, 4, requires_grad=True))
        assert type(y.grad_fn).__name__ == _ReluMaxPool2.__name__ + "Backward"


# (N, C, H, W): W/2 >= 8 and C >= 8 run the AVX2 blocks (with an overlapping last block), the
# others the scalar rows; LeNet's own shapes last
@pytest.mark.parametrize("shape", [(2, 9, 4, 36), (3, 11, 6, 18), (2, 3, 6, 8), (1, 16, 2, 16), (4, 20, 24, 24),
                                   (4, 50, 8, 8)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_relu_max_pool2_equals_aten(shape, layout, dtype):
    for seed, (nan, negzero) in enumerate([(0, 0), (0.1, 0), (0, 0.2), (0.05, 0.1)]):
        x = _tie_tensor(shape, seed, dtype, nan, negzero)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        ya, yb, ga, gb = _pool_pair(x)
        assert torch.equal(ya.isnan(), yb.isnan())
        assert torch.equal(ya.nan_to_num(), yb.nan_to_num())
        assert torch.equal(ga.isnan(), gb.isnan()) and torch.equal(ga.nan_to_num(), gb.nan_to_num())
        if layout == "channels_last":
            assert gb.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(shape, dtype=dtype)  # and continuous values
    ya, yb, ga, gb = _pool_pair(x)
    assert torch.equal(ya, yb) and torch.equal(ga, gb)


@pytest.mark.skipif(not _POOL_KERNEL[0], reason="fused extension not built")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pool_ops_schema_and_fake_kernels(layout):
    x = torch.randn(2, 9, 4, 18)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out, code = torch.ops.lrmt_fast.relu_max_pool2(x)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.lrmt_fast.relu_max_pool2.default, (x,), test_utils=tests)
    torch.library.opcheck(torch.ops.lrmt_fast.relu_max_pool2_backward.default, (torch.randn_like(out), out, code),
                          test_utils=tests)
    with pytest.raises(RuntimeError, match="H and W must be even"):
        torch.ops.lrmt_fast.relu_max_pool2(torch.randn(1, 2, 3, 4))


def test_relu_max_pool2_odd_sizes_and_views_use_the_plain_ops():
    x = torch.randn(2, 3, 5, 7)
    assert torch.equal(relu_max_pool2(x), F.max_pool2d(F.relu(x), 2))
    v = torch.randn(2, 3, 8, 10)[:, :, :, 1:9]     # not contiguous in either layout
    assert torch.equal(relu_max_pool2(v), F.max_pool2d(F.relu(v), 2))


def _mnist_like(n, seed, dtype=F32):
    """Images with a blank border and blank pixels (ties in both pools, as MNIST has)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x[:, :, :5], x[:, :, -5:], x[..., :5], x[..., -5:] = 0, 0, 0, 0
    x = torch.where(x < 0.4, torch.zeros_like(x), x).to(dtype)
    return x, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_lenet_functional_matches_the_module(dtype):
    torch.manual_seed(0)
    model = LeNet().to(dtype)
    p = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    x, y = _mnist_like(16, 1, dtype)
    fast, mod = functional(model), functional(model, fast=False)
    assert isinstance(fast, LeNetFunctional) and isinstance(mod, ModuleFunctional)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.features(p, x), mod.features(p, x), **tol)
    for head in ("a", "b"):
        torch.testing.assert_close(fast.logits(p, x, head), mod.logits(p, x, head), **tol)
    mods = ["conv1", "conv2", "fc1"]
    (lf, af), (lm, am) = fast.logits_and_acts(p, x, "b", mods), mod.logits_and_acts(p, x, "b", mods)
    torch.testing.assert_close(lf, lm, **tol)
    assert sorted(af) == sorted(am) == mods
    for m in mods:
        for u, v in zip(af[m], am[m]):
            assert not u.requires_grad
            torch.testing.assert_close(u, v, **tol)
    gf = torch.autograd.grad(F.cross_entropy(lf, y) + fast.features(p, x).square().mean(), list(p.values()),
                             allow_unused=True)
    gm = torch.autograd.grad(F.cross_entropy(lm, y) + mod.features(p, x).square().mean(), list(p.values()),
                             allow_unused=True)
    for k, u, v in zip(p, gf, gm):
        if v is None:
            assert u is None, k
        else:
            torch.testing.assert_close(u, v, **tol, msg=k)
    with pytest.raises(KeyError, match="no module named"):
        fast.logits_and_acts(p, x, "b", ["conv3"])


def test_subclass_that_changes_the_network_gets_the_module_path():
    class Other(LeNet):
        def features(self, x):
            return super().features(x) * 2

    assert isinstance(functional(Other()), ModuleFunctional)
    assert isinstance(functional(LeNet()), LeNetFunctional)


def test_module_path_is_the_old_code_bit_for_bit():
    """grads_and_acts without an evaluator (what every meta-test method runs) is the code it was:
    functional_call with the module's hooks."""
    torch.manual_seed(0)
    model = LeNet()
    params = param_dict(model)
    x, y = _mnist_like(8, 3)
    mods = ["conv1", "conv2", "fc1"]
    loss, grads, acts = grads_and_acts(model, params, x, y, "b", mods)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with ActivationCapture(model, mods) as a2:    # the old code, written out
        l2 = F.cross_entropy(functional_call(model, leaves, (x, "b")), y)
    g2 = torch.autograd.grad(l2, list(leaves.values()), allow_unused=True)
    assert torch.equal(loss, l2.detach())
    for (k, g), h in zip(grads.items(), g2):
        assert torch.equal(g, h if h is not None else torch.zeros_like(leaves[k])), k
    for m in mods:
        assert all(torch.equal(u, v) for u, v in zip(acts[m], a2[m]))


# ------------------------------------------------------------------------------------------
# 20 inner steps: the new step == the step as it was
# ------------------------------------------------------------------------------------------
def _old_metatrain(model, stream, cfg, build):
    """Algorithm 1 as lrmt_fast.meta_training ran it before the fast inner step, written out: the
    networks through their module code (the steps' functions without an evaluator), the K
    episodes' mean meta-loss backward at the end of the step, Adam's per-tensor loop."""
    import math

    from lrmt_fast.meta_training import _episode_gen, grads_finite, make_teacher, schedule
    from lrmt_fast.steps import meta_loss, student_meta_update

    torch.manual_seed(cfg.seed)
    meta = build(model, cfg.hidden, cfg.hidden_gn)
    opt = torch.optim.Adam(meta.parameters(), lr=cfg.meta_lr, foreach=False)
    teacher_rule = make_teacher(cfg.teacher, model, meta)
    k_eps, pnames, history = cfg.episodes_per_step, [k for k, _ in model.named_parameters()], []
    for ep_i in range(cfg.episodes):
        threshold, bptt = schedule(cfg, ep_i)
        slots = []
        for j in range(k_eps):
            ep = stream.new_episode(ep_i, _episode_gen(cfg, j, ep_i))
            slots.append({"ep": ep, "teacher": {k: ep.w0[k].clone() for k in pnames},
                          "student": {k: ep.w0[k].clone() for k in pnames}, "state": meta.init_state()})
        s, total, n, last, broke = 0, 0.0, 0, float("nan"), False
        for _t in range(cfg.max_steps):
            losses = []
            for sl in slots:
                xa, ya = sl["ep"].next_a()
                xb, yb = sl["ep"].next_b()
                sl["teacher"], _ = teacher_rule.step(sl["teacher"], xa, ya, xb, yb, cfg.lr)
                sl["student"], sl["state"], _, _ = student_meta_update(
                    model, meta, sl["student"], sl["state"], xb, yb, cfg.lr, impl=cfg.impl, train=True)
                losses.append(meta_loss(model, sl["teacher"], sl["student"], torch.cat([xa, xb]), cfg.loss_coef,
                                        cfg.huber_delta))
            loss = losses[0] if k_eps == 1 else torch.stack(losses).mean()
            each = [float(l.detach()) for l in losses]
            opt.zero_grad(set_to_none=True)
            loss.backward(retain_graph=True)
            if not grads_finite(meta):
                broke = True
                break
            opt.step()
            s += 1
            last = sum(each) / k_eps
            total += last
            n += 1
            if not all(v <= threshold for v in each) or any(math.isnan(v) for v in each):
                broke = True
                break
            if s >= bptt:
                for sl in slots:
                    sl["student"] = {k: v.detach() for k, v in sl["student"].items()}
                    sl["state"] = meta.detach_state(sl["state"])
                s = 0
        history.append({"steps": n, "mean_loss": total / max(n, 1), "last_loss": last, "restarted": broke})
    return meta, history


def _metatrain(new: bool, dtype, threshold: float, k_eps: int = 1):
    """4 episodes of at most 5 inner steps (20 steps when none ends early), T-BPTT window 3,
    LeNet with the paper's batches (64 + 64), a fresh head_b per episode; theta drawn in float32
    and cast, the loop in ``dtype``. ``new``: lrmt_fast.meta_training.metatrain as it is now (the
    fast inner step); else :func:`_old_metatrain`. Returns (theta, history)."""
    import lrmt_fast.meta_training as mt
    from lrmt_fast.meta_training import FreshHeadStream, MetaTrainConfig, metatrain
    torch.manual_seed(0)
    model = LeNet().to(dtype)
    xa, ya = _mnist_like(256, 1, dtype)
    xb, yb = _mnist_like(256, 2, dtype)
    xb = xb.flip(-1)   # another task
    stream = FreshHeadStream(param_dict(model), xa, ya, xb, yb, 64, 64)
    orig_init, orig_build = MetaLearner.init_state, mt.build_meta_learner

    def build32(model, hidden=32, hidden_gn=32):
        old = torch.get_default_dtype()
        torch.set_default_dtype(F32)
        try:
            return orig_build(model, hidden, hidden_gn).to(dtype)
        finally:
            torch.set_default_dtype(old)

    mt.build_meta_learner = build32
    MetaLearner.init_state = lambda self, device=None, dt=None: orig_init(self, device, dt or dtype)
    try:
        cfg = MetaTrainConfig(episodes=4, max_steps=5, hidden=16, hidden_gn=16, bptt_start=3, bptt_max=3,
                              thresh_start=threshold, thresh_max=threshold, checkpoint_every=100,
                              episodes_per_step=k_eps)
        if new:
            meta, hist = metatrain(model, stream, cfg, progress=False)
        else:
            meta, hist = _old_metatrain(model, stream, cfg, build32)
    finally:
        mt.build_meta_learner, MetaLearner.init_state = orig_build, orig_init
    return {n: p.detach().clone() for n, p in meta.named_parameters()}, hist


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("threshold,k_eps", [(1e9, 1), (None, 1), (1e9, 2)])
def test_twenty_inner_steps_new_equal_old(threshold, k_eps):
    if threshold is None:  # a threshold the episodes cross: lengths decided by the losses
        _, h = _metatrain(False, F64, 1e9)
        losses = sorted(x["mean_loss"] for x in h)
        threshold = (losses[0] + losses[1]) / 2
    old64, ho64 = _metatrain(False, F64, threshold, k_eps)
    new64, hn64 = _metatrain(True, F64, threshold, k_eps)
    old32, ho32 = _metatrain(False, F32, threshold, k_eps)
    new32, hn32 = _metatrain(True, F32, threshold, k_eps)
    steps = [x["steps"] for x in ho64]
    assert (sum(steps) >= 8 and steps != [5, 5, 5, 5]) if threshold < 1e9 else steps == [5, 5, 5, 5]
    for h in (hn64, ho32, hn32):
        assert [x["steps"] for x in h] == steps
        assert [x["restarted"] for x in h] == [x["restarted"] for x in ho64]
    for a, b in zip(hn64, ho64):    # float64: the same computation up to rounding
        assert a["mean_loss"] == pytest.approx(b["mean_loss"], rel=1e-9, abs=1e-12)
    for a, r, b in zip(hn32, ho32, ho64):   # float32: the tolerance rule against float64
        for key in ("mean_loss", "last_loss"):
            e_n, e_o = abs(a[key] - b[key]), abs(r[key] - b[key])
            assert e_n <= 2 * e_o + 1e-5 * abs(b[key]) + 1e-7, (key, a[key], r[key], b[key])
    for k in old64:
        # float64: Adam turns rounding-level differences of near-zero meta-gradients into small
        # differences of theta; float32: the new step's error against the float64 old step is
        # within twice the old step's own float32 error (the rule of tests/test_fused_ops.py)
        torch.testing.assert_close(new64[k], old64[k], rtol=1e-6, atol=1e-6, msg=k)
        e_n, e_o = _err(new32[k], old64[k]), _err(old32[k], old64[k])
        floor = 2 * EPS32 * (1 + old64[k].abs().max().item())
        assert e_n <= 2 * e_o + floor, f"{k}: new32 error {e_n:.2e} > 2 x old32 error {e_o:.2e}"
