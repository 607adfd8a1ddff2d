"""Smoke runs of the CIFAR experiments (exp1-cifar, exp2-cifar100, exp3-unseen-init) through the
`lrmt` command on a tiny CIFAR-shaped dataset written in torchvision's pickle layout, and a
2-process `torchrun` run of exp1-cifar (gloo on the CPU)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from lrmt_fast.cli import main
from lrmt_fast.config import CONFIG_DIR
from lrmt_fast.data import cifar
from lrmt_fast.results import REQUIRED_METHODS, load_results

from ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("cifar_exp")
    data = str(base / "data")
    cifar.write_tiny_cifar(data, n_train_per_class=6, n_test_per_class=2, seed=3)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny tensors: threads only contend on a shared CPU
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRMT_NO_DOWNLOAD", "1")
        mp.setenv("LRMT_DATA", data)
        yield {"data": data, "base": str(base), "cache": str(base / "cache")}
    torch.set_num_threads(old_threads)
    cifar.clear_cache()


def _run(cmd, env, out, *extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main([cmd, "--profile", "smoke", "--out", out, "--device", "cpu", "--cache-dir", env["cache"],
                   "--no-progress", *extra])
    assert rc == 0
    res = load_results(os.path.join(out, "results.json"), REQUIRED_METHODS)
    for f in ("table.md", "curves.png", "fig6_curriculum.png", "fig7_delta_hist.png", "delta_hist.json",
              "metatrain_history.json", "config.json"):
        assert os.path.exists(os.path.join(out, f)), f
    for f in ("curves.png", "fig6_curriculum.png", "fig7_delta_hist.png"):
        with open(os.path.join(out, f), "rb") as fh:
            assert fh.read(8) == PNG
    return res


def _n_synapses(res):
    """Synapses adapted per student update, from the smoke network (1 block/stage, widths 4)."""
    from lrmt_fast.meta_learner import find_adapted_layers
    from lrmt_fast.pretrain_cifar import CifarPretrainConfig, make_model
    cfg = CifarPretrainConfig(**res["config"]["pretrain"])
    return sum(l.cout * l.p for l in find_adapted_layers(make_model(cfg)))


def _check_common(res, out, capsys=None):
    mt = res["config"]["metatrain"]
    hist = json.load(open(os.path.join(out, "metatrain_history.json")))
    assert len(hist) == mt["episodes"] == res["metatrain_summary"]["episodes"]
    k = [h["episode"] // mt["schedule_every"] for h in hist]
    assert [h["threshold"] for h in hist] == [min(mt["thresh_start"] + i * mt["thresh_inc"], mt["thresh_max"]) for i in k]
    assert [h["bptt"] for h in hist] == [min(mt["bptt_start"] + i * mt["bptt_inc"], mt["bptt_max"]) for i in k]
    # Figure 7: every synapse of every meta-test update of "ours" (steps x seeds) is in the histogram
    d = res["delta_summary"]["all"]
    assert d["n"] == _n_synapses(res) * res["config"]["metatest"]["steps"] * len(res["seeds"])
    assert 0.0 <= d["frac_negative"] <= 1.0 and d["min"] <= d["mean"] <= d["max"]
    # the meta-update path and the precision actually in effect are recorded
    from lrmt_fast.ops import resolve_impl
    assert res["config"]["impl_resolved"] == resolve_impl(None, "cpu", warn=False)
    assert res["config"]["precision"] == {"dtype": "float32", "autocast": False, "tf32_convolutions": False,
                                          "tf32_matmul": False}
    for m in REQUIRED_METHODS:
        e = res["methods"][m]
        assert e["steps"] == [0, 2, 4] and len(e["runs"]) == len(res["seeds"])
        assert 0 <= e["joint_readout"]["mean"] <= 100


def test_exp1_cifar_smoke_and_rerun_reuses(env, capsys):
    out = os.path.join(env["base"], "exp1")
    res = _run("exp1-cifar", env, out)
    _check_common(res, out)
    info = res["config"]["data_info"]
    # D_B1 / D_B2: the even split of CIFAR-5B's 30 tiny training images
    assert info["d_b1"] == info["d_b2"] == 15 and info["task_b_train"] == 30 and info["task_a_train"] == 30
    assert res["world_size"] == 1 and os.path.exists(res["config"]["task_a_checkpoint"])
    capsys.readouterr()
    res2 = _run("exp1-cifar", env, out)             # everything cached: same numbers
    log = capsys.readouterr().out
    assert "reusing the finished meta-learner" in log and "reusing" in log
    assert res2["methods"] == res["methods"] and res2["delta_summary"] == res["delta_summary"]


def test_figure7_pools_every_update_of_the_plain_ours_methods_cached_or_not(env, tmp_path):
    """Figure 7 counts every update of every run of the "ours" methods without diagnostic
    options, also when some of those runs come from the run cache and others do not; the
    variants with ``reset_every`` / ``min_gate`` stay out of it, and ``trace`` gives gate_trace.png."""
    with open(os.path.join(CONFIG_DIR, "exp1_cifar.json")) as f:
        cfg = json.load(f)
    out = str(tmp_path / "run")

    def run(methods):
        cfg["profiles"]["smoke"]["methods"] = methods
        path = str(tmp_path / "exp1_cifar.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["exp1-cifar", "--config", path, "--profile", "smoke", "--out", out, "--device", "cpu",
                         "--cache-dir", env["cache"], "--no-progress"]) == 0
        return load_results(os.path.join(out, "results.json"), [])

    res = run({"ours": {"kind": "ours"}})
    per_run = _n_synapses(res) * res["config"]["metatest"]["steps"]
    assert res["delta_summary"]["all"]["n"] == per_run * len(res["seeds"])
    # "ours" now comes from the run cache, "ours_traced" does not: both are counted, once
    res = run({"ours": {"kind": "ours"}, "ours_traced": {"kind": "ours", "trace": True},
               "ours_reset2": {"kind": "ours", "reset_every": 2}, "ours_floor": {"kind": "ours", "min_gate": 0.0}})
    assert res["delta_summary"]["all"]["n"] == 2 * per_run * len(res["seeds"])
    assert res["methods"]["ours_traced"]["gate_trace"]["steps"] == list(range(1, res["config"]["metatest"]["steps"] + 1))
    assert os.path.exists(os.path.join(out, "gate_trace.png")) and res["figures"]["gate_trace"] == "gate_trace.png"
    # tracing only reads: the traced runs are the plain ones
    for a, b in zip(res["methods"]["ours"]["runs"], res["methods"]["ours_traced"]["runs"]):
        assert a["task_a_readout"] == b["task_a_readout"] and a["joint_readout"] == b["joint_readout"]


def test_figure7_histogram_is_saved_per_draw_and_an_interrupted_run_keeps_it(env, monkeypatch):
    """Exp 2 meta-tests several draws: the histogram is saved after each draw's "ours" runs, so
    a run interrupted in the second draw resumes without rolling the first draw's out again."""
    import lrmt_fast.pipeline as ev
    out = os.path.join(env["base"], "exp2_interrupted")
    real = ev.run_meta_test
    calls = []

    def interrupted(*a, **k):
        calls.append(k.get("cache_dir"))
        if len(calls) == 3:              # draw 0: "ours", the rest; draw 1: "ours" -> Ctrl-C
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "run_meta_test", interrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["exp2-cifar100", "--profile", "smoke", "--out", out, "--device", "cpu", "--cache-dir",
                     env["cache"], "--no-progress"]) == 130
    saved = json.load(open(os.path.join(out, "cache", "delta_hist.json")))
    assert saved["draws"] == 1
    calls.clear()
    monkeypatch.setattr(ev, "run_meta_test", lambda *a, **k: calls.append(k.get("cache_dir")) or real(*a, **k))
    res = _run("exp2-cifar100", env, out)
    assert None not in calls                 # no run rolled out again, uncached
    assert res["delta_summary"]["all"]["n"] == _n_synapses(res) * res["config"]["metatest"]["steps"] * len(res["seeds"])
    assert saved["groups"]["all"]["n"] * 2 == res["delta_summary"]["all"]["n"]      # one draw of two


def test_exp2_cifar100_smoke(env):
    out = os.path.join(env["base"], "exp2")
    res = _run("exp2-cifar100", env, out)
    _check_common(res, out)
    draws = res["b2_classes"]
    assert sorted(draws) == [str(s) for s in res["seeds"]]
    for s, cls in draws.items():
        assert len(set(cls)) == 5 and all(50 <= c < 100 for c in cls)
    assert draws == {str(s): d for s, d in enumerate(cifar.b2_class_draws(0, len(draws)))}
    # each seed's meta-test ran on its own draw: Task B sizes 5 classes x 6 train / 2 test images
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert [d["task_b_train"] for d in cfg["data_info"]] == [30] * len(draws)
    assert [d["b2_classes"] for d in cfg["data_info"]] == [draws[str(s)] for s in res["seeds"]]


def test_exp3_unseen_init_smoke(env):
    out = os.path.join(env["base"], "exp3")
    res = _run("exp3-unseen-init", env, out)
    _check_common(res, out)
    pool = res["config"]["pool"]
    n = res["config"]["pool"]["n_train"]
    assert pool["heldout_seed"] == pool["seed0"] + n
    files = sorted(f for f in os.listdir(pool["dir"]) if f.endswith(".pt"))
    assert files == [f"seed{pool['seed0'] + i:04d}.pt" for i in range(n + 1)]
    assert res["config"]["task_a_checkpoint"].endswith(f"seed{pool['heldout_seed']:04d}.pt")
    # the pool command finds every checkpoint present and trains nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["pretrain-cifar-pool", "--profile", "smoke", "--cache-dir", env["cache"], "--device", "cpu",
                     "--no-progress"]) == 0


def test_paper_profiles_hold_the_papers_settings():
    from lrmt_fast.config import resolve_profile
    c1 = resolve_profile(os.path.join(CONFIG_DIR, "exp1_cifar.json"), "paper")
    c2 = resolve_profile(os.path.join(CONFIG_DIR, "exp2_cifar100.json"), "paper")
    c3 = resolve_profile(os.path.join(CONFIG_DIR, "exp3_unseen_init.json"), "paper")
    m1, m2, m3 = c1["metatrain"], c2["metatrain"], c3["metatrain"]
    assert (m1["episodes"], m1["thresh_start"], m1["thresh_inc"], m1["thresh_max"], m1["bptt_start"], m1["bptt_inc"],
            m1["bptt_max"], m1["schedule_every"]) == (900, 20, 5, 30, 5, 2, 9, 300)
    assert (m1["lr"], m1["meta_lr"], m1["loss_coef"], m1["batch_a"], m1["batch_b"], m1["hidden"], m1["hidden_gn"]) == \
        (0.1, 0.001, 300, 64, 64, 64, 32)
    assert (m2["episodes"], m2["thresh_max"], m2["bptt_max"], m2["schedule_every"]) == (2000, 50, 17, 300)
    assert m3 == m2 and c3["pool"] == {"n_train": 100, "seed0": 0}
    for c in (c1, c2, c3):
        assert (c["readout"]["steps"], c["readout"]["lr"], c["readout"]["train_size"]) == (500, 0.1, None)
        assert (c["metatest"]["steps"], c["metatest"]["every"], c["metatest"]["batch"], c["metatest"]["lr"]) == \
            (500, 50, 64, 0.1)
        p = c["pretrain"]
        assert (p["model"], p["lr"], p["momentum"], p["batch"], p["weight_decay"]) == ("resnet32_gn", 0.1, 0.9, 128,
                                                                                        0.0005)
        # the stabilisers without which lr 0.1 collapses ResNet-32 GN (docs/cifar.md), and the
        # finish phase without which the students' lr 0.1 is unstable on the pretrained network
        assert p["zero_init_residual"] is True and p["warmup_epochs"] == 1
        assert (p["finish_epochs"], p["finish_lr"], p["finish_warmup_epochs"], p["finish_average_epochs"]) == \
            (4, 0.2, 2, 2)
        assert set(REQUIRED_METHODS) <= set(c["methods"]) and c["seeds"] == 5


def test_committed_task_a_checkpoint_serves_the_profiles_with_its_config(tmp_path, monkeypatch):
    """The committed CIFAR-5A checkpoints: the 100-epoch pretraining (its key from the profiles'
    config and the data fingerprint it recorded; exp1/exp2 `cpu`) and the same with the finish
    phase and its tail averaging (exp1/exp2 `cpu_finish_avg`, `quick`, `paper`); the experiments
    take them where the cache has none (task_a_path, base_task_a_path)."""
    import lrmt_fast.pretrain_cifar as P
    import lrmt_fast.suite.sources as S
    from lrmt_fast.config import load_spec
    from lrmt_fast.suite import Sources, cifar

    shipped_dir = S.REPO_RESULTS
    ck = torch.load(os.path.join(shipped_dir, "cifar5a_pretrain_paper", "cifar5a-a713399545b1.pt"),
                    map_location="cpu", weights_only=True)
    for exp in ("exp1_cifar", "exp2_cifar100"):
        pcfg = load_spec(os.path.join(CONFIG_DIR, f"{exp}.json"), "cpu", P.CifarPretrainConfig).pretrain
        assert P.cache_key(pcfg, ck["data_fp"]) == ck["key"] == "a713399545b1", exp
    assert ck["test_acc"] > 91.0
    # the committed finish-phase checkpoint (averaged) has the key of 'cpu_finish_avg', 'quick' and
    # 'paper', and starts from the committed checkpoint above, which base_task_a_path finds by its key
    avg = torch.load(os.path.join(shipped_dir, "cifar5a_pretrain_finish_avg", "cifar5a-c89cbb7a6ec4.pt"),
                     map_location="cpu", weights_only=True)
    for exp in ("exp1_cifar", "exp2_cifar100"):
        for name in ("cpu_finish_avg", "quick", "paper"):
            pcfg = load_spec(os.path.join(CONFIG_DIR, f"{exp}.json"), name, P.CifarPretrainConfig).pretrain
            assert pcfg.finish_epochs > 0 and P.cache_key(pcfg, ck["data_fp"]) == avg["key"], (exp, name)
    assert avg["key"] == "c89cbb7a6ec4" and avg["base"]["key"] == ck["key"] and avg["averaged_steps"] == 390
    assert avg["test_acc"] > 90.0 and P.cache_key(P.base_config(pcfg), ck["data_fp"]) == ck["key"]
    monkeypatch.setattr(P, "data_fingerprint", lambda task: ck["data_fp"])
    src = Sources(cache_dir=str(tmp_path / "empty_cache"))
    assert cifar.task_a_path(src, None, pcfg) == os.path.join(shipped_dir, "cifar5a_pretrain_finish_avg",
                                                              "cifar5a-c89cbb7a6ec4.pt")
    assert cifar.base_task_a_path(src, None, pcfg) == os.path.join(shipped_dir, "cifar5a_pretrain_paper",
                                                                   "cifar5a-a713399545b1.pt")
    assert cifar.base_task_a_path(src, None, P.base_config(pcfg)) is None
    monkeypatch.undo()
    # the lookup: --taskA-ckpt first, then the cache (finished or partial), then the committed file
    name = "cifar5a-0123456789ab.pt"
    shipped = tmp_path / "results" / "cifar5a_pretrain_x"
    shipped.mkdir(parents=True)
    monkeypatch.setattr(S, "REPO_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(cifar, "default_path", lambda cache_dir, task, cfg: os.path.join(cache_dir, name))
    cache = tmp_path / "cache"
    src = Sources(cache_dir=str(cache))
    assert cifar.task_a_path(src, None, None) == str(cache / name)          # nothing committed: train into the cache
    (shipped / name).write_bytes(b"x")
    assert cifar.task_a_path(src, None, None) == str(shipped / name)
    cache.mkdir()
    (cache / (name + ".partial")).write_bytes(b"x")
    assert cifar.task_a_path(src, None, None) == str(cache / name)          # a started pretraining goes on
    os.remove(cache / (name + ".partial"))
    (cache / name).write_bytes(b"x")
    assert cifar.task_a_path(src, None, None) == str(cache / name)
    assert cifar.task_a_path(Sources(task_a_ckpt="mine.pt", cache_dir=str(cache)), None, None) == "mine.pt"


def test_data_errors_are_one_line(env, tmp_path, capsys):
    rc = main(["exp1-cifar", "--profile", "smoke", "--data-root", str(tmp_path / "nothing"), "--out",
               str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--no-download"])
    err = capsys.readouterr().err
    assert rc == 1 and "--data-root" in err and "LRMT_DATA" in err and "Traceback" not in err


def test_pretrain_cifar_command_with_a_finish_phase(env, tmp_path, capsys):
    """`lrmt pretrain-cifar` on a config whose profile adds a finish phase: the base checkpoint is
    trained into the cache under its own key, then the finish phase; both accuracies are printed.
    Bad finish settings are a one-line error."""
    with open(os.path.join(CONFIG_DIR, "exp1_cifar.json")) as f:
        conf = json.load(f)
    conf["profiles"]["smoke"].setdefault("pretrain", {}).update(finish_epochs=1, finish_lr=0.05)
    good = tmp_path / "finish.json"
    good.write_text(json.dumps(conf))
    args = ["pretrain-cifar", "--profile", "smoke", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(args + ["--config", str(good)])
    out = capsys.readouterr().out
    assert rc == 0 and "before the finish phase (checkpoint key" in out, out
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 2 and all(f.startswith("cifar5a-") and f.endswith(".pt") for f in files), files
    conf["profiles"]["smoke"]["pretrain"]["finish_lr"] = 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(conf))
    rc = main(args + ["--config", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and "pretrain: the finish phase needs finish_lr > 0" in err and "Traceback" not in err


@pytest.mark.parametrize("cmd,pretrain", [("exp1-cifar", "pretrain-cifar"), ("exp2-cifar100", "pretrain-cifar"),
                                          ("exp3-unseen-init", "pretrain-cifar-pool")])
def test_torchrun_two_ranks(env, tmp_path, cmd, pretrain):
    """`torchrun --nproc_per_node 2 -m lrmt_fast <experiment>` (gloo): rank 0 writes the results of
    a 2-rank meta-training; the Task A checkpoint comes from `lrmt pretrain-cifar` (Exp 3: the
    pool from `lrmt pretrain-cifar-pool`, loaded by rank 0 and broadcast)."""
    penv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = str(tmp_path / "dist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([pretrain, "--profile", "smoke", "--cache-dir", env["cache"], "--device", "cpu",
                     "--no-progress"]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master-port", str(free_port()), "-m", "lrmt_fast", cmd, "--profile",
                        "smoke", "--out", out, "--device", "cpu", "--cache-dir", env["cache"], "--no-progress",
                        "--dist-timeout", "60", "--seeds", "1"],
                       cwd=ROOT, env=penv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = load_results(os.path.join(out, "results.json"), REQUIRED_METHODS)
    assert res["world_size"] == 2 and res["metatrain_summary"]["episodes"] == res["config"]["metatrain"]["episodes"]
    assert res["delta_summary"]["all"]["n"] > 0 and os.path.exists(os.path.join(out, "fig6_curriculum.png"))
    assert r.stdout.count("wrote ") == 1            # only rank 0 writes results


def _mnist_smoke_config(path):
    """exp1_mnist.json's smoke profile on the MNIST/FashionMNIST subset shipped in the package (no
    data root), shrunk further: a genuine exp1-mnist results.json in seconds."""
    with open(os.path.join(CONFIG_DIR, "exp1_mnist.json")) as f:
        cfg = json.load(f)
    smoke = cfg["profiles"]["smoke"]
    smoke["data"] = {**smoke.get("data", {}), "source": "subset", "max_train": 300, "max_test": 200}
    smoke["metatrain"] = {**smoke.get("metatrain", {}), "episodes": 2, "max_steps": 3}
    smoke["metatest"] = {**smoke.get("metatest", {}), "steps": 4, "every": 2, "fisher_samples": 16}
    smoke["readout"] = {**smoke.get("readout", {}), "steps": 5, "train_size": 60, "test_size": 60}
    smoke["seeds"] = 1
    cfg["profiles"] = {"smoke": smoke}
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def test_report_combines_cifar_and_mnist_folders(env, tmp_path, capsys):
    """`lrmt report DIR...` rebuilds Table 1 from result folders of different experiments (the three
    CIFAR drivers and exp1-mnist): one column per folder, each cell that folder's joint readout."""
    from lrmt_fast.results import fmt
    dirs = [os.path.join(env["base"], d) for d in ("exp1", "exp2", "exp3")]
    for cmd, d in zip(("exp1-cifar", "exp2-cifar100", "exp3-unseen-init"), dirs):
        _run(cmd, env, d)                       # reuses everything when the tests above ran
    mnist = str(tmp_path / "mnist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["exp1-mnist", "--profile", "smoke", "--config", _mnist_smoke_config(str(tmp_path / "m.json")),
                     "--out", mnist, "--device", "cpu", "--no-progress"]) == 0
    dirs.append(mnist)
    capsys.readouterr()
    out_md = str(tmp_path / "table1.md")
    # a folder and a results.json path are both accepted
    assert main(["report", *dirs[:3], os.path.join(mnist, "results.json"), "--out", out_md, "--details"]) == 0
    printed = capsys.readouterr().out
    text = open(out_md).read()
    assert printed == text + "\n"                    # printed, and written to --out
    results = [load_results(os.path.join(d, "results.json"), REQUIRED_METHODS) for d in dirs]
    assert [r["experiment"] for r in results] == ["exp1-cifar", "exp2-cifar100", "exp3-unseen-init", "exp1-mnist"]
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [""] + [f"{r['experiment']} ({r['profile']})" for r in results]
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.strip().strip("|").split("|")[1:]]
            for l in lines[2:] if l.startswith("| ") and l.count("|") == len(dirs) + 2}
    from lrmt_fast.results import display_name
    for m in REQUIRED_METHODS:
        want = [fmt(r["methods"][m]["joint_readout"]["mean"], r["methods"][m]["joint_readout"]["sem"])
                for r in results]
        assert rows[display_name(m)] == want, m
    # the paper's row order (with SGD x 0.5 beside SGD x 0.1), Freeze first, Teacher last
    from lrmt_fast.results import ROW_ORDER
    order = [l.split("|")[1].strip() for l in lines[2:2 + len(ROW_ORDER)]]
    assert order == [display_name(m) for m in ROW_ORDER]
    assert "**exp1-mnist**" in text and "**exp3-unseen-init**" in text      # --details: each run's own table
    # a folder without results.json: one line on stderr, exit status 1
    assert main(["report", dirs[0], str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.cuda
def test_exp1_cifar_smoke_on_cuda(env):
    """exp1-cifar on the GPU (ResNet GN, the fused CUDA op in meta-training and meta-test): the
    results, Figures 6 and 7, and the device, path and precision in effect recorded."""
    from lrmt_fast import _ext
    out = os.path.join(env["base"], "exp1_cuda")
    res = _run("exp1-cifar", env, out, "--device", "cuda")
    cfg = res["config"]
    assert cfg["device"] == "cuda"
    assert cfg["impl_resolved"] == ("fused" if _ext.cuda_compiled() else "reference")
    assert cfg["precision"] == {"dtype": "float32", "autocast": False,
                                "tf32_convolutions": bool(torch.backends.cudnn.allow_tf32),
                                "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}
    n = _n_synapses(res) * res["config"]["metatest"]["steps"] * len(res["seeds"])
    assert res["delta_summary"]["all"]["n"] == n
