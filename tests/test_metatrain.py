"""Algorithm 1: T-BPTT gradients, curriculum, schedules, checkpoints and resume."""
import os

import pytest
import torch

from lrmt_fast.checkpoint import CheckpointError
from lrmt_fast.meta_training import MetaTrainConfig, TensorTaskStream, build_meta_learner, load_meta, metatrain, schedule
from lrmt_fast.steps import meta_loss, student_meta_update, teacher_sgd_step
from lrmt_fast.student import grads_and_acts, param_dict

from tinynet import TinyNet, tiny_data


def _cfg(**kw):
    base = dict(episodes=3, max_steps=6, lr=0.1, hidden=4, hidden_gn=3, batch_a=8, batch_b=8,
                bptt_start=3, bptt_inc=1, bptt_max=4, thresh_start=1e9, thresh_inc=0, thresh_max=1e9,
                schedule_every=2, checkpoint_every=1, impl="reference")
    base.update(kw)
    return MetaTrainConfig(**base)


def _stream(model, dtype=torch.float32):
    xa, ya, xb, yb = tiny_data(dtype=dtype)
    return TensorTaskStream(param_dict(model), xa, ya, xb, yb, 8, 8)


def test_schedule_grows_and_caps():
    cfg = MetaTrainConfig()   # MNIST defaults: 20 -> 35 by +5 and 5 -> 11 by +2 every 1000
    assert schedule(cfg, 0) == (20.0, 5)
    assert schedule(cfg, 999) == (20.0, 5)
    assert schedule(cfg, 1000) == (25.0, 7)
    assert schedule(cfg, 3000) == (35.0, 11)
    assert schedule(cfg, 9000) == (35.0, 11)


def test_tbptt_gradient_matches_finite_differences():
    """The loop's T-BPTT meta-gradient over 3 unrolled steps equals finite differences of
    the same unrolled computation with g, pre and post held fixed (first-order)."""
    torch.manual_seed(0)
    dt = torch.float64
    model = TinyNet().to(dt)
    meta = build_meta_learner(model, hidden=4, hidden_gn=3).to(dt)
    with torch.no_grad():   # move away from the SGD-exact initialisation
        for p in meta.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    cfg = _cfg()
    xa, ya, xb, yb = tiny_data(16, dt)
    w0 = param_dict(model)
    batches = [(xa[i * 4:(i + 1) * 4], ya[i * 4:(i + 1) * 4], xb[i * 4:(i + 1) * 4], yb[i * 4:(i + 1) * 4])
               for i in range(3)]

    # forward with autograd, recording the constants of each step
    recorded = []
    teacher, student = dict(w0), dict(w0)
    state = meta.init_state(dtype=dt)
    for (a, ya_, b, yb_) in batches:
        teacher, _ = teacher_sgd_step(model, teacher, a, ya_, b, yb_, cfg.lr)
        _, grads, acts = grads_and_acts(model, student, b, yb_, "b", [l.module for l in meta.layers])
        recorded.append((grads, acts))
        student, state, _, _ = student_meta_update(model, meta, student, state, b, yb_, cfg.lr, train=True)
    x_last = torch.cat([batches[-1][0], batches[-1][2]])
    loss = meta_loss(model, teacher, student, x_last, cfg.loss_coef, cfg.huber_delta)
    meta.zero_grad()
    loss.backward()

    def replay():
        st, stt = dict(w0), meta.init_state(dtype=dt)
        for grads, acts in recorded:
            new, stt, _ = meta.step(st, grads, acts, stt, cfg.lr, impl="reference")
            st = {**st, **new}
        with torch.no_grad():
            return float(meta_loss(model, teacher, st, x_last, cfg.loss_coef, cfg.huber_delta))

    checked = 0
    for name, p in meta.named_parameters():
        flat = p.data.view(-1)
        for idx in [0, flat.numel() - 1]:
            old = flat[idx].item()
            flat[idx] = old + 1e-6
            lp = replay()
            flat[idx] = old - 1e-6
            lm = replay()
            flat[idx] = old
            fd = (lp - lm) / 2e-6
            ad = p.grad.view(-1)[idx].item()
            assert abs(fd - ad) <= 1e-5 + 1e-4 * abs(fd), (name, idx, fd, ad)
            checked += 1
    assert checked > 20


def test_curriculum_restarts_episode_when_loss_exceeds_threshold():
    torch.manual_seed(0)
    model = TinyNet()
    _, hist = metatrain(model, _stream(model), _cfg(thresh_start=-1.0, thresh_max=-1.0), progress=False)
    assert [h["steps"] for h in hist] == [1, 1, 1] and all(h["restarted"] for h in hist)
    _, hist = metatrain(model, _stream(model), _cfg(), progress=False)
    assert [h["steps"] for h in hist] == [6, 6, 6] and not any(h["restarted"] for h in hist)
    assert [h["bptt"] for h in hist] == [3, 3, 4]


def test_meta_parameters_change_and_stay_finite():
    torch.manual_seed(0)
    model = TinyNet()
    meta0 = build_meta_learner(model, 4, 3)
    meta, hist = metatrain(model, _stream(model), _cfg(), progress=False)
    assert all(torch.isfinite(p).all() for p in meta.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(meta0.state_dict().values(), meta.state_dict().values()))


class _Crash(RuntimeError):
    pass


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    model = TinyNet()
    cfg = _cfg(episodes=4)
    full, hist_full = metatrain(model, _stream(model), cfg, out_dir=str(tmp_path / "a"), progress=False)

    def crash(rec):
        if rec["episode"] == 1:
            raise _Crash()

    with pytest.raises(_Crash):
        metatrain(model, _stream(model), cfg, out_dir=str(tmp_path / "b"), progress=False, on_episode=crash)
    # the checkpoint written after episode 0 survives; resume continues from there
    said = []
    resumed, hist_res = metatrain(model, _stream(model), cfg, out_dir=str(tmp_path / "b"), resume=True,
                                  progress=False, log=said.append)
    assert said == [f"meta-train: resuming from {tmp_path / 'b' / 'meta_ckpt.pt'} at episode 1 of 4"]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["steps"] for h in hist_full] == [h["steps"] for h in hist_res]
    loaded = load_meta(str(tmp_path / "a" / "meta_ckpt.pt"))
    for a, b in zip(full.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    bad = tmp_path / "meta_ckpt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_meta(str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        load_meta(str(tmp_path / "missing.pt"))
    model = TinyNet()
    with pytest.raises(CheckpointError, match="corrupt"):
        metatrain(model, _stream(model), _cfg(), out_dir=str(tmp_path), resume=True, progress=False)
    assert bad.read_bytes() == b"not a checkpoint at all"   # nothing lost


def test_stability_check_rollout_and_episode_end():
    """experiments/studies/stability_check.py: the freeze student's loss is the teacher's distance
    from the checkpoint, a fresh meta-learner is plain SGD (equal curves), the teacher's CE_A is
    recorded per step, and the episode-end step is where Algorithm 1 would break (NaN counts as
    over the threshold)."""
    from experiments.studies.stability_check import first_over, rollout
    from lrmt_fast.steps import make_teacher

    assert first_over([1.0, 2.0, 5.0], 3.0) == 3
    assert first_over([1.0, 2.0], 3.0) is None
    assert first_over([1.0, float("nan")], 3.0) == 2
    torch.manual_seed(0)
    model = TinyNet()
    cfg = _cfg(lr=0.2)
    stream = _stream(model)
    students = {"sgd": build_meta_learner(model, 4, 3), "meta": build_meta_learner(model, 4, 3)}
    teacher = make_teacher(cfg.teacher, model, students["sgd"])
    curves = rollout(model, students, teacher, stream, episode=0, steps=4, mcfg=cfg, seed=3)
    assert set(curves) == {"freeze", "sgd", "meta", "teacher_ce_a"} and all(len(c) == 4 for c in curves.values())
    torch.testing.assert_close(torch.tensor(curves["sgd"]), torch.tensor(curves["meta"]))
    # step 1 by hand: teacher's SGD step on the same batches, against the checkpoint
    gen = torch.Generator().manual_seed(3 * 1_000_003)
    ep = stream.new_episode(0, gen)
    xa, ya = ep.next_a()
    xb, yb = ep.next_b()
    w0 = dict(ep.w0)
    teacher_w, ce_a = teacher_sgd_step(model, w0, xa, ya, xb, yb, cfg.lr)
    expect = float(meta_loss(model, teacher_w, w0, torch.cat([xa, xb]), cfg.loss_coef, cfg.huber_delta))
    assert curves["freeze"][0] == pytest.approx(expect, rel=1e-6)
    assert curves["teacher_ce_a"][0] == pytest.approx(ce_a, rel=1e-6)
    assert curves["freeze"][0] > 0 and curves["sgd"][0] < curves["freeze"][0]


@pytest.mark.parametrize("runner", ["no sync", "LocalSync"])
def test_step_budget_stops_at_chunk_boundary_and_extends_from_a_seeded_checkpoint(tmp_path, runner):
    """The experiments' ``metatrain_budget``: meta-training stops at the first chunk of episodes
    whose steps reach ``max_total_steps``; a larger budget resumed from a smaller run's
    checkpoint (how the ``cpu_finish_avg_x4`` profile continues ``_x2``) ends where one
    uninterrupted run with the larger budget ends, bit for bit."""
    import shutil
    from lrmt_fast.pipeline import metatrain_with_budget
    from lrmt_fast.meta_training import LocalSync

    said = []

    def run(out, cap, resume=False):
        budget = {"max_total_steps": cap, "chunk_episodes": 1}
        os.makedirs(out, exist_ok=True)
        return metatrain_with_budget(model, _stream(model), cfg, str(out), resume, budget, progress=True,
                                     log=said.append, sync=None if runner == "no sync" else LocalSync())

    model = TinyNet()
    cfg = _cfg(episodes=5)                           # no restarts: every episode is 6 steps
    small = run(tmp_path / "small", 7)               # 6 < 7 after one episode, 12 >= 7 after two
    assert [h["steps"] for h in small] == [6, 6]
    assert len(run(tmp_path / "exact", 12)) == 2     # reaching the cap exactly stops too
    straight = run(tmp_path / "straight", 19)        # 18 < 19: a fourth episode
    assert len(straight) == 4
    os.makedirs(tmp_path / "seeded")
    shutil.copy(tmp_path / "small" / "meta_ckpt.pt", tmp_path / "seeded" / "meta_ckpt.pt")
    said.clear()
    seeded = run(tmp_path / "seeded", 19, resume=True)
    assert seeded == straight
    # said once, at the start; the chunks after it resume without a word
    assert [m for m in said if "resuming" in m] == \
        [f"meta-train: resuming from {tmp_path / 'seeded' / 'meta_ckpt.pt'} at episode 2 of 5"]
    a, b = (load_meta(str(tmp_path / d / "meta_ckpt.pt")) for d in ("straight", "seeded"))
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert len(run(tmp_path / "all", 10 ** 6)) == 5  # the episodes bound the run before a large cap
