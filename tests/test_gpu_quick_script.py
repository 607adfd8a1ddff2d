"""experiments/gpu_quick.sh, the procedure for a lent GPU machine, tried on the CPU with the smoke
profile: the data packed in parts, stashed one part per call, checked and put together; a run cut
short by its time limit, resumed on a "fresh machine" from the state it returned, to the end."""
import json
import os
import shutil
import subprocess

import pytest

from lrmt_fast.data import cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "gpu_quick.sh")

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("bash", "tar", "split", "sha256sum", "timeout")),
                                reason="needs bash, tar, split, sha256sum, timeout")


def _sh(repo, args, **env):
    e = {**os.environ, "LRMT_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1", "DEVICE": "cpu", "PROFILE": "smoke",
         "STASH": os.path.join(repo, "stash"), **env}
    return subprocess.run(["bash", os.path.join(repo, "experiments", "gpu_quick.sh"), *args], cwd=repo, env=e,
                          capture_output=True, text=True, timeout=900)


def test_gpu_quick_script_parts_and_resume(tmp_path):
    repo = str(tmp_path / "repo")              # the script works relative to its checkout
    os.makedirs(os.path.join(repo, "experiments"))
    shutil.copy(SCRIPT, os.path.join(repo, "experiments"))
    src = str(tmp_path / "src")
    cifar.write_tiny_cifar(src, n_train_per_class=6, n_test_per_class=2, seed=3)

    r = _sh(repo, ["pack", "64K"], DATA_SRC=src)
    assert r.returncode == 0, r.stderr
    parts_dir = os.path.join(repo, ".gpu", "parts")
    parts = sorted(f for f in os.listdir(parts_dir) if f.startswith("cifar10.tgz."))
    assert len(parts) >= 2 and all(os.path.getsize(os.path.join(parts_dir, f)) <= 64 * 1024 for f in parts)

    # one part per call, as the 64 MiB limit makes it on the device
    held = str(tmp_path / "held")
    shutil.move(parts_dir, held)
    for f in parts:
        os.makedirs(parts_dir)
        shutil.copy(os.path.join(held, f), parts_dir)
        shutil.copy(os.path.join(held, "SHA256SUMS"), parts_dir)
        r = _sh(repo, ["stash"])
        assert r.returncode == 0 and f in r.stdout, r.stdout + r.stderr
        shutil.rmtree(parts_dir)

    # a damaged part is refused, nothing unpacked
    stash = os.path.join(repo, "stash")
    good = open(os.path.join(stash, parts[0]), "rb").read()
    with open(os.path.join(stash, parts[0]), "r+b") as fh:
        fh.write(b"\0" * 16)
    r = _sh(repo, ["run", "60"], OUT=str(tmp_path / "out0"))
    assert r.returncode == 2 and "missing or damaged" in r.stderr and not os.path.exists(os.path.join(repo, "data"))
    with open(os.path.join(stash, parts[0]), "wb") as fh:
        fh.write(good)

    # a call whose time runs out returns its state
    r = _sh(repo, ["run", "2"], OUT=str(tmp_path / "out1"))
    assert r.returncode in (124, 137) and "run again" in r.stdout, r.stdout + r.stderr
    assert os.path.isdir(os.path.join(repo, "data", "cifar-10-batches-py"))
    assert os.path.exists(os.path.join(tmp_path, "out1", "state.tgz"))
    out2 = str(tmp_path / "out2")
    r = _sh(repo, ["run", "800"], OUT=out2)
    assert r.returncode == 0 and "finished" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(out2, "results.json")) as fh:
        res = json.load(fh)
    assert res["experiment"] == "exp1-cifar" and res["profile"] == "smoke"
    for f in ("table.md", "curves.png", "fig6_curriculum.png", "fig7_delta_hist.png", "state.tgz", "gpu_run.log"):
        assert os.path.exists(os.path.join(out2, f)), f

    # a fresh machine (no runs/) restores the returned state: the finished meta-learner is reused
    shutil.rmtree(os.path.join(repo, "runs"))
    shutil.copy(os.path.join(out2, "state.tgz"), os.path.join(repo, ".gpu", "state.tgz"))
    r = _sh(repo, ["run", "800"], OUT=str(tmp_path / "out3"))
    assert r.returncode == 0 and "reusing the finished meta-learner" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(tmp_path, "out3", "results.json")) as fh:
        assert json.load(fh)["methods"] == res["methods"]

    r = _sh(repo, ["run", "x"])
    assert r.returncode == 2 and "run needs SECONDS" in r.stderr
