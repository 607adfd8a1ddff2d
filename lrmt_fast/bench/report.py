"""``lrmt bench`` / ``python -m lrmt_fast.bench.report``: benchmark the meta-update op.

Runs every case (benchmarks/cases.py) for the reference and the fused path (and the
anchors: ``nn_lstm``, ``reference_compiled``) in this process on the same inputs, or
reads a pytest-benchmark JSON file (``pytest benchmarks/ --benchmark-only
--benchmark-json FILE``; ``--from-json FILE``). Prints a table and writes ``<device>.json``
(a list of records) and a roofline figure ``<device>_roofline.png`` under ``--out`` (default
``runs/bench`` of the working folder), each file once at the end and atomically; the
committed records in ``benchmarks/results/`` are rewritten only with ``--update-records``.
``--e2e`` runs the end-to-end meta-training benchmark instead
(:mod:`lrmt_fast.bench.e2e_lockstep`: K = 1, 4, 16 episodes in lockstep, fused and reference).

Each record: case, device, impl, steps_per_s, synapse_updates_per_s, peak_mem_bytes,
ratio_vs_reference, fraction_of_limit (the shape-derived lower bound on the step time,
max(FLOPs / measured GEMM peak, bytes / measured copy bandwidth), over the measured step
time), commit, date; fraction_of_limit_interleaved, the same against the GEMM peak timed in
the case's own alternating blocks (gemm_peak_flops_interleaved, measure.GemmProbe); plus the
measurement details (median/min ms per step, rounds,
FLOPs and bytes per step, the measured limits, threads, load average).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

HELP = ("benchmark the fused meta-update op against the reference, or (--e2e) meta-training end to end "
        "(writes under --out, default runs/bench; --update-records: benchmarks/results/)")
DEFAULT_IMPLS = ("reference", "fused", "nn_lstm", "reference_compiled", "fused_graph")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lrmt_fast.cli import positive_float

    from . import e2e_lockstep
    from .cases import CASES
    from .inner_step import _int_list
    from .measure import DEFAULT_OUT
    p.add_argument("--device", default="cpu", help="cpu, cuda, or all (cpu and, when present, cuda); default cpu")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                   help="comma-separated subset of reference, fused, nn_lstm, reference_compiled, fused_graph "
                        "(fused_graph: GPU update cases only)")
    p.add_argument("--min-time", type=positive_float, default=3.0,
                   help="seconds of timed rounds per case and impl (--e2e: per configuration)")
    p.add_argument("--compile-timeout", type=positive_float, default=300.0,
                   help="seconds allowed for torch.compile + timing of the compiled reference, per case")
    p.add_argument("--threads", type=_int_list, default=None,
                   help="torch threads (default: torch's default); --e2e takes a list, e.g. 1,2")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="read a pytest-benchmark JSON file instead of measuring")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default runs/bench of the working folder)")
    p.add_argument("--update-records", action="store_true",
                   help="also write the committed records under benchmarks/results/ (deliberate updates only)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    g = p.add_argument_group("end to end (--e2e)")
    g.add_argument("--e2e", action="store_true",
                   help="meta-training end to end instead of the op cases: ms per inner step, inner steps/s summed "
                        "over K episodes in lockstep, fraction of the step's FLOP limit, peak memory, for each K "
                        "and op (lrmt_fast.bench.e2e_lockstep)")
    g.add_argument("--data-root", default=None,
                   help="MNIST and FashionMNIST for --e2e (default: synthetic MNIST-shaped images)")
    g.add_argument("--cache", default=os.path.join("runs", "e2e_cache"),
                   help="folder of the Task A checkpoint for --e2e with --data-root")
    e2e_lockstep.add_arguments(g, prefix="e2e-")


def _devices(arg: str) -> List[str]:
    import torch
    arg = arg.strip().lower()
    if arg == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if arg not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or all, got {arg!r}")
    if arg == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is available")
    return [arg]


def measure(device: str, cases: List[str], impls: List[str], min_time: float, compile_timeout: float,
            log=print, after_case=None) -> List[Dict]:
    """Measure every (case, impl) on ``device``; returns the records. ``after_case(records so
    far)`` is called after each case (run() writes them, so a run cut short keeps what it did)."""
    import gc

    import torch

    from lrmt_fast import ops

    from .cases import applies, make_case
    from .compiled import run_compiled
    from .measure import (GemmProbe, add_ratios, cpu_model, load_average, machine_limits, peak_memory, record,
                          same_blocks_fraction, time_cases_interleaved)

    if ({"fused", "fused_graph"} & set(impls)) and not ops.available(device):
        raise RuntimeError(f"the fused extension cannot run on {device}: {ops.build_info()}")
    limits = machine_limits(device)
    log(f"[{device}] fp32 GEMM peak {limits['gemm_peak_flops'] / 1e9:.1f} GFLOP/s, copy bandwidth "
        f"{limits['mem_bw_bytes_per_s'] / 1e9:.1f} GB/s, {torch.get_num_threads()} threads, load {load_average()}")
    common = {"load_avg_start": load_average(), "cpu_model": cpu_model() if device == "cpu" else None,
              "torch_version": torch.__version__}
    recs: List[Dict] = []
    compile_failed: Dict[str, str] = {}  # model -> case whose compile timed out / failed
    for name in cases:
        # the in-process implementations are timed together, in alternating blocks, so that their
        # ratio does not depend on when each ran (measure.time_cases_interleaved)
        # with the GEMM of the peak as one more member of the blocks (measure.GemmProbe)
        local = [i for i in impls if i != "reference_compiled" and applies(name, i, device)]
        built = [make_case(name, impl, device) for impl in local]
        probe = GemmProbe(device)
        times = time_cases_interleaved(built + [probe], min_time=min_time)
        peak_same = probe.flops_per_s(times[-1])
        del probe
        timed = dict(zip(local, times))
        built = dict(zip(local, built))
        log(f"  {name:20s} fp32 GEMM peak in the same blocks {peak_same / 1e9:.1f} GFLOP/s")
        for impl in impls:
            if not applies(name, impl, device):
                continue
            gc.collect()
            if impl == "reference_compiled":
                model = name.split("_")[0]
                if model in compile_failed:
                    # a train case compiles the forward and the backward of s unrolled steps: longer
                    # than the case that already did not finish (or failed) for this model
                    res = {"ok": False, "reason": f"not attempted: torch.compile of {compile_failed[model]} (a "
                                                  f"smaller graph of the same student) did not finish or failed "
                                                  f"in this run; see that record"}
                else:
                    res = run_compiled(name, device, compile_timeout, min_time)
                    if not res.get("ok"):
                        compile_failed[model] = name
                base = make_case(name, "reference", device)
                base.impl = "reference_compiled"
                if res.get("ok"):
                    rec = record(base, res["times"], res, limits, compile_s=res.get("compile_s"), **common)
                else:
                    rec = record(base, [float("nan")], {}, limits, **common)
                    for k in ("steps_per_s", "synapse_updates_per_s", "fraction_of_limit", "ms_per_step_median",
                              "ms_per_step_min", "achieved_flops"):
                        rec[k] = None
                    rec["rounds"] = 0
                    rec["note"] = res.get("reason")
            else:
                case = built.pop(impl)
                mem = peak_memory(case)
                rec = record(case, timed[impl], mem, limits, timing="interleaved blocks", **common)
                same_blocks_fraction(rec, peak_same)
                del case
            rec["load_avg_end"] = load_average()
            recs.append(rec)
            sps = rec["steps_per_s"]
            log(f"  {name:20s} {impl:19s} " + (f"{sps:9.2f} steps/s  {rec['ms_per_step_median']:8.2f} ms/step  "
                                                f"{rec['fraction_of_limit'] * 100:5.1f}% of limit" +
                                                (f" ({rec['fraction_of_limit_interleaved'] * 100:5.1f}% same blocks)"
                                                 if rec.get("fraction_of_limit_interleaved") else "")
                                                if sps else f"no number: {rec.get('note')}"))
        if after_case is not None:
            after_case(add_ratios([dict(r) for r in recs]))
    return add_ratios(recs)


def from_pytest_json(path: str) -> List[Dict]:
    """Records from a pytest-benchmark JSON file written by benchmarks/test_bench.py."""
    from .measure import add_ratios
    with open(path) as f:
        data = json.load(f)
    recs = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        if "case" not in info:
            continue
        st = b["stats"]
        k = info["steps_per_call"]
        t_step = st["median"] / k
        rec = dict(info)
        rec.update({
            "steps_per_s": 1.0 / t_step,
            "synapse_updates_per_s": info["synapses"] / t_step,
            "fraction_of_limit": max(info["flops_per_step"] / info["gemm_peak_flops"],
                                     info["bytes_per_step"] / info["mem_bw_bytes_per_s"]) / t_step,
            "ms_per_step_median": t_step * 1e3, "ms_per_step_min": st["min"] / k * 1e3, "rounds": st["rounds"],
            "achieved_flops": info["flops_per_step"] / t_step, "source": "pytest-benchmark",
            "date": (data.get("datetime") or info.get("date")),
            "commit": (data.get("commit_info") or {}).get("id", info.get("commit")),
        })
        recs.append(rec)
    return add_ratios(recs)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(records: List[Dict]) -> str:
    rows = {}
    for r in records:
        rows.setdefault((r["case"], r["device"]), {})[r["impl"]] = r
    pct = lambda x: None if x is None else 100 * x  # noqa: E731
    head = (f"{'case':20s} {'device':14s} {'reference':>11s} {'fused':>11s} {'ratio':>7s} {'frac.limit':>10s} "
            f"{'frac.same':>10s} "
            f"{'nn_lstm':>9s} {'compiled':>9s} {'graph':>9s} {'g.ratio':>7s} {'ref mem MB':>10s} {'fused mem MB':>12s}")
    lines = [head, "-" * len(head)]
    for (case, dev), d in rows.items():
        ref, fus = d.get("reference", {}), d.get("fused", {})
        nn_, comp, gr = d.get("nn_lstm", {}), d.get("reference_compiled", {}), d.get("fused_graph", {})
        mb = lambda r: None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2 ** 20  # noqa: E731
        lines.append(
            f"{case:20s} {dev:14s} {_fmt(ref.get('steps_per_s'), '9.2f'):>11s} {_fmt(fus.get('steps_per_s'), '9.2f'):>11s} "
            f"{_fmt(fus.get('ratio_vs_reference'), '6.2f'):>7s} "
            f"{_fmt(pct(fus.get('fraction_of_limit')), '8.1f'):>9s}% "
            f"{_fmt(pct(fus.get('fraction_of_limit_interleaved')), '8.1f'):>9s}% "
            f"{_fmt(nn_.get('steps_per_s'), '8.2f'):>9s} {_fmt(comp.get('steps_per_s'), '8.2f'):>9s} "
            f"{_fmt(gr.get('steps_per_s'), '8.2f'):>9s} {_fmt(gr.get('ratio_vs_reference'), '6.2f'):>7s} "
            f"{_fmt(mb(ref) if ref else None, '9.2f'):>10s} {_fmt(mb(fus) if fus else None, '11.2f'):>12s}")
    lines.append("steps/s (higher is better); ratio = fused / reference; frac.limit = fused step time bound "
                 "(FLOPs / GEMM peak, bytes / copy bandwidth) over measured (peak: best of 5 GEMMs at the start); "
                 "frac.same = the same with the peak's GEMM timed (median) in the case's own alternating blocks; "
                 "graph = the fused update replayed as a CUDA graph (GPU update cases), g.ratio = graph / reference")
    notes = [f"  {r['case']} {r['impl']}: {r['note']}" for r in records if r.get("note")]
    if notes:
        lines.append("notes:")
        lines += notes
    return "\n".join(lines)


def roofline_figure(records: List[Dict], path: str) -> Optional[str]:
    """Roofline: achieved GFLOP/s against arithmetic intensity, one point per (case, impl)."""
    recs = [r for r in records if r.get("achieved_flops")]
    if not recs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    peak = recs[0]["gemm_peak_flops"] / 1e9
    bw = recs[0]["mem_bw_bytes_per_s"] / 1e9
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ai = np.logspace(-1, 3, 200)
    ax.loglog(ai, np.minimum(peak, ai * bw), "k-", lw=1.5, label=f"roof: {peak:.0f} GFLOP/s, {bw:.1f} GB/s (measured)")
    markers = {"reference": "o", "fused": "*", "nn_lstm": "s", "reference_compiled": "^", "fused_graph": "D"}
    cases = sorted({r["case"] for r in recs})
    colors = {c: plt.cm.tab10(i % 10) for i, c in enumerate(cases)}
    for r in recs:
        x = r["flops_per_step"] / r["bytes_per_step"]
        ax.loglog([x], [r["achieved_flops"] / 1e9], markers.get(r["impl"], "x"), color=colors[r["case"]],
                  ms=11 if r["impl"] == "fused" else 7, mec="k", mew=0.5)
    from matplotlib.lines import Line2D
    h = [Line2D([], [], color="k", lw=1.5, label=f"roof ({peak:.0f} GFLOP/s, {bw:.1f} GB/s)")]
    h += [Line2D([], [], ls="", marker=m, color="gray", label=i) for i, m in markers.items()]
    h += [Line2D([], [], ls="", marker="o", color=colors[c], label=c) for c in cases]
    ax.legend(handles=h, fontsize=8, loc="lower right")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, from the shapes)")
    ax.set_ylabel("achieved GFLOP/s (minimal FLOPs of the step / median step time)")
    ax.set_title(f"meta-update step, {recs[0]['device']}, {recs[0].get('num_threads')} threads")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write(recs: List[Dict], out: str) -> Optional[str]:
    """Write the records of one device to ``out/<device>.json`` (atomically); returns the path."""
    from lrmt_fast.checkpoint import atomic_write_json
    if not recs:
        return None
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{recs[0]['device'].replace('/', '_')}.json")
    atomic_write_json(path, recs, what="benchmark records", indent=1)
    return path


def _write_figure(recs: List[Dict], path: str) -> Optional[str]:
    """The roofline figure, rendered in memory and written atomically."""
    import tempfile

    from lrmt_fast.checkpoint import atomic_write_bytes
    with tempfile.TemporaryDirectory() as tmp:
        fig = roofline_figure(recs, os.path.join(tmp, "roofline.png"))
        if fig is None:
            return None
        with open(fig, "rb") as f:
            data = f.read()
    atomic_write_bytes(path, data, what="roofline figure")
    return path


def run(args) -> int:
    import torch

    from .cases import CASES
    from .measure import out_dirs

    if args.e2e:
        from . import e2e_lockstep
        if args.from_json or args.no_write:
            raise ValueError("--e2e measures and writes its own record; --from-json / --no-write do not apply")
        e2e_lockstep.run(args)
        return 0
    if args.threads:
        if len(args.threads) != 1:
            raise ValueError(f"--threads: the op cases run at one thread count, got {args.threads} (--e2e takes a list)")
        torch.set_num_threads(args.threads[0])
    if args.from_json:
        records = from_pytest_json(args.from_json)
        if not records:
            raise ValueError(f"{args.from_json}: no benchmark records from benchmarks/test_bench.py")
        by_dev: Dict[str, List[Dict]] = {}
        for r in records:
            by_dev.setdefault(r["device"], []).append(r)
    else:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        bad = [c for c in cases if c not in CASES] + [i for i in impls if i not in DEFAULT_IMPLS]
        if bad:
            raise ValueError(f"unknown case(s) / impl(s): {bad}")
        by_dev = {}
        for dev in _devices(args.device):
            recs = measure(dev, cases, impls, args.min_time, args.compile_timeout)
            by_dev[recs[0]["device"] if recs else dev] = recs
    for dev, recs in by_dev.items():
        print()
        print(table(recs))
        if args.no_write:
            continue
        # every file once, at the end, atomically: into --out, and into the committed records only
        # when asked (--update-records)
        for d in out_dirs(args.out, args.update_records):
            path = _write(recs, d)
            fig = _write_figure(recs, os.path.join(d, f"{dev.replace('/', '_')}_roofline.png"))
            print(f"wrote {path}" + (f" and {fig}" if fig else ""))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lrmt_fast.bench.report", description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
