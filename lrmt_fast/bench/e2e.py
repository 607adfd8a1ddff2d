"""What the end-to-end meta-training benchmarks share: time Algorithm 1 with each path of the
meta-update op on the same episodes, and write one record.

Used by :mod:`lrmt_fast.bench.e2e_exp1_metatrain` (Exp 1 MNIST) and
:mod:`lrmt_fast.bench.e2e_exp1_cifar_metatrain` (Exp 1 CIFAR).
"""
from __future__ import annotations

import datetime
import os
import platform
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch



def device_label(device: str) -> str:
    """measure.device_name, with the core count on the CPU (a whole meta-training step uses every core)."""
    from .measure import device_name
    return device_name(device) if device.startswith("cuda") else f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def time_impls(model, make_stream: Callable[[], object], metatrain_cfg: Dict, episodes: int, device: str,
               impls: Sequence[str] = ("fused", "reference"), warmup_episodes: int = 1, log=print) -> List[Dict]:
    """Meta-train ``episodes`` episodes from the same start with each impl; one row per impl:
    episodes, inner steps, wall seconds, seconds per inner step and per episode. First, untimed,
    ``warmup_episodes`` of every impl (first-call costs: workspaces, kernels, allocator)."""
    from lrmt_fast.meta_training import MetaTrainConfig, metatrain

    def run(impl, n):
        mcfg = MetaTrainConfig.from_dict({**metatrain_cfg, "episodes": n, "impl": impl, "device": device,
                                          "checkpoint_every": n})
        stream = make_stream()
        with tempfile.TemporaryDirectory() as tmp:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, hist = metatrain(model, stream, mcfg, out_dir=tmp, progress=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return hist, time.perf_counter() - t0

    if warmup_episodes > 0:
        for impl in impls:
            run(impl, warmup_episodes)
    rows = []
    for impl in impls:
        hist, wall = run(impl, episodes)
        steps = sum(h["steps"] for h in hist)
        rows.append({"impl": impl, "episodes": len(hist), "steps": steps, "wall_s": round(wall, 2),
                     "s_per_step": wall / max(1, steps), "s_per_episode": wall / max(1, len(hist))})
        log(f"{impl:9s}: {len(hist)} episodes, {steps} steps, {wall:.1f} s, {1e3 * wall / max(1, steps):.1f} ms/step, "
            f"{wall / max(1, len(hist)):.2f} s/episode")
    ref = next((r for r in rows if r["impl"] == "reference"), None)
    for r in rows:
        r["speedup_vs_reference"] = (ref["s_per_step"] / r["s_per_step"]) if ref else None
    return rows


def write_record(case: str, stem: str, device: str, rows: List[Dict], out: Optional[str], log=print,
                 update_records: bool = False, **extra) -> str:
    """Write the record (atomically) to ``out``, by default ``runs/bench/<stem>_<device>.json``;
    with ``update_records`` also to the committed records, ``benchmarks/results/``."""
    from lrmt_fast.checkpoint import atomic_write_json

    from .measure import DEFAULT_OUT, git_commit, records_dir
    dev = device_label(device)
    rec = {"case": case, "device": dev, "threads": torch.get_num_threads(), "rows": rows, "commit": git_commit(),
           "date": datetime.date.today().isoformat(), "load_avg": os.getloadavg(), **extra}
    name = f"{stem}_{dev}.json"
    out = out or os.path.join(DEFAULT_OUT, name)
    paths = [out] + ([os.path.join(records_dir(), name)] if update_records else [])
    for path in dict.fromkeys(os.path.abspath(x) for x in paths):
        atomic_write_json(path, rec, what="benchmark record", indent=1)
        log(f"wrote {path}")
    return out
