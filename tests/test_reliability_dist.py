"""Distributed exposure (issue 23): objects between ranks are tensors and JSON, never pickles,
and a one-node job's own rendezvous store listens on the loopback only (gloo, 2 processes)."""
import json
import math
import os
import pickle
import traceback
from collections import OrderedDict

import pytest
import torch
import torch.multiprocessing as mp

from lrmt_fast import distributed as D

from ports import free_port
from tinynet import TinyNet

WORLD = 2


class Evil:
    """Pickles into a call of os.makedirs: what a peer could make every rank run before."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def _no_unpickling(*a, **kw):
    raise AssertionError("a rank unpickled a message")


class _NoUnpickler(pickle.Unpickler):
    """pickle.Unpickler (and torch.distributed's alias of it) that refuses to load."""

    def load(self):
        _no_unpickling()


def _adam_state():
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 1, 6, 6)).sum().backward()
        opt.step()
    return model, opt.state_dict()


def _payloads():
    """What the callers send (task_a_weights, pool_weights, sync_start, the histories, flags)
    plus the corners of the encoding; identical on every rank (seeded)."""
    model, adam = _adam_state()
    sd = model.state_dict()
    x = torch.arange(12.0).reshape(3, 4)
    return {
        "state_dict": sd,
        "adam": adam,
        "task_a": {"state": sd, "info": {"path": "/c/taskA.pt", "key": "abc123", "test_acc": 91.25}},
        "pool": {"train": [sd, sd], "test": sd, "info": {"pool": {"n_train": 2, "seed0": 7, "min": 80.5}}},
        "history": [{"steps": 5, "mean_loss": 0.25, "last_loss": float("nan"), "restarted": False,
                     "teacher_ce_a": [1.0, float("inf"), -0.0], "note": "épisode", "none": None,
                     "pair": (1, "a")}, {}],
        "true": True,
        "false": False,
        "none": None,
        "corners": {1: "int key", 2.5: None, None: [], "t": x.t(), "scalar": torch.tensor(3, dtype=torch.int64),
                    "bool": torch.tensor([True, False]), "half": torch.ones(2, dtype=torch.bfloat16),
                    "empty": torch.empty(0, 3), "f64": torch.tensor([math.pi], dtype=torch.float64),
                    "u8": torch.tensor([255], dtype=torch.uint8), "nested": [[(), [[]]]], "s": ""},
    }


def _same(a, b, where="") -> list:
    """Differences between a sent and a received object, exact types included."""
    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} != {type(b).__name__}"]
    if isinstance(a, torch.Tensor):
        ok = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
        return [] if ok else [f"{where}: tensor differs"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(a)} != {list(b)}"]
        out = [d for k in a for d in _same(a[k], b[k], f"{where}[{k!r}]")]
        if getattr(a, "_metadata", None) != getattr(b, "_metadata", None):
            out.append(f"{where}: _metadata differs")
        return out
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length"]
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _same(u, v, f"{where}[{i}]")]
    if isinstance(a, float) and math.isnan(a):
        return [] if math.isnan(b) else [f"{where}: nan"]
    if isinstance(a, float) and a == 0.0:
        return [] if math.copysign(1, a) == math.copysign(1, b) else [f"{where}: sign of zero"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _worker(rank, port, marker, result_dir, env):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **env)
    res = {"rank": rank, "diffs": [], "errors": {}}
    from lrmt_fast.distributed import DistSync, broadcast_object, init_distributed, shutdown
    try:
        sync, _ = init_distributed("cpu", timeout_s=60)
        res["listeners"] = _listeners(port) if rank == 0 else None
        # objects that are not tensors or plain data: refused on the sender (and the receivers
        # learn of it instead of waiting for the timeout); the group keeps working afterwards
        import numpy as np
        for name, bad in (("object", {"x": [object()]}), ("set", {1, 2}), ("numpy", np.float64(1.0)),
                          ("evil", {"state": Evil(marker)})):
            try:
                broadcast_object(sync, bad if rank == 0 else None)
                res["errors"][name] = None
            except TypeError as e:
                res["errors"][name] = str(e)
        # From here no rank may unpickle anything: every way torch.distributed could do it fails.
        import torch.distributed.distributed_c10d as c10d
        pickle.loads = _no_unpickling
        pickle.Unpickler = c10d._unpickler = _NoUnpickler
        for name, obj in _payloads().items():
            got = broadcast_object(sync, obj if rank == 0 else None)
            res["diffs"] += _same(obj, got, name)
        # sync_start: rank 1's fresh meta-learner and Adam take rank 0's
        from lrmt_fast.meta_training import build_meta_learner
        torch.manual_seed(rank)
        meta = build_meta_learner(TinyNet(), 4, 3)
        opt = torch.optim.Adam(meta.parameters(), lr=1e-3)
        if rank == 0:
            for p in meta.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        start, hist = sync.sync_start(meta, opt, 5 if rank == 0 else 0, [{"steps": 3}] if rank == 0 else [])
        res["start"], res["hist"] = start, hist
        res["meta"] = [p.detach().clone().tolist() for p in meta.parameters()][:2]
        res["opt_steps"] = [float(s["step"]) for s in opt.state_dict()["state"].values()][:3]
        DistSync.barrier(sync)
        shutdown(sync)
    except Exception:
        res["error"] = traceback.format_exc()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def _listeners(port):
    """Local addresses listening on ``port`` (from /proc/net/tcp and tcp6), as hex strings."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        with open(name) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                addr, p = cols[1].rsplit(":", 1)
                if cols[3] == "0A" and int(p, 16) == port:
                    out.append(addr)
    return out


def _launch(tmp_path, env):
    marker = str(tmp_path / "marker")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, marker, str(tmp_path), env)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        if p.is_alive():
            p.kill()
    results = {}
    for r in range(WORLD):
        f = os.path.join(str(tmp_path), f"rank{r}.json")
        assert os.path.exists(f), f"rank {r} wrote no result (exit code {procs[r].exitcode})"
        with open(f) as fh:
            results[r] = json.load(fh)
    return marker, results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank job on one node (LOCAL_WORLD_SIZE == WORLD_SIZE, its own rendezvous store)."""
    tmp = tmp_path_factory.mktemp("dist")
    return _launch(tmp, {"LOCAL_WORLD_SIZE": str(WORLD)})


def test_broadcast_round_trips_without_pickles(two_ranks):
    _, res = two_ranks
    for r in range(WORLD):
        assert "error" not in res[r], res[r]["error"]
    assert res[1]["diffs"] == [], res[1]["diffs"][:5]
    assert res[0]["diffs"] == []


def test_sync_start_gives_rank0_state(two_ranks):
    _, res = two_ranks
    assert res[0]["start"] == res[1]["start"] == 5 and res[0]["hist"] == res[1]["hist"] == [{"steps": 3}]
    assert res[0]["meta"] == res[1]["meta"] and res[1]["opt_steps"] == res[0]["opt_steps"] and res[1]["opt_steps"]


def test_arbitrary_objects_are_refused(two_ranks):
    marker, res = two_ranks
    assert not os.path.exists(marker), "a rank ran the code a crafted object carried"
    for name, type_name in (("object", "type object"), ("set", "type set"), ("numpy", "numpy.float64"),
                            ("evil", "test_reliability_dist.Evil")):
        sent, received = res[0]["errors"][name], res[1]["errors"][name]
        assert sent is not None and type_name in sent and "\n" not in sent, (name, sent)
        assert received is not None and received.startswith("rank 0 could not send its object (TypeError: ") and type_name in received


def test_single_node_store_listens_on_loopback_only(two_ranks):
    """torch's env:// store listens on every interface (*:PORT) whatever MASTER_ADDR says; on
    one node lrmt binds it to 127.0.0.1."""
    _, res = two_ranks
    if res[0]["listeners"] is None or not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp here")
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    assert res[0]["listeners"] and set(res[0]["listeners"]) <= loopback, res[0]["listeners"]


def test_codec_rejects_malformed_headers():
    """What a foreign peer could send instead: refused with D.DistributedError, nothing built."""
    header, buf = D.encode_payload({"w": torch.ones(3)})
    assert torch.equal(D.decode_payload(header, buf)["w"], torch.ones(3))
    h = json.loads(header)
    bad = [b"\x80not json", json.dumps({"obj": 1}).encode(),
           json.dumps({**h, "tensors": [{"dtype": "ops", "shape": [3]}]}).encode(),
           json.dumps({**h, "tensors": [{"dtype": "float32", "shape": [4]}]}).encode(),
           json.dumps({**h, "obj": {"X": 5}}).encode(),
           json.dumps({**h, "obj": {"__reduce__": ["os.system", "id"]}}).encode()]
    for hb in bad:
        with pytest.raises(D.DistributedError, match="malformed"):
            D.decode_payload(hb, buf)
    with pytest.raises(TypeError, match=r"payload\['a'\]\[0\] of type object"):
        D.encode_payload({"a": [object()]})
    sd = OrderedDict(w=torch.ones(1))
    sd._metadata = {"": {"version": 1}}
    assert D.decode_payload(*D.encode_payload(sd))._metadata == {"": {"version": 1}}
