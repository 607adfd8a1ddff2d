"""The fused meta-update op (lrmt_fast._C) against the reference (docs/method.md section 2).

Tolerance rule (float32): the fused result's error against the float64 reference is
at most 2x the float32 reference's own error against float64, plus a tiny
absolute floor for entries the float32 reference gets exactly.
"""
import math

import pytest
import torch
from torch import nn

from lrmt_fast import _ext, ops, reference
from lrmt_fast.meta_learner import LayerLearner, MetaLearner, find_adapted_layers
from lrmt_fast.models import LeNet, ResNetGN, resnet32_gn


F64 = torch.float64
F32 = torch.float32


pytestmark = [pytest.mark.skipif(not _ext.AVAILABLE, reason=f"lrmt_fast._C is not built: {_ext.ERROR}"),
              pytest.mark.usefixtures("one_thread")]     # one_thread: tests/conftest.py


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def make_inputs(cout, p, cin, H, per_neuron=False, seed=0, L=3):
    """float64 inputs with realistic magnitudes: weights ~0.05, gradients ~1e-3, mid-episode state."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, p, generator=gen, dtype=F64) * 0.05
    g = torch.randn(cout, p, generator=gen, dtype=F64) * 1e-3
    pre = torch.rand(cout if per_neuron else 1, cin, generator=gen, dtype=F64)
    post = torch.randn(cout, 1, generator=gen, dtype=F64) * 0.5
    h = torch.randn(L, cout, H, generator=gen, dtype=F64) * 0.2
    c = torch.randn(L, cout, H, generator=gen, dtype=F64) * 0.5
    fs = torch.stack([1.0 / t.pow(2).mean().sqrt() for t in (w, g, pre, post)])
    lrn = LayerLearner(p, cin, H, num_cells=L).to(F64)
    with torch.no_grad():
        for prm in lrn.parameters():
            prm.copy_(torch.empty_like(prm).uniform_(-1, 1, generator=gen) / math.sqrt(H))
        lrn.w_out.normal_(0, 0.5, generator=gen)
        lrn.b_out.normal_(0, 0.5, generator=gen)
    theta = [t.detach().clone() for t in lrn.theta()]
    return dict(w=w, g=g, pre=pre, post=post, h=h, c=c, theta=theta, fs=fs)


def cast(inp, dtype, device="cpu"):
    out = {}
    for k, v in inp.items():
        out[k] = [t.to(device=device, dtype=dtype) for t in v] if isinstance(v, list) else v.to(device=device,
                                                                                                   dtype=dtype)
    return out


def run(inp, impl, lr=0.1, backward=True, seeds=tuple(range(1, 9))):
    """Forward, and the backward of fixed random linear losses (one per seed, through the same
    graph with retain_graph): outputs and grads of w, h, c and theta."""
    w = inp["w"].clone().requires_grad_(backward)
    h = inp["h"].clone().requires_grad_(backward)
    c = inp["c"].clone().requires_grad_(backward)
    theta = [t.clone().requires_grad_(backward) for t in inp["theta"]]
    outs = ops.meta_step(w, inp["g"], inp["pre"], inp["post"], h, c, theta, lr, inp["fs"], impl=impl)
    res = {"w_new": outs[0], "delta": outs[1], "h_new": outs[2], "c_new": outs[3]}
    if backward:
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            loss = sum((o * torch.randn(o.shape, generator=gen, dtype=F64).to(o)).sum() for o in outs)
            for t in (w, h, c, *theta):
                t.grad = None
            loss.backward(retain_graph=True)
            res.update({f"grad_w/{seed}": w.grad, f"grad_h/{seed}": h.grad, f"grad_c/{seed}": c.grad})
            res.update({f"grad_theta{i}/{seed}": t.grad for i, t in enumerate(theta)})
    return {k: v.detach() for k, v in res.items()}


def max_err(a, b):
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


EPS32 = 2.0 ** -23


def assert_rule(fused, ref32, ref64, what):
    """The tolerance rule, per output / gradient tensor: fused error <= 2 x float32 reference
    error + a floor of 2 float32 ulps of the tensor's magnitude (entries the float32
    reference gets exactly).

    Single-element tensors (d scale: one sum over all Cout*P outputs, with cancellation)
    are one random sample each, and a single sample of the float32 reference's error is
    often luckily tiny. For them the rule is applied to the family (every single-element
    gradient, every loss seed): the mean fused error is at most 2x the mean float32
    reference error, each error in units of the quantity's magnitude (max over seeds).
    """
    fam_f, fam_r = [], []
    mags = {}
    for k, v in ref64.items():
        base = k.split("/")[0]
        mags[base] = max(mags.get(base, 0.0), v.abs().max().item())
    for k in ref64:
        mag = 1.0 + mags[k.split("/")[0]]
        e_f = max_err(fused[k], ref64[k])
        e_r = max_err(ref32[k], ref64[k])
        if ref64[k].numel() == 1:
            fam_f.append(e_f / mag)
            fam_r.append(e_r / mag)
            continue
        floor = 2 * EPS32 * mag
        assert e_f <= 2 * e_r + floor, (f"{what}: {k}: fused error {e_f:.3e} > 2 x float32 reference error "
                                        f"{e_r:.3e} + floor {floor:.1e}")
    if fam_f:
        mean_f, mean_r = sum(fam_f) / len(fam_f), sum(fam_r) / len(fam_r)
        assert mean_f <= 2 * mean_r + 2 * EPS32, (
            f"{what}: single-element gradients ({len(fam_f)}): mean fused error {mean_f:.3e} > 2 x mean float32 "
            f"reference error {mean_r:.3e} (relative to magnitude)")


def lenet_shapes():
    layers = find_adapted_layers(LeNet(), hidden=32)
    return [(l.key, l.cout, l.p, l.cin_feat, l.hidden, l.per_neuron_pre) for l in layers]


def resnet_shapes():
    layers = find_adapted_layers(resnet32_gn(), hidden=64, hidden_gn=32)
    seen, out = set(), []
    for l in layers:
        key = (l.kind.startswith("gn"), l.cout, l.p, l.cin_feat, l.hidden)
        if key not in seen:
            seen.add(key)
            out.append((l.key, l.cout, l.p, l.cin_feat, l.hidden, l.per_neuron_pre))
    return out


def test_adapted_layer_shapes():
    assert [s[1:] for s in lenet_shapes()] == [(20, 26, 2, 32, False), (50, 501, 21, 32, False),
                                               (500, 801, 801, 32, False)]
    rs = resnet_shapes()
    assert any(s[5] and s[2] == 1 and s[4] == 32 for s in rs)          # GroupNorm: P=1, per-neuron pre
    assert any((not s[5]) and s[2] == 576 and s[4] == 64 for s in rs)  # 3x3x64 conv without bias


# ------------------------------------------------------------------------------------------
# fused vs reference, float32, every adapted-layer shape of LeNet and ResNet-32 GN
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", lenet_shapes() + resnet_shapes(), ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
def test_fused_matches_reference_forward_backward(shape):
    _, cout, p, cin, H, per_neuron = shape
    inp = make_inputs(cout, p, cin, H, per_neuron=per_neuron, seed=cout + p)
    ref64 = run(inp, "reference")
    ref32 = run(cast(inp, F32), "reference")
    fused = run(cast(inp, F32), "fused")
    assert_rule(fused, ref32, ref64, f"{shape[0]} (Cout={cout}, P={p}, Cin'={cin}, H={H})")


def test_fused_float64_is_exact_to_rounding():
    inp = make_inputs(30, 50, 7, 16, seed=3)
    r = run(inp, "reference")
    f = run(inp, "fused")
    for k in r:
        torch.testing.assert_close(f[k], r[k], rtol=1e-10, atol=1e-12, msg=k)


def test_sgd_at_initialisation_fused():
    torch.manual_seed(1)
    w = torch.randn(6, 7)
    g = torch.randn(6, 7) * 1e-2
    pre, post = torch.randn(1, 4), torch.randn(6, 1)
    h = torch.zeros(3, 6, 5)
    c = torch.zeros(3, 6, 5)
    th = LayerLearner(7, 4, 5).theta()
    w2, d, _, _ = ops.meta_step(w, g, pre, post, h, c, th, 0.05, torch.ones(4), impl="fused")
    torch.testing.assert_close(d, torch.ones_like(d), rtol=0, atol=1e-6)
    torch.testing.assert_close(w2, w - 0.05 * g, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# gradcheck (float64, small shapes)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cout,p,cin,H,per_neuron", [(3, 4, 2, 3, False), (3, 4, 2, 3, True), (4, 1, 1, 3, True),
                                                     (3, 1, 2, 2, False)])
def test_gradcheck_single(cout, p, cin, H, per_neuron):
    inp = make_inputs(cout, p, cin, H, per_neuron=per_neuron, seed=5)
    g, pre, post, fs = inp["g"] * 50, inp["pre"], inp["post"], inp["fs"]
    w = inp["w"].clone().requires_grad_(True)
    h = inp["h"].clone().requires_grad_(True)
    c = inp["c"].clone().requires_grad_(True)
    th = [t.clone().requires_grad_(True) for t in inp["theta"]]

    def fn(w, h, c, *theta):
        return ops.meta_step(w, g, pre, post, h, c, theta, 0.3, fs, impl="fused")

    assert torch.autograd.gradcheck(fn, (w, h, c, *th), eps=1e-6, atol=1e-6)


def _net_inputs_small(seed=0, L=3):
    """Three layers: a conv weight [2,3,1,2] with a bias, a GroupNorm-like P=1 layer, a linear without bias."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    H = [3, 2, 3]
    w = [rnd(2, 3, 1, 2), rnd(4), rnd(3, 5)]
    wb = [rnd(2)]
    g = [rnd(2, 3, 1, 2) * 0.1, rnd(4) * 0.1, rnd(3, 5) * 0.1]
    gb = [rnd(2) * 0.1]
    pre = [rnd(3), rnd(4), rnd(6)]
    post = [rnd(2), rnd(4), rnd(3)]
    flags = [_ext.HAS_BIAS, _ext.PER_NEURON_PRE, 0]
    P = [7, 1, 5]
    cinp = [4, 1, 6]
    h = [rnd(L, co, hh) * 0.3 for co, hh in zip([2, 4, 3], H)]
    c = [rnd(L, co, hh) * 0.3 for co, hh in zip([2, 4, 3], H)]
    theta = []
    for p, ci, hh in zip(P, cinp, H):
        lrn = LayerLearner(p, ci, hh, num_cells=L).to(F64)
        with torch.no_grad():
            lrn.w_out.normal_(0, 0.5, generator=gen)
            lrn.b_out.normal_(0, 0.5, generator=gen)
        theta += [t.detach().clone() for t in lrn.theta()]
    return w, wb, g, gb, pre, post, h, c, theta, flags


# the device-parametrised tests: CPU always, CUDA where a GPU is present (skipped otherwise)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _on(device, *groups):
    if device == "cuda" and not _ext.cuda_compiled():
        pytest.skip("lrmt_fast._C built without CUDA")
    return [[t.to(device) for t in grp] for grp in groups]


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_network_op(device):
    w, wb, g, gb, pre, post, h, c, theta, flags = _net_inputs_small()
    w, wb, g, gb, pre, post, h, c, theta = _on(device, w, wb, g, gb, pre, post, h, c, theta)
    nl, nb, nt = len(w), len(wb), len(theta)
    leaves = [t.clone().requires_grad_(True) for t in (*w, *wb, *h, *c, *theta)]
    # a fixed feature scale: the op's own (fscale=None) is a detached function of w, which
    # finite differences would see
    fs = (torch.rand(nl, 4, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5).to(device)

    def fn(*xs):
        xw, xwb = list(xs[:nl]), list(xs[nl:nl + nb])
        xh, xc = list(xs[nl + nb:2 * nl + nb]), list(xs[2 * nl + nb:3 * nl + nb])
        xth = list(xs[3 * nl + nb:])
        out = torch.ops.lrmt_fast.meta_step_net(xw, xwb, g, gb, pre, post, xh, xc, xth, flags, 0.2, fs, True,
                                                False)
        return (*out[0], *out[1], *out[2], *out[3], *out[4])

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6)


def test_network_op_matches_reference_with_given_fscale():
    """The network op (student-shaped weights, a bias synapse, a per-neuron pre) equals the
    per-layer reference on the packed rows, float64, when both use the same fscale."""
    w, wb, g, gb, pre, post, h, c, theta, flags = _net_inputs_small(seed=2)
    fs = torch.rand(3, 4, generator=torch.Generator().manual_seed(4), dtype=F64) + 0.5
    out = torch.ops.lrmt_fast.meta_step_net(w, wb, g, gb, pre, post, h, c, theta, flags, 0.2, fs, False, False)
    rows = [torch.cat([w[0].reshape(2, -1), wb[0][:, None]], 1), w[1][:, None], w[2]]
    grows = [torch.cat([g[0].reshape(2, -1), gb[0][:, None]], 1), g[1][:, None], g[2]]
    pres = [torch.cat([pre[0], torch.ones(1, dtype=F64)])[None], pre[1][:, None], pre[2][None]]
    nt = len(theta) // 3
    for i in range(3):
        r = reference.meta_step(rows[i], grows[i], pres[i], post[i][:, None], h[i], c[i],
                                theta[i * nt:(i + 1) * nt], 0.2, fs[i])
        wn = out[0][i].reshape(rows[i].shape[0], -1)
        if i == 0:
            wn = torch.cat([wn, out[1][0][:, None]], 1)
        torch.testing.assert_close(wn, r[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[2][i], r[1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[3][i], r[2], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[4][i], r[3], rtol=1e-12, atol=1e-12)


def _net_grads(requires, snapshot=False, bump_theta=False, seed=5):
    """Gradients of a scalar of the network op's outputs w.r.t. the inputs in ``requires``
    (subset of 'w', 'h', 'theta'); None where an input does not require grad."""
    torch.manual_seed(seed)  # the learners' initial weights
    w, wb, g, gb, pre, post, h, c, theta, flags = _net_inputs_small(seed=seed)
    groups = {"w": w + wb, "h": h + c, "theta": theta}
    leaves = {k: [t.clone().requires_grad_(k in requires) for t in v] for k, v in groups.items()}
    xw, xh, xth = leaves["w"], leaves["h"], leaves["theta"]
    fs = torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5
    out = torch.ops.lrmt_fast.meta_step_net(xw[:3], xw[3:], g, gb, pre, post, xh[:3], xh[3:], xth, flags, 0.2, fs,
                                            True, snapshot)
    gen = torch.Generator().manual_seed(9)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=F64)).sum()
               for lst in out[:5] for t in lst)
    if bump_theta:
        with torch.no_grad():
            for t in xth:
                t.add_(0.25)   # an optimiser step between forward and backward
    loss.backward()
    return {k: [t.grad for t in v] for k, v in leaves.items()}


def test_network_op_partial_needs_match_full_backward():
    """The C++ autograd formula (csrc/autograd.cpp) gives each input's gradient whatever
    else requires grad, and none to inputs that do not."""
    full = _net_grads({"w", "h", "theta"})
    for sub in ({"w"}, {"h"}, {"theta"}, {"w", "theta"}):
        part = _net_grads(sub)
        for k in ("w", "h", "theta"):
            for a, b in zip(part[k], full[k]):
                if k in sub:
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
                else:
                    assert a is None


def test_network_op_snapshot_keeps_gradients_of_the_forward_theta():
    ref = _net_grads({"w", "h", "theta"}, snapshot=True)
    bumped = _net_grads({"w", "h", "theta"}, snapshot=True, bump_theta=True)
    for k in ("w", "h", "theta"):
        for a, b in zip(bumped[k], ref[k]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _net_grads({"w", "theta"}, snapshot=False, bump_theta=True)


def test_gemm_paths_agree():
    """The CPU GEMMs on raw pointers (csrc/gemm.h) give the same forward and gradients
    straight through the BLAS and through at::addmm_out over tensor views (the path the
    GPU takes), float64."""
    direct = _ext.build_facts()["cpu_blas_direct"]
    try:
        assert _ext.set_cpu_blas_direct(False) is False
        via_aten = _net_grads({"w", "h", "theta"}, snapshot=True)
        fwd_aten = _net_fwd()
        if direct:
            assert _ext.set_cpu_blas_direct(True) is True
        blas = _net_grads({"w", "h", "theta"}, snapshot=True)
        fwd_blas = _net_fwd()
    finally:
        _ext.set_cpu_blas_direct(True)
    for a, b in zip(fwd_blas, fwd_aten):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for k in ("w", "h", "theta"):
        for a, b in zip(blas[k], via_aten[k]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_cpu_shortcuts_and_cuda_host_path_agree():
    """The whole LeNet student step (fc1: 500 rows, the output layer in row panels on the
    CPU), float64, forward and backward: the CPU's shortcuts (feature scale as the GEMM alpha,
    row panels, BLAS on pointers) against the host code the CUDA path runs (scaled first-cell
    weights, one output GEMM, at::addmm_out), which set_cpu_blas_direct(False) selects."""
    if not _ext.build_facts()["cpu_blas_direct"]:
        pytest.skip("libtorch's BLAS was not found: the CPU runs the CUDA host path only")
    net = _net("lenet")
    ml, params, grads, acts, state = _student(net, 32, 32, F32)
    fs = ops.network_feature_scale(ml.plan, ml.theta_list(), params, grads, acts, state).double()
    ml64, args64 = ml.to(F64), [_as(x, F64) for x in (params, grads, acts, state)]
    short = _net_run(ml64, *args64, "fused_fs", fs=fs)
    try:
        assert _ext.set_cpu_blas_direct(False) is False
        generic = _net_run(ml64, *args64, "fused_fs", fs=fs)
    finally:
        _ext.set_cpu_blas_direct(True)
    assert set(short) == set(generic)
    for k in short:
        torch.testing.assert_close(short[k], generic[k], rtol=1e-10, atol=1e-12, msg=k)


def _net_fwd():
    torch.manual_seed(5)
    w, wb, g, gb, pre, post, h, c, theta, flags = _net_inputs_small(seed=5)
    out = torch.ops.lrmt_fast.meta_step_net(w, wb, g, gb, pre, post, h, c, theta, flags, 0.2, None, False, False)
    return [t for lst in out[:5] for t in lst]


def test_network_op_backward_needs_save():
    w, wb, g, gb, pre, post, h, c, theta, flags = _net_inputs_small()
    th = [t.clone().requires_grad_(True) for t in theta]
    out = torch.ops.lrmt_fast.meta_step_net(w, wb, g, gb, pre, post, h, c, th, flags, 0.2, None, False, False)
    with pytest.raises(RuntimeError, match="save=True"):
        out[0][0].sum().backward()


# ------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------
def test_opcheck_meta_step():
    inp = make_inputs(3, 4, 2, 3, seed=7)
    args = (inp["w"].requires_grad_(True), inp["g"], inp["pre"], inp["post"], inp["h"].requires_grad_(True),
            inp["c"].requires_grad_(True), [t.requires_grad_(True) for t in inp["theta"]], 0.1, inp["fs"], True, False)
    torch.library.opcheck(torch.ops.lrmt_fast.meta_step.default, args)
    args_snap = args[:-1] + (True,)
    torch.library.opcheck(torch.ops.lrmt_fast.meta_step.default, args_snap)


def test_opcheck_meta_step_inplace():
    inp = make_inputs(3, 4, 2, 3, seed=8)
    delta = torch.empty(3, 4, dtype=F64)
    args = (inp["w"], inp["g"], inp["pre"], inp["post"], inp["h"], inp["c"], inp["theta"], 0.1, inp["fs"], delta)
    torch.library.opcheck(torch.ops.lrmt_fast.meta_step_.default, args)


def test_opcheck_network_ops():
    w, wb, g, gb, pre, post, h, c, theta, flags = _net_inputs_small(seed=3)
    rg = lambda ts: [t.clone().requires_grad_(True) for t in ts]  # noqa: E731
    args = (rg(w), rg(wb), g, gb, pre, post, rg(h), rg(c), rg(theta), flags, 0.2, None, True, False)
    torch.library.opcheck(torch.ops.lrmt_fast.meta_step_net.default, args)
    deltas = [torch.empty(2, 7, dtype=F64), torch.empty(4, 1, dtype=F64), torch.empty(3, 5, dtype=F64)]
    args_ = ([t.clone() for t in w], [t.clone() for t in wb], g, gb, pre, post, [t.clone() for t in h],
             [t.clone() for t in c], theta, flags, 0.2, None, deltas)
    torch.library.opcheck(torch.ops.lrmt_fast.meta_step_net_.default, args_)
    torch.library.opcheck(torch.ops.lrmt_fast.feature_scale_net.default, (w, wb, g, gb, pre, post, h, c, theta,
                                                                          flags))


# ------------------------------------------------------------------------------------------
# the three LSTM cells of the fused op reproduce torch.nn.LSTM
# ------------------------------------------------------------------------------------------
def test_fused_lstm_cells_match_torch_nn_lstm():
    cout, p, cin, H = 9, 6, 3, 8
    inp = cast(make_inputs(cout, p, cin, H, seed=11), F32)
    th = inp["theta"]
    _, _, h_new, c_new = ops.meta_step(inp["w"], inp["g"], inp["pre"], inp["post"], inp["h"], inp["c"], th, 0.1,
                                       inp["fs"], impl="fused")
    x = reference.build_features(inp["w"], inp["g"], inp["pre"], inp["post"], inp["fs"])
    for l in range(3):
        w_ih, w_hh, b = th[3 * l: 3 * l + 3]
        lstm = nn.LSTM(x.shape[1], H, num_layers=1)
        with torch.no_grad():
            lstm.weight_ih_l0.copy_(w_ih)
            lstm.weight_hh_l0.copy_(w_hh)
            lstm.bias_ih_l0.copy_(b)
            lstm.bias_hh_l0.zero_()
            out, (hn, cn) = lstm(x.unsqueeze(0), (inp["h"][l:l + 1], inp["c"][l:l + 1]))
        torch.testing.assert_close(h_new[l], hn[0], rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(c_new[l], cn[0], rtol=1e-5, atol=2e-6)
        x = torch.relu(out[0])


# ------------------------------------------------------------------------------------------
# retain_graph and T-BPTT chains through several steps
# ------------------------------------------------------------------------------------------
def _chain(impl, dtype, steps=3, retain_twice=False, device="cpu"):
    inp = cast(make_inputs(7, 9, 3, 4, seed=13), dtype, device)
    theta = [t.clone().requires_grad_(True) for t in inp["theta"]]
    w, h, c = inp["w"], inp["h"], inp["c"]
    grads = []
    for s in range(steps):
        w, _, h, c = ops.meta_step(w, inp["g"] * (s + 1), inp["pre"], inp["post"], h, c, theta, 0.1, inp["fs"],
                                   impl=impl, snapshot=True)
        loss = (w ** 2).sum() + h.sum() + c.pow(2).sum()
        loss.backward(retain_graph=True)
        if retain_twice:
            loss.backward(retain_graph=True)
        grads.append([t.grad.clone() for t in theta])
        with torch.no_grad():  # an optimiser updating theta in place (snapshot keeps the graphs valid)
            for t in theta:
                t.sub_(1e-3 * t.grad)
                t.grad = None
    return grads


@pytest.mark.parametrize("device", DEVICES)
def test_tbptt_chain_and_retain_graph_match_reference(device):
    _on(device)
    ref = _chain("reference", F64)                 # the CPU reference is the truth on every device
    fus = _chain("fused", F64, device=device)
    for a, b in zip(ref, fus):
        for x, y in zip(a, b):
            torch.testing.assert_close(y.cpu(), x, rtol=1e-9, atol=1e-11)
    twice = _chain("fused", F64, retain_twice=True, device=device)
    for a, b in zip(ref[:1], twice[:1]):
        for x, y in zip(a, b):
            torch.testing.assert_close(y.cpu(), 2 * x, rtol=1e-9, atol=1e-11)


def test_backward_without_snapshot_detects_inplace_theta_update():
    inp = make_inputs(4, 5, 2, 3, seed=17)
    theta = [t.clone().requires_grad_(True) for t in inp["theta"]]
    w, _, h, c = ops.meta_step(inp["w"], inp["g"], inp["pre"], inp["post"], inp["h"], inp["c"], theta, 0.1,
                               inp["fs"], impl="fused", snapshot=False)
    with torch.no_grad():
        theta[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        w.sum().backward()


# ------------------------------------------------------------------------------------------
# whole-network step (MetaLearner.step / step_)
# ------------------------------------------------------------------------------------------
def _net(which):
    """LeNet, or ResNet-GN with one block per stage: the same adapted-layer kinds and shapes as
    ResNet-32 GN (stem conv, 16/32/64-channel convs with and without stride, GroupNorm 16/32/64),
    each once instead of five times, so that the float64 reference runs stay short. The
    per-shape test above runs every ResNet-32 shape; the CUDA test runs the full ResNet-32."""
    return LeNet() if which == "lenet" else ResNetGN(blocks_per_stage=1)


def _student(net, H, Hgn, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers = find_adapted_layers(net, hidden=H, hidden_gn=Hgn)
    ml = MetaLearner(layers).to(dtype)
    with torch.no_grad():
        for lrn in ml.learners.values():
            lrn.w_out.normal_(0, 0.3, generator=gen)
            lrn.b_out.normal_(0, 0.3, generator=gen)
    params = {k: v.detach().clone().to(dtype) for k, v in net.named_parameters()}
    grads = {k: (torch.randn(v.shape, generator=gen) * 1e-3).to(dtype) for k, v in params.items()}
    mods = dict(net.named_modules())
    acts = {}
    for l in layers:
        cin = l.cout if l.per_neuron_pre else mods[l.module].weight.shape[1]
        acts[l.module] = (torch.rand(cin, generator=gen).to(dtype), torch.randn(l.cout, generator=gen).to(dtype))
    state = {k: ((torch.randn(h.shape, generator=gen) * 0.2).to(dtype), (torch.randn(h.shape, generator=gen) * 0.5).to(dtype))
             for k, (h, _) in ml.init_state(dtype=dtype).items()}
    return ml, params, grads, acts, state


@pytest.mark.parametrize("which", ["lenet", "resnet32"])
def test_network_feature_scale_matches_python(which):
    from lrmt_fast.meta_learner import feature_scale, op_pre_post, pack_rows
    net = _net(which)
    ml, params, grads, acts, state = _student(net, 8, 8, F32)
    fs = ops.network_feature_scale(ml.plan, ml.theta_list(), params, grads, acts, state)
    for i, lay in enumerate(ml.layers):
        pre, post = op_pre_post(lay, *acts[lay.module])
        ref = feature_scale(pack_rows(params, lay), pack_rows(grads, lay), pre, post)
        torch.testing.assert_close(fs[i], ref, rtol=3e-7, atol=0)


def _net_run(ml, params, grads, acts, state, impl, train=True, fs=None, seeds=(3, 4, 5)):
    """One whole-student step, with the backward of a fixed random linear loss.

    impl "fused" / "reference": MetaLearner.step (each path computes its feature scale);
    "fused_fs": the fused network op with the given feature scale ``fs`` [n_layers, 4];
    "reference_fs": the per-layer reference on the packed rows with the same ``fs``.
    """
    from lrmt_fast.meta_learner import op_pre_post, pack_rows, unpack_rows
    p = {k: v.clone().requires_grad_(train) for k, v in params.items()}
    s = {k: (h.clone().requires_grad_(train), c.clone().requires_grad_(train)) for k, (h, c) in state.items()}
    for prm in ml.parameters():
        prm.grad = None
    if impl in ("fused", "reference"):
        new_p, new_s, deltas = ml.step(p, grads, acts, s, 0.1, impl=impl, snapshot=train)
    elif impl == "fused_fs":
        new_p, new_s, deltas = ops.network_step(ml.plan, ml.theta_list(), p, grads, acts, s, 0.1,
                                                 snapshot=train, fscale=fs)
    else:
        new_p, new_s, deltas = {}, {}, {}
        for i, lay in enumerate(ml.layers):
            pre, post = op_pre_post(lay, *acts[lay.module])
            w_new, d, hn, cn = reference.meta_step(pack_rows(p, lay), pack_rows(grads, lay), pre, post,
                                                   *s[lay.key], ml.learner(lay).theta(), 0.1, fs[i])
            new_p.update(unpack_rows(w_new, lay, p))
            new_s[lay.key] = (hn, cn)
            deltas[lay.key] = d
    res = {f"p:{k}": v for k, v in new_p.items()}
    res.update({f"h:{k}": v[0] for k, v in new_s.items()})
    res.update({f"c:{k}": v[1] for k, v in new_s.items()})
    res.update({f"d:{k}": v for k, v in deltas.items()})
    if train:
        outs = sorted(res.items())
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            loss = sum((v * torch.randn(v.shape, generator=gen).to(v)).sum() for _, v in outs)
            for t in (*ml.parameters(), *p.values(), *[x for hc in s.values() for x in hc]):
                t.grad = None
            loss.backward(retain_graph=True)
            res.update({f"gtheta:{n}/{seed}": prm.grad for n, prm in ml.named_parameters()})
            res.update({f"gp:{k}/{seed}": p[k].grad for k in new_p})
            res.update({f"gh:{k}/{seed}": s[k][0].grad for k in new_s})
            res.update({f"gc:{k}/{seed}": s[k][1].grad for k in new_s})
    return {k: v.detach().clone() for k, v in res.items()}


def _as(d, dtype):
    return {k: (tuple(x.to(dtype) for x in v) if isinstance(v, tuple) else v.to(dtype)) for k, v in d.items()}


@pytest.mark.parametrize("which", ["lenet", "resnet32"])
def test_network_step_matches_reference(which):
    """The whole-network op (one call) under the tolerance rule, every layer, forward and
    backward, with the feature scale the fused path computes given to all three runs."""
    net = _net(which)
    ml, params, grads, acts, state = _student(net, 32 if which == "lenet" else 64, 32, F32)
    fs = ops.network_feature_scale(ml.plan, ml.theta_list(), params, grads, acts, state)
    fus32 = _net_run(ml, params, grads, acts, state, "fused_fs", fs=fs)
    ref32 = _net_run(ml, params, grads, acts, state, "reference_fs", fs=fs)
    ml64 = ml.to(F64)
    ref64 = _net_run(ml64, _as(params, F64), _as(grads, F64), _as(acts, F64), _as(state, F64), "reference_fs",
                     fs=fs.double())
    assert set(fus32) == set(ref64)
    assert_rule(fus32, ref32, ref64, f"{which} network step")


@pytest.mark.parametrize("which", ["lenet", "resnet32"])
def test_metalearner_step_fused_vs_reference(which):
    """MetaLearner.step: fused (one op call, its own feature scale) vs the per-layer reference
    (feature_scale in Python). The two feature scales agree to about one float32 ulp (see
    ops.py), so this is a closeness check, not the 2x rule."""
    net = _net(which)
    ml, params, grads, acts, state = _student(net, 32 if which == "lenet" else 64, 32, F32)
    ref = _net_run(ml, params, grads, acts, state, "reference")
    fus = _net_run(ml, params, grads, acts, state, "fused")
    assert set(fus) == set(ref)
    for k in ref:
        scale = ref[k].abs().max().item()
        torch.testing.assert_close(fus[k], ref[k], rtol=0, atol=2e-5 * (1 + scale), msg=k)


def test_network_step_two_threads():
    """The kernels' parallel paths (row chunks, fixed-order reductions) with 2 threads: the
    same results as with one thread, forward and backward, to rounding."""
    ml, params, grads, acts, state = _student(LeNet(), 32, 32, F32)
    one = _net_run(ml, params, grads, acts, state, "fused", seeds=(3,))
    torch.set_num_threads(2)
    try:
        two = _net_run(ml, params, grads, acts, state, "fused", seeds=(3,))
    finally:
        torch.set_num_threads(1)
    for k in one:
        scale = one[k].abs().max().item()
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5 * (1 + scale), msg=k)


def test_network_step_inplace_keeps_storage_and_matches():
    ml, params, grads, acts, state = _student(LeNet(), 32, 32, F32)
    expect = ml.step(params, grads, acts, state, 0.1, impl="fused")
    ptrs = {k: v.data_ptr() for k, v in params.items()}
    sptrs = {k: (h.data_ptr(), c.data_ptr()) for k, (h, c) in state.items()}
    deltas = ml.step_(params, grads, acts, state, 0.1, impl="fused")
    assert ptrs == {k: v.data_ptr() for k, v in params.items()}
    assert sptrs == {k: (h.data_ptr(), c.data_ptr()) for k, (h, c) in state.items()}
    for k, v in expect[0].items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=0)
    for k, (h, c) in expect[1].items():
        torch.testing.assert_close(state[k][0], h, rtol=0, atol=0)
        torch.testing.assert_close(state[k][1], c, rtol=0, atol=0)
    for k, d in expect[2].items():
        torch.testing.assert_close(deltas[k], d, rtol=0, atol=0)


def test_network_step_sgd_at_initialisation():
    torch.manual_seed(2)
    net = LeNet()
    ml = MetaLearner(find_adapted_layers(net, hidden=8))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    grads = {k: torch.randn_like(v) * 1e-2 for k, v in params.items()}
    acts = {"conv1": (torch.rand(1), torch.rand(20)), "conv2": (torch.rand(20), torch.rand(50)),
            "fc1": (torch.rand(800), torch.rand(500))}
    new, _, _ = ml.step(params, grads, acts, ml.init_state(), lr=0.05, impl="fused")
    for k in new:
        torch.testing.assert_close(new[k], params[k] - 0.05 * grads[k], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# no-grad path: in place, fixed workspace, no per-step allocation
# ------------------------------------------------------------------------------------------
def test_inplace_single_layer_keeps_pointers_and_matches():
    inp = cast(make_inputs(50, 501, 21, 32, seed=19), F32)
    expect = ops.meta_step(inp["w"], inp["g"], inp["pre"], inp["post"], inp["h"], inp["c"], inp["theta"], 0.1,
                           inp["fs"], impl="fused")
    w, h, c = inp["w"].clone(), inp["h"].clone(), inp["c"].clone()
    delta = torch.empty_like(w)
    ptrs = (w.data_ptr(), h.data_ptr(), c.data_ptr(), delta.data_ptr())
    out = ops.meta_step_(w, inp["g"], inp["pre"], inp["post"], h, c, inp["theta"], 0.1, inp["fs"],
                         delta_out=delta, impl="fused")
    assert out is delta
    assert ptrs == (w.data_ptr(), h.data_ptr(), c.data_ptr(), delta.data_ptr())
    for a, b in zip((w, delta, h, c), expect):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inplace_op_called_directly_with_grad_enabled():
    """The in-place op has no autograd formula; called outside torch.no_grad with theta that
    requires grad it still runs (no autograd inside) and gives the no-grad result."""
    inp = cast(make_inputs(6, 7, 3, 5, seed=29), F32)
    theta = [t.clone().requires_grad_(True) for t in inp["theta"]]
    expect = ops.meta_step(inp["w"], inp["g"], inp["pre"], inp["post"], inp["h"], inp["c"], inp["theta"], 0.1,
                           inp["fs"], impl="fused")
    w, h, c, delta = inp["w"].clone(), inp["h"].clone(), inp["c"].clone(), torch.empty(6, 7)
    assert torch.is_grad_enabled()
    torch.ops.lrmt_fast.meta_step_(w, inp["g"], inp["pre"], inp["post"], h, c, theta, 0.1, inp["fs"], delta)
    for a, b in zip((w, delta, h, c), expect):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _theta_by_name(ml):
    """theta in the op's order, read through the public module attributes (no cache)."""
    out = []
    for lay in ml.layers:
        lrn = ml.learner(lay)
        for l in range(lrn.num_cells):
            out += [lrn.w_ih[l], lrn.w_hh[l], lrn.b[l]]
        out += [lrn.w_out, lrn.b_out, lrn.scale]
    return out


def _same_objects(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def test_network_plan_and_theta_list():
    """MetaLearner.plan (the network op's layer plan) and theta_list() (theta packed in the
    op's order): always the learners' current Parameter objects (no cache to go stale)."""
    ml = MetaLearner(find_adapted_layers(_net("resnet"), hidden=4, hidden_gn=3))
    plan = ml.plan
    assert plan is ml.plan and plan.n == len(ml.layers)
    assert plan.keys == tuple(l.key for l in ml.layers)
    assert plan.biases == tuple(l.bias for l in ml.layers if l.bias is not None)
    assert plan.flags == tuple((_ext.HAS_BIAS if l.bias else 0) | (_ext.PER_NEURON_PRE if l.per_neuron_pre else 0)
                               for l in ml.layers)
    assert plan.delta_shapes == tuple((l.cout, l.p) for l in ml.layers)
    with pytest.raises(Exception):
        plan.keys = ()  # frozen
    th = ml.theta_list()
    assert _same_objects(th, _theta_by_name(ml))
    assert th is not ml.theta_list() and _same_objects(th, ml.theta_list())  # a new list, same tensors

    # load_state_dict copies into the same Parameter objects
    sd = {k: v.clone() + 1 for k, v in ml.state_dict().items()}
    ml.load_state_dict(sd)
    assert _same_objects(ml.theta_list(), th)
    torch.testing.assert_close(ml.theta_list()[0], sd["learners.conv1.w_ih.0"])
    # ... or, with assign=True, puts the given tensors in as new Parameters
    ml.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    assert _same_objects(ml.theta_list(), _theta_by_name(ml)) and ml.theta_list()[0] is not th[0]
    # attribute and ParameterList item assignment
    lrn = ml.learner(ml.layers[1])
    lrn.w_out = nn.Parameter(torch.zeros_like(lrn.w_out))
    lrn.w_ih[1] = nn.Parameter(torch.zeros_like(lrn.w_ih[1]))
    assert _same_objects(ml.theta_list(), _theta_by_name(ml))
    assert _same_objects(lrn.theta(), _theta_by_name(ml)[12:24])
    # dtype / device moves, also when they make new Parameter objects
    ml.double()
    assert _same_objects(ml.theta_list(), _theta_by_name(ml)) and ml.theta_list()[0].dtype == torch.float64
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        before = ml.theta_list()
        ml.float()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert ml.theta_list()[0] is not before[0]
    assert _same_objects(ml.theta_list(), _theta_by_name(ml)) and ml.theta_list()[0].dtype == torch.float32
    # a copy has its own parameters
    import copy
    cp = copy.deepcopy(ml)
    assert _same_objects(cp.theta_list(), _theta_by_name(cp)) and cp.theta_list()[0] is not ml.theta_list()[0]


def _alloc_bytes_under_profiler(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage and e.cpu_memory_usage > 0]


def test_inplace_step_allocates_nothing_per_step():
    ml, params, grads, acts, state = _student(LeNet(), 32, 32, F32)
    deltas = [torch.empty(l.cout, l.p) for l in ml.layers]
    plan = ml.plan
    step = lambda: ops.network_step_(plan, ml.theta_list(), params, grads, acts, state, 0.1,  # noqa: E731
                                     delta_out=deltas)
    step()  # warm: the workspace is sized here
    stats = _ext.workspace_stats()
    ids = {k: (id(v), v.data_ptr()) for k, v in params.items()}
    for _ in range(3):
        step()
    assert _ext.workspace_stats()["allocations"] == stats["allocations"]
    assert _ext.workspace_stats()["this_thread_bytes"] == stats["this_thread_bytes"]
    assert ids == {k: (id(v), v.data_ptr()) for k, v in params.items()}
    # the c10 allocator sees no tensor of [Cout, P] or [Cout, 4H] size during a warm step
    smallest = min(min(l.cout * l.p, l.cout * 4 * l.hidden) for l in ml.layers) * 4
    allocs = _alloc_bytes_under_profiler(step)
    assert all(a < smallest for a in allocs), f"allocations during a warm in-place step: {allocs}"


def test_workspace_cache_is_shared_and_stable_across_shapes():
    inp_a = cast(make_inputs(20, 26, 2, 32, seed=1), F32)
    inp_b = cast(make_inputs(50, 501, 21, 32, seed=2), F32)
    for inp in (inp_b, inp_a):
        ops.meta_step_(inp["w"], inp["g"], inp["pre"], inp["post"], inp["h"], inp["c"], inp["theta"], 0.1,
                       inp["fs"], delta_out=torch.empty_like(inp["w"]), impl="fused")
    n = _ext.workspace_stats()["allocations"]
    for _ in range(3):
        for inp in (inp_a, inp_b):
            ops.meta_step_(inp["w"], inp["g"], inp["pre"], inp["post"], inp["h"], inp["c"], inp["theta"], 0.1,
                           inp["fs"], delta_out=torch.empty_like(inp["w"]), impl="fused")
    assert _ext.workspace_stats()["allocations"] == n


def _train_window(ml, params, grads, acts, state, steps=3):
    p, st = params, state
    for _ in range(steps):
        new, st, _ = ops.network_step(ml.plan, ml.theta_list(), p, grads, acts, st, 0.1, snapshot=True)
        p = {**p, **new}
    sum(v.sum() for v in new.values()).backward()
    ml.zero_grad(set_to_none=True)   # theta's gradients are pool tensors too


def test_cpu_pool_reuses_the_blocks_of_a_training_window():
    """The ops' outputs (saved buffers, snapshots, new weights, gradients) come from the CPU
    pool (csrc/cpu_pool.h): a second T-BPTT window takes no block from the system, and every
    block is back in the cache once the window's graph is gone."""
    ml, params, grads, acts, state = _student(LeNet(), 32, 32, F32)
    _ext.cpu_pool_set_limit(1 << 30)
    try:
        _train_window(ml, params, grads, acts, state)
        s0 = _ext.cpu_pool_stats()
        assert s0["live_bytes"] == 0 and s0["cached_bytes"] > 0
        _train_window(ml, params, grads, acts, state)
        s1 = _ext.cpu_pool_stats()
        assert s1["os_allocations"] == s0["os_allocations"]
        assert s1["reuses"] > s0["reuses"]
        assert s1["live_bytes"] == 0 and s1["cached_bytes"] == s0["cached_bytes"]
        # off: nothing cached, the tensors come from the default allocator
        _ext.cpu_pool_set_limit(0)
        _train_window(ml, params, grads, acts, state)
        s2 = _ext.cpu_pool_stats()
        assert s2["cached_bytes"] == 0 and s2["os_allocations"] == s1["os_allocations"]
    finally:
        _ext.cpu_pool_set_limit(1 << 30)


def test_cpu_pool_tensors_are_seen_by_the_profiler():
    """Memory measurements (benchmarks/measure.py) see the pool's tensors as live bytes."""
    ml, params, grads, acts, state = _student(LeNet(), 32, 32, F32)
    _train_window(ml, params, grads, acts, state)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _train_window(ml, params, grads, acts, state)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    # the graph of the 3-step window holds 3 `saved` buffers of fc1 at once (pool tensors)
    fc1 = next(l for l in ml.layers if l.cout == 500)
    saved_fc1 = (3 * fc1.cout * 4 * fc1.hidden + fc1.cout * fc1.p) * 4
    assert peak >= 3 * saved_fc1
    assert abs(cur) < saved_fc1      # and all of it freed by the end


def test_cpu_pool_limit_env_is_checked():
    import subprocess
    import sys
    code = "import lrmt_fast._ext as e; print(e.cpu_pool_stats())"  # the first use of the pool reads it
    r = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "LRMT_CPU_POOL_MB": "lots"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "LRMT_CPU_POOL_MB" in r.stderr


# ------------------------------------------------------------------------------------------
# 20 meta-training steps through the meta-training loop (lrmt_fast.meta_training): fused (the
# default implementation) == reference
# ------------------------------------------------------------------------------------------
def _metatrain_20(impl, dtype, device="cpu"):
    """One episode of 20 steps of Algorithm 1 (teacher SGD, student meta-update, Huber meta-loss,
    Adam on theta, T-BPTT over 5 steps) on LeNet, run by ``lrmt_fast.meta_training.metatrain``.
    ``impl=None`` is the loop's default. The loop builds everything in the default dtype."""
    from lrmt_fast.meta_training import MetaTrainConfig, TensorTaskStream, metatrain
    from lrmt_fast.student import param_dict
    torch.manual_seed(0)  # everything drawn in float32, then cast: the same start in both dtypes
    model = LeNet().to(dtype)
    gen = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(32, 1, 28, 28, generator=gen), torch.randn(32, 1, 28, 28, generator=gen) + 0.3
    ya, yb = torch.randint(0, 10, (32,), generator=gen), torch.randint(0, 10, (32,), generator=gen)
    stream = TensorTaskStream(param_dict(model), xa.to(dtype), ya, xb.to(dtype), yb, 8, 8, device=device)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        cfg = MetaTrainConfig(episodes=1, max_steps=20, lr=0.1, hidden=8, hidden_gn=8, batch_a=8, batch_b=8,
                              bptt_start=5, bptt_max=5, thresh_start=1e9, thresh_max=1e9, impl=impl,
                              device=device)
        meta, hist = metatrain(model, stream, cfg, progress=False)
    finally:
        torch.set_default_dtype(old)
    assert hist[0]["steps"] == 20 and not hist[0]["restarted"]
    return {n: p.detach().cpu().clone() for n, p in meta.named_parameters()}


@pytest.fixture
def _loop_in_default_dtype(monkeypatch):
    """The meta-training loop entirely in the default dtype (float64 for the reference runs),
    from the same float32-drawn start in every dtype."""
    import lrmt_fast.meta_training as mt
    # run_episode calls meta.init_state(device=...) without a dtype (float32 state); let the
    # state follow the default dtype so that the whole loop runs in float64 for the reference
    orig_init = MetaLearner.init_state
    monkeypatch.setattr(MetaLearner, "init_state",
                        lambda self, device=None, dtype=None: orig_init(self, device, dtype or torch.get_default_dtype()))
    # theta initialised in float32 and cast, so that both dtypes start from the same values
    orig_build = mt.build_meta_learner

    def build32(model, hidden=32, hidden_gn=32):
        dt = torch.get_default_dtype()
        torch.set_default_dtype(F32)
        try:
            return orig_build(model, hidden, hidden_gn).to(dt)
        finally:
            torch.set_default_dtype(dt)

    monkeypatch.setattr(mt, "build_meta_learner", build32)


@pytest.mark.slow
def test_twenty_meta_training_steps_match_reference(monkeypatch, _loop_in_default_dtype):
    assert ops.resolve_impl(None) == "fused", "the fused op must be the default on CPU when it is built"
    calls = []
    real = ops.network_step

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.delenv("LRMT_IMPL", raising=False)
    monkeypatch.setattr(ops, "network_step", counting)
    fus64 = _metatrain_20(None, F64)
    assert len(calls) == 20, "the loop's default path did not run the fused network op every step"
    fus32 = _metatrain_20(None, F32)
    monkeypatch.setattr(ops, "network_step", real)
    ref64 = _metatrain_20("reference", F64)
    ref32 = _metatrain_20("reference", F32)
    for k in ref64:
        # float64: the same computation up to rounding (Adam turns rounding-level differences of
        # near-zero meta-gradients into up to ~1e-7 differences of theta after 20 steps)
        torch.testing.assert_close(fus64[k], ref64[k], rtol=1e-6, atol=1e-6, msg=k)
        # float32: the tolerance rule against the float64 reference, per meta-parameter tensor
        e_f, e_r = max_err(fus32[k], ref64[k]), max_err(ref32[k], ref64[k])
        floor = 2 * EPS32 * (1 + ref64[k].abs().max().item())
        assert e_f <= 2 * e_r + floor, f"{k}: fused32 error {e_f:.2e} > 2 x reference32 error {e_r:.2e}"


# ------------------------------------------------------------------------------------------
# bad inputs raise a clear error naming the argument
# ------------------------------------------------------------------------------------------
def _good(dtype=F32):
    inp = cast(make_inputs(4, 5, 3, 6, seed=23), dtype)
    return [inp["w"], inp["g"], inp["pre"], inp["post"], inp["h"], inp["c"], inp["theta"], 0.1, inp["fs"]]


@pytest.mark.parametrize("case,match", [
    ("w_3d", "'w' must have shape"),
    ("g_shape", "'g' must have the shape"),
    ("pre_shape", "'pre' must have shape"),
    ("post_shape", "'post' must have shape"),
    ("c_shape", "'c' must have shape"),
    ("theta_count", "theta must hold 3L\\+3"),
    ("w_ih0_shape", "'theta\\[0\\]' \\(w_ih of cell 0\\) must have shape"),
    ("w_out_shape", "'theta\\[9\\]' \\(w_out\\) must have shape"),
    ("g_dtype", "'g' has dtype"),
    ("int_dtype", "'w' must be float32 or float64"),
    ("h_noncontig", "'h' must be contiguous"),
    ("fscale_shape", "'fscale' must have shape"),
])
def test_bad_inputs_raise_clear_errors(case, match):
    a = _good()
    if case == "w_3d":
        a[0] = a[0][None]
    elif case == "g_shape":
        a[1] = a[1][:, :4].contiguous()
    elif case == "pre_shape":
        a[2] = torch.zeros(2, 3)
    elif case == "post_shape":
        a[3] = torch.zeros(4)
    elif case == "c_shape":
        a[5] = a[5][:2].contiguous()
    elif case == "theta_count":
        a[6] = a[6][:-1]
    elif case == "w_ih0_shape":
        a[6] = [a[6][0][:, :-1].contiguous()] + a[6][1:]
    elif case == "w_out_shape":
        a[6] = a[6][:9] + [torch.zeros(4, 6)] + a[6][10:]
    elif case == "g_dtype":
        a[1] = a[1].double()
    elif case == "int_dtype":
        a[0] = a[0].int()
    elif case == "h_noncontig":
        a[4] = a[4].transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "fscale_shape":
        a[8] = torch.ones(3)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lrmt_fast.meta_step(*a)


def test_bad_inputs_network_op_name_the_layer():
    w, wb, g, gb, pre, post, h, c, theta, flags = _net_inputs_small()
    bad_post = list(post)
    bad_post[2] = torch.zeros(5, dtype=F64)
    with pytest.raises(RuntimeError, match=r"'post\[2\]' must have Cout=3"):
        torch.ops.lrmt_fast.meta_step_net(w, wb, g, gb, pre, bad_post, h, c, theta, flags, 0.1, None, False, False)
    with pytest.raises(RuntimeError, match="wb and gb must hold one tensor per layer with a bias"):
        torch.ops.lrmt_fast.meta_step_net(w, [], g, [], pre, post, h, c, theta, flags, 0.1, None, False, False)
    nc = [t.transpose(0, 1) if t.dim() == 2 else t for t in w]
    with pytest.raises(RuntimeError, match=r"'w\[2\]' must be contiguous"):
        torch.ops.lrmt_fast.meta_step_net_(nc, wb, g, gb, pre, post, h, c, theta, flags, 0.1, None, [])


def test_inplace_wrapper_rejects_noncontiguous_target():
    a = _good()
    w = a[0].t().contiguous().t()
    with pytest.raises(RuntimeError, match="'w' must be contiguous"):
        ops.meta_step_(w, *a[1:], impl="fused")


# ------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("shape", lenet_shapes() + resnet_shapes(), ids=lambda s: f"{s[0]}-{s[1]}x{s[2]}")
def test_cuda_fused_matches_reference(shape):
    if not _ext.cuda_compiled():
        pytest.skip("lrmt_fast._C built without CUDA")
    _, cout, p, cin, H, per_neuron = shape
    inp = make_inputs(cout, p, cin, H, per_neuron=per_neuron, seed=cout + p)
    ref64 = run(inp, "reference")
    ref32 = run(cast(inp, F32), "reference")
    fused = run(cast(inp, F32, "cuda"), "fused")
    assert_rule(fused, ref32, ref64, f"CUDA {shape[0]}")


@pytest.mark.cuda
def test_cuda_gradcheck_and_opcheck():
    if not _ext.cuda_compiled():
        pytest.skip("lrmt_fast._C built without CUDA")
    inp = cast(make_inputs(3, 4, 2, 3, seed=5), F64, "cuda")
    w = inp["w"].requires_grad_(True)
    h = inp["h"].requires_grad_(True)
    c = inp["c"].requires_grad_(True)
    th = [t.requires_grad_(True) for t in inp["theta"]]

    def fn(w, h, c, *theta):
        return ops.meta_step(w, inp["g"] * 50, inp["pre"], inp["post"], h, c, theta, 0.3, inp["fs"], impl="fused")

    assert torch.autograd.gradcheck(fn, (w, h, c, *th), eps=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.lrmt_fast.meta_step.default,
                          (w, inp["g"], inp["pre"], inp["post"], h, c, th, 0.1, inp["fs"], True, False))


@pytest.mark.cuda
def test_cuda_device_mismatch_is_named():
    if not _ext.cuda_compiled():
        pytest.skip("lrmt_fast._C built without CUDA")
    a = _good()
    a = [t.cuda() if isinstance(t, torch.Tensor) else ([x.cuda() for x in t] if isinstance(t, list) else t)
         for t in a]
    a[3] = a[3].cpu()
    with pytest.raises(RuntimeError, match="'post' is on cpu"):
        torch.ops.lrmt_fast.meta_step(*a)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["lenet", "resnet32"])
def test_cuda_network_step_matches_and_graph_captures(which):
    if not _ext.cuda_compiled():
        pytest.skip("lrmt_fast._C built without CUDA")
    net = LeNet() if which == "lenet" else resnet32_gn()
    ml, params, grads, acts, state = _student(net, 32 if which == "lenet" else 64, 32, F32)
    ref = ml.step(params, grads, acts, state, 0.1, impl="reference")
    mlc = ml.cuda()
    P = {k: v.cuda() for k, v in params.items()}
    G = {k: v.cuda() for k, v in grads.items()}
    A = {k: (a.cuda(), b.cuda()) for k, (a, b) in acts.items()}
    S = {k: (h.cuda(), c.cuda()) for k, (h, c) in state.items()}
    deltas = [torch.empty(l.cout, l.p, device="cuda") for l in mlc.layers]
    P0 = {k: v.clone() for k, v in P.items()}
    S0 = {k: (h.clone(), c.clone()) for k, (h, c) in S.items()}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: sizes the workspace
        ops.network_step_(mlc.plan, mlc.theta_list(), P, G, A, S, 0.1, delta_out=deltas)
    torch.cuda.current_stream().wait_stream(s)
    for k in ref[0]:
        torch.testing.assert_close(P[k].cpu(), ref[0][k], rtol=1e-4, atol=1e-5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.network_step_(mlc.plan, mlc.theta_list(), P, G, A, S, 0.1, delta_out=deltas)
    for k in P:  # replay from the initial values: same result as eager
        P[k].copy_(P0[k])
    for k in S:
        S[k][0].copy_(S0[k][0])
        S[k][1].copy_(S0[k][1])
    graph.replay()
    torch.cuda.synchronize()
    for k in ref[0]:
        torch.testing.assert_close(P[k].cpu(), ref[0][k], rtol=1e-4, atol=1e-5)


@pytest.fixture
def _no_tf32():
    """Full float32 on the GPU (cuDNN convolutions and cuBLAS GEMMs), so that float32 means the
    same on both devices; restored afterwards."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.cuda
def test_cuda_twenty_meta_training_steps_follow_the_rule(_no_tf32, _loop_in_default_dtype):
    """Algorithm 1 on the GPU through the loop (teacher, student, meta-loss, T-BPTT through the
    fused CUDA op's backward, Adam): the fused float32 meta-parameters after 20 steps are within
    the tolerance rule of the float32 reference on the same GPU, both against the float64 CPU
    reference (the same computation as test_twenty_meta_training_steps_match_reference)."""
    _on("cuda")
    ref64 = _metatrain_20("reference", F64)
    ref32 = _metatrain_20("reference", F32, device="cuda")
    fus32 = _metatrain_20("fused", F32, device="cuda")
    for k in ref64:
        e_f, e_r = max_err(fus32[k], ref64[k]), max_err(ref32[k], ref64[k])
        floor = 2 * EPS32 * (1 + ref64[k].abs().max().item())
        assert e_f <= 2 * e_r + floor, f"{k}: fused32 (CUDA) error {e_f:.2e} > 2 x reference32 error {e_r:.2e}"


@pytest.mark.parametrize("model,device", [("lenet", "cpu"), ("resnet32", "cpu"),
                                          pytest.param("lenet", "cuda", marks=pytest.mark.cuda),
                                          pytest.param("resnet32", "cuda", marks=pytest.mark.cuda)])
def test_meta_train_window_follows_the_rule(model, device, _no_tf32, monkeypatch):
    """The meta-train step of a whole student (5 unrolled steps, backward): fused float32 against
    the float32 reference on the same device, both against the float64 CPU reference, per
    meta-parameter gradient (the rule of this module, with errors as norms over each tensor).

    The rule needs a window in which float32 rounding cannot move an LSTM output across the
    ReLU's kink (a flipped unit changes a gradient by its whole contribution; seed 0 of ResNet-32
    has a pre-ReLU value of 3e-9 in step 5, and the fused float32 result flips it). The seed
    below is one whose float64 reference keeps every pre-ReLU value of the window at least 1e-7
    away from zero; this is checked first."""
    from lrmt_fast.bench.cases import train_window_grads
    _on(device)
    seed = 5 if model == "resnet32" else 0
    smallest = []
    cell = reference.lstm_cell

    def watched(*a):
        h, c = cell(*a)
        smallest.append(h.detach().abs().min().item())
        return h, c

    monkeypatch.setattr(reference, "lstm_cell", watched)
    ref64 = train_window_grads(model, "cpu", F64, "reference", seed=seed)
    monkeypatch.setattr(reference, "lstm_cell", cell)
    if model == "resnet32":
        assert min(smallest) > 1e-7, f"seed {seed}: a pre-ReLU value {min(smallest):.1e} sits at the kink"
    ref32 = train_window_grads(model, device, F32, "reference", seed=seed)
    fus32 = train_window_grads(model, device, F32, "fused", seed=seed)
    assert set(fus32) == set(ref64)
    fam_f, fam_r = [], []
    for k in ref64:
        # errors as norms over the tensor (a whole-network window has ~1,100 meta-parameter
        # tensors, and one entry's maximum error is a noisy statistic at these sizes)
        r = ref64[k]
        e_f, e_r = (fus32[k].double() - r).norm().item(), (ref32[k].double() - r).norm().item()
        if r.numel() == 1:   # single elements: as a family (assert_rule's docstring says why)
            fam_f.append(e_f / (1.0 + r.abs().item()))
            fam_r.append(e_r / (1.0 + r.abs().item()))
            continue
        floor = 2 * EPS32 * r.norm().item()
        assert e_f <= 2 * e_r + floor, f"{model} {k}: fused error {e_f:.3e} > 2 x reference {e_r:.3e} + {floor:.1e}"
    assert sum(fam_f) <= 2 * sum(fam_r) + 2 * EPS32 * len(fam_f), (model, sum(fam_f), sum(fam_r))

