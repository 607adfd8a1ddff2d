"""Experiment 1, CIFAR-5A -> CIFAR-5B (paper 5.2, Table 1 column 2, Figure 4 right), and the
CIFAR pipeline shared with Experiments 2 and 3 (``exp2_cifar100.py``, ``exp3_unseen_init.py``).

    lrmt exp1-cifar --profile {smoke,quick,cpu,cpu_lr0.03,cpu_finish,cpu_finish_avg,paper} --data-root DIR --out DIR [--seeds N]
                    [--resume] [--device cpu|cuda] [--impl reference|fused] [--cifar-check auto|md5|skip]
    torchrun --nproc_per_node 2 -m lrmt_fast exp1-cifar ...       (data-parallel meta-training)
    lrmt pretrain-cifar --data-root DIR                             (only the Task A checkpoint)

Pipeline (docs/cifar.md):

1. Task A: ResNet-32 GN pretrained on CIFAR-5A (:mod:`lrmt_fast.pretrain_cifar`), cached
   under ``--cache-dir`` (shared by the three CIFAR experiments; keyed by config and data).
2. Meta-training (Algorithm 1) on CIFAR-5A u D_B1, episodes from
   :class:`lrmt_fast.data.cifar.CifarTaskStream`; under ``torchrun`` every rank trains on its
   own episodes and :class:`lrmt_fast.distributed.DistSync` keeps them in lockstep; rank 0
   writes the resumable checkpoint ``--out/cache/meta-<key>/meta_ckpt.pt``.
3. Meta-test (rank 0): every method x seed with the shared protocol
   (:func:`lrmt_fast.evaluate.run_meta_test`, readouts of :mod:`lrmt_fast.readout`), while
   :func:`lrmt_fast.figures.record_deltas` collects the meta-learner's gate for Figure 7.
4. Results with the shared code (:mod:`lrmt_fast.results`): results.json, table.md, curves.png
   (the paper's Figure 4 right / 5), plus fig6_curriculum.png, fig7_delta_hist.png,
   delta_hist.json and metatrain_history.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time
from typing import Callable, Dict, List, Optional

import torch

from . import common

NAME = "exp1-cifar"
HELP = "Experiment 1: CIFAR-5A (Task A) -> CIFAR-5B (Task B) with ResNet-32 GN"
CONFIG = os.path.join(common.CONFIG_DIR, "exp1_cifar.json")
DEFAULT_OUT = os.path.join("runs", "exp1_cifar")
DEFAULT_CACHE = os.path.join("runs", "cifar_cache")

FIG6 = "fig6_curriculum.png"
FIG7 = "fig7_delta_hist.png"


# --------------------------------------------------------------------------- arguments
def add_cifar_arguments(p: argparse.ArgumentParser, config: str, default_out: str) -> None:
    common.add_common_arguments(p, config, default_out)
    p.add_argument("--cifar-check", choices=["auto", "md5", "skip"], default="auto",
                   help="integrity check of the CIFAR files: md5 (torchvision's), skip, or auto = md5, else "
                        "accept the known offline reconstruction with a warning (docs/cifar.md)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, metavar="DIR",
                   help="Task A checkpoints (and Exp 3's pool), shared by the CIFAR experiments "
                        "(default: %(default)s)")
    p.add_argument("--taskA-ckpt", default=None, metavar="FILE",
                   help="use (or write) the Task A checkpoint at FILE instead of the cache's (or the one "
                        "committed under experiments/results/ for the same config and data)")
    p.add_argument("--dist-timeout", type=float, default=900.0, metavar="S",
                   help="under torchrun: seconds a collective may wait for a peer before the job stops "
                        "(default: %(default)s)")
    p.add_argument("--no-tf32", action="store_true",
                   help="on a GPU, run the networks' convolutions in full fp32 (PyTorch's default lets cuDNN "
                        "use TF32 on Ampere and newer GPUs; matrix products are fp32 either way; docs/cifar.md)")


def add_task_a_arguments(p: argparse.ArgumentParser, default_profile: str) -> None:
    """What a diagnostic command (experiments/cifar_stability_check.py, drift_check.py,
    rounding_check.py) needs to load an exp1_cifar.json profile's data and Task A network as
    ``lrmt exp1-cifar`` does: --data-root, --profile, --config, --cache-dir, --taskA-ckpt,
    --cifar-check, --no-download."""
    p.add_argument("--data-root", default=None, help="folder with torchvision's dataset layouts (default: $LRMT_DATA)")
    p.add_argument("--profile", default=default_profile,
                   help=f"exp1_cifar.json profile (or one of --config) whose data and Task A network are used "
                        f"(default {default_profile})")
    p.add_argument("--config", default=None, metavar="FILE", help="another config file with the structure of "
                                                                   "exp1_cifar.json")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, metavar="DIR", help="Task A checkpoints (default: %(default)s)")
    p.add_argument("--taskA-ckpt", default=None, metavar="FILE", help="the Task A checkpoint at FILE instead of the "
                                                                       "cache's")
    p.add_argument("--cifar-check", choices=["auto", "md5", "skip"], default="auto",
                   help="integrity check of the CIFAR files (as lrmt exp1-cifar)")
    p.add_argument("--no-download", action="store_true", help="never let torchvision download missing data")


def apply_precision(args, device: str) -> Dict:
    """The numeric precision of the run (docs/cifar.md, "Precision"): everything is fp32; on a GPU
    cuDNN may use TF32 for convolutions (PyTorch's default) unless ``--no-tf32``. Returns what is
    in effect, for config.json / results.json."""
    if getattr(args, "no_tf32", False):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    cuda = str(device).startswith("cuda")
    return {"dtype": "float32", "autocast": False,
            "tf32_convolutions": bool(cuda and torch.backends.cudnn.allow_tf32),
            "tf32_matmul": bool(cuda and torch.backends.cuda.matmul.allow_tf32)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_cifar_arguments(p, CONFIG, DEFAULT_OUT)


def source(args):
    from lrmt_fast.data.cifar import CifarSource
    return CifarSource(args.data_root, args.cifar_check, False if args.no_download else None)


# --------------------------------------------------------------------------- helpers
def _write_json(path: str, obj) -> None:
    common._write_json(path, obj)


def _subset(task, max_train: Optional[int], max_test: Optional[int], seed: int):
    """A fixed random subset of a task's train / test images (smoke and quick profiles)."""
    from lrmt_fast.data.cifar import Task
    from lrmt_fast.data.tasks import fixed_subset
    itr = fixed_subset(task.train_x.shape[0], max_train, seed)
    ite = fixed_subset(task.test_x.shape[0], max_test, seed + 1)
    return Task(task.name, task.classes, task.train_x[itr], task.train_y[itr], task.test_x[ite], task.test_y[ite])


def load_task_a(args, cfg: Dict):
    from lrmt_fast.data.cifar import cifar5a
    d = cfg.get("data", {})
    return _subset(cifar5a(source(args)), d.get("max_train"), d.get("max_test"), d.get("split_seed", 0))


def load_task_b(args, cfg: Dict):
    """CIFAR-5B (the profile's subset), before its D_B1 / D_B2 split."""
    from lrmt_fast.data.cifar import cifar5b
    d = cfg.get("data", {})
    return _subset(cifar5b(source(args)), d.get("max_train"), d.get("max_test"), int(d.get("split_seed", 0)) + 7)


def two_tasks(args, cfg: Dict, task_a, task_b):
    """Task A and Task B with Task B's training set split evenly into D_B1 / D_B2 by the profile's
    ``data.split_seed`` (the split of :func:`lrmt_fast.data.cifar.split_b`): what the meta-test
    runs on."""
    from lrmt_fast.data.cifar import even_split, to_task_data
    from lrmt_fast.data.tasks import TwoTasks
    i1, i2 = even_split(task_b.train_x.shape[0], int(cfg.get("data", {}).get("split_seed", 0)))
    return TwoTasks(to_task_data(task_a), to_task_data(task_b), i1, i2, source=f"cifar:{source(args).root or ''}")


def b1_stream(cfg: Dict, task_a, b1, w0: Dict[str, torch.Tensor], device: str):
    """Exp 1's meta-training episodes: Task A's training set and D_B1 from the start checkpoint
    ``w0``, with the profile's teacher batch sizes."""
    from lrmt_fast.data.cifar import CifarTaskStream
    mt = cfg.get("metatrain") or {}
    return CifarTaskStream([w0], (task_a.train_x, task_a.train_y), (b1.train_x, b1.train_y),
                           int(mt.get("batch_a", 64)), int(mt.get("batch_b", 64)), device)


def _log_for(sync) -> Callable:
    from lrmt_fast.distributed import is_main
    return print if is_main(sync) else (lambda *a, **k: None)


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def shipped_checkpoint(name: str) -> Optional[str]:
    """A Task A checkpoint committed with the repository (``experiments/results/cifar5a_pretrain_*/``)
    with the file name ``name``, i.e. the same config and data key; None if there is none."""
    for d in sorted(glob.glob(os.path.join(SHIPPED, "cifar5a_pretrain_*"))):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    return None


def _cached_or_shipped(args, task_a, pcfg) -> str:
    from lrmt_fast.pretrain_cifar import default_path
    path = default_path(args.cache_dir, task_a, pcfg)
    if not os.path.exists(path) and not os.path.exists(path + ".partial"):
        return shipped_checkpoint(os.path.basename(path)) or path
    return path


def task_a_path(args, task_a, pcfg) -> str:
    """Where the Task A checkpoint is read (or written): ``--taskA-ckpt``, else the cache's file;
    where the cache has neither it nor a partial pretraining, a committed checkpoint with the same
    key (pretraining config and Task A data) is used instead of training again."""
    if args.taskA_ckpt:
        return args.taskA_ckpt
    return _cached_or_shipped(args, task_a, pcfg)


def base_task_a_path(args, task_a, pcfg) -> Optional[str]:
    """Where the checkpoint a finish phase starts from is read or written (the same lookup as
    :func:`task_a_path` for the config without the finish phase); None without a finish phase."""
    from lrmt_fast.pretrain_cifar import base_config
    if pcfg.finish_epochs <= 0:
        return None
    return _cached_or_shipped(args, task_a, base_config(pcfg))


def task_a_weights(args, cfg: Dict, task_a, sync, device: str, progress: bool, log: Callable):
    """(Task A state dict, info) identical on every rank: rank 0 loads (or, single-process,
    trains) the checkpoint and broadcasts it."""
    from lrmt_fast.distributed import DistSync, broadcast_object
    from lrmt_fast.pretrain_cifar import CifarPretrainConfig, pretrain_cifar

    pcfg = common.dataclass_from(CifarPretrainConfig, cfg.get("pretrain"), "pretrain")
    path = task_a_path(args, task_a, pcfg)
    payload = None
    if getattr(sync, "rank", 0) == 0:
        if os.path.exists(path) or not isinstance(sync, DistSync):
            cached = os.path.exists(path)
            ck = pretrain_cifar(task_a, pcfg, path, device, progress, log,
                                base_path=base_task_a_path(args, task_a, pcfg))
            if cached:
                log(f"task A: reusing {path} (test accuracy {ck['test_acc']:.2f}%)")
            payload = {"state": ck["state_dict"], "info": {"path": path, "key": ck["key"],
                                                           "test_acc": ck["test_acc"]}}
        else:
            payload = {"error": f"the Task A checkpoint {path} does not exist; under torchrun pretrain it first "
                                f"(`lrmt pretrain-cifar --profile {cfg.get('profile')} ...` or a single-process "
                                f"run), then start the distributed job"}
    payload = broadcast_object(sync, payload)
    if "error" in payload:
        raise common.ConfigError(payload["error"])
    return payload["state"], payload["info"], pcfg


def build_model(pcfg, state: Dict[str, torch.Tensor], device: str):
    from lrmt_fast.pretrain_cifar import make_model
    model = make_model(pcfg)
    model.load_state_dict(state)
    return model.to(device)


def meta_key(parts: Dict) -> str:
    return common._key(parts)


def run_metatraining(args, cfg: Dict, model, stream, out_dir: str, key_parts: Dict, sync, device: str,
                     impl, progress: bool, log: Callable, methods: Optional[Dict] = None):
    """Meta-train (or reuse the finished meta-learner); returns (meta on rank 0 else None,
    meta checkpoint path, history). With ``methods`` given and no "ours" among them there
    is nothing to meta-train: (None, None, [])."""
    if methods is not None and not any(s.get("kind") == "ours" for s in methods.values()):
        return None, None, []
    from lrmt_fast.checkpoint import load_checkpoint
    from lrmt_fast.distributed import broadcast_object
    from lrmt_fast.metatrain import CKPT_NAME, MetaTrainConfig, load_meta

    mt = dict(cfg.get("metatrain") or {})
    mt.update(impl=impl, device=device)
    try:
        mcfg = MetaTrainConfig.from_dict(mt)
    except (TypeError, ValueError) as e:
        raise common.ConfigError(f"metatrain: {e}") from None
    mkey = meta_key({**key_parts, "metatrain": mcfg.key_dict(),
                     "budget": cfg.get("metatrain_budget", {}), "world_size": getattr(sync, "world_size", 1)})
    mdir = os.path.join(out_dir, "cache", f"meta-{mkey}")
    meta_path = os.path.join(mdir, CKPT_NAME)
    done_marker = os.path.join(mdir, "DONE")
    main = getattr(sync, "rank", 0) == 0
    done = broadcast_object(sync, main and os.path.exists(done_marker) and os.path.exists(meta_path))
    if done:
        log(f"meta-train: reusing the finished meta-learner {meta_path}")
    else:
        if main:
            os.makedirs(mdir, exist_ok=True)
            if os.path.exists(meta_path) and not args.resume:
                log(f"meta-train: a checkpoint exists in {mdir} but --resume was not given: starting over")
        common.metatrain_with_budget(model, stream, mcfg, mdir, args.resume, cfg.get("metatrain_budget", {}),
                                     progress, log, sync=sync)
        if main:
            with open(done_marker, "w") as f:
                f.write("finished\n")
    if not main:
        return None, meta_path, []
    meta = load_meta(meta_path, device=device)
    history = list(load_checkpoint(meta_path, ("history",), "meta-training checkpoint")["history"])
    return meta, meta_path, history


def figure7_methods(methods: Dict[str, Dict]) -> Dict[str, Dict]:
    """The methods whose meta-test updates Figure 7 pools: those of kind "ours" that run the
    meta-learner as trained (options that change its update, ``reset_every`` and ``min_gate``,
    leave a method out; ``trace`` only reads), or every "ours" if all have such options."""
    from lrmt_fast.baselines import OURS_UPDATE_OPTIONS
    ours = {m: s for m, s in methods.items() if s.get("kind") == "ours"}
    plain = {m: s for m, s in ours.items() if not any(s.get(k) is not None for k in OURS_UPDATE_OPTIONS)}
    return plain or ours


def meta_test(model, w0, tasks_list, seeds_list, readout_cfg, mtest, methods, meta, meta_path, impl, device,
              cache_dir: str, key_parts: Dict, progress: bool, log: Callable, delta_path: str):
    """run_meta_test for each (TwoTasks, seeds) pair, runs concatenated per method; returns
    (runs, DeltaHistogram of the meta-test updates of :func:`figure7_methods`, readout description)."""
    from lrmt_fast.evaluate import run_meta_test, sha_file
    from lrmt_fast.figures import DeltaHistogram, record_deltas
    from lrmt_fast.readout import Readout, ReadoutData

    runs: Dict[str, List[Dict]] = {m: [] for m in methods}
    ours = figure7_methods(methods)
    dkey = common._key({**key_parts, "meta": sha_file(meta_path) if meta_path and os.path.exists(meta_path) else None,
                        "metatest": dataclasses.asdict(mtest), "seeds": [list(s) for s in seeds_list],
                        "data": [t.fingerprint() for t in tasks_list], "ours": ours})
    hist, hist_draws = None, 0          # hist_draws: how many draws the saved histogram covers
    if meta is not None and ours:
        hist = DeltaHistogram.for_meta(meta)
        if os.path.exists(delta_path):
            try:
                with open(delta_path) as f:
                    saved = json.load(f)
                if saved.get("key") == dkey:
                    hist = DeltaHistogram.from_dict(saved)
                    hist_draws = int(saved.get("draws", len(tasks_list)))
            except (OSError, ValueError, KeyError):
                pass
    describe = None

    def run(todo, tasks, readout, seeds, cache, show):
        return run_meta_test(model, w0, tasks, readout, mtest, todo, seeds, meta=meta, meta_path=meta_path, impl=impl,
                             device=device, cache_dir=cache, key_parts=key_parts, progress=show, log=log)

    for i, (tasks, seeds) in enumerate(zip(tasks_list, seeds_list)):
        readout = Readout(model, ReadoutData(tasks, readout_cfg, device))
        describe = readout.data.describe()
        r: Dict[str, List[Dict]] = {}
        if hist is not None and i >= hist_draws:
            # first the Figure 7 methods, every update of every run of them recorded: a run taken
            # from the run cache records nothing, so unless all were computed here they are rolled
            # out again, uncached; the histogram is saved (with the draws it covers) before the
            # other methods run, so an interrupted meta-test does not roll them out again
            want = sum(l.cout * l.p for l in meta.layers) * mtest.steps * len(ours) * len(seeds)
            rec = DeltaHistogram(hist.lo, hist.hi, hist.bins)
            with record_deltas(rec):
                r.update(run(ours, tasks, readout, seeds, cache_dir, progress))
            if rec.groups.get("all", {}).get("n") != want:
                rec = DeltaHistogram(hist.lo, hist.hi, hist.bins)
                with record_deltas(rec):
                    run(ours, tasks, readout, seeds, None, False)
            hist.merge(rec)
            _write_json(delta_path, {**hist.to_dict(), "key": dkey, "draws": i + 1})
        rest = {m: s for m, s in methods.items() if m not in r}
        if rest:
            r.update(run(rest, tasks, readout, seeds, cache_dir, progress))
        for m in methods:
            runs[m] += r[m]
    return runs, hist, describe


def finish(cfg: Dict, runs, seeds, out_dir: str, history: List[Dict], hist, extra: Dict, log: Callable,
           fig_title: str) -> Dict:
    """results.json / table.md / curves.png (shared code), Figures 6 and 7, histories."""
    from lrmt_fast import results as R
    from lrmt_fast.figures import figure6, figure7

    ep_steps = [h["steps"] for h in history]
    tail = ep_steps[-max(1, len(ep_steps) // 10):] if ep_steps else []
    extra = dict(extra)
    extra["metatrain_summary"] = {"episodes": len(history), "total_steps": int(sum(ep_steps)),
                                  "mean_steps_last_10pct": (sum(tail) / len(tail)) if tail else None,
                                  "restarts": int(sum(bool(h.get("restarted")) for h in history)),
                                  "final_threshold": history[-1]["threshold"] if history else None,
                                  "final_bptt": history[-1]["bptt"] if history else None}
    figs = {}
    if history:
        _write_json(os.path.join(out_dir, "metatrain_history.json"), history)
        figs["figure6"] = figure6(history, os.path.join(out_dir, FIG6), title=f"{fig_title}: meta-training curve",
                                  max_steps=(cfg.get("metatrain") or {}).get("max_steps"))
    if hist is not None and "all" in hist.groups:
        hist.save(os.path.join(out_dir, "delta_hist.json"))
        figs["figure7"] = figure7(hist, os.path.join(out_dir, FIG7),
                                  title=f"{fig_title}: meta-learner outputs during meta-test")
        extra["delta_summary"] = hist.summary()
    extra["figures"] = {k: os.path.basename(v) for k, v in figs.items()}
    config = {k: v for k, v in cfg.items() if k not in ("profile", "experiment")}
    config.update(extra.pop("config_extra", {}))
    res = R.aggregate(runs, cfg.get("experiment", NAME), cfg.get("profile", ""), seeds, config, extra)
    paths = R.write_all(res, out_dir)
    log(f"wrote {paths['json']}, {paths['table']}, {paths['curves']}"
        + "".join(f", {v}" for v in figs.values()) + (f", {paths['gate_trace']}" if "gate_trace" in paths else ""))
    return res


def setup(args, config_path: str, default_out: str):
    """Resolve the profile, join the process group (under torchrun), pick the device."""
    from lrmt_fast.distributed import init_distributed
    cfg = common.resolve_profile(args.config or config_path, args.profile)
    seeds = args.seeds or list(range(int(cfg.get("seeds", 1))))
    device = common.pick_device(args.device)
    sync, device = init_distributed(device, args.dist_timeout)
    args.precision = apply_precision(args, device)
    out = args.out or os.path.join(default_out, args.profile)
    if getattr(sync, "rank", 0) == 0:
        os.makedirs(out, exist_ok=True)
    progress = not args.no_progress and getattr(sync, "rank", 0) == 0
    return cfg, seeds, sync, device, out, progress


# --------------------------------------------------------------------------- Exp 1
def run(args: argparse.Namespace) -> int:
    from lrmt_fast.data.cifar import split_b
    from lrmt_fast.data.tasks import fingerprint
    from lrmt_fast.distributed import shutdown
    from lrmt_fast.evaluate import MetaTestConfig
    from lrmt_fast.readout import ReadoutConfig

    cfg, seeds, sync, device, out, progress = setup(args, CONFIG, DEFAULT_OUT)
    log = _log_for(sync)
    t_start = time.time()
    try:
        d = cfg.get("data", {})
        split_seed = int(d.get("split_seed", 0))
        task_a = load_task_a(args, cfg)
        task_b = load_task_b(args, cfg)
        b1, b2 = split_b(task_b, split_seed)
        mtest = common.dataclass_from(MetaTestConfig, cfg.get("metatest"), "metatest")
        rcfg = common.dataclass_from(ReadoutConfig, cfg.get("readout"), "readout")
        methods = cfg.get("methods") or {}
        if not methods:
            raise common.ConfigError("the profile lists no methods")
        state, ainfo, pcfg = task_a_weights(args, cfg, task_a, sync, device, progress, log)
        model = build_model(pcfg, state, device)
        w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        t_pre = time.time() - t_start
        stream = b1_stream(cfg, task_a, b1, w0, device)
        key_parts = {"taskA": ainfo["key"], "data": fingerprint(b1.train_x, b1.train_y), "experiment": NAME}
        t0 = time.time()
        meta, meta_path, history = run_metatraining(args, cfg, model, stream, out, key_parts, sync, device,
                                                    args.impl, progress, log, methods)
        t_meta = time.time() - t0
    finally:
        shutdown(sync)
    if getattr(sync, "rank", 0) != 0:
        return 0
    t0 = time.time()
    tasks = two_tasks(args, cfg, task_a, task_b)
    _write_json(os.path.join(out, "config.json"), {**cfg, "seeds": seeds, "device": device, "impl": args.impl,
                                                   "world_size": getattr(sync, "world_size", 1),
                                                   "data_info": tasks.describe()})
    runs, hist, rdesc = meta_test(model, w0, [tasks], [seeds], rcfg, mtest, methods, meta, meta_path, args.impl,
                                  device, os.path.join(out, "cache", "runs"), {"taskA": ainfo["key"]}, progress, log,
                                  os.path.join(out, "cache", "delta_hist.json"))
    extra = {"timings": {"pretrain_s": round(t_pre, 1), "metatrain_s": round(t_meta, 1),
                         "metatest_s": round(time.time() - t0, 1), "total_s": round(time.time() - t_start, 1)},
             "world_size": getattr(sync, "world_size", 1),
             "config_extra": {"device": device, "impl": args.impl, "impl_resolved": common.resolved_impl(args.impl, device),
                              "precision": args.precision, "data_info": tasks.describe(),
                              "readout_data": rdesc, "task_a_test_acc": ainfo["test_acc"],
                              "task_a_checkpoint": ainfo["path"]}}
    res = finish(cfg, runs, seeds, out, history, hist, extra, log, "Exp 1 CIFAR-5A -> 5B")
    from lrmt_fast.results import format_table
    print(format_table(res))
    return 0


# --------------------------------------------------------------------------- pretrain-cifar
class PretrainCommand:
    HELP = "pretrain ResNet-32 GN on CIFAR-5A (Task A of the CIFAR experiments), cached and resumable"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        add_cifar_arguments(p, CONFIG, DEFAULT_OUT)
        p.add_argument("--seed", type=int, default=None, help="pretraining seed (default: the profile's)")

    @staticmethod
    def run(args) -> int:
        from lrmt_fast.pretrain_cifar import CifarPretrainConfig, pretrain_cifar
        cfg = common.resolve_profile(args.config or CONFIG, args.profile)
        device = common.pick_device(args.device)
        apply_precision(args, device)
        task_a = load_task_a(args, cfg)
        pcfg = common.dataclass_from(CifarPretrainConfig, cfg.get("pretrain"), "pretrain")
        if args.seed is not None:
            pcfg = dataclasses.replace(pcfg, seed=args.seed)
        path = task_a_path(args, task_a, pcfg)
        ck = pretrain_cifar(task_a, pcfg, path, device, not args.no_progress,
                            base_path=base_task_a_path(args, task_a, pcfg))
        if "base" in ck:
            print(f"CIFAR-5A test accuracy {ck['base']['test_acc']:.2f}% before the finish phase "
                  f"(checkpoint key {ck['base']['key']})")
        print(f"{path}: CIFAR-5A test accuracy {ck['test_acc']:.2f}%")
        if path.startswith(SHIPPED + os.sep):
            print("(the checkpoint committed for this config and data; --taskA-ckpt FILE trains a new one)")
        return 0
