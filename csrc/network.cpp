// lrmt_fast._C: the network-level drivers and the forward operators (network.h).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstring>

#include "cpu_pool.h"
#include "dispatch.h"
#include "network.h"

namespace lrmt {

// ------------------------------------------------------------------------------------
// network-level drivers
// ------------------------------------------------------------------------------------
Net make_net(const char* op, TensorList w, TensorList wb, TensorList g, TensorList gb, TensorList pre,
             TensorList post, TensorList h, TensorList c, TensorList theta, at::IntArrayRef flags) {
  const size_t nl = w.size();
  TORCH_CHECK(nl >= 1, op, ": needs at least one layer (w is empty)");
  Checker ck(op, w[0], "w[0]");
  TORCH_CHECK(g.size() == nl && pre.size() == nl && post.size() == nl && h.size() == nl && c.size() == nl &&
                  flags.size() == nl,
              op, ": w, g, pre, post, h, c and flags must have one entry per layer (", nl, "), got ", g.size(), ", ",
              pre.size(), ", ", post.size(), ", ", h.size(), ", ", c.size(), ", ", flags.size());
  size_t nb = 0;
  for (auto f : flags) nb += (f & kHasBias) ? 1 : 0;
  TORCH_CHECK(wb.size() == nb && gb.size() == nb, op, ": wb and gb must hold one tensor per layer with a bias (",
              nb, "), got ", wb.size(), " and ", gb.size());
  TORCH_CHECK(theta.size() % nl == 0, op, ": theta must hold the same number of tensors for each of the ", nl,
              " layers, got ", theta.size());
  const size_t nth = theta.size() / nl;
  Net net;
  net.device = ck.device;
  net.dtype = ck.dtype;
  net.layers.reserve(nl);
  size_t bi = 0;
  for (size_t i = 0; i < nl; ++i) {
    const bool hb = flags[i] & kHasBias;
    const Tensor* pwb = hb ? &wb[bi] : nullptr;
    const Tensor* pgb = hb ? &gb[bi] : nullptr;
    if (hb) ++bi;
    net.layers.push_back(make_layer(ck, false, i, w[i], pwb, g[i], pgb, pre[i], post[i], h[i], c[i],
                                    (flags[i] & kPerNeuronPre) != 0, theta, i * nth, nth));
    TORCH_CHECK(net.layers.back().L == net.layers.front().L, op, ": every layer must have the same number of LSTM cells");
  }
  return net;
}

Tensor resolve_fscale(const char* op, const Net& net, const std::optional<Tensor>& fscale, Arena* ar) {
  const int64_t nl = static_cast<int64_t>(net.layers.size());
  if (fscale.has_value() && fscale->defined()) {
    Checker ck(op, net.layers[0].W, "w[0]");
    ck(*fscale, "fscale");
    LRMT_CHECK_SHAPE(op, *fscale, "fscale", nl, 4);
    return *fscale;
  }
  Tensor fs = ar ? ar->take({nl, 4}) : at::empty({nl, 4}, net.layers[0].W.options());
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "lrmt_fscale", [&] {
    for (int64_t i = 0; i < nl; ++i) feature_scale_layer<scalar_t>(net.layers[i], fs[i]);
  });
  return fs;
}

int64_t max_fwd_workspace(const Net& net) {
  int64_t m = 0;
  for (auto& s : net.layers) m = std::max(m, s.fwd_workspace());
  return m;
}

Tensor snapshot_theta(TensorList theta, const Tensor& like) {
  int64_t n = 0;
  for (auto& t : theta) n += t.numel();
  Tensor snap = op_empty({n}, like.options());
  int64_t off = 0;
  const bool host = cpu_shortcuts(like.device());
  for (auto& t : theta) {
    if (host && t.is_cpu() && t.is_contiguous() && t.scalar_type() == snap.scalar_type())
      std::memcpy(static_cast<char*>(snap.data_ptr()) + off * snap.element_size(), t.data_ptr(),
                  t.numel() * snap.element_size());
    else
      snap.narrow(0, off, t.numel()).copy_(t.reshape({-1}));
    off += t.numel();
  }
  return snap;
}

std::vector<Tensor> theta_views(TensorList theta, const Tensor& snap) {
  std::vector<Tensor> v;
  v.reserve(theta.size());
  int64_t off = 0;
  for (auto& t : theta) {
    v.push_back(snap.narrow(0, off, t.numel()).view(t.sizes()));
    off += t.numel();
  }
  TORCH_CHECK(off == snap.numel(), "lrmt_fast: theta_snap does not match theta (", snap.numel(), " vs ", off, ")");
  return v;
}

NetOut net_forward(const char* op, Net& net, double lr, const std::optional<Tensor>& fscale, bool save,
                   bool snapshot, TensorList theta) {
  c10::OptionalDeviceGuard guard(net.device);
  const auto& W0 = net.layers[0].W;
  const auto opts = W0.options();
  Tensor fs = resolve_fscale(op, net, fscale, nullptr);
  if (fscale.has_value() && fscale->defined()) fs = fs.clone();  // an output must not alias an input
  std::vector<Tensor> w_new, wb_new, delta, h_new, c_new;
  int64_t saved_n = 0;
  for (auto& s : net.layers) saved_n += s.saved_numel();
  Tensor saved = op_empty({save ? saved_n : 0}, opts);
  Tensor snap = snapshot ? snapshot_theta(theta, W0) : at::empty({0}, opts);
  Arena& ar = get_arena(net.device, net.dtype, max_fwd_workspace(net));
  int64_t off = 0;
  for (size_t i = 0; i < net.layers.size(); ++i) {
    const Layer& s = net.layers[i];
    Tensor wn = op_empty({s.cout, s.Pw}, opts);
    Tensor wbn = s.has_b ? op_empty({s.cout}, opts) : Tensor();
    Tensor d = op_empty({s.cout, s.P}, opts);
    Tensor hn = op_empty_like(s.h);
    Tensor cn = op_empty_like(s.c);
    Tensor gates, tsave;
    if (save) {
      gates = saved.narrow(0, off, s.L * s.cout * 4 * s.H).view({s.L, s.cout, 4 * s.H});
      tsave = saved.narrow(0, off + s.L * s.cout * 4 * s.H, s.cout * s.P).view({s.cout, s.P});
      off += s.saved_numel();
    }
    ar.reset(0);
    AT_DISPATCH_FLOATING_TYPES(net.dtype, "lrmt_meta_step_fwd", [&] {
      forward_layer<scalar_t>(s, ptr<scalar_t>(fs) + 4 * i, lr, wn, wbn, d, hn, cn, gates, tsave, ar);
    });
    w_new.push_back(wn);
    if (s.has_b) wb_new.push_back(wbn);
    delta.push_back(d);
    h_new.push_back(hn);
    c_new.push_back(cn);
  }
  // w_new in the shape of the input weight (a student parameter)
  return {std::move(w_new), std::move(wb_new), std::move(delta), std::move(h_new), std::move(c_new), fs, saved, snap};
}

void net_forward_(const char* op, Net& net, double lr, const std::optional<Tensor>& fscale, TensorList delta_out) {
  c10::OptionalDeviceGuard guard(net.device);
  const int64_t nl = static_cast<int64_t>(net.layers.size());
  TORCH_CHECK(delta_out.empty() || static_cast<int64_t>(delta_out.size()) == nl, op,
              ": delta_out must be empty or hold one tensor per layer (", nl, "), got ", delta_out.size());
  Checker ck(op, net.layers[0].W, "w[0]");
  for (size_t i = 0; i < delta_out.size(); ++i) {
    ck(delta_out[i], idx("delta_out", i));
    LRMT_CHECK_SHAPE(op, delta_out[i], idx("delta_out", i), net.layers[i].cout, net.layers[i].P);
  }
  const bool own_fs = !(fscale.has_value() && fscale->defined());
  Arena& ar = get_arena(net.device, net.dtype, max_fwd_workspace(net) + (own_fs ? round_up(nl * 4) : 0));
  Tensor fs = resolve_fscale(op, net, fscale, &ar);
  const int64_t base = ar.mark();
  for (int64_t i = 0; i < nl; ++i) {
    const Layer& s = net.layers[i];
    ar.reset(base);
    Tensor d = delta_out.empty() ? Tensor() : delta_out[i];
    AT_DISPATCH_FLOATING_TYPES(net.dtype, "lrmt_meta_step_fwd_", [&] {
      forward_layer<scalar_t>(s, ptr<scalar_t>(fs) + 4 * i, lr, s.W, s.Wb, d, s.h, s.c, Tensor(), Tensor(), ar);
    });
  }
}

// ------------------------------------------------------------------------------------
// operators
// ------------------------------------------------------------------------------------
NetOut meta_step_net(TensorList w, TensorList wb, TensorList g, TensorList gb, TensorList pre, TensorList post,
                     TensorList h, TensorList c, TensorList theta, at::IntArrayRef flags, double lr,
                     const std::optional<Tensor>& fscale, bool save, bool snapshot) {
  const char* op = "lrmt_fast.meta_step_net";
  Net net = make_net(op, w, wb, g, gb, pre, post, h, c, theta, flags);
  auto out = net_forward(op, net, lr, fscale, save, snapshot, theta);
  auto& wn = std::get<0>(out);
  for (size_t i = 0; i < wn.size(); ++i) wn[i] = wn[i].view(w[i].sizes());
  return out;
}

void meta_step_net_(TensorList w, TensorList wb, TensorList g, TensorList gb, TensorList pre, TensorList post,
                    TensorList h, TensorList c, TensorList theta, at::IntArrayRef flags, double lr,
                    const std::optional<Tensor>& fscale, TensorList delta_out) {
  const char* op = "lrmt_fast.meta_step_net_";
  // no autograd inside (the op has no autograd formula: theta may require grad when it is
  // called directly, outside torch.no_grad, and the out= GEMMs would refuse such inputs)
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  Net net = make_net(op, w, wb, g, gb, pre, post, h, c, theta, flags);
  net_forward_(op, net, lr, fscale, delta_out);
}

Net make_single(const char* op, const Tensor& w, const Tensor& g, const Tensor& pre, const Tensor& post,
                const Tensor& h, const Tensor& c, TensorList theta) {
  Checker ck(op, w, "w");
  Net net;
  net.device = ck.device;
  net.dtype = ck.dtype;
  net.layers.push_back(make_layer(ck, true, 0, w, nullptr, g, nullptr, pre, post, h, c, false, theta, 0, theta.size()));
  return net;
}

Tensor single_fscale(const char* op, const Net& net, const Tensor& fscale) {
  Checker ck(op, net.layers[0].W, "w");
  ck(fscale, "fscale");
  LRMT_CHECK_SHAPE(op, fscale, "fscale", 4);
  return fscale.view({1, 4});
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> meta_step(const Tensor& w, const Tensor& g,
                                                                     const Tensor& pre, const Tensor& post,
                                                                     const Tensor& h, const Tensor& c,
                                                                     TensorList theta, double lr,
                                                                     const Tensor& fscale, bool save, bool snapshot) {
  const char* op = "lrmt_fast.meta_step";
  Net net = make_single(op, w, g, pre, post, h, c, theta);
  Tensor fs = single_fscale(op, net, fscale);
  auto out = net_forward(op, net, lr, fs, save, snapshot, theta);
  return {std::get<0>(out)[0], std::get<2>(out)[0], std::get<3>(out)[0], std::get<4>(out)[0], std::get<6>(out),
          std::get<7>(out)};
}

void meta_step_(const Tensor& w, const Tensor& g, const Tensor& pre, const Tensor& post, const Tensor& h,
                const Tensor& c, TensorList theta, double lr, const Tensor& fscale,
                const std::optional<Tensor>& delta_out) {
  const char* op = "lrmt_fast.meta_step_";
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // as in meta_step_net_
  Net net = make_single(op, w, g, pre, post, h, c, theta);
  Tensor fs = single_fscale(op, net, fscale);
  std::vector<Tensor> d;
  if (delta_out.has_value() && delta_out->defined()) d.push_back(*delta_out);
  net_forward_(op, net, lr, fs, d);
}

Tensor feature_scale_net(TensorList w, TensorList wb, TensorList g, TensorList gb, TensorList pre, TensorList post,
                         TensorList h, TensorList c, TensorList theta, at::IntArrayRef flags) {
  const char* op = "lrmt_fast.feature_scale_net";
  Net net = make_net(op, w, wb, g, gb, pre, post, h, c, theta, flags);
  c10::OptionalDeviceGuard guard(net.device);
  return resolve_fscale(op, net, std::nullopt, nullptr);
}

}  // namespace lrmt
