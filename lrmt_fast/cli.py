"""The ``lrmt`` command (also ``python -m lrmt_fast``).

One subcommand per experiment of :mod:`lrmt_fast.suite` (``lrmt exp1-mnist``, ``lrmt demo``, ...),
plus ``pretrain-cifar``, ``pretrain-cifar-pool``, ``report``, ``bench`` and ``info``.

Errors a user can cause (missing data, bad options or configs, corrupt checkpoints or result
files, a busy output folder) end with one line on stderr and a non-zero exit status, never a
traceback; ``LRMT_DEBUG=1`` shows tracebacks. SIGINT and SIGTERM stop a run the same way: the
meta-training checkpoint written last stays, finished meta-test runs are kept, and the message
says how to resume (exit status 130 / 143).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from typing import Dict, List, Optional, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError, config_path, load_spec, profile_names
from .data import DataNotFoundError
from .results import ResultsError

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# --------------------------------------------------------------------------- option types
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


def parse_setting(text: str):
    """``KEY=VALUE`` with a dotted key path and a JSON value (a bare word is taken as a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like metatrain.meta_lr=1e-4, got {text!r}")
    try:
        v = json.loads(value)
    except ValueError:
        v = value
    return key.strip().split("."), v


def settings_dict(settings) -> Dict:
    """The ``--set`` overrides as one nested dict (merged over the profile like a profile is)."""
    out: Dict = {}
    for path, v in settings or []:
        d = out
        for part in path[:-1]:
            d = d.setdefault(part, {})
            if not isinstance(d, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part} is set to a value and to an object")
        d[path[-1]] = v
    return out


def _positive(cast, what: str):
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not v > 0 or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {what.split(' ', 1)[1]}, got {text!r}")
        return v
    return parse


positive_float = _positive(float, "a number")
positive_int = _positive(int, "an integer")


# --------------------------------------------------------------------------- experiments
class ExperimentCommand:
    """``lrmt <experiment>``: resolve and validate the profile, check the options, run the pipeline."""

    def __init__(self, exp):
        self.exp = exp
        self.HELP = exp.help

    def add_arguments(self, p: argparse.ArgumentParser, pretrain_only: bool = False) -> None:
        """The options of ``lrmt <experiment>``; ``pretrain_only``: those a pretraining command uses."""
        cfg = config_path(self.exp.config)
        names = profile_names(cfg) or ["smoke", "quick", "paper"]
        default = "quick" if "quick" in names else names[0]
        # no argparse choices: a --config file may name its own profiles; load_spec checks the name
        p.add_argument("--profile", default=default, metavar="NAME",
                       help=f"size of the run: {', '.join(names)} in {os.path.basename(cfg)}, or a profile of "
                            f"--config FILE (default %(default)s)")
        if self.exp.name != "demo":
            p.add_argument("--data-root", default=None, metavar="DIR",
                           help="folder with torchvision's dataset layouts (default: $LRMT_DATA)")
        if not pretrain_only:
            p.add_argument("--out", default=None, metavar="DIR",
                           help=f"output folder (default: {default_out(self.exp.name, '<profile>')})")
            p.add_argument("--seeds", type=parse_seeds, default=None, metavar="N",
                           help="number of meta-test seeds (0..N-1) or a list like 0,3,7 (default: the profile's)")
            p.add_argument("--resume", action="store_true",
                           help="continue meta-training from its checkpoint in --out (finished meta-test runs are "
                                "always reused)")
        p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                       help="default: cuda when available, else cpu")
        if not pretrain_only:
            p.add_argument("--impl", choices=["reference", "fused"], default=None,
                           help="meta-update op (default: $LRMT_IMPL or auto)")
        p.add_argument("--no-download", action="store_true",
                       help="never let torchvision download missing data (also: LRMT_NO_DOWNLOAD=1)")
        p.add_argument("--config", default=None, metavar="FILE",
                       help=f"another config file with the structure of {os.path.basename(cfg)}")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=parse_setting,
                       help="override one setting of the profile, e.g. --set metatrain.meta_lr=1e-4 (VALUE is "
                            "JSON; repeatable; recorded in config.json and results.json)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if self.exp.cifar:
            add_cifar_arguments(p, pretrain_only)
        if getattr(self.exp, "unseen_init", False):
            p.add_argument("--pool-dir", default=None, metavar="DIR",
                           help="the checkpoint pool (default: <cache-dir>/pool-<key of the pretraining config>)")

    def run(self, args) -> int:
        from . import pipeline       # the whole stack: loaded when a run starts, not for --help
        from .distributed import init_distributed, launched_distributed, shutdown
        from .outdir import OutDirLock
        from .results import format_table

        spec = load_spec(args.config or config_path(self.exp.config), args.profile, self.exp.pretrain_cls,
                         overrides=settings_dict(args.set))
        seeds = args.seeds or list(range(spec.seeds))
        device = pick_device(args.device)
        check_impl(args.impl, device)
        sync = None
        if self.exp.cifar:
            sync, device = init_distributed(device, args.dist_timeout)
        elif launched_distributed():
            raise ConfigError(f"lrmt {self.exp.name} runs in one process; distributed meta-training (torchrun) "
                              f"is for the CIFAR experiments (exp1-cifar, exp2-cifar100, exp3-unseen-init)")
        out = args.out or default_out(self.exp.name, args.profile)
        rank = getattr(sync, "rank", 0)
        opts = pipeline.RunOptions(out=out, seeds=seeds, device=device, impl=args.impl, resume=args.resume,
                                   progress=not args.no_progress and rank == 0, log=print if rank == 0 else _quiet,
                                   sync=sync, precision=apply_precision(args, device) if self.exp.cifar else {})
        try:
            if rank == 0:
                os.makedirs(out, exist_ok=True)
            with OutDirLock(out) if rank == 0 else _nothing():
                res = pipeline.run_experiment(spec, self.exp, sources_of(args), opts)
        finally:
            shutdown(sync)
        if res is not None:
            print(format_table(res))
            if self.exp.name == "demo":
                t = res.get("timings", {})
                print(f"total {t.get('total_s', 0):.0f} s; results in {os.path.abspath(out)} "
                      f"(results.json, table.md, curves.png)")
        return 0


def default_out(name: str, profile: str) -> str:
    return os.path.join("runs", "demo") if name == "demo" else os.path.join("runs", name.replace("-", "_"), profile)


def _quiet(*_a, **_k):
    pass


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def add_cifar_arguments(p: argparse.ArgumentParser, pretrain_only: bool = False) -> None:
    p.add_argument("--cifar-check", choices=["auto", "md5", "skip"], default="auto",
                   help="integrity check of the CIFAR files: md5 (torchvision's), skip, or auto = md5, else "
                        "accept the known offline reconstruction with a warning (docs/cifar.md)")
    p.add_argument("--cache-dir", default=os.path.join("runs", "cifar_cache"), metavar="DIR",
                   help="Task A checkpoints (and Exp 3's pool), shared by the CIFAR experiments "
                        "(default: %(default)s)")
    p.add_argument("--taskA-ckpt", default=None, metavar="FILE",
                   help="use (or write) the Task A checkpoint at FILE instead of the cache's (or the one "
                        "committed under experiments/results/ for the same config and data)")
    if not pretrain_only:
        p.add_argument("--dist-timeout", type=positive_float, default=900.0, metavar="S",
                       help="under torchrun: seconds a collective may wait for a peer before the job stops "
                            "(default: %(default)s)")
    p.add_argument("--no-tf32", action="store_true",
                   help="on a GPU, run the networks' convolutions in full fp32 (PyTorch's default lets cuDNN "
                        "use TF32 on Ampere and newer GPUs; matrix products are fp32 either way; docs/cifar.md)")


def sources_of(args):
    from .suite import Sources
    return Sources(data_root=getattr(args, "data_root", None),
                   download=False if getattr(args, "no_download", False) else None,
                   cifar_check=getattr(args, "cifar_check", "auto"),
                   cache_dir=getattr(args, "cache_dir", os.path.join("runs", "cifar_cache")),
                   task_a_ckpt=getattr(args, "taskA_ckpt", None), pool_dir=getattr(args, "pool_dir", None))


def pick_device(name: Optional[str]) -> str:
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def check_impl(impl: Optional[str], device: str) -> str:
    """The op path a run will use, checked before any work: a bad LRMT_IMPL, or --impl fused
    without the extension, is one line naming what was asked for."""
    from .ops import resolve_impl
    src = "--impl" if impl else "LRMT_IMPL"
    try:
        return resolve_impl(impl, device, warn=True)
    except (ValueError, RuntimeError) as e:
        msg = str(e).replace("impl (or LRMT_IMPL)", src).replace("impl='fused' (LRMT_IMPL) was requested",
                                                                  f"{src} fused was requested")
        raise ConfigError(msg) from None


def apply_precision(args, device: str) -> Dict:
    """The numeric precision of a CIFAR run (docs/cifar.md, "Precision"): fp32 everywhere; on a GPU
    cuDNN may use TF32 for convolutions (PyTorch's default) unless ``--no-tf32``."""
    import torch
    if getattr(args, "no_tf32", False):
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    cuda = str(device).startswith("cuda")
    return {"dtype": "float32", "autocast": False,
            "tf32_convolutions": bool(cuda and torch.backends.cudnn.allow_tf32),
            "tf32_matmul": bool(cuda and torch.backends.cuda.matmul.allow_tf32)}


# --------------------------------------------------------------------------- other commands
class PretrainCifarCommand:
    HELP = "pretrain ResNet-32 GN on CIFAR-5A (Task A of the CIFAR experiments), cached and resumable"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        ExperimentCommand(_exp("exp1-cifar")).add_arguments(p, pretrain_only=True)
        p.add_argument("--seed", type=int, default=None, help="pretraining seed (default: the profile's)")

    def run(self, args) -> int:
        from .pretrain_cifar import pretrain_cifar
        from .suite import cifar
        exp = _exp("exp1-cifar")
        spec = load_spec(args.config or config_path(exp.config), args.profile, exp.pretrain_cls,
                         overrides=settings_dict(args.set))
        device = pick_device(args.device)
        apply_precision(args, device)
        sources = sources_of(args)
        task_a = cifar.load_task_a(spec, sources)
        pcfg = spec.pretrain if args.seed is None else dataclasses.replace(spec.pretrain, seed=args.seed)
        path = cifar.task_a_path(sources, task_a, pcfg)
        ck = pretrain_cifar(task_a, pcfg, path, device, not args.no_progress,
                            base_path=cifar.base_task_a_path(sources, task_a, pcfg), owned=not sources.task_a_ckpt)
        if "base" in ck:
            print(f"CIFAR-5A test accuracy {ck['base']['test_acc']:.2f}% before the finish phase "
                  f"(checkpoint key {ck['base']['key']})")
        print(f"{path}: CIFAR-5A test accuracy {ck['test_acc']:.2f}%")
        return 0


class PretrainPoolCommand:
    HELP = "pretrain Exp 3's pool of CIFAR-5A checkpoints (n_train + 1 held out); resumable, skips finished ones"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        ExperimentCommand(_exp("exp3-unseen-init")).add_arguments(p, pretrain_only=True)
        p.add_argument("--n", type=positive_int, default=None, metavar="N",
                       help="checkpoints in all (default: the profile's pool.n_train + 1)")

    def run(self, args) -> int:
        import torch
        from .pretrain_cifar import pretrain_pool, shard_from_env
        from .suite import cifar
        exp = _exp("exp3-unseen-init")
        spec = load_spec(args.config or config_path(exp.config), args.profile, exp.pretrain_cls,
                         overrides=settings_dict(args.set))
        device = pick_device(args.device)
        rank, world = shard_from_env()
        if device == "cuda" and world > 1:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        apply_precision(args, device)
        sources = sources_of(args)
        task_a = cifar.load_task_a(spec, sources)
        pool_dir, n_train, seed0 = cifar.pool_settings(spec, sources, task_a)
        n = args.n or n_train + 1
        res = pretrain_pool(task_a, spec.pretrain, pool_dir, n, seed0, device, shard=(rank, world),
                            progress=not args.no_progress)
        accs = [r["test_acc"] for r in res]
        print(f"pool {pool_dir}: rank {rank}/{world} holds {len(res)} checkpoint(s) "
              f"({sum(r['status'] == 'trained' for r in res)} trained now, "
              f"{sum(r['status'] == 'resumed' for r in res)} resumed, {sum(r['status'] == 'exists' for r in res)} "
              f"existed); CIFAR-5A test accuracy mean {sum(accs) / max(1, len(accs)):.2f}%")
        return 0


class ReportCommand:
    HELP = "combine the results.json of several runs into the paper's Table 1"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("dirs", nargs="+", metavar="DIR", help="run folders (or results.json files)")
        p.add_argument("--out", default=None, metavar="FILE", help="also write the markdown here")
        p.add_argument("--details", action="store_true", help="print each run's own table too")

    def run(self, args) -> int:
        from .checkpoint import atomic_write_text
        from .results import combined_table, format_table, load_results
        results = []
        for d in args.dirs:
            path = d if d.endswith(".json") else os.path.join(d, "results.json")
            results.append(load_results(path, required_methods=[]))
        titles = [f"{r['experiment']} ({r['profile']})" for r in results]
        text = combined_table(results, titles)
        if args.details:
            text += "\n" + "\n".join(format_table(r) for r in results)
        print(text)
        if args.out:
            atomic_write_text(args.out, text)
        return 0


class InfoCommand:
    HELP = "versions, devices and the meta-update implementation in use"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def run(self, args) -> int:
        import torch

        from . import __version__, ops
        print(f"lrmt_fast {__version__}  torch {torch.__version__}  python {sys.version.split()[0]}")
        print(f"cuda available: {torch.cuda.is_available()}"
              + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
        for k, v in ops.build_info().items():
            print(f"{k}: {v}")
        return 0


class BenchCommand:
    def __init__(self):
        from .bench import report
        self._m = report
        self.HELP = report.HELP

    def add_arguments(self, p):
        self._m.add_arguments(p)

    def run(self, args) -> int:
        return self._m.run(args)


def _exp(name: str):
    from .suite import get
    return get(name)


def commands() -> Dict[str, object]:
    from .suite import EXPERIMENTS
    cmds: Dict[str, object] = {name: ExperimentCommand(exp) for name, exp in EXPERIMENTS.items()}
    cmds.update({"report": ReportCommand(), "pretrain-cifar": PretrainCifarCommand(),
                 "pretrain-cifar-pool": PretrainPoolCommand(), "info": InfoCommand(), "bench": BenchCommand()})
    return cmds


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lrmt", description="Learning to Remember from a Multi-Task Teacher: experiments and tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, cmd in commands().items():
        help_ = getattr(cmd, "HELP", None)
        sp = sub.add_parser(name, help=help_, description=help_)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return p


def _user_errors():
    from .distributed import DistributedError
    from .meta_training import MetaTrainingDiverged
    from .outdir import OutDirBusyError
    from .pipeline import NonFiniteResults
    return (DataNotFoundError, CheckpointError, ConfigError, ResultsError, OutDirBusyError, MetaTrainingDiverged,
            NonFiniteResults, DistributedError)


def _close_progress_bars() -> None:
    """End any progress bar's line, so that a message printed next starts on a line of its own."""
    try:
        from tqdm import tqdm
        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    except Exception:
        pass


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    debug = os.environ.get("LRMT_DEBUG", "") not in ("", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args._run(args) or 0)
    except (KeyboardInterrupt, Terminated) as e:
        _close_progress_bars()
        sig = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        sys.stderr.write(f"lrmt {args.command}: stopped by {sig}; meta-training resumes from its last checkpoint "
                         f"with --resume, finished meta-test runs are kept\n")
        return EXIT_SIGNAL[signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT]
    except _user_errors() as e:
        _close_progress_bars()
        if debug:
            raise
        sys.stderr.write(f"lrmt {args.command}: error: {e}\n")
        return 1
    except Exception as e:  # anything else: still one line, with a way to the traceback
        _close_progress_bars()
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        sys.stderr.write(f"lrmt {args.command}: error: {type(e).__name__}: {msg} "
                         f"(set LRMT_DEBUG=1 for the traceback)\n")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
