"""Files against a hostile user or machine (issue 23): checkpoints that would run code when
loaded, corrupt user files, a full disk, no permission, two writers of one file, and two runs
on one output folder."""
import builtins
import dataclasses
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from lrmt_fast import checkpoint as C
from lrmt_fast.meta_training import MetaTrainConfig, TensorTaskStream, load_meta, metatrain
from lrmt_fast.student import param_dict

from tinynet import TinyNet, tiny_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Evil:
    """A pickle that creates a folder when it is loaded (the attack of issue 23)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


class EvilExec:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (builtins.exec, (f"import os; os.makedirs({self.target!r})",))


def _one_line(e) -> str:
    s = str(e.value)
    assert "\n" not in s, s
    return s


@pytest.mark.parametrize("cls,wanted", [(Evil, "os.makedirs"), (EvilExec, "builtins.exec")])
def test_crafted_checkpoint_runs_no_code(tmp_path, cls, wanted):
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "meta_ckpt.pt")
    torch.save({"meta_state": {}, "payload": cls(marker)}, path)
    try:
        C.load_checkpoint(path, ("meta_state",), "meta-training checkpoint")
        err = None
    except C.CheckpointError as e:
        err = e
    assert not os.path.exists(marker), "loading the checkpoint ran its code"
    assert err is not None, "the crafted checkpoint was accepted"
    msg = str(err)
    assert "\n" not in msg, msg
    assert path in msg and wanted in msg and "weights_only" in msg and "refusing" in msg, msg


def _tiny_meta_run(out, episodes=2):
    torch.manual_seed(0)
    model = TinyNet()
    xa, ya, xb, yb = tiny_data()
    cfg = MetaTrainConfig(episodes=episodes, max_steps=4, lr=0.1, hidden=4, hidden_gn=3, batch_a=8, batch_b=8,
                          bptt_start=2, bptt_inc=1, bptt_max=3, thresh_start=1e9, thresh_inc=0, thresh_max=1e9,
                          schedule_every=2, checkpoint_every=1, impl="reference")
    logs = []
    meta, hist = metatrain(model, TensorTaskStream(param_dict(model), xa, ya, xb, yb, 8, 8), cfg, out_dir=out,
                           resume=True, progress=False, log=logs.append)
    return meta, hist, logs


def test_project_checkpoints_load_weights_only(tmp_path):
    """What lrmt_fast writes needs no global beyond torch's weights-only set: a meta-training
    checkpoint (Adam state, dataclass config as a dict, history) loads, resumes and gives the
    meta-learner; a Task A file shaped as pretrain_cifar's (SGD momentum state, generator state,
    an averaged state dict) round-trips; the shipped Task A checkpoints load."""
    from torch.serialization import get_unsafe_globals_in_checkpoint
    from lrmt_fast.pretrain_cifar import CifarPretrainConfig

    out = str(tmp_path / "run")
    _tiny_meta_run(out, episodes=2)
    ck_path = os.path.join(out, "meta_ckpt.pt")
    assert get_unsafe_globals_in_checkpoint(ck_path) == []
    ck = C.load_checkpoint(ck_path, ("meta_state", "opt_state", "next_episode", "history", "meta_config"))
    assert ck["next_episode"] == 2 and ck["opt_state"]["state"] and ck["opt_state"]["param_groups"][0]["betas"]
    load_meta(ck_path)
    _, hist, logs = _tiny_meta_run(out, episodes=3)         # resume: Adam state loaded again
    assert len(hist) == 3 and any("resuming" in m for m in logs)

    torch.manual_seed(1)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model(torch.randn(4, 1, 6, 6)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(3)
    partial = {"key": "abc", "model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
               "epoch": 1, "step": 7, "history": [{"epoch": 1, "step": 7, "loss": 1.5, "test_acc": 40.0}],
               "avg": {k: v.clone() for k, v in model.state_dict().items()},
               "config": dataclasses.asdict(CifarPretrainConfig()), "classes": [0, 1, 2], "base": None}
    path = str(tmp_path / "cifar5a.pt.partial")
    C.atomic_save(partial, path)
    assert get_unsafe_globals_in_checkpoint(path) == []
    back = C.load_checkpoint(path, ("key", "model", "opt", "gen"))
    assert torch.equal(back["gen"], partial["gen"]) and back["config"] == partial["config"]
    opt2 = torch.optim.SGD(TinyNet().parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["opt"])
    for shipped in glob.glob(os.path.join(REPO, "experiments", "results", "cifar5a_pretrain_*", "*.pt")):
        assert C.load_checkpoint(shipped, ("state_dict", "key", "test_acc"))["state_dict"]


def test_corrupt_file_advice_depends_on_ownership(tmp_path):
    """A corrupt file of the project's own may be deleted; a file the user named may not."""
    path = str(tmp_path / "some_text_file")
    with open(path, "w") as f:
        f.write("hello, not a checkpoint\n")
    with pytest.raises(C.CheckpointError) as e:
        C.load_checkpoint(path, ("state_dict",), "Task A checkpoint")
    msg = _one_line(e)
    assert path in msg and "delete it" in msg, msg
    with pytest.raises(C.CheckpointError) as e:
        C.load_checkpoint(path, ("state_dict", "key"), "Task A checkpoint", owned=False)
    msg = _one_line(e)
    assert path in msg and "delete" not in msg and "is not a valid Task A checkpoint" in msg, msg
    assert "expected" in msg and "state_dict" in msg, msg


def _leftovers(d, name):
    return [f for f in os.listdir(d) if f != name]


def _failing_save(exc, nbytes=4096):
    """A torch.save that writes ``nbytes`` into the file (an open file or a path), then fails
    with ``exc``."""
    def save(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(b"\0" * nbytes)
        else:
            f.write(b"\0" * nbytes)
            f.flush()
        raise exc
    return save


def test_atomic_save_disk_full_cleans_up_and_names_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "meta_ckpt.pt")
    C.atomic_save({"x": torch.ones(3)}, path)
    monkeypatch.setattr(torch, "save", _failing_save(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(C.CheckpointError) as e:
        C.atomic_save({"x": torch.zeros(1000)}, path)
    msg = _one_line(e)
    assert path in msg and "no space left on device" in msg, msg
    assert _leftovers(str(tmp_path), "meta_ckpt.pt") == [], "a temporary file was left behind"
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3)), "the old file was damaged"


def test_atomic_save_torch_error_without_errno(tmp_path, monkeypatch):
    """torch's own writer says only "unexpected pos": a nearly full disk is named from statvfs;
    with room to spare the original error is kept (not blamed on the disk)."""
    path = str(tmp_path / "meta_ckpt.pt")
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", _failing_save(err))

    class Full:
        f_bavail, f_frsize = 0, 4096

    class Roomy:
        f_bavail, f_frsize = 10 ** 9, 4096

    monkeypatch.setattr(C.os, "statvfs", lambda d: Full())
    with pytest.raises(C.CheckpointError) as e:
        C.atomic_save({"x": torch.zeros(10 ** 6)}, path)
    msg = _one_line(e)
    assert path in msg and "no space left on device" in msg, msg
    monkeypatch.setattr(C.os, "statvfs", lambda d: Roomy())
    with pytest.raises(C.CheckpointError) as e:
        C.atomic_save({"x": torch.zeros(10 ** 6)}, path)
    msg = _one_line(e)
    assert path in msg and "unexpected pos" in msg and "no space" not in msg, msg
    assert os.listdir(str(tmp_path)) == []


@pytest.mark.parametrize("kind", ["json", "text"])
def test_atomic_write_json_and_text(tmp_path, monkeypatch, kind):
    path = str(tmp_path / ("results.json" if kind == "json" else "table.md"))
    write = ((lambda p, v: C.atomic_write_json(p, v, what="results")) if kind == "json"
             else (lambda p, v: C.atomic_write_text(p, json.dumps(v), what="results")))
    write(path, {"a": [1, 2.5, None]})
    with open(path) as f:
        assert json.loads(f.read()) == {"a": [1, 2.5, None]}

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(C.os, "fsync", no_space)      # NFS reports a full disk at fsync
    with pytest.raises(C.CheckpointError) as e:
        write(path, {"b": 1})
    monkeypatch.undo()
    msg = _one_line(e)
    assert path in msg and "no space left on device" in msg, msg
    assert _leftovers(str(tmp_path), os.path.basename(path)) == []
    with open(path) as f:
        assert json.loads(f.read()) == {"a": [1, 2.5, None]}
    if kind == "json":
        with pytest.raises(TypeError):          # not JSON: refused before anything is written
            C.atomic_write_json(path, {"x": object()})


def test_atomic_save_permission_denied_simulated(tmp_path, monkeypatch):
    """What a folder without write permission does to whichever call creates the file first."""
    import tempfile

    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr(torch, "save", denied)
    path = str(tmp_path / "ck.pt")
    with pytest.raises(C.CheckpointError) as e:
        C.atomic_save({"x": 1}, path)
    msg = _one_line(e)
    assert path in msg and "permission denied" in msg, msg


def test_atomic_save_read_only_folder(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(str(d), 0o555)
    try:
        if os.access(str(d), os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        path = str(d / "ck.pt")
        with pytest.raises(C.CheckpointError) as e:
            C.atomic_save({"x": torch.ones(2)}, path)
        msg = _one_line(e)
        assert path in msg and "permission denied" in msg, msg
        assert os.listdir(str(d)) == []
    finally:
        os.chmod(str(d), 0o755)


def test_atomic_save_keeps_plain_file_mode(tmp_path):
    """mkstemp makes 0600 files; the checkpoint gets the mode open() would give (shared folders)."""
    path = str(tmp_path / "ck.pt")
    C.atomic_save({"x": 1}, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_concurrent_atomic_save_same_path(tmp_path):
    """Two threads saving the same file: no collision on the temporary file, no error, and the
    file is always one of the two whole checkpoints."""
    path = str(tmp_path / "meta_ckpt.pt")
    errors, start = [], threading.Barrier(2)
    objs = [{"who": i, "x": torch.full((200_000,), float(i))} for i in range(2)]

    def writer(i):
        start.wait()
        for _ in range(30):
            try:
                C.atomic_save(objs[i], path)
            except Exception as e:   # noqa: BLE001 (collect for the assertion)
                errors.append(f"{type(e).__name__}: {e}")
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [], errors[:3]
    back = C.load_checkpoint(path, ("who", "x"))
    assert torch.equal(back["x"], objs[back["who"]]["x"])
    assert os.listdir(str(tmp_path)) == ["meta_ckpt.pt"]


# --- one run per output folder ------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys
    from lrmt_fast.outdir import OutDirLock, OutDirBusyError
    try:
        lock = OutDirLock(sys.argv[1], command="lrmt exp1-mnist --out " + sys.argv[1]).acquire()
    except OutDirBusyError as e:
        print("BUSY", e, flush=True)
        sys.exit(3)
    print("LOCKED", flush=True)
    sys.stdin.read()            # hold it until the test closes stdin (or kills us)
    lock.release()
""")


def _start(out):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline().strip()
    return p, line


def _try_once(out):
    p, line = _start(out)
    if line.startswith("LOCKED"):
        p.stdin.close()
        assert p.wait(30) == 0
    else:
        assert p.wait(30) == 3, p.stderr.read()
    return line


def test_out_dir_lock_between_processes(tmp_path):
    import socket
    out = str(tmp_path / "runs" / "x")
    first, line = _start(out)
    try:
        assert line == "LOCKED", first.stderr.read()
        other = _try_once(out)
        assert other.startswith("BUSY"), other
        msg = other[len("BUSY "):]
        assert f"{out} is in use by process {first.pid} (lrmt exp1-mnist --out {out}) on host " \
               f"{socket.gethostname()} since " in msg, msg
        assert msg.endswith("wait for it or use another --out"), msg
    finally:
        first.stdin.close()
        first.wait(30)
    assert _try_once(out) == "LOCKED"           # released at a normal exit

    killed, line = _start(out)
    assert line == "LOCKED"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(30)
    assert _try_once(out) == "LOCKED"           # and when the holder is killed


def test_out_dir_lock_in_process(tmp_path):
    from lrmt_fast.outdir import LOCK_NAME, OutDirBusyError, OutDirLock
    out = str(tmp_path / "o")
    with pytest.raises(ValueError):
        with OutDirLock(out, command="first"):
            with pytest.raises(OutDirBusyError) as e:
                OutDirLock(out).acquire()
            assert f"process {os.getpid()} (first)" in str(e.value) and e.value.holder["pid"] == os.getpid()
            raise ValueError("the run fails")
    with OutDirLock(out) as lock:                # released by the exception
        assert lock.held and json.load(open(os.path.join(out, LOCK_NAME)))["pid"] == os.getpid()
    assert not lock.held and open(os.path.join(out, LOCK_NAME)).read() == ""
