"""The experiment pipeline, one for every experiment of the paper (and a user's own):

    Task A (pretrained or loaded)  ->  meta-training (Algorithm 1; checkpointed, --resume)
    ->  meta-test of every method x seed (cached per run)  ->  results.json, table.md, figures

An experiment is a validated :class:`lrmt_fast.config.ExperimentSpec` plus an adapter that knows
its data and Task A network (:mod:`lrmt_fast.suite`): ``prepare(spec, sources, opts)`` returns a
:class:`Prepared` (the Task A model and weights, the meta-training episode stream, and the
meta-test's task pairs). Everything after that is here, shared.

Output folder (``opts.out``)::

    results.json  table.md  curves.png  config.json   the results (docs/results.md)
    fig6_curriculum.png  metatrain_history.json        Figure 6 and the per-episode history
    fig7_delta_hist.png  delta_hist.json               Figure 7: the gate during meta-test
    cache/meta-<key>/meta_ckpt.pt                      meta-training checkpoint (resumable)
    cache/runs/<method>-seed<k>-<key>.json             one meta-test run, reused by reruns
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm
from torch import nn

from . import results as R
from .baselines import OURS_UPDATE_OPTIONS
from .checkpoint import atomic_write_json, load_checkpoint
from .config import ExperimentSpec
from .data.tasks import TwoTasks
from .distributed import DistSync, broadcast_object
from .meta_test import run_meta_test, sha_file
from .figures import DeltaHistogram, figure6, figure7, record_deltas
from .meta_training import CKPT_NAME, load_meta, metatrain, resume_message
from .ops import resolve_impl
from .linear_readout import Readout, ReadoutData

FIG6 = "fig6_curriculum.png"
FIG7 = "fig7_delta_hist.png"
Tensor = torch.Tensor


@dataclass
class RunOptions:
    """How to run (not what): where, on which device, with which op path, resumed or not."""

    out: str
    seeds: List[int]
    device: str = "cpu"
    impl: Optional[str] = None
    resume: bool = False
    progress: bool = True
    log: Callable[[str], None] = print
    sync: object = None                  # lrmt_fast.distributed.DistSync under torchrun
    precision: Dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return getattr(self.sync, "rank", 0)

    @property
    def world_size(self) -> int:
        return getattr(self.sync, "world_size", 1)


@dataclass
class Prepared:
    """What an experiment's adapter hands the pipeline."""

    model: nn.Module
    w0: Dict[str, Tensor]                # the meta-test's start: the Task A checkpoint
    task_a: Dict                         # key, test_acc, path (and Exp 3's pool)
    stream: object                       # meta-training episodes (lrmt_fast.meta_training.TaskStream)
    meta_key: Callable[[object], Dict]   # the meta-learner's cache key parts, given the MetaTrainConfig
    metatest_tasks: Callable[[List[int]], List[Tuple[TwoTasks, List[int]]]]
    title: str = ""
    info: Dict = field(default_factory=dict)    # extra entries for config.json / results.json


def key_of(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- meta-training
def metatrain_with_budget(model, stream, mcfg, out_dir: str, resume: bool, budget, progress: bool = True,
                          log: Callable = print, sync=None, on_step=None, on_episode=None) -> List[Dict]:
    """:func:`lrmt_fast.meta_training.metatrain` for up to ``mcfg.episodes`` episodes, stopped early
    at the first chunk boundary where the meta-training steps so far reach ``budget.max_total_steps``
    (:class:`lrmt_fast.config.BudgetConfig`, or a dict of its fields).

    The run is cut into chunks of ``budget.chunk_episodes`` episodes, each continuing from the
    checkpoint of the previous one (metatrain's exact resume), so the cap is deterministic: it
    depends on the episodes' lengths, never on the machine's speed. Without a cap this is one
    plain call. Returns the history. Under torchrun (``sync``) every rank runs in lockstep:
    rank 0 reads and writes the checkpoint and the others receive its state.
    """
    if isinstance(budget, dict):
        cap, chunk = budget.get("max_total_steps"), int(budget.get("chunk_episodes", 10))
    else:
        cap, chunk = budget.max_total_steps, budget.chunk_episodes
    main = getattr(sync, "rank", 0) == 0
    out = out_dir if main else None           # other ranks receive rank 0's state (sync_start)
    if not cap:
        _, hist = metatrain(model, stream, mcfg, out_dir=out, resume=resume and main, progress=progress and main,
                            sync=sync, log=log, on_step=on_step, on_episode=on_episode)
        return hist
    ckpt = os.path.join(out_dir, CKPT_NAME)
    hist: List[Dict] = []
    if main and os.path.exists(ckpt):
        if resume:       # the chunks below resume silently, each from the one before
            ck = load_checkpoint(ckpt, ("history", "next_episode"), "meta-training checkpoint")
            hist = list(ck["history"])
            log(resume_message(ckpt, int(ck["next_episode"]), mcfg.episodes))
        else:
            os.remove(ckpt)
    hist = broadcast_object(sync, hist)
    bar, lines = None, progress and main and isinstance(sync, DistSync)
    if progress and main and not lines:
        bar = tqdm(total=int(cap), initial=min(int(cap), sum(h["steps"] for h in hist)), desc="meta-train",
                   unit="step", dynamic_ncols=True)
    while len(hist) < mcfg.episodes and sum(h["steps"] for h in hist) < cap:
        sub = dataclasses.replace(mcfg, episodes=min(mcfg.episodes, len(hist) + chunk), checkpoint_every=chunk)
        before = sum(h["steps"] for h in hist)
        _, hist = metatrain(model, stream, sub, out_dir=out, resume=main, progress=False, sync=sync,
                            on_step=on_step, on_episode=on_episode, log=_quiet_resume(log))
        last = hist[-chunk:]
        ep_steps = sum(h["steps"] for h in last) / max(1, len(last))
        if bar is not None:
            bar.update(min(int(cap), sum(h["steps"] for h in hist)) - min(int(cap), before))
            bar.set_postfix(ep=len(hist), ep_steps=f"{ep_steps:.1f}",
                            loss=f"{sum(h['mean_loss'] for h in last) / max(1, len(last)):.2f}",
                            thr=hist[-1]["threshold"], s=hist[-1]["bptt"])
        if lines:
            log(f"meta-train: {len(hist)} episodes, {sum(h['steps'] for h in hist)}/{cap} steps; last {len(last)}: "
                f"{ep_steps:.1f} steps/episode, threshold {hist[-1]['threshold']}, T-BPTT {hist[-1]['bptt']}")
    if bar is not None:
        bar.close()
    if main:
        log(f"meta-train: {len(hist)} episodes, {sum(h['steps'] for h in hist)} steps")
    return hist


def _quiet_resume(log: Callable) -> Callable:
    """``log`` without the resume line each chunk's metatrain call would repeat."""
    return lambda msg: None if msg.startswith("meta-train: resuming from") else log(msg)


def needs_meta(methods: Dict[str, Dict]) -> bool:
    return any(s.get("kind") == "ours" for s in methods.values())


def metatrain_stage(spec: ExperimentSpec, prep: Prepared, opts: RunOptions):
    """Meta-train (or reuse the finished meta-learner of the same key); returns (meta on rank 0
    else None, meta checkpoint path, history). Nothing to do without an "ours" method."""
    if not needs_meta(spec.methods):
        return None, None, []
    mcfg = dataclasses.replace(spec.metatrain, impl=opts.impl, device=opts.device)
    mkey = key_of(prep.meta_key(mcfg))
    mdir = os.path.join(opts.out, "cache", f"meta-{mkey}")
    meta_path = os.path.join(mdir, CKPT_NAME)
    done_marker = os.path.join(mdir, "DONE")
    main = opts.rank == 0
    done = broadcast_object(opts.sync, main and os.path.exists(done_marker) and os.path.exists(meta_path))
    if done:
        opts.log(f"meta-train: reusing the finished meta-learner {meta_path}")
    else:
        if main:
            os.makedirs(mdir, exist_ok=True)
            if os.path.exists(meta_path) and not opts.resume:
                opts.log(f"meta-train: a checkpoint exists in {mdir} but --resume was not given: starting over")
        metatrain_with_budget(prep.model, prep.stream, mcfg, mdir, opts.resume, spec.metatrain_budget,
                              opts.progress, opts.log, sync=opts.sync)
        if main:
            with open(done_marker, "w") as f:
                f.write("finished\n")
    if not main:
        return None, meta_path, []
    meta = load_meta(meta_path, device=opts.device)
    history = list(load_checkpoint(meta_path, ("history",), "meta-training checkpoint")["history"])
    return meta, meta_path, history


# --------------------------------------------------------------------------- meta-test
def figure7_methods(methods: Dict[str, Dict]) -> Dict[str, Dict]:
    """The methods whose meta-test updates Figure 7 pools: those of kind "ours" that run the
    meta-learner as trained (options that change its update, ``reset_every`` and ``min_gate``,
    leave a method out; ``trace`` only reads), or every "ours" if all have such options."""
    ours = {m: s for m, s in methods.items() if s.get("kind") == "ours"}
    plain = {m: s for m, s in ours.items() if not any(s.get(k) is not None for k in OURS_UPDATE_OPTIONS)}
    return plain or ours


def metatest_stage(spec: ExperimentSpec, prep: Prepared, tasks_list: Sequence[Tuple[TwoTasks, List[int]]],
                   meta, meta_path: Optional[str], opts: RunOptions):
    """Every method x seed of every (task pair, seeds) (:func:`lrmt_fast.meta_test.run_meta_test`), runs
    concatenated per method; returns (runs, DeltaHistogram of the Figure 7 methods' updates or None,
    readout description)."""
    methods, mtest = spec.methods, spec.metatest
    cache_dir = os.path.join(opts.out, "cache", "runs")
    delta_path = os.path.join(opts.out, "cache", "delta_hist.json")
    key_parts = {"taskA": prep.task_a["key"]}
    runs: Dict[str, List[Dict]] = {m: [] for m in methods}
    ours = figure7_methods(methods)
    dkey = key_of({**key_parts, "meta": sha_file(meta_path) if meta_path and os.path.exists(meta_path) else None,
                   "metatest": dataclasses.asdict(mtest), "seeds": [list(s) for _, s in tasks_list],
                   "data": [t.fingerprint() for t, _ in tasks_list], "ours": ours})
    hist, hist_draws = None, 0          # hist_draws: how many task pairs the saved histogram covers
    if meta is not None and ours:
        hist = DeltaHistogram.for_meta(meta)
        if os.path.exists(delta_path):
            try:
                with open(delta_path) as f:
                    saved = json.load(f)
                if saved.get("key") == dkey:
                    hist = DeltaHistogram.from_dict(saved)
                    hist_draws = int(saved.get("draws", len(tasks_list)))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                opts.log(f"meta-test: {delta_path} is damaged; recording the Figure 7 histogram again")
    describe = None

    def run(todo, tasks, readout, seeds, cache, show):
        return run_meta_test(prep.model, prep.w0, tasks, readout, mtest, todo, seeds, meta=meta, meta_path=meta_path,
                             impl=opts.impl, device=opts.device, cache_dir=cache, key_parts=key_parts, progress=show,
                             log=opts.log)

    for i, (tasks, seeds) in enumerate(tasks_list):
        readout = Readout(prep.model, ReadoutData(tasks, spec.readout, opts.device))
        describe = readout.data.describe()
        r: Dict[str, List[Dict]] = {}
        if hist is not None and i >= hist_draws:
            # first the Figure 7 methods, every update of every run of them recorded: a run taken
            # from the run cache records nothing, so unless all were computed here they are rolled
            # out again, uncached; the histogram is saved (with the task pairs it covers) before the
            # other methods run, so an interrupted meta-test does not roll them out again
            want = sum(l.cout * l.p for l in meta.layers) * mtest.steps * len(ours) * len(seeds)
            rec = DeltaHistogram(hist.lo, hist.hi, hist.bins)
            with record_deltas(rec):
                r.update(run(ours, tasks, readout, seeds, cache_dir, opts.progress))
            if rec.groups.get("all", {}).get("n") != want:
                rec = DeltaHistogram(hist.lo, hist.hi, hist.bins)
                with record_deltas(rec):
                    run(ours, tasks, readout, seeds, None, False)
            hist.merge(rec)
            atomic_write_json(delta_path, {**hist.to_dict(), "key": dkey, "draws": i + 1})
        rest = {m: s for m, s in methods.items() if m not in r}
        if rest:
            r.update(run(rest, tasks, readout, seeds, cache_dir, opts.progress))
        for m in methods:
            runs[m] += r[m]
    return runs, hist, describe


# --------------------------------------------------------------------------- results
def nonfinite_runs(runs: Dict[str, List[Dict]]) -> Dict[str, List[int]]:
    """{method: [seeds whose run went non-finite]} (empty when all are finite)."""
    out = {}
    for m, rs in runs.items():
        bad = [r.get("seed") for r in rs if r.get("nonfinite_step") is not None
               or not all(math.isfinite(v) for v in [r.get("joint_readout", float("nan"))])]
        if bad:
            out[m] = bad
    return out


def finish(spec: ExperimentSpec, runs, seeds, out_dir: str, history: List[Dict], hist, extra: Dict, log: Callable,
           fig_title: str) -> Dict:
    """results.json / table.md / curves.png (:mod:`lrmt_fast.results`), Figures 6 and 7, the history."""
    ep_steps = [h["steps"] for h in history]
    tail = ep_steps[-max(1, len(ep_steps) // 10):] if ep_steps else []
    extra = dict(extra)
    extra["metatrain_summary"] = {"episodes": len(history), "total_steps": int(sum(ep_steps)),
                                  "mean_steps_last_10pct": (sum(tail) / len(tail)) if tail else None,
                                  "restarts": int(sum(bool(h.get("restarted")) for h in history)),
                                  "nonfinite_steps_skipped": int(sum(bool(h.get("nonfinite")) for h in history)),
                                  "final_threshold": history[-1]["threshold"] if history else None,
                                  "final_bptt": history[-1]["bptt"] if history else None}
    bad = nonfinite_runs(runs)
    if bad:
        extra["nonfinite_runs"] = bad
    figs = {}
    if history:
        atomic_write_json(os.path.join(out_dir, "metatrain_history.json"), history)
        figs["figure6"] = figure6(history, os.path.join(out_dir, FIG6), title=f"{fig_title}: meta-training curve",
                                  max_steps=spec.metatrain.max_steps)
    if hist is not None and "all" in hist.groups:
        hist.save(os.path.join(out_dir, "delta_hist.json"))
        figs["figure7"] = figure7(hist, os.path.join(out_dir, FIG7),
                                  title=f"{fig_title}: meta-learner outputs during meta-test")
        extra["delta_summary"] = hist.summary()
    extra["figures"] = {k: os.path.basename(v) for k, v in figs.items()}
    config = {k: v for k, v in spec.to_dict().items() if k not in ("profile", "experiment")}
    config.update(extra.pop("config_extra", {}))
    res = R.aggregate(runs, spec.experiment, spec.profile, seeds, config, extra)
    paths = R.write_all(res, out_dir)
    atomic_write_json(os.path.join(out_dir, "config.json"), {**spec.to_dict(), "seeds": list(seeds),
                                                             "world_size": extra.get("world_size", 1),
                                                             **{k: v for k, v in config.items()
                                                                if k in ("device", "impl", "data_info")}})
    log(f"wrote {paths['json']}, {paths['table']}, {paths['curves']}"
        + "".join(f", {v}" for v in figs.values()) + (f", {paths['gate_trace']}" if "gate_trace" in paths else ""))
    return res


class NonFiniteResults(RuntimeError):
    """A meta-test run ended with NaN or inf weights or losses (flagged in results.json)."""


def run_experiment(spec: ExperimentSpec, adapter, sources, opts: RunOptions) -> Optional[Dict]:
    """The whole pipeline for one experiment. Returns the results dict on rank 0 (None on other
    ranks). Raises :class:`NonFiniteResults` (after writing the results, which flag them) when a
    method's run went non-finite."""
    t_start = time.time()
    if opts.rank == 0:
        os.makedirs(opts.out, exist_ok=True)
    prep = adapter.prepare(spec, sources, opts)
    t_pre = time.time() - t_start
    t0 = time.time()
    meta, meta_path, history = metatrain_stage(spec, prep, opts)
    t_meta = time.time() - t0
    if opts.rank != 0:
        return None
    prep.stream = None                      # free the meta-training data before the meta-test's
    t0 = time.time()
    tasks_list = prep.metatest_tasks(list(opts.seeds))
    runs, hist, rdesc = metatest_stage(spec, prep, tasks_list, meta, meta_path, opts)
    info = dict(prep.info)
    data_info = [t.describe() for t, _ in tasks_list]
    extra = {"timings": {"pretrain_s": round(t_pre, 1), "metatrain_s": round(t_meta, 1),
                         "metatest_s": round(time.time() - t0, 1), "total_s": round(time.time() - t_start, 1)},
             "world_size": opts.world_size, **info.pop("results", {}),
             "config_extra": {"device": opts.device, "impl": opts.impl,
                              "impl_resolved": resolve_impl(opts.impl, opts.device, warn=False),
                              **({"precision": opts.precision} if opts.precision else {}),
                              "data_info": data_info[0] if len(data_info) == 1 else data_info,
                              "readout_data": rdesc, "task_a_test_acc": prep.task_a.get("test_acc"),
                              **({"task_a_checkpoint": prep.task_a["path"]} if "path" in prep.task_a else {}),
                              **info}}
    res = finish(spec, runs, opts.seeds, opts.out, history, hist, extra, opts.log, prep.title or spec.experiment)
    bad = res.get("nonfinite_runs")
    if bad:
        raise NonFiniteResults("non-finite (NaN or inf) weights or losses in the meta-test of "
                               + ", ".join(f"{m} (seeds {s})" for m, s in bad.items())
                               + f"; flagged in {os.path.join(opts.out, 'results.json')}")
    return res
