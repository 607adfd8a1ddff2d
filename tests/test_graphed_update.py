"""GraphedMetaUpdate (lrmt_fast/graphed_update.py): the meta-test update through fixed buffers,
replayed as a CUDA graph on a GPU, eager on the CPU."""
import pytest
import torch

from lrmt_fast.bench.cases import build_student
from lrmt_fast import _ext
from lrmt_fast.graphed_update import GraphedMetaUpdate

pytestmark = pytest.mark.skipif(not _ext.AVAILABLE, reason="lrmt_fast._C not built")


def _inputs_of_step(grads, acts, i):
    """Gradients and activations of update step i (new tensors each step, as in a rollout)."""
    gen = torch.Generator().manual_seed(100 + i)
    g = {k: torch.randn(v.shape, generator=gen).to(v) * 1e-3 for k, v in grads.items()}
    a = {m: (torch.rand(p.shape, generator=gen).to(p), torch.randn(q.shape, generator=gen).to(q))
         for m, (p, q) in acts.items()}
    return g, a


def _clone(params, state):
    return ({k: v.clone() for k, v in params.items()}, {k: (h.clone(), c.clone()) for k, (h, c) in state.items()})


def _rollout_matches_eager(model, device, steps):
    ml, params, grads, acts, state = build_student(model, device)
    p_ref, s_ref = _clone(params, state)
    p0, s0 = _clone(params, state)
    ptrs = {k: v.data_ptr() for k, v in params.items()}
    upd = GraphedMetaUpdate(ml, params, grads, acts, state, 0.05)
    for k in params:  # building it (warm-up, capture) leaves the student as it was
        assert torch.equal(params[k], p0[k]), k
    for k in state:
        assert torch.equal(state[k][0], s0[k][0]) and torch.equal(state[k][1], s0[k][1]), k
    for i in range(steps):
        g, a = _inputs_of_step(grads, acts, i)
        deltas = upd(g, a)
        ref_deltas = ml.step_(p_ref, g, a, s_ref, 0.05, impl="fused")
        for k in params:
            torch.testing.assert_close(params[k], p_ref[k], rtol=1e-6, atol=1e-7, msg=f"step {i} {k}")
        for k in state:
            torch.testing.assert_close(state[k][0], s_ref[k][0], rtol=1e-6, atol=1e-7, msg=f"step {i} h {k}")
            torch.testing.assert_close(state[k][1], s_ref[k][1], rtol=1e-6, atol=1e-7, msg=f"step {i} c {k}")
        assert set(deltas) == set(ref_deltas)
        for k in deltas:
            torch.testing.assert_close(deltas[k], ref_deltas[k], rtol=1e-6, atol=1e-7, msg=f"step {i} delta {k}")
    assert {k: v.data_ptr() for k, v in params.items()} == ptrs  # updated in place
    return upd, ml, params, state, p_ref, s_ref


def test_cpu_rollout_through_buffers_matches_step_():
    upd = _rollout_matches_eager("lenet", "cpu", steps=4)[0]
    assert upd.graph is None and not upd.use_graph


def test_reference_path_agrees_with_the_buffered_update():
    """The buffered update against the per-layer PyTorch reference (closeness: the two feature
    scales differ by about one float32 ulp, as in tests/test_fused_ops.py)."""
    ml, params, grads, acts, state = build_student("lenet", "cpu")
    p_ref, s_ref = _clone(params, state)
    upd = GraphedMetaUpdate(ml, params, grads, acts, state, 0.05)
    for i in range(3):
        g, a = _inputs_of_step(grads, acts, i)
        upd(g, a)
        ml.step_(p_ref, g, a, s_ref, 0.05, impl="reference")
    for k in params:
        scale = p_ref[k].abs().max().item()
        torch.testing.assert_close(params[k], p_ref[k], rtol=0, atol=2e-5 * (1 + scale), msg=k)


def test_bad_uses_raise_clear_errors():
    ml, params, grads, acts, state = build_student("lenet", "cpu")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA student"):
        GraphedMetaUpdate(ml, params, grads, acts, state, 0.05, use_graph=True)
    upd = GraphedMetaUpdate(ml, params, grads, acts, state, 0.05)
    g = dict(grads)
    g.pop(next(iter(upd.grads)))
    with pytest.raises(KeyError):
        upd(g, acts)


def test_workspace_buffers_are_this_threads_arenas():
    ml, params, grads, acts, state = build_student("lenet", "cpu")
    ml.step_(params, grads, acts, state, 0.05, impl="fused")
    bufs = _ext.workspace_buffers()
    assert bufs and all(isinstance(b, torch.Tensor) and b.numel() > 0 for b in bufs)
    assert sum(b.numel() * b.element_size() for b in bufs) == _ext.workspace_stats()["this_thread_bytes"]


@pytest.mark.cuda
@pytest.mark.parametrize("model", ["lenet", "resnet32"])
def test_cuda_graph_replay_matches_eager(model):
    if not _ext.cuda_compiled():
        pytest.skip("lrmt_fast._C built without CUDA")
    upd, ml, params, state, p_ref, s_ref = _rollout_matches_eager(model, "cuda", steps=3)
    assert upd.graph is not None
    # the workspace freed and regrown by other op calls on this thread after the capture:
    # the graph holds its own buffers, so its replays stay right
    _ext.workspace_clear()
    big, bp, bg, ba, bs = build_student("resnet32", "cuda", seed=1)
    big.step_(bp, bg, ba, bs, 0.05, impl="fused")
    for i in (7, 8):
        g, a = _inputs_of_step(upd.grads, {m: upd.acts[m] for m in upd.acts}, i)
        upd(g, a)
        ml.step_(p_ref, g, a, s_ref, 0.05, impl="fused")
    torch.cuda.synchronize()
    for k in params:
        torch.testing.assert_close(params[k], p_ref[k], rtol=1e-6, atol=1e-7, msg=k)
    for k in state:
        torch.testing.assert_close(state[k][0], s_ref[k][0], rtol=1e-6, atol=1e-7, msg=k)
