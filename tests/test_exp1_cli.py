"""`lrmt exp1-mnist --profile smoke` end to end on tiny MNIST/FashionMNIST-shaped data written in
torchvision's raw IDX layout; interruption and --resume; cache reuse; the one-line errors of bad
input (checked through `python -m lrmt_fast` in subprocesses: no traceback); `lrmt report`;
the demo's config and the shipped data subset.

The pipeline runs once per module (fixture ``smoke``), as one sequence:
interrupted meta-training -> --resume -> interrupted meta-test -> finishing rerun; later tests
look at what it left and rerun from copies of its output folder.
"""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from lrmt_fast.cli import main
from lrmt_fast.data import write_torchvision_layout
from lrmt_fast.results import DISPLAY, REQUIRED_METHODS, load_results, mean_sem

# the smoke profile's methods: the paper's seven and SGD at half the learning rate (the trivial
# imitation of the union-batch teacher), in the table's order
METHODS = ["freeze", "sgd", "sgd_x0.1", "sgd_x0.5", "lwf", "ewc", "ours", "teacher"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
REAL_DATA = os.path.join(ROOT, "data")
# N_TRAIN = the smoke profile's cap (max_train 1000: 16 pretraining steps, enough for a Task A head
# well above chance); N_TEST below its readout test subset (test_size 300), so the readouts and the
# "original" head use the whole test set
N_TRAIN, N_TEST = 1000, 100


def fake_digits(n, seed):
    """uint8 [n, 28, 28] noise with a bright patch whose place gives the class (labels 0..9)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 180, size=(n, 28, 28))
    for i, c in enumerate(y):
        r, col = divmod(int(c), 5)
        x[i, 4 + 10 * r: 12 + 10 * r, 1 + 5 * col: 5 + 5 * col] = 255
    return x.astype(np.uint8), y.astype(np.uint8)


def write_fake_data(root):
    for name, s in (("MNIST", 0), ("FashionMNIST", 1)):
        trx, tr_y = fake_digits(N_TRAIN, s)
        tex, te_y = fake_digits(N_TEST, s + 10)
        write_torchvision_layout(root, name, trx, tr_y, tex, te_y)
    return root


def run_cli(argv):
    """``lrmt`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


# the smoke profile as shipped, with one meta-test seed instead of its two (halves the time on a
# shared 2-core CPU); aggregation over several seeds is checked by test_aggregate_over_seeds
SEEDS = [0]
N_RUNS = len(METHODS) * len(SEEDS)


def smoke_args(data, out, *extra):
    return ["exp1-mnist", "--profile", "smoke", "--data-root", data, "--out", out, "--device", "cpu",
            "--no-progress", "--no-download", "--seeds", str(len(SEEDS)), *extra]


def methods_wo_timing(res):
    """results["methods"] without the wall-clock seconds of each run (the rest is deterministic)."""
    out = json.loads(json.dumps(res["methods"]))
    for e in out.values():
        for r in e["runs"]:
            r.pop("seconds", None)
    return out


def sub_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", LRMT_NO_DOWNLOAD="1")
    env.pop("LRMT_DEBUG", None)
    env.pop("LRMT_DATA", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_files(out):
    d = os.path.join(out, "cache", "runs")
    return sorted(f for f in os.listdir(d) if f.endswith(".json")) if os.path.isdir(d) else []


def meta_dir(out):
    (d,) = [os.path.join(out, "cache", x) for x in os.listdir(os.path.join(out, "cache")) if x.startswith("meta-")]
    return d


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return write_fake_data(str(tmp_path_factory.mktemp("exp1_data") / "data"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, fake_data):
    import lrmt_fast.meta_test as ev
    import lrmt_fast.meta_training as common

    base = tmp_path_factory.mktemp("exp1")
    data = fake_data
    out = str(base / "out")
    rec = {"data": data, "out": out, "base": str(base)}
    with pytest.MonkeyPatch.context() as mp:
        # 1. meta-training interrupted (Ctrl-C) at the start of episode 2 of 3
        real_new_episode = common.FreshHeadStream.new_episode

        def new_episode(self, episode, gen):
            if episode == 2:
                raise KeyboardInterrupt
            return real_new_episode(self, episode, gen)

        mp.setattr(common.FreshHeadStream, "new_episode", new_episode)
        rec["interrupt_mt"] = run_cli(smoke_args(data, out))
        from lrmt_fast.checkpoint import load_checkpoint
        ck = load_checkpoint(os.path.join(meta_dir(out), "meta_ckpt.pt"))
        rec["ckpt_after_interrupt"] = {"next_episode": ck["next_episode"], "history": ck["history"],
                                       "done": os.path.exists(os.path.join(meta_dir(out), "DONE")),
                                       "runs": run_files(out)}
        mp.setattr(common.FreshHeadStream, "new_episode", real_new_episode)

        # 2. --resume finishes meta-training; the meta-test is interrupted after 5 runs
        calls = []
        real_rollout = ev.rollout

        def rollout(*a, **k):
            calls.append(1)
            if len(calls) == 6:
                raise KeyboardInterrupt
            return real_rollout(*a, **k)

        mp.setattr(ev, "rollout", rollout)
        rec["resume"] = run_cli(smoke_args(data, out, "--resume"))
        rec["runs_after_interrupt"] = run_files(out)
        rec["done_after_resume"] = os.path.exists(os.path.join(meta_dir(out), "DONE"))
        mp.setattr(ev, "rollout", real_rollout)

        # 3. a plain rerun runs only the meta-test runs still missing
        made = []
        real_make = ev.make_learner
        mp.setattr(ev, "make_learner", lambda *a, **k: made.append(a[0]) or real_make(*a, **k))
        rec["finish"] = run_cli(smoke_args(data, out))
        rec["made_in_finish"] = len(made)
    rec["results"] = json.load(open(os.path.join(out, "results.json")))
    return rec


# --------------------------------------------------------------------------- the run and its outputs
def test_interrupted_metatraining_resumes_from_its_checkpoint(smoke):
    rc, _, err = smoke["interrupt_mt"]
    assert rc == 130 and "--resume" in err and len(err.strip().splitlines()) == 1
    ck = smoke["ckpt_after_interrupt"]
    assert ck["next_episode"] == 2 and len(ck["history"]) == 2 and not ck["done"] and ck["runs"] == []
    rc, log, _ = smoke["resume"]
    assert rc == 130                        # the meta-test interruption of the same call
    assert "starting over" not in log
    assert smoke["done_after_resume"]
    hist = json.load(open(os.path.join(smoke["out"], "metatrain_history.json")))
    assert [h["episode"] for h in hist] == [0, 1, 2]
    assert hist[:2] == ck["history"]        # continued from the checkpoint, not restarted
    assert smoke["results"]["metatrain_summary"]["episodes"] == 3


def test_interrupted_metatest_keeps_finished_runs(smoke):
    assert len(smoke["runs_after_interrupt"]) == 5
    rc, log, err = smoke["finish"]
    assert rc == 0, err
    assert "reusing the finished meta-learner" in log and "task A: reusing" in log
    assert smoke["made_in_finish"] == N_RUNS - 5             # only the missing (method, seed) runs
    assert set(smoke["runs_after_interrupt"]) <= set(run_files(smoke["out"]))


def test_results_json_schema(smoke):
    res = smoke["results"]
    assert res["experiment"] == "exp1-mnist" and res["profile"] == "smoke"
    assert res["seeds"] == SEEDS
    cfg = res["config"]
    assert isinstance(cfg, dict)
    assert cfg["metatest"]["steps"] == 20 and cfg["metatest"]["every"] == 10
    info = cfg["data_info"]
    assert info["task_a_train"] == info["task_b_train"] == N_TRAIN and info["task_a_test"] == N_TEST
    assert info["d_b1"] == info["d_b2"] == N_TRAIN // 2
    assert set(res["methods"]) == set(METHODS) and set(REQUIRED_METHODS) < set(METHODS)
    for name, e in res["methods"].items():
        assert e["steps"] == [0, 10, 20], name
        for key in ("task_a_readout", "task_b_readout", "task_a_original", "task_b_head"):
            assert set(e[key]) == {"mean", "sem"}
            assert len(e[key]["mean"]) == len(e[key]["sem"]) == 3
            assert all(0.0 <= v <= 100.0 for v in e[key]["mean"]) and all(s >= 0 for s in e[key]["sem"])
        j = e["joint_readout"]
        assert set(j) == {"mean", "sem"} and 0.0 <= j["mean"] <= 100.0 and j["sem"] >= 0
        # the aggregate is the mean and s.e.m. over the per-seed runs
        assert [r["seed"] for r in e["runs"]] == SEEDS
        for key in ("task_a_readout", "task_b_readout", "task_a_original"):
            for i in range(3):
                m, s = mean_sem([r[key][i] for r in e["runs"]])
                assert e[key]["mean"][i] == pytest.approx(m, abs=1e-3)
                assert e[key]["sem"][i] == pytest.approx(s, abs=1e-3)
        m, s = mean_sem([r["joint_readout"] for r in e["runs"]])
        assert j["mean"] == pytest.approx(m, abs=1e-3) and j["sem"] == pytest.approx(s, abs=1e-3)
    assert load_results(os.path.join(smoke["out"], "results.json"))   # the documented validator agrees


def test_results_are_consistent_with_the_protocol(smoke):
    meths = smoke["results"]["methods"]
    acc_a = smoke["results"]["config"]["task_a_test_acc"]
    assert acc_a > 30.0        # the Task A network learned something (10 classes)
    for i in range(len(SEEDS)):
        runs = {m: e["runs"][i] for m, e in meths.items()}
        for m, r in runs.items():
            # step 0: every method starts from the Task A checkpoint, so the same readouts,
            # and the original head is the Task A model's own test accuracy
            assert r["task_a_readout"][0] == runs["freeze"]["task_a_readout"][0], m
            assert r["task_b_readout"][0] == runs["freeze"]["task_b_readout"][0], m
            assert r["task_a_original"][0] == pytest.approx(acc_a, abs=1e-3), m
        # Freeze trains head_b only: the trunk, hence every readout and the old head, never change
        fr = runs["freeze"]
        for key in ("task_a_readout", "task_b_readout", "task_a_original"):
            assert len(set(fr[key])) == 1, key


def test_table_and_curves(smoke):
    out = smoke["out"]
    table = open(os.path.join(out, "table.md")).read()
    lines = table.strip().splitlines()
    assert lines[0].startswith(f"**exp1-mnist** (profile `smoke`, {len(SEEDS)} seed(s)")
    assert "after 20 update steps" in lines[0]
    assert lines[2].startswith("| method | joint readout (Table 1) | Task A readout | Task B readout |")
    rows = [l for l in lines[4:] if l.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == [DISPLAY[m] for m in METHODS]
    res = smoke["results"]
    for r, m in zip(rows, METHODS):
        j = res["methods"][m]["joint_readout"]
        assert r.split("|")[2].strip().startswith(f"{j['mean']:.1f}")
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == PNG
    assert os.path.getsize(os.path.join(out, "curves.png")) > 5000
    # the table is also printed
    assert lines[0] in smoke["finish"][1]


def test_output_and_cache_layout(smoke):
    out = smoke["out"]
    for f in ("results.json", "table.md", "curves.png", "config.json", "metatrain_history.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    cache = os.listdir(os.path.join(out, "cache"))
    assert len([f for f in cache if f.startswith("taskA-") and f.endswith(".pt")]) == 1
    assert sorted(os.listdir(meta_dir(out))) == ["DONE", "meta_ckpt.pt"]
    runs = run_files(out)
    assert len(runs) == N_RUNS
    for m in METHODS:
        for s in SEEDS:
            assert len([f for f in runs if f.startswith(f"{m}-seed{s}-")]) == 1
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["profile"] == "smoke" and cfg["seeds"] == SEEDS
    # Figures 6 and 7 (meta-training curriculum; the gate delta during the meta-test of "ours")
    res = smoke["results"]
    assert res["figures"] == {"figure6": "fig6_curriculum.png", "figure7": "fig7_delta_hist.png"}
    for f in ("fig6_curriculum.png", "fig7_delta_hist.png"):
        with open(os.path.join(out, f), "rb") as fh:
            assert fh.read(8) == PNG
    from lrmt_fast.meta_learner import find_adapted_layers
    from lrmt_fast.models.lenet import LeNet
    synapses = sum(l.cout * l.p for l in find_adapted_layers(LeNet()))
    assert res["delta_summary"]["all"]["n"] == synapses * res["config"]["metatest"]["steps"] * len(SEEDS)
    assert json.load(open(os.path.join(out, "delta_hist.json")))["summary"] == res["delta_summary"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_rerun_reuses_every_cached_stage(smoke, monkeypatch):
    import lrmt_fast.meta_test as ev
    import lrmt_fast.meta_training as mt
    import lrmt_fast.pretrain as pt

    def fail(*a, **k):
        pytest.fail("a cached stage was recomputed")

    monkeypatch.setattr(pt, "pretrain", fail)
    monkeypatch.setattr(mt, "metatrain", fail)
    monkeypatch.setattr(ev, "make_learner", fail)
    before = {f: os.path.getmtime(os.path.join(smoke["out"], "cache", "runs", f)) for f in run_files(smoke["out"])}
    rc, log, err = run_cli(smoke_args(smoke["data"], smoke["out"]))
    assert rc == 0, err
    assert "task A: reusing" in log and "reusing the finished meta-learner" in log
    after = {f: os.path.getmtime(os.path.join(smoke["out"], "cache", "runs", f)) for f in run_files(smoke["out"])}
    assert after == before
    res = json.load(open(os.path.join(smoke["out"], "results.json")))
    assert methods_wo_timing(res) == methods_wo_timing(smoke["results"])


def test_aggregate_over_seeds(tmp_path):
    """results.aggregate / write_all on synthetic runs of 3 seeds: mean and s.e.m. (sample std / sqrt(n))."""
    from lrmt_fast.results import ResultsError, aggregate, write_all

    rng = np.random.default_rng(0)
    runs = {}
    for m in REQUIRED_METHODS:
        runs[m] = [{"seed": s, "seconds": 1.0, "steps": [0, 5, 10],
                    **{k: [float(v) for v in rng.uniform(10, 90, 3)]
                       for k in ("task_a_readout", "task_b_readout", "task_a_original", "task_b_head")},
                    "joint_readout": float(rng.uniform(10, 90))} for s in (0, 1, 2)]
    res = aggregate(runs, "exp1-mnist", "smoke", [0, 1, 2], {"x": 1}, extra={"timings": {"total_s": 1.0}})
    assert res["timings"] == {"total_s": 1.0}
    for m in REQUIRED_METHODS:
        e = res["methods"][m]
        for key in ("task_a_readout", "task_b_readout", "task_a_original", "task_b_head"):
            vals = np.array([r[key] for r in runs[m]])
            np.testing.assert_allclose(e[key]["mean"], vals.mean(0), atol=1e-4)
            np.testing.assert_allclose(e[key]["sem"], vals.std(0, ddof=1) / math.sqrt(3), atol=1e-4)
        j = np.array([r["joint_readout"] for r in runs[m]])
        assert e["joint_readout"]["mean"] == pytest.approx(j.mean(), abs=1e-4)
        assert e["joint_readout"]["sem"] == pytest.approx(j.std(ddof=1) / math.sqrt(3), abs=1e-4)
    paths = write_all(res, str(tmp_path))
    assert load_results(paths["json"]) == json.loads(json.dumps(res))
    assert "±" in open(paths["table"]).read()
    with open(paths["curves"], "rb") as f:
        assert f.read(8) == PNG
    runs["sgd"][1]["steps"] = [0, 5, 11]
    with pytest.raises(ResultsError, match="sgd"):
        aggregate(runs, "exp1-mnist", "smoke", [0, 1, 2], {})


def _copy_out(smoke, name):
    dst = os.path.join(smoke["base"], name)
    shutil.copytree(smoke["out"], dst)
    return dst


def _truncate(path):
    with open(path, "rb") as f:
        head = f.read(200)
    with open(path, "wb") as f:
        f.write(head)


def test_corrupt_task_a_checkpoint_and_run_file(smoke, monkeypatch):
    """A truncated Task A checkpoint: one-line error naming it. After deleting it (as the message
    says) a rerun retrains Task A (same key, so the later caches stay valid) and recomputes the
    one truncated meta-test run file, and nothing else."""
    import lrmt_fast.meta_test as ev

    out = _copy_out(smoke, "out_corrupt")
    (ta,) = [os.path.join(out, "cache", f) for f in os.listdir(os.path.join(out, "cache")) if f.startswith("taskA-")]
    _truncate(ta)
    rc, _, err = run_cli(smoke_args(smoke["data"], out))
    assert rc == 1
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in err
    assert "Task A checkpoint" in line and ta in line and "corrupt" in line and "delete it" in line

    os.remove(ta)
    victim = [f for f in run_files(out) if f.startswith("sgd-seed0-")][0]
    _truncate(os.path.join(out, "cache", "runs", victim))
    made = []
    real_make = ev.make_learner
    monkeypatch.setattr(ev, "make_learner", lambda spec, *a, **k: made.append(spec) or real_make(spec, *a, **k))
    rc, log, err = run_cli(smoke_args(smoke["data"], out))
    assert rc == 0, err
    assert "task A: trained" in log and "reusing the finished meta-learner" in log
    assert made == [{"kind": "sgd"}]
    json.load(open(os.path.join(out, "cache", "runs", victim)))              # rewritten whole
    res = json.load(open(os.path.join(out, "results.json")))
    assert methods_wo_timing(res) == methods_wo_timing(smoke["results"])    # the runs are deterministic


# --------------------------------------------------------------------------- bad input, through `python -m lrmt_fast`
# Each case runs `python -m lrmt_fast ARGS` (runpy, exactly as the interpreter's -m does) with its
# own stdout/stderr, all in one child interpreter: importing torch costs seconds per process on a
# shared CPU. An exception escaping the CLI would print its traceback into that case's stderr.
_DRIVER = r"""
import io, json, runpy, sys, traceback
cases = json.loads(sys.argv[1])
done = {}
for name, argv in cases.items():
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr, sys.argv
    sys.stdout, sys.stderr, sys.argv = out, err, ["lrmt_fast"] + argv
    code = "no exit"
    try:
        runpy.run_module("lrmt_fast", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = "exception"
    finally:
        sys.stdout, sys.stderr, sys.argv = saved
    done[name] = [code, out.getvalue(), err.getvalue()]
print("RESULTS=" + json.dumps(done))
"""


@pytest.fixture(scope="module")
def bad_runs(smoke):
    """The bad-input commands, each as `python -m lrmt_fast ...` in a child interpreter."""
    base = smoke["base"]
    meta_bad = _copy_out(smoke, "out_badmeta")
    meta_ckpt = os.path.join(meta_dir(meta_bad), "meta_ckpt.pt")
    _truncate(meta_ckpt)
    bad_json = os.path.join(base, "bad_results")
    os.makedirs(bad_json)
    with open(os.path.join(bad_json, "results.json"), "w") as f:
        f.write('{"experiment": "exp1-mnist", "methods": {')
    missing = os.path.join(base, "no_such_data")
    cases = {
        "bad_profile": ["exp1-mnist", "--profile", "smok", "--data-root", smoke["data"]],
        "corrupt_meta": smoke_args(smoke["data"], meta_bad),
        "corrupt_results": ["report", bad_json],
    }
    # the missing data root in a plain `python -m lrmt_fast` process of its own (the real entry
    # point and exit status), alongside the child that runs the other cases
    real = subprocess.Popen([sys.executable, "-m", "lrmt_fast", *smoke_args(missing, os.path.join(base, "o1"))],
                            cwd=base, env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], cwd=base, env=sub_env(),
                       capture_output=True, text=True, timeout=300)
    o, e = real.communicate(timeout=300)
    assert p.returncode == 0, p.stderr
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULTS=")][-1]
    done = {k: tuple(v) for k, v in json.loads(line[len("RESULTS="):]).items()}
    done["missing_root"] = (real.returncode, o, e)
    done["paths"] = {"missing": missing, "meta_ckpt": meta_ckpt, "bad_json": os.path.join(bad_json, "results.json")}
    return done


def _one_line_error(result, status=1):
    rc, _, err = result
    assert rc == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_missing_data_root_is_named(bad_runs):
    line = _one_line_error(bad_runs["missing_root"])
    assert line.startswith("lrmt exp1-mnist: error:")
    assert os.path.join(bad_runs["paths"]["missing"], "MNIST", "raw") in line
    assert "--data-root" in line and "LRMT_DATA" in line


def test_no_data_root_at_all(tmp_path, monkeypatch):
    monkeypatch.delenv("LRMT_DATA", raising=False)
    rc, _, err = run_cli(["exp1-mnist", "--profile", "smoke", "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "no data root" in err and "--data-root" in err and "LRMT_DATA" in err


def _partial_data(fake_data, tmp_path, damage):
    data = str(tmp_path / "data")
    shutil.copytree(fake_data, data)
    damage(data)
    return run_cli(smoke_args(data, str(tmp_path / "o")))


def test_missing_raw_file_is_named(fake_data, tmp_path):
    rc, _, err = _partial_data(fake_data, tmp_path, lambda d: os.remove(
        os.path.join(d, "FashionMNIST", "raw", "t10k-labels-idx1-ubyte")))
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "FashionMNIST" in err and "t10k-labels-idx1-ubyte" in err


def test_truncated_raw_file_is_called_corrupt(fake_data, tmp_path):
    rc, _, err = _partial_data(fake_data, tmp_path, lambda d: _truncate(
        os.path.join(d, "MNIST", "raw", "train-images-idx3-ubyte")))
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "MNIST" in err and "not found" not in err
    assert "corrupt" in err or "unreadable" in err


def test_wrong_profile_name(bad_runs, tmp_path):
    line = _one_line_error(bad_runs["bad_profile"])
    assert "unknown profile 'smok'" in line and "smoke" in line and "quick" in line
    # a --config file without the profile: a ConfigError naming the choices
    cfg = tmp_path / "mine.json"
    cfg.write_text(json.dumps({"experiment": "x", "defaults": {"methods": {"sgd": {"kind": "sgd"}}},
                               "profiles": {"tiny": {}}}))
    rc, _, err = run_cli(["exp1-mnist", "--profile", "smoke", "--config", str(cfg), "--data-root", "x"])
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "unknown profile 'smoke'" in err and "tiny" in err
    # ... and a profile name of its own is accepted (the run goes on to the missing data root)
    rc, _, err = run_cli(["exp1-mnist", "--profile", "tiny", "--config", str(cfg), "--data-root",
                          str(tmp_path / "no_data"), "--no-download"])
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "unknown profile" not in err and "no_data" in err


def test_profile_extends(tmp_path):
    from lrmt_fast.config import ConfigError, resolve_profile
    cfg = tmp_path / "ext.json"
    base = {"metatrain": {"lr": 0.1, "max_steps": 500}, "methods": {"sgd": {"kind": "sgd"}}, "seeds": 5}
    profiles = {
        "cpu": {"_doc": "cpu", "metatrain": {"max_steps": 100}, "seeds": 2},
        "cpu_finish": {"_doc": "f", "extends": "cpu", "pretrain": {"finish_epochs": 4},
                       "methods": {"ours": {"kind": "ours"}}},
        "cpu_finish_avg": {"extends": "cpu_finish", "pretrain": {"finish_average_epochs": 2}},
    }
    cfg.write_text(json.dumps({"experiment": "x", "defaults": base, "profiles": profiles}))
    r = resolve_profile(str(cfg), "cpu_finish_avg")
    assert r["metatrain"] == {"lr": 0.1, "max_steps": 100} and r["seeds"] == 2
    assert r["pretrain"] == {"finish_epochs": 4, "finish_average_epochs": 2}
    assert r["methods"] == {"ours": {"kind": "ours"}}          # replaced as a whole, as without
    assert "extends" not in r and r["profile"] == "cpu_finish_avg"
    assert resolve_profile(str(cfg), "cpu")["metatrain"] == {"lr": 0.1, "max_steps": 100}
    for bad, words in [({"a": {"extends": "b"}, "b": {"extends": "a"}}, ["cycle", "a -> b -> a"]),
                       ({"a": {"extends": "nope"}}, ["unknown profile 'nope'", "extended by 'a'"]),
                       ({"a": {"extends": 3}}, ["'extends' must name another profile"]),
                       ({"a": {"extends": "a"}}, ["cycle", "a -> a"])]:
        cfg.write_text(json.dumps({"experiment": "x", "profiles": bad}))
        with pytest.raises(ConfigError) as e:
            resolve_profile(str(cfg), "a")
        assert all(w in str(e.value) for w in words), str(e.value)


def test_shipped_profiles_share_their_defaults():
    """The CIFAR configs start from cifar_base.json and differ from each other only where the paper's
    experiments do; the CPU and quick profiles resolve to the settings their committed checkpoints'
    keys were made with; every profile validates whole."""
    from lrmt_fast.config import CONFIG_DIR, load_spec, profile_names, resolve_profile
    from lrmt_fast.suite import EXPERIMENTS

    for exp in EXPERIMENTS.values():
        path = os.path.join(CONFIG_DIR, exp.config)
        for prof in profile_names(path):
            spec = load_spec(path, prof, exp.pretrain_cls)
            assert spec.methods["sgd_x0.5"] == {"kind": "sgd", "lr_scale": 0.5}, (exp.name, prof)
            assert set(REQUIRED_METHODS) <= set(spec.methods), (exp.name, prof)

    def without(c, *keys):      # a resolved profile less its name and ``keys``
        return {k: v for k, v in c.items() if k not in keys + ("profile", "experiment")}

    d = CONFIG_DIR
    e1, e2, e3 = (os.path.join(d, f) for f in ("exp1_cifar.json", "exp2_cifar100.json", "exp3_unseen_init.json"))
    p1, p2, p3 = (resolve_profile(f, "paper") for f in (e1, e2, e3))
    assert without(p1, "metatrain") == without(p2, "metatrain") == without(p3, "metatrain", "pool")
    assert (p1["metatrain"]["episodes"], p1["metatrain"]["thresh_max"], p1["metatrain"]["bptt_max"]) == (900, 30, 9)
    assert (p2["metatrain"]["episodes"], p2["metatrain"]["thresh_max"], p2["metatrain"]["bptt_max"]) == (2000, 50, 17)
    assert p3["metatrain"] == p2["metatrain"] and p3["pool"] == {"n_train": 100, "seed0": 0}
    assert without(p1["metatrain"], "episodes", "thresh_max", "bptt_max") == \
        without(p2["metatrain"], "episodes", "thresh_max", "bptt_max")
    for f in (e1, e2):
        cpu, avg = (resolve_profile(f, p) for p in ("cpu", "cpu_finish_avg"))
        assert avg["metatrain"]["max_steps"] == 100 and cpu["metatrain"]["max_steps"] == 500
        assert avg["metatrain_budget"] == {"max_total_steps": 400, "chunk_episodes": 1}
        assert avg["methods"] == cpu["methods"] and cpu["seeds"] == 2
        assert avg["readout"]["train_size"] == 2000 and avg["metatest"]["every"] == 100
        assert avg["pretrain"] == dict(cpu["pretrain"], finish_epochs=4, finish_lr=0.2, finish_warmup_epochs=2,
                                       finish_average_epochs=2)
        quick, paper = (resolve_profile(f, p) for p in ("quick", "paper"))
        assert quick["pretrain"] == paper["pretrain"] and quick["metatrain_budget"]["max_total_steps"] == 4000
    avg3 = resolve_profile(e3, "cpu_finish_avg")
    assert avg3["pretrain"]["epochs"] == 6 and avg3["pretrain"]["finish_average_epochs"] == 2
    assert avg3["pool"] == {"n_train": 2, "seed0": 0}
    for f in (e1, e2, e3):
        for prof in ("quick", "paper"):      # the paper-scale runs trace the gate of "ours" (it only reads)
            assert resolve_profile(f, prof)["methods"]["ours"] == {"kind": "ours", "trace": True}


@pytest.mark.parametrize("argv, status, words", [
    (["--seeds", "0"], 2, ["invalid --seeds '0'"]),
    (["--seeds", "1,1"], 2, ["invalid --seeds '1,1'"]),
    (["--device", "tpu"], 2, ["invalid choice: 'tpu'"]),
])
def test_bad_options(fake_data, tmp_path, argv, status, words):
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
        main(["exp1-mnist", "--profile", "smoke", "--data-root", fake_data, "--out", str(tmp_path), *argv])
    assert e.value.code == status
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu(fake_data, tmp_path):
    rc, _, err = run_cli(smoke_args(fake_data, str(tmp_path)) + ["--device", "cuda"])
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "no CUDA GPU" in err


def test_corrupt_meta_checkpoint(bad_runs):
    line = _one_line_error(bad_runs["corrupt_meta"])
    assert "meta-learner checkpoint" in line and bad_runs["paths"]["meta_ckpt"] in line and "corrupt" in line


def test_report_on_corrupt_results_json(bad_runs, smoke, tmp_path):
    line = _one_line_error(bad_runs["corrupt_results"])
    assert line.startswith("lrmt report: error:") and bad_runs["paths"]["bad_json"] in line
    assert "not a readable JSON file" in line
    # valid JSON but not the documented shape
    bad = tmp_path / "results.json"
    res = json.loads(json.dumps(smoke["results"]))
    del res["methods"]["lwf"]["task_a_readout"]
    bad.write_text(json.dumps(res))
    rc, _, err = run_cli(["report", str(bad)])
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "lwf" in err and "task_a_readout" in err


def test_report_rebuilds_tables(smoke, tmp_path):
    md = tmp_path / "table1.md"
    rc, out, err = run_cli(["report", smoke["out"], "--details", "--out", str(md)])
    assert rc == 0, err
    text = md.read_text()
    assert text.strip() == out.strip()
    lines = text.splitlines()
    assert lines[0] == "| | exp1-mnist (smoke) |"
    for m in REQUIRED_METHODS:
        j = smoke["results"]["methods"][m]["joint_readout"]
        cell = f"{j['mean']:.1f} ± {j['sem']:.1f}" if j["sem"] else f"{j['mean']:.1f}"
        assert f"| {DISPLAY[m]} | {cell} |" in lines
    # --details appends the run's own table, identical to its table.md
    assert open(os.path.join(smoke["out"], "table.md")).read().strip() in text


# --------------------------------------------------------------------------- demo config and shipped subset
def test_demo_config_loads():
    from lrmt_fast.config import config_path, load_spec
    from lrmt_fast.suite import get

    exp = get("demo")
    spec = load_spec(config_path(exp.config), "demo", exp.pretrain_cls)
    assert spec.profile == "demo" and spec.data.source == "subset"
    assert set(REQUIRED_METHODS) <= set(spec.methods) and spec.seeds >= 1


def test_demo_command_wiring(tmp_path, monkeypatch):
    """`lrmt demo` hands the demo profile and the shipped subset to the shared pipeline (which is
    replaced here: the real demo takes minutes) and prints the table it gets back."""
    import lrmt_fast.pipeline as pipeline
    from lrmt_fast.results import aggregate

    seen = {}

    def fake_pipeline(spec, exp, sources, opts):
        seen.update(spec=spec, info=exp.load_tasks(spec, sources).describe(), out=opts.out, seeds=opts.seeds,
                    device=opts.device)
        runs = {m: [{"seed": 0, "steps": [0, 200], "task_a_readout": [90.0, 80.0], "task_b_readout": [10.0, 70.0],
                     "task_a_original": [95.0, 60.0], "joint_readout": 55.0}] for m in REQUIRED_METHODS}
        return {**aggregate(runs, spec.experiment, spec.profile, opts.seeds, {}), "timings": {"total_s": 1.0}}

    monkeypatch.setattr(pipeline, "run_experiment", fake_pipeline)
    out = str(tmp_path / "demo")
    rc, printed, err = run_cli(["demo", "--out", out, "--seeds", "1", "--device", "cpu", "--no-progress"])
    assert rc == 0, err
    assert seen["spec"].profile == "demo" and seen["spec"].experiment == "demo-mnist-fashion-subset"
    assert seen["info"]["source"] == "subset" and seen["info"]["task_a_train"] == 4000
    assert seen["out"] == out and seen["seeds"] == [0] and seen["device"] == "cpu"
    assert "**demo-mnist-fashion-subset** (profile `demo`, 1 seed(s)" in printed and "| Freeze | 55.0 |" in printed


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_exp1_profiles_load(profile):
    from lrmt_fast.baselines import MethodContext, make_learner
    from lrmt_fast.config import config_path, load_spec
    from lrmt_fast.suite import get

    exp = get("exp1-mnist")
    spec = load_spec(config_path(exp.config), profile, exp.pretrain_cls)
    assert spec.experiment == "exp1-mnist" and set(REQUIRED_METHODS) <= set(spec.methods)
    # every method spec is one make_learner accepts (options included)
    from tinynet import TinyNet, tiny_data
    from lrmt_fast.student import param_dict
    model = TinyNet()
    xa, ya, _, _ = tiny_data(n=8)
    w = param_dict(model)
    ctx = MethodContext(model, w, 0.05, xa, ya, meta=object(), fisher_samples=8)
    ctx._fisher = {k: torch.zeros_like(v) for k, v in w.items() if not k.startswith("head_")}
    for name, spec_m in spec.methods.items():
        if spec_m["kind"] == "ours":
            continue
        assert make_learner(spec_m, ctx, w, next_a=lambda: (xa, ya)).name == spec_m["kind"]


def test_shipped_subset_sizes():
    from lrmt_fast.data import SUBSET_FILE, load_subset_arrays, load_two_tasks

    assert os.path.isfile(SUBSET_FILE)
    arr = load_subset_arrays()
    for ds in ("mnist", "fashion"):
        for split, n in (("train", 4000), ("test", 1000)):
            x, y = arr[f"{ds}_{split}_x"], arr[f"{ds}_{split}_y"]
            assert x.shape == (n, 28, 28) and x.dtype == np.uint8 and y.shape == (n,)
            assert sorted(set(int(v) for v in y)) == list(range(10))
    tasks = load_two_tasks("mnist", "fashion", "subset")
    info = tasks.describe()
    assert (info["task_a_train"], info["task_a_test"], info["task_b_train"], info["task_b_test"]) == (4000, 1000,
                                                                                                      4000, 1000)
    assert info["d_b1"] == info["d_b2"] == 2000
    assert tasks.a.train_x.shape == (4000, 1, 28, 28) and tasks.a.train_x.dtype == torch.float32
    # normalised with the dataset's own statistics: roughly zero mean, unit std
    assert abs(float(tasks.a.train_x.mean())) < 0.2 and 0.8 < float(tasks.a.train_x.std()) < 1.2


@pytest.mark.realdata
@pytest.mark.skipif(not all(os.path.isdir(os.path.join(REAL_DATA, d, "raw")) for d in ("MNIST", "FashionMNIST")),
                    reason=f"real MNIST/FashionMNIST not under {REAL_DATA}")
def test_real_data_sizes():
    from lrmt_fast.config import config_path, load_spec
    from lrmt_fast.suite import Sources, get

    exp = get("exp1-mnist")
    spec = load_spec(config_path(exp.config), "paper", exp.pretrain_cls)
    tasks = exp.load_tasks(spec, Sources(data_root=REAL_DATA, download=False))
    info = tasks.describe()
    assert (info["task_a_train"], info["task_a_test"], info["task_b_train"], info["task_b_test"]) == (60000, 10000,
                                                                                                      60000, 10000)
    assert info["d_b1"] == info["d_b2"] == 30000


@pytest.mark.cuda
def test_exp1_mnist_smoke_on_cuda(fake_data, tmp_path):
    """The whole exp1-mnist pipeline on the GPU (pretraining, meta-training through the fused CUDA
    op, the baselines, the readouts): a complete results.json that records the device and path."""
    from lrmt_fast import _ext
    out = str(tmp_path / "cuda")
    argv = smoke_args(fake_data, out)
    argv[argv.index("--device") + 1] = "cuda"
    rc, _, err = run_cli(argv)
    assert rc == 0, err[-2000:]
    res = load_results(os.path.join(out, "results.json"), REQUIRED_METHODS)
    cfg = res["config"]
    assert cfg["device"] == "cuda"
    assert cfg["impl_resolved"] == ("fused" if _ext.cuda_compiled() else "reference")
    for name, e in res["methods"].items():
        assert all(0.0 <= v <= 100.0 for v in e["task_a_readout"]["mean"]), name
        assert all(math.isfinite(v) for v in e["task_b_readout"]["mean"]), name
