"""The readout measure (lrmt_fast.linear_readout), the meta-test baselines (lrmt_fast.baselines) and
the meta-test loop (lrmt_fast.meta_test) on tiny synthetic data: no datasets needed, seconds."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrmt_fast.baselines import (GradientLearner, MethodContext, TeacherLearner, ce_b, ewc_penalty,
                                 fisher_diagonal, lwf_distillation, make_learner, trunk_keys)
from lrmt_fast.data.tasks import TaskData, TwoTasks, split_even
from lrmt_fast.meta_test import MetaTestConfig, run_meta_test
from lrmt_fast.pretrain import accuracy
from lrmt_fast.linear_readout import Readout, ReadoutConfig, ReadoutData, readout_accuracy, train_linear
from lrmt_fast.student import param_dict

from tinynet import TinyNet, tiny_data, tiny_two_tasks


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


# --------------------------------------------------------------------------- synthetic features
D = 8


def clusters(centres, n_per_class, noise=0.3, seed=0):
    """Points around ``5 * e_c`` for each centre index c (label = position in ``centres``)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for label, c in enumerate(centres):
        mu = torch.zeros(D)
        mu[c] = 5.0
        xs.append(mu + noise * torch.randn(n_per_class, D, generator=g))
        ys.append(torch.full((n_per_class,), label, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


class LinearTrunk(nn.Module):
    """features(x) = fc(x) (identity at init, no nonlinearity), two linear heads of 3 classes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.head_a = nn.Linear(D, 3)
        self.head_b = nn.Linear(D, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(D))
            self.fc.bias.zero_()

    def features(self, x):
        return self.fc(x)

    def forward(self, x, head="a"):
        z = self.features(x)
        return self.head_a(z) if head == "a" else self.head_b(z)


def make_task(name, centres, seed):
    trx, try_ = clusters(centres, 40, seed=seed)
    tex, tey = clusters(centres, 20, seed=seed + 100)
    return TaskData(name, len(centres), trx, try_, tex, tey, fp=name)


def two_tasks(a, b):
    b1, b2 = split_even(b.train_x.shape[0], 0)
    return TwoTasks(a, b, b1, b2)


def test_readout_reaches_100_on_separable_features():
    xtr, ytr = clusters([0, 1, 2, 3], 30, seed=1)
    xte, yte = clusters([0, 1, 2, 3], 30, seed=2)
    assert readout_accuracy(xtr, ytr, xte, yte, 4, steps=100, lr=0.1, seed=0) == 100.0
    # a fresh layer every time, seeded: the same seed gives the same layer
    l1, l2 = train_linear(xtr, ytr, 4, steps=5, seed=3), train_linear(xtr, ytr, 4, steps=5, seed=3)
    assert torch.equal(l1.weight, l2.weight)
    # sanity of the measure itself: labels unrelated to the features cannot be read out
    yrand = torch.randint(0, 4, yte.shape, generator=torch.Generator().manual_seed(5))
    assert readout_accuracy(xtr, ytr, xte, yrand, 4) < 50.0


def test_readout_of_a_network_task_a_task_b_and_joint():
    a = make_task("A", [0, 1, 2], seed=0)
    b = make_task("B", [3, 4, 5], seed=1)
    tasks = two_tasks(a, b)
    model = LinearTrunk()
    data = ReadoutData(tasks, ReadoutConfig(steps=100, lr=0.1))
    # Task B readouts train on D_B2 only (the meta-test half of Task B's training data)
    desc = data.describe()
    assert desc["task_b_train"] == tasks.b2_idx.numel() == 60 and desc["task_a_train"] == 120
    assert torch.equal(data.b.train_x, tasks.b2[0])
    r = Readout(model, data).evaluate(param_dict(model), seed=0, joint=True)
    assert r["task_a_readout"] == r["task_b_readout"] == 100.0
    # one layer over the 6 classes of A u B: separable, so 100% as well
    assert r["joint_readout"] == 100.0


def test_joint_readout_uses_the_union_of_classes():
    """Task B identical to Task A in feature space: each readout alone is perfect, but one layer
    over the union (B's labels shifted by 3) cannot tell A's class c from B's class c + 3, so at
    most half of the joint test set can be right."""
    a = make_task("A", [0, 1, 2], seed=0)
    b = TaskData("B", 3, a.train_x.clone(), a.train_y.clone(), a.test_x.clone(), a.test_y.clone(), fp="B")
    model = LinearTrunk()
    r = Readout(model, ReadoutData(two_tasks(a, b), ReadoutConfig())).evaluate(param_dict(model), joint=True)
    assert r["task_a_readout"] == r["task_b_readout"] == 100.0
    assert r["joint_readout"] <= 50.0
    assert r["joint_readout"] > 30.0      # still far above the 1/6 chance of 6 classes


def test_task_a_original_is_the_heads_own_accuracy_and_readouts_track_the_trunk():
    a = make_task("A", [0, 1, 2], seed=0)
    b = make_task("B", [3, 4, 5], seed=1)
    model = LinearTrunk()
    with torch.no_grad():                       # a head that calls class 2 "class 0": 2/3 right
        model.head_a.weight.zero_()
        model.head_a.bias.zero_()
        model.head_a.weight[0, 0] = model.head_a.weight[0, 2] = 1.0
        model.head_a.weight[1, 1] = 1.0
    readout = Readout(model, ReadoutData(two_tasks(a, b), ReadoutConfig()))
    p = param_dict(model)
    r = readout.evaluate(p)
    head_acc = accuracy(model, a.test_x, a.test_y, "a")
    manual = 100.0 * float((model(a.test_x, "a").argmax(1) == a.test_y).float().mean())
    assert r["task_a_original"] == pytest.approx(head_acc, abs=1e-4) == pytest.approx(manual, abs=1e-4)
    assert 60.0 < r["task_a_original"] < 70.0
    assert r["task_a_readout"] == 100.0          # the readout trains a fresh layer: the head does not matter
    assert r["task_b_head"] == pytest.approx(accuracy(model, b.test_x, b.test_y, "b"), abs=1e-4)

    # a new head_a on the same trunk: task_a_original follows the head (it is never cached)
    p2 = dict(p)
    p2["head_a.weight"] = torch.eye(3, D) * 5.0
    p2["head_a.bias"] = torch.zeros(3)
    r2 = readout.evaluate(p2)
    assert r2["task_a_original"] == 100.0 and r2["task_a_readout"] == r["task_a_readout"]

    # a trunk that forgets Task A's dimensions: Task A readout drops to about chance, Task B intact
    p3 = dict(p)
    w = torch.eye(D)
    w[:3] = 0.0
    p3["fc.weight"] = w
    r3 = readout.evaluate(p3)
    assert r3["task_a_readout"] < 50.0 and r3["task_b_readout"] == 100.0


# --------------------------------------------------------------------------- baselines on TinyNet
LR = 0.05


@pytest.fixture
def setup64():
    """TinyNet in float64 (exact comparisons), its Task A weights w0 and a Task B batch."""
    torch.manual_seed(0)
    model = TinyNet().double()
    xa, ya, xb, yb = tiny_data(n=32, dtype=torch.float64)
    w0 = param_dict(model)
    ctx = MethodContext(model, w0, LR, xa, ya, fisher_samples=32)
    return model, w0, ctx, (xa, ya, xb, yb)


def _manual_fisher(model, params, x, gen):
    """The definition, example by example: E_x E_{y~p(y|x)} (d log p(y|x) / dw)^2 over the trunk."""
    model.load_state_dict(params)
    with torch.no_grad():
        probs = F.softmax(model(x, "a"), dim=1)
    y = torch.multinomial(probs, 1, generator=gen).flatten()
    keys = trunk_keys(params)
    acc = {k: torch.zeros_like(params[k]) for k in keys}
    named = dict(model.named_parameters())
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1], "a"), y[i:i + 1]).backward()
        for k in keys:
            acc[k] += named[k].grad ** 2
    return {k: v / x.shape[0] for k, v in acc.items()}


def test_fisher_diagonal_matches_the_definition(setup64):
    model, w0, _, (xa, _, _, _) = setup64
    fisher = fisher_diagonal(model, w0, xa[:20], gen=torch.Generator().manual_seed(7))
    manual = _manual_fisher(model, w0, xa[:20], torch.Generator().manual_seed(7))
    assert sorted(fisher) == sorted(trunk_keys(w0))
    for k in fisher:
        torch.testing.assert_close(fisher[k], manual[k], rtol=1e-9, atol=1e-12)
        assert (fisher[k] >= 0).all()
    assert sum(float(f.sum()) for f in fisher.values()) > 0


def test_ewc_penalty_zero_at_task_a_weights_positive_away_zero_gradient(setup64):
    model, w0, ctx, _ = setup64
    fisher = ctx.fisher
    anchor = {k: w0[k] for k in fisher}
    at = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    pen = ewc_penalty(at, anchor, fisher, coef=3.0)
    assert float(pen.detach()) == 0.0
    grads = torch.autograd.grad(pen, [at[k] for k in fisher])
    assert all(float(g.abs().max()) == 0.0 for g in grads)

    g = torch.Generator().manual_seed(1)
    away = {k: v + (0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) if k in fisher else 0)
            for k, v in w0.items()}
    pen = ewc_penalty(away, anchor, fisher, coef=3.0)
    expected = 0.5 * 3.0 * sum(float((fisher[k] * (away[k] - w0[k]) ** 2).sum()) for k in fisher)
    assert float(pen) > 0 and float(pen) == pytest.approx(expected, rel=1e-12)
    # heads have no Fisher entry: moving them costs nothing
    heads_only = dict(w0, **{"head_b.weight": w0["head_b.weight"] + 1.0, "head_a.bias": w0["head_a.bias"] - 1.0})
    assert float(ewc_penalty(heads_only, anchor, fisher, 3.0)) == 0.0


def test_ewc_learner_first_step_is_sgd_then_pulls_back(setup64):
    model, w0, ctx, (_, _, xb, yb) = setup64
    fmax = max(float(f.max()) for f in ctx.fisher.values())
    coef = 0.5 / (LR * fmax)                     # strong but stable: lr * coef * F <= 0.5
    ewc = make_learner({"kind": "ewc", "coef": coef}, ctx, w0)
    sgd = make_learner({"kind": "sgd"}, ctx, w0)
    ewc.step(xb[:16], yb[:16])
    sgd.step(xb[:16], yb[:16])
    for k in w0:                                 # at w0 the penalty's gradient is zero
        torch.testing.assert_close(ewc.params[k], sgd.params[k], rtol=1e-12, atol=1e-15)
    for i in range(1, 8):
        sl = slice(16 * (i % 2), 16 * (i % 2) + 16)
        ewc.step(xb[sl], yb[sl])
        sgd.step(xb[sl], yb[sl])

    def dist(p):
        return sum(float((ctx.fisher[k] * (p[k] - w0[k]) ** 2).sum()) for k in ctx.fisher)

    assert 0 < dist(ewc.params) < 0.5 * dist(sgd.params)


def test_lwf_distillation_zero_at_the_task_a_model_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(16, 5, generator=g, dtype=torch.float64)
    new = old.clone().requires_grad_(True)
    loss = lwf_distillation(new, old, temperature=2.0)
    assert abs(float(loss.detach())) < 1e-12
    (grad,) = torch.autograd.grad(loss, new)
    assert float(grad.abs().max()) < 1e-12
    # softmax is shift-invariant: same distribution, same minimum
    assert abs(float(lwf_distillation(old + 3.0, old))) < 1e-12
    other = old + torch.randn(16, 5, generator=g, dtype=torch.float64)
    val = float(lwf_distillation(other, old, temperature=2.0))
    po, pn = F.softmax(old / 2, 1), F.softmax(other / 2, 1)
    expected = 4.0 * float((po * (po.log() - pn.log())).sum(1).mean())
    assert val > 0 and val == pytest.approx(expected, rel=1e-10)


def test_lwf_learner_first_step_equals_sgd_then_trains_the_old_head(setup64):
    model, w0, ctx, (_, _, xb, yb) = setup64
    lwf = make_learner({"kind": "lwf", "coef": 1.0, "temperature": 2.0}, ctx, w0)
    sgd = make_learner({"kind": "sgd"}, ctx, w0)
    assert set(lwf.trainable) == set(w0)          # trunk, head_a and head_b
    lwf.step(xb[:16], yb[:16])
    sgd.step(xb[:16], yb[:16])
    for k in w0:         # student == Task A model: the distillation term has zero gradient
        torch.testing.assert_close(lwf.params[k], sgd.params[k], rtol=1e-12, atol=1e-15)
    lwf.step(xb[16:], yb[16:])
    assert not torch.equal(lwf.params["head_a.weight"], w0["head_a.weight"])


def test_freeze_leaves_the_trunk_and_old_head_unchanged(setup64):
    model, w0, ctx, (_, _, xb, yb) = setup64
    frz = make_learner({"kind": "freeze"}, ctx, w0)
    sgd = make_learner({"kind": "sgd"}, ctx, w0)
    frz.step(xb[:16], yb[:16])
    sgd.step(xb[:16], yb[:16])
    for k in ("head_b.weight", "head_b.bias"):     # head_b: the same SGD step as plain SGD's
        torch.testing.assert_close(frz.params[k], sgd.params[k], rtol=1e-12, atol=1e-15)
    for _ in range(4):
        frz.step(xb[16:], yb[16:])
    for k in w0:
        if k.startswith("head_b."):
            assert not torch.equal(frz.params[k], w0[k])
        else:
            assert torch.equal(frz.params[k], w0[k]), k


def test_sgd_x01_moves_ten_times_less_than_sgd(setup64):
    model, w0, ctx, (_, _, xb, yb) = setup64
    sgd = make_learner({"kind": "sgd"}, ctx, w0)
    slow = make_learner({"kind": "sgd", "lr_scale": 0.1}, ctx, w0)
    assert sgd.lr == LR and slow.lr == pytest.approx(0.1 * LR)
    sgd.step(xb[:16], yb[:16])
    slow.step(xb[:16], yb[:16])
    moved = 0.0
    for k in w0:
        d_sgd, d_slow = sgd.params[k] - w0[k], slow.params[k] - w0[k]
        torch.testing.assert_close(d_slow, 0.1 * d_sgd, rtol=1e-9, atol=1e-14)
        moved += float(d_sgd.abs().sum())
    assert moved > 0
    assert not torch.equal(sgd.params["conv1.weight"], w0["conv1.weight"])   # SGD trains the trunk
    assert torch.equal(sgd.params["head_a.weight"], w0["head_a.weight"])     # ... not the old head


def test_sgd_explicit_lr_and_momentum(setup64):
    model, w0, ctx, (_, _, xb, yb) = setup64
    mom = make_learner({"kind": "sgd", "lr": 0.01, "momentum": 0.5}, ctx, w0)
    plain = make_learner({"kind": "sgd", "lr": 0.01}, ctx, w0)
    mom.step(xb[:16], yb[:16])
    plain.step(xb[:16], yb[:16])
    g1 = {k: (w0[k] - mom.params[k]) / 0.01 for k in w0}
    p1 = dict(mom.params)
    mom.step(xb[16:], yb[16:])
    plain2 = GradientLearner(model, p1, ce_b(model), mom.trainable, 0.01)
    plain2.step(xb[16:], yb[16:])
    for k in mom.trainable:   # v2 = g2 + 0.5 * g1
        g2 = (p1[k] - plain2.params[k]) / 0.01
        torch.testing.assert_close(p1[k] - mom.params[k], 0.01 * (g2 + 0.5 * g1[k]), rtol=1e-9, atol=1e-14)


def test_teacher_trains_on_the_union_of_task_a_and_task_b(setup64):
    """The teacher's default loss is ONE cross-entropy over the union batch, each example through
    its own task's head (F.cross_entropy over the concatenated logits); loss "sum" keeps the
    earlier CE_A + CE_B."""
    model, w0, ctx, (xa, ya, xb, yb) = setup64
    calls = []

    def next_a():
        calls.append(1)
        return xa[:16], ya[:16]

    def autograd_step(loss_fn):
        model.load_state_dict(w0)
        model.zero_grad()
        loss_fn().backward()
        return {k: w0[k] - LR * p.grad for k, p in model.named_parameters()}

    teacher = make_learner({"kind": "teacher"}, ctx, w0, next_a=next_a)
    assert isinstance(teacher, TeacherLearner)
    teacher.step(xb[:16], yb[:16])
    assert len(calls) == 1
    union = autograd_step(lambda: F.cross_entropy(torch.cat([model(xa[:16], "a"), model(xb[:16], "b")]),
                                                  torch.cat([ya[:16], yb[:16]])))
    for k in union:
        torch.testing.assert_close(teacher.params[k], union[k], rtol=1e-10, atol=1e-13)
    summed = make_learner({"kind": "teacher", "loss": "sum"}, ctx, w0, next_a=next_a)
    summed.step(xb[:16], yb[:16])
    expect = autograd_step(lambda: F.cross_entropy(model(xa[:16], "a"), ya[:16]) +
                           F.cross_entropy(model(xb[:16], "b"), yb[:16]))
    for k in expect:
        torch.testing.assert_close(summed.params[k], expect[k], rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="loss must be one of"):
        make_learner({"kind": "teacher", "loss": "mean"}, ctx, w0, next_a=next_a)
    # unlike SGD on Task B, the old head is trained and the trunk sees Task A
    sgd = make_learner({"kind": "sgd"}, ctx, w0)
    sgd.step(xb[:16], yb[:16])
    assert not torch.equal(teacher.params["head_a.weight"], w0["head_a.weight"])
    assert not torch.allclose(teacher.params["conv1.weight"], sgd.params["conv1.weight"])
    with pytest.raises(ValueError, match="Task A batches"):
        make_learner({"kind": "teacher"}, ctx, w0)


def test_ours_needs_a_meta_learner_and_trains_head_b_by_sgd():
    from lrmt_fast.meta_training import build_meta_learner

    torch.manual_seed(0)
    model = TinyNet()
    xa, ya, xb, yb = tiny_data(n=32)
    w0 = param_dict(model)
    with pytest.raises(ValueError, match="meta-learner"):
        make_learner({"kind": "ours"}, MethodContext(model, w0, LR, xa, ya), w0)
    ctx = MethodContext(model, w0, LR, xa, ya, meta=build_meta_learner(model, 4, 4), impl="reference")
    ours = make_learner({"kind": "ours"}, ctx, w0)
    sgd = make_learner({"kind": "sgd"}, ctx, w0)
    ours.step(xb[:16], yb[:16])
    sgd.step(xb[:16], yb[:16])
    for k in ("head_b.weight", "head_b.bias"):
        torch.testing.assert_close(ours.params[k], sgd.params[k])
    assert torch.equal(ours.params["head_a.weight"], w0["head_a.weight"])
    assert not torch.equal(ours.params["fc1.weight"], w0["fc1.weight"])   # the meta-learner updates the trunk
    assert all(not v.requires_grad for v in ours.params.values())


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_ours_meta_test_step_is_in_place_and_matches_the_meta_training_update(impl):
    """The meta-test rollout of ``ours`` updates its weights and LSTM state in place (no graph)
    and gives what the differentiable meta-training update gives, step after step."""
    from lrmt_fast import ops
    from lrmt_fast.meta_training import build_meta_learner
    from lrmt_fast.steps import student_meta_update

    if impl == "fused" and not ops.available("cpu"):
        pytest.skip("fused extension not built")
    torch.manual_seed(0)
    model = TinyNet()
    xa, ya, xb, yb = tiny_data(n=64)
    w0 = param_dict(model)
    meta = build_meta_learner(model, 4, 4)
    with torch.no_grad():   # away from the SGD-exact initialisation
        for lrn in meta.learners.values():
            lrn.w_out.normal_(0, 0.5)
    ctx = MethodContext(model, w0, LR, xa, ya, meta=meta, impl=impl)
    ours = make_learner({"kind": "ours"}, ctx, w0)
    ptrs = {k: v.data_ptr() for k, v in ours.params.items()}
    sptrs = {k: (h.data_ptr(), c.data_ptr()) for k, (h, c) in ours.state.items()}
    params = {k: v.clone() for k, v in w0.items()}
    state = meta.init_state()
    for t in range(4):
        sl = slice(16 * t, 16 * (t + 1))
        ours.step(xb[sl], yb[sl])
        params, state, _, _ = student_meta_update(model, meta, params, state, xb[sl], yb[sl], LR, impl=impl)
        params = {k: v.detach() for k, v in params.items()}
        state = meta.detach_state(state)
    assert {k: v.data_ptr() for k, v in ours.params.items()} == ptrs
    assert {k: (h.data_ptr(), c.data_ptr()) for k, (h, c) in ours.state.items()} == sptrs
    for k in params:
        torch.testing.assert_close(ours.params[k], params[k], rtol=1e-5, atol=1e-6)
    for k in state:
        torch.testing.assert_close(ours.state[k][0], state[k][0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.params["fc1.weight"], w0["fc1.weight"])


def test_make_learner_rejects_unknown_kinds_and_options(setup64):
    _, w0, ctx, _ = setup64
    with pytest.raises(ValueError, match="unknown method kind"):
        make_learner({"kind": "adam"}, ctx, w0)
    with pytest.raises(ValueError, match="unknown option"):
        make_learner({"kind": "sgd", "lr_scal": 0.1}, ctx, w0)


@pytest.mark.parametrize("kind", ["teacher", "ours"])
def test_momentum_is_not_silently_ignored(setup64, kind):
    from lrmt_fast.meta_training import build_meta_learner
    model, w0, ctx, (xa, ya, _, _) = setup64
    ctx.meta = build_meta_learner(model, 4, 4)
    with pytest.raises(ValueError, match="momentum"):
        make_learner({"kind": kind, "momentum": 0.9}, ctx, w0, next_a=lambda: (xa, ya))


# --------------------------------------------------------------------------- the meta-test loop
def test_metatest_config_checkpoints():
    assert MetaTestConfig(steps=500, every=50).checkpoints() == list(range(0, 501, 50))
    assert MetaTestConfig(steps=7, every=3).checkpoints() == [0, 3, 6, 7]


def test_run_meta_test_same_batches_for_every_method_and_cache(tmp_path, monkeypatch):
    import lrmt_fast.meta_test as ev

    torch.manual_seed(0)
    model = TinyNet()
    tasks = tiny_two_tasks()
    w0 = param_dict(model)
    cfg = MetaTestConfig(steps=4, every=2, batch=8, batch_a=8, lr=LR, fisher_samples=16)
    methods = {"freeze": {"kind": "freeze"}, "sgd": {"kind": "sgd"}, "sgd_x0.1": {"kind": "sgd", "lr_scale": 0.1},
               "lwf": {"kind": "lwf"}, "ewc": {"kind": "ewc"}, "teacher": {"kind": "teacher"}}
    seen = {}
    real_make = ev.make_learner

    def recording_make(spec, ctx, params, next_a=None):
        learner = real_make(spec, ctx, params, next_a=next_a)
        step, key = learner.step, (spec["kind"], spec.get("lr_scale"), len(seen))
        seen[key] = []

        def rec(x, y):
            seen[key].append((float(x.sum()), y.tolist()))
            return step(x, y)
        learner.step = rec
        return learner

    monkeypatch.setattr(ev, "make_learner", recording_make)
    readout = Readout(model, ReadoutData(tasks, ReadoutConfig(steps=10)))
    cache = str(tmp_path / "runs")
    res = run_meta_test(model, w0, tasks, readout, cfg, methods, [0, 1], cache_dir=cache, progress=False)
    assert list(res) == list(methods) and all(len(v) == 2 for v in res.values())
    batches = list(seen.values())
    assert len(batches) == 12 and all(len(b) == 4 for b in batches)
    by_seed = {s: [b for i, b in enumerate(batches) if i % 2 == s] for s in (0, 1)}
    for s in (0, 1):                                   # one Task B batch order per seed, for every method
        assert all(b == by_seed[s][0] for b in by_seed[s])
    assert by_seed[0][0] != by_seed[1][0]
    for runs in res.values():
        for s, run in enumerate(runs):
            assert run["seed"] == s and run["steps"] == [0, 2, 4] and 0 <= run["joint_readout"] <= 100
            # step 0: the same trunk for every method, so the same readouts
            assert run["task_a_readout"][0] == res["freeze"][s]["task_a_readout"][0]
    assert len(set(res["freeze"][0]["task_a_readout"])) == 1    # a frozen trunk reads out the same
    # a rerun takes every run from the cache: no learner is built
    monkeypatch.setattr(ev, "make_learner", lambda *a, **k: pytest.fail("cached run recomputed"))
    again = run_meta_test(model, w0, tasks, readout, cfg, methods, [0, 1], cache_dir=cache, progress=False)
    assert again == res
    # a different option is a different run
    monkeypatch.setattr(ev, "make_learner", real_make)
    other = run_meta_test(model, w0, tasks, readout, cfg, {"ewc": {"kind": "ewc", "coef": 10.0}}, [0],
                          cache_dir=cache, progress=False)
    assert other["ewc"][0]["key"] != res["ewc"][0]["key"]
    with pytest.raises(ValueError, match="meta-learner"):
        run_meta_test(model, w0, tasks, readout, cfg, {"ours": {"kind": "ours"}}, [0], progress=False)
