"""Is TF32 allowed for the meta-learner's GEMMs on this GPU? The tolerance rule, measured.

The fused op's CUDA GEMMs go through cuBLAS (at::addmm_out), so they follow
``torch.backends.cuda.matmul.allow_tf32`` like every PyTorch matrix product. This script
runs the whole-student meta-test update (one step) and the meta-train window (5 unrolled
steps and the backward: the meta-gradients) of LeNet and ResNet-32 GN with TF32 off and on,
and compares each against the float64 CPU reference:

  err(x) = ||x - ref64|| / ||ref64||  over all outputs (new weights and LSTM states), or over
           all meta-gradients, concatenated

The rule (docs/method.md section 2, the tolerance rule): an impl may use TF32 only if its error stays
within 2x the error of the float32 reference with TF32 off. It also times the fused update
both ways (CUDA events, median of 50). Writes ``runs/bench/<device>_tf32.json`` (``--update-records``:
also ``benchmarks/results/``).

  python -m lrmt_fast.bench.tf32_check            # on a machine with a CUDA GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
from typing import Dict, List

import torch

from lrmt_fast.checkpoint import atomic_write_json

from .cases import LR, adapted_params, build_student, train_window_grads
from .measure import DEFAULT_OUT, device_name, git_commit, now, out_dirs, results_stem

SEEDS = {"lenet": 0, "resnet32": 5}   # the seeds of tests/test_fused_ops.py (no ReLU at its kink)


def _set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def _update_outputs(model: str, device: str, dtype, impl: str) -> torch.Tensor:
    ml, params, grads, acts, state = build_student(model, device, dtype=dtype, seed=SEEDS[model])
    with torch.no_grad():
        ml.step_(params, grads, acts, state, LR, impl=impl)
    parts = [params[k].reshape(-1) for k in adapted_params(ml)] + [t.reshape(-1) for hc in state.values() for t in hc]
    return torch.cat([p.double().cpu() for p in parts])


def _train_grads(model: str, device: str, dtype, impl: str, s: int = 5) -> torch.Tensor:
    g = train_window_grads(model, device, dtype, impl, s=s, seed=SEEDS[model])
    return torch.cat([t.reshape(-1).double() for t in g.values()])


def _ms_per_update(model: str, device: str, impl: str, reps: int = 50) -> float:
    ml, params, grads, acts, state = build_student(model, device, seed=SEEDS[model])
    for _ in range(5):
        ml.step_(params, grads, acts, state, LR, impl=impl)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        ml.step_(params, grads, acts, state, LR, impl=impl)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def check(device: str = "cuda", models=("lenet", "resnet32"), log=print) -> List[Dict]:
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    recs = []
    try:
        for model in models:
            for what, fn in (("update", _update_outputs), ("train_s5", _train_grads)):
                ref64 = fn(model, "cpu", torch.float64, "reference")
                errs = {}
                for tf32 in (False, True):
                    _set_tf32(tf32)
                    for impl in ("reference", "fused"):
                        x = fn(model, device, torch.float32, impl)
                        errs[f"{impl}{'_tf32' if tf32 else ''}"] = ((x - ref64).norm() / ref64.norm()).item()
                base = errs["reference"]
                rec = {"case": f"{model}_{what}", "device": device_name(device), "rel_err": errs,
                       "fused_passes_rule": errs["fused"] <= 2 * base,
                       "fused_tf32_passes_rule": errs["fused_tf32"] <= 2 * base,
                       "fused_tf32_err_over_fp32_reference": errs["fused_tf32"] / base}
                if what == "update":
                    ms = {}
                    for tf32 in (False, True):
                        _set_tf32(tf32)
                        ms["fused_tf32" if tf32 else "fused"] = _ms_per_update(model, device, "fused")
                    rec["ms_per_update"] = ms
                recs.append(rec)
                log(f"{rec['case']:18s} rel. error vs fp64: ref32 {errs['reference']:.2e}  fused {errs['fused']:.2e}  "
                    f"ref32+TF32 {errs['reference_tf32']:.2e}  fused+TF32 {errs['fused_tf32']:.2e}  "
                    f"-> TF32 {'passes' if rec['fused_tf32_passes_rule'] else 'FAILS'} the 2x rule"
                    + (f"; fused update {rec['ms_per_update']['fused']:.3f} ms fp32, "
                       f"{rec['ms_per_update']['fused_tf32']:.3f} ms TF32" if what == "update" else ""))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return recs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default runs/bench)")
    p.add_argument("--update-records", action="store_true",
                   help="also write the committed copy under benchmarks/results/")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tf32_check: no CUDA GPU here (TF32 is a GPU mode)")
        return 1
    recs = check(args.device)
    meta = {"commit": git_commit(), "date": now(), "torch_version": torch.__version__}
    for d in out_dirs(args.out, args.update_records):
        path = os.path.join(d, f"{results_stem(args.device)}_tf32.json")
        atomic_write_json(path, [{**r, **meta} for r in recs], what="benchmark record", indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
