"""What the study commands share: the options that select an experiment's data and Task A network,
loading them as ``lrmt <experiment>`` does, and the end of a command (JSON out, one-line errors)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional

from lrmt_fast import suite
from lrmt_fast.checkpoint import CheckpointError, atomic_write_json
from lrmt_fast.cli import parse_setting, settings_dict
from lrmt_fast.config import ConfigError, config_path, load_spec
from lrmt_fast.data import DataNotFoundError
from lrmt_fast.pipeline import RunOptions


def add_task_a_arguments(p: argparse.ArgumentParser, experiment: str, profile: str) -> None:
    """--experiment, --profile, --config, --data-root, --cache, --cache-dir, --taskA-ckpt, --cifar-check,
    --no-download: what a study needs to load a profile's data and Task A network."""
    p.add_argument("--experiment", default=experiment, choices=list(suite.EXPERIMENTS),
                   help="whose data and Task A network (default %(default)s)")
    p.add_argument("--profile", default=profile, help="the experiment's profile (default %(default)s)")
    p.add_argument("--config", default=None, metavar="FILE", help="another config file for the experiment")
    p.add_argument("--data-root", default=None, help="folder with torchvision's dataset layouts (default: $LRMT_DATA)")
    p.add_argument("--cache", default=os.path.join("runs", "studies"),
                   help="where a Task A network trained here is cached (MNIST; default %(default)s)")
    p.add_argument("--cache-dir", default=os.path.join("runs", "cifar_cache"),
                   help="CIFAR Task A checkpoints (default %(default)s)")
    p.add_argument("--taskA-ckpt", default=None, metavar="FILE", help="the Task A checkpoint at FILE")
    p.add_argument("--cifar-check", choices=["auto", "md5", "skip"], default="auto",
                   help="integrity check of the CIFAR files (as lrmt exp1-cifar)")
    p.add_argument("--no-download", action="store_true", help="never let torchvision download missing data")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=parse_setting,
                   help="override one setting of the profile (as lrmt <experiment> --set), e.g. data.validation=true")


def prepare(args, device: str = "cpu", progress: bool = False, log: Callable = print):
    """(experiment, spec, Prepared) as ``lrmt <experiment> --profile ...`` would have them."""
    exp = suite.get(args.experiment)
    spec = load_spec(args.config or config_path(exp.config), args.profile, exp.pretrain_cls,
                     overrides=settings_dict(getattr(args, "set", [])))
    sources = suite.Sources(data_root=args.data_root, download=False if args.no_download else None,
                            cifar_check=args.cifar_check, cache_dir=args.cache_dir, task_a_ckpt=args.taskA_ckpt)
    opts = RunOptions(out=args.cache, seeds=[0], device=device, progress=progress, log=log)
    return exp, spec, exp.prepare(spec, sources, opts)


def run_command(prog: str, compute: Callable[[], Any], out: Optional[str] = None) -> int:
    """Run ``compute`` (it prints as it goes), write what it returns to ``out`` as JSON, exit 0; a
    missing file, a bad config or a corrupt checkpoint is one line on stderr and exit 1."""
    try:
        rows = compute()
    except (FileNotFoundError, ValueError, KeyError, CheckpointError, DataNotFoundError) as e:
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if out:
        atomic_write_json(out, rows)
    return 0
