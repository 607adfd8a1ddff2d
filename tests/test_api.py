"""The public Python API (lrmt_fast/__init__.py): the README's example runs on the MNIST/Fashion
subset shipped in the package, and GatedSGD is the meta-test's update as an optimiser."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import lrmt_fast
from lrmt_fast.baselines import OursLearner
from lrmt_fast.models import LeNet
from lrmt_fast.student import param_dict


def _subset(n_train=600, n_test=300):
    from lrmt_fast.data import load_two_tasks
    t = load_two_tasks("mnist", "fashion", "subset")
    a = ((t.a.train_x[:n_train], t.a.train_y[:n_train]), (t.a.test_x[:n_test], t.a.test_y[:n_test]))
    b = ((t.b.train_x[:n_train], t.b.train_y[:n_train]), (t.b.test_x[:n_test], t.b.test_y[:n_test]))
    return a, b


def _task_a_lenet(a_train, steps=60):
    torch.manual_seed(0)
    model = LeNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    x, y = a_train
    for i in range(steps):
        sl = slice((i * 32) % x.shape[0], (i * 32) % x.shape[0] + 32)
        opt.zero_grad()
        F.cross_entropy(model(x[sl], "a"), y[sl]).backward()
        opt.step()
    return model


def test_readme_example_on_the_shipped_subset(tmp_path):
    """What README.md's "Python API" section does, on the shipped subset: a LeNet trained on Task A,
    meta-trained a few episodes, then used with GatedSGD on Task B; readout and evaluate."""
    torch.set_num_threads(1)
    (a_train, a_test), (b_train, b_test) = _subset()
    model = _task_a_lenet(a_train)
    before = lrmt_fast.readout(model, a_train, a_test)
    assert before > 50.0                                   # the Task A network learned something
    cfg = lrmt_fast.MetaTrainConfig(episodes=3, max_steps=4, lr=0.05, bptt_start=2, bptt_max=2, hidden=8,
                                    checkpoint_every=1)
    meta, history = lrmt_fast.metatrain(model, a_train, b_train, cfg, out_dir=str(tmp_path / "mt"), progress=False)
    assert len(history) == 3 and (tmp_path / "mt" / "meta_ckpt.pt").exists()
    meta2 = lrmt_fast.load_meta(str(tmp_path / "mt" / "meta_ckpt.pt"))
    for p, q in zip(meta.parameters(), meta2.parameters()):
        assert torch.equal(p, q)
    opt = lrmt_fast.GatedSGD(model, meta2, lr=0.05)
    x, y = b_train
    losses = []
    for i in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i * 32:(i + 1) * 32], "b"), y[i * 32:(i + 1) * 32])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(l == l for l in losses)
    res = lrmt_fast.evaluate(model, (a_train, a_test), (b_train, b_test),
                             {"sgd": {"kind": "sgd"}, "ours": {"kind": "ours"}}, meta=meta2, seeds=[0],
                             metatest={"steps": 4, "every": 2, "batch": 16, "lr": 0.05},
                             readout_config={"steps": 5}, progress=False)
    assert set(res["methods"]) == {"sgd", "ours"} and res["methods"]["ours"]["steps"] == [0, 2, 4]


def test_gated_sgd_with_a_fresh_meta_learner_is_sgd():
    """At initialisation the gate is exactly 1: GatedSGD takes torch.optim.SGD's steps, bit for bit."""
    (a_train, _), (b_train, _) = _subset(200, 10)
    torch.manual_seed(0)
    m1 = LeNet()
    m2 = LeNet()
    m2.load_state_dict(m1.state_dict())
    meta = lrmt_fast.MetaLearner(lrmt_fast.meta_training.find_adapted_layers(m1))
    gated = lrmt_fast.GatedSGD(m1, meta, lr=0.05, impl="fused")
    plain = torch.optim.SGD(m2.parameters(), lr=0.05)
    x, y = b_train
    for i in range(4):
        for m, opt in ((m1, gated), (m2, plain)):
            opt.zero_grad()
            F.cross_entropy(m(x[i * 16:(i + 1) * 16], "b"), y[i * 16:(i + 1) * 16]).backward()
            opt.step()
    for (k, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_gated_sgd_is_the_meta_test_update(impl):
    """With a trained (here: perturbed) meta-learner, GatedSGD on a model equals the meta-test's
    "ours" learner on the same batches: trunk by the gate, head_b (and head_a, untouched) by SGD."""
    from lrmt_fast.meta_training import build_meta_learner
    (_, _), (b_train, _) = _subset(200, 10)
    torch.manual_seed(0)
    model = LeNet()
    meta = build_meta_learner(model, 8, 8)
    with torch.no_grad():
        for p in meta.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours = OursLearner(model, param_dict(model), meta, 0.05, impl=impl)
    opt = lrmt_fast.GatedSGD(model, meta, lr=0.05, impl=impl)
    x, y = b_train
    for i in range(3):
        xb, yb = x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]
        ours.step(xb, yb)
        opt.zero_grad()
        F.cross_entropy(model(xb, "b"), yb).backward()
        opt.step()
    for k, p in model.named_parameters():
        if k.startswith("head_a"):
            continue        # ours never changes head_a; GatedSGD has no gradient for it either
        torch.testing.assert_close(p.detach(), ours.params[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gated_sgd_errors():
    torch.manual_seed(0)
    meta = lrmt_fast.MetaLearner(lrmt_fast.meta_training.find_adapted_layers(LeNet()))

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 20, 5)     # conv1 as LeNet's, no conv2

    with pytest.raises(ValueError, match="does not have"):
        lrmt_fast.GatedSGD(Other(), meta, lr=0.1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        lrmt_fast.GatedSGD(LeNet(), meta, lr=0.0)
    model = LeNet()
    opt = lrmt_fast.GatedSGD(model, meta, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="no forward pass"):
        opt.step()


def test_user_data_forms_and_model_checks():
    from lrmt_fast.api import as_tensors
    x, y = torch.randn(10, 1, 28, 28), torch.arange(10) % 3
    ds = torch.utils.data.TensorDataset(x, y)
    for data in ((x, y), ds, torch.utils.data.DataLoader(ds, batch_size=4)):
        xx, yy = as_tensors(data)
        assert torch.equal(xx, x) and torch.equal(yy, y)
    with pytest.raises(ValueError, match="expected"):
        as_tensors(42)
    with pytest.raises(ValueError, match="TwoHeadNet"):
        lrmt_fast.readout(torch.nn.Linear(3, 3), (x, y), (x, y))
    net = lrmt_fast.TwoHeadNet(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 16)), 16, 3, 4)
    assert net(x, "b").shape == (10, 4) and net.features(x).shape == (10, 16)
