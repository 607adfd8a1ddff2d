"""Timing, memory and machine-limit measurements shared by the pytest-benchmark suite and
``lrmt bench`` (:mod:`lrmt_fast.bench.report`)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from typing import Dict, List, Optional

import torch

from ..checkpoint import atomic_write_json, atomic_write_text
from .cases import Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where every benchmark writes by default: runs/ of the working folder (ignored by git in a checkout),
# never the package tree or the committed records
DEFAULT_OUT = os.path.join("runs", "bench")


def records_dir() -> str:
    """``benchmarks/results/`` of this checkout: the committed records, written only on request
    (``--update-records``)."""
    return os.path.join(os.path.dirname(ROOT), "benchmarks", "results")


def out_dirs(out: str, update_records: bool = False) -> List[str]:
    """The folders a benchmark writes its files to: ``out``, plus the committed records' folder
    with ``update_records``."""
    dirs = [out]
    if update_records and os.path.abspath(records_dir()) != os.path.abspath(out):
        dirs.append(records_dir())
    return dirs


def write_records(out: str, update_records: bool, name: str, device: str, record, table: str, log=print) -> None:
    """Log ``table``, then write ``<name>_<device>.json`` (the record) and ``.txt`` (the table) into
    every folder of :func:`out_dirs`, each atomically."""
    log("")
    log(table)
    stem = f"{name}_{device_name(device).replace('/', '_')}"
    for d in out_dirs(out, update_records):
        os.makedirs(d, exist_ok=True)
        atomic_write_json(os.path.join(d, stem + ".json"), record, what="benchmark record")
        atomic_write_text(os.path.join(d, stem + ".txt"), table + "\n", what="benchmark table")
        log(f"wrote {os.path.join(d, stem)}.json and .txt")


# --------------------------------------------------------------------------------------
# machine limits, measured in the same run
# --------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_peak(device: str = "cpu", n: Optional[int] = None, reps: int = 5) -> float:
    """fp32 GEMM FLOP/s: best of ``reps`` square n x n x n matmuls (n=2048 CPU, 8192 CUDA)."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    torch.mm(a, b, out=c)
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Memory bandwidth, bytes/s: best of ``reps`` copies of a ``nbytes`` buffer (read + write)."""
    n = nbytes // 4
    a = torch.randn(n, device=device)
    b = torch.empty(n, device=device)
    b.copy_(a)
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n * 4 / best


def machine_limits(device: str = "cpu") -> Dict[str, float]:
    return {"gemm_peak_flops": gemm_peak(device), "mem_bw_bytes_per_s": copy_bandwidth(device)}


class GemmProbe:
    """The GEMM of :func:`gemm_peak` as a timed "case" (``fn``/``sync``), to be timed in the same
    alternating blocks as the cases (:func:`time_cases_interleaved`): its median FLOP/s is the
    GEMM peak under the same conditions as the cases' medians, whereas :func:`gemm_peak` is the
    best of a few calls at the start of the run. On a shared host the two differ (other
    virtual machines take cache and memory bandwidth from minute to minute), and the fraction
    of the limit is then part kernel, part host; the same-blocks figure compares like with like."""

    def __init__(self, device: str = "cpu", n: Optional[int] = None):
        self.device = device
        self.n = n or (8192 if device.startswith("cuda") else 2048)
        self.a = torch.randn(self.n, self.n, device=device)
        self.b = torch.randn(self.n, self.n, device=device)
        self.c = torch.empty(self.n, self.n, device=device)

    def fn(self):
        torch.mm(self.a, self.b, out=self.c)

    def sync(self):
        _sync(self.device)

    def flops_per_s(self, times: List[float]) -> float:
        times = sorted(times)
        return 2.0 * self.n ** 3 / times[len(times) // 2]


def same_blocks_fraction(rec: Dict, peak: float) -> Dict:
    """Add the GEMM peak measured in the record's own timing blocks and the fraction of the
    limit against it (``gemm_peak_flops_interleaved``, ``fraction_of_limit_interleaved``)."""
    t_step = rec["ms_per_step_median"] / 1e3 if rec.get("ms_per_step_median") else None
    rec["gemm_peak_flops_interleaved"] = peak
    rec["fraction_of_limit_interleaved"] = (
        max(rec["flops_per_step"] / peak, rec["bytes_per_step"] / rec["mem_bw_bytes_per_s"]) / t_step
        if t_step else None)
    return rec


# --------------------------------------------------------------------------------------
# timing and memory of a case
# --------------------------------------------------------------------------------------
def time_case(case: Case, min_time: float = 2.0, min_rounds: int = 5, max_rounds: int = 200,
              warmup: int = 2) -> List[float]:
    """Seconds per call, one entry per round (after ``warmup`` calls)."""
    for _ in range(warmup):
        case.fn()
    case.sync()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_rounds and (len(times) < min_rounds or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        case.fn()
        case.sync()
        times.append(time.perf_counter() - t)
    return times


def time_cases_interleaved(cases: List[Case], min_time: float = 2.0, block_s: float = 0.25, min_rounds: int = 5,
                           max_rounds: int = 1000, warmup: int = 2) -> List[List[float]]:
    """Seconds per call of each case, the cases timed in alternating blocks of about ``block_s``.

    On a shared machine the speed of the cores drifts over seconds to minutes (other jobs,
    other virtual machines on the host): timing one implementation after the other lets the
    drift into their ratio (seen here: the same fused step at 6.4 and 4.5 ms median a minute
    apart). Alternating short blocks gives every implementation the same conditions, while a
    block keeps the caches warm as consecutive steps do. Each case gets at least ``min_time``
    seconds (and ``min_rounds`` calls) of timed calls, at most ``max_rounds``.
    """
    for c in cases:
        for _ in range(warmup):
            c.fn()
        c.sync()
    times: List[List[float]] = [[] for _ in cases]
    spent = [0.0] * len(cases)

    def unfinished(i):
        return len(times[i]) < max_rounds and (len(times[i]) < min_rounds or spent[i] < min_time)

    while any(unfinished(i) for i in range(len(cases))):
        for i, c in enumerate(cases):
            t_block = 0.0
            while unfinished(i) and t_block < block_s:
                t = time.perf_counter()
                c.fn()
                c.sync()
                dt = time.perf_counter() - t
                times[i].append(dt)
                t_block += dt
                spent[i] += dt
    return times


def quiet_kineto_without_gpu() -> None:
    """Silence kineto's log when no CUDA GPU is usable, before the first profiler use.

    torch.profiler (kineto) queries the CUDA devices' properties for the trace's metadata when it
    stops, even for a CPU-only trace; on a machine with a CUDA build of torch but no usable GPU
    that query fails and kineto logs "ERROR: ... gpuGetDeviceCount failed with code 35" (35:
    insufficient driver), plus its stage lines, into a good CPU run. The query cannot be turned
    off from Python; kineto's log level (``KINETO_LOG_LEVEL``, read when the profiler first
    starts) can. Left alone when the user set it or a GPU is present."""
    if "KINETO_LOG_LEVEL" not in os.environ and not torch.cuda.is_available():
        os.environ["KINETO_LOG_LEVEL"] = "6"    # above every level kineto logs at


def _cpu_alloc_peak(fn) -> int:
    """Peak of the bytes live in the c10 CPU allocator during ``fn()``, above the level at its
    start: the profiler's memory events (each allocation +n, each free -n) in time order."""
    from torch.profiler import ProfilerActivity, profile
    quiet_kineto_without_gpu()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


def peak_memory(case: Case) -> Dict:
    """Peak memory of one warm call beyond what is held before it (temporaries, saved
    activations, outputs; not the persistent inputs or a workspace sized on an earlier call).

    CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
    CPU: the peak of the bytes live in torch's CPU allocator during the call, above the
    level at its start (profiler memory events).
    """
    case.fn()  # warm (workspaces, allocator caches)
    case.sync()
    return peak_memory_of(case.fn, case.device)


def peak_memory_of(fn, device: str = "cpu") -> Dict:
    """:func:`peak_memory` of one call of ``fn`` (not warmed here)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated() - base),
                "peak_mem_method": "torch.cuda.max_memory_allocated - allocated before the call"}
    try:
        peak = _cpu_alloc_peak(fn)
    except Exception as e:  # profiler unavailable: say so in the record
        return {"peak_mem_bytes": None, "peak_mem_method": f"unavailable: {type(e).__name__}: {e}"}
    return {"peak_mem_bytes": peak,
            "peak_mem_method": "peak bytes live in torch's CPU allocator during the call, above the start "
                               "(torch.profiler memory events)"}


def record(case: Case, times: List[float], mem: Dict, limits: Dict[str, float], **extra) -> Dict:
    """One result record (ratio_vs_reference is filled in by :func:`add_ratios`)."""
    times = sorted(times)
    med = times[len(times) // 2]
    steps_per_s = case.steps_per_call / med
    flops, nbytes = case.cost["flops_per_step"], case.cost["bytes_per_step"]
    t_limit = max(flops / limits["gemm_peak_flops"], nbytes / limits["mem_bw_bytes_per_s"])
    t_step = med / case.steps_per_call
    rec = {
        "case": case.name, "device": device_name(case.device), "impl": case.impl,
        "steps_per_s": steps_per_s,
        "synapse_updates_per_s": steps_per_s * case.cost["synapses"],
        "peak_mem_bytes": mem.get("peak_mem_bytes"),
        "ratio_vs_reference": None,
        "fraction_of_limit": t_limit / t_step,
        "commit": git_commit(), "date": now(),
        "ms_per_step_median": t_step * 1e3, "ms_per_step_min": times[0] / case.steps_per_call * 1e3,
        "rounds": len(times), "steps_per_call": case.steps_per_call,
        "flops_per_step": flops, "bytes_per_step": nbytes, "synapses": case.cost["synapses"],
        "achieved_flops": flops / t_step,
        "limit": "compute" if flops / limits["gemm_peak_flops"] >= nbytes / limits["mem_bw_bytes_per_s"] else "memory",
        "peak_mem_method": mem.get("peak_mem_method"),
        "num_threads": torch.get_num_threads(),
    }
    rec.update(limits)
    rec.update(extra)
    return rec


def add_ratios(records: List[Dict]) -> List[Dict]:
    """ratio_vs_reference = steps/s of the record / steps/s of the reference, same case and device."""
    ref = {(r["case"], r["device"]): r["steps_per_s"] for r in records
           if r["impl"] == "reference" and r.get("steps_per_s")}
    for r in records:
        base = ref.get((r["case"], r["device"]))
        r["ratio_vs_reference"] = (r["steps_per_s"] / base) if (base and r.get("steps_per_s")) else None
    return records


# --------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return "cuda-" + torch.cuda.get_device_name(torch.device(device)).replace(" ", "_")
    return "cpu-" + (platform.machine() or "unknown")


def results_stem(device: str) -> str:
    """File stem of benchmarks/results/<device>.json."""
    return device_name(device).replace("/", "_")


def git_commit() -> Optional[str]:
    """The short commit of this checkout (+dirty if csrc/, lrmt_fast/ or benchmarks/ differ from
    it); ``LRMT_COMMIT`` when set (a copy of the tree without .git, e.g. on a lent GPU machine)."""
    if os.environ.get("LRMT_COMMIT"):
        return os.environ["LRMT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "lrmt_fast", "benchmarks"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
