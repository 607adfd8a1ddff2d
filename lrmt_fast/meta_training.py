"""Meta-training: Algorithm 1 of the paper (docs/method.md section 3).

Every episode the teacher and the student start from the same Task A checkpoint
``w0`` and the meta-learner's state is reset. Each step:

1. the teacher takes an SGD step (:mod:`lrmt_fast.steps`; by default the paper's multi-task
   teacher: one cross-entropy over the union batch x_A u x_B); its CE_A is recorded per step
   and a rise past 3x its first value in an episode is warned about (the teacher forgets);
2. the student computes first-order gradients on x_B alone and is updated by the
   meta-learner (trunk) and plain SGD (head_b);
3. both nets embed x_A u x_B; the meta-loss is
   ``loss_coef * Huber(h_student, h_teacher, delta)``;
4. theta takes an Adam step on the gradient back through the last ``s`` unrolled
   steps (T-BPTT); when ``s`` reaches the current truncation length the graph is
   cut (student weights and LSTM state detached);
5. if the loss exceeds the current curriculum threshold the episode ends and the
   next restarts from ``w0``.

Both schedules grow every ``schedule_every`` episodes. Randomness of episode
``i`` comes only from a generator seeded by (seed, rank, i), so a run resumed
from a checkpoint (written atomically at episode boundaries) reproduces an
uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import torch
from tqdm.auto import tqdm
from torch import nn

from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .meta_learner import MetaLearner, find_adapted_layers, pack_rows
from .steps import TeacherConfig, make_teacher, meta_loss, student_meta_update
from .student import fresh_head_b, functional

Tensor = torch.Tensor
Batch = Tuple[Tensor, Tensor]
CKPT_NAME = "meta_ckpt.pt"


@dataclass
class MetaTrainConfig:
    episodes: int = 4000
    max_steps: int = 500          # T(i): longest episode (the meta-test length)
    lr: float = 5e-2              # student and teacher SGD learning rate (alpha)
    meta_lr: float = 1e-3         # Adam on theta
    loss_coef: float = 300.0
    huber_delta: float = 1.0
    bptt_start: int = 5
    bptt_inc: int = 2
    bptt_max: int = 11
    thresh_start: float = 20.0
    thresh_inc: float = 5.0
    thresh_max: float = 35.0
    schedule_every: int = 1000    # episodes between schedule increments
    batch_a: int = 64
    batch_b: int = 64
    hidden: int = 32              # H of conv / linear learners
    hidden_gn: int = 32           # H of GroupNorm gamma / beta learners
    checkpoint_every: int = 50    # episodes
    episodes_per_step: int = 1    # K episodes in lockstep, one Adam step on their mean loss (= K ranks)
    gate_weight_decay: float = 0.0  # decoupled weight decay of the learners' w_out (0: the paper's Adam)
    seed: int = 0
    impl: Optional[str] = None    # None/'auto' | 'reference' | 'fused'
    device: str = "cpu"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)   # lrmt_fast.steps
    max_bad_steps: int = 20       # non-finite meta-losses or meta-gradients in a row before stopping

    POSITIVE = ("episodes", "max_steps", "lr", "meta_lr", "loss_coef", "huber_delta", "bptt_start", "bptt_max",
                "schedule_every", "batch_a", "batch_b", "hidden", "hidden_gn", "checkpoint_every",
                "episodes_per_step", "max_bad_steps")
    NONNEGATIVE = ("bptt_inc", "thresh_inc", "seed", "gate_weight_decay")

    def __post_init__(self):
        self.teacher = TeacherConfig.from_value(self.teacher)
        if self.bptt_max < self.bptt_start:
            raise ValueError(f"bptt_max ({self.bptt_max}) must be >= bptt_start ({self.bptt_start})")
        if self.thresh_max < self.thresh_start:
            raise ValueError(f"thresh_max ({self.thresh_max}) must be >= thresh_start ({self.thresh_start})")

    @classmethod
    def from_dict(cls, d: dict) -> "MetaTrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown meta-training option(s) {unknown}")
        return cls(**d)

    def key_dict(self) -> dict:
        """The options that decide what meta-training computes (for cache keys): all but the
        device; the teacher as :meth:`TeacherConfig.key` (left out for the teacher of the runs
        made before the option existed, so that their caches stay recognised)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "teacher")}
        for k, v in (("episodes_per_step", 1), ("gate_weight_decay", 0.0), ("max_bad_steps", 20)):
            if d[k] == v:                   # the runs before the option existed
                del d[k]
        tk = self.teacher.key()
        if tk is not None:
            d["teacher"] = tk
        return d


def schedule(cfg: MetaTrainConfig, episode: int) -> Tuple[float, int]:
    """(curriculum loss threshold, T-BPTT truncation length) for ``episode`` (0-based)."""
    k = episode // max(1, cfg.schedule_every)
    thr = min(cfg.thresh_start + k * cfg.thresh_inc, cfg.thresh_max)
    bptt = min(cfg.bptt_start + k * cfg.bptt_inc, cfg.bptt_max)
    return float(thr), int(bptt)


# --------------------------------------------------------------------------- tasks
class Episode(Protocol):
    w0: Dict[str, Tensor]

    def next_a(self) -> Batch: ...

    def next_b(self) -> Batch: ...


class TaskStream(Protocol):
    def new_episode(self, episode: int, gen: torch.Generator) -> Episode: ...


class _TensorEpisode:
    def __init__(self, w0, xa, ya, xb, yb, batch_a, batch_b, device, gen):
        self.w0 = w0
        self._a, self._b = (xa, ya), (xb, yb)
        self.batch_a, self.batch_b = batch_a, batch_b
        self.device, self.gen = device, gen

    def _draw(self, data, n):
        x, y = data
        idx = torch.randint(0, x.shape[0], (n,), generator=self.gen)
        return x[idx].to(self.device, non_blocking=True), y[idx].to(self.device, non_blocking=True)

    def next_a(self):
        return self._draw(self._a, self.batch_a)

    def next_b(self):
        return self._draw(self._b, self.batch_b)


class TensorTaskStream:
    """Task A and Task B data held in memory; batches drawn with the episode generator."""

    def __init__(self, w0: Dict[str, Tensor], xa, ya, xb, yb, batch_a: int = 64, batch_b: int = 64,
                 device="cpu"):
        self.w0 = {k: v.to(device) for k, v in w0.items()}
        self.xa, self.ya, self.xb, self.yb = xa, ya, xb, yb
        self.batch_a, self.batch_b, self.device = batch_a, batch_b, device

    def new_episode(self, episode: int, gen: torch.Generator) -> _TensorEpisode:
        return _TensorEpisode(self.w0, self.xa, self.ya, self.xb, self.yb,
                              self.batch_a, self.batch_b, self.device, gen)


class FreshHeadStream(TensorTaskStream):
    """Episodes start from the Task A checkpoint with a fresh head_b drawn from the episode's
    generator (as every meta-test run does), so the meta-learner never sees one fixed head_b."""

    def new_episode(self, episode, gen):
        ep = super().new_episode(episode, gen)
        ep.w0 = fresh_head_b(self.w0, gen)
        return ep


# --------------------------------------------------------------------------- steps
def build_meta_learner(model: nn.Module, hidden: int = 32, hidden_gn: int = 32) -> MetaLearner:
    return MetaLearner(find_adapted_layers(model, hidden=hidden, hidden_gn=hidden_gn))


# --------------------------------------------------------------------------- sync
class LocalSync:
    """Single-process stand-in for the collective operations of distributed training
    (:class:`lrmt_fast.distributed.DistSync` is the multi-process one; it also has an
    optional ``sync_start(meta, opt, start, history)`` that :func:`metatrain` calls)."""

    rank = 0
    world_size = 1

    def average_grads(self, meta: MetaLearner) -> None:
        pass

    def any(self, flag: bool) -> bool:
        return flag


# --------------------------------------------------------------------------- loop
CE_A_RISE = 3.0    # the teacher's CE_A above this multiple of its first value in an episode: warn
# The CE_A of one 64-image batch is noisy (a converged network's: ~0.01, single batches up to ~0.4),
# so the rise is measured on means of CE_A_WINDOW consecutive steps, against the first value floored
# at CE_A_FLOOR: forgetting (the summed-loss teacher: 0.04 -> 3.16 in five steps) is of order 1.
CE_A_FLOOR = 0.1
CE_A_WINDOW = 5


def ce_a_rise(ce_a: List[float]) -> float:
    """How far the teacher's CE_A rose within an episode: the largest mean of ``CE_A_WINDOW``
    consecutive steps (fewer in a shorter episode) over max(first value, ``CE_A_FLOOR``)."""
    w = min(CE_A_WINDOW, len(ce_a))
    top = max(sum(ce_a[i:i + w]) / w for i in range(len(ce_a) - w + 1))
    return top / max(ce_a[0], CE_A_FLOOR)


class TeacherStabilityWarning(RuntimeWarning):
    """The multi-task teacher's Task A loss rose within an episode: it is forgetting Task A."""


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _no_stage(_name: str):
    return _NULL_STAGE


_NULL_STAGE = contextlib.nullcontext()
STAGES = ("data", "teacher", "student_grad", "op", "reps", "backward", "adam")


def run_episode(model, meta, opt, episode, cfg: MetaTrainConfig, threshold: float,
                bptt: int, sync=None, teacher_rule=None, on_step=None, stage=None, fast: bool = True) -> Dict:
    """Meta-train on one episode, or on K episodes at once (``episode`` a list: K students,
    teachers and LSTM states, in lockstep). Each inner step takes one Adam step on the mean of
    the K meta-losses (the gradient of the mean = the mean of K data-parallel ranks' gradients);
    the episodes end together when any one's loss exceeds ``threshold`` (as ranks do under
    :class:`lrmt_fast.distributed.DistSync`).

    Returns {steps, mean_loss, last_loss, restarted} (losses: the mean over the K episodes)
    and, for the multi-task teacher, ``teacher_ce_a`` (its CE_A on its Task A batch per step,
    the mean over the K) and ``teacher_ce_a_rise`` (:func:`ce_a_rise`).
    ``on_step(step, loss, gates)``, if given, sees every inner step (1-based step, the mean
    meta-loss, one {layer key: (detached gate, the gradient it gated) [Cout, P]} per episode).
    ``stage(name)``, if given, returns a context manager wrapped around each stage of the inner
    step (names in ``STAGES``; :mod:`lrmt_fast.bench.inner_step` times them with it).
    ``fast``: evaluate the networks with the model's fast evaluator where it has one
    (:func:`lrmt_fast.student.functional`: the same function, float32 rounding apart); False
    runs the module's own code (the reference the tests compare with)."""
    sync = sync or LocalSync()
    stage = stage or _no_stage
    fn = functional(model, fast=fast)
    episodes = list(episode) if isinstance(episode, (list, tuple)) else [episode]
    k_eps = len(episodes)
    teacher_rule = teacher_rule or make_teacher(cfg.teacher, model, meta)
    dev = cfg.device
    pnames = [k for k, _ in model.named_parameters()]
    slots = []
    for ep in episodes:
        w0 = {k: v.to(dev) for k, v in ep.w0.items()}
        slots.append({"ep": ep, "teacher": {k: w0[k].clone() for k in pnames},
                      "student": {k: w0[k].clone() for k in pnames}, "state": meta.init_state(device=dev)})
    s = 0
    total, n, last, broke, nonfinite = 0.0, 0, float("nan"), False, None
    ce_a: List[float] = []
    for _t in range(cfg.max_steps):
        losses, step_ce, step_deltas = [], [], []
        opt.zero_grad(set_to_none=True)
        for sl in slots:
            with stage("data"):
                xa, ya = sl["ep"].next_a()
                xb, yb = sl["ep"].next_b()
            with stage("teacher"):
                sl["teacher"], t_ce_a = teacher_rule.step(sl["teacher"], xa, ya, xb, yb, cfg.lr, fn=fn)
            if t_ce_a is not None:
                step_ce.append(t_ce_a)
            seen = {}
            sl["student"], sl["state"], deltas, _ = student_meta_update(
                model, meta, sl["student"], sl["state"], xb, yb, cfg.lr, impl=cfg.impl, train=True,
                observe=None if on_step is None else (lambda _m, _d, g, _s, _p: seen.update(g=g)), stage=stage,
                fn=fn)
            with stage("reps"):
                losses.append(meta_loss(model, sl["teacher"], sl["student"], torch.cat([xa, xb]), cfg.loss_coef,
                                        cfg.huber_delta, fn=fn))
            if on_step is not None:
                step_deltas.append({lay.key: (deltas[lay.key].detach(), pack_rows(seen["g"], lay))
                                    for lay in meta.layers})
            # the gradient of the mean of the K losses, one episode's part at a time, right after its
            # forward (its activations are still in cache then): theta.grad accumulates
            # sum_k (1/K) dL_k/dtheta, the mean's gradient up to the order of the float additions
            with stage("backward"):
                (losses[-1] if k_eps == 1 else losses[-1] / k_eps).backward(retain_graph=True)
        each = [float(l.detach()) for l in losses]
        with stage("adam"):
            sync.average_grads(meta)
            # a non-finite meta-loss or meta-gradient never reaches Adam: the step is skipped and the
            # episode ends. Every rank decides alike without another collective: a rank's NaN loss gives
            # NaN gradients, and the all-reduced gradients are the same on every rank.
            finite = grads_finite(meta)
            if finite:
                opt.step()
        if not finite:
            opt.zero_grad(set_to_none=True)
            nonfinite = "loss" if not all(math.isfinite(v) for v in each) else "gradient"
            break
        s += 1
        last = sum(each) / k_eps
        if step_ce:
            ce_a.append(_sig(sum(step_ce) / len(step_ce)))
        if on_step is not None:
            on_step(n + 1, last, step_deltas)
        total += last
        n += 1
        if sync.any(not all(v <= threshold for v in each)):   # NaN counts as over the threshold
            broke = True
            break
        if s >= bptt:                       # cut the graph: T-BPTT window ends
            for sl in slots:
                sl["student"] = {k: v.detach() for k, v in sl["student"].items()}
                sl["state"] = meta.detach_state(sl["state"])
            s = 0
    rec = {"steps": n, "mean_loss": total / max(n, 1), "last_loss": last, "restarted": broke or bool(nonfinite)}
    if nonfinite:
        rec["nonfinite"] = nonfinite        # the step after the last counted one was skipped
    if ce_a:
        rec["teacher_ce_a"] = ce_a
        rec["teacher_ce_a_rise"] = _sig(ce_a_rise(ce_a))
    return rec


def grads_finite(meta: nn.Module) -> bool:
    """True when every gradient of ``meta`` is finite (one reduction, one host sync)."""
    gs = [p.grad for p in meta.parameters() if p.grad is not None]
    if not gs:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(gs))).all())


class MetaTrainingDiverged(RuntimeError):
    """Meta-training met only non-finite meta-losses or meta-gradients for too many steps in a row."""


def nonfinite_streak(history: List[Dict]) -> int:
    """Skipped (non-finite) steps in a row at the end of ``history``: each ends its episode, so the
    streak is the trailing episodes that ended on one without a good step, plus the one before
    them if it ended on one too."""
    n = 0
    for h in reversed(history):
        if not h.get("nonfinite"):
            break
        n += 1
        if h.get("steps", 0) > 0:
            break
    return n


def check_teacher(rec: Dict, history: List[Dict], log: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The warning for an episode whose teacher CE_A rose past ``CE_A_RISE`` times its first
    value, once per run: only for the first such episode of ``history`` (resumes included).
    Returns the message (logged through ``log`` if given, else warned), or None."""
    rise = rec.get("teacher_ce_a_rise")
    if rise is None or not rise > CE_A_RISE:
        return None
    if any((h.get("teacher_ce_a_rise") or 0) > CE_A_RISE for h in history if h is not rec):
        return None
    ce = rec["teacher_ce_a"]
    msg = (f"meta-train: the teacher is forgetting Task A: in episode {rec.get('episode')} its CE_A rose "
           f"from {ce[0]:.3g} to {max(ce):.3g} (its {CE_A_WINDOW}-step mean {rise:.3g}x the first value floored at "
           f"{CE_A_FLOOR:g}; above {CE_A_RISE:g}x); the lr may be past the "
           f"Task A checkpoint's stability edge (python -m experiments.studies.stability_check)")
    if log:
        log(msg)
    else:
        warnings.warn(msg, TeacherStabilityWarning, stacklevel=2)
    return msg


def _episode_gen(cfg: MetaTrainConfig, rank: int, episode: int) -> torch.Generator:
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + rank) * 1_000_033 + episode)


def meta_optimizer(meta: MetaLearner, cfg: MetaTrainConfig) -> torch.optim.Optimizer:
    """Adam on theta (the paper's), lr ``cfg.meta_lr``. With ``cfg.gate_weight_decay`` > 0 the
    output weights ``w_out`` of every learner (the only path by which the gate depends on the
    LSTM's state and inputs) also decay towards 0, decoupled from the gradient (AdamW's rule):
    a gate that the meta-gradient does not pin down drifts back to input-independent instead of
    random-walking (docs/method.md).

    Adam runs as torch's fused kernel where it has one for theta's device and dtype (CPU and
    CUDA; one pass over theta, its gradient and moments instead of ~10 per tensor: 1.2-2 against
    4.5 ms a step for LeNet's 36 theta tensors at one thread): the same update, equal to the
    per-tensor loop to float32 rounding (1 ulp). A checkpoint keeps the flag it was written with."""
    params = list(meta.parameters())
    fused = _fused_adam_ok(params)
    if not cfg.gate_weight_decay:
        return torch.optim.Adam(params, lr=cfg.meta_lr, fused=fused)
    outs = [meta.learner(l).w_out for l in meta.layers]
    ids = {id(p) for p in outs}
    rest = [p for p in params if id(p) not in ids]
    return torch.optim.Adam([{"params": rest}, {"params": outs, "weight_decay": cfg.gate_weight_decay}],
                            lr=cfg.meta_lr, decoupled_weight_decay=True, fused=fused)


def _fused_adam_ok(params) -> Optional[bool]:
    """True when torch's fused Adam takes these parameters (floating point, all on one CPU or
    CUDA device), else None (torch's default choice)."""
    if not params:
        return None
    dev = params[0].device
    if dev.type not in ("cpu", "cuda") or any(p.device != dev or not p.is_floating_point() for p in params):
        return None
    return True


def save_meta_checkpoint(path, meta, opt, cfg, next_episode, history):
    if not all(bool(torch.isfinite(p).all()) for p in meta.parameters()):
        raise MetaTrainingDiverged(f"meta-training: theta is not finite at episode {next_episode}; the checkpoint "
                                   f"{path} was not overwritten")
    atomic_save({"kind": "lrmt_meta", "meta_config": meta.config(), "meta_state": meta.state_dict(),
                 "opt_state": opt.state_dict(), "cfg": dataclasses.asdict(cfg),
                 "next_episode": next_episode, "history": history}, path)


def load_meta(path: str, device="cpu") -> MetaLearner:
    """A trained meta-learner from a meta-training checkpoint (clear error if corrupt)."""
    ck = load_checkpoint(path, ("meta_config", "meta_state"), "meta-learner checkpoint")
    try:
        meta = MetaLearner.from_config(ck["meta_config"])
        meta.load_state_dict(ck["meta_state"])
    except Exception as e:
        raise CheckpointError(f"meta-learner checkpoint {path} does not match its own config: {e}") from None
    return meta.to(device)


def resume_message(ckpt: str, episode: int, episodes: int) -> str:
    """The line a resumed meta-training logs (tests and users look for it)."""
    return f"meta-train: resuming from {ckpt} at episode {episode} of {episodes}"


def metatrain(model: nn.Module, stream: TaskStream, cfg: MetaTrainConfig, out_dir: Optional[str] = None,
              resume: bool = False, progress: bool = True, sync=None,
              on_episode: Optional[Callable[[Dict], None]] = None, log: Optional[Callable[[str], None]] = None,
              on_step: Optional[Callable[[int, float, List[Dict[str, Tuple[Tensor, Tensor]]]], None]] = None):
    """Algorithm 1. Returns (meta-learner, history: one dict per episode).

    With ``out_dir``, a checkpoint ``out_dir/meta_ckpt.pt`` is written every
    ``cfg.checkpoint_every`` episodes and at the end (rank 0 only); ``resume``
    continues from it (and says so through ``log``, if given). ``sync`` supplies the
    collectives of distributed training.
    """
    sync = sync or LocalSync()
    model = model.to(cfg.device)
    torch.manual_seed(cfg.seed)     # theta's initialisation: identical on every rank
    meta = build_meta_learner(model, cfg.hidden, cfg.hidden_gn).to(cfg.device)
    opt = meta_optimizer(meta, cfg)
    history: List[Dict] = []
    start = 0
    ckpt = os.path.join(out_dir, CKPT_NAME) if out_dir else None
    if resume and ckpt and os.path.exists(ckpt):
        ck = load_checkpoint(ckpt, ("meta_state", "opt_state", "next_episode", "history", "meta_config"),
                             "meta-training checkpoint", map_location=cfg.device)
        if ck["meta_config"] != meta.config():
            raise CheckpointError(f"meta-training checkpoint {ckpt} was written for another network "
                                  f"or meta-learner size; use a fresh --out or drop --resume")
        meta.load_state_dict(ck["meta_state"])
        opt.load_state_dict(ck["opt_state"])
        start, history = int(ck["next_episode"]), list(ck["history"])
        if log:
            log(resume_message(ckpt, start, cfg.episodes))
    if hasattr(sync, "sync_start"):     # distributed: every rank starts from rank 0's state
        start, history = sync.sync_start(meta, opt, start, history)
    bar = None
    if progress and sync.rank == 0:
        bar = tqdm(total=cfg.episodes, initial=start, desc="meta-train", unit="ep", dynamic_ncols=True)
    teacher_rule = make_teacher(cfg.teacher, model, meta)
    k_eps = cfg.episodes_per_step
    for ep_i in range(start, cfg.episodes):
        thr, bptt = schedule(cfg, ep_i)
        # K episodes at once act as K ranks: slot j of rank r draws as rank r * K + j would
        episodes = [stream.new_episode(ep_i, _episode_gen(cfg, sync.rank * k_eps + j, ep_i)) for j in range(k_eps)]
        rec = run_episode(model, meta, opt, episodes, cfg, thr, bptt, sync, teacher_rule, on_step)
        rec.update(episode=ep_i, threshold=thr, bptt=bptt)
        history.append(rec)
        if sync.rank == 0:
            check_teacher(rec, history, log)
        streak = nonfinite_streak(history)
        if streak >= cfg.max_bad_steps:
            if bar is not None:
                bar.close()
            where = (f"the last good checkpoint {ckpt} is kept as it was" if ckpt and os.path.exists(ckpt)
                     else "no checkpoint was written")
            raise MetaTrainingDiverged(
                f"meta-training stopped in episode {ep_i}: {streak} steps in a row had a non-finite (NaN or inf) "
                f"meta-{rec['nonfinite']} and were skipped; {where}; lower metatrain.meta_lr / lr / loss_coef")
        if on_episode:
            on_episode(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(steps=rec["steps"], loss=f"{rec['mean_loss']:.2f}", s=bptt, thr=thr)
        done = ep_i + 1
        if ckpt and sync.rank == 0 and (done % max(1, cfg.checkpoint_every) == 0 or done == cfg.episodes):
            save_meta_checkpoint(ckpt, meta, opt, cfg, done, history)
    if bar is not None:
        bar.close()
    return meta, history
