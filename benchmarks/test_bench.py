"""pytest-benchmark suite of the meta-update op: ``pytest benchmarks/ --benchmark-only``.

Every case (benchmarks/cases.py) runs for the reference and the fused path (and the
nn.LSTM anchor; on a GPU also the fused update as a CUDA graph replay) in the same session
on the same inputs (same seed). Each benchmark's ``extra_info`` holds what ``lrmt bench --from-json`` needs for a record: the case's FLOPs,
bytes and synapses per step, the machine limits measured once per session, and the peak
memory of one call. The compiled-reference anchor runs in ``lrmt bench`` (it needs a
subprocess with a time limit), not here.
"""
import pytest
import torch

from lrmt_fast.bench.cases import CASES, applies, make_case
from lrmt_fast.bench.measure import (cpu_model, device_name, git_commit, load_average, machine_limits, now,
                                peak_memory)
from lrmt_fast import ops

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
IMPLS = ("reference", "fused", "nn_lstm", "fused_graph")


@pytest.fixture(scope="session")
def limits():
    cache = {}

    def get(device):
        if device not in cache:
            cache[device] = machine_limits(device)
        return cache[device]

    return get


def _rounds(case):
    # enough rounds for a stable median, bounded for the slow reference cases
    return 3 if case.kind == "train" and case.model == "resnet32" else (5 if case.kind == "train" else 15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", CASES)
def test_meta_update(benchmark, limits, name, impl, device):
    if not applies(name, impl, device):
        pytest.skip(f"{impl} is measured for the update cases on a GPU only")
    if impl in ("fused", "fused_graph") and not ops.available(device):
        pytest.skip(f"fused extension unavailable on {device}")
    case = make_case(name, impl, device)
    lim = limits(device)
    mem = peak_memory(case)  # also warms the case up
    benchmark.group = f"{name}-{device}"
    benchmark.extra_info.update({
        "case": name, "device": device_name(device), "impl": impl, "steps_per_call": case.steps_per_call,
        "flops_per_step": case.cost["flops_per_step"], "bytes_per_step": case.cost["bytes_per_step"],
        "synapses": case.cost["synapses"], "num_threads": torch.get_num_threads(), "commit": git_commit(),
        "date": now(), "load_avg_start": load_average(), "cpu_model": cpu_model() if device == "cpu" else None,
        **lim, **mem,
    })
    benchmark.pedantic(lambda: (case.fn(), case.sync()), rounds=_rounds(case), iterations=1, warmup_rounds=1)
    benchmark.extra_info["load_avg_end"] = load_average()
