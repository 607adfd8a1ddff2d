"""Figures 6 and 7: the delta histogram (counts, negative share, merge, JSON round trip),
recording of meta-test updates only, and the figure files."""
import torch

from lrmt_fast.baselines import OursLearner
from lrmt_fast.figures import DeltaHistogram, figure6, figure7, record_deltas
from lrmt_fast.meta_training import MetaTrainConfig, TensorTaskStream, metatrain
from lrmt_fast.steps import student_meta_update
from lrmt_fast.student import param_dict

from tinynet import TinyNet, tiny_data


def test_histogram_counts_and_negative_share():
    h = DeltaHistogram(-2.0, 2.0, 40)
    d = torch.tensor([-1.5, -0.05, 0.0, 0.3, 1.0, 1.0, 1.99])
    h.add(d, "conv / linear")
    h.add(torch.tensor([[0.5, -0.5]]), "GroupNorm gamma / beta")
    s = h.summary()
    assert s["all"]["n"] == 9 and abs(s["all"]["frac_negative"] - 3 / 9) < 1e-12
    assert s["conv / linear"]["n"] == 7 and abs(s["conv / linear"]["frac_negative"] - 2 / 7) < 1e-12
    assert abs(s["all"]["mean"] - float(torch.cat([d, torch.tensor([0.5, -0.5])]).double().mean())) < 1e-12
    assert s["all"]["min"] == -1.5 and abs(s["all"]["max"] - 1.99) < 1e-6
    g = h.groups["all"]["counts"]
    assert sum(g) == 9 and g[0] == 0 and g[int((-1.5 + 2) / 0.1)] == 1 and g[int((1.0 + 2) / 0.1)] == 2
    h2 = DeltaHistogram.from_dict(h.to_dict())
    h2.merge(h)
    assert h2.summary()["all"]["n"] == 18 and sum(h2.groups["all"]["counts"]) == 18
    assert abs(h2.summary()["all"]["frac_negative"] - 3 / 9) < 1e-12


def _trained(episodes=4):
    torch.manual_seed(0)
    model = TinyNet()
    xa, ya, xb, yb = tiny_data()
    cfg = MetaTrainConfig(episodes=episodes, max_steps=6, lr=0.1, hidden=4, hidden_gn=3, batch_a=8, batch_b=8,
                          bptt_start=2, bptt_inc=1, bptt_max=3, thresh_start=0.5, thresh_inc=0.5, thresh_max=1.5,
                          schedule_every=2, impl="reference")
    meta, hist = metatrain(model, TensorTaskStream(param_dict(model), xa, ya, xb, yb, 8, 8), cfg, progress=False)
    return model, meta, hist, (xb, yb)


def test_records_meta_test_updates_only(tmp_path):
    model, meta, hist, (xb, yb) = _trained()
    h = DeltaHistogram.for_meta(meta)
    n_syn = sum(l.cout * l.p for l in meta.layers)
    probe = DeltaHistogram(h.lo, h.hi, h.bins)
    learner = OursLearner(model, param_dict(model), meta, 0.1)
    deltas = []
    with record_deltas(probe):
        for i in range(3):
            _, _, d, _ = student_meta_update(model, learner.meta, learner.params, learner.state, xb[:8], yb[:8],
                                             0.1, train=False)
            deltas.append(torch.cat([v.reshape(-1) for v in d.values()]))
    allv = torch.cat(deltas).double()
    assert probe.summary()["all"]["n"] == allv.numel() == 3 * n_syn
    assert abs(probe.groups["all"]["sum"] - float(allv.sum())) < 1e-9 * allv.numel()
    assert probe.groups["all"]["neg"] == int((allv < 0).sum())
    with record_deltas(h):
        # a meta-training step (graph to theta) is not recorded
        student_meta_update(model, meta, param_dict(model), meta.init_state(), xb[:8], yb[:8], 0.1, train=True)
        assert h.groups == {}
        for i in range(3):   # the shared rollout's learner for "ours"
            learner.step(xb[8 * i:8 * i + 8], yb[8 * i:8 * i + 8])
        # step_ (in-place meta-test update) is recorded once per call, not twice
        params = {k: v.clone() for k, v in param_dict(model).items()}
        from lrmt_fast.student import grads_and_acts
        _, grads, acts = grads_and_acts(model, params, xb[:8], yb[:8], "b", [l.module for l in meta.layers])
        meta.step_(params, grads, acts, meta.init_state(), 0.1)
    s = h.summary()["all"]
    assert s["n"] == n_syn * (3 + 1)
    assert h.lo < s["min"] and s["max"] < h.hi
    # outside the block nothing is recorded any more
    learner.step(xb[:8], yb[:8])
    assert h.summary()["all"]["n"] == s["n"]
    p6 = figure6(hist, str(tmp_path / "fig6.png"), max_steps=6)
    p7 = figure7(h, str(tmp_path / "fig7.png"))
    for p in (p6, p7):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [r["threshold"] for r in hist] == [0.5, 0.5, 1.0, 1.0] and [r["bptt"] for r in hist] == [2, 2, 3, 3]


def test_figure_inputs_must_be_nonempty(tmp_path):
    import pytest
    with pytest.raises(ValueError, match="empty"):
        figure6([], str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="no deltas"):
        figure7(DeltaHistogram(), str(tmp_path / "b.png"))


def test_curve_styles_keep_the_paper_colours_and_give_other_methods_distinct_ones():
    from lrmt_fast.results import _STYLE, _styles
    names = ["freeze", "sgd", "ours", "ours_reset100", "ours_min_gate0", "ewc_100", "teacher"]
    st = _styles(names)
    assert all(st[m] == _STYLE[m] for m in ("freeze", "sgd", "ours", "teacher"))
    colours = [c for _, c in st.values()]
    assert len(set(colours)) == len(colours)                  # no two methods share a colour
    assert {st[m][0] for m in ("ours_reset100", "ours_min_gate0", "ewc_100")} == {":"}
