"""The benchmark harness (benchmarks/report.py, measure.py) on one small case: the records
carry the issue's keys and both fractions of the limit, and the table prints them.
No timing is asserted (speed claims live in benchmarks/results, not in tests)."""
import math

import pytest
import torch

from lrmt_fast.bench.measure import GemmProbe, same_blocks_fraction, time_cases_interleaved
from lrmt_fast.bench.report import measure, table
from lrmt_fast import ops

KEYS = ("case", "device", "impl", "steps_per_s", "synapse_updates_per_s", "peak_mem_bytes", "ratio_vs_reference",
        "fraction_of_limit", "commit", "date", "gemm_peak_flops", "gemm_peak_flops_interleaved",
        "fraction_of_limit_interleaved")


def test_gemm_probe_flops_from_median():
    probe = GemmProbe("cpu", n=64)
    times = time_cases_interleaved([probe], min_time=0.01, min_rounds=5)
    assert len(times) == 1 and len(times[0]) >= 5
    med = sorted(times[0])[len(times[0]) // 2]
    assert probe.flops_per_s(times[0]) == pytest.approx(2 * 64 ** 3 / med)
    assert torch.allclose(probe.c, probe.a @ probe.b)


def test_same_blocks_fraction_formula():
    rec = {"ms_per_step_median": 2.0, "flops_per_step": 1e9, "bytes_per_step": 1e6, "mem_bw_bytes_per_s": 1e10}
    same_blocks_fraction(rec, 1e12)  # bound max(1 ms, 0.1 ms) over 2 ms
    assert rec["gemm_peak_flops_interleaved"] == 1e12
    assert rec["fraction_of_limit_interleaved"] == pytest.approx(0.5)


@pytest.mark.skipif(not ops.available("cpu"), reason="fused extension not built")
def test_measure_records_and_table():
    torch.set_num_threads(1)
    logs = []
    recs = measure("cpu", ["lenet_update"], ["reference", "fused"], min_time=0.05, compile_timeout=1,
                   log=logs.append)
    assert [r["impl"] for r in recs] == ["reference", "fused"]
    for r in recs:
        for k in KEYS:
            assert k in r, k
        assert r["case"] == "lenet_update" and r["steps_per_s"] > 0
        assert 0 < r["fraction_of_limit"] and 0 < r["fraction_of_limit_interleaved"]
        assert math.isclose(r["fraction_of_limit_interleaved"] / r["fraction_of_limit"],
                            r["gemm_peak_flops"] / r["gemm_peak_flops_interleaved"], rel_tol=1e-9) \
            or r["limit"] == "memory"
    assert recs[0]["ratio_vs_reference"] == pytest.approx(1.0)
    assert recs[1]["ratio_vs_reference"] == pytest.approx(recs[1]["steps_per_s"] / recs[0]["steps_per_s"])
    assert any("same blocks" in line for line in logs)
    txt = table(recs)
    assert "frac.same" in txt and "lenet_update" in txt


def test_graph_impl_only_for_gpu_updates():
    from lrmt_fast.bench.cases import applies, make_case
    assert applies("resnet32_update", "fused_graph", "cuda") and applies("lenet_update", "fused_graph", "cuda:0")
    assert not applies("lenet_update", "fused_graph", "cpu")
    assert not applies("lenet_train_s5", "fused_graph", "cuda")
    assert all(applies("lenet_train_s5", i, "cpu") for i in ("reference", "fused", "nn_lstm"))
    with pytest.raises(ValueError, match="update cases on a CUDA device"):
        make_case("lenet_update", "fused_graph", "cpu")


@pytest.mark.skipif(not ops.available("cpu"), reason="fused extension not built")
def test_default_impls_skip_the_graph_on_cpu():
    torch.set_num_threads(1)
    recs = measure("cpu", ["lenet_update"], ["reference", "fused_graph"], min_time=0.02, compile_timeout=1,
                   log=lambda s: None)
    assert [r["impl"] for r in recs] == ["reference"]
    assert "graph" in table(recs).splitlines()[0]


def test_e2e_cifar_metatrain_record(tmp_path):
    """The end-to-end CIFAR meta-training timing on synthetic images and the smoke network:
    both paths run the same episodes and the record says how long each took."""
    import json

    from lrmt_fast.bench.e2e_exp1_cifar_metatrain import main
    out = tmp_path / "e2e.json"
    impls = "fused,reference" if ops.available("cpu") else "reference"
    assert main(["--profile", "smoke", "--synthetic", "32", "--episodes", "1", "--max-steps", "2", "--device", "cpu",
                 "--impls", impls, "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["case"] == "exp1_cifar_smoke_metatrain" and rec["max_steps"] == 2 and "synthetic" in rec["data"]
    assert [r["impl"] for r in rec["rows"]] == impls.split(",")
    for r in rec["rows"]:
        assert r["episodes"] == 1 and 1 <= r["steps"] <= 2 and r["s_per_step"] > 0
        assert r["s_per_episode"] == pytest.approx(r["wall_s"], abs=0.006)  # one episode; wall_s is rounded
    assert rec["rows"][-1]["speedup_vs_reference"] == pytest.approx(1.0)


def test_tf32_check_errors_on_the_cpu(capsys):
    """benchmarks/tf32_check.py: its error measures (whole-student update outputs, meta-train
    window gradients) put the fused and the reference float32 paths at float32 rounding from the
    float64 reference; without a GPU the command says so and fails."""
    from lrmt_fast.bench import tf32_check
    for fn, bound in ((tf32_check._update_outputs, 1e-5), (tf32_check._train_grads, 1e-4)):
        ref64 = fn("lenet", "cpu", torch.float64, "reference")
        for impl in ("reference", "fused"):
            x = fn("lenet", "cpu", torch.float32, impl)
            assert x.shape == ref64.shape and x.dtype == torch.float64
            rel = ((x - ref64).norm() / ref64.norm()).item()
            assert 0 < rel < bound, (fn.__name__, impl, rel)
    if not torch.cuda.is_available():
        assert tf32_check.main([]) == 1
        assert "no CUDA GPU" in capsys.readouterr().out
