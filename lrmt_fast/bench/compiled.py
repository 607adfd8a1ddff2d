"""The ``reference_compiled`` anchor: the reference step under ``torch.compile``.

Run in a subprocess with a time limit (``python -m lrmt_fast.bench.compiled CASE DEVICE``),
because compiling the unrolled per-layer reference (inductor, C++ code generation on
CPU) can take longer than a benchmark run should, or fail. The child prints one JSON
line: the timing record inputs, or why there is no number (the parent writes the reason
into the record).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict

import torch

from .cases import Case, make_case


def compiled_case(name: str, device: str) -> Case:
    """The reference case with its call (the whole-network reference step, or the T-BPTT
    window: s steps and the backward) under torch.compile; the first call compiles."""
    case = make_case(name, "reference", device)
    case.fn = torch.compile(case.fn, dynamic=False)
    case.impl = "reference_compiled"
    return case


def _child(name: str, device: str, min_time: float) -> Dict:
    from .measure import peak_memory, time_case
    torch.manual_seed(0)
    case = compiled_case(name, device)
    t0 = time.perf_counter()
    case.fn()
    case.sync()
    compile_s = time.perf_counter() - t0
    times = time_case(case, min_time=min_time, warmup=1)
    mem = peak_memory(case)
    return {"ok": True, "times": times, "compile_s": compile_s, **mem}


def run_compiled(name: str, device: str, timeout_s: float, min_time: float = 2.0) -> Dict:
    """Times the compiled reference in a child process. Returns {"ok": True, "times": [...],
    "compile_s": ..., "peak_mem_bytes": ...} or {"ok": False, "reason": "..."}."""
    cmd = [sys.executable, "-m", "lrmt_fast.bench.compiled", name, device, str(min_time)]
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"torch.compile of the reference did not finish compiling and timing within "
                                       f"{timeout_s:.0f} s on this machine (inductor, "
                                       f"{torch.get_num_threads()} threads); no number"}
    wall = time.perf_counter() - t0
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            res = json.loads(line)
            res["wall_s"] = wall
            return res
    err = (out.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    return {"ok": False, "reason": f"torch.compile of the reference failed (exit {out.returncode}): {err}"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, device = argv[0], argv[1]
    min_time = float(argv[2]) if len(argv) > 2 else 2.0
    try:
        res = _child(name, device, min_time)
    except Exception as e:  # reported to the parent as the reason
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        res = {"ok": False, "reason": f"torch.compile of the reference failed: {type(e).__name__}: {msg}"}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
