// lrmt_fast._C: the autograd formulas of meta_step and meta_step_net, in C++.
//
// meta_step_net is the op of every meta-training step (one call for all adapted layers of
// a student); meta_step is the same step for one layer. Both backwards are the one op
// meta_step_net_backward (meta_step's as a network of one layer). Both formulas are
// registered here at the Autograd dispatch key as torch::autograd::Function s, so a step
// builds its graph node without Python: the torch.library Python wrapper (pytree flattening
// of ~50 tensors, a Python ctx per step) cost ~0.4-0.6 ms per LeNet step forward and about
// as much backward (docs/performance.md).
//
// Both halves call the ops through the dispatcher (below autograd), so the fake kernels of
// _ext.py serve FakeTensor / torch.compile / opcheck as before.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "layer.h"  // kPerNeuronPre

namespace lrmt {
namespace {

using at::Tensor;
using at::TensorList;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptList = c10::List<std::optional<Tensor>>;

using NetOut = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                          std::vector<Tensor>, Tensor, Tensor, Tensor>;
using NetFwdSig = NetOut(TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                         TensorList, TensorList, at::IntArrayRef, double, const std::optional<Tensor>&, bool, bool);
using NetGrads = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                            std::vector<Tensor>>;
using NetBwdSig = NetGrads(const OptList&, const OptList&, const OptList&, const OptList&, const OptList&,
                           TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
                           TensorList, TensorList, at::IntArrayRef, double, const Tensor&, TensorList, TensorList,
                           const Tensor&, const Tensor&, bool, bool, bool);

using SingleOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using SingleFwdSig = SingleOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, TensorList, double, const Tensor&, bool, bool);

const c10::TypedOperatorHandle<SingleFwdSig>& single_fwd_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lrmt_fast::meta_step", "").typed<SingleFwdSig>();
  return op;
}
const c10::TypedOperatorHandle<NetFwdSig>& fwd_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lrmt_fast::meta_step_net", "").typed<NetFwdSig>();
  return op;
}
const c10::TypedOperatorHandle<NetBwdSig>& bwd_op() {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lrmt_fast::meta_step_net_backward", "").typed<NetBwdSig>();
  return op;
}

std::vector<Tensor> take(const variable_list& v, size_t& at, size_t n) {
  std::vector<Tensor> out(v.begin() + at, v.begin() + at + n);
  at += n;
  return out;
}

OptList opt_list(const variable_list& v, size_t at, size_t n) {
  OptList out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& t = v[at + i];
    out.push_back(t.defined() ? std::optional<Tensor>(t) : std::nullopt);
  }
  return out;
}

bool any_need(AutogradContext* ctx, size_t at, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (ctx->needs_input_grad(at + i)) return true;
  return false;
}

struct MetaStepNetFn : public torch::autograd::Function<MetaStepNetFn> {
  // Forward arguments, in the op's order; the tensor lists become nl / nb / nt graph inputs
  // each, fscale one when given.
  static variable_list forward(AutogradContext* ctx, TensorList w, TensorList wb, TensorList g, TensorList gb,
                               TensorList pre, TensorList post, TensorList h, TensorList c, TensorList theta,
                               at::IntArrayRef flags, double lr, const std::optional<Tensor>& fscale, bool save,
                               bool snapshot) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto out = fwd_op().call(w, wb, g, gb, pre, post, h, c, theta, flags, lr, fscale, save, snapshot);
    const int64_t nl = static_cast<int64_t>(w.size()), nb = static_cast<int64_t>(wb.size());
    const int64_t nt = static_cast<int64_t>(theta.size());
    auto& [w_new, wb_new, delta, h_new, c_new, fs, saved, snap] = out;

    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({fs, saved, snap});
    ctx->saved_data["nl"] = nl;
    ctx->saved_data["nb"] = nb;
    ctx->saved_data["nt"] = nt;
    ctx->saved_data["flags"] = flags.vec();
    ctx->saved_data["lr"] = lr;
    ctx->saved_data["save"] = save;
    ctx->saved_data["snapshot"] = snapshot;
    ctx->saved_data["has_fscale"] = fscale.has_value() && fscale->defined();
    variable_list keep;
    keep.reserve(8 * nl + 2 * nb + 5 + nt);
    for (auto* lst : {&w, &wb, &g, &gb, &pre, &post, &h, &c})
      for (const auto& t : *lst) keep.push_back(t);
    keep.push_back(fs);
    for (auto& t : h_new) keep.push_back(t);
    for (auto& t : c_new) keep.push_back(t);
    keep.push_back(saved);
    keep.push_back(snap);
    if (snapshot) {
      // theta's values are read from `snap` (an optimiser may update theta in place
      // meanwhile): keep the tensors for their shapes only, not as saved variables (whose
      // version check would refuse the update)
      ctx->saved_data["theta_ref"] = c10::List<Tensor>(theta);
    } else {
      for (const auto& t : theta) keep.push_back(t);
    }
    ctx->save_for_backward(keep);

    variable_list res;
    res.reserve(4 * nl + nb + 3);
    for (auto* lst : {&w_new, &wb_new, &delta, &h_new, &c_new})
      for (auto& t : *lst) res.push_back(t);
    res.push_back(fs);
    res.push_back(saved);
    res.push_back(snap);
    return res;
  }

  static variable_list backward(AutogradContext* ctx, variable_list go) {
    const auto nl = static_cast<size_t>(ctx->saved_data["nl"].toInt());
    const auto nb = static_cast<size_t>(ctx->saved_data["nb"].toInt());
    const auto nt = static_cast<size_t>(ctx->saved_data["nt"].toInt());
    const bool snapshot = ctx->saved_data["snapshot"].toBool();
    TORCH_CHECK(ctx->saved_data["save"].toBool(),
                "lrmt_fast.meta_step_net: backward needs the forward to run with save=True");
    const std::vector<int64_t> flags = ctx->saved_data["flags"].toIntVector();
    const double lr = ctx->saved_data["lr"].toDouble();

    variable_list sv = ctx->get_saved_variables();
    size_t at = 0;
    auto w = take(sv, at, nl), wb = take(sv, at, nb), g = take(sv, at, nl), gb = take(sv, at, nb);
    auto pre = take(sv, at, nl), post = take(sv, at, nl), h = take(sv, at, nl), c = take(sv, at, nl);
    Tensor fs = sv[at++];
    auto h_new = take(sv, at, nl), c_new = take(sv, at, nl);
    Tensor saved = sv[at++];
    Tensor snap = sv[at++];
    std::vector<Tensor> theta;
    if (snapshot) {
      theta = ctx->saved_data["theta_ref"].toTensorVector();  // shapes; values from `snap`
    } else {
      theta = take(sv, at, nt);
    }

    // graph inputs: w, wb, g, gb, pre, post, h, c, theta (, fscale)
    const size_t i_w = 0, i_wb = nl, i_h = 4 * nl + 2 * nb, i_c = i_h + nl, i_th = i_c + nl;
    const bool need_w = any_need(ctx, i_w, nl) || any_need(ctx, i_wb, nb);
    const bool need_hc = any_need(ctx, i_h, nl) || any_need(ctx, i_c, nl);
    const bool need_theta = any_need(ctx, i_th, nt);

    // grad outputs: w_new, wb_new, delta, h_new, c_new, fs, saved, snap
    auto grads = bwd_op().call(opt_list(go, 0, nl), opt_list(go, nl, nb), opt_list(go, nl + nb, nl),
                               opt_list(go, 2 * nl + nb, nl), opt_list(go, 3 * nl + nb, nl), w, wb, g, gb, pre, post,
                               h, c, theta, flags, lr, fs, h_new, c_new, saved, snap, need_w, need_hc, need_theta);
    auto& [gw, gwb, gh, gc, gth] = grads;

    // one entry per forward argument (tensor-list elements one each, other arguments one)
    variable_list res;
    auto put = [&](const std::vector<Tensor>& src, size_t n, size_t first_input) {
      for (size_t i = 0; i < n; ++i)
        res.push_back(!src.empty() && ctx->needs_input_grad(first_input + i) ? src[i] : Tensor());
    };
    auto none = [&](size_t n) { res.insert(res.end(), n, Tensor()); };
    put(gw, nl, i_w);
    put(gwb, nb, i_wb);
    none(3 * nl + nb);  // g, gb, pre, post
    put(gh, nl, i_h);
    put(gc, nl, i_c);
    put(gth, nt, i_th);
    none(5);  // flags, lr, fscale, save, snapshot
    return res;
  }
};

NetOut meta_step_net_autograd(TensorList w, TensorList wb, TensorList g, TensorList gb, TensorList pre,
                              TensorList post, TensorList h, TensorList c, TensorList theta, at::IntArrayRef flags,
                              double lr, const std::optional<Tensor>& fscale, bool save, bool snapshot) {
  variable_list r = MetaStepNetFn::apply(w, wb, g, gb, pre, post, h, c, theta, flags, lr, fscale, save, snapshot);
  const size_t nl = w.size(), nb = wb.size();
  size_t at = 0;
  auto w_new = take(r, at, nl), wb_new = take(r, at, nb), delta = take(r, at, nl);
  auto h_new = take(r, at, nl), c_new = take(r, at, nl);
  Tensor fs = r[at++], saved = r[at++], snap = r[at++];
  return {std::move(w_new), std::move(wb_new), std::move(delta), std::move(h_new), std::move(c_new), fs, saved, snap};
}

OptList opt_one(const Tensor& t) {
  OptList out;
  out.push_back(t.defined() ? std::optional<Tensor>(t) : std::nullopt);
  return out;
}

struct MetaStepFn : public torch::autograd::Function<MetaStepFn> {
  // Forward arguments, in the op's order; graph inputs w, g, pre, post, h, c, theta (nt),
  // fscale.
  static variable_list forward(AutogradContext* ctx, const Tensor& w, const Tensor& g, const Tensor& pre,
                               const Tensor& post, const Tensor& h, const Tensor& c, TensorList theta, double lr,
                               const Tensor& fscale, bool save, bool snapshot) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto out = single_fwd_op().call(w, g, pre, post, h, c, theta, lr, fscale, save, snapshot);
    auto& [w_new, delta, h_new, c_new, saved, snap] = out;

    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({saved, snap});
    ctx->saved_data["nt"] = static_cast<int64_t>(theta.size());
    // the layer as the network op sees it (make_layer's rule for the single op)
    ctx->saved_data["flags"] = (pre.size(0) == w.size(0) && w.size(0) > 1) ? int64_t{kPerNeuronPre} : int64_t{0};
    ctx->saved_data["lr"] = lr;
    ctx->saved_data["save"] = save;
    ctx->saved_data["snapshot"] = snapshot;
    variable_list keep{w, g, pre, post, h, c, fscale, h_new, c_new, saved, snap};
    if (snapshot) {
      // shapes only: the values are read from `snap` (see MetaStepNetFn)
      ctx->saved_data["theta_ref"] = c10::List<Tensor>(theta);
    } else {
      keep.insert(keep.end(), theta.begin(), theta.end());
    }
    ctx->save_for_backward(keep);
    return {w_new, delta, h_new, c_new, saved, snap};
  }

  static variable_list backward(AutogradContext* ctx, variable_list go) {
    TORCH_CHECK(ctx->saved_data["save"].toBool(),
                "lrmt_fast.meta_step: backward needs the forward to run with save=True");
    const auto nt = static_cast<size_t>(ctx->saved_data["nt"].toInt());
    const bool snapshot = ctx->saved_data["snapshot"].toBool();
    const double lr = ctx->saved_data["lr"].toDouble();
    const std::vector<int64_t> flags{ctx->saved_data["flags"].toInt()};

    variable_list sv = ctx->get_saved_variables();
    size_t at = 0;
    const Tensor w = sv[at++], g = sv[at++], pre = sv[at++], post = sv[at++], h = sv[at++], c = sv[at++];
    const Tensor fs = sv[at++], h_new = sv[at++], c_new = sv[at++], saved = sv[at++], snap = sv[at++];
    std::vector<Tensor> theta = snapshot ? ctx->saved_data["theta_ref"].toTensorVector() : take(sv, at, nt);

    // graph inputs: w, g, pre, post, h, c, theta, fscale
    const size_t i_h = 4, i_c = 5, i_th = 6;
    const bool need_w = ctx->needs_input_grad(0);
    const bool need_hc = ctx->needs_input_grad(i_h) || ctx->needs_input_grad(i_c);
    const bool need_theta = any_need(ctx, i_th, nt);

    // grad outputs: w_new, delta, h_new, c_new, saved, snap
    auto grads = bwd_op().call(opt_one(go[0]), OptList(), opt_one(go[1]), opt_one(go[2]), opt_one(go[3]), {w}, {},
                               {g}, {}, {pre}, {post}, {h}, {c}, theta, flags, lr, fs.view({1, 4}), {h_new},
                               {c_new}, saved, snap, need_w, need_hc, need_theta);
    auto& [gw, gwb, gh, gc, gth] = grads;

    // one entry per forward argument (theta's elements one each, other arguments one)
    variable_list res;
    res.reserve(6 + nt + 4);
    res.push_back(need_w ? gw[0] : Tensor());
    res.insert(res.end(), 3, Tensor());  // g, pre, post
    res.push_back(need_hc && ctx->needs_input_grad(i_h) ? gh[0] : Tensor());
    res.push_back(need_hc && ctx->needs_input_grad(i_c) ? gc[0] : Tensor());
    for (size_t i = 0; i < nt; ++i) res.push_back(need_theta && ctx->needs_input_grad(i_th + i) ? gth[i] : Tensor());
    res.insert(res.end(), 4, Tensor());  // lr, fscale, save, snapshot
    return res;
  }
};

SingleOut meta_step_autograd(const Tensor& w, const Tensor& g, const Tensor& pre, const Tensor& post, const Tensor& h,
                             const Tensor& c, TensorList theta, double lr, const Tensor& fscale, bool save,
                             bool snapshot) {
  variable_list r = MetaStepFn::apply(w, g, pre, post, h, c, theta, lr, fscale, save, snapshot);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrmt_fast, Autograd, m) {
  m.impl("meta_step", &meta_step_autograd);
  m.impl("meta_step_net", &meta_step_net_autograd);
}

}  // namespace lrmt
