"""Profile of the whole inner step of meta-training (Algorithm 1, one step of
:func:`lrmt_fast.meta_training.run_episode`) on Exp 1 MNIST: time per stage, FLOPs and bytes of
the step, and its roofline against the GEMM peak and copy bandwidth measured in the same run.

    python -m lrmt_fast.bench.inner_step --data-root data --threads 1,2 [--bptt 5,11] [--out runs/bench]

Stages (``meta_training.STAGES``): ``data`` (drawing the batches), ``teacher`` (the multi-task
teacher's SGD step on x_A u x_B), ``student_grad`` (the student's gradient and activation
capture on x_B), ``op`` (the meta-learner's update of the trunk, the fused or reference op),
``reps`` (both representations of x_A u x_B and the Huber meta-loss), ``backward`` (the
meta-loss backward through the T-BPTT window), ``adam`` (the finiteness check and Adam on
theta); ``other`` is the rest of the step (the loop's Python, the head_b update, bookkeeping).

Every configuration (step implementation x thread count) runs whole episodes of ``--steps``
inner steps (the curriculum threshold disabled, so no episode ends early; windows of ``--bptt``
steps, so the meta-loss backward goes back 1..bptt steps, (bptt + 1) / 2 on average), in
alternating blocks in one process with the GEMM of the peak as one more member of the blocks
(:class:`lrmt_fast.bench.measure.GemmProbe`), until each has ``--min-time`` seconds. The step
time is the median over blocks of (block time / steps); the stage times are means over all steps.

FLOPs and bytes come from the shapes (:func:`step_cost`): the convolutions and linear layers
of every forward and backward of the step (teacher: forward and backward on the union batch;
student: forward and backward on x_B; both representations; the meta-loss backward through the
student's trunk) plus the op's forward and its backward once per step of the window behind it
(:func:`lrmt_fast.bench.cases.layer_cost`). Pointwise work (ReLU, pooling, losses, Adam) is not
counted in the FLOPs (it is in the bytes). The limit of a step is max(FLOPs / GEMM peak, bytes /
copy bandwidth); ``fraction_of_limit`` = limit / measured step time.

With two or more windows (``--bptt 5,11``) the record also estimates the wall time of a whole
meta-training (``--estimate-profile``, default ``paper``: 4000 episodes and its T-BPTT schedule)
for episodes of ``--episode-steps`` inner steps (default 35, about what the union-batch teacher's
curriculum gives; an assumption, stated in the record): the step time is a line in the number of
op backwards per step through the measured windows (:func:`estimate_metatraining`).

Without ``--data-root`` the images are random MNIST-shaped ones and Task A the seeded untrained
LeNet (:func:`build_experiment`): the shapes and hence the step time are the real ones.

Writes ``inner_step_<device>.json`` and ``inner_step_<device>.txt`` (the table) under ``--out``
(default ``runs/bench``), each once at the end, atomically; ``--update-records`` also writes the
committed copy under ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import suite
from ..cli import positive_float, positive_int
from ..config import config_path, load_spec
from ..meta_training import FreshHeadStream, _episode_gen, build_meta_learner, make_teacher, meta_optimizer, \
    run_episode, schedule
from ..models import LeNet
from ..pretrain import load_or_pretrain
from ..student import param_dict
from .cases import layer_cost
from .measure import DEFAULT_OUT, GemmProbe, copy_bandwidth, cpu_model, device_name, gemm_peak, git_commit, \
    load_average, now, write_records

# the environment that decides how threads behave (recorded with the results)
ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "LRMT_IMPL", "LRMT_CPU_BLAS")
STAGE_ORDER = ("data", "teacher", "student_grad", "op", "reps", "backward", "adam", "other")


class StageTimer:
    """``stage(name)`` for :func:`run_episode`: accumulates wall seconds per stage name."""

    def __init__(self, device: str = "cpu"):
        self.sums: Dict[str, float] = {}
        self._cuda = str(device).startswith("cuda")

    def __call__(self, name: str):
        return _Stage(self, name)

    def reset(self):
        self.sums.clear()


class _Stage:
    __slots__ = ("timer", "name", "t0")

    def __init__(self, timer: StageTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        if self.timer._cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.timer._cuda:
            torch.cuda.synchronize()
        s = self.timer.sums
        s[self.name] = s.get(self.name, 0.0) + time.perf_counter() - self.t0
        return False


# --------------------------------------------------------------------------------------
# cost model of the whole step
# --------------------------------------------------------------------------------------
def layer_shapes(model: nn.Module, x1: torch.Tensor) -> List[Dict]:
    """Per-sample MACs and activation sizes of every Conv2d / Linear of ``model`` (one sample,
    through ``features`` and both heads), in forward order."""
    out: List[Dict] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            def hook(m, inp, o, name=name):
                w = m.weight
                if isinstance(m, nn.Conv2d):
                    macs = o[0].numel() * (w.shape[1] * w.shape[2] * w.shape[3])
                else:
                    macs = w.shape[0] * w.shape[1]
                out.append({"name": name, "macs": int(macs), "in": int(inp[0][0].numel()), "out": int(o[0].numel()),
                            "weights": int(w.numel() + (m.bias.numel() if m.bias is not None else 0))})
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            z = model.features(x1)
            model.head_a(z)
            model.head_b(z)
    finally:
        for h in hooks:
            h.remove()
    return out


def step_cost(model: nn.Module, meta, batch_a: int, batch_b: int, bptt: int, in_shape=(1, 1, 28, 28),
              elt: int = 4) -> Dict[str, float]:
    """FLOPs and bytes of one inner step (see the module docstring), per stage and in total.

    Passes over the trunk (per sample: F = forward MACs, W = weight-gradient MACs = F, I =
    input-gradient MACs = F minus the first layer's, which has no input gradient): teacher
    (x_A u x_B): F + W + I with one head; student gradient (x_B): the same; representations:
    2 F on x_A u x_B without heads; meta-loss backward: W + I on x_A u x_B without heads.
    Bytes: each pass reads its layers' inputs and writes their outputs once (backward: twice
    that: the saved input and the incoming gradient read, two gradients written), reads the
    weights once; plus the op's compulsory bytes and Adam's (theta, its gradient and two moments
    read, three written)."""

    layers = layer_shapes(model, torch.zeros(in_shape))
    heads = [l for l in layers if l["name"].startswith("head_")]
    trunk = [l for l in layers if not l["name"].startswith("head_")]
    head = heads[0] if heads else {"macs": 0, "in": 0, "out": 0, "weights": 0}
    f_trunk = sum(l["macs"] for l in trunk)
    first = trunk[0]["macs"] if trunk else 0
    act_trunk = sum(l["in"] + l["out"] for l in trunk)
    w_trunk = sum(l["weights"] for l in trunk)
    nt, nb = batch_a + batch_b, batch_b

    def fwd(n, with_head):
        macs = n * (f_trunk + (head["macs"] if with_head else 0))
        byts = elt * (n * (act_trunk + ((head["in"] + head["out"]) if with_head else 0))
                      + w_trunk + (head["weights"] if with_head else 0))
        return 2.0 * macs, float(byts)

    def bwd(n, with_head):
        f = f_trunk + (head["macs"] if with_head else 0)
        macs = n * (f + (f - first))
        byts = 2 * elt * (n * (act_trunk + ((head["in"] + head["out"]) if with_head else 0))
                          + w_trunk + (head["weights"] if with_head else 0))
        return 2.0 * macs, float(byts)

    op_f = op_b = op_by_f = op_by_b = 0.0
    for lay in meta.layers:
        c = layer_cost(lay, meta.num_cells, elt)
        op_f += c["flops_update"]
        op_b += c["flops_train"] - c["flops_update"]
        op_by_f += c["bytes_update"]
        op_by_b += c["bytes_train"] - c["bytes_update"]
    window = (bptt + 1) / 2.0          # op backwards per step, on average over a window
    n_theta = sum(p.numel() for p in meta.parameters())
    stages = {}
    tf, tb = fwd(nt, True), bwd(nt, True)
    stages["teacher"] = (tf[0] + tb[0], tf[1] + tb[1])
    sf, sb = fwd(nb, True), bwd(nb, True)
    stages["student_grad"] = (sf[0] + sb[0], sf[1] + sb[1])
    stages["op"] = (op_f, op_by_f)
    rf = fwd(nt, False)
    stages["reps"] = (2 * rf[0], 2 * rf[1])
    rb = bwd(nt, False)
    stages["backward"] = (rb[0] + window * op_b, rb[1] + window * op_by_b)
    stages["adam"] = (12.0 * n_theta, float(elt * 7 * n_theta))
    return {"flops_per_step": sum(v[0] for v in stages.values()),
            "bytes_per_step": sum(v[1] for v in stages.values()),
            "stage_flops": {k: v[0] for k, v in stages.items()},
            "stage_bytes": {k: v[1] for k, v in stages.items()},
            "op_backwards_per_step": window, "theta_numel": n_theta,
            "trunk_macs_per_sample": f_trunk}


# --------------------------------------------------------------------------------------
# the timed configurations
# --------------------------------------------------------------------------------------
class StepRunner:
    """Runs episodes of ``steps`` inner steps of one step implementation at one thread count;
    keeps its own meta-learner and Adam state (all start from the same seed)."""

    def __init__(self, model, stream, mcfg, impl: str, threads: int, steps: int, bptt: int, device: str = "cpu",
                 k_eps: int = 1, op_impl: Optional[str] = None, name: Optional[str] = None):
        self.model, self.stream, self.impl, self.threads = model, stream, impl, threads
        self.steps, self.bptt, self.k_eps, self.op_impl = steps, bptt, k_eps, op_impl
        self.cfg = dataclasses.replace(mcfg, max_steps=steps, thresh_start=float("inf"), thresh_max=float("inf"),
                                       device=device, episodes_per_step=k_eps, impl=op_impl)
        torch.manual_seed(self.cfg.seed)
        self.meta = build_meta_learner(model, self.cfg.hidden, self.cfg.hidden_gn).to(device)
        self.opt = meta_optimizer(self.meta, self.cfg)
        self.teacher = make_teacher(self.cfg.teacher, model, self.meta)
        self.timer = StageTimer(device)
        self.episode = 0
        self.block_s: List[float] = []       # wall seconds per step, one per block
        self.steps_done = 0
        self.wall = 0.0
        self.name = name or f"{impl}/{threads}t"
        self.device = device

    def run_block(self, timed: bool = True, steps: Optional[int] = None):
        """One episode (K in lockstep) of ``steps`` (default: the runner's) inner steps; with
        ``timed`` its wall time and stage times are added to this runner's."""
        torch.set_num_threads(self.threads)
        if steps is not None and steps != self.cfg.max_steps:
            saved, self.cfg = self.cfg, dataclasses.replace(self.cfg, max_steps=steps)
            try:
                return self.run_block(timed, None)
            finally:
                self.cfg = saved
        eps = [self.stream.new_episode(self.episode, _episode_gen(self.cfg, j, self.episode))
               for j in range(self.k_eps)]
        self.episode += 1
        kw = step_impl_kwargs(self.impl)
        t0 = time.perf_counter()
        rec = run_episode(self.model, self.meta, self.opt, eps, self.cfg, float("inf"), self.bptt,
                          teacher_rule=self.teacher, stage=self.timer if timed else None, **kw)
        if not timed:
            return rec
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n = rec["steps"]
        self.block_s.append(dt / max(n, 1))
        self.steps_done += n
        self.wall += dt
        return dt


STEP_IMPLS = {
    # the networks evaluated by their module code (functional_call, hooks, ATen's pooling): the
    # inner step as it was before the fast evaluator, kept as the reference
    "module": {"fast": False},
    # the model's fast evaluator (lrmt_fast.student.functional; LeNet: LeNetFunctional)
    "fast": {"fast": True},
}


def step_impls() -> Sequence[str]:
    """The inner-step implementations (``--impls``): ``module`` (the reference) and ``fast``."""
    return tuple(STEP_IMPLS)


def step_impl_kwargs(impl: str) -> Dict:
    if impl not in STEP_IMPLS:
        raise ValueError(f"unknown step implementation {impl!r}; expected one of {list(STEP_IMPLS)}")
    return dict(STEP_IMPLS[impl])


def time_interleaved(runners: List[StepRunner], probes: Dict[int, object], min_time: float, warmup: int = 1,
                     log=print, warmup_steps: Optional[int] = None) -> Dict[int, List[float]]:
    """Alternate one block (episode) of each runner, and ~0.25 s of GEMM probe calls at each
    thread count, until every runner has ``min_time`` s (and at least 3 rounds). ``warmup``
    untimed blocks of ``warmup_steps`` steps (default: the runner's) first. Returns the probe
    times per thread count."""
    for r in runners:
        for _ in range(warmup):
            r.run_block(timed=False, steps=warmup_steps)
        r.timer.reset()
        r.block_s.clear()
        r.steps_done, r.wall = 0, 0.0
    ptimes: Dict[int, List[float]] = {t: [] for t in probes}
    rounds = 0
    while any(r.wall < min_time for r in runners) or rounds < 3:
        rounds += 1
        for r in runners:
            r.run_block()
        for t, probe in probes.items():
            torch.set_num_threads(t)
            spent = 0.0
            while spent < 0.25 or len(ptimes[t]) < 3 * rounds:
                t0 = time.perf_counter()
                probe.fn()
                probe.sync()
                d = time.perf_counter() - t0
                ptimes[t].append(d)
                spent += d
        log(f"  round {rounds}: " + ", ".join(f"{r.name} {1e3 * r.block_s[-1]:.1f} ms/step" for r in runners))
    return ptimes


def summarize(r: StepRunner, cost: Dict, limits: Dict[str, float], peak_same: float) -> Dict:
    times = sorted(r.block_s)
    med = times[len(times) // 2]
    steps = max(r.steps_done, 1)
    stage_ms = {k: 1e3 * v / steps for k, v in r.timer.sums.items()}
    mean_ms = 1e3 * r.wall / steps
    stage_ms["other"] = mean_ms - sum(stage_ms.values())
    stage_ms = {k: stage_ms.get(k, 0.0) for k in STAGE_ORDER}

    def frac(t_s, peak):
        return max(cost["flops_per_step"] / peak, cost["bytes_per_step"] / limits["mem_bw_bytes_per_s"]) / t_s

    return {
        "impl": r.impl, "threads": r.threads, "episodes_per_step": r.k_eps,
        "ms_per_step_median": 1e3 * med, "ms_per_step_mean": mean_ms, "ms_per_step_min": 1e3 * times[0],
        "blocks": len(times), "steps_timed": r.steps_done, "steps_per_block": r.steps, "bptt": r.bptt,
        "stage_ms": stage_ms, "stage_pct": {k: 100.0 * v / mean_ms for k, v in stage_ms.items()},
        "inner_steps_per_s": r.k_eps / med,
        "gemm_peak_flops": limits[f"gemm_peak_flops_{r.threads}t"],
        "gemm_peak_flops_interleaved": peak_same,
        "mem_bw_bytes_per_s": limits["mem_bw_bytes_per_s"],
        "achieved_flops": cost["flops_per_step"] / med,
        "fraction_of_limit": frac(med, limits[f"gemm_peak_flops_{r.threads}t"]),
        "fraction_of_limit_interleaved": frac(med, peak_same),
        "flops_per_step": cost["flops_per_step"], "bytes_per_step": cost["bytes_per_step"],
        "stage_fraction_of_limit": {k: (cost["stage_flops"][k] / peak_same) / (stage_ms[k] / 1e3)
                                    for k in cost["stage_flops"] if stage_ms.get(k)},
    }


def _label(r: Dict, with_bptt: bool) -> str:
    return f"{r['impl']}/{r['threads']}t" + (f"/s{r['bptt']}" if with_bptt else "")


def avg_op_backwards(steps: int, bptt: int) -> float:
    """Op backwards per inner step, averaged over an episode of ``steps`` steps with T-BPTT
    windows of ``bptt``: step t of a window backpropagates through t op calls."""
    return sum((t % bptt) + 1 for t in range(steps)) / steps


def estimate_metatraining(recs: List[Dict], profile: str, episode_steps: int) -> Dict:
    """Wall time of the exp1-mnist ``profile``'s meta-training from the measured step times: per
    (impl, threads), a line t(step) = t0 + t_bwd x (op backwards per step) through the medians at
    the measured windows, then summed over the profile's episodes (its T-BPTT schedule), each of
    ``episode_steps`` steps (its curriculum may end episodes earlier or later: the length is an
    assumption, stated in the record)."""

    exp = suite.get("exp1-mnist")
    cfg = load_spec(config_path(exp.config), profile, exp.pretrain_cls).metatrain
    out = {"profile": profile, "episodes": cfg.episodes, "episode_steps": episode_steps,
           "inner_steps": cfg.episodes * episode_steps, "by_config": []}
    groups: Dict = {}
    for r in recs:
        groups.setdefault((r["impl"], r["threads"]), []).append(r)
    for (impl, threads), rs in groups.items():
        pts = sorted((avg_op_backwards(r["steps_per_block"], r["bptt"]), r["ms_per_step_median"] / 1e3) for r in rs)
        if len(pts) < 2:
            continue
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
        total = 0.0
        for ep in range(cfg.episodes):
            _, b = schedule(cfg, ep)
            total += episode_steps * (y0 + slope * (avg_op_backwards(episode_steps, b) - x0))
        out["by_config"].append({"impl": impl, "threads": threads, "s_per_op_backward": slope,
                                 "s_per_step_at": {str(r["bptt"]): r["ms_per_step_median"] / 1e3 for r in rs},
                                 "estimate_s": total, "estimate_h": total / 3600,
                                 "mean_s_per_step": total / out["inner_steps"]})
    return out


def estimate_text(est: Dict) -> str:
    lines = [f"estimated meta-training of the {est['profile']} profile: {est['episodes']} episodes x "
             f"{est['episode_steps']} inner steps (assumed) = {est['inner_steps']} steps, its T-BPTT schedule"]
    for e in est["by_config"]:
        lines.append(f"  {e['impl']}/{e['threads']}t: {e['mean_s_per_step'] * 1e3:.1f} ms/step on average, "
                     f"{e['estimate_h']:.2f} h ({1e3 * e['s_per_op_backward']:.1f} ms per op backward)")
    return "\n".join(lines)


def table(recs: List[Dict], cost: Dict) -> str:
    """Stages x configurations; the GFLOP / MB columns are those of ``cost`` (the first window)."""
    lines = []
    many = len({r["bptt"] for r in recs}) > 1
    head = f"{'stage':14s}" + "".join(
        f"{_label(r, many):>22s}"
        for r in recs) + f"{'GFLOP':>8s}{'MB':>8s}"
    lines += [head, "-" * len(head)]
    for k in STAGE_ORDER:
        row = f"{k:14s}" + "".join(f"{r['stage_ms'][k]:9.2f} ms {r['stage_pct'][k]:5.1f}%    " for r in recs)
        f = cost["stage_flops"].get(k)
        b = cost["stage_bytes"].get(k)
        row += (f"{f / 1e9:8.3f}{b / 1e6:8.1f}" if f is not None else "")
        lines.append(row)
    lines.append(f"{'step (mean)':14s}" + "".join(f"{r['ms_per_step_mean']:9.2f} ms {'':11s}" for r in recs)
                 + f"{cost['flops_per_step'] / 1e9:8.3f}{cost['bytes_per_step'] / 1e6:8.1f}")
    lines.append(f"{'step (median)':14s}" + "".join(f"{r['ms_per_step_median']:9.2f} ms {'':11s}" for r in recs))
    lines.append(f"{'GFLOP/step':14s}" + "".join(f"{r['flops_per_step'] / 1e9:9.3f}    {'':11s}" for r in recs))
    lines.append(f"{'GFLOP/s':14s}" + "".join(f"{r['achieved_flops'] / 1e9:9.1f}    {'':11s}" for r in recs))
    lines.append(f"{'frac. limit':14s}" + "".join(
        f"{100 * r['fraction_of_limit']:8.1f}% / {100 * r['fraction_of_limit_interleaved']:4.1f}%{'':6s}"
        for r in recs))
    lines.append("frac. limit = max(FLOPs / GEMM peak, bytes / copy bandwidth) / median step time; first against "
                 "the best-of-5 GEMM at the start, then against the GEMM timed (median) in the same alternating "
                 "blocks, at the configuration's thread count")
    return "\n".join(lines)


def synthetic_mnist(n: int, seed: int):
    """MNIST-shaped images in [0, 1] with a blank border and blank pixels (as MNIST has), and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x[:, :, :4], x[:, :, -4:], x[..., :4], x[..., -4:] = 0, 0, 0, 0
    x = torch.where(x < 0.5, torch.zeros_like(x), x)
    return x, torch.randint(0, 10, (n,), generator=g)


def build_experiment(data_root: Optional[str], cache: str, profile: str = "quick", device: str = "cpu", log=print):
    """(spec, model, stream, data) of Exp 1 MNIST as its meta-training sees them: the real tasks and
    Task A checkpoint (``cache``; trained there first if absent) with ``data_root``, else random
    MNIST-shaped images and the seeded untrained LeNet (the same shapes, hence the same time per
    inner step; the curriculum is disabled for the timing anyway)."""

    exp = suite.get("exp1-mnist")
    spec = load_spec(config_path(exp.config), profile, exp.pretrain_cls)
    mt = spec.metatrain
    if data_root:
        tasks = exp.load_tasks(spec, suite.Sources(data_root=data_root, download=False))
        model, _ = load_or_pretrain(cache, tasks.a, tasks.b.num_classes, spec.pretrain, device, False, log)
        (xa, ya), (xb1, yb1) = (tasks.a.train_x, tasks.a.train_y), tasks.b1
        data = f"MNIST / FashionMNIST from {data_root}, Task A checkpoint from {cache}"
    else:
        torch.manual_seed(spec.pretrain.seed)
        model = LeNet().to(device)
        (xa, ya), (xb1, yb1) = synthetic_mnist(4096, 1), synthetic_mnist(4096, 2)
        data = "synthetic MNIST-shaped images, untrained LeNet (no --data-root)"
    stream = FreshHeadStream(param_dict(model), xa, ya, xb1, yb1, mt.batch_a, mt.batch_b, device)
    return spec, model, stream, data


def _int_list(text: str) -> List[int]:
    try:
        v = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder with MNIST and FashionMNIST (torchvision layout); default: synthetic images")
    p.add_argument("--cache", default=os.path.join("runs", "e2e_cache"),
                   help="folder of the Task A checkpoint (trained there first if absent)")
    p.add_argument("--profile", default="quick", help="the exp1-mnist profile whose meta-training settings are used")
    p.add_argument("--threads", type=_int_list, default=[1], help="thread counts, e.g. 1,2 (default 1)")
    p.add_argument("--impls", default=",".join(step_impls()), help="step implementations (default: all)")
    p.add_argument("--bptt", type=_int_list, default=[5],
                   help="T-BPTT windows, e.g. 5,11 (default 5, the profiles' start); with two or more the record "
                        "estimates the meta-training time of --estimate-profile")
    p.add_argument("--estimate-profile", default="paper",
                   help="the exp1-mnist profile whose meta-training time is estimated (default paper)")
    p.add_argument("--episode-steps", type=positive_int, default=35,
                   help="inner steps per episode assumed by the estimate (default 35: the union-batch teacher)")
    p.add_argument("--steps", type=positive_int, default=None, help="inner steps per block (default 2 windows)")
    p.add_argument("--min-time", type=positive_float, default=20.0, help="seconds of timed steps per configuration")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default runs/bench)")
    p.add_argument("--update-records", action="store_true",
                   help="also write the committed copy under benchmarks/results/")


def run(a, log=print) -> Dict:
    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    for i in impls:
        step_impl_kwargs(i)
    spec, model, stream, data = build_experiment(a.data_root, a.cache, a.profile, a.device, log)
    mt = spec.metatrain
    bptts = list(a.bptt)
    limits: Dict[str, float] = {}
    for t in a.threads:
        torch.set_num_threads(t)
        limits[f"gemm_peak_flops_{t}t"] = gemm_peak(a.device)
    limits["mem_bw_bytes_per_s"] = copy_bandwidth(a.device)
    log(f"[{a.device}] fp32 GEMM peak " + ", ".join(f"{limits[f'gemm_peak_flops_{t}t'] / 1e9:.1f} GFLOP/s at {t}t"
                                                     for t in a.threads)
        + f"; copy bandwidth {limits['mem_bw_bytes_per_s'] / 1e9:.1f} GB/s; load {load_average()}")
    runners = [StepRunner(model, stream, mt, impl, t, a.steps or 2 * b, b, a.device,
                          name=f"{impl}/{t}t" + (f"/s{b}" if len(bptts) > 1 else ""))
               for b in bptts for t in a.threads for impl in impls]
    probes = {t: GemmProbe(a.device) for t in a.threads}
    load_start = load_average()
    ptimes = time_interleaved(runners, probes, a.min_time, log=log)
    costs = {b: step_cost(model, runners[0].meta, mt.batch_a, mt.batch_b, b) for b in bptts}
    recs = [summarize(r, costs[r.bptt], limits, probes[r.threads].flops_per_s(ptimes[r.threads])) for r in runners]
    base = {(r["threads"], r["bptt"]): r for r in recs if r["impl"] == impls[0]}
    one = {(r["impl"], r["bptt"]): r for r in recs if r["threads"] == min(a.threads)}
    for r in recs:
        r["speedup_vs_" + impls[0]] = base[(r["threads"], r["bptt"])]["ms_per_step_median"] / r["ms_per_step_median"]
        r["throughput_vs_min_threads"] = one[(r["impl"], r["bptt"])]["ms_per_step_median"] / r["ms_per_step_median"]
    estimate = estimate_metatraining(recs, a.estimate_profile, a.episode_steps) if len(bptts) > 1 else None
    out = {"case": "exp1_mnist_inner_step", "profile": a.profile, "data": data, "device": device_name(a.device),
           "cpu_model": cpu_model() if a.device == "cpu" else None, "torch_version": torch.__version__,
           "commit": git_commit(), "date": now(), "load_avg_start": load_start, "load_avg_end": load_average(),
           "env": {k: os.environ.get(k) for k in ENV_KEYS},
           "batch_a": mt.batch_a, "batch_b": mt.batch_b, "bptt": bptts,
           "teacher": dataclasses.asdict(mt.teacher), "limits": limits, "cost": {str(b): c for b, c in costs.items()},
           "records": recs, "metatraining_estimate": estimate}
    txt = table(recs, costs[bptts[0]])
    if estimate:
        txt += "\n" + estimate_text(estimate)
    write_records(a.out, a.update_records, "inner_step", a.device, out, txt, log)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lrmt_fast.bench.inner_step", description=__doc__.splitlines()[0])
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
