"""CIFAR data: loading through torchvision's layout, the integrity policy, task splits,
per-episode class draws, augmentation, and resumable pretraining (tiny data the test writes)."""
import dataclasses
import hashlib
import json
import os
import warnings

import numpy as np
import pytest
import torch

from lrmt_fast.checkpoint import CheckpointError
from lrmt_fast.data import cifar
from lrmt_fast.data.cifar import CifarSource, CifarTaskStream, DataRootError
from lrmt_fast.data.sources import DataNotFoundError
from lrmt_fast import pretrain_cifar as P

REAL_ROOT = os.environ.get("LRMT_DATA") or os.path.join(os.path.dirname(__file__), "..", "data")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar"))
    cifar.write_tiny_cifar(root, n_train_per_class=6, n_test_per_class=2, seed=1)
    return root


@pytest.fixture
def src(tiny_root):
    cifar.clear_cache()
    return CifarSource(tiny_root, download=False)


def test_loads_torchvision_layout_as_uint8(src):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = src.load("cifar10", True)
        x100, y100 = src.load("cifar100", False)
    assert x.dtype == torch.uint8 and x.shape == (60, 3, 32, 32) and y.dtype == torch.int64
    assert sorted(y.unique().tolist()) == list(range(10)) and torch.bincount(y).tolist() == [6] * 10
    assert x100.shape == (200, 3, 32, 32) and sorted(y100.unique().tolist()) == list(range(100))
    # the same pixels torchvision itself returns (HWC) for the first image, through the unchecked class
    tv = cifar._unchecked(cifar._tv_class("cifar10"))(src.root, train=True, download=False)
    assert np.array_equal(tv.data[0].transpose(2, 0, 1), x[0].numpy()) and tv.targets[0] == int(y[0])


def test_integrity_policy(tmp_path, src):
    # the tiny copy, like the offline reconstruction, has no 'filenames': auto accepts it with a warning
    assert cifar.is_offline_reconstruction("cifar10", src.root) and not cifar.md5_ok("cifar10", src.root)
    with pytest.warns(UserWarning, match="offline reconstruction"):
        cifar.dataset_class("cifar10", src.root, "auto")
    with warnings.catch_warnings(record=True) as w:     # once per dataset and root
        warnings.simplefilter("always")
        cifar.dataset_class("cifar10", src.root, "auto")
        cifar.load_cifar("cifar10", src.root, train=False, download=False)
    assert not [x for x in w if "offline reconstruction" in str(x.message)]
    with pytest.raises(DataRootError, match="md5"):
        cifar.dataset_class("cifar10", src.root, "md5")
    # a copy that fails md5 and is not the known offline copy: auto refuses, skip accepts
    other = str(tmp_path / "other")
    x = np.zeros((10, 3, 32, 32), np.uint8)
    cifar.write_torchvision_layout(other, "cifar10", x, np.arange(10), x[:10], np.arange(10), filenames=True)
    with pytest.raises(DataRootError, match="--cifar-check skip"):
        cifar.dataset_class("cifar10", other, "auto")
    cls = cifar.dataset_class("cifar10", other, "skip")
    assert len(cls(other, train=True, download=False)) == 10
    with pytest.raises(ValueError, match="check must be"):
        cifar.dataset_class("cifar10", other, "sometimes")


def test_missing_data_root_error_names_option_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("LRMT_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="--data-root.*LRMT_DATA"):
        cifar.load_cifar("cifar10")
    with pytest.raises(DataRootError, match="--data-root.*LRMT_DATA"):
        cifar.load_cifar("cifar100", str(tmp_path / "empty"), download=False)
    monkeypatch.setenv("LRMT_DATA", str(tmp_path))
    assert cifar.resolve_data_root() == str(tmp_path)


def test_cifar5_splits(src):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = cifar.cifar5a(src), cifar.cifar5b(src)
        x10, y10 = src.load("cifar10", True)
    assert a.classes == (0, 1, 2, 3, 4) and b.classes == (5, 6, 7, 8, 9)
    assert set(a.train_y.tolist()) == set(range(5)) == set(b.train_y.tolist()) == set(b.test_y.tolist())
    assert a.train_x.shape[0] == 30 and b.train_x.shape[0] == 30 and a.test_x.shape[0] == 10
    # every image of a 5B class, with its label shifted by 5, in the original order
    orig = x10[y10 >= 5]
    assert torch.equal(b.train_x, orig) and torch.equal(b.train_y + 5, y10[y10 >= 5])
    b1, b2 = cifar.split_b(b, seed=0)
    i1, i2 = cifar.even_split(30, 0)
    assert set(i1.tolist()).isdisjoint(i2.tolist()) and len(i1) + len(i2) == 30 and len(i1) == 15
    assert torch.equal(b1.train_x, b.train_x[i1]) and torch.equal(b2.train_x, b.train_x[i2])
    assert torch.equal(cifar.even_split(30, 0)[0], i1) and not torch.equal(cifar.even_split(30, 1)[0], i1)
    with pytest.raises(ValueError, match="repeated"):
        cifar.select_classes(x10, y10, [1, 1])


def test_b1_classes_per_episode_and_b2_draws(src):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = cifar.cifar5a(src)
        xb, yb = src.load("cifar100", True)
    from lrmt_fast.models import resnet32_gn
    w0 = {k: v.detach() for k, v in resnet32_gn().named_parameters()}
    w1 = {k: v + 1 for k, v in w0.items()}
    stream = CifarTaskStream([w0, w1], (a.train_x, a.train_y), (xb, yb), 4, 4, b_class_pool=cifar.B1_POOL)
    seen, ckpts = set(), set()
    for ep in range(12):
        e1 = stream.new_episode(ep, torch.Generator().manual_seed(ep))
        e2 = stream.new_episode(ep, torch.Generator().manual_seed(ep))
        cls = e1.info["classes"]
        assert cls == e2.info["classes"] and len(set(cls)) == 5 and all(0 <= c < 50 for c in cls)
        seen.add(tuple(cls))
        ckpts.add(e1.info["checkpoint"])
        # the batches carry labels 0-4 of exactly those classes' images
        x, y = e1.next_b()
        assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.max() < 5
        sel = torch.isin(yb, torch.tensor(cls))
        assert e1._b[0].shape[0] == int(sel.sum()) == 5 * 6
        # label i <-> class cls[i]: the episode's images of label i are exactly the pool's images of cls[i]
        for i, c in enumerate(cls):
            assert torch.equal(e1._b[0][e1._b[1] == i], xb[yb == c])
        assert not torch.equal(e1.w0["head_b.weight"], w0["head_b.weight"])          # fresh head_b
        assert torch.equal(e1.w0["head_b.weight"], e2.w0["head_b.weight"])
    assert len(seen) > 6 and ckpts == {0, 1}
    draws = cifar.b2_class_draws(seed=0, n_draws=5)
    assert len(draws) == 5 and all(len(set(d)) == 5 and all(50 <= c < 100 for c in d) for d in draws)
    assert len({tuple(d) for d in draws}) == 5 and draws == cifar.b2_class_draws(seed=0)
    assert set(cifar.B1_POOL).isdisjoint(cifar.B2_POOL)


def test_augment_is_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = cifar.augment(x, g, pad=4)
    assert out.shape == x.shape and out.dtype == torch.uint8
    g = torch.Generator().manual_seed(0)
    ox = torch.randint(0, 9, (16,), generator=g)
    oy = torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(16):
        ref = xp[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref), i
    assert flip.any() and (~flip).any()


def test_normalize_standard_stats():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    z = cifar.normalize(x)
    for c in range(3):
        assert torch.allclose(z[:, c], torch.tensor((1 - cifar.CIFAR_MEAN[c]) / cifar.CIFAR_STD[c]))


TINY = dict(model="resnet_gn", model_kw={"blocks_per_stage": 1, "widths": [8, 8, 8]}, epochs=3, batch=8,
            lr=0.05, eval_every=1)


def test_pretrain_resumes_exactly_and_is_cached(src, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = cifar.cifar5a(src)
    cfg = P.CifarPretrainConfig(**TINY)
    full = P.pretrain_cifar(a, cfg, str(tmp_path / "full.pt"), progress=False, log=lambda m: None)
    part = str(tmp_path / "part.pt")
    r = P.pretrain_cifar(a, cfg, part, progress=False, stop_after_epoch=1, log=lambda m: None)
    assert r["partial"] and os.path.exists(part + ".partial") and not os.path.exists(part)
    done = P.pretrain_cifar(a, cfg, part, progress=False, log=lambda m: None)
    assert not os.path.exists(part + ".partial")
    for k, v in full["state_dict"].items():
        assert torch.equal(v, done["state_dict"][k]), k
    assert [h["epoch"] for h in done["history"]] == [1, 2, 3] and 0 <= done["test_acc"] <= 100
    # trained: head_a and trunk moved, head_b untouched
    m0 = P.make_model(cfg)
    assert not torch.equal(m0.conv1.weight, full["state_dict"]["conv1.weight"])
    assert torch.equal(m0.head_b.weight, full["state_dict"]["head_b.weight"])
    # the cache is reused; another config refuses the file
    again = P.pretrain_cifar(a, cfg, part, progress=False)
    assert again["key"] == done["key"]
    with pytest.raises(CheckpointError, match="another config"):
        P.pretrain_cifar(a, P.CifarPretrainConfig(**{**TINY, "lr": 0.01}), part, progress=False)


def _finish_by_hand(a, cfg, base_state):
    """The finish phase of ``cfg`` (2 epochs of plain SGD, no momentum, no weight decay, lr ramped
    over half an epoch to 0.02, generator seed + 2) replayed from ``base_state``: the state dict
    after every step."""
    assert (cfg.finish_epochs, cfg.finish_lr, cfg.finish_warmup_epochs, cfg.finish_momentum) == (2, 0.02, 0.5, 0.0)
    model = P.make_model(cfg)
    model.load_state_dict(base_state)
    params = [p for n, p in model.named_parameters() if not n.startswith("head_b.")]
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    spe = a.train_x.shape[0] // cfg.batch
    warm = int(round(0.5 * spe))
    states, step = [], 0
    for _ in range(2):
        perm = torch.randperm(a.train_x.shape[0], generator=gen)
        for b in range(spe):
            idx = perm[b * cfg.batch:(b + 1) * cfg.batch]
            xb = cifar.augment(a.train_x[idx], gen)
            loss = torch.nn.functional.cross_entropy(model(cifar.normalize(xb), "a"), a.train_y[idx])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= 0.02 * min(1.0, (step + 1) / warm) * g
            step += 1
            states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def test_finish_phase_starts_from_the_base_checkpoint(src, tmp_path):
    """The finish phase reuses the checkpoint of the config without it (trained first when absent),
    trains only its own epochs at its own constant rate, resumes exactly, and has its own key; a
    config without it keeps the key it had before the fields existed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = cifar.cifar5a(src)
    base_cfg = P.CifarPretrainConfig(**{**TINY, "epochs": 1})
    cfg = P.CifarPretrainConfig(**{**TINY, "epochs": 1, "finish_epochs": 2, "finish_lr": 0.02,
                                   "finish_warmup_epochs": 0.5})
    assert P.base_config(cfg) == base_cfg
    fp = P.data_fingerprint(a)
    assert P.cache_key(cfg, fp) != P.cache_key(base_cfg, fp)
    # the key of a config without a finish phase ignores the finish fields (old keys stay valid)
    assert P.cache_key(dataclasses.replace(base_cfg, finish_lr=0.5), fp) == P.cache_key(base_cfg, fp)
    blob = json.dumps({"cfg": {k: v for k, v in dataclasses.asdict(base_cfg).items() if not k.startswith("finish_")},
                       "data": fp, "kind": "cifar"}, sort_keys=True)
    assert P.cache_key(base_cfg, fp) == hashlib.sha1(blob.encode()).hexdigest()[:12]

    quiet = dict(progress=False, log=lambda m: None)
    base_path = str(tmp_path / "base.pt")
    r = P.pretrain_cifar(a, cfg, str(tmp_path / "fin.pt"), base_path=base_path, stop_after_epoch=1, **quiet)
    assert r["partial"] and r["epoch"] == 1 and os.path.exists(base_path)   # base (1 epoch) done, finish stopped
    assert os.path.exists(str(tmp_path / "fin.pt.partial")) and not os.path.exists(str(tmp_path / "fin.pt"))
    fin = P.pretrain_cifar(a, cfg, str(tmp_path / "fin.pt"), base_path=base_path, **quiet)
    base = P.pretrain_cifar(a, base_cfg, base_path, **quiet)
    assert fin["base"]["key"] == base["key"] and fin["base"]["test_acc"] == base["test_acc"]
    assert [h["epoch"] for h in fin["history"]] == [1, 2]
    assert fin["key"] == P.cache_key(cfg, fp)

    # the same phase by hand: plain SGD (no momentum, no weight decay) from the base weights,
    # lr ramped over half an epoch to 0.02, generator seed + 2
    states = _finish_by_hand(a, cfg, base["state_dict"])
    for k, v in states[-1].items():
        assert torch.allclose(v, fin["state_dict"][k], rtol=1e-4, atol=1e-5), k
    # the resumed finish equals one uninterrupted
    other = P.pretrain_cifar(a, cfg, str(tmp_path / "fin2.pt"), base_path=base_path, **quiet)
    for k, v in other["state_dict"].items():
        assert torch.equal(v, fin["state_dict"][k]), k
    # without base_path the base is looked for (and trained) beside the checkpoint, by its key
    P.pretrain_cifar(a, cfg, str(tmp_path / "sub" / "fin.pt"), **quiet)
    assert os.path.exists(P.default_path(str(tmp_path / "sub"), a, base_cfg))
    # bad finish settings are refused when the config is made
    for bad in ({"finish_epochs": -1}, {"finish_epochs": 1, "finish_lr": 0.0},
                {"finish_epochs": 1, "finish_momentum": 1.0}, {"finish_weight_decay": -0.1}):
        with pytest.raises(ValueError, match="finish"):
            P.CifarPretrainConfig(**{**TINY, **bad})


def test_finish_phase_tail_averaging(src, tmp_path):
    """finish_average_epochs: the checkpoint holds the mean of the weights after each of the phase's
    last steps (replayed by hand), also when the averaged steps span an interrupted epoch; without
    it the key is the one the finish phase had before the field existed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = cifar.cifar5a(src)
    fin_cfg = P.CifarPretrainConfig(**{**TINY, "epochs": 1, "finish_epochs": 2, "finish_lr": 0.02,
                                       "finish_warmup_epochs": 0.5})
    cfg = dataclasses.replace(fin_cfg, finish_average_epochs=1.5)
    fp = P.data_fingerprint(a)
    assert P.base_config(cfg) == P.base_config(fin_cfg)
    assert P.cache_key(cfg, fp) != P.cache_key(fin_cfg, fp)
    d = {k: v for k, v in dataclasses.asdict(fin_cfg).items() if k != "finish_average_epochs"}
    blob = json.dumps({"cfg": d, "data": fp, "kind": "cifar"}, sort_keys=True)
    assert P.cache_key(fin_cfg, fp) == hashlib.sha1(blob.encode()).hexdigest()[:12]
    for bad in (-0.5, 2.5):
        with pytest.raises(ValueError, match="finish_average_epochs"):
            dataclasses.replace(fin_cfg, finish_average_epochs=bad)

    quiet = dict(progress=False, log=lambda m: None)
    base_path = str(tmp_path / "base.pt")
    r = P.pretrain_cifar(a, cfg, str(tmp_path / "avg.pt"), base_path=base_path, stop_after_epoch=1, **quiet)
    assert r["partial"]                     # stopped after epoch 1, inside the averaged steps
    ck = P.pretrain_cifar(a, cfg, str(tmp_path / "avg.pt"), base_path=base_path, **quiet)
    last = P.pretrain_cifar(a, fin_cfg, str(tmp_path / "last.pt"), base_path=base_path, **quiet)
    spe = a.train_x.shape[0] // cfg.batch
    n_avg = int(round(1.5 * spe))
    assert ck["averaged_steps"] == n_avg and ck["last_step_test_acc"] == last["test_acc"]

    # by hand: the finish phase's trajectory (as in the test above), averaging its last n_avg states
    base = P.pretrain_cifar(a, P.base_config(cfg), base_path, **quiet)
    states = _finish_by_hand(a, cfg, base["state_dict"])
    tail = states[-n_avg:]
    for k, v in ck["state_dict"].items():
        mean = torch.stack([s_[k] for s_ in tail]).mean(0)
        assert torch.allclose(v, mean, rtol=1e-4, atol=1e-5), k
        assert torch.allclose(last["state_dict"][k], states[-1][k], rtol=1e-4, atol=1e-5), k
    assert not torch.equal(ck["state_dict"]["conv1.weight"], last["state_dict"]["conv1.weight"])
    model = P.make_model(cfg)
    model.load_state_dict(ck["state_dict"])
    assert ck["test_acc"] == P.accuracy_u8(model, a.test_x, a.test_y)
    # resumed = uninterrupted
    other = P.pretrain_cifar(a, cfg, str(tmp_path / "avg2.pt"), base_path=base_path, **quiet)
    for k, v in other["state_dict"].items():
        assert torch.equal(v, ck["state_dict"][k]), k


def test_pretrain_pool_skips_existing_and_shards(src, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = cifar.cifar5a(src)
    cfg = P.CifarPretrainConfig(**{**TINY, "epochs": 1})
    pool = str(tmp_path / "pool")
    r0 = P.pretrain_pool(a, cfg, pool, n=3, shard=(0, 2), progress=False, log=lambda m: None)
    assert [r["seed"] for r in r0] == [0, 2] and all(r["status"] == "trained" for r in r0)
    with pytest.raises(CheckpointError, match="1 of 3 checkpoints missing"):
        P.load_pool(pool, 3)
    capsys.readouterr()
    r = P.pretrain_pool(a, cfg, pool, n=3, shard=(0, 1), progress=True, log=lambda m: None)
    assert [x["status"] for x in r] == ["exists", "trained", "exists"]
    err = capsys.readouterr().err     # the pool's bar, and the steps of the checkpoint it trained
    assert "checkpoint pool [0/1]" in err and "pretrain 5A seed 1" in err and "pretrain 5A seed 0" not in err
    states = P.load_pool(pool, 3)
    assert len(states) == 3 and not torch.equal(states[0]["conv1.weight"], states[1]["conv1.weight"])


@pytest.mark.realdata
def test_real_cifar_splits():
    if not os.path.isdir(os.path.join(REAL_ROOT, cifar.CIFAR10_DIR)) or \
            not os.path.isdir(os.path.join(REAL_ROOT, cifar.CIFAR100_DIR)):
        pytest.skip("real CIFAR not unpacked (python ../shared/data/unpack.py data)")
    cifar.clear_cache()
    s = CifarSource(REAL_ROOT, download=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = cifar.cifar5a(s), cifar.cifar5b(s)
    assert a.train_x.shape == (25000, 3, 32, 32) and a.test_x.shape[0] == 5000
    assert torch.bincount(b.train_y).tolist() == [5000] * 5
    b1, b2 = cifar.split_b(b, 0)
    assert b1.train_x.shape[0] == b2.train_x.shape[0] == 12500
    assert torch.equal(b1.test_x, b.test_x) and torch.equal(b2.test_x, b.test_x)   # test set kept for readout
    i1, i2 = cifar.even_split(25000, 0)
    assert not set(i1.tolist()) & set(i2.tolist())
    x100, y100 = s.load("cifar100", True)
    assert x100.shape[0] == 50000 and torch.bincount(y100).tolist() == [500] * 100
    # the paper's class names: 5A = airplane..deer, 5B = dog..truck (torchvision reads them from the copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = cifar.dataset_class("cifar10", REAL_ROOT, "auto")(REAL_ROOT, train=False, download=False).classes
    assert [names[c] for c in cifar.CIFAR5A] == ["airplane", "automobile", "bird", "cat", "deer"]
    assert [names[c] for c in cifar.CIFAR5B] == ["dog", "frog", "horse", "ship", "truck"]
    # the real CIFAR-10 copy: 5A's images are exactly the CIFAR-10 training images of classes 0-4
    x10, y10 = s.load("cifar10", True)
    assert torch.equal(a.train_x, x10[y10 < 5]) and torch.equal(a.train_y, y10[y10 < 5])
    # Exp 2/3: a meta-training episode holds all 2,500 training images of its 5 classes of 0-49;
    # the meta-test draws come from 50-99, every image of a draw is a CIFAR-100 image of that class
    sel = torch.isin(y100, torch.tensor(cifar.B1_POOL))
    stream = CifarTaskStream([{"w": torch.zeros(1)}], (a.train_x[:10], a.train_y[:10]), (x100[sel], y100[sel]),
                             4, 4, b_class_pool=cifar.B1_POOL, fresh_head=False)
    e = stream.new_episode(0, torch.Generator().manual_seed(0))
    assert e._b[0].shape[0] == 2500 and torch.bincount(e._b[1]).tolist() == [500] * 5
    assert all(c < 50 for c in e.info["classes"])
    for cls in cifar.b2_class_draws(0, 5):
        t = cifar.cifar100_task(cls, s)
        assert t.train_x.shape[0] == 2500 and t.test_x.shape[0] == 500 and min(cls) >= 50
        assert torch.equal(t.train_x[t.train_y == 0], x100[y100 == cls[0]])
    cifar.clear_cache()


def test_warmup_schedule_and_zero_init_residual():
    import math
    cfg = P.CifarPretrainConfig(epochs=10, warmup_epochs=1, lr=0.1, schedule="cosine")
    total = 100
    assert P.warmup_steps(cfg, total) == 10
    cos = [0.5 * 0.1 * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    lrs = [P.lr_at(cfg, s, total) for s in range(total)]
    for s in range(10):
        assert abs(lrs[s] - cos[s] * (s + 1) / 10) < 1e-12
    assert all(abs(a - b) < 1e-12 for a, b in zip(lrs[10:], cos[10:]))
    assert all(lrs[s] < lrs[s + 1] for s in range(9))
    no = P.CifarPretrainConfig(epochs=10, lr=0.1, schedule="step")
    assert P.warmup_steps(no, total) == 0
    assert [P.lr_at(no, s, total) for s in (0, 49, 50, 75)] == pytest.approx([0.1, 0.1, 0.01, 0.001], rel=1e-12)
    # zero-initialised residual gammas: every block is the identity on its (non-negative) input
    from lrmt_fast.models.resnet_gn import BasicBlock
    m = P.make_model(P.CifarPretrainConfig(zero_init_residual=True))
    ref = P.make_model(P.CifarPretrainConfig())
    blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 15 and all(torch.count_nonzero(b.gn2.weight) == 0 for b in blocks)
    # same seed, same weights otherwise
    for (k, v), (_, w) in zip(m.state_dict().items(), ref.state_dict().items()):
        if not k.endswith("gn2.weight"):
            assert torch.equal(v, w), k
    x = torch.relu(torch.randn(2, 16, 8, 8))
    assert torch.equal(blocks[0](x), x)
    x = torch.relu(torch.randn(2, 16, 8, 8))
    sc = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(blocks[5](x), sc)           # first block of stage 2: the option-A shortcut
