"""experiments/studies/drift_check.py and rounding_check.py end to end on a tiny CIFAR-shaped
dataset (the smoke profile of exp1_cifar.json)."""
import json
import warnings

import pytest
import torch

from lrmt_fast import ops
from lrmt_fast.config import config_path, load_spec
from lrmt_fast.data import cifar
from lrmt_fast.meta_training import build_meta_learner, save_meta_checkpoint
from lrmt_fast.pretrain_cifar import CifarPretrainConfig, make_model


@pytest.fixture()
def tiny(tmp_path):
    data = str(tmp_path / "data")
    cifar.write_tiny_cifar(data, n_train_per_class=6, n_test_per_class=2, seed=3)
    yield {"data": data, "cache": str(tmp_path / "cache"), "tmp": tmp_path}
    cifar.clear_cache()


def _args(tiny, *extra):
    return ["--experiment", "exp1-cifar", "--data-root", tiny["data"], "--profile", "smoke", "--cache-dir",
            tiny["cache"], "--cache", str(tiny["tmp"] / "studies"), "--no-download", *extra]


def _spec():
    return load_spec(config_path("exp1_cifar.json"), "smoke", CifarPretrainConfig)


def _meta_ckpt(tiny, b_out):
    """A meta-learner checkpoint for the smoke network whose gate is the constant b_out."""
    spec = _spec()
    mcfg = spec.metatrain
    meta = build_meta_learner(make_model(spec.pretrain), mcfg.hidden, mcfg.hidden_gn)
    with torch.no_grad():
        for lay in meta.layers:
            meta.learner(lay).w_out.zero_()
            meta.learner(lay).b_out.fill_(b_out)
    path = str(tiny["tmp"] / f"meta_{b_out}.pt")
    save_meta_checkpoint(path, meta, torch.optim.Adam(meta.parameters()), mcfg, 0, [])
    return path


def _sgd_drift(tiny, steps):
    """||w_t - w_0|| / ||w_0|| over the adapted synapses after `steps` plain SGD steps of the
    "sgd" baseline from meta-test seed 0's start over its batches: computed without the trace."""
    from experiments.studies.tools import add_task_a_arguments, prepare
    from lrmt_fast.baselines import MethodContext, make_learner
    from lrmt_fast.meta_test import run_start
    from lrmt_fast.meta_learner import find_adapted_layers, pack_rows
    from lrmt_fast.student import param_dict
    import argparse
    p = argparse.ArgumentParser()
    add_task_a_arguments(p, "exp1-cifar", "smoke")
    _, spec, prep = prepare(p.parse_args(_args(tiny)), log=lambda m: None)
    model, mtest = prep.model, spec.metatest
    tasks, _ = prep.metatest_tasks([0])[0]
    start, stream = run_start(param_dict(model), *tasks.b2, mtest, 0)
    learner = make_learner({"kind": "sgd"}, MethodContext(model, param_dict(model), mtest.lr), dict(start))
    for _ in range(steps):
        learner.step(*stream.next())
    layers = find_adapted_layers(model)
    dw2 = sum(float((pack_rows(learner.params, l).double() - pack_rows(start, l).double()).pow(2).sum()) for l in layers)
    w02 = sum(float(pack_rows(start, l).double().pow(2).sum()) for l in layers)
    return (dw2 / w02) ** 0.5


def test_drift_check(tiny, capsys):
    """The meta-learner at init drifts exactly as the "sgd" baseline (all of it on non-negative
    gates); a meta-learner whose gate is -1 everywhere drifts only on negative gates."""
    from experiments.studies.drift_check import main
    out = tiny["tmp"] / "rows.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(_args(tiny, "--every", "2", "--meta", _meta_ckpt(tiny, -1.0), "--out", str(out)))
    assert rc == 0
    rows = json.loads(out.read_text())
    steps = _spec().metatest.steps
    want_steps = sorted({*range(2, steps + 1, 2), steps})
    sgd = [r for r in rows if r["name"].startswith("sgd")]
    neg = [r for r in rows if r["name"].startswith("ours")]
    assert [r["step"] for r in sgd] == [r["step"] for r in neg] == want_steps
    assert all(r["drift_neg"] == 0 and r["drift_pos"] > 0 for r in sgd)
    assert all(r["drift_pos"] == 0 and r["drift_neg"] > 0 for r in neg)
    assert sgd[-1]["drift_pos"] == pytest.approx(_sgd_drift(tiny, steps), rel=1e-5)
    assert all(r["train_loss"] > 0 for r in rows)
    assert "drift (delta < 0)" in capsys.readouterr().out


@pytest.mark.skipif(not ops.available("cpu"), reason="fused extension unavailable")
def test_rounding_check(tiny, capsys):
    """Three orders of the same arithmetic. A fresh meta-learner (w_out = 0: gate 1 whatever its
    state) moves the weights as SGD on all three paths, so they agree to rounding at every step;
    the LSTM cell states agree to rounding after the first step (one op call on the same inputs)
    and may drift apart after it (the next step's features are gradients at slightly different
    weights, normalised per group). A corrupt --meta is a one-line error."""
    from experiments.studies.rounding_check import main
    out = tiny["tmp"] / "rows.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(_args(tiny, "--steps", "3", "--batch", "8", "--out", str(out))) == 0
    rows = json.loads(out.read_text())
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("weights_inplace_vs_fused", "weights_fused_vs_reference", "cell_inplace_vs_fused"):
            assert 0 <= r[k][0] < 1e-6, (k, r)
        assert 0 <= r["cell_fused_vs_reference"][0] < (1e-5 if r["step"] == 1 else 1.0), r
        assert 0 < r["max_abs_c"] <= r["step"]            # |c| grows by at most 1 a step
    assert "fused vs reference" in capsys.readouterr().out
    bad = tiny["tmp"] / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(_args(tiny, "--meta", str(bad))) == 1
    err = capsys.readouterr().err
    assert err.startswith("rounding_check: error:") and str(bad) in err and err.count("\n") == 1
