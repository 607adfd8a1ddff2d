"""Meta-test protocol (docs/method.md section 4): from the Task A checkpoint, ``steps``
update steps on D_B2 (student batch 64) with each method; every ``every`` steps
(step 0 included) read out the representation; the joint readout at the last step.

One run = one (method, seed). The seed fixes the fresh ``head_b``, the order of
the Task B batches (identical for every method of that seed, so methods are
compared on the same data), the teacher's Task A batches and the readout's
initialisation. Each finished run is cached as JSON under
``cache_dir/<method>-seed<k>-<key>.json``, the key covering everything the run
depends on (configs, data, the Task A checkpoint, the method's options and, for
``ours``, the meta-learner checkpoint's bytes), so a rerun skips finished runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm
from torch import nn

from .baselines import MethodContext, make_learner, spec_key
from .checkpoint import atomic_write_json
from .data.tasks import BatchStream, TwoTasks
from .student import fresh_head_b
from .linear_readout import Readout

Tensor = torch.Tensor


@dataclass
class MetaTestConfig:
    steps: int = 500
    every: int = 50
    batch: int = 64            # student batch (Task B)
    batch_a: int = 64          # teacher's Task A batch
    lr: float = 5e-2           # alpha: the meta-learning rate (MNIST 5e-2)
    fisher_samples: int = 1000

    POSITIVE = ("steps", "every", "batch", "batch_a", "lr", "fisher_samples")

    def checkpoints(self) -> List[int]:
        pts = list(range(0, self.steps + 1, max(1, self.every)))
        if pts[-1] != self.steps:
            pts.append(self.steps)
        return pts


def sha_file(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()[:16]


def run_key(parts: Dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_start(w0: Dict[str, Tensor], xb2: Tensor, yb2: Tensor, cfg: MetaTestConfig, seed: int):
    """(starting weights with this seed's fresh head_b, this seed's Task B batch stream): what
    every method of meta-test seed ``seed`` starts from and sees."""
    return (fresh_head_b(w0, torch.Generator().manual_seed(1000 + seed)),
            BatchStream(xb2, yb2, cfg.batch, torch.Generator().manual_seed(2000 + seed)))


def params_finite(params: Dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in params.values())


def rollout(learner, stream_b: BatchStream, readout: Readout, cfg: MetaTestConfig, seed: int,
            bar=None) -> Dict:
    """Run ``cfg.steps`` updates of ``learner``; readouts at ``cfg.checkpoints()``. A learner
    whose training loss or weights stop being finite is marked: ``nonfinite_step`` = the first
    update step (1-based) after which a loss or a weight was NaN or inf."""
    pts = set(cfg.checkpoints())
    out: Dict[str, List] = {"steps": [], "task_a_readout": [], "task_b_readout": [], "task_a_original": [],
                            "task_b_head": [], "train_loss": []}
    losses = []
    bad = None
    for t in range(cfg.steps + 1):
        if t in pts:
            if bad is None and not params_finite(learner.params):
                bad = t
            r = readout.evaluate(learner.params, seed=seed, joint=(t == cfg.steps))
            out["steps"].append(t)
            for k in ("task_a_readout", "task_b_readout", "task_a_original", "task_b_head"):
                out[k].append(r[k])
            out["train_loss"].append(sum(losses) / len(losses) if losses else None)
            losses = []
            if t == cfg.steps:
                out["joint_readout"] = r["joint_readout"]
                if getattr(learner, "trace", None) is not None:    # "ours" with option trace
                    out["gate_trace"] = learner.trace.to_dict()
        if t == cfg.steps:
            break
        xb, yb = stream_b.next()
        loss = learner.step(xb, yb)
        if loss is not None:        # None: the method has no training loss of its own (teacher)
            if math.isfinite(loss):
                losses.append(loss)
            elif bad is None:
                bad = t + 1
        if bar is not None:
            bar.update(1)
    if bad is not None:
        out["nonfinite_step"] = bad
    return out


def valid_run(run, key: str, cfg: MetaTestConfig) -> Optional[str]:
    """None if ``run`` (a cached meta-test run) has the shape :func:`rollout` writes for ``key``
    and ``cfg``, else what is wrong with it."""
    if not isinstance(run, dict):
        return f"holds {type(run).__name__}, not an object"
    if run.get("key") != key:
        return "was written for other settings"
    if run.get("steps") != cfg.checkpoints():
        return "has other readout steps"
    n = len(run["steps"])
    for k in ("task_a_readout", "task_b_readout", "task_a_original"):
        v = run.get(k)
        if not isinstance(v, list) or len(v) != n or not all(isinstance(x, (int, float)) for x in v):
            return f"has no valid '{k}'"
    if not isinstance(run.get("joint_readout"), (int, float)):
        return "has no valid 'joint_readout'"
    return None


def run_meta_test(model: nn.Module, w0: Dict[str, Tensor], tasks: TwoTasks, readout: Readout,
                  cfg: MetaTestConfig, methods: Dict[str, Dict], seeds: Sequence[int],
                  meta=None, meta_path: Optional[str] = None, impl: Optional[str] = None, device="cpu",
                  cache_dir: Optional[str] = None, key_parts: Optional[Dict] = None, progress: bool = True,
                  log: Callable = print) -> Dict[str, List[Dict]]:
    """Every (method, seed) run; returns {method: [run dict per seed, in ``seeds`` order]}."""
    model = model.to(device)
    w0 = {k: v.detach().to(device) for k, v in w0.items()}
    ctx = MethodContext(model, w0, cfg.lr, tasks.a.train_x.to(device), tasks.a.train_y.to(device), meta=meta,
                        impl=impl, fisher_samples=cfg.fisher_samples)
    xb2, yb2 = tasks.b2
    xb2, yb2 = xb2.to(device), yb2.to(device)
    base = dict(key_parts or {})
    base.update(metatest=dataclasses.asdict(cfg), readout=readout.data.describe(), readout_cfg=dataclasses.asdict(readout.cfg),
                data=tasks.fingerprint())
    meta_sha = sha_file(meta_path) if meta_path and os.path.exists(meta_path) else None
    results: Dict[str, List[Dict]] = {m: [] for m in methods}
    todo = []
    for name, spec in methods.items():
        for s in seeds:
            parts = dict(base, method=spec_key(spec), seed=int(s))
            if spec.get("kind") == "ours":
                if meta is None:
                    raise ValueError("method 'ours' needs a trained meta-learner")
                parts["meta"] = meta_sha
            key = run_key(parts)
            path = os.path.join(cache_dir, f"{name}-seed{s}-{key}.json") if cache_dir else None
            todo.append((name, spec, int(s), path, key))
    bar = None
    if progress:
        bar = tqdm(total=len(todo) * cfg.steps, desc="meta-test", unit="step", dynamic_ncols=True)
    for name, spec, s, path, key in todo:
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    run = json.load(f)
                why = valid_run(run, key, cfg)
            except (OSError, ValueError) as e:
                why = f"does not parse ({type(e).__name__})"
            if why is None:
                results[name].append(run)
                if bar is not None:
                    bar.update(cfg.steps)
                continue
            log(f"meta-test: the cached run {path} {why}; computing it again")
        if bar is not None:
            bar.set_description(f"meta-test {name} seed {s}")
        t0 = time.time()
        start, stream_b = run_start(w0, xb2, yb2, cfg, s)
        stream_a = BatchStream(ctx.task_a_x, ctx.task_a_y, cfg.batch_a, torch.Generator().manual_seed(3000 + s))
        learner = make_learner(spec, ctx, start, next_a=stream_a.next)
        run = rollout(learner, stream_b, readout, cfg, seed=s, bar=bar)
        run.update(method=name, spec=spec, seed=s, key=key, seconds=round(time.time() - t0, 2))
        if path:
            atomic_write_json(path, run, indent=None)
        results[name].append(run)
    if bar is not None:
        bar.close()
    return results
