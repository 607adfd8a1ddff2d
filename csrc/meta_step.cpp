// lrmt_fast._C: the fused meta-update step (DESIGN.md section 2).
//
// One call runs, for every neuron row of one or more student layers:
// feature scaling, the 3 stacked LSTM cells, the output layer, the gate and the
// weight update. GEMMs go through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA) into
// reused workspaces; everything between two GEMMs is one fused kernel
// (kernels.h; cpu_kernels.cpp and cuda_kernels.cu). The first cell's input GEMM is
// split by feature group (w@Ww^T + g@Wg^T + pre@Wpre^T + post*Wpost) so the
// features [w | g | pre | post] are never materialised; a shared `pre` becomes a
// bias vector computed once per layer.
//
// Operators (torch.ops.lrmt_fast.*):
//   meta_step(w, g, pre, post, h, c, theta, lr, fscale, save, snapshot)
//       -> (w_new, delta, h_new, c_new, saved, theta_snap)           [differentiable]
//   meta_step_(w!, g, pre, post, h!, c!, theta, lr, fscale, delta_out!?)   [no grad, in place]
//   meta_step_net(...)  / meta_step_net_(...)      the same for a list of layers
//   meta_step_net_backward(...)                    backward of both
//   feature_scale_net(...)                          the per-layer feature scale [nl, 4]
// `saved` (activated gates and tanh outputs) and `theta_snap` (a copy of theta, for
// T-BPTT while an optimiser updates theta in place) are opaque buffers the backward reads.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/headeronly/version.h>

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_pool.h"
#include "gemm.h"
#include "kernels.h"

namespace lrmt {

using at::Tensor;
using at::TensorList;

// ------------------------------------------------------------------------------------
// argument checks (named arguments, flash-attention style)
// ------------------------------------------------------------------------------------
std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

#define LRMT_CHECK_SHAPE_NOTE(OP, x, name, note, ...)                                          \
  do {                                                                                        \
    const std::vector<int64_t> _exp = {__VA_ARGS__};                                          \
    TORCH_CHECK((x).sizes().vec() == _exp, OP, ": argument '", name, "'", note,               \
                " must have shape ", shape_str(_exp), ", got ", shape_str((x).sizes()));      \
  } while (0)
#define LRMT_CHECK_SHAPE(OP, x, name, ...) LRMT_CHECK_SHAPE_NOTE(OP, x, name, "", __VA_ARGS__)

struct Checker {
  const char* op;
  c10::Device device;
  at::ScalarType dtype;

  Checker(const char* op_, const Tensor& first, const char* first_name) : op(op_), device(first.device()), dtype(first.scalar_type()) {
    TORCH_CHECK(first.defined(), op, ": argument '", first_name, "' is undefined");
    TORCH_CHECK(device.is_cpu() || device.is_cuda(), op, ": argument '", first_name,
                "' is on ", device, "; only CPU and CUDA tensors are supported");
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": argument '", first_name,
                "' must be float32 or float64, got ", dtype);
#ifndef LRMT_WITH_CUDA
    TORCH_CHECK(!device.is_cuda(), op, ": argument '", first_name,
                "' is a CUDA tensor but lrmt_fast._C was built without CUDA (rebuild with LRMT_CUDA=1)");
#endif
  }

  void operator()(const Tensor& t, const std::string& name) const {
    TORCH_CHECK(t.defined(), op, ": argument '", name, "' is undefined");
    TORCH_CHECK(t.device() == device, op, ": argument '", name, "' is on ", t.device(),
                " but the other tensors are on ", device, " (all tensors must be on one device)");
    TORCH_CHECK(t.scalar_type() == dtype, op, ": argument '", name, "' has dtype ", t.scalar_type(),
                " but the other tensors are ", dtype, " (all tensors must have one dtype)");
    TORCH_CHECK(t.is_contiguous(), op, ": argument '", name, "' must be contiguous (call .contiguous())");
  }
};

std::string idx(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// ------------------------------------------------------------------------------------
// workspace: one grow-only buffer per (thread, device, dtype)
// ------------------------------------------------------------------------------------
struct WorkspaceStats {
  int64_t allocations = 0;
  int64_t bytes = 0;
};
std::mutex g_stats_mutex;
WorkspaceStats g_stats;

constexpr int64_t kAlign = 16;  // elements
int64_t round_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

class Arena {
 public:
  void reserve(const c10::Device& dev, at::ScalarType dtype, int64_t n) {
    if (!buf_.defined() || buf_.numel() < n) {
      buf_ = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().device(dev).dtype(dtype));
      std::lock_guard<std::mutex> lk(g_stats_mutex);
      g_stats.allocations += 1;
      g_stats.bytes += buf_.numel() * static_cast<int64_t>(buf_.element_size());
    }
    off_ = 0;
  }
  Tensor take(at::IntArrayRef shape) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    TORCH_INTERNAL_ASSERT(off_ + n <= buf_.numel(), "lrmt_fast: workspace too small");
    Tensor v = buf_.narrow(0, off_, n).view(shape);
    off_ += round_up(n);
    return v;
  }
  template <typename T>
  T* take_ptr(int64_t n) {
    TORCH_INTERNAL_ASSERT(off_ + n <= buf_.numel(), "lrmt_fast: workspace too small");
    T* p = buf_.data_ptr<T>() + off_;
    off_ += round_up(n);
    return p;
  }
  int64_t mark() const { return off_; }
  void reset(int64_t m) { off_ = m; }
  const Tensor& buffer() const { return buf_; }
  void clear() { buf_ = Tensor(); }

 private:
  Tensor buf_;
  int64_t off_ = 0;
};

using ArenaKey = std::tuple<int, int, int>;
std::map<ArenaKey, Arena>& arenas() {
  thread_local std::map<ArenaKey, Arena> m;
  return m;
}
Arena& get_arena(const c10::Device& dev, at::ScalarType dtype, int64_t n) {
  ArenaKey key{static_cast<int>(dev.type()), static_cast<int>(dev.index()), static_cast<int>(dtype)};
  Arena& a = arenas()[key];
  a.reserve(dev, dtype, n);
  return a;
}

// ------------------------------------------------------------------------------------
// one adapted layer, resolved and checked
// ------------------------------------------------------------------------------------
enum : int64_t { kHasBias = 1, kPerNeuronPre = 2 };

struct Layer {
  int64_t cout = 0, H = 0, L = 0, Pw = 0, P = 0, cinp = 0, npre = 0, D0 = 0;
  bool has_b = false, pre_shared = true, pre_one = false, w_gemm = false, pre_gemm = false;
  Tensor W, Wb, G, Gb, pre, post, h, c;  // W, G [cout, Pw]; Wb, Gb [cout]; pre [npre] or [cout, cinp]; post [cout]
  std::vector<Tensor> th;                // 3L + 3

  int64_t fwd_workspace() const {
    const int64_t G4 = 4 * H;
    return round_up(G4 * D0) + round_up(G4) + round_up(cout * G4) + round_up(cout * H) + round_up(cout * P);
  }
  int64_t bwd_workspace() const {
    const int64_t G4 = 4 * H;
    return round_up(G4 * D0) + round_up(G4) + round_up(cout * P) + round_up(cout * G4) + 2 * round_up(cout * H) +
           round_up(kMaxRank1 * G4) + round_up(kPartials) + round_up(1);
  }
  int64_t saved_numel() const { return L * cout * 4 * H + cout * P; }
};

// Checks theta of one layer (3L + 3 tensors) against the layer's sizes.
void check_theta(const Checker& ck, const Layer& s, TensorList theta, size_t base, const char* tname) {
  const int64_t G4 = 4 * s.H;
  for (int64_t l = 0; l < s.L; ++l) {
    const Tensor& wih = theta[base + 3 * l];
    const Tensor& whh = theta[base + 3 * l + 1];
    const Tensor& b = theta[base + 3 * l + 2];
    ck(wih, idx(tname, base + 3 * l));
    ck(whh, idx(tname, base + 3 * l + 1));
    ck(b, idx(tname, base + 3 * l + 2));
    const int64_t d = l == 0 ? s.D0 : s.H;
    const std::string cell = std::to_string(l) + ")";
    LRMT_CHECK_SHAPE_NOTE(ck.op, wih, idx(tname, base + 3 * l), " (w_ih of cell " + cell, G4, d);
    LRMT_CHECK_SHAPE_NOTE(ck.op, whh, idx(tname, base + 3 * l + 1), " (w_hh of cell " + cell, G4, s.H);
    LRMT_CHECK_SHAPE_NOTE(ck.op, b, idx(tname, base + 3 * l + 2), " (bias of cell " + cell, G4);
  }
  const size_t o = base + 3 * s.L;
  ck(theta[o], idx(tname, o));
  ck(theta[o + 1], idx(tname, o + 1));
  ck(theta[o + 2], idx(tname, o + 2));
  LRMT_CHECK_SHAPE_NOTE(ck.op, theta[o], idx(tname, o), " (w_out)", s.P, s.H);
  LRMT_CHECK_SHAPE_NOTE(ck.op, theta[o + 1], idx(tname, o + 1), " (b_out)", s.P);
  TORCH_CHECK(theta[o + 2].numel() == 1, ck.op, ": argument '", idx(tname, o + 2),
              "' (scale) must have one element, got shape ", shape_str(theta[o + 2].sizes()));
}

// Resolves one layer. W may have any shape [cout, ...] (a student weight) and is
// viewed as [cout, Pw]; `single` = the per-layer op (w [cout, P], pre [1|cout, Cin'], post [cout, 1]).
Layer make_layer(const Checker& ck, bool single, size_t i, const Tensor& W, const Tensor* Wb, const Tensor& G,
                 const Tensor* Gb, const Tensor& pre, const Tensor& post, const Tensor& h, const Tensor& c,
                 bool per_neuron, TensorList theta, size_t tbase, size_t nth) {
  auto nm = [&](const char* n) { return single ? std::string(n) : idx(n, i); };
  Layer s;
  ck(h, nm("h"));
  ck(c, nm("c"));
  TORCH_CHECK(h.dim() == 3, ck.op, ": argument '", nm("h"), "' must have shape [L, Cout, H], got ", shape_str(h.sizes()));
  s.L = h.size(0);
  s.cout = h.size(1);
  s.H = h.size(2);
  TORCH_CHECK(s.L >= 1 && s.cout >= 1 && s.H >= 1, ck.op, ": argument '", nm("h"), "' has an empty dimension: ",
              shape_str(h.sizes()));
  LRMT_CHECK_SHAPE(ck.op, c, nm("c"), s.L, s.cout, s.H);
  TORCH_CHECK(static_cast<int64_t>(nth) == 3 * s.L + 3, ck.op, ": theta", single ? "" : " (per layer)",
              " must hold 3L+3 = ", 3 * s.L + 3, " tensors for L = ", s.L, " LSTM cells (h.size(0)), got ", nth);
  ck(W, nm("w"));
  ck(G, nm("g"));
  if (single) {
    TORCH_CHECK(W.dim() == 2 && W.size(0) == s.cout, ck.op, ": argument 'w' must have shape [Cout=", s.cout,
                ", P], got ", shape_str(W.sizes()));
  } else {
    TORCH_CHECK(W.dim() >= 1 && W.size(0) == s.cout && W.numel() > 0, ck.op, ": argument '", nm("w"),
                "' must have shape [Cout=", s.cout, ", ...], got ", shape_str(W.sizes()));
  }
  TORCH_CHECK(G.sizes() == W.sizes(), ck.op, ": argument '", nm("g"), "' must have the shape of '", nm("w"), "' ",
              shape_str(W.sizes()), ", got ", shape_str(G.sizes()));
  s.Pw = W.numel() / s.cout;
  s.W = W.view({s.cout, s.Pw});
  s.G = G.view({s.cout, s.Pw});
  s.has_b = Wb != nullptr;
  if (s.has_b) {
    ck(*Wb, nm("wb"));
    ck(*Gb, nm("gb"));
    LRMT_CHECK_SHAPE(ck.op, *Wb, nm("wb"), s.cout);
    LRMT_CHECK_SHAPE(ck.op, *Gb, nm("gb"), s.cout);
    s.Wb = *Wb;
    s.Gb = *Gb;
  }
  s.P = s.Pw + (s.has_b ? 1 : 0);
  ck(pre, nm("pre"));
  ck(post, nm("post"));
  if (single) {
    TORCH_CHECK(pre.dim() == 2 && (pre.size(0) == 1 || pre.size(0) == s.cout) && pre.size(1) >= 1, ck.op,
                ": argument 'pre' must have shape [1, Cin'] (shared) or [Cout=", s.cout, ", Cin'] (per neuron), got ",
                shape_str(pre.sizes()));
    LRMT_CHECK_SHAPE(ck.op, post, "post", s.cout, 1);
    per_neuron = pre.size(0) == s.cout && s.cout > 1;
  }
  s.pre_shared = !per_neuron;
  s.pre_one = s.has_b;  // the bias synapse's pre-activation is the constant 1
  if (s.pre_shared) {
    s.npre = pre.numel();
    s.cinp = s.npre + (s.pre_one ? 1 : 0);
    TORCH_CHECK(s.cinp >= 1, ck.op, ": argument '", nm("pre"), "' is empty");
    s.pre = pre.view({s.npre});
  } else {
    TORCH_CHECK(pre.numel() >= s.cout && pre.numel() % s.cout == 0, ck.op, ": argument '", nm("pre"),
                "' is per neuron and must have Cout=", s.cout, " rows, got shape ", shape_str(pre.sizes()));
    TORCH_CHECK(!s.has_b, ck.op, ": layer ", i, ": a per-neuron 'pre' cannot be combined with a bias synapse");
    s.cinp = pre.numel() / s.cout;
    s.npre = s.cinp;
    s.pre = pre.view({s.cout, s.cinp});
  }
  TORCH_CHECK(post.numel() == s.cout, ck.op, ": argument '", nm("post"), "' must have Cout=", s.cout,
              " elements, got shape ", shape_str(post.sizes()));
  s.post = post.view({s.cout});
  s.h = h;
  s.c = c;
  s.D0 = 2 * s.P + s.cinp + 1;
  s.w_gemm = s.Pw > 1;
  s.pre_gemm = !s.pre_shared && s.cinp > 1;
  check_theta(ck, s, theta, tbase, "theta");
  s.th.assign(theta.begin() + tbase, theta.begin() + tbase + nth);
  return s;
}

// ------------------------------------------------------------------------------------
// device dispatch of the kernels
// ------------------------------------------------------------------------------------
#ifdef LRMT_WITH_CUDA
#define LRMT_KERNEL(NAME)                                                        \
  template <typename A>                                                          \
  void k_##NAME(const c10::Device& d, const A& a) {                              \
    if (d.is_cuda()) cuda::NAME(a);                                              \
    else cpu::NAME(a);                                                           \
  }
#else
#define LRMT_KERNEL(NAME)                                                        \
  template <typename A>                                                          \
  void k_##NAME(const c10::Device& d, const A& a) {                              \
    TORCH_CHECK(!d.is_cuda(), "lrmt_fast._C was built without CUDA");            \
    cpu::NAME(a);                                                                \
  }
#endif
LRMT_KERNEL(prep)
LRMT_KERNEL(cell_fwd)
LRMT_KERNEL(out_fwd)
LRMT_KERNEL(fscale)
LRMT_KERNEL(out_bwd)
LRMT_KERNEL(cell_bwd)
LRMT_KERNEL(col_reduce)
LRMT_KERNEL(row_dot)
LRMT_KERNEL(finalize)

template <typename T>
void k_relu(const c10::Device& d, const T* x, T* y, int64_t n) {
#ifdef LRMT_WITH_CUDA
  if (d.is_cuda()) return cuda::relu<T>(x, y, n);
#endif
  cpu::relu<T>(x, y, n);
}

template <typename T>
at::TensorOptions opts_of(const c10::Device& d) {
  return at::TensorOptions().device(d).dtype(c10::CppTypeToScalarType<T>::value);
}

// out[j] = sum_i A[i, j] (A rows x cols, row-major), with ATen's summation (pairwise: a GEMM
// with a ones vector accumulates 500 float32 rows in order, 5x less accurately)
template <typename T>
void colsum(const c10::Device& d, const T* A, int64_t rows, int64_t cols, T* out) {
  Tensor o = device_view<T>(opts_of<T>(d), out, {cols}, {1});
  at::sum_out(o, device_view<T>(opts_of<T>(d), A, {rows, cols}, {cols, 1}), {0});
}

// The CPU-only shortcuts of the host code (feature scale as GEMM alpha, output layer in row
// panels, memcpy): on when the CPU GEMMs go straight to the BLAS. With LRMT_CPU_BLAS=aten (or
// _ext.set_cpu_blas_direct(False)) the CPU runs the host code of the CUDA path instead, GEMMs
// through at::addmm_out over device views included, so that the CPU tests check it.
bool cpu_shortcuts(const c10::Device& d) { return d.is_cpu() && cpu_blas_direct(); }

template <typename T>
void k_copy(const c10::Device& d, const T* src, T* dst, int64_t n) {
  if (cpu_shortcuts(d)) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
  else device_view<T>(opts_of<T>(d), dst, {n}, {1}).copy_(device_view<T>(opts_of<T>(d), src, {n}, {1}));
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

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
template <typename T>
PrepArgs<T> prep_args(const Layer& s, const T* fs, T* ws, T* bvec) {
  PrepArgs<T> pa;
  pa.G4 = 4 * s.H;
  pa.D0 = s.D0;
  pa.P = s.P;
  pa.cinp = s.cinp;
  pa.wih0 = ptr<T>(s.th[0]);
  pa.b0 = ptr<T>(s.th[2]);
  pa.fs = fs;
  pa.pre = s.pre_shared ? ptr<T>(s.pre) : nullptr;
  pa.npre = s.npre;
  pa.pre_one = s.pre_one;
  pa.ws = ws;
  pa.bvec = bvec;
  return pa;
}

// The GEMMs of one layer on raw pointers (gemm.h): row-major matrices with leading dims.
template <typename T>
struct LayerGemm {
  at::TensorOptions opts;
  // C (M x N, ldc) = alpha * op(A) op(B) + beta * C
  void operator()(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const T* A, int64_t lda,
                  const T* B, int64_t ldb, double beta, T* C, int64_t ldc) const {
    gemm<T>(opts, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
};

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

// ------------------------------------------------------------------------------------
// backward of one layer
// ------------------------------------------------------------------------------------
struct LayerGrads {
  Tensor gWn, gWbn, gdelta, gh, gc;  // incoming (may be undefined)
  Tensor gW, gWb, gh_in, gc_in;      // outgoing (undefined when not needed)
  std::vector<Tensor> gth;           // empty when not needed
};

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

// ------------------------------------------------------------------------------------
// network-level drivers
// ------------------------------------------------------------------------------------
struct Net {
  std::vector<Layer> layers;
  c10::Device device = c10::Device(c10::kCPU);
  at::ScalarType dtype = at::kFloat;
};

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

using NetOut = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                          std::vector<Tensor>, Tensor, Tensor, Tensor>;

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

using OptList = c10::List<std::optional<Tensor>>;

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

// ------------------------------------------------------------------------------------
// registration
// ------------------------------------------------------------------------------------
TORCH_LIBRARY(lrmt_fast, m) {
  m.def(
      "meta_step(Tensor w, Tensor g, Tensor pre, Tensor post, Tensor h, Tensor c, Tensor[] theta, float lr, "
      "Tensor fscale, bool save=True, bool snapshot=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "meta_step_(Tensor(a!) w, Tensor g, Tensor pre, Tensor post, Tensor(b!) h, Tensor(c!) c, Tensor[] theta, "
      "float lr, Tensor fscale, Tensor(d!)? delta_out=None) -> ()");
  m.def(
      "meta_step_net(Tensor[] w, Tensor[] wb, Tensor[] g, Tensor[] gb, Tensor[] pre, Tensor[] post, Tensor[] h, "
      "Tensor[] c, Tensor[] theta, int[] flags, float lr, Tensor? fscale=None, bool save=True, bool snapshot=False) "
      "-> (Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor, Tensor, Tensor)");
  m.def(
      "meta_step_net_(Tensor(a!)[] w, Tensor(b!)[] wb, Tensor[] g, Tensor[] gb, Tensor[] pre, Tensor[] post, "
      "Tensor(c!)[] h, Tensor(d!)[] c, Tensor[] theta, int[] flags, float lr, Tensor? fscale, Tensor(e!)[] delta_out) "
      "-> ()");
  m.def(
      "meta_step_net_backward(Tensor?[] grad_w_new, Tensor?[] grad_wb_new, Tensor?[] grad_delta, "
      "Tensor?[] grad_h_new, Tensor?[] grad_c_new, Tensor[] w, Tensor[] wb, Tensor[] g, Tensor[] gb, Tensor[] pre, "
      "Tensor[] post, Tensor[] h, Tensor[] c, Tensor[] theta, int[] flags, float lr, Tensor fscale, "
      "Tensor[] h_new, Tensor[] c_new, Tensor saved, Tensor theta_snap, bool need_w, bool need_hc, bool need_theta) "
      "-> (Tensor[], Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "feature_scale_net(Tensor[] w, Tensor[] wb, Tensor[] g, Tensor[] gb, Tensor[] pre, Tensor[] post, "
      "Tensor[] h, Tensor[] c, Tensor[] theta, int[] flags) -> Tensor");
}

#define LRMT_IMPLS(m)                                          \
  m.impl("meta_step", &meta_step);                             \
  m.impl("meta_step_", &meta_step_);                           \
  m.impl("meta_step_net", &meta_step_net);                     \
  m.impl("meta_step_net_", &meta_step_net_);                   \
  m.impl("meta_step_net_backward", &meta_step_net_backward);   \
  m.impl("feature_scale_net", &feature_scale_net);

TORCH_LIBRARY_IMPL(lrmt_fast, CPU, m) { LRMT_IMPLS(m) }
#ifdef LRMT_WITH_CUDA
TORCH_LIBRARY_IMPL(lrmt_fast, CUDA, m) { LRMT_IMPLS(m) }
#endif

}  // namespace lrmt

// ------------------------------------------------------------------------------------
// Python module: build facts and workspace statistics
// ------------------------------------------------------------------------------------
#ifndef LRMT_CUDA_ARCH_LIST
#define LRMT_CUDA_ARCH_LIST ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrmt_fast fused meta-update kernels (ops under torch.ops.lrmt_fast)";
  m.def("_build_info", []() {
    pybind11::dict d;
#ifdef LRMT_WITH_CUDA
    d["cuda_compiled"] = true;
#else
    d["cuda_compiled"] = false;
#endif
    d["cpu_compiled"] = true;
    d["cuda_arch_list"] = std::string(LRMT_CUDA_ARCH_LIST);
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["cpu_avx2_kernels"] = lrmt::cpu::uses_avx2();
    d["cpu_blas_direct"] = lrmt::cpu_blas_direct();
    d["torch_version_built"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
    return d;
  });
  m.def("_workspace_stats", []() {
    std::lock_guard<std::mutex> lk(lrmt::g_stats_mutex);
    pybind11::dict d;
    d["allocations"] = lrmt::g_stats.allocations;
    d["bytes"] = lrmt::g_stats.bytes;
    int64_t live = 0;
    int64_t n = 0;
    for (auto& kv : lrmt::arenas()) {
      if (kv.second.buffer().defined()) {
        live += kv.second.buffer().numel() * static_cast<int64_t>(kv.second.buffer().element_size());
        ++n;
      }
    }
    d["this_thread_buffers"] = n;
    d["this_thread_bytes"] = live;
    return d;
  });
  m.def("_workspace_buffers", []() {
    std::vector<at::Tensor> v;
    for (auto& kv : lrmt::arenas())
      if (kv.second.buffer().defined()) v.push_back(kv.second.buffer());
    return v;
  }, "this thread's workspace buffers (held by a captured CUDA graph)");
  m.def("_workspace_clear", []() { lrmt::arenas().clear(); }, "free this thread's workspaces");
  m.def("_pool_stats", []() {
    lrmt::PoolStats s = lrmt::pool_stats();
    pybind11::dict d;
    d["os_allocations"] = s.os_allocations;
    d["reuses"] = s.reuses;
    d["live_bytes"] = s.live_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["limit_bytes"] = s.limit_bytes;
    return d;
  });
  m.def("_set_cpu_blas_direct", &lrmt::set_cpu_blas_direct,
        "CPU GEMMs straight to the BLAS (True) or through at::addmm_out (False); returns the setting");
  m.def("_pool_clear", &lrmt::pool_clear, "give the CPU pool's cached blocks back to the system");
  m.def("_pool_set_limit", &lrmt::pool_set_limit, "cap (bytes) on the CPU pool's cache; 0 turns the pool off");
}
