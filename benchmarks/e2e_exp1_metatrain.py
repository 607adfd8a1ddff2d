"""End to end: wall time of Exp 1 MNIST meta-training (the ``quick`` profile's settings) with
the fused path against the reference path, in the same process on the same episodes.

    python -m benchmarks.e2e_exp1_metatrain --data-root data --episodes 40 [--threads 1]

Both paths meta-train the same number of episodes from the same seed (the same Task A
checkpoint, batches and curriculum; the episodes' lengths can differ only where the two
paths' float32 results differ). It prints the seconds per inner step of each path and, from
them, the estimated wall time of the whole ``quick`` meta-training (``max_total_steps`` of the
profile), and writes ``benchmarks/results/e2e_exp1_metatrain_<device>.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time

import torch


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    from experiments import common
    from experiments.exp1_mnist import CONFIG, load_tasks
    from lrmt_fast.metatrain import MetaTrainConfig, metatrain
    from lrmt_fast.pretrain import PretrainConfig, load_or_pretrain
    from lrmt_fast.student import param_dict

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cache", default=os.path.join("runs", "e2e_cache"), help="Task A checkpoint cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = common.resolve_profile(CONFIG, "quick")
    tasks = load_tasks(cfg, a.data_root, False)
    pcfg = common.dataclass_from(PretrainConfig, cfg["pretrain"], "pretrain")
    model, _ = load_or_pretrain(a.cache, tasks.a, tasks.b.num_classes, pcfg, a.device, True, print)
    w0 = {k: v.detach().clone() for k, v in param_dict(model).items()}
    xb1, yb1 = tasks.b1
    budget = cfg.get("metatrain_budget", {})
    rows = []
    for impl in ("fused", "reference"):
        mcfg = MetaTrainConfig.from_dict({**cfg["metatrain"], "episodes": a.episodes, "impl": impl,
                                          "device": a.device, "checkpoint_every": a.episodes})
        stream = common.FreshHeadStream(w0, tasks.a.train_x, tasks.a.train_y, xb1, yb1, mcfg.batch_a, mcfg.batch_b,
                                        a.device)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            _, hist = metatrain(model, stream, mcfg, out_dir=tmp, progress=False)
            wall = time.perf_counter() - t0
        steps = sum(h["steps"] for h in hist)
        rows.append({"impl": impl, "episodes": len(hist), "steps": steps, "wall_s": round(wall, 2),
                     "s_per_step": wall / max(1, steps)})
        print(f"{impl:9s}: {len(hist)} episodes, {steps} steps, {wall:.1f} s, {1e3 * wall / max(1, steps):.1f} ms/step")
    cap = budget.get("max_total_steps")
    ref = next(r for r in rows if r["impl"] == "reference")
    for r in rows:
        r["speedup_vs_reference"] = ref["s_per_step"] / r["s_per_step"]
        if cap:
            r["quick_metatrain_estimate_s"] = round(cap * r["s_per_step"], 1)
    dev = a.device if a.device != "cpu" else f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    rec = {"case": "exp1_mnist_quick_metatrain", "device": dev, "threads": torch.get_num_threads(),
           "episodes": a.episodes, "quick_max_total_steps": cap, "rows": rows, "commit": _commit(),
           "date": datetime.date.today().isoformat(), "load_avg": os.getloadavg()}
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"e2e_exp1_metatrain_{dev}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)
    for r in rows:
        print(f"{r['impl']:9s}: {1e3 * r['s_per_step']:.1f} ms/step, x{r['speedup_vs_reference']:.2f} vs reference"
              + (f", quick meta-training ({cap} steps) ~ {r['quick_metatrain_estimate_s'] / 60:.1f} min" if cap else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
