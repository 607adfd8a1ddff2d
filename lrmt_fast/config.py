"""Experiment configs: profile files, and their validation against the config dataclasses.

A config file (``lrmt_fast/configs/*.json``, or a user's ``--config FILE``) has ``defaults``
(the paper's settings) and named ``profiles`` that override some of them. Nested objects merge,
``methods`` is replaced as a whole; a profile with ``"extends": NAME`` starts from profile
NAME; a file whose ``defaults`` has ``"base": "FILE"`` starts from that file's defaults (the
CIFAR experiments share theirs this way). Keys starting with ``_`` are comments.

:func:`load_spec` resolves a profile and validates it *as a whole* before any work starts:
every key at every level must be known, every value of the type and range its dataclass
declares; an error names the file, the profile, the key path and what was expected, e.g.
``exp1_mnist.json, profile 'bad': metatrain.lr: expected a number, got "0.05" (a string)``.

Validation is derived from the dataclasses themselves (:func:`build`): field types from their
annotations (int, float, bool, str, Optional, Tuple/List, Dict, nested dataclasses) and
ranges from two optional class attributes, ``POSITIVE`` and ``NONNEGATIVE`` (field names), plus
whatever the dataclass's own ``__post_init__`` checks.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .baselines import check_method
from .meta_test import MetaTestConfig
from .meta_training import MetaTrainConfig
from .linear_readout import ReadoutConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A config file, profile or option is missing or malformed (one line for the user)."""


# --------------------------------------------------------------------------- typed values
def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if t is int:
        return "an integer"
    if t is float:
        return "a number"
    if t is bool:
        return "true or false"
    if t is str:
        return "a string"
    if dataclasses.is_dataclass(t):
        return "an object"
    if origin in (dict, Dict) or t in (dict, Dict):
        return "an object"
    if origin in (list, List, tuple, Tuple):
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    return getattr(t, "__name__", str(t))


def _describe(v) -> str:
    kind = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)
    return f"{json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else kind} ({kind})" \
        if not isinstance(v, (list, dict)) else kind


def check_value(t, v, path: str):
    """``v`` checked against type ``t`` (raises ConfigError naming ``path``); returns the value to
    use (lists become tuples where the type says Tuple, nested dataclasses are built)."""
    origin = typing.get_origin(t)
    if t is typing.Any:
        return v
    if origin is typing.Union:
        args = typing.get_args(t)
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(a, v, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: expected {_type_name(t)}, got {_describe(v)}")
    if dataclasses.is_dataclass(t):
        if isinstance(v, t):
            return v
        return build(t, v, path)
    bad = ConfigError(f"{path}: expected {_type_name(t)}, got {_describe(v)}")
    if t is bool:
        if not isinstance(v, bool):
            raise bad
        return v
    if t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad
        return v
    if t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad
        if not math.isfinite(v):
            raise ConfigError(f"{path}: expected a finite number, got {v}")
        return v        # as given: an int stays an int (cache keys hash the config's JSON)
    if t is str:
        if not isinstance(v, str):
            raise bad
        return v
    if origin in (dict, Dict) or t in (dict, Dict):
        if not isinstance(v, dict):
            raise bad
        return v
    if origin in (list, List, tuple, Tuple):
        if not isinstance(v, (list, tuple)):
            raise bad
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        items = [check_value(args[0], x, f"{path}[{i}]") for i, x in enumerate(v)] if args else list(v)
        return tuple(items) if origin in (tuple, Tuple) else items
    return v


def build(cls, d: Any, path: str = "", skip: Tuple[str, ...] = ()):
    """An instance of dataclass ``cls`` from the dict ``d``: unknown keys, wrong types and values
    out of range are a :class:`ConfigError` naming ``path.key``. ``skip``: fields that a config
    may not set (they come from the command line)."""
    where = path or cls.__name__
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {_describe(d)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in skip}
    unknown = sorted(k for k in d if k not in fields and not str(k).startswith("_"))
    if unknown:
        raise ConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(k) for k in unknown)}; known: {', '.join(sorted(fields))}")
    kw = {}
    for k, v in d.items():
        if str(k).startswith("_"):
            continue
        p = f"{path}.{k}" if path else k
        val = check_value(hints[k], v, p)
        if k in getattr(cls, "POSITIVE", ()) and isinstance(val, (int, float)) and not val > 0:
            raise ConfigError(f"{p}: must be > 0, got {v}")
        if k in getattr(cls, "NONNEGATIVE", ()) and isinstance(val, (int, float)) and not val >= 0:
            raise ConfigError(f"{p}: must be >= 0, got {v}")
        kw[k] = val
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None


# --------------------------------------------------------------------------- the spec
@dataclass
class DataConfig:
    """Which data an experiment reads: MNIST-style tasks by name, or the CIFAR splits."""

    task_a: str = "mnist"
    task_b: str = "fashion"
    source: str = "torchvision"          # torchvision | subset (the demo's shipped subset)
    split_seed: int = 0                  # the even D_B1 / D_B2 split (and CIFAR's subsets)
    max_train: Optional[int] = None      # a fixed subset of each training set (smoke / quick)
    max_test: Optional[int] = None
    # validation (lrmt_fast.data.tasks.validation_tasks): meta-train on part of D_B1, meta-test on a
    # held-out part of it, read Task A out on held-out Task A training images: no D_B2, no test set
    validation: bool = False
    val_fraction: float = 0.2

    NONNEGATIVE = ("split_seed", "max_train", "max_test")

    def __post_init__(self):
        if self.source not in ("torchvision", "subset"):
            raise ValueError(f"source must be 'torchvision' or 'subset', got {self.source!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")


@dataclass
class BudgetConfig:
    """Stop meta-training at the first chunk of ``chunk_episodes`` episodes whose steps reach
    ``max_total_steps`` (deterministic: it depends on episode lengths, never on speed)."""

    max_total_steps: Optional[int] = None
    chunk_episodes: int = 10

    POSITIVE = ("max_total_steps", "chunk_episodes")


@dataclass
class PoolConfig:
    """Exp 3's pool of Task A checkpoints: ``n_train`` for meta-training, one more held out."""

    n_train: int = 100
    seed0: int = 0

    POSITIVE = ("n_train",)
    NONNEGATIVE = ("seed0",)


@dataclass
class ExperimentSpec:
    """A resolved, validated profile: everything one experiment run depends on."""

    experiment: str
    profile: str
    data: DataConfig
    pretrain: Any                        # lrmt_fast.pretrain.PretrainConfig or CifarPretrainConfig
    metatrain: MetaTrainConfig
    metatrain_budget: BudgetConfig
    metatest: MetaTestConfig
    readout: ReadoutConfig
    methods: Dict[str, Dict]
    seeds: int = 5
    pool: Optional[PoolConfig] = None
    raw: Dict = field(default_factory=dict, repr=False)   # the resolved profile as read

    def to_dict(self) -> Dict:
        """The profile as it was resolved (for config.json / results.json)."""
        return copy.deepcopy(self.raw)


SECTIONS = ("data", "pretrain", "metatrain", "metatrain_budget", "metatest", "readout", "methods", "seeds", "pool")


def _section(d: Dict, name: str):
    v = d.get(name)
    return {} if v is None else v


def spec_from_dict(d: Dict, pretrain_cls, where: str = "") -> ExperimentSpec:
    """Validate a resolved profile ``d`` and build its :class:`ExperimentSpec`."""
    pre = f"{where}: " if where else ""
    try:
        unknown = sorted(k for k in d if k not in SECTIONS and k not in ("experiment", "profile", "overrides")
                         and not k.startswith("_"))
        if unknown:
            raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(SECTIONS)}")
        methods = d.get("methods")
        if not isinstance(methods, dict) or not methods:
            raise ConfigError("methods: expected a non-empty object {name: {\"kind\": ...}}")
        for name, m in methods.items():
            try:
                check_method(m)
            except ValueError as e:
                raise ConfigError(f"methods.{name}: {e}") from None
        seeds = check_value(int, d.get("seeds", 5), "seeds")
        if seeds < 1:
            raise ConfigError(f"seeds: must be >= 1, got {seeds}")
        mt = d.get("metatrain") if d.get("metatrain") is not None else {}
        return ExperimentSpec(
            experiment=str(d.get("experiment", "")), profile=str(d.get("profile", "")),
            data=build(DataConfig, _section(d, "data"), "data"),
            pretrain=build(pretrain_cls, _section(d, "pretrain"), "pretrain"),
            metatrain=build(MetaTrainConfig, mt, "metatrain", skip=("impl", "device")),
            metatrain_budget=build(BudgetConfig, _section(d, "metatrain_budget"), "metatrain_budget"),
            metatest=build(MetaTestConfig, _section(d, "metatest"), "metatest"),
            readout=build(ReadoutConfig, _section(d, "readout"), "readout"),
            methods=copy.deepcopy(methods), seeds=seeds,
            pool=None if d.get("pool") is None else build(PoolConfig, d["pool"], "pool"),
            raw=copy.deepcopy(d))
    except ConfigError as e:
        raise ConfigError(f"{pre}{e}") from None


# --------------------------------------------------------------------------- profile files
def deep_merge(base: Dict, over: Dict, replace: Tuple[str, ...] = ("methods",)) -> Dict:
    """``over`` merged into a copy of ``base``; nested dicts merge, lists and the keys in ``replace``
    (a profile's ``methods``) replace."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k.startswith("_"):
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in replace:
            out[k] = deep_merge(out[k], v, replace)
        else:
            out[k] = copy.deepcopy(v)
    return out


def config_path(name_or_path: str) -> str:
    """A config file given by path, or by the name of one shipped in ``lrmt_fast/configs``."""
    if os.path.exists(name_or_path) or os.sep in name_or_path:
        return name_or_path
    return os.path.join(CONFIG_DIR, name_or_path)


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
    if not isinstance(cfg.get("defaults", {}), dict):
        raise ConfigError(f"config file {path}: 'defaults' must be an object")
    return cfg


def _defaults(cfg: Dict, path: str, seen: Tuple[str, ...] = ()) -> Dict:
    """The file's ``defaults``, after those of its ``base`` file (found beside it, else among the
    shipped configs, so that a copy of a shipped config keeps working elsewhere)."""
    d = dict(cfg.get("defaults", {}))
    base = d.pop("base", None)
    if base is None:
        return d
    bpath = os.path.join(os.path.dirname(os.path.abspath(path)), base)
    if not os.path.exists(bpath):
        bpath = os.path.join(CONFIG_DIR, base)
    if not os.path.exists(bpath):
        raise ConfigError(f"config file {path}: its base {base!r} is neither beside it nor in {CONFIG_DIR}")
    if os.path.abspath(bpath) in seen:
        raise ConfigError(f"config file {path}: 'base' files refer to each other in a cycle")
    try:
        with open(bpath) as f:
            bcfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config file {bpath} (the base of {path}) is not valid JSON ({e})") from None
    return deep_merge(_defaults(bcfg, bpath, seen + (os.path.abspath(path),)), d)


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
    """The file's ``defaults`` (after its ``base``) merged with the named profile, after the
    profiles it ``extends``."""
    cfg = read_config_file(path)
    out = _defaults(cfg, path)
    for body in _profile_chain(cfg, profile, path):
        out = deep_merge(out, body)
    out["profile"] = profile
    out.setdefault("experiment", cfg.get("experiment", os.path.splitext(os.path.basename(path))[0]))
    return out


def load_spec(path: str, profile: str, pretrain_cls, overrides: Optional[Dict] = None) -> ExperimentSpec:
    """Resolve ``profile`` of the config file ``path`` (plus ``overrides``, merged last) and
    validate it whole (:func:`spec_from_dict`)."""
    d = resolve_profile(path, profile)
    if overrides:
        d = deep_merge(d, overrides, replace=())      # --set methods.ours.trace=true changes one option
        d["overrides"] = copy.deepcopy(overrides)
    return spec_from_dict(d, pretrain_cls, where=f"{os.path.basename(path)}, profile {profile!r}"
                          + (" with --set" if overrides else ""))
