"""experiments/studies/stability_check.py: the Hessian's top eigenvalue against exact ones, the
teacher's CE_A beside the students' meta-losses, and the command end to end on tiny data."""
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from experiments.studies.stability_check import main, top_hessian_eigenvalue
from lrmt_fast.data import cifar


def test_power_iteration_finds_the_largest_magnitude_eigenvalue_of_a_quadratic():
    for d, want in (([1.0, 3.0, 7.0], 7.0), ([-9.0, 2.0, 0.5], -9.0)):
        diag = torch.tensor(d, dtype=torch.float64)
        lam = top_hessian_eigenvalue(lambda ps: 0.5 * (diag * ps[0] ** 2).sum() + (ps[0] * 0.3).sum(),
                                     [torch.ones(3, dtype=torch.float64)], iters=200)
        assert lam == pytest.approx(want, rel=1e-6)


def test_power_iteration_matches_the_exact_hessian_of_softmax_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=g)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)

    def loss(ps):
        return F.cross_entropy(x @ ps[0].T + ps[1], y)

    flat = torch.cat([w.reshape(-1), b])
    h = torch.autograd.functional.hessian(lambda f: loss([f[:24].view(4, 6), f[24:]]), flat)
    exact = float(torch.linalg.eigvalsh(h).max())     # convex: the largest eigenvalue is the largest in magnitude
    assert top_hessian_eigenvalue(loss, [w, b], iters=300) == pytest.approx(exact, rel=1e-5)


@pytest.fixture
def tiny_cifar(tmp_path):
    data = str(tmp_path / "data")
    cifar.write_tiny_cifar(data, n_train_per_class=6, n_test_per_class=2, seed=3)
    yield data
    cifar.clear_cache()


def _run(tiny_cifar, tmp_path, *extra):
    out = tmp_path / "check.json"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["--experiment", "exp1-cifar", "--data-root", tiny_cifar, "--profile", "smoke", "--cache-dir",
                   str(tmp_path / "cache"), "--no-download", "--out", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_command_on_tiny_cifar(tiny_cifar, tmp_path, capsys):
    res = _run(tiny_cifar, tmp_path, "--lrs", "0.1,1e-4", "--steps", "3", "--batch", "16", "--iters", "10",
               "--episodes", "2", "--curriculum-steps", "3")
    lam = res["lambda_max"]
    assert math.isfinite(lam) and lam > 0 and res["max_stable_lr"] == pytest.approx(2.0 / lam)
    assert res["teacher"] == {"kind": "multitask", "loss": "union", "c": 0.5, "layers": []}
    assert set(res["teacher_task_a_loss"]) == {"0.1", "0.0001"}
    assert all(len(v) == 3 for v in res["teacher_task_a_loss"].values())
    # the teacher's own CE_A, one per step, before each step: the first is that of the checkpoint
    assert all(len(v) == 3 and all(x > 0 for x in v) for v in res["teacher_ce_a_own_batch"].values())
    # a step far below 2/lambda barely moves Task A's loss
    assert all(abs(v - res["task_a_loss"]) < 0.05 * res["task_a_loss"] + 1e-3
               for v in res["teacher_task_a_loss"]["0.0001"])
    # the curriculum rollout: per lr, two students and the teacher's CE_A, 3 steps of 2 episodes; a
    # teacher at lr 1e-4 barely leaves w0, so the frozen student's loss is ~1000x smaller than at 0.1
    cur = res["curriculum"]
    assert cur["episodes"] == 2 and cur["steps"] == 3 and set(cur["by_lr"]) == {"0.1", "0.0001"}
    for v in cur["by_lr"].values():
        assert set(v["mean_per_step"]) == {"freeze", "sgd", "teacher_ce_a"}
        assert all(len(c) == 3 and all(math.isfinite(x) and x >= 0 for x in c) for c in v["mean_per_step"].values())
        assert set(v["episode_end_step"]) == {"freeze", "sgd"}
        assert all(len(e[t]) == 2 and all(s is None or 1 <= s <= 3 for s in e[t])
                   for e in v["episode_end_step"].values() for t in ("start", "max"))
    slow, fast = cur["by_lr"]["0.0001"]["mean_per_step"], cur["by_lr"]["0.1"]["mean_per_step"]
    assert 0 < slow["freeze"][0] < 1e-2 * fast["freeze"][0]
    assert cur["by_lr"]["0.0001"]["episode_end_step"]["freeze"]["start"] == [None, None]
    text = capsys.readouterr().out
    assert "plain SGD on Task A is stable for lr <" in text and "teacher_ce_a" in text and "CE_A on its own batch" in text


def test_teacher_loss_option_switches_the_teacher(tiny_cifar, tmp_path):
    """--teacher-loss sum steps Task A's part at the full lr: with the same batches its CE_A moves
    more than the union-batch teacher's (half the step on Task A)."""
    union = _run(tiny_cifar, tmp_path, "--lrs", "0.5", "--steps", "4", "--batch", "16", "--iters", "2")
    summed = _run(tiny_cifar, tmp_path, "--lrs", "0.5", "--steps", "4", "--batch", "16", "--iters", "2",
                  "--teacher-loss", "sum")
    assert summed["teacher"]["loss"] == "sum" and union["teacher"]["loss"] == "union"
    u, s = union["teacher_task_a_loss"]["0.5"], summed["teacher_task_a_loss"]["0.5"]
    assert u != s and union["lambda_max"] == pytest.approx(summed["lambda_max"])


def test_meta_student_rolls_out_a_trained_meta_learner(tiny_cifar, tmp_path, capsys):
    """``--meta CKPT``: a third student. A meta-learner at its initialisation (delta = 1) takes
    plain SGD steps, so its curve is the ``sgd`` student's; one whose output layer gives delta = 0
    never moves the trunk, so its curve is the ``freeze`` student's."""
    from lrmt_fast.config import config_path, load_spec
    from lrmt_fast.meta_training import build_meta_learner, save_meta_checkpoint
    from lrmt_fast.pretrain_cifar import CifarPretrainConfig, make_model

    spec = load_spec(config_path("exp1_cifar.json"), "smoke", CifarPretrainConfig)
    mcfg = spec.metatrain
    model = make_model(spec.pretrain)
    paths = {}
    for name, b_out in (("init", None), ("zero", 0.0)):
        meta = build_meta_learner(model, mcfg.hidden, mcfg.hidden_gn)
        if b_out is not None:
            with torch.no_grad():
                for lay in meta.layers:
                    meta.learner(lay).b_out.fill_(b_out)
        paths[name] = str(tmp_path / f"meta_{name}.pt")
        save_meta_checkpoint(paths[name], meta, torch.optim.Adam(meta.parameters()), mcfg, 0, [])
    curves = {}
    for name, path in paths.items():
        res = _run(tiny_cifar, tmp_path, "--lrs", "0.1", "--steps", "1", "--batch", "16", "--iters", "2",
                   "--episodes", "2", "--curriculum-steps", "4", "--meta", path)
        assert res["curriculum"]["meta"] == path
        curves[name] = res["curriculum"]["by_lr"]["0.1"]["mean_per_step"]
    assert set(curves["init"]) == {"freeze", "sgd", "meta", "teacher_ce_a"}
    assert curves["init"]["meta"] == pytest.approx(curves["init"]["sgd"], rel=1e-5, abs=1e-7)
    assert curves["zero"]["meta"] == pytest.approx(curves["zero"]["freeze"], rel=1e-5, abs=1e-7)
    assert curves["zero"]["sgd"][-1] > 1.01 * curves["zero"]["freeze"][-1] or \
        curves["zero"]["sgd"][-1] < 0.99 * curves["zero"]["freeze"][-1]     # the two cases differ
    assert "meta " in capsys.readouterr().out


def test_meta_without_episodes_or_bad_checkpoint(tiny_cifar, tmp_path, capsys):
    """``--meta`` without ``--episodes`` is a usage error; a corrupt ``--meta`` file is a clear
    error naming it, not a traceback deep in the rollout."""
    from lrmt_fast.checkpoint import CheckpointError
    with pytest.raises(SystemExit) as e:
        main(["--meta", "x.pt"])
    assert e.value.code == 2 and "give --episodes E > 0 too" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with warnings.catch_warnings(), pytest.raises(CheckpointError) as e:
        warnings.simplefilter("ignore")
        main(["--experiment", "exp1-cifar", "--data-root", tiny_cifar, "--profile", "smoke", "--cache-dir",
              str(tmp_path / "cache"), "--no-download", "--lrs", "0.1", "--steps", "1", "--batch", "16",
              "--iters", "2", "--episodes", "1", "--curriculum-steps", "2", "--meta", str(bad)])
    assert str(bad) in str(e.value)
