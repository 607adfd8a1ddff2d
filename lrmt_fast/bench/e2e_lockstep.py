"""End to end: meta-training's inner steps with K episodes in lockstep (``episodes_per_step``,
K students, teachers and LSTM states, one Adam step on their mean meta-loss, like K ranks), for
K = 1, 4, 16 and the fused and reference meta-update op, in one run on Exp 1 MNIST.

    lrmt bench --e2e [--data-root data] [--threads 1] [--e2e-k 1,4,16] [--out runs/bench]
    python -m lrmt_fast.bench.e2e_lockstep --data-root data --threads 1,2

Every configuration (op x K x threads) runs :func:`lrmt_fast.meta_training.run_episode` with
the fast inner step on episodes (blocks) of ``--steps`` x max(K) / K lockstep steps, i.e. of
about equal length (the curriculum threshold disabled, T-BPTT windows of ``--bptt``), in
alternating blocks with the GEMM of the peak (as :mod:`lrmt_fast.bench.inner_step`), until each
has ``--min-time`` seconds and 3 blocks. Per configuration:

- ``ms_per_lockstep_step``: one step of all K episodes and the Adam step (median over blocks);
- ``ms_per_inner_step``: that over K; ``inner_steps_per_s``: K over it, the inner steps per
  second summed over the K episodes; ``throughput_vs_k1``: that against K = 1 (same op, threads);
- ``fraction_of_limit``: K x the step's FLOP / byte bound (:func:`inner_step.step_cost`) over
  the lockstep step's time, against the best-of-5 GEMM at the start and (``_interleaved``) the
  GEMM timed in the same blocks;
- ``peak_mem_bytes``: the peak of the bytes live in torch's allocator during one episode of
  min(``--steps``, 2 windows) lockstep steps (a whole window's graph), above its start
  (:func:`lrmt_fast.bench.measure.peak_memory_of`).

Without ``--data-root`` the images are random MNIST-shaped ones and Task A the seeded untrained
LeNet: the shapes, hence the time per step, are the real ones. Writes
``e2e_lockstep_<device>.json`` and ``.txt`` under ``--out`` (default ``runs/bench``), each once
at the end, atomically; ``--update-records`` also writes the committed copy under
``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Dict, List

import torch

from .inner_step import ENV_KEYS, StepRunner, _int_list, build_experiment, step_cost, time_interleaved
from ..cli import positive_float, positive_int
from .measure import DEFAULT_OUT, GemmProbe, copy_bandwidth, cpu_model, device_name, gemm_peak, git_commit, \
    load_average, now, peak_memory_of, write_records

OPS = ("fused", "reference")


def add_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The options (``prefix`` "e2e-" inside ``lrmt bench``, where --threads, --out etc. are shared)."""
    if not prefix:
        p.add_argument("--data-root", default=None,
                       help="folder with MNIST and FashionMNIST (torchvision layout); default: synthetic images")
        p.add_argument("--cache", default=os.path.join("runs", "e2e_cache"),
                       help="folder of the Task A checkpoint (trained there first if absent)")
        p.add_argument("--threads", type=_int_list, default=[1], help="thread counts, e.g. 1,2 (default 1)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default runs/bench)")
        p.add_argument("--update-records", action="store_true",
                       help="also write the committed copy under benchmarks/results/")
        p.add_argument("--min-time", type=positive_float, default=10.0,
                       help="seconds of timed steps per configuration (default 10)")
    p.add_argument(f"--{prefix}ops", dest="ops", default=",".join(OPS),
                   help="meta-update op implementations (default fused,reference)")
    p.add_argument(f"--{prefix}k", dest="e2e_k", type=_int_list, default=[1, 4, 16],
                   help="episodes in lockstep, e.g. 1,4,16 (default)")
    p.add_argument(f"--{prefix}bptt", dest="e2e_bptt", type=positive_int, default=5,
                   help="T-BPTT window (default 5, the profiles' start)")
    p.add_argument(f"--{prefix}steps", dest="e2e_steps", type=positive_int, default=None,
                   help="lockstep steps per timed block at the largest K (default 2 windows); K takes "
                        "that x max(K) / K")
    p.add_argument(f"--{prefix}profile", dest="e2e_profile", default="quick",
                   help="the exp1-mnist profile whose meta-training settings are used (default quick)")


def measure(data_root, cache, profile: str, device: str, threads: List[int], ops: List[str], ks: List[int],
            bptt: int, steps: int, min_time: float, log=print) -> Dict:
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"unknown op implementation(s) {bad}; expected {list(OPS)}")
    spec, model, stream, data = build_experiment(data_root, cache, profile, device, log)
    mt = spec.metatrain
    limits: Dict[str, float] = {}
    for t in threads:
        torch.set_num_threads(t)
        limits[f"gemm_peak_flops_{t}t"] = gemm_peak(device)
    limits["mem_bw_bytes_per_s"] = copy_bandwidth(device)
    log(f"[{device}] fp32 GEMM peak " + ", ".join(f"{limits[f'gemm_peak_flops_{t}t'] / 1e9:.1f} GFLOP/s at {t}t"
                                                 for t in threads)
        + f"; copy bandwidth {limits['mem_bw_bytes_per_s'] / 1e9:.1f} GB/s; load {load_average()}; {data}")
    # blocks of about equal length: K episodes x steps_k lockstep steps with steps_k = steps * max(K) / K
    kmax = max(ks)
    runners = [StepRunner(model, stream, mt, "fast", t, max(bptt, steps * kmax // k), bptt, device, k_eps=k,
                          op_impl=op, name=f"{op}/K={k}/{t}t")
               for t in threads for op in ops for k in ks]
    probes = {t: GemmProbe(device) for t in threads}
    load_start = load_average()
    ptimes = time_interleaved(runners, probes, min_time, log=log, warmup_steps=min(steps, bptt + 1))
    peak_same = {t: probes[t].flops_per_s(ptimes[t]) for t in threads}
    cost = step_cost(model, runners[0].meta, mt.batch_a, mt.batch_b, bptt)
    recs = []
    for r in runners:
        times = sorted(r.block_s)
        med = times[len(times) // 2]
        gc.collect()
        mem = peak_memory_of(lambda: r.run_block(timed=False, steps=min(r.steps, 2 * bptt)), device)

        def frac(peak):
            bound = max(r.k_eps * cost["flops_per_step"] / peak,
                        r.k_eps * cost["bytes_per_step"] / limits["mem_bw_bytes_per_s"])
            return bound / med

        recs.append({
            "op": r.op_impl, "episodes_per_step": r.k_eps, "threads": r.threads,
            "ms_per_lockstep_step": 1e3 * med, "ms_per_lockstep_step_min": 1e3 * times[0],
            "ms_per_inner_step": 1e3 * med / r.k_eps, "inner_steps_per_s": r.k_eps / med,
            "blocks": len(times), "lockstep_steps_timed": r.steps_done, "lockstep_steps_per_block": r.steps,
            "fraction_of_limit": frac(limits[f"gemm_peak_flops_{r.threads}t"]),
            "fraction_of_limit_interleaved": frac(peak_same[r.threads]),
            "gemm_peak_flops": limits[f"gemm_peak_flops_{r.threads}t"],
            "gemm_peak_flops_interleaved": peak_same[r.threads],
            "peak_mem_bytes": mem.get("peak_mem_bytes"), "peak_mem_method": mem.get("peak_mem_method"),
            "stage_ms_per_lockstep_step": {k: 1e3 * v / max(r.steps_done, 1) for k, v in r.timer.sums.items()},
        })
        del r.meta, r.opt
    base = {(x["op"], x["threads"]): x for x in recs if x["episodes_per_step"] == min(ks)}
    one = {(x["op"], x["episodes_per_step"]): x for x in recs if x["threads"] == min(threads)}
    for x in recs:
        b = base[(x["op"], x["threads"])]
        x[f"throughput_vs_k{b['episodes_per_step']}"] = x["inner_steps_per_s"] / b["inner_steps_per_s"]
        x["throughput_vs_min_threads"] = x["inner_steps_per_s"] / one[(x["op"], x["episodes_per_step"])][
            "inner_steps_per_s"]
    ref = {(x["episodes_per_step"], x["threads"]): x for x in recs if x["op"] == "reference"}
    for x in recs:
        r0 = ref.get((x["episodes_per_step"], x["threads"]))
        x["speedup_vs_reference_op"] = r0["ms_per_lockstep_step"] / x["ms_per_lockstep_step"] if r0 else None
    return {"case": "exp1_mnist_metatrain_lockstep", "profile": profile, "data": data,
            "device": device_name(device), "cpu_model": cpu_model() if device == "cpu" else None,
            "torch_version": torch.__version__, "commit": git_commit(), "date": now(),
            "load_avg_start": load_start, "load_avg_end": load_average(),
            "env": {k: os.environ.get(k) for k in ENV_KEYS}, "batch_a": mt.batch_a,
            "batch_b": mt.batch_b, "bptt": bptt, "lockstep_steps_per_block_at_kmax": steps,
            "peak_mem_steps": min(steps, 2 * bptt), "limits": limits,
            "flops_per_inner_step": cost["flops_per_step"], "bytes_per_inner_step": cost["bytes_per_step"],
            "records": recs}


def table(out: Dict) -> str:
    recs = out["records"]
    kmin = min(x["episodes_per_step"] for x in recs)
    head = (f"{'op':10s} {'K':>3s} {'thr':>3s} {'ms/lockstep':>12s} {'ms/inner':>9s} {'inner/s':>8s} "
            f"{'vs K=' + str(kmin):>8s} {'vs ref':>7s} {'frac.limit':>10s} {'frac.same':>9s} {'peak MB':>9s}")
    lines = [head, "-" * len(head)]
    for x in recs:
        mb = x["peak_mem_bytes"] / 2 ** 20 if x.get("peak_mem_bytes") is not None else float("nan")
        sp = x.get("speedup_vs_reference_op")
        lines.append(f"{x['op']:10s} {x['episodes_per_step']:3d} {x['threads']:3d} {x['ms_per_lockstep_step']:12.1f} "
                     f"{x['ms_per_inner_step']:9.1f} {x['inner_steps_per_s']:8.2f} "
                     f"{x[f'throughput_vs_k{kmin}']:8.2f} {(f'{sp:.2f}' if sp else '-'):>7s} "
                     f"{100 * x['fraction_of_limit']:9.1f}% {100 * x['fraction_of_limit_interleaved']:8.1f}% "
                     f"{mb:9.1f}")
    lines.append(f"inner/s = inner steps per second summed over the K episodes; vs K={kmin}: that against K={kmin} "
                 f"(same op, threads); vs ref: lockstep step time of the reference op over this one; frac.limit = "
                 f"K x {out['flops_per_inner_step'] / 1e9:.2f} GFLOP / GEMM peak (best of 5 at the start) over the "
                 f"lockstep step time, frac.same against the GEMM timed in the same blocks; peak MB = allocator "
                 f"peak over one episode of {out['peak_mem_steps']} lockstep steps (T-BPTT {out['bptt']})")
    return "\n".join(lines)


def run(a, log=print) -> Dict:
    if a.device not in ("cpu", "cuda") and not str(a.device).startswith("cuda:"):
        raise ValueError(f"the end-to-end benchmark runs on one device (cpu or cuda), got {a.device!r}")
    threads = a.threads if isinstance(a.threads, (list, tuple)) else [a.threads or torch.get_num_threads()]
    ops = [o.strip() for o in a.ops.split(",") if o.strip()] if isinstance(a.ops, str) else list(a.ops)
    out = measure(a.data_root, a.cache, a.e2e_profile, a.device, list(threads), ops, list(a.e2e_k),
                  a.e2e_bptt, a.e2e_steps or 2 * a.e2e_bptt, a.min_time, log)
    txt = table(out)
    write_records(a.out, a.update_records, "e2e_lockstep", a.device, out, txt, log)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lrmt_fast.bench.e2e_lockstep", description=__doc__.splitlines()[0])
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
