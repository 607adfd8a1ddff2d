"""Results of an experiment: ``results.json`` (aggregate over seeds), ``table.md``
(the paper's Table 1 layout) and ``curves.png`` (the paper's Figure 4). The format
is documented in docs/results.md; everything here is generic over experiments
(MNIST, CIFAR, ...), so later experiments reuse it as it is.

results.json::

    {"experiment": "exp1-mnist", "profile": "quick", "seeds": [0, 1, 2], "config": {...},
     "methods": {NAME: {"steps": [0, 50, ..., 500],
                        "task_a_readout":  {"mean": [...], "sem": [...]},
                        "task_b_readout":  {"mean": [...], "sem": [...]},
                        "task_a_original": {"mean": [...], "sem": [...]},
                        "task_b_head":     {"mean": [...], "sem": [...]},
                        "joint_readout":   {"mean": x, "sem": y},
                        "runs": [{"seed": s, "task_a_readout": [...], ...}, ...],
                        "gate_trace": {...}}},   # only "ours" with option trace
     ...}

Accuracies are in percent; ``sem`` is the standard error of the mean over seeds
(sample standard deviation / sqrt(n); 0 for a single seed). ``gate_trace`` (the mean over
seeds of :class:`lrmt_fast.gate_trace.GateTrace`) comes with a ``gate_trace.png`` beside
curves.png.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

from .checkpoint import atomic_save_figure, atomic_write_text
from .gate_trace import mean_trace, plot_gate_traces

CURVE_KEYS = ("task_a_readout", "task_b_readout", "task_a_original")
OPTIONAL_CURVE_KEYS = ("task_b_head",)
# the paper's Table 1 rows, in order, with their display names
PAPER_ROWS = [("freeze", "Freeze"), ("sgd", "SGD"), ("sgd_x0.1", "SGD × 0.1"), ("lwf", "LwF"), ("ewc", "EWC"),
              ("ours", "ours"), ("teacher", "Teacher")]
REQUIRED_METHODS = [m for m, _ in PAPER_ROWS]
DISPLAY = dict(PAPER_ROWS, **{"sgd_x0.5": "SGD × 0.5"})
ROW_ORDER = ["freeze", "sgd", "sgd_x0.1", "sgd_x0.5", "lwf", "ewc", "ours", "teacher"]


class ResultsError(ValueError):
    """A results.json does not have the documented shape."""


# --------------------------------------------------------------------------- aggregation
def mean_sem(values: Sequence[float]):
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(vals) / n
    if n == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in vals) / (n - 1)
    return m, math.sqrt(var / n)


def _r(x, nd=4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def aggregate(runs: Dict[str, List[Dict]], experiment: str, profile: str, seeds: Sequence[int],
              config: Dict, extra: Optional[Dict] = None) -> Dict:
    """{method: [run per seed]} (as from :func:`lrmt_fast.meta_test.run_meta_test`) -> results dict."""
    methods = {}
    for name, rs in runs.items():
        if not rs:
            continue
        steps = list(rs[0]["steps"])
        for r in rs:
            if list(r["steps"]) != steps:
                raise ResultsError(f"method {name}: runs disagree on the readout steps")
        entry: Dict = {"steps": steps}
        for key in CURVE_KEYS + OPTIONAL_CURVE_KEYS:
            if not all(key in r for r in rs):
                continue
            cols = list(zip(*[r[key] for r in rs]))
            ms = [mean_sem(c) for c in cols]
            entry[key] = {"mean": [_r(m) for m, _ in ms], "sem": [_r(s) for _, s in ms]}
        m, s = mean_sem([r["joint_readout"] for r in rs])
        entry["joint_readout"] = {"mean": _r(m), "sem": _r(s)}
        entry["runs"] = [{"seed": r.get("seed"), "seconds": r.get("seconds"),
                          **{k: [_r(v) for v in r[k]] for k in CURVE_KEYS + OPTIONAL_CURVE_KEYS if k in r},
                          "joint_readout": _r(r["joint_readout"])} for r in rs]
        if all("gate_trace" in r for r in rs):      # "ours" with option trace (lrmt_fast.gate_trace)
            entry["gate_trace"] = mean_trace([r["gate_trace"] for r in rs])
        methods[name] = entry
    out = {"experiment": experiment, "profile": profile, "seeds": [int(s) for s in seeds], "config": config,
           "methods": methods}
    if extra:
        out.update(extra)
    return out


# --------------------------------------------------------------------------- schema
def validate(res: Dict, required_methods: Iterable[str] = REQUIRED_METHODS) -> Dict:
    """Check the documented shape; raise :class:`ResultsError` naming the first problem."""
    def need(cond, msg):
        if not cond:
            raise ResultsError(msg)

    need(isinstance(res, dict), "results must be a JSON object")
    for k, t in (("experiment", str), ("profile", str), ("seeds", list), ("config", dict), ("methods", dict)):
        need(isinstance(res.get(k), t), f"results: '{k}' missing or not a {t.__name__}")
    n = len(res["seeds"])
    need(n >= 1, "results: no seeds")
    for m in required_methods:
        need(m in res["methods"], f"results: method '{m}' missing")
    for name, e in res["methods"].items():
        steps = e.get("steps")
        need(isinstance(steps, list) and steps and all(isinstance(s, int) for s in steps),
             f"{name}: 'steps' must be a non-empty list of ints")
        for key in CURVE_KEYS:
            c = e.get(key)
            need(isinstance(c, dict) and isinstance(c.get("mean"), list) and isinstance(c.get("sem"), list),
                 f"{name}: '{key}' must be {{mean: [...], sem: [...]}}")
            need(len(c["mean"]) == len(steps) == len(c["sem"]), f"{name}: '{key}' length differs from 'steps'")
            need(all(v is None or 0.0 <= v <= 100.0 for v in c["mean"]), f"{name}: '{key}' not in percent")
        j = e.get("joint_readout")
        need(isinstance(j, dict) and isinstance(j.get("mean"), (int, float)) and isinstance(j.get("sem"), (int, float)),
             f"{name}: 'joint_readout' must be {{mean: x, sem: y}}")
    return res


def load_results(path: str, required_methods: Iterable[str] = REQUIRED_METHODS) -> Dict:
    try:
        with open(path) as f:
            res = json.load(f)
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: not a readable JSON file ({e})") from None
    try:
        return validate(res, required_methods)
    except ResultsError as e:
        raise ResultsError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- tables
def method_order(names: Iterable[str]) -> List[str]:
    names = list(names)
    first = [m for m in ROW_ORDER if m in names]
    return first + [m for m in names if m not in first]


def display_name(m: str) -> str:
    return DISPLAY.get(m, m)


def fmt(mean, sem, nd=1) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{nd}f} ± {sem:.{nd}f}" if sem else f"{mean:.{nd}f}"


def _at_step(entry: Dict, key: str, step: Optional[int] = None):
    steps = entry["steps"]
    i = len(steps) - 1 if step is None else steps.index(step)
    c = entry[key]
    return c["mean"][i], c["sem"][i]


def format_table(res: Dict) -> str:
    """Markdown: the paper's Table 1 rows (joint readout at the last step), plus the Task A and
    Task B readouts and the original Task A head at the last step, and the change since step 0."""
    meths = res["methods"]
    last = max(e["steps"][-1] for e in meths.values())
    lines = [f"**{res['experiment']}** (profile `{res['profile']}`, {len(res['seeds'])} seed(s), mean ± s.e.m., "
             f"accuracy in %, after {last} update steps)", "",
             "| method | joint readout (Table 1) | Task A readout | Task B readout | Task A original head | "
             "Task A readout change from step 0 |",
             "|---|---|---|---|---|---|"]
    bad = res.get("nonfinite_runs") or {}
    for m in method_order(meths):
        e = meths[m]
        name = display_name(m) + (f" **(non-finite: seeds {bad[m]})**" if m in bad else "")
        a, asem = _at_step(e, "task_a_readout")
        b, bsem = _at_step(e, "task_b_readout")
        o, osem = _at_step(e, "task_a_original")
        a0 = e["task_a_readout"]["mean"][0]
        j = e["joint_readout"]
        lines.append(f"| {name} | {fmt(j['mean'], j['sem'])} | {fmt(a, asem, 2)} | {fmt(b, bsem, 2)} | "
                     f"{fmt(o, osem, 2)} | {a - a0:+.2f} |")
    return "\n".join(lines) + "\n"


def combined_table(results: Sequence[Dict], titles: Optional[Sequence[str]] = None) -> str:
    """The paper's Table 1 over several experiments: one column per results dict (joint readout
    at the last step, mean ± s.e.m.), one row per method."""
    titles = list(titles) if titles else [r["experiment"] for r in results]
    names: List[str] = []
    for r in results:
        names += [m for m in r["methods"] if m not in names]
    lines = ["| | " + " | ".join(titles) + " |", "|---|" + "---|" * len(results)]
    for m in method_order(names):
        cells = []
        for r in results:
            j = r["methods"].get(m, {}).get("joint_readout")
            bad = (r.get("nonfinite_runs") or {}).get(m)
            cells.append((fmt(j["mean"], j["sem"]) if j else "") + (f" (non-finite: seeds {bad})" if bad else ""))
        lines.append(f"| {display_name(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots
_STYLE = {"freeze": ("--", "k"), "teacher": ("-", "tab:green"), "sgd": ("-", "tab:blue"),
          "sgd_x0.1": ("-", "tab:cyan"), "sgd_x0.5": ("-.", "tab:blue"), "lwf": ("-", "tab:purple"),
          "ewc": ("-", "tab:orange"), "ours": ("-", "tab:red")}
# colours for methods beyond the paper's (e.g. ewc_100, diagnostic variants of ours), dotted
_EXTRA_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:gray", "gold", "navy", "teal", "magenta")


def _styles(names: Sequence[str]) -> Dict[str, tuple]:
    """(line style, colour) per method: the paper's fixed ones, the others distinct from them."""
    extra = [m for m in names if m not in _STYLE]
    out = {m: (":", _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)]) for i, m in enumerate(extra)}
    out.update({m: _STYLE[m] for m in names if m in _STYLE})
    return out


def plot_curves(res: Dict, path: str, methods: Optional[Sequence[str]] = None) -> str:
    """The paper's Figure 4: Task A and Task B readout vs update steps, one line per method with
    s.e.m. error bars; top row absolute accuracy, bottom row the difference to Freeze (as the
    paper plots it). Written with matplotlib's Agg backend."""
    import matplotlib       # only when a figure is drawn: a second of start-up for every command
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    meths = res["methods"]
    names = method_order(methods or meths)
    has_freeze = "freeze" in meths
    rows = 2 if has_freeze else 1
    fig, axes = plt.subplots(rows, 2, figsize=(11, 4.2 * rows), squeeze=False)
    styles = _styles(names)
    for col, (key, title) in enumerate((("task_a_readout", "Task A"), ("task_b_readout", "Task B"))):
        for m in names:
            e = meths[m]
            ls, color = styles[m]
            mean, sem = e[key]["mean"], e[key]["sem"]
            kw = dict(ls=ls, color=color, label=display_name(m), capsize=2, lw=1.5, marker=".", ms=4)
            axes[0][col].errorbar(e["steps"], mean, yerr=sem, **kw)
            if has_freeze:
                f = meths["freeze"][key]["mean"]
                fi = dict(zip(meths["freeze"]["steps"], f))
                d = [v - fi.get(s, f[-1]) for s, v in zip(e["steps"], mean)]
                axes[1][col].errorbar(e["steps"], d, yerr=sem, **kw)
        axes[0][col].set_title(f"{title} readout accuracy")
        axes[0][col].set_ylabel("accuracy (%)")
        if has_freeze:
            f0 = meths["freeze"][key]["mean"][0]
            axes[1][col].set_title(f"{title}: difference to Freeze ({f0:.2f}%)")
            axes[1][col].set_ylabel("accuracy - Freeze (%)")
            axes[1][col].axhline(0, color="grey", lw=0.5)
        for r in range(rows):
            axes[r][col].set_xlabel("Update steps")
            axes[r][col].grid(alpha=0.3)
    axes[0][1].legend(fontsize=8, loc="best")
    fig.suptitle(f"{res['experiment']} ({res['profile']}, {len(res['seeds'])} seed(s); error bars: s.e.m.)")
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------- writing
def write_all(res: Dict, out_dir: str) -> Dict[str, str]:
    """results.json, table.md and curves.png in ``out_dir`` (atomic writes), and gate_trace.png
    when a method carries a gate trace (named in ``res["figures"]``); returns their paths."""
    validate(res, required_methods=[])
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "table": os.path.join(out_dir, "table.md"),
             "curves": os.path.join(out_dir, "curves.png")}
    traces = {m: e["gate_trace"] for m, e in res["methods"].items() if "gate_trace" in e}
    if traces:
        paths["gate_trace"] = os.path.join(out_dir, "gate_trace.png")
        res.setdefault("figures", {})["gate_trace"] = os.path.basename(paths["gate_trace"])
    atomic_write_text(paths["json"], json.dumps(res, indent=1) + "\n", what="results file")
    atomic_write_text(paths["table"], format_table(res), what="table")
    plot_curves(res, paths["curves"])
    if traces:
        horizon = ((res.get("config") or {}).get("metatrain") or {}).get("max_steps")
        plot_gate_traces(traces, paths["gate_trace"], horizon=horizon if isinstance(horizon, int) else None)
    return paths
