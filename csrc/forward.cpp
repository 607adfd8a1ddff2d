// lrmt_fast._C: the forward of one layer (feature scale, the LSTM cells, output layer and
// update) between its GEMMs; layer.h declares it, network.cpp drives it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "dispatch.h"
#include "layer.h"

namespace lrmt {

// ------------------------------------------------------------------------------------
// feature scale of one layer (meta_learner.feature_scale on the packed rows)
// ------------------------------------------------------------------------------------
template <typename T>
void feature_scale_layer(const Layer& s, const Tensor& out4) {
  FscaleArgs<T> a;
  a.a[0] = ptr<T>(s.W);
  a.na[0] = s.cout * s.Pw;
  a.a[1] = ptr<T>(s.G);
  a.na[1] = s.cout * s.Pw;
  if (s.has_b) {
    a.b[0] = ptr<T>(s.Wb);
    a.nb[0] = s.cout;
    a.b[1] = ptr<T>(s.Gb);
    a.nb[1] = s.cout;
  }
  a.a[2] = ptr<T>(s.pre);
  a.na[2] = s.pre.numel();
  a.ones[2] = s.pre_one ? 1 : 0;
  a.a[3] = ptr<T>(s.post);
  a.na[3] = s.cout;
  a.out = ptr<T>(out4);
  k_fscale(s.W.device(), a);
}

// ------------------------------------------------------------------------------------
// forward of one layer
// ------------------------------------------------------------------------------------

// Rows of one output-layer panel on the CPU: the panel's Z (rows x P) about 64 KiB, so that
// it stays in the L2 cache between the GEMM that writes it and the update that reads it
// (measured on the LeNet update, 1 thread: 5.5 -> 5.1 ms median; 32-128 KiB alike); with
// several threads, that much per thread, so that each panel still splits over all of them.
int64_t out_panel_rows(int64_t P, size_t elt) {
  const int64_t bytes = int64_t{64 * 1024} * std::max(1, at::get_num_threads());
  return std::max<int64_t>(8, bytes / (P * static_cast<int64_t>(elt)));
}

template <typename T>
void forward_layer(const Layer& s, const T* fs, double lr, const Tensor& W_out, const Tensor& Wb_out,
                   const Tensor& delta, const Tensor& h_out, const Tensor& c_out, const Tensor& gates,
                   const Tensor& t_save, Arena& ar) {
  const auto dev = s.W.device();
  const int64_t H = s.H, G4 = 4 * H, cout = s.cout, P = s.P, Pw = s.Pw, D0 = s.D0, L = s.L;
  const LayerGemm<T> mm{s.W.options()};
  T* ws = ar.take_ptr<T>(G4 * D0);
  T* bvec = ar.take_ptr<T>(G4);
  T* A = ar.take_ptr<T>(cout * G4);
  T* X = ar.take_ptr<T>(cout * H);
  T* Z = ar.take_ptr<T>(cout * P);
  const T* h = ptr<T>(s.h);
  // On CPU the feature scale of the w and g groups is the alpha of their GEMMs (read on the
  // host), so prep does not rescale those two blocks of w_ih0 every step (4H x 2Pw values;
  // 3% of a LeNet update). On CUDA the scale stays on the device (no sync, graph capture).
  const bool fold = cpu_shortcuts(dev) && s.w_gemm;
  {
    PrepArgs<T> pa = prep_args<T>(s, fs, ws, bvec);
    if (fold) pa.skip = Pw;
    k_prep(dev, pa);
  }

  // cell 0: A = h0 Whh0^T + w Ww^T + g Wg^T (+ pre Wpre^T), width-one groups as rank-1 terms
  mm(false, true, cout, G4, H, 1.0, h, H, ptr<T>(s.th[1]), H, 0.0, A, G4);
  if (fold) {
    const T* wih0 = ptr<T>(s.th[0]);
    mm(false, true, cout, G4, Pw, static_cast<double>(fs[0]), ptr<T>(s.W), Pw, wih0, D0, 1.0, A, G4);
    mm(false, true, cout, G4, Pw, static_cast<double>(fs[1]), ptr<T>(s.G), Pw, wih0 + P, D0, 1.0, A, G4);
  } else if (s.w_gemm) {
    mm(false, true, cout, G4, Pw, 1.0, ptr<T>(s.W), Pw, ws, D0, 1.0, A, G4);
    mm(false, true, cout, G4, Pw, 1.0, ptr<T>(s.G), Pw, ws + P, D0, 1.0, A, G4);
  }
  if (s.pre_gemm) mm(false, true, cout, G4, s.cinp, 1.0, ptr<T>(s.pre), s.cinp, ws + 2 * P, D0, 1.0, A, G4);
  Rank1<T> r1;
  auto add = [&](const Tensor& u, int64_t us, int64_t col) {
    r1.u[r1.n] = ptr<T>(u);
    r1.us[r1.n] = us;
    r1.v[r1.n] = ws + col;
    r1.vs[r1.n] = D0;
    ++r1.n;
  };
  if (!s.w_gemm) {
    add(s.W, Pw, 0);
    add(s.G, Pw, P);
  }
  if (s.has_b) {
    add(s.Wb, 1, Pw);
    add(s.Gb, 1, P + Pw);
  }
  if (!s.pre_shared && !s.pre_gemm) add(s.pre, s.cinp, 2 * P);
  add(s.post, 1, 2 * P + s.cinp);

  for (int64_t l = 0; l < L; ++l) {
    if (l > 0) {
      mm(false, true, cout, G4, H, 1.0, X, H, ptr<T>(s.th[3 * l]), H, 0.0, A, G4);
      mm(false, true, cout, G4, H, 1.0, h + l * cout * H, H, ptr<T>(s.th[3 * l + 1]), H, 1.0, A, G4);
    }
    CellFwdArgs<T> ca;
    ca.rows = cout;
    ca.H = H;
    ca.A = A;
    ca.bias = l == 0 ? bvec : ptr<T>(s.th[3 * l + 2]);
    if (l == 0) ca.r1 = r1;
    ca.c_in = ptr<T>(s.c) + l * cout * H;
    ca.h_out = ptr<T>(h_out) + l * cout * H;
    ca.c_out = ptr<T>(c_out) + l * cout * H;
    ca.gates = gates.defined() ? ptr<T>(gates) + l * cout * G4 : nullptr;
    ca.x_out = X;
    k_cell_fwd(dev, ca);
  }
  OutFwdArgs<T> oa;
  oa.rows = cout;
  oa.P = P;
  oa.Pw = Pw;
  oa.Z = Z;
  oa.b_out = ptr<T>(s.th[3 * L + 1]);
  oa.scale = ptr<T>(s.th[3 * L + 2]);
  oa.lr = static_cast<T>(lr);
  oa.G = ptr<T>(s.G);
  oa.Gb = ptr<T>(s.Gb);
  oa.W = ptr<T>(s.W);
  oa.Wb = ptr<T>(s.Wb);
  oa.W_out = ptr<T>(W_out);
  oa.Wb_out = ptr<T>(Wb_out);
  oa.delta = ptr<T>(delta);
  oa.t_save = ptr<T>(t_save);
  // Output layer and update. On the CPU in panels of rows whose Z (panel x P) stays in the
  // L2 cache between the GEMM that writes it and the update that reads it; on CUDA one GEMM.
  const int64_t panel = cpu_shortcuts(dev) ? out_panel_rows(P, sizeof(T)) : cout;
  if (panel >= cout) {
    mm(false, true, cout, P, H, 1.0, X, H, ptr<T>(s.th[3 * L]), H, 0.0, Z, P);
    k_out_fwd(dev, oa);
    return;
  }
  for (int64_t r0 = 0; r0 < cout; r0 += panel) {
    const int64_t m = std::min(panel, cout - r0);
    mm(false, true, m, P, H, 1.0, X + r0 * H, H, ptr<T>(s.th[3 * L]), H, 0.0, Z, P);
    OutFwdArgs<T> pa = oa;
    pa.rows = m;
    pa.Z = Z;
    pa.G = oa.G + r0 * Pw;
    pa.W = oa.W + r0 * Pw;
    pa.W_out = oa.W_out + r0 * Pw;
    if (oa.Gb) pa.Gb = oa.Gb + r0;
    if (oa.Wb) pa.Wb = oa.Wb + r0;
    if (oa.Wb_out) pa.Wb_out = oa.Wb_out + r0;
    if (oa.delta) pa.delta = oa.delta + r0 * P;
    if (oa.t_save) pa.t_save = oa.t_save + r0 * P;
    k_out_fwd(dev, pa);
  }
}

template void feature_scale_layer<float>(const Layer&, const Tensor&);
template void feature_scale_layer<double>(const Layer&, const Tensor&);
template void forward_layer<float>(const Layer&, const float*, double, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&, const Tensor&, const Tensor&, Arena&);
template void forward_layer<double>(const Layer&, const double*, double, const Tensor&, const Tensor&,
                                    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Arena&);

}  // namespace lrmt
