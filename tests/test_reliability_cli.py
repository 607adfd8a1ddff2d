"""The defects of the reliability issue that show at the command line, each as its reproduction:
a non-finite meta-training (2) or meta-test (8), two runs on one --out (4), unknown (5) and
mistyped (6) config keys, damaged run caches (9), the advice about a user's own checkpoint (10),
late checks and signals (11). Tiny MNIST-shaped data; every case runs `lrmt exp1-mnist`."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lrmt_fast.checkpoint import load_checkpoint
from test_exp1_cli import ROOT, run_cli, sub_env, write_fake_data

pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fake_data(str(tmp_path_factory.mktemp("rel_data") / "data"))


FAST = None


@pytest.fixture(scope="module", autouse=True)
def fast_profile(tmp_path_factory):
    """exp1_mnist.json with a profile ``fast``: smoke with two methods and one seed."""
    from lrmt_fast.config import CONFIG_DIR
    global FAST
    with open(os.path.join(CONFIG_DIR, "exp1_mnist.json")) as f:
        cfg = json.load(f)
    cfg["profiles"]["fast"] = {"extends": "smoke", "methods": {"sgd": {"kind": "sgd"}, "ours": {"kind": "ours"}},
                               "seeds": 1}
    FAST = str(tmp_path_factory.mktemp("rel_cfg") / "fast.json")
    with open(FAST, "w") as f:
        json.dump(cfg, f)
    return FAST


def args(data, out, *extra):
    return ["exp1-mnist", "--profile", "fast", "--config", FAST, "--data-root", data, "--out", str(out),
            "--no-progress", "--no-download", *extra]


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def config_with(tmp_path, **sections):
    """exp1_mnist.json with a profile ``bad`` that extends ``smoke`` and sets ``sections``."""
    from lrmt_fast.config import CONFIG_DIR
    with open(os.path.join(CONFIG_DIR, "exp1_mnist.json")) as f:
        cfg = json.load(f)
    cfg["profiles"]["bad"] = {"extends": "smoke", **sections}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    return str(path)


# --------------------------------------------------------------------------- 2 and 8: NaN
def test_nan_in_metatraining_stops_naming_it_and_keeps_the_checkpoint(data, tmp_path):
    """lr 1e20: every step's meta-loss is NaN. No step reaches Adam; after max_bad_steps in a row the
    run stops with one line naming NaN; no DONE marker; the checkpoint written before is finite and
    loadable; a rerun fails the same way instead of reusing a poisoned meta-learner."""
    out = tmp_path / "nan"
    argv = args(data, out, "--set", "metatrain.lr=1e20", "--set", "metatrain.max_bad_steps=2")
    rc, _, err = run_cli(argv)
    line = one_line(err)
    assert rc == 1 and "NaN" in line and "episode 1" in line and "skipped" in line
    (mdir,) = [d for d in (out / "cache").iterdir() if d.name.startswith("meta-")]
    assert not (mdir / "DONE").exists()
    ck = load_checkpoint(str(mdir / "meta_ckpt.pt"))
    assert all(torch.isfinite(v).all() for v in ck["meta_state"].values())
    assert [h.get("nonfinite") for h in ck["history"]] == ["loss"]         # episode 0, checkpointed
    rc2, _, err2 = run_cli(argv)
    assert rc2 == 1 and "NaN" in one_line(err2)
    assert not (out / "results.json").exists()


def test_nan_at_meta_test_is_flagged_and_exits_nonzero(data, tmp_path):
    """meta_lr 1e6: the meta-learner's update blows the student up at meta-test. The run writes
    results.json and table.md that flag the method, and exits non-zero with one line."""
    out = tmp_path / "nan_test"
    rc, log, err = run_cli(args(data, out, "--set", "metatrain.meta_lr=1e6"))
    line = one_line(err)
    assert rc == 1 and "non-finite" in line and "ours" in line
    res = json.load(open(out / "results.json"))
    assert res["nonfinite_runs"] == {"ours": [0]} and "sgd" not in res["nonfinite_runs"]
    assert "ours **(non-finite: seeds [0])**" in open(out / "table.md").read()


# --------------------------------------------------------------------------- 4: one run per --out
def test_two_runs_on_one_out_folder(data, tmp_path):
    """While one run holds --out, a second exits non-zero naming the holder; the first finishes and
    its config.json and results.json agree."""
    out = tmp_path / "shared"
    env = sub_env()
    cmd = [sys.executable, "-m", "lrmt_fast", *args(data, out, "--seeds", "2")]
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / ".lrmt.lock").exists() or not (out / ".lrmt.lock").read_text().strip():
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.2)
    second = subprocess.run([sys.executable, "-m", "lrmt_fast", *args(data, out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    o, e = first.communicate(timeout=600)
    assert first.returncode == 0, e
    line = one_line(second.stderr)
    assert second.returncode == 1 and "in use by process" in line and str(first.pid) in line
    assert json.load(open(out / "config.json"))["seeds"] == json.load(open(out / "results.json"))["seeds"] == [0, 1]
    assert not [f for f in os.listdir(out) if ".tmp" in f]


# --------------------------------------------------------------------------- 5 and 6: configs
@pytest.mark.parametrize("sections, words", [
    ({"metatrain_budget": {"max_total_stepz": 10}}, ["metatrain_budget", "unknown key 'max_total_stepz'"]),
    ({"data": {"max_trian": 10}}, ["data", "unknown key 'max_trian'"]),
    ({"sedes": 3}, ["unknown key 'sedes'"]),
    ({"metatrain": {"lr": "0.05"}}, ["metatrain.lr", "expected a number", "\"0.05\""]),
    ({"metatrain": "x"}, ["metatrain", "expected an object"]),
    ({"metatrain": {"max_steps": 8.0}}, ["metatrain.max_steps", "expected an integer"]),
    ({"metatrain": {"episodes": 0}}, ["metatrain.episodes", "must be > 0"]),
    ({"metatrain": {"episodes": -1}}, ["metatrain.episodes", "must be > 0"]),
    ({"metatrain": {"batch_b": 0}}, ["metatrain.batch_b", "must be > 0"]),
    ({"metatest": {"lr": None}}, ["metatest.lr", "expected a number"]),
    ({"methods": {"ours": {"kind": "ours", "trace": "yes"}}}, ["methods.ours", "trace must be true or false"]),
])
def test_bad_config_is_reported_before_any_work(data, tmp_path, sections, words):
    out = tmp_path / "o"
    rc, _, err = run_cli(["exp1-mnist", "--profile", "bad", "--config", config_with(tmp_path, **sections),
                          "--data-root", data, "--out", str(out), "--no-progress"])
    line = one_line(err)
    assert rc == 1 and "profile 'bad'" in line and all(w in line for w in words), line
    assert not out.exists()                  # nothing was started: no Task A network, no folder


def test_bad_defaults_and_set_options(data, tmp_path):
    from lrmt_fast.config import CONFIG_DIR
    cfg = json.load(open(os.path.join(CONFIG_DIR, "exp1_mnist.json")))
    cfg["defaults"] = []
    path = tmp_path / "d.json"
    path.write_text(json.dumps(cfg))
    rc, _, err = run_cli(["exp1-mnist", "--profile", "smoke", "--config", str(path), "--data-root", data])
    assert rc == 1 and "'defaults' must be an object" in one_line(err)
    rc, _, err = run_cli(args(data, tmp_path / "o", "--set", "metatrain.lr=fast"))
    assert rc == 1 and "metatrain.lr: expected a number" in one_line(err)
    with pytest.raises(SystemExit):
        run_cli(args(data, tmp_path / "o", "--set", "nothing"))


# --------------------------------------------------------------------------- 9: damaged caches
def test_damaged_run_caches_are_recomputed_naming_them(data, tmp_path):
    out = tmp_path / "cache"
    rc, _, err = run_cli(args(data, out))
    assert rc == 0, err
    runs = out / "cache" / "runs"
    (sgd,) = runs.glob("sgd-seed0-*.json")
    (ours,) = runs.glob("ours-seed0-*.json")
    sgd.write_text("null")
    d = json.loads(ours.read_text())
    del d["task_a_readout"]
    ours.write_text(json.dumps(d))
    before = json.load(open(out / "results.json"))
    rc, log, err = run_cli(args(data, out))
    assert rc == 0, err
    assert f"the cached run {sgd} holds NoneType" in log and f"the cached run {ours} has no valid 'task_a_readout'" in log
    after = json.load(open(out / "results.json"))
    for m in ("sgd", "ours"):
        assert after["methods"][m]["joint_readout"] == before["methods"][m]["joint_readout"]


# --------------------------------------------------------------------------- 10: a user's own file
def test_bad_task_a_checkpoint_of_the_user_is_not_ours_to_delete(tmp_path):
    from lrmt_fast.data import cifar
    d = str(tmp_path / "cifar")
    cifar.write_tiny_cifar(d, n_train_per_class=6, n_test_per_class=2, seed=3)
    mine = tmp_path / "mine.pt"
    mine.write_text("some text, not a checkpoint")
    try:
        rc, _, err = run_cli(["exp1-cifar", "--profile", "smoke", "--data-root", d, "--taskA-ckpt", str(mine),
                              "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    finally:
        cifar.clear_cache()
    line = one_line(err)
    assert rc == 1 and str(mine) in line and "delete" not in line and "not a valid" in line


# --------------------------------------------------------------------------- 11: early checks, signals
def test_impl_errors_name_their_source_before_any_work(data, tmp_path, monkeypatch):
    import lrmt_fast.ops as ops
    out = tmp_path / "o"
    monkeypatch.setenv("LRMT_IMPL", "bogus")
    rc, _, err = run_cli(args(data, out))
    line = one_line(err)
    assert rc == 1 and "LRMT_IMPL" in line and "bogus" in line and not out.exists()
    monkeypatch.delenv("LRMT_IMPL")
    monkeypatch.setattr(ops, "available", lambda device=None: False)
    rc, _, err = run_cli(args(data, out, "--impl", "fused"))
    line = one_line(err)
    assert rc == 1 and "--impl fused" in line and "(LRMT_IMPL)" not in line and not out.exists()


def test_negative_durations_are_rejected(data):
    for cmd in (["exp1-cifar", "--profile", "smoke", "--dist-timeout", "-5"],):
        with pytest.raises(SystemExit) as e:
            run_cli(cmd)
        assert e.value.code == 2


def test_sigterm_is_handled_like_sigint(data, tmp_path):
    """A scheduler's SIGTERM during meta-training: the message says how to resume, exit status 143,
    and --resume continues from the checkpoint."""
    out = tmp_path / "term"
    argv = args(data, out, "--set", "metatrain.episodes=400", "--set", "metatrain.max_steps=4")
    p = subprocess.Popen([sys.executable, "-m", "lrmt_fast", *argv], cwd=ROOT, env=sub_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not list((out / "cache").glob("meta-*/meta_ckpt.pt")) if (out / "cache").exists() else True:
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    o, e = p.communicate(timeout=120)
    assert p.returncode == 143, (o, e)
    line = one_line(e)
    assert "SIGTERM" in line and "--resume" in line


def test_options_that_do_not_apply_are_refused(data, tmp_path, monkeypatch):
    """The validation split exists for the MNIST experiments only, and exp1-mnist runs in one process:
    both are one-line errors instead of being ignored."""
    rc, _, err = run_cli(["exp1-cifar", "--profile", "smoke", "--data-root", str(tmp_path / "none"),
                          "--set", "data.validation=true", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 1 and "data.validation is implemented for exp1-mnist" in one_line(err)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rc, _, err = run_cli(args(data, tmp_path / "o2"))
    assert rc == 1 and "runs in one process" in one_line(err) and not (tmp_path / "o2").exists()


def test_report_marks_nonfinite_runs(tmp_path):
    from lrmt_fast.results import aggregate, combined_table
    runs = {m: [{"seed": 0, "steps": [0, 5], "task_a_readout": [90.0, 80.0], "task_b_readout": [10.0, 70.0],
                 "task_a_original": [95.0, 60.0], "joint_readout": 55.0}] for m in ("sgd", "ours")}
    res = aggregate(runs, "x", "p", [0], {}, extra={"nonfinite_runs": {"ours": [0]}})
    text = combined_table([res])
    assert "| ours | 55.0 (non-finite: seeds [0]) |" in text and "| SGD | 55.0 |" in text
