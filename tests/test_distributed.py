"""Distributed meta-training (gloo, 2 processes on the CPU): lockstep, equivalence with one
process that averages the two ranks' gradients, the collective OR, and kill + resume."""
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from lrmt_fast.distributed import DistributedError, DistSync, init_distributed, shutdown
from lrmt_fast.meta_training import MetaTrainConfig, TensorTaskStream, _episode_gen, build_meta_learner, metatrain, schedule
from lrmt_fast.steps import meta_loss, student_meta_update, teacher_sgd_step
from lrmt_fast.student import param_dict

from ports import free_port
from tinynet import TinyNet, tiny_data

WORLD = 2
EPISODES = 4


def _cfg(**kw):
    base = dict(episodes=EPISODES, max_steps=5, lr=0.1, hidden=4, hidden_gn=3, batch_a=8, batch_b=8,
                bptt_start=2, bptt_inc=1, bptt_max=3, thresh_start=THRESH, thresh_inc=0.0,
                thresh_max=THRESH, schedule_every=2, checkpoint_every=1, impl="reference", seed=3)
    base.update(kw)
    return MetaTrainConfig(**base)


# The ranks see different Task B data (rank 1's images scaled), and the threshold lies inside
# the range of their losses, so that in some step only one rank crosses it: the collective OR
# must then end the episode on both.
THRESH = 0.9
B_SCALE = (1.0, 3.0)


def _model():
    torch.manual_seed(0)
    return TinyNet()


def _stream(model, rank):
    xa, ya, xb, yb = tiny_data()
    return TensorTaskStream(param_dict(model), xa, ya, xb * B_SCALE[rank], yb, 8, 8)


def _flat(meta):
    return torch.cat([p.detach().reshape(-1).clone() for p in meta.parameters()])


class RecordingSync(DistSync):
    """DistSync that snapshots theta after every optimiser step (``any`` runs right after it)."""

    def __init__(self, inner: DistSync):
        self.__dict__.update(inner.__dict__)
        self.params, self.flags, self._meta = [], [], None

    def average_grads(self, meta):
        self._meta = meta
        super().average_grads(meta)

    def any(self, flag):
        self.params.append(_flat(self._meta))
        self.flags.append(bool(flag))
        return super().any(flag)


def _worker(rank, port, out_dir, result_dir, crash_at, resume, cap=None):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    res = {"rank": rank}
    sync = None
    try:
        sync, dev = init_distributed("cpu", timeout_s=30)
        rec = RecordingSync(sync)
        res["any_true"] = DistSync.any(rec, rank == 1)
        res["any_false"] = DistSync.any(rec, False)
        model = _model()

        def on_episode(r):
            if crash_at is not None and rank == 1 and r["episode"] == crash_at:
                os._exit(3)      # a hard death: no cleanup, no goodbye to the peer

        if cap is None:
            meta, hist = metatrain(model, _stream(model, rank), _cfg(), out_dir=out_dir, resume=resume,
                                   progress=False, sync=rec, on_episode=on_episode)
            res.update(params=rec.params, flags=rec.flags, hist=hist, final=_flat(meta))
        else:   # the experiments' chunked step budget (rank 0 checkpoints, every rank in lockstep)
            from lrmt_fast.pipeline import metatrain_with_budget
            hist = metatrain_with_budget(model, _stream(model, rank), _cfg(), out_dir, resume,
                                         {"max_total_steps": cap, "chunk_episodes": 1}, progress=True,
                                         log=lambda *_: None, sync=rec)
            res.update(params=rec.params, flags=rec.flags, hist=hist, final=rec.params[-1])
    except DistributedError as e:
        res["error"] = str(e)
    except Exception:
        res["error"] = traceback.format_exc()
    finally:        # as the CLI does: leave the group on the error path too (else gloo's worker
        shutdown(sync)  # thread may still hold a tensor at interpreter exit: SIGABRT)
    torch.save(res, os.path.join(result_dir, f"rank{rank}.pt"))


def _launch(tmp, out_dir, crash_at=None, resume=False, cap=None):
    """Start WORLD processes (spawn), wait, and return (exit codes, per-rank results)."""
    res_dir = os.path.join(tmp, f"res_{crash_at}_{resume}_{cap}")
    os.makedirs(res_dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out_dir, res_dir, crash_at, resume, cap)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.is_alive():
            p.kill()
    results = {}
    for r in range(WORLD):
        f = os.path.join(res_dir, f"rank{r}.pt")
        if os.path.exists(f):
            results[r] = torch.load(f, weights_only=False)
    return [p.exitcode for p in procs], results


def _reference_two_replicas(cfg):
    """One process, both ranks' episodes side by side: per step, sum both ranks' meta-gradients,
    divide by 2, one Adam step; the episode ends when either rank's loss is over the threshold."""
    model = _model()
    streams = [_stream(model, r) for r in range(WORLD)]
    torch.manual_seed(cfg.seed)
    meta = build_meta_learner(model, cfg.hidden, cfg.hidden_gn)
    opt = torch.optim.Adam(meta.parameters(), lr=cfg.meta_lr)
    pnames = [k for k, _ in model.named_parameters()]
    params, flags, steps = [], [], []
    for ep in range(cfg.episodes):
        thr, bptt = schedule(cfg, ep)
        eps = [streams[r].new_episode(ep, _episode_gen(cfg, r, ep)) for r in range(WORLD)]
        reps = []
        for e in eps:
            w0 = {k: e.w0[k].clone() for k in pnames}
            reps.append({"t": dict(w0), "s": {k: v.clone() for k, v in w0.items()}, "st": meta.init_state()})
        s, n = 0, 0
        for _ in range(cfg.max_steps):
            losses = []
            for e, rp in zip(eps, reps):
                xa, ya = e.next_a()
                xb, yb = e.next_b()
                rp["t"], _ = teacher_sgd_step(model, rp["t"], xa, ya, xb, yb, cfg.lr)
                rp["s"], rp["st"], _, _ = student_meta_update(model, meta, rp["s"], rp["st"], xb, yb, cfg.lr,
                                                              impl=cfg.impl, train=True)
                losses.append(meta_loss(model, rp["t"], rp["s"], torch.cat([xa, xb]), cfg.loss_coef, cfg.huber_delta))
            opt.zero_grad(set_to_none=True)
            for l in losses:
                l.backward(retain_graph=True)
            for p in meta.parameters():
                if p.grad is not None:
                    p.grad.div_(WORLD)
            opt.step()
            params.append(_flat(meta))
            over = [not (float(l.detach()) <= thr) for l in losses]
            flags.append(over)
            s += 1
            n += 1
            if any(over):
                break
            if s >= bptt:
                for rp in reps:
                    rp["s"] = {k: v.detach() for k, v in rp["s"].items()}
                    rp["st"] = meta.detach_state(rp["st"])
                s = 0
        steps.append(n)
    return params, flags, steps, _flat(meta)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dist_full"))
    codes, res = _launch(tmp, os.path.join(tmp, "run"))
    assert codes == [0, 0], (codes, {r: v.get("error") for r, v in res.items()})
    return res


def test_collective_or(full_run):
    for r in range(WORLD):
        assert full_run[r]["any_true"] is True and full_run[r]["any_false"] is False


def test_ranks_identical_after_every_step_and_match_single_process_average(full_run):
    r0, r1 = full_run[0], full_run[1]
    assert len(r0["params"]) == len(r1["params"]) > EPISODES
    for i, (a, b) in enumerate(zip(r0["params"], r1["params"])):
        assert torch.equal(a, b), f"theta differs between ranks after step {i}"
    assert [h["steps"] for h in r0["hist"]] == [h["steps"] for h in r1["hist"]]
    # some step had exactly one rank over the threshold: the OR ended the other's episode too
    lone = [i for i, (f0, f1) in enumerate(zip(r0["flags"], r1["flags"])) if f0 != f1]
    assert lone, "test setup: one rank alone should cross the threshold in some step"
    assert all(r0["flags"][i] or r1["flags"][i] for i in lone)
    assert any(h["restarted"] for h in r0["hist"])

    ref_params, ref_flags, ref_steps, ref_final = _reference_two_replicas(_cfg())
    assert ref_steps == [h["steps"] for h in r0["hist"]]
    assert [list(f) for f in ref_flags] == [[a, b] for a, b in zip(r0["flags"], r1["flags"])]
    assert len(ref_params) == len(r0["params"])
    moved = 0
    for i, (a, b) in enumerate(zip(ref_params, r0["params"])):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {i}")
        moved += int(not torch.equal(a, ref_params[0]))
    assert moved > 0
    torch.testing.assert_close(r0["final"], ref_final, rtol=1e-5, atol=1e-6)


class _SlotStreams:
    """One process's stream for K = WORLD episodes in lockstep: the j-th episode drawn in each
    lockstep step comes from rank j's stream, as rank j of the distributed run draws it."""

    def __init__(self, streams):
        self.streams, self.calls = streams, 0

    def new_episode(self, i, gen):
        s = self.streams[self.calls % len(self.streams)]
        self.calls += 1
        return s.new_episode(i, gen)


def test_k_episodes_in_one_process_equal_k_ranks(full_run):
    """metatrain with episodes_per_step = 2 in one process takes the steps of the 2-rank gloo run:
    the same episode lengths and restarts (the lockstep OR), and the final theta within float32
    rounding (the ranks' all-reduce mean against one process's accumulated L_k / K)."""
    torch.set_num_threads(1)
    model = _model()
    stream = _SlotStreams([_stream(model, r) for r in range(WORLD)])
    meta, hist = metatrain(model, stream, _cfg(episodes_per_step=WORLD), progress=False)
    r0 = full_run[0]
    assert [h["steps"] for h in hist] == [h["steps"] for h in r0["hist"]]
    assert [h["restarted"] for h in hist] == [h["restarted"] for h in r0["hist"]]
    torch.testing.assert_close(_flat(meta), r0["final"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(r0["final"], r0["params"][0])


def test_killed_run_stops_with_clear_error_and_resumes(full_run, tmp_path):
    out = str(tmp_path / "run")
    codes, res = _launch(str(tmp_path), out, crash_at=2)
    assert codes[1] == 3 and 1 not in res           # rank 1 died hard in episode 2
    assert codes[0] == 0 and "error" in res[0], res.get(0, {}).keys()
    assert "--resume" in res[0]["error"] and "rank 0/2" in res[0]["error"], res[0]["error"]
    ck = torch.load(os.path.join(out, "meta_ckpt.pt"), weights_only=False)
    assert 1 <= ck["next_episode"] < EPISODES
    codes, res = _launch(str(tmp_path), out, resume=True)
    assert codes == [0, 0], {r: v.get("error") for r, v in res.items()}
    for r in range(WORLD):
        assert torch.equal(res[r]["final"], full_run[0]["final"]), r
        assert [h["steps"] for h in res[r]["hist"]] == [h["steps"] for h in full_run[0]["hist"]]


def test_step_budget_stops_every_rank_at_the_same_chunk(full_run, tmp_path):
    """lrmt_fast.pipeline.metatrain_with_budget under DistSync: the ranks stop at the same chunk
    of episodes, with the theta of the uncut run at that point (chunks resume exactly)."""
    steps = [h["steps"] for h in full_run[0]["hist"]]
    cap = steps[0] + 1                               # reached by the end of the second episode
    out = str(tmp_path / "run")
    codes, res = _launch(str(tmp_path), out, cap=cap)
    assert codes == [0, 0], {r: v.get("error") for r, v in res.items()}
    n = steps[0] + steps[1]
    for r in range(WORLD):
        assert [h["steps"] for h in res[r]["hist"]] == steps[:2], r
        assert len(res[r]["params"]) == n
        assert torch.equal(res[r]["final"], full_run[0]["params"][n - 1]), r
    ck = torch.load(os.path.join(out, "meta_ckpt.pt"), weights_only=False)
    assert ck["next_episode"] == 2


def test_not_launched_gives_local_sync(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    sync, dev = init_distributed("cpu")
    assert sync.rank == 0 and sync.world_size == 1 and dev == "cpu" and sync.any(True) and not sync.any(False)
    with pytest.raises(DistributedError, match="initialised process group"):
        DistSync("cpu")


def _one_rank_worker(backend, device, port, result_dir):
    """One rank of a process group (NCCL on the GPU, gloo on the CPU): the collectives of
    DistSync, and a meta-training through DistSync that must equal the same run without a process
    group (one rank's average is its own gradient)."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    res = {}
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(0)
        dist.init_process_group(backend)
        sync = DistSync(device, timeout_s=60)
        res["backend"] = sync.backend
        res["any_true"], res["any_false"] = sync.any(True), sync.any(False)
        res["bcast"] = sync.broadcast_object({"x": 1})
        sync.barrier()
        runs = {}
        for name, s in (("group", sync), ("local", None)):
            model = _model().to(device)
            xa, ya, xb, yb = tiny_data()
            stream = TensorTaskStream(param_dict(model), xa, ya, xb, yb, 8, 8, device=device)
            meta, hist = metatrain(model, stream, _cfg(device=device, impl=None), progress=False, sync=s)
            runs[name] = (_flat(meta).cpu(), [h["steps"] for h in hist])
        res["runs"] = runs
        shutdown(sync)
    except Exception:
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(result_dir, "one_rank.pt"))


@pytest.mark.parametrize("backend,device", [("gloo", "cpu"), pytest.param("nccl", "cuda:0", marks=pytest.mark.cuda)])
def test_one_rank_group_on_each_backend(backend, device, tmp_path):
    """DistSync over NCCL on the GPU (one GPU here, so one rank) and over gloo on the CPU."""
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_one_rank_worker, args=(backend, device, free_port(), str(tmp_path)))
    p.start()
    p.join(240)
    if p.is_alive():
        p.kill()
    res = torch.load(os.path.join(str(tmp_path), "one_rank.pt"), weights_only=False)
    assert "error" not in res, res["error"]
    assert res["backend"] == backend and res["any_true"] is True and res["any_false"] is False
    assert res["bcast"] == {"x": 1}
    (a, steps_a), (b, steps_b) = res["runs"]["group"], res["runs"]["local"]
    assert steps_a == steps_b and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_restart_safe_store_choice(monkeypatch, capsys):
    """Under torchrun with --max-restarts and the agent's shared store, one node's workers join
    through a store prefixed by their restart count (the keys of a dead attempt stay out of
    sight); elsewhere the default env:// rendezvous; several nodes: a warning naming the fix."""
    import datetime
    import torch.distributed as dist
    from lrmt_fast.distributed import _restart_safe_store
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, True, datetime.timedelta(seconds=10), wait_for_workers=False)
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK="0",
                     TORCHELASTIC_RESTART_COUNT="1", GROUP_WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    timeout = datetime.timedelta(seconds=10)
    for use, restarts in (("False", "3"), ("True", "0")):     # no shared store, or no restarts
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", use)
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
        assert _restart_safe_store(timeout) is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    store = _restart_safe_store(timeout)
    store.set("addr", "x")
    assert server.get("lrmt/attempt_1/addr") == b"x" and not server.check(["addr"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert not _restart_safe_store(timeout).check(["addr"])   # the next attempt does not see it
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert _restart_safe_store(timeout) is None
    err = capsys.readouterr().err
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in err and err.count("\n") == 1
    monkeypatch.setenv("RANK", "1")                            # only rank 0 says it
    assert _restart_safe_store(timeout) is None and capsys.readouterr().err == ""
