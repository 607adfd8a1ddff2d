"""Meta-training: Algorithm 1 of the paper (DESIGN.md section 3).

Every episode the teacher and the student start from the same Task A checkpoint
``w0`` and the meta-learner's state is reset. Each step:

1. the teacher takes an SGD step on x_A u x_B (loss = CE_A(head_a) + CE_B(head_b));
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

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .meta_learner import MetaLearner, find_adapted_layers
from .student import features, grads_and_acts

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
    seed: int = 0
    impl: Optional[str] = None    # None/'auto' | 'reference' | 'fused'
    device: str = "cpu"

    @classmethod
    def from_dict(cls, d: dict) -> "MetaTrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown meta-training option(s) {unknown}")
        return cls(**d)


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


# --------------------------------------------------------------------------- steps
def build_meta_learner(model: nn.Module, hidden: int = 32, hidden_gn: int = 32) -> MetaLearner:
    return MetaLearner(find_adapted_layers(model, hidden=hidden, hidden_gn=hidden_gn))


def adapted_modules(meta: MetaLearner) -> List[str]:
    return sorted({l.module for l in meta.layers})


def teacher_sgd_step(model: nn.Module, params: Dict[str, Tensor], xa, ya, xb, yb, lr: float):
    """One multi-task SGD step on x_A u x_B: loss = CE(head_a, A) + CE(head_b, B). Returns new params."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    z = features(model, leaves, torch.cat([xa, xb]))
    za, zb = z[: xa.shape[0]], z[xa.shape[0]:]
    loss = F.cross_entropy(_head(model, leaves, "a", za), ya) + \
        F.cross_entropy(_head(model, leaves, "b", zb), yb)
    names = list(leaves)
    gs = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return {k: (leaves[k] - lr * g).detach() if g is not None else leaves[k].detach()
            for k, g in zip(names, gs)}


def _head(model: nn.Module, params: Dict[str, Tensor], head: str, z: Tensor) -> Tensor:
    pre = f"head_{head}."
    return F.linear(z, params[pre + "weight"], params.get(pre + "bias"))


def student_meta_update(model: nn.Module, meta: MetaLearner, params: Dict[str, Tensor], state,
                        xb: Tensor, yb: Tensor, lr: float, impl: Optional[str] = None,
                        train: bool = False, in_place: bool = False, observe=None):
    """One student step on Task B: meta-learner on the adapted trunk layers, SGD on head_b.

    ``train=True`` keeps the graph to theta (and snapshots theta so that it may be
    updated in place by the optimiser while older steps' graphs are retained).
    ``in_place=True`` (meta-test) writes the new weights and LSTM state into ``params`` and
    ``state`` without a graph (:meth:`MetaLearner.step_`) and returns those same dicts.
    ``observe(meta, deltas, grads, state, params)``, if given, is called after the meta-learner's
    update with its new state and weights (e.g. :meth:`lrmt_fast.gate_trace.GateTrace.record`).
    Returns (new_params, new_state, deltas, task-B loss).
    """
    loss, grads, acts = grads_and_acts(model, params, xb, yb, "b", adapted_modules(meta))
    if in_place:
        with torch.no_grad():
            deltas = meta.step_(params, grads, acts, state, lr, impl=impl)
            if observe is not None:
                observe(meta, deltas, grads, state, params)
            for k, v in params.items():
                if k.startswith("head_b."):
                    v.sub_(grads[k], alpha=lr)
        return params, state, deltas, loss
    new_adapted, new_state, deltas = meta.step(params, grads, acts, state, lr, impl=impl, snapshot=train)
    if observe is not None:
        observe(meta, deltas, grads, new_state, new_adapted)
    new_params = dict(params)
    new_params.update(new_adapted)
    for k in params:
        if k.startswith("head_b."):
            new_params[k] = params[k] - lr * grads[k]
    return new_params, new_state, deltas, loss


def meta_loss(model, teacher, student, x, cfg: MetaTrainConfig) -> Tensor:
    with torch.no_grad():
        ht = features(model, teacher, x)
    hs = features(model, student, x)
    return cfg.loss_coef * F.huber_loss(hs, ht, delta=cfg.huber_delta)


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
def run_episode(model, meta, opt, episode: Episode, cfg: MetaTrainConfig, threshold: float,
                bptt: int, sync=None) -> Dict:
    """Meta-train on one episode; returns {steps, mean_loss, last_loss, restarted}."""
    sync = sync or LocalSync()
    dev = cfg.device
    w0 = {k: v.to(dev) for k, v in episode.w0.items()}
    pnames = [k for k, _ in model.named_parameters()]
    teacher = {k: w0[k].clone() for k in pnames}
    student = {k: w0[k].clone() for k in pnames}
    state = meta.init_state(device=dev)
    s = 0
    total, n, last, broke = 0.0, 0, float("nan"), False
    for _t in range(cfg.max_steps):
        xa, ya = episode.next_a()
        xb, yb = episode.next_b()
        teacher = teacher_sgd_step(model, teacher, xa, ya, xb, yb, cfg.lr)
        student, state, _, _ = student_meta_update(model, meta, student, state, xb, yb, cfg.lr,
                                                   impl=cfg.impl, train=True)
        loss = meta_loss(model, teacher, student, torch.cat([xa, xb]), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        sync.average_grads(meta)
        opt.step()
        s += 1
        last = float(loss.detach())
        total += last
        n += 1
        if sync.any(not (last <= threshold)):   # NaN counts as over the threshold
            broke = True
            break
        if s >= bptt:                       # cut the graph: T-BPTT window ends
            student = {k: v.detach() for k, v in student.items()}
            state = meta.detach_state(state)
            s = 0
    return {"steps": n, "mean_loss": total / max(n, 1), "last_loss": last, "restarted": broke}


def _episode_gen(cfg: MetaTrainConfig, rank: int, episode: int) -> torch.Generator:
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + rank) * 1_000_033 + episode)


def save_meta_checkpoint(path, meta, opt, cfg, next_episode, history):
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
              on_episode: Optional[Callable[[Dict], None]] = None, log: Optional[Callable[[str], None]] = None):
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
    opt = torch.optim.Adam(meta.parameters(), lr=cfg.meta_lr)
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
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.episodes, initial=start, desc="meta-train", unit="ep", dynamic_ncols=True)
    for ep_i in range(start, cfg.episodes):
        thr, bptt = schedule(cfg, ep_i)
        episode = stream.new_episode(ep_i, _episode_gen(cfg, sync.rank, ep_i))
        rec = run_episode(model, meta, opt, episode, cfg, thr, bptt, sync)
        rec.update(episode=ep_i, threshold=thr, bptt=bptt)
        history.append(rec)
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
