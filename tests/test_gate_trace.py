"""The step-by-step gate trace of "ours" (lrmt_fast.gate_trace) against an independent
computation, and the meta-test options of "ours" (``trace``, ``reset_every``, ``min_gate``), on
tiny data."""
import copy
import json

import pytest
import torch

from lrmt_fast import ops
from lrmt_fast.baselines import MethodContext, OursLearner, make_learner
from lrmt_fast.meta_test import MetaTestConfig, run_meta_test
from lrmt_fast.gate_trace import GateTrace, mean_trace, plot_gate_traces
from lrmt_fast.meta_training import build_meta_learner
from lrmt_fast.steps import student_meta_update
from lrmt_fast.linear_readout import Readout, ReadoutConfig, ReadoutData
from lrmt_fast.student import grads_and_acts, param_dict

from tinynet import TinyNet, tiny_data, tiny_two_tasks

LR = 0.05
IMPLS = ["reference", pytest.param("fused", marks=pytest.mark.skipif(not ops.available("cpu"),
                                                                      reason="fused extension not built"))]


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


def perturbed_meta(model, seed=0):
    """A meta-learner away from its SGD-exact initialisation: delta varies, some of it < 0."""
    meta = build_meta_learner(model, 4, 4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lrn in meta.learners.values():
            lrn.w_out.copy_(torch.randn(lrn.w_out.shape, generator=g) * 0.8)
            lrn.b_out.copy_(torch.randn(lrn.b_out.shape, generator=g) * 0.5)
    return meta


def student(n_batches=4, meta_seed=0):
    """TinyNet (seeded), its weights, a perturbed meta-learner and ``n_batches`` Task B batches of 16."""
    torch.manual_seed(0)
    model = TinyNet()
    _, _, xb, yb = tiny_data(n=16 * n_batches)
    batches = [(xb[16 * t:16 * (t + 1)], yb[16 * t:16 * (t + 1)]) for t in range(n_batches)]
    return model, param_dict(model), perturbed_meta(model, seed=meta_seed), batches


def by_param(lay, rows):
    """A layer's [Cout, P] rows as (weight part, bias column) in the order of ``order`` below."""
    return [rows[:, :-1], rows[:, -1]] if lay.bias is not None else [rows]


@pytest.mark.parametrize("impl", IMPLS)
def test_trace_matches_an_independent_computation(impl):
    model, w0, meta, batches = student()
    ours = OursLearner(model, w0, meta, LR, impl=impl, trace=True)
    # the same rollout, out of place, with every quantity computed here
    params = {k: v.clone() for k, v in w0.items()}
    state = meta.init_state()
    expect, prev = [], None
    # the adapted parameters in the order of the deltas (per layer: weight, then bias)
    order = [k for lay in meta.layers for k in ([lay.weight] + ([lay.bias] if lay.bias is not None else []))]
    for x, y in batches:
        ours.step(x, y)
        _, grads, _ = grads_and_acts(model, params, x, y, "b", [])
        params, state, deltas, _ = student_meta_update(model, meta, params, state, x, y, LR, impl="reference")
        params = {k: v.detach() for k, v in params.items()}
        state = meta.detach_state(state)
        d, g = [], []
        for lay in meta.layers:
            d.append(deltas[lay.key].detach().double().reshape(-1))
            gw = grads[lay.weight].reshape(lay.cout, -1)
            if lay.bias is not None:
                gw = torch.cat([gw, grads[lay.bias].reshape(lay.cout, 1)], 1)
            g.append(gw.double().reshape(-1))
        d, g = torch.cat(d), torch.cat(g)
        c = torch.cat([c.reshape(-1) for _, c in state.values()]).abs().double()
        dw = torch.cat([(params[k] - w0[k]).reshape(-1) for k in order]).double()
        w00 = torch.cat([w0[k].reshape(-1) for k in order]).double()
        neg = torch.cat([t.reshape(-1) for lay in meta.layers for t in by_param(lay, deltas[lay.key])]) < 0
        expect.append({"drift_neg": float(dw[neg].norm() / w00[neg].norm()),
                       "drift_pos": float(dw[~neg].norm() / w00[~neg].norm()),"descent_ratio": float((d * g * g).sum() / (g * g).sum()),
                       "frac_negative": float((d < 0).double().mean()), "mean": float(d.mean()),
                       "gate_change": 0.0 if prev is None else float((d - prev).abs().mean()),
                       "c_absmax": float(c.max()), "c_absmean": float(c.mean())})
        prev = d
    tr = ours.trace.to_dict()
    assert tr["steps"] == [1, 2, 3, 4]
    assert list(tr["groups"]) == ["all", "conv / linear", "GroupNorm gamma / beta"]
    for t, e in enumerate(expect):
        for m in ("descent_ratio", "frac_negative", "mean", "gate_change", "drift_neg", "drift_pos"):
            assert tr["groups"]["all"][m][t] == pytest.approx(e[m], rel=1e-4, abs=1e-5), (t, m)
        for m in ("c_absmax", "c_absmean"):
            assert tr[m][t] == pytest.approx(e[m], rel=1e-4, abs=1e-5), (t, m)
    assert any(v > 0 for v in tr["groups"]["all"]["frac_negative"])     # the test sees negative gates
    assert len(set(round(v, 6) for v in tr["groups"]["all"]["descent_ratio"])) > 1


def test_trace_at_the_sgd_exact_initialisation():
    """delta = 1 everywhere: the update is SGD (ratio 1), nothing negative, the gate never changes."""
    model, w0, _, batches = student(3)
    ours = OursLearner(model, w0, build_meta_learner(model, 4, 4), LR, impl="reference", trace=True)
    for x, y in batches:
        ours.step(x, y)
    tr = ours.trace.to_dict()
    for grp in tr["groups"].values():
        assert grp["descent_ratio"] == pytest.approx([1.0] * 3, abs=1e-6)
        assert grp["mean"] == pytest.approx([1.0] * 3, abs=1e-6)
        assert grp["frac_negative"] == [0.0] * 3
        assert grp["gate_change"] == pytest.approx([0.0] * 3, abs=1e-6)
    assert all(x > 0 for x in tr["c_absmax"])            # the LSTM state moves even so
    assert tr["groups"]["all"]["drift_pos"][0] > 0 and tr["groups"]["all"]["drift_neg"] == [0.0] * 3


@pytest.mark.parametrize("impl", IMPLS)
def test_trace_through_the_generic_observer_without_start_weights(impl):
    """``observe_meta_updates`` feeds a GateTrace from any rollout; without w0 it has no drift."""
    from lrmt_fast.figures import observe_meta_updates

    model, w0, meta, batches = student(3, meta_seed=2)
    traced = OursLearner(model, w0, meta, LR, impl=impl, trace=True)
    plain = OursLearner(model, w0, meta, LR, impl=impl)
    seen = GateTrace()
    out_of_place = GateTrace(w0)              # the differentiable update's observe hook
    params, state = dict(w0), meta.init_state()
    for x, y in batches:
        traced.step(x, y)
        with observe_meta_updates(seen.record):
            plain.step(x, y)
        params, state, _, _ = student_meta_update(model, meta, params, state, x, y, LR, impl=impl,
                                                  observe=out_of_place.record)
        params, state = {k: v.detach() for k, v in params.items()}, meta.detach_state(state)
    a, b, c = traced.trace.to_dict(), seen.to_dict(), out_of_place.to_dict()
    for g in a["groups"]:
        for m, v in a["groups"][g].items():
            assert c["groups"][g][m] == pytest.approx(v, rel=1e-5, abs=1e-7), (g, m)
    assert "drift_neg" not in b["groups"]["all"] and "drift_neg" in a["groups"]["all"]
    for g in b["groups"]:
        for m, v in b["groups"][g].items():
            assert v == pytest.approx(a["groups"][g][m], rel=1e-6, abs=1e-9), (g, m)
    assert b["c_absmax"] == pytest.approx(a["c_absmax"])
    with pytest.raises(ValueError, match="differ"):
        mean_trace([a, b])


@pytest.mark.parametrize("impl", IMPLS)
def test_reset_every_restarts_the_lstm_state_like_a_fresh_learner(impl):
    model, w0, meta, batches = student(meta_seed=1)
    reset = OursLearner(model, w0, meta, LR, impl=impl, reset_every=2)
    plain = OursLearner(model, w0, meta, LR, impl=impl)
    for x, y in batches[:2]:
        reset.step(x, y)
        plain.step(x, y)
    for k in w0:
        assert torch.equal(reset.params[k], plain.params[k])     # no reset within the first K steps
    fresh = OursLearner(model, {k: v.clone() for k, v in plain.params.items()}, meta, LR, impl=impl)
    for x, y in batches[2:]:
        reset.step(x, y)
        plain.step(x, y)
        fresh.step(x, y)
    for k in w0:
        torch.testing.assert_close(reset.params[k], fresh.params[k], rtol=0, atol=0)
    for k in reset.state:
        torch.testing.assert_close(reset.state[k][1], fresh.state[k][1], rtol=0, atol=0)
    assert not torch.equal(reset.params["fc1.weight"], plain.params["fc1.weight"])


@pytest.mark.parametrize("impl", IMPLS)
def test_min_gate_floors_the_gate_of_the_trunk_update(impl):
    """``min_gate`` f: each trunk step is w - lr * max(delta, f) * g, delta from the meta-learner
    on the floored trajectory (checked against a rollout written out here); a floor below every
    delta changes nothing; the trace sees the floored gate."""
    from lrmt_fast.meta_learner import pack_rows, unpack_rows

    model, w0, meta, batches = student(meta_seed=3)
    floored = OursLearner(model, w0, meta, LR, impl=impl, min_gate=0.0, trace=True)
    low = OursLearner(model, w0, meta, LR, impl=impl, min_gate=-10.0)      # |delta| <= |s| ~ 1.31
    plain = OursLearner(model, w0, meta, LR, impl=impl)
    params, state = {k: v.clone() for k, v in w0.items()}, meta.init_state()
    negatives = 0
    for t, (x, y) in enumerate(batches):
        for learner in (floored, low, plain):
            learner.step(x, y)
        _, grads, _ = grads_and_acts(model, params, x, y, "b", [])
        new, state, deltas, _ = student_meta_update(model, meta, params, state, x, y, LR, impl="reference")
        state = meta.detach_state(state)
        nxt = {k: v.detach() for k, v in new.items()}          # head_b: SGD, as in the learner
        for lay in meta.layers:
            d = deltas[lay.key].detach()
            negatives += int((d < 0).sum())
            rows = pack_rows(params, lay) - LR * d.clamp_min(0.0) * pack_rows(grads, lay)
            nxt.update(unpack_rows(rows, lay, params))
        params = nxt
        for k in w0:
            torch.testing.assert_close(floored.params[k], params[k], rtol=1e-5, atol=1e-6, msg=f"step {t} {k}")
    assert negatives > 0                                       # the floor had something to do
    for k in w0:
        torch.testing.assert_close(low.params[k], plain.params[k], rtol=0, atol=0)
    assert not torch.allclose(floored.params["fc1.weight"], plain.params["fc1.weight"])
    tr = floored.trace.to_dict()["groups"]["all"]
    assert tr["frac_negative"] == [0.0] * 4 and all(0 < r for r in tr["descent_ratio"])


@pytest.mark.parametrize("option, bad, words", [
    *[("reset_every", v, "reset_every must be a positive integer") for v in (0, -3, 1.5, True, "100")],
    ("trace", "yes", "trace must be true or false"),
    *[("min_gate", v, "min_gate must be a finite number") for v in ("0", float("nan"), float("inf"), False)],
])
def test_bad_options_of_ours_are_clear_errors(option, bad, words):
    model = TinyNet()
    w0 = param_dict(model)
    ctx = MethodContext(model, w0, LR, meta=build_meta_learner(model, 4, 4))
    with pytest.raises(ValueError, match=words):
        make_learner({"kind": "ours", option: bad}, ctx, w0)


def test_meta_test_runs_carry_the_trace_into_results_and_a_figure(tmp_path):
    from lrmt_fast import results as R

    torch.manual_seed(0)
    model = TinyNet()
    tasks = tiny_two_tasks()
    w0 = param_dict(model)
    cfg = MetaTestConfig(steps=5, every=5, batch=8, batch_a=8, lr=LR)
    readout = Readout(model, ReadoutData(tasks, ReadoutConfig(steps=5)))
    methods = {"ours": {"kind": "ours", "trace": True}, "ours_reset2": {"kind": "ours", "reset_every": 2,
                                                                       "trace": True},
               "ours_plain": {"kind": "ours"}}
    runs = run_meta_test(model, w0, tasks, readout, cfg, methods, [0, 1], meta=perturbed_meta(model),
                         impl="reference", cache_dir=str(tmp_path / "cache"), progress=False)
    for name in ("ours", "ours_reset2"):
        for r in runs[name]:
            assert r["gate_trace"]["steps"] == [1, 2, 3, 4, 5]
    assert "gate_trace" not in runs["ours_plain"][0]
    # the reset changes the rollout from step 3 on, not before
    t0, t1 = runs["ours"][0]["gate_trace"], runs["ours_reset2"][0]["gate_trace"]
    assert t0["c_absmax"][:2] == t1["c_absmax"][:2] and t0["c_absmax"][2] != t1["c_absmax"][2]
    # runs come back from the cache with their trace
    again = run_meta_test(model, w0, tasks, readout, cfg, methods, [0, 1], meta=perturbed_meta(model),
                          impl="reference", cache_dir=str(tmp_path / "cache"), progress=False)
    assert again == runs
    res = R.aggregate(runs, "tiny", "test", [0, 1], {"metatrain": {"max_steps": 3}})
    m = res["methods"]["ours"]["gate_trace"]
    want = [(x + y) / 2 for x, y in zip(runs["ours"][0]["gate_trace"]["c_absmax"],
                                        runs["ours"][1]["gate_trace"]["c_absmax"])]
    assert m["runs"] == 2 and m["c_absmax"] == pytest.approx(want, abs=1e-6)
    assert "gate_trace" not in res["methods"]["ours_plain"]
    paths = R.write_all(res, str(tmp_path / "out"))
    assert (tmp_path / "out" / "gate_trace.png").stat().st_size > 0 and paths["gate_trace"].endswith(".png")
    with open(tmp_path / "out" / "results.json") as f:
        assert json.load(f)["methods"]["ours_reset2"]["gate_trace"]["steps"] == [1, 2, 3, 4, 5]


def test_mean_trace_and_plot_reject_what_they_cannot_combine(tmp_path):
    one = GateTrace()
    assert len(one) == 0 and one.to_dict()["steps"] == []
    a = {"steps": [1, 2], "groups": {"all": {m: [1.0, 2.0] for m in
                                             ("descent_ratio", "frac_negative", "mean", "gate_change")}},
         "c_absmax": [1.0, 3.0], "c_absmean": [0.5, 1.0]}
    b = copy.deepcopy(a)
    b["c_absmax"] = [3.0, 5.0]
    assert mean_trace([a, b])["c_absmax"] == [2.0, 4.0]
    b["steps"] = [1, 2, 3]
    with pytest.raises(ValueError, match="differ"):
        mean_trace([a, b])
    with pytest.raises(ValueError, match="no traces"):
        mean_trace([])
    with pytest.raises(ValueError, match="no traces"):
        plot_gate_traces({}, str(tmp_path / "x.png"))


@pytest.mark.cuda
def test_trace_and_min_gate_on_the_gpu_match_the_cpu():
    """The meta-test of "ours" with trace and min_gate on CUDA (fused CUDA op) gives the CPU
    reference's trace and weights within float32 tolerance over a few steps."""
    model, w0, meta, batches = student(meta_seed=4)
    out = {}
    for dev, impl in (("cpu", "reference"), ("cuda", None)):
        m = copy.deepcopy(model).to(dev)
        learner = OursLearner(m, {k: v.to(dev) for k, v in w0.items()}, copy.deepcopy(meta).to(dev), LR, impl=impl,
                              trace=True, min_gate=0.0)
        for x, y in batches:
            learner.step(x.to(dev), y.to(dev))
        out[dev] = (learner.trace.to_dict(), {k: v.cpu() for k, v in learner.params.items()})
    (tc, pc), (tg, pg) = out["cpu"], out["cuda"]
    for k in pc:
        torch.testing.assert_close(pg[k], pc[k], rtol=1e-4, atol=1e-5)
    for g in tc["groups"]:
        for m, v in tc["groups"][g].items():
            assert tg["groups"][g][m] == pytest.approx(v, rel=1e-3, abs=1e-5), (g, m)
    assert tg["c_absmax"] == pytest.approx(tc["c_absmax"], rel=1e-3)
