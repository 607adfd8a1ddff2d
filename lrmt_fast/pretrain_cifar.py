"""Task A pretraining on CIFAR-5A: ResNet-32 GN, and the pool of checkpoints of Exp 3.

Paper (5.2): SGD, lr 0.1, momentum 0.9, batch 128. The paper gives neither the
schedule nor the weight decay; here (docs/cifar.md): cosine decay of the learning
rate from 0.1 to 0 over ``epochs`` (default 100; ``schedule='step'`` divides by 10
at 50% and 75% instead), optionally with a linear warmup and zero-initialised
residual gammas (the configs use both: without them lr 0.1 makes ResNet-32 GN
diverge and collapse in its first steps), weight decay 5e-4 on every trained parameter, standard
augmentation (random 32x32 crop of the 4-pixel zero-padded image, horizontal
flip), standard CIFAR normalisation. Only the trunk and ``head_a`` are trained;
``head_b`` stays the seeded untrained head (each episode / run redraws it).

An optional finish phase (``finish_epochs``, off by default) continues the finished network with
plain SGD at a constant learning rate (default the students' 0.1) so that it ends where that
rate is stable (docs/cifar.md section 2, "The finish phase"); it starts from the cached checkpoint of
the config without it. With ``finish_average_epochs`` the checkpoint holds the mean of the weights
over the phase's last steps (tail averaging) instead of the last step's.

Checkpoints are written atomically, in the format of :mod:`lrmt_fast.pretrain`
(``kind='lrmt_taskA'``, ``key``, ``config``, ``state_dict``, ``test_acc``,
``history``), and are resumable: ``<path>.partial`` holds the model, optimiser
and generator state after every epoch, so an interrupted pretraining continues
where it stopped (bit-exact on the CPU). The cache key covers the config and the
fingerprint of the Task A data, so another config never reuses them silently.

:func:`pretrain_pool` trains N checkpoints (seeds ``seed0 .. seed0+N-1``) for
Exp 3, skipping those already complete; with ``shard=(i, k)`` (or under
``torchrun``, from RANK / WORLD_SIZE) process i does every k-th one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .data.cifar import Task, augment, normalize
from .data.tasks import fingerprint
from .models.resnet_gn import BasicBlock
from .models import ResNetGN, build_model

Tensor = torch.Tensor


@dataclass
class CifarPretrainConfig:
    model: str = "resnet32_gn"
    model_kw: Dict = field(default_factory=dict)
    epochs: float = 100.0
    lr: float = 0.1
    momentum: float = 0.9
    batch: int = 128
    weight_decay: float = 5e-4
    schedule: str = "cosine"      # 'cosine' | 'step' | 'constant'
    augment: bool = True
    max_train: Optional[int] = None   # a fixed subset of Task A's training set (smoke / quick runs)
    eval_every: int = 1               # epochs between test evaluations (the last one always)
    seed: int = 0
    # Stabilisers of the first steps at lr 0.1 (docs/cifar.md, "Task A"): without them ResNet-32 GN
    # diverges in its first ~10 steps and collapses to chance (measured). Linear warmup of the
    # learning rate over ``warmup_epochs``; ``zero_init_residual`` starts the last GroupNorm gamma of
    # every residual block at 0, so that every block is the identity at initialisation.
    warmup_epochs: float = 0.0
    zero_init_residual: bool = False
    # The finish phase (docs/cifar.md section 2, "The finish phase"): after the schedule above ends,
    # ``finish_epochs`` more epochs of SGD at the constant ``finish_lr`` (ramped linearly from 0 over
    # ``finish_warmup_epochs``) with ``finish_momentum`` / ``finish_weight_decay``; the default, plain
    # SGD at 0.1, is how the students, the teacher and the meta-learner's student train. It starts
    # from the checkpoint of the same config without it (trained first if absent, reused if cached),
    # so adding it costs only its own epochs. Off (0 epochs) by default; then these fields are left
    # out of the cache key, which stays the key of the config without them.
    finish_epochs: float = 0.0
    finish_lr: float = 0.1
    finish_momentum: float = 0.0
    finish_weight_decay: float = 0.0
    finish_warmup_epochs: float = 1.0
    # Tail averaging of the finish phase (as stochastic weight averaging, Izmailov et al. 2018): the
    # checkpoint's weights are the mean of the weights after each SGD step of the last
    # ``finish_average_epochs`` epochs of the phase, instead of the last step's (GroupNorm has no
    # running statistics to recompute). 0 (default) keeps the last step's; then the field is left out
    # of the cache key, which stays the key the config had before the field existed.
    finish_average_epochs: float = 0.0

    POSITIVE = ("epochs", "lr", "batch", "eval_every")
    NONNEGATIVE = ("momentum", "weight_decay", "seed", "warmup_epochs")

    def __post_init__(self):
        if self.finish_epochs < 0 or self.finish_warmup_epochs < 0 or self.finish_weight_decay < 0:
            raise ValueError("finish_epochs, finish_warmup_epochs and finish_weight_decay must be >= 0")
        if self.finish_epochs > 0 and not (self.finish_lr > 0 and 0 <= self.finish_momentum < 1):
            raise ValueError(f"the finish phase needs finish_lr > 0 and 0 <= finish_momentum < 1 "
                             f"(got {self.finish_lr}, {self.finish_momentum})")
        if self.finish_average_epochs < 0 or self.finish_average_epochs > max(self.finish_epochs, 0):
            raise ValueError(f"finish_average_epochs must be between 0 and finish_epochs "
                             f"(got {self.finish_average_epochs}, finish_epochs {self.finish_epochs})")



FINISH_FIELDS = ("finish_epochs", "finish_lr", "finish_momentum", "finish_weight_decay", "finish_warmup_epochs",
                 "finish_average_epochs")


def base_config(cfg: CifarPretrainConfig) -> CifarPretrainConfig:
    """``cfg`` without its finish phase: the config of the checkpoint the finish phase starts from."""
    defaults = {f.name: f.default for f in dataclasses.fields(CifarPretrainConfig) if f.name in FINISH_FIELDS}
    return dataclasses.replace(cfg, **defaults)


def warmup_steps(cfg: CifarPretrainConfig, total: int) -> int:
    """SGD steps of the linear warmup: ``warmup_epochs`` out of ``epochs``, of ``total`` steps."""
    if cfg.warmup_epochs <= 0:
        return 0
    return min(total, max(1, int(round(total * cfg.warmup_epochs / max(cfg.epochs, 1e-12)))))


def lr_at(cfg: CifarPretrainConfig, step: int, total: int) -> float:
    """Learning rate of SGD step ``step`` (0-based) out of ``total``: the schedule over the whole
    run, times the linear warmup factor ``(step + 1) / warmup`` during the warmup."""
    frac = step / max(1, total)
    if cfg.schedule == "cosine":
        lr = 0.5 * cfg.lr * (1.0 + math.cos(math.pi * frac))
    elif cfg.schedule == "step":
        lr = cfg.lr * (0.1 ** (int(frac >= 0.5) + int(frac >= 0.75)))
    elif cfg.schedule == "constant":
        lr = cfg.lr
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}: expected 'cosine', 'step' or 'constant'")
    w = warmup_steps(cfg, total)
    return lr * min(1.0, (step + 1) / w) if w else lr


def data_fingerprint(task: Task) -> str:
    return fingerprint(task.train_x, task.train_y, task.test_x, task.test_y)


def cache_key(cfg: CifarPretrainConfig, data_fp: str) -> str:
    d = dataclasses.asdict(cfg)
    if cfg.finish_epochs <= 0:           # no finish phase: the key of the config without its fields
        for k in FINISH_FIELDS:
            d.pop(k)
    elif cfg.finish_average_epochs == 0:  # no averaging: the key the finish phase had before the field
        d.pop("finish_average_epochs")
    blob = json.dumps({"cfg": d, "data": data_fp, "kind": "cifar"}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def build_cifar_model(name: str, num_classes_a: int = 5, num_classes_b: int = 5, **kw) -> nn.Module:
    """``resnet32_gn`` (the paper's), or ``resnet_gn`` with ``blocks_per_stage`` / ``widths``
    (a smaller ResNet-GN for smoke runs and tests; the same layer kinds)."""
    if name == "resnet_gn":
        if "widths" in kw:
            kw = {**kw, "widths": tuple(kw["widths"])}
        return ResNetGN(num_classes_a=num_classes_a, num_classes_b=num_classes_b, **kw)
    return build_model(name, num_classes_a, num_classes_b, **kw)


def make_model(cfg: CifarPretrainConfig, num_classes_a: int = 5, num_classes_b: int = 5) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = build_cifar_model(cfg.model, num_classes_a, num_classes_b, **cfg.model_kw)
    if cfg.zero_init_residual:
        zero_init_residual(model)
    return model


def zero_init_residual(model: nn.Module) -> int:
    """Set the gamma of the last GroupNorm of every residual block to 0 (each block starts as the
    identity; Goyal et al. 2017). Returns how many blocks were changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, BasicBlock):
            with torch.no_grad():
                m.gn2.weight.zero_()
            n += 1
    if n == 0:
        raise ValueError("zero_init_residual: the model has no residual blocks")
    return n


@torch.no_grad()
def accuracy_u8(model: nn.Module, x: Tensor, y: Tensor, head: str = "a", batch: int = 1000,
                device="cpu") -> float:
    """Test accuracy (percent) of ``model``'s ``head`` on uint8 images, normalised batch by batch."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        xb = normalize(x[i:i + batch].to(device))
        correct += int((model(xb, head).argmax(1) == y[i:i + batch].to(device)).sum())
    model.train(was)
    return 100.0 * correct / max(1, x.shape[0])


def _train_subset(task: Task, cfg: CifarPretrainConfig) -> Tuple[Tensor, Tensor]:
    n = task.train_x.shape[0]
    if cfg.max_train is None or cfg.max_train >= n:
        return task.train_x, task.train_y
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(12345))[: cfg.max_train].sort().values
    return task.train_x[idx], task.train_y[idx]


def pretrain_cifar(task: Task, cfg: CifarPretrainConfig, path: str, device="cpu", progress: bool = True,
                   log: Callable[[str], None] = print, num_classes_b: int = 5,
                   stop_after_epoch: Optional[int] = None, base_path: Optional[str] = None,
                   owned: bool = True) -> Dict:
    """Train (or resume, or reuse) the Task A checkpoint at ``path``; returns its dict.

    With a finish phase (``cfg.finish_epochs > 0``) the checkpoint of ``base_config(cfg)`` at
    ``base_path`` (default: its cache name beside ``path``) is reused, or trained first, and the
    finish phase starts from it; the result records it under ``"base"``.
    ``stop_after_epoch`` ends the call after that many epochs in total of the phase it is training
    (leaving the ``.partial`` file): for tests of the resume path and for time-boxed jobs.
    ``owned=False`` (a file the user named, ``--taskA-ckpt``): errors about it never advise deleting it.
    """
    data_fp = data_fingerprint(task)
    key = cache_key(cfg, data_fp)
    if os.path.exists(path):
        ck = load_checkpoint(path, ("state_dict", "key", "test_acc"), "CIFAR Task A checkpoint", owned=owned)
        if ck["key"] != key:
            raise CheckpointError(f"CIFAR Task A checkpoint {path} has key {ck['key']}, expected {key} "
                                  f"(another config or data); "
                                  + ("delete it or choose another path" if owned else "choose another --taskA-ckpt"))
        return ck
    finish = cfg.finish_epochs > 0
    base = None
    if finish:
        bcfg = base_config(cfg)
        base_path = base_path or default_path(os.path.dirname(path) or ".", task, bcfg)
        base = pretrain_cifar(task, bcfg, base_path, device, progress, log, num_classes_b, stop_after_epoch)
        if base.get("partial"):
            return base
    model = make_model(cfg, task.num_classes, num_classes_b).to(device)
    train_params = [p for n, p in model.named_parameters() if not n.startswith("head_b.")]
    xtr, ytr = _train_subset(task, cfg)
    xtr, ytr = xtr.to(device), ytr.to(device)
    n = xtr.shape[0]
    steps_per_epoch = max(1, n // cfg.batch)        # drop the last partial batch
    epochs = cfg.finish_epochs if finish else cfg.epochs
    n_epochs = max(1, int(math.ceil(epochs)))
    total = max(1, int(round(epochs * steps_per_epoch)))
    if finish:
        model.load_state_dict(base["state_dict"])
        opt = torch.optim.SGD(train_params, lr=cfg.finish_lr, momentum=cfg.finish_momentum,
                              weight_decay=cfg.finish_weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        warm = int(round(cfg.finish_warmup_epochs * steps_per_epoch))

        def lr_of(s: int) -> float:
            return cfg.finish_lr * min(1.0, (s + 1) / warm) if warm > 0 else cfg.finish_lr
        what = f"finish 5A seed {cfg.seed} (lr {cfg.finish_lr:g})"
        # tail averaging: the mean of the weights after each of the phase's last n_avg_steps steps
        n_avg_steps = min(total, int(round(cfg.finish_average_epochs * steps_per_epoch)))
    else:
        opt = torch.optim.SGD(train_params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        def lr_of(s: int) -> float:
            return lr_at(cfg, s, total)
        what = f"pretrain 5A seed {cfg.seed}"
        n_avg_steps = 0
    epoch, step, history = 0, 0, []
    avg_from = total - n_avg_steps  # the weights after steps avg_from+1 .. total enter the mean
    avg = None                      # their running mean so far (steps avg_from+1 .. step)
    partial = path + ".partial"
    if os.path.exists(partial):
        pk = load_checkpoint(partial, ("key", "model", "opt", "gen", "epoch", "step", "history"),
                             "partial CIFAR pretraining checkpoint")
        if pk["key"] == key:
            model.load_state_dict(pk["model"])
            opt.load_state_dict(pk["opt"])
            gen.set_state(pk["gen"])
            epoch, step, history = int(pk["epoch"]), int(pk["step"]), list(pk["history"])
            if pk.get("avg") is not None:
                avg = {k: v.to(device) for k, v in pk["avg"].items()}
            log(f"pretrain-cifar: resuming {path} at epoch {epoch}/{n_epochs}")
        else:
            log(f"pretrain-cifar: ignoring {partial} (written for another config)")
    bar = None
    if progress:
        bar = tqdm(total=total, initial=step, desc=what, unit="step", dynamic_ncols=True, leave=False)
    model.train()
    while step < total:
        perm = torch.randperm(n, generator=gen)
        running, cnt = 0.0, 0
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * cfg.batch:(b + 1) * cfg.batch].to(xtr.device)
            xb = xtr[idx]
            if cfg.augment:
                xb = augment(xb, gen)
            for gparam in opt.param_groups:
                gparam["lr"] = lr_of(step)
            loss = F.cross_entropy(model(normalize(xb), "a"), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            cnt += 1
            step += 1
            if step > avg_from:
                avg = _average_in(avg, step - avg_from - 1, model)
            if bar is not None:
                bar.update(1)
        epoch += 1
        rec = {"epoch": epoch, "step": step, "loss": running / max(1, cnt)}
        if epoch % max(1, cfg.eval_every) == 0 or step >= total:
            rec["test_acc"] = accuracy_u8(model, task.test_x, task.test_y, device=device)
        history.append(rec)
        if bar is not None:
            bar.set_postfix(epoch=epoch, loss=f"{rec['loss']:.3f}", acc=rec.get("test_acc", "-"))
        if step < total:
            atomic_save({"key": key, "model": model.state_dict(), "opt": opt.state_dict(),
                         "gen": gen.get_state(), "epoch": epoch, "step": step, "history": history,
                         "avg": {k: v.cpu() for k, v in avg.items()} if avg is not None else None}, partial)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                if bar is not None:
                    bar.close()
                return {"partial": True, "epoch": epoch, "history": history}
    if bar is not None:
        bar.close()
    test_acc = history[-1]["test_acc"]
    averaged = {}
    if n_avg_steps:
        model.load_state_dict({**model.state_dict(), **avg})
        test_acc = accuracy_u8(model, task.test_x, task.test_y, device=device)
        averaged = {"averaged_steps": n_avg_steps, "last_step_test_acc": history[-1]["test_acc"]}
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ck = {"kind": "lrmt_taskA", "key": key, "config": dataclasses.asdict(cfg), "data_fp": data_fp,
          "task": task.name, "classes": list(task.classes), "state_dict": sd,
          "test_acc": test_acc, "history": history, "steps": total, **averaged}
    if finish:
        ck["base"] = {"key": base["key"], "path": base_path, "test_acc": base["test_acc"],
                      "history": base.get("history", [])}
    atomic_save(ck, path)
    if os.path.exists(partial):
        os.remove(partial)
    log(f"pretrain-cifar: {task.name} seed {cfg.seed}: {total} steps"
        + (f" of the finish phase from {base_path} ({base['test_acc']:.2f}%)" if finish else "")
        + (f", weights averaged over its last {n_avg_steps} (last step's test accuracy "
           f"{averaged['last_step_test_acc']:.2f}%)" if n_avg_steps else "")
        + f", test accuracy {ck['test_acc']:.2f}% -> {path}")
    return ck


@torch.no_grad()
def _average_in(avg: Optional[Dict[str, Tensor]], n: int, model: nn.Module) -> Dict[str, Tensor]:
    """The running mean ``avg`` of ``n`` weight states with ``model``'s current floating-point
    state added: ``avg + (w - avg) / (n + 1)`` (a copy of the state when ``n`` is 0)."""
    cur = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    if n == 0:
        return {k: v.detach().clone() for k, v in cur.items()}
    for k, v in cur.items():
        avg[k] += (v - avg[k]) / (n + 1)
    return avg


def default_path(cache_dir: str, task: Task, cfg: CifarPretrainConfig) -> str:
    return os.path.join(cache_dir, f"cifar5a-{cache_key(cfg, data_fingerprint(task))}.pt")


def load_state(path: str) -> Dict[str, Tensor]:
    """The parameter state dict of a CIFAR Task A checkpoint (clear error if missing / corrupt)."""
    return load_checkpoint(path, ("state_dict",), "CIFAR Task A checkpoint")["state_dict"]


# --------------------------------------------------------------------------- pool (Exp 3)
def pool_paths(pool_dir: str, n: int, seed0: int = 0) -> List[str]:
    return [os.path.join(pool_dir, f"seed{seed0 + i:04d}.pt") for i in range(n)]


def shard_from_env() -> Tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def pretrain_pool(task: Task, cfg: CifarPretrainConfig, pool_dir: str, n: int, seed0: int = 0, device="cpu",
                  shard: Optional[Tuple[int, int]] = None, progress: bool = True, log=print) -> List[Dict]:
    """Pretrain checkpoints with seeds ``seed0 .. seed0+n-1`` into ``pool_dir`` (skipping complete
    ones, resuming partial ones). Returns [{seed, path, test_acc, status}] for this shard."""
    i_shard, n_shard = shard or shard_from_env()
    paths = pool_paths(pool_dir, n, seed0)
    mine = [(seed0 + i, p) for i, p in enumerate(paths) if i % n_shard == i_shard]
    out = []
    bar = None
    if progress:
        bar = tqdm(total=len(mine), desc=f"checkpoint pool [{i_shard}/{n_shard}]", unit="ckpt",
                   dynamic_ncols=True)
    for s, p in mine:
        c = dataclasses.replace(cfg, seed=s)
        status = "exists" if os.path.exists(p) else ("resumed" if os.path.exists(p + ".partial") else "trained")
        # each checkpoint's own step bar (and its base's) sits under the pool's while it trains
        ck = pretrain_cifar(task, c, p, device, progress=bar is not None, log=(lambda m: None) if bar else log)
        out.append({"seed": s, "path": p, "test_acc": ck["test_acc"], "status": status})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(seed=s, acc=f"{ck['test_acc']:.1f}", status=status)
    if bar is not None:
        bar.close()
    return out


def load_pool(pool_dir: str, n: int, seed0: int = 0) -> List[Dict[str, Tensor]]:
    """The state dicts of a complete pool, in seed order; a clear error naming what is missing."""
    paths = pool_paths(pool_dir, n, seed0)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise CheckpointError(f"checkpoint pool {pool_dir}: {len(missing)} of {n} checkpoints missing "
                              f"(first: {missing[0]}); run `lrmt pretrain-cifar-pool --n {n} --pool-dir {pool_dir}`")
    return [load_state(p) for p in paths]
