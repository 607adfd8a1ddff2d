"""Shared machinery of the experiment drivers (``experiments/exp1_mnist.py`` and later
siblings such as ``exp1_cifar.py``): profile configs, the common command-line
options, and the two-task pipeline

    Task A pretraining (cached)  ->  meta-training (checkpointed, --resume)
    ->  meta-test of every method x seed (cached per run)  ->  results.json, table.md, curves.png

A driver module has ``add_arguments(parser)`` and ``run(args) -> int``, loads its
data into a :class:`lrmt_fast.data.TwoTasks`, and calls :func:`run_two_task_pipeline`.

Output folder (``--out``)::

    results.json  table.md  curves.png     the results (docs/results.md)
    fig6_curriculum.png                     Figure 6: curriculum threshold, unrolled steps, episode lengths
    fig7_delta_hist.png  delta_hist.json    Figure 7: the meta-learner's gate during meta-test
    config.json                             the resolved config of the run
    metatrain_history.json                  one row per meta-training episode
    cache/taskA-<key>.pt                    Task A checkpoint
    cache/meta-<key>/meta_ckpt.pt           meta-training checkpoint (resumable) = the meta-learner
    cache/runs/<method>-seed<k>-<key>.json  one meta-test run, reused by reruns
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from lrmt_fast.metatrain import TensorTaskStream
from lrmt_fast.pretrain import fresh_head_b

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A config file or profile is missing or malformed."""


# --------------------------------------------------------------------------- configs
def deep_merge(base: Dict, over: Dict) -> Dict:
    """``over`` merged into a copy of ``base``; nested dicts merge, ``methods`` and lists replace."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k.startswith("_"):
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "methods":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_config_file(path: str) -> Dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"config file {path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("profiles"), dict) or not cfg["profiles"]:
        raise ConfigError(f"config file {path} needs a non-empty 'profiles' object")
    return cfg


def profile_names(path: str) -> List[str]:
    try:
        return list(read_config_file(path)["profiles"])
    except ConfigError:
        return []


def _profile_chain(cfg: Dict, profile: str, path: str) -> List[Dict]:
    """The named profile and those it ``extends``, the farthest first (cycles are an error)."""
    profiles, chain, seen = cfg["profiles"], [], []
    name = profile
    while name is not None:
        if name in seen:
            raise ConfigError(f"profiles of {os.path.basename(path)} extend each other in a cycle: "
                              f"{' -> '.join(seen + [name])}")
        if name not in profiles:
            where = f" (extended by {seen[-1]!r})" if seen else ""
            raise ConfigError(f"unknown profile {name!r}{where} in {os.path.basename(path)}: "
                              f"choose one of {', '.join(profiles)}")
        body = profiles[name]
        if not isinstance(body, dict):
            raise ConfigError(f"profile {name!r} of {os.path.basename(path)} is not a JSON object")
        seen.append(name)
        chain.insert(0, {k: v for k, v in body.items() if k != "extends"})
        name = body.get("extends")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"profile {seen[-1]!r} of {os.path.basename(path)}: 'extends' must "
                              f"name another profile, not {name!r}")
    return chain


def resolve_profile(path: str, profile: str) -> Dict:
    """The ``defaults`` of the config file merged with the named profile, after the profiles it
    ``extends`` (a profile ``{"extends": "cpu", ...}`` is ``cpu`` with its own keys merged in)."""
    cfg = read_config_file(path)
    out = cfg.get("defaults", {})
    for body in _profile_chain(cfg, profile, path):
        out = deep_merge(out, body)
    out["profile"] = profile
    out.setdefault("experiment", cfg.get("experiment", os.path.splitext(os.path.basename(path))[0]))
    return out


def dataclass_from(cls, d: Optional[Dict], what: str):
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**d)
    except ValueError as e:            # a dataclass's own check of its values
        raise ConfigError(f"{what}: {e}") from e


# --------------------------------------------------------------------------- arguments
def parse_seeds(text: str) -> List[int]:
    """``N`` (seeds 0..N-1) or a comma-separated list of non-negative seeds."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(t) for t in text.split(",") if t.strip()]
            if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
                raise ValueError
            return seeds
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --seeds {text!r}: give a count N >= 1 (seeds 0..N-1) or a list like 0,3,7") from None
    if n < 1 or n > 1000:
        raise argparse.ArgumentTypeError(f"invalid --seeds {text!r}: the count must be between 1 and 1000")
    return list(range(n))


def add_common_arguments(p: argparse.ArgumentParser, config_file: str, default_out: str) -> None:
    names = profile_names(config_file) or ["smoke", "quick", "paper"]
    # no argparse choices: a --config file may name its own profiles; resolve_profile checks the
    # name against the file actually used and lists the valid ones
    p.add_argument("--profile", default="quick" if "quick" in names else names[0], metavar="NAME",
                   help=f"size of the run: {', '.join(names)} in {os.path.basename(config_file)}, or a "
                        f"profile of --config FILE (default %(default)s)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="folder with torchvision's dataset layouts (default: $LRMT_DATA)")
    p.add_argument("--out", default=None, metavar="DIR", help=f"output folder (default: {default_out}/<profile>)")
    p.add_argument("--seeds", type=parse_seeds, default=None, metavar="N",
                   help="number of meta-test seeds (0..N-1) or a list like 0,3,7 (default: the profile's)")
    p.add_argument("--resume", action="store_true",
                   help="continue meta-training from its checkpoint in --out (finished meta-test runs are "
                        "always reused)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--impl", choices=["reference", "fused"], default=None,
                   help="meta-update op (default: $LRMT_IMPL or auto)")
    p.add_argument("--no-download", action="store_true",
                   help="never let torchvision download missing data (also: LRMT_NO_DOWNLOAD=1)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"another config file with the structure of {os.path.basename(config_file)}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def pick_device(name: Optional[str]) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- pipeline
def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def resolved_impl(impl: Optional[str], device: str) -> str:
    """The meta-update path a run uses on ``device`` ('fused' or 'reference'), for results.json."""
    from lrmt_fast.ops import resolve_impl
    return resolve_impl(impl, device, warn=False)


def run_two_task_pipeline(cfg: Dict, tasks, out_dir: str, seeds: List[int], device: str = "cpu",
                          impl: Optional[str] = None, resume: bool = False, progress: bool = True,
                          log: Callable = print) -> Dict:
    """Pretrain -> meta-train -> meta-test -> results. ``cfg`` is a resolved profile (see the config
    files); ``tasks`` a :class:`lrmt_fast.data.TwoTasks`. Returns the results dict (also written)."""
    from lrmt_fast.evaluate import MetaTestConfig
    from lrmt_fast.metatrain import CKPT_NAME, MetaTrainConfig, load_meta
    from lrmt_fast.pretrain import PretrainConfig, load_or_pretrain
    from lrmt_fast.readout import ReadoutConfig
    from lrmt_fast.student import param_dict

    t_start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    cache = os.path.join(out_dir, "cache")
    pcfg = dataclass_from(PretrainConfig, cfg.get("pretrain"), "pretrain")
    mtest = dataclass_from(MetaTestConfig, cfg.get("metatest"), "metatest")
    rcfg = dataclass_from(ReadoutConfig, cfg.get("readout"), "readout")
    mt_dict = dict(cfg.get("metatrain") or {})
    mt_dict.update(impl=impl, device=device)
    try:
        mcfg = MetaTrainConfig.from_dict(mt_dict)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"metatrain: {e}") from None
    methods = cfg.get("methods") or {}
    if not methods:
        raise ConfigError("the profile lists no methods")
    _write_json(os.path.join(out_dir, "config.json"), {**cfg, "seeds": seeds, "device": device, "impl": impl,
                                                       "data_info": tasks.describe()})
    timings = {}

    # 1. Task A
    t0 = time.time()
    model, ainfo = load_or_pretrain(cache, tasks.a, tasks.b.num_classes, pcfg, device, progress, log)
    w0 = {k: v.detach().clone() for k, v in param_dict(model).items()}
    timings["pretrain_s"] = round(time.time() - t0, 1)

    # 2. meta-training (only when a method needs the meta-learner)
    meta = meta_path = None
    history: List[Dict] = []
    needs_meta = any(spec.get("kind") == "ours" for spec in methods.values())
    t0 = time.time()
    if needs_meta:
        mkey = _key({"taskA": ainfo["key"], "data": tasks.fingerprint(),
                     "metatrain": mcfg.key_dict(),
                     "fresh_head_b": True})
        mdir = os.path.join(cache, f"meta-{mkey}")
        meta_path = os.path.join(mdir, CKPT_NAME)
        done_marker = os.path.join(mdir, "DONE")
        if os.path.exists(done_marker) and os.path.exists(meta_path):
            log(f"meta-train: reusing the finished meta-learner {meta_path}")
        else:
            if os.path.exists(meta_path) and not resume:
                log(f"meta-train: a checkpoint exists in {mdir} but --resume was not given: starting over")
            xb1, yb1 = tasks.b1
            stream = FreshHeadStream(w0, tasks.a.train_x, tasks.a.train_y, xb1, yb1, mcfg.batch_a, mcfg.batch_b,
                                     device)
            metatrain_with_budget(model, stream, mcfg, mdir, resume, cfg.get("metatrain_budget", {}), progress, log)
            with open(done_marker, "w") as f:
                f.write("finished\n")
        meta = load_meta(meta_path, device=device)
        from lrmt_fast.checkpoint import load_checkpoint
        history = list(load_checkpoint(meta_path, ("history",), "meta-training checkpoint")["history"])
        _write_json(os.path.join(out_dir, "metatrain_history.json"), history)
    timings["metatrain_s"] = round(time.time() - t0, 1)

    # 3. meta-test (the CIFAR drivers' code: also records the meta-learner's gate for Figure 7)
    from experiments.exp1_cifar import finish, meta_test

    t0 = time.time()
    runs, hist, readout_desc = meta_test(model, w0, [tasks], [seeds], rcfg, mtest, methods, meta, meta_path, impl,
                                         device, os.path.join(cache, "runs"), {"taskA": ainfo["key"]}, progress,
                                         log, os.path.join(cache, "delta_hist.json"))
    timings["metatest_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - t_start, 1)

    # 4. results: results.json, table.md, curves.png, Figure 6 (curriculum), Figure 7 (gate histogram)
    config_extra = dict(device=device, impl=impl, impl_resolved=resolved_impl(impl, device),
                        data_info=tasks.describe(), readout_data=readout_desc, task_a_test_acc=ainfo["test_acc"])
    res = finish(cfg, runs, seeds, out_dir, history, hist, {"timings": timings, "config_extra": config_extra}, log,
                 cfg.get("experiment", "experiment"))
    return res


class FreshHeadStream(TensorTaskStream):
    """Episodes start from the Task A checkpoint with a fresh head_b drawn from the episode's
    generator (as every meta-test run does), so the meta-learner never sees one fixed head_b."""

    def new_episode(self, episode, gen):
        ep = super().new_episode(episode, gen)
        ep.w0 = fresh_head_b(self.w0, gen)
        return ep


def metatrain_with_budget(model, stream, mcfg, out_dir: str, resume: bool, budget: Dict, progress: bool = True,
                          log: Callable = print, sync=None, on_step=None, on_episode=None) -> List[Dict]:
    """:func:`lrmt_fast.metatrain.metatrain` for up to ``mcfg.episodes`` episodes, stopped early at the
    first chunk boundary where the meta-training steps so far reach ``budget['max_total_steps']``.

    The run is cut into chunks of ``budget['chunk_episodes']`` episodes, each continuing from the
    checkpoint of the previous one (metatrain's exact resume), so the cap is deterministic: it
    depends on the episodes' lengths, never on the machine's speed. Without a budget this is one
    plain call. Returns the history.

    ``sync`` (:class:`lrmt_fast.distributed.DistSync`, under torchrun) runs every rank in
    lockstep: rank 0 reads and writes the checkpoint in ``out_dir`` and the others receive its
    state; episode lengths are identical on all ranks, so every rank stops at the same chunk.
    Progress is a tqdm bar in one process and a log line per chunk (rank 0) when distributed.
    """
    from lrmt_fast.checkpoint import load_checkpoint
    from lrmt_fast.distributed import DistSync, broadcast_object
    from lrmt_fast.metatrain import CKPT_NAME, metatrain, resume_message

    main = getattr(sync, "rank", 0) == 0
    out = out_dir if main else None           # other ranks receive rank 0's state (sync_start)
    cap = budget.get("max_total_steps")
    if not cap:
        _, hist = metatrain(model, stream, mcfg, out_dir=out, resume=resume and main, progress=progress and main,
                            sync=sync, log=log, on_step=on_step, on_episode=on_episode)
        return hist
    chunk = int(budget.get("chunk_episodes", 10))
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
        from tqdm.auto import tqdm
        bar = tqdm(total=int(cap), initial=min(int(cap), sum(h["steps"] for h in hist)), desc="meta-train",
                   unit="step", dynamic_ncols=True)
    while len(hist) < mcfg.episodes and sum(h["steps"] for h in hist) < cap:
        sub = dataclasses.replace(mcfg, episodes=min(mcfg.episodes, len(hist) + chunk), checkpoint_every=chunk)
        before = sum(h["steps"] for h in hist)
        _, hist = metatrain(model, stream, sub, out_dir=out, resume=main, progress=False, sync=sync, on_step=on_step,
                            on_episode=on_episode)
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


def run_diagnostic(prog: str, compute: Callable[[], Any], out: Optional[str] = None) -> int:
    """The end of a diagnostic command (experiments/drift_check.py, rounding_check.py): run
    ``compute`` (it prints as it goes), write what it returns to ``out`` as JSON, exit 0; a
    missing file, a bad config or a corrupt checkpoint is one line on stderr and exit 1."""
    from lrmt_fast.checkpoint import CheckpointError
    try:
        rows = compute()
    except (FileNotFoundError, ValueError, KeyError, CheckpointError) as e:
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
