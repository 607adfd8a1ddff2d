"""The reference meta-step: shapes, bias handling, SGD at initialisation,
the LSTM cells against torch.nn.LSTM, and gradcheck in float64."""

import pytest
import torch
from torch import nn

from lrmt_fast import reference
from lrmt_fast.meta_learner import (LayerLearner, MetaLearner, find_adapted_layers, op_pre_post,
                                    pack_rows, unpack_rows)
from lrmt_fast.models import LeNet, resnet32_gn


def _inputs(cout=6, p=7, cin=4, H=5, per_neuron=False, dtype=torch.float64):
    w = torch.randn(cout, p, dtype=dtype)
    g = torch.randn(cout, p, dtype=dtype) * 1e-2
    pre = torch.randn(cout if per_neuron else 1, cin, dtype=dtype)
    post = torch.randn(cout, 1, dtype=dtype)
    h = torch.randn(3, cout, H, dtype=dtype) * 0.1
    c = torch.randn(3, cout, H, dtype=dtype) * 0.1
    fs = torch.tensor([1.0, 50.0, 0.5, 2.0], dtype=dtype)
    return w, g, pre, post, h, c, fs


def _theta(p, cin, H, dtype=torch.float64, random_out=True):
    lrn = LayerLearner(p, cin, H).to(dtype)
    if random_out:
        with torch.no_grad():
            lrn.w_out.normal_(0, 0.3)
            lrn.b_out.normal_(0, 0.3)
    return lrn.theta()


@pytest.mark.parametrize("per_neuron", [False, True])
def test_shapes(per_neuron):
    w, g, pre, post, h, c, fs = _inputs(per_neuron=per_neuron)
    th = _theta(7, 4, 5)
    w2, d, h2, c2 = reference.meta_step(w, g, pre, post, h, c, th, 0.1, fs)
    assert w2.shape == w.shape and d.shape == w.shape
    assert h2.shape == h.shape and c2.shape == c.shape


def test_sgd_at_initialisation():
    torch.manual_seed(1)
    w, g, pre, post, h, c, fs = _inputs(dtype=torch.float32)
    th = LayerLearner(7, 4, 5).theta()
    w2, d, _, _ = reference.meta_step(w, g, pre, post, h, c, th, 0.05, fs)
    assert torch.allclose(d, torch.ones_like(d), atol=1e-6)
    torch.testing.assert_close(w2, w - 0.05 * g, rtol=0, atol=1e-6)


def test_student_follows_sgd_at_initialisation():
    """A student updated by a fresh meta-learner equals one updated by plain SGD."""
    torch.manual_seed(2)
    net = LeNet()
    layers = find_adapted_layers(net, hidden=8)
    assert [l.key for l in layers] == ["conv1", "conv2", "fc1"]
    assert layers[0].p == 26 and layers[0].cin_feat == 2 and layers[0].d_in == 26 * 2 + 2 + 1
    ml = MetaLearner(layers)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    grads = {k: torch.randn_like(v) * 1e-2 for k, v in params.items()}
    acts = {"conv1": (torch.rand(1), torch.rand(20)), "conv2": (torch.rand(20), torch.rand(50)),
            "fc1": (torch.rand(800), torch.rand(500))}
    state = ml.init_state()
    new, state, deltas = ml.step(params, grads, acts, state, lr=0.05)
    for k in new:
        torch.testing.assert_close(new[k], params[k] - 0.05 * grads[k], rtol=0, atol=1e-6)


def test_bias_as_synapse_roundtrip():
    net = LeNet()
    lay = find_adapted_layers(net)[2]
    params = dict(net.named_parameters())
    rows = pack_rows(params, lay)
    assert rows.shape == (500, 801)
    torch.testing.assert_close(rows[:, -1], params["fc1.bias"])
    back = unpack_rows(rows, lay, params)
    torch.testing.assert_close(back["fc1.weight"], params["fc1.weight"])
    pre, post = op_pre_post(lay, torch.rand(800), torch.rand(500))
    assert pre.shape == (1, 801) and pre[0, -1] == 1.0 and post.shape == (500, 1)


def test_resnet_layers_have_gn_learners_with_per_neuron_pre():
    net = resnet32_gn()
    layers = find_adapted_layers(net, hidden=64, hidden_gn=32)
    convs = [l for l in layers if l.kind == "conv"]
    gns = [l for l in layers if l.kind.startswith("gn")]
    assert len(convs) == 31 and len(gns) == 62
    assert all(l.bias is None for l in convs)
    assert all(l.p == 1 and l.cin_feat == 1 and l.per_neuron_pre and l.hidden == 32 for l in gns)
    pre, post = op_pre_post(gns[0], torch.rand(16), torch.rand(16))
    assert pre.shape == (16, 1)


def test_lstm_cells_match_torch_nn_lstm():
    """Each of the three cells of the op equals torch.nn.LSTM (num_layers=1) with the same weights."""
    torch.manual_seed(3)
    cout, p, cin, H = 9, 6, 3, 8
    w, g, pre, post, h, c, fs = _inputs(cout, p, cin, H, dtype=torch.float32)
    th = _theta(p, cin, H, dtype=torch.float32)
    x = reference.build_features(w, g, pre, post, fs)
    _, h_new, c_new = reference.meta_gate(x, h, c, th)
    inp = x
    for l in range(3):
        w_ih, w_hh, b = th[3 * l: 3 * l + 3]
        lstm = nn.LSTM(inp.shape[1], H, num_layers=1)
        with torch.no_grad():
            lstm.weight_ih_l0.copy_(w_ih)
            lstm.weight_hh_l0.copy_(w_hh)
            lstm.bias_ih_l0.copy_(b)
            lstm.bias_hh_l0.zero_()
        out, (hn, cn) = lstm(inp.unsqueeze(0), (h[l:l + 1], c[l:l + 1]))
        torch.testing.assert_close(hn[0], h_new[l], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cn[0], c_new[l], rtol=1e-5, atol=1e-6)
        inp = torch.relu(out[0])


@pytest.mark.parametrize("per_neuron", [False, True])
def test_gradcheck_float64(per_neuron):
    torch.manual_seed(4)
    cout, p, cin, H = 3, 4, 2, 3
    w, g, pre, post, h, c, fs = _inputs(cout, p, cin, H, per_neuron=per_neuron)
    th = [t.detach().clone().requires_grad_(True) for t in _theta(p, cin, H)]
    w.requires_grad_(True)
    h.requires_grad_(True)
    c.requires_grad_(True)

    def fn(w, h, c, *theta):
        return reference.meta_step(w, g, pre, post, h, c, theta, 0.3, fs)

    assert torch.autograd.gradcheck(fn, (w, h, c, *th), eps=1e-6, atol=1e-6)


def test_inplace_variant_matches():
    w, g, pre, post, h, c, fs = _inputs(dtype=torch.float32)
    th = _theta(7, 4, 5, dtype=torch.float32)
    w2, d, h2, c2 = reference.meta_step(w, g, pre, post, h, c, th, 0.1, fs)
    ptr = w.data_ptr()
    d_ = reference.meta_step_(w, g, pre, post, h, c, th, 0.1, fs)
    assert w.data_ptr() == ptr
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(d_, d)
