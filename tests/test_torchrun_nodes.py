"""Two "nodes" on one machine: two `torchrun` agents (`--nnodes 2 --nproc-per-node 1`) that meet
at a rendezvous on localhost, as docs/distributed.md tells a user to start them on a cluster
(gloo on the CPU, the tiny CIFAR-shaped data of test_cifar_experiments). Static rendezvous
(`--node-rank`, `--master-addr`), and the elastic c10d rendezvous with `--max-restarts`, where a
worker killed mid-run makes both agents restart their workers and `--resume` carries on from
the last checkpoint."""
import glob
import json
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch

from lrmt_fast.cli import main
from lrmt_fast.config import CONFIG_DIR
from lrmt_fast.data import cifar
from lrmt_fast.results import REQUIRED_METHODS, load_results

from ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("nodes")
    data, cache = str(base / "data"), str(base / "cache")
    cifar.write_tiny_cifar(data, n_train_per_class=6, n_test_per_class=2, seed=3)
    penv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", LRMT_NO_DOWNLOAD="1", LRMT_DATA=data,
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setenv("LRMT_NO_DOWNLOAD", "1")
        mp.setenv("LRMT_DATA", data)
        warnings.simplefilter("ignore")   # the Task A checkpoint, made once, as `lrmt pretrain-cifar`
        assert main(["pretrain-cifar", "--profile", "smoke", "--cache-dir", cache, "--device", "cpu",
                     "--no-progress"]) == 0
    cifar.clear_cache()
    yield {"base": base, "cache": cache, "penv": penv}


def _config(env, episodes):
    """exp1_cifar.json's smoke profile with `episodes` meta-training episodes, a checkpoint every 5."""
    with open(os.path.join(CONFIG_DIR, "exp1_cifar.json")) as f:
        conf = json.load(f)
    smoke = conf["profiles"]["smoke"]
    smoke["metatrain"] = {**smoke["metatrain"], "episodes": episodes, "checkpoint_every": 5}
    conf["profiles"] = {"smoke": smoke}
    path = env["base"] / f"smoke_{episodes}.json"
    path.write_text(json.dumps(conf))
    return str(path)


def _agents(env, out, rendezvous, config, nodes=2, nproc=1, extra=(), agent_env=None):
    """Start one torchrun agent per node (`nodes` of them, `nproc` workers each); their logs go to
    out/node<k>.log. `rendezvous(node)` gives each agent's rendezvous arguments."""
    os.makedirs(out, exist_ok=True)
    procs = []
    for node in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(nproc),
               *rendezvous(node), *extra, "-m", "lrmt_fast", "exp1-cifar", "--config", config, "--profile", "smoke",
               "--out", out, "--device", "cpu", "--cache-dir", env["cache"], "--no-progress", "--seeds", "1",
               "--dist-timeout", "60", "--resume"]
        log = open(os.path.join(out, f"node{node}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env={**env["penv"], **(agent_env or {})}, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs, timeout=240):
    end = time.time() + timeout
    rcs = []
    for p, log in procs:
        try:
            rcs.append(p.wait(timeout=max(1.0, end - time.time())))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
        finally:
            log.close()
    return rcs


def _logs(out, nodes=2):
    return [open(os.path.join(out, f"node{k}.log")).read() for k in range(nodes)]


def _children(pid):
    """PIDs of the `lrmt_fast` processes whose parent is `pid` (the workers an agent started),
    from /proc."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"lrmt_fast" in cmd:
                kids.append(int(d))
    return kids


def _check_results(out, episodes, logs):
    res = load_results(os.path.join(out, "results.json"), REQUIRED_METHODS)
    hist = json.load(open(os.path.join(out, "metatrain_history.json")))
    assert res["world_size"] == 2 and len(hist) == episodes == res["metatrain_summary"]["episodes"]
    assert [h["episode"] for h in hist] == list(range(episodes))
    assert sum(log.count("wrote ") for log in logs) == 1      # one rank, on one node, writes
    return hist


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_nodes_static_rendezvous(env):
    """`--node-rank 0/1 --master-addr --master-port`: rank 0 is on node 0, which writes the results."""
    out = str(env["base"] / "static")
    port = free_port()
    procs = _agents(env, out, lambda node: ["--node-rank", str(node), "--master-addr", "127.0.0.1",
                                            "--master-port", str(port)], _config(env, 6))
    rcs = _wait(procs)
    logs = _logs(out)
    assert rcs == [0, 0], [log[-3000:] for log in logs]
    _check_results(out, 6, logs)
    assert "wrote " in logs[0] and "wrote " not in logs[1]


def _kill_a_worker_and_resume(env, out, procs, episodes, after=20):
    """Kill (SIGKILL) the last agent's last worker once the meta-training checkpoint has reached
    episode `after`; the agents must restart their workers, which resume from a checkpoint
    (`--resume`) and finish: one results.json with the whole history, whose first episodes are
    the checkpoint's, and no restart that failed to join the process group."""
    ckpt, end = None, time.time() + 180
    try:
        while time.time() < end and all(p.poll() is None for p, _ in procs):
            found = glob.glob(os.path.join(out, "cache", "meta-*", "meta_ckpt.pt"))
            if found:
                try:
                    ck = torch.load(found[0], map_location="cpu", weights_only=False)
                except Exception:        # replaced while being read
                    ck = None
                if ck is not None and ck["next_episode"] >= after:
                    ckpt = ck
                    break
            time.sleep(0.05)
        assert ckpt is not None, f"no checkpoint of episode >= {after} while the run was going: " + \
            _logs(out, len(procs))[0][-2000:]
        assert ckpt["next_episode"] < episodes - 40, "the run was about to end before the kill"
        workers = _children(procs[-1][0].pid)
        assert workers, "no worker to kill"
        os.kill(workers[-1], 9)
    except BaseException:
        for p, _ in procs:
            p.kill()
        _wait(procs)
        raise
    rcs = _wait(procs)
    logs = _logs(out, len(procs))
    assert rcs == [0] * len(procs), [log[-3000:] for log in logs]
    assert "exitcode: -9" in logs[-1]                      # the kill happened and torchrun saw it
    assert not any("could not join the process group" in log for log in logs), [log[-3000:] for log in logs]
    hist = _check_results(out, episodes, logs)
    k = ckpt["next_episode"]
    resumed = [int(m) for m in re.findall(r"meta-train: resuming from \S+ at episode (\d+) of", "".join(logs))]
    assert resumed and min(resumed) >= k, resumed        # restarted from a checkpoint, not from episode 0
    assert hist[:k] == json.loads(json.dumps(ckpt["history"][:k]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_one_node_max_restarts_worker_killed_restarts_and_resumes(env):
    """`torchrun --nproc-per-node 2 --max-restarts 2` (static rendezvous, one agent): a worker
    killed mid-run; the restarted workers join a fresh process group (their own store prefix:
    without it they could read the dead worker's address from the agent's store and fail to
    join, pytorch/pytorch#135712) and resume."""
    out = str(env["base"] / "one_node")
    port = free_port()
    procs = _agents(env, out, lambda node: ["--master-addr", "127.0.0.1", "--master-port", str(port)],
                    _config(env, 120), nodes=1, nproc=2, extra=("--max-restarts", "2"))
    _kill_a_worker_and_resume(env, out, procs, 120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_nodes_c10d_worker_killed_restarts_and_resumes(env):
    """Elastic c10d rendezvous on two nodes with `--max-restarts 3` and the agents' store not
    shared with the workers (`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`, as docs/distributed.md
    says): node 1's worker killed mid-run; both agents restart their workers, which resume."""
    out = str(env["base"] / "c10d")
    port = free_port()
    procs = _agents(env, out, lambda node: ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                            "--rdzv-id", "nodes-test"],
                    _config(env, 120), extra=("--max-restarts", "3"),
                    agent_env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    _kill_a_worker_and_resume(env, out, procs, 120)
