"""The ``lrmt`` command (also ``python -m lrmt_fast``).

Subcommands are registered in :data:`COMMANDS` as ``(name, "module")`` or
``(name, "module:attribute")``; the target has ``add_arguments(parser)`` and
``run(args) -> int`` (and optionally ``HELP``). Adding an experiment is one line,
e.g. ``("exp1-cifar", "experiments.exp1_cifar")``. Modules are imported when the
parser is built, so a broken module shows up at once.

Errors a user can cause (missing data, bad options, corrupt checkpoints or
results files) end with one line on stderr and a non-zero exit status, never a
traceback; ``LRMT_DEBUG=1`` shows tracebacks for anything else.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional, Sequence, Tuple

COMMANDS: List[Tuple[str, str]] = [
    ("demo", "experiments.demo"),
    ("exp1-mnist", "experiments.exp1_mnist"),
    ("report", "experiments.report"),
    ("exp1-cifar", "experiments.exp1_cifar"),
    ("exp2-cifar100", "experiments.exp2_cifar100"),
    ("exp3-unseen-init", "experiments.exp3_unseen_init"),
    ("pretrain-cifar", "experiments.exp1_cifar:PretrainCommand"),
    ("pretrain-cifar-pool", "experiments.exp3_unseen_init:PoolCommand"),
    ("info", "lrmt_fast.cli:InfoCommand"),
    ("bench", "benchmarks.report"),
]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


class InfoCommand:
    HELP = "versions, devices and the meta-update implementation in use"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        pass

    @staticmethod
    def run(args) -> int:
        import torch

        import lrmt_fast
        from lrmt_fast import ops

        print(f"lrmt_fast {lrmt_fast.__version__}  torch {torch.__version__}  python {sys.version.split()[0]}")
        print(f"cuda available: {torch.cuda.is_available()}"
              + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
        if hasattr(ops, "build_info"):
            info = ops.build_info()
            if isinstance(info, dict):
                for k, v in info.items():
                    print(f"{k}: {v}")
            else:
                print(info)
        else:
            try:
                impl = ops.resolve_impl(None)
            except ValueError as e:
                impl = f"invalid ({e})"
            print(f"meta-update impl: {impl} (no fused extension information: lrmt_fast.ops.build_info absent)")
        return 0


def _load(target: str):
    mod, _, attr = target.partition(":")
    m = importlib.import_module(mod)
    return getattr(m, attr) if attr else m


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lrmt", description="Learning to Remember from a Multi-Task Teacher: experiments and tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, target in COMMANDS:
        cmd = _load(target)
        help_ = getattr(cmd, "HELP", None)
        sp = sub.add_parser(name, help=help_, description=help_)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return p


def _user_errors():
    from experiments.common import ConfigError
    from lrmt_fast.checkpoint import CheckpointError
    from lrmt_fast.data import DataNotFoundError
    from lrmt_fast.results import ResultsError
    return (DataNotFoundError, CheckpointError, ConfigError, ResultsError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    debug = os.environ.get("LRMT_DEBUG", "") not in ("", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("lrmt: interrupted (rerun with --resume to continue meta-training; finished "
                         "meta-test runs are kept)\n")
        return 130
    except _user_errors() as e:
        if debug:
            raise
        sys.stderr.write(f"lrmt {args.command}: error: {e}\n")
        return 1
    except Exception as e:  # anything else: still one line, with a way to the traceback
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        sys.stderr.write(f"lrmt {args.command}: error: {type(e).__name__}: {msg} "
                         f"(set LRMT_DEBUG=1 for the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
