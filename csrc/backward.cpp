// lrmt_fast._C: the backward of one layer (backward_layer) and the backward op of both
// forward ops, meta_step_net_backward (one layer or many).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_pool.h"
#include "dispatch.h"
#include "layer.h"
#include "network.h"

namespace lrmt {

// ------------------------------------------------------------------------------------
// backward of one layer
// ------------------------------------------------------------------------------------
template <typename T>
void backward_layer(const Layer& s, const T* fs, double lr, const Tensor& h_new, const Tensor& c_new,
                    const Tensor& gates, const Tensor& t, LayerGrads& g, bool need_w, bool need_hc, bool need_theta,
                    Arena& ar) {
  const auto dev = s.W.device();
  const int64_t H = s.H, G4 = 4 * H, cout = s.cout, P = s.P, Pw = s.Pw, D0 = s.D0, L = s.L;
  const LayerGemm<T> mm{s.W.options()};
  T* ws = ar.take_ptr<T>(G4 * D0);
  T* bvec = ar.take_ptr<T>(G4);
  T* dZ = ar.take_ptr<T>(cout * P);
  T* dA = ar.take_ptr<T>(cout * G4);
  T* dX = ar.take_ptr<T>(cout * H);
  T* X = ar.take_ptr<T>(cout * H);
  T* red = ar.take_ptr<T>(kMaxRank1 * G4);
  T* partial = ar.take_ptr<T>(kPartials);
  T* gscale_scratch = ar.take_ptr<T>(1);
  const T* h = ptr<T>(s.h);
  const T* hn = ptr<T>(h_new);
  {
    PrepArgs<T> pa = prep_args<T>(s, fs, ws, bvec);
    pa.bvec = nullptr;
    k_prep(dev, pa);
  }
  OutBwdArgs<T> ob;
  ob.rows = cout;
  ob.P = P;
  ob.Pw = Pw;
  ob.gWn = ptr<T>(g.gWn);
  ob.gWbn = ptr<T>(g.gWbn);
  ob.gdelta = ptr<T>(g.gdelta);
  ob.G = ptr<T>(s.G);
  ob.Gb = ptr<T>(s.Gb);
  ob.t = ptr<T>(t);
  ob.scale = ptr<T>(s.th[3 * L + 2]);
  ob.lr = static_cast<T>(lr);
  ob.dZ = dZ;
  ob.g_scale = need_theta ? ptr<T>(g.gth[3 * L + 2]) : gscale_scratch;
  ob.partial = partial;
  k_out_bwd(dev, ob);
  if (need_theta) {
    colsum<T>(dev, dZ, cout, P, ptr<T>(g.gth[3 * L + 1]));
    k_relu<T>(dev, hn + (L - 1) * cout * H, X, cout * H);
    mm(true, false, P, H, cout, 1.0, dZ, P, X, H, 0.0, ptr<T>(g.gth[3 * L]), H);
  }
  mm(false, false, cout, H, P, 1.0, dZ, P, ptr<T>(s.th[3 * L]), H, 0.0, dX, H);
  for (int64_t l = L - 1; l >= 0; --l) {
    CellBwdArgs<T> cb;
    cb.rows = cout;
    cb.H = H;
    cb.gates = ptr<T>(gates) + l * cout * G4;
    cb.c_prev = ptr<T>(s.c) + l * cout * H;
    cb.c_new = ptr<T>(c_new) + l * cout * H;
    cb.h_new = hn + l * cout * H;
    cb.dX = dX;
    cb.gh = g.gh.defined() ? ptr<T>(g.gh) + l * cout * H : nullptr;
    cb.gc = g.gc.defined() ? ptr<T>(g.gc) + l * cout * H : nullptr;
    cb.dA = dA;
    cb.gc_prev = need_hc ? ptr<T>(g.gc_in) + l * cout * H : nullptr;
    k_cell_bwd(dev, cb);
    if (need_hc) mm(false, false, cout, H, G4, 1.0, dA, G4, ptr<T>(s.th[3 * l + 1]), H, 0.0,
                    ptr<T>(g.gh_in) + l * cout * H, H);
    if (need_theta) {
      mm(true, false, G4, H, cout, 1.0, dA, G4, h + l * cout * H, H, 0.0, ptr<T>(g.gth[3 * l + 1]), H);
      colsum<T>(dev, dA, cout, G4, ptr<T>(g.gth[3 * l + 2]));
    }
    if (l > 0) {
      if (need_theta) {
        k_relu<T>(dev, hn + (l - 1) * cout * H, X, cout * H);
        mm(true, false, G4, H, cout, 1.0, dA, G4, X, H, 0.0, ptr<T>(g.gth[3 * l]), H);
      }
      mm(false, false, cout, H, G4, 1.0, dA, G4, ptr<T>(s.th[3 * l]), H, 0.0, dX, H);
      continue;
    }
    // cell 0: gradients of w (feature and base of the update) and of w_ih0
    if (need_w) {
      if (s.w_gemm) {
        T* gW = ptr<T>(g.gW);
        if (g.gWn.defined()) k_copy<T>(dev, ptr<T>(g.gWn), gW, cout * Pw);
        mm(false, false, cout, Pw, G4, 1.0, dA, G4, ws, D0, g.gWn.defined() ? 1.0 : 0.0, gW, Pw);
      } else {
        RowDotArgs<T> rd;
        rd.rows = cout;
        rd.K = G4;
        rd.A = dA;
        rd.v = ws;
        rd.vs = D0;
        rd.base = ptr<T>(g.gWn);
        rd.bs = Pw;
        rd.out = ptr<T>(g.gW);
        rd.os = Pw;
        k_row_dot(dev, rd);
      }
      if (s.has_b) {
        RowDotArgs<T> rd;
        rd.rows = cout;
        rd.K = G4;
        rd.A = dA;
        rd.v = ws + Pw;
        rd.vs = D0;
        rd.base = ptr<T>(g.gWbn);
        rd.bs = 1;
        rd.out = ptr<T>(g.gWb);
        rd.os = 1;
        k_row_dot(dev, rd);
      }
    }
    if (need_theta) {
      T* dW0 = ptr<T>(g.gth[0]);
      if (s.w_gemm) {
        mm(true, false, G4, Pw, cout, 1.0, dA, G4, ptr<T>(s.W), Pw, 0.0, dW0, D0);
        mm(true, false, G4, Pw, cout, 1.0, dA, G4, ptr<T>(s.G), Pw, 0.0, dW0 + P, D0);
      }
      if (s.pre_gemm) mm(true, false, G4, s.cinp, cout, 1.0, dA, G4, ptr<T>(s.pre), s.cinp, 0.0, dW0 + 2 * P, D0);
      ColReduceArgs<T> cr;
      cr.rows = cout;
      cr.K = G4;
      cr.A = dA;
      cr.out = red;
      FinalizeArgs<T> fa;
      auto add = [&](const Tensor& u, int64_t us) {
        cr.u[cr.n] = ptr<T>(u);
        cr.us[cr.n] = us;
        return cr.n++;
      };
      if (!s.w_gemm) {
        fa.m_w = add(s.W, Pw);
        fa.m_g = add(s.G, Pw);
      }
      if (s.has_b) {
        fa.m_wb = add(s.Wb, 1);
        fa.m_gb = add(s.Gb, 1);
      }
      if (!s.pre_shared && !s.pre_gemm) fa.m_pre = add(s.pre, s.cinp);
      fa.m_post = add(s.post, 1);
      k_col_reduce(dev, cr);
      fa.G4 = G4;
      fa.D0 = D0;
      fa.P = P;
      fa.Pw = Pw;
      fa.cinp = s.cinp;
      fa.has_b = s.has_b;
      fa.w_gemm = s.w_gemm;
      fa.pre_shared = s.pre_shared;
      fa.pre_gemm = s.pre_gemm;
      fa.fs = fs;
      fa.colsum = ptr<T>(g.gth[2]);
      fa.red = red;
      fa.pre = s.pre_shared ? ptr<T>(s.pre) : nullptr;
      fa.npre = s.npre;
      fa.pre_one = s.pre_one;
      fa.dwih0 = dW0;
      k_finalize(dev, fa);
    }
  }
}

template void backward_layer<float>(const Layer&, const float*, double, const Tensor&, const Tensor&, const Tensor&,
                                    const Tensor&, LayerGrads&, bool, bool, bool, Arena&);
template void backward_layer<double>(const Layer&, const double*, double, const Tensor&, const Tensor&,
                                     const Tensor&, const Tensor&, LayerGrads&, bool, bool, bool, Arena&);

// ------------------------------------------------------------------------------------
// operator: the backward of meta_step and meta_step_net
// ------------------------------------------------------------------------------------
Tensor opt_at(const OptList& l, size_t i) {
  if (i >= l.size()) return Tensor();
  std::optional<Tensor> t = l.get(i);
  if (!t.has_value() || !t->defined()) return Tensor();
  return t->contiguous();
}

std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
meta_step_net_backward(const OptList& grad_w_new, const OptList& grad_wb_new, const OptList& grad_delta,
                       const OptList& grad_h_new, const OptList& grad_c_new, TensorList w, TensorList wb,
                       TensorList g, TensorList gb, TensorList pre, TensorList post, TensorList h, TensorList c,
                       TensorList theta, at::IntArrayRef flags, double lr, const Tensor& fscale, TensorList h_new,
                       TensorList c_new, const Tensor& saved, const Tensor& theta_snap, bool need_w, bool need_hc,
                       bool need_theta) {
  const char* op = "lrmt_fast.meta_step_net_backward";
  std::vector<Tensor> thv;
  const bool use_snap = theta_snap.numel() > 0;
  if (use_snap) thv = theta_views(theta, theta_snap);
  TensorList th = use_snap ? TensorList(thv) : theta;
  Net net = make_net(op, w, wb, g, gb, pre, post, h, c, th, flags);
  c10::OptionalDeviceGuard guard(net.device);
  const size_t nl = net.layers.size();
  Checker ck(op, net.layers[0].W, "w[0]");
  ck(fscale, "fscale");
  LRMT_CHECK_SHAPE(op, fscale, "fscale", static_cast<int64_t>(nl), 4);
  int64_t saved_n = 0;
  for (auto& s : net.layers) saved_n += s.saved_numel();
  TORCH_CHECK(saved.numel() == saved_n, op, ": 'saved' has ", saved.numel(), " elements, expected ", saved_n,
              " (was the forward run with save=False?)");
  TORCH_CHECK(h_new.size() == nl && c_new.size() == nl, op, ": h_new / c_new must have one entry per layer");
  int64_t ws = 0;
  for (auto& s : net.layers) ws = std::max(ws, s.bwd_workspace());
  Arena& ar = get_arena(net.device, net.dtype, ws);
  std::vector<Tensor> gW, gWb, gh, gc, gth;
  int64_t off = 0;
  size_t bi = 0;
  for (size_t i = 0; i < nl; ++i) {
    const Layer& s = net.layers[i];
    LayerGrads lg;
    lg.gWn = opt_at(grad_w_new, i);
    if (lg.gWn.defined()) lg.gWn = lg.gWn.view({s.cout, s.Pw});
    if (s.has_b) lg.gWbn = opt_at(grad_wb_new, bi);
    lg.gdelta = opt_at(grad_delta, i);
    lg.gh = opt_at(grad_h_new, i);
    lg.gc = opt_at(grad_c_new, i);
    if (need_w) {
      lg.gW = op_empty({s.cout, s.Pw}, s.W.options());
      if (s.has_b) lg.gWb = op_empty({s.cout}, s.W.options());
    }
    if (need_hc) {
      lg.gh_in = op_empty_like(s.h);
      lg.gc_in = op_empty_like(s.c);
    }
    if (need_theta)
      for (auto& t : s.th) lg.gth.push_back(op_empty(t.sizes(), t.options()));
    ck(h_new[i], idx("h_new", i));
    ck(c_new[i], idx("c_new", i));
    Tensor gates = saved.narrow(0, off, s.L * s.cout * 4 * s.H).view({s.L, s.cout, 4 * s.H});
    Tensor t = saved.narrow(0, off + s.L * s.cout * 4 * s.H, s.cout * s.P).view({s.cout, s.P});
    off += s.saved_numel();
    ar.reset(0);
    AT_DISPATCH_FLOATING_TYPES(net.dtype, "lrmt_meta_step_bwd", [&] {
      backward_layer<scalar_t>(s, ptr<scalar_t>(fscale) + 4 * i, lr, h_new[i], c_new[i], gates, t, lg, need_w,
                               need_hc, need_theta, ar);
    });
    if (need_w) {
      gW.push_back(lg.gW.view(w[i].sizes()));
      if (s.has_b) gWb.push_back(lg.gWb);
    }
    if (need_hc) {
      gh.push_back(lg.gh_in);
      gc.push_back(lg.gc_in);
    }
    if (need_theta)
      for (auto& x : lg.gth) gth.push_back(x);
    if (s.has_b) ++bi;
  }
  return {gW, gWb, gh, gc, gth};
}

}  // namespace lrmt
