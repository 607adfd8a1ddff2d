// Device kernels of the fused meta-update step (pointwise / reduction stages).
//
// Plain C++ (no ATen) so that the same argument structs are shared by the CPU
// implementation (cpu_kernels_forward.cpp, cpu_kernels_backward.cpp) and the CUDA one
// (cuda_kernels.cu). The orchestration (forward.cpp, backward.cpp) runs the GEMMs through
// ATen and calls these kernels between them. All matrices are row-major and dense unless a
// stride is given. Notation: rows = Cout (neurons), H = LSTM hidden size, G4 = 4H.
#pragma once

#include <cstdint>

namespace lrmt {

constexpr int kMaxRank1 = 8;

// A set of rank-1 terms  a[j, k] += sum_m u_m[j * us_m] * v_m[k * vs_m]
// (feature groups of width one: a bias synapse, post, a per-neuron pre of
// width one, and w / g themselves when P == 1).
template <typename T>
struct Rank1 {
  int n = 0;
  const T* u[kMaxRank1] = {};
  int64_t us[kMaxRank1] = {};
  const T* v[kMaxRank1] = {};
  int64_t vs[kMaxRank1] = {};
};

// Feature scaling folded into the first-cell weights:
//   ws[k, col] = wih0[k, col] * fs[group(col)]
// groups: [0, P) -> fs0 (w), [P, 2P) -> fs1 (g), [2P, 2P+cinp) -> fs2 (pre), 2P+cinp -> fs3 (post)
//   bvec[k] = b0[k] + sum_c ws[k, 2P + c] * pre'[c]     (only when pre is shared;
//   pre' = pre[0..npre) followed by a constant 1 when pre_one)
template <typename T>
struct PrepArgs {
  int64_t G4 = 0, D0 = 0, P = 0, cinp = 0;
  const T* wih0 = nullptr;
  const T* b0 = nullptr;
  const T* fs = nullptr;
  const T* pre = nullptr;  // shared pre values, or nullptr (per-neuron pre)
  int64_t npre = 0;
  bool pre_one = false;
  T* ws = nullptr;
  T* bvec = nullptr;
  // CPU forward: columns [0, skip) and [P, P + skip) (the w and g blocks that go through GEMMs
  // with the scale as alpha) are not written. 0: write every column. (CUDA ignores it.)
  int64_t skip = 0;
};

// LSTM cell, pointwise part (gate order i, f, g, o):
//   a = A[j, :] + bias + rank-1 terms;  c' = sig(a_f) c + sig(a_i) tanh(a_g);  h' = sig(a_o) tanh(c')
// writes h_out, c_out, the activated gates (if gates != nullptr) and relu(h') (if x_out).
template <typename T>
struct CellFwdArgs {
  int64_t rows = 0, H = 0;
  const T* A = nullptr;
  const T* bias = nullptr;
  Rank1<T> r1;
  const T* c_in = nullptr;
  T* h_out = nullptr;
  T* c_out = nullptr;
  T* gates = nullptr;
  T* x_out = nullptr;
};

// Output layer, gate and update. Row j has P = Pw + (Wb != nullptr) synapses;
// synapse p < Pw lives in W[j, p] (G[j, p]); synapse Pw (the bias) in Wb[j] (Gb[j]).
//   t = tanh(Z + b_out);  delta = scale * t;  w_new = w - lr * delta * g
template <typename T>
struct OutFwdArgs {
  int64_t rows = 0, P = 0, Pw = 0;
  const T* Z = nullptr;
  const T* b_out = nullptr;
  const T* scale = nullptr;
  T lr = 0;
  const T* G = nullptr;
  const T* Gb = nullptr;
  const T* W = nullptr;
  const T* Wb = nullptr;
  T* W_out = nullptr;   // may alias W (in place)
  T* Wb_out = nullptr;  // may alias Wb
  T* delta = nullptr;   // [rows, P] or nullptr
  T* t_save = nullptr;  // [rows, P] or nullptr
};

// Per-group feature scale of one layer (docs/method.md section 1, meta_learner.feature_scale):
//   fs[m] = 1 / (sqrt(mean of squares of group m) + 1e-8), evaluated in float32 like the
//   reference, with the sum of squares accumulated in double.
// group m = a[m] (na elements) + b[m] (nb elements) + `ones[m]` constant ones.
template <typename T>
struct FscaleArgs {
  const T* a[4] = {};
  int64_t na[4] = {};
  const T* b[4] = {};
  int64_t nb[4] = {};
  int64_t ones[4] = {};
  T* out = nullptr;  // 4 values
};

// Backward of the output stage:
//   e = gdelta - lr * g * gw_new;  dZ = e * scale * (1 - t^2);  g_scale = sum(e * t)
template <typename T>
struct OutBwdArgs {
  int64_t rows = 0, P = 0, Pw = 0;
  const T* gWn = nullptr;   // [rows, Pw] or nullptr
  const T* gWbn = nullptr;  // [rows] or nullptr
  const T* gdelta = nullptr;  // [rows, P] or nullptr
  const T* G = nullptr;
  const T* Gb = nullptr;
  const T* t = nullptr;
  const T* scale = nullptr;
  T lr = 0;
  T* dZ = nullptr;
  T* g_scale = nullptr;  // 1 value (overwritten)
  T* partial = nullptr;  // workspace of kPartials values (CUDA)
};
constexpr int kPartials = 1024;

// Backward of one LSTM cell, pointwise part.
//   dh = gh + dX * (h_new > 0);  dc = gc + dh * o * (1 - tanh(c_new)^2)
//   dA = d(gate pre-activations);  gc_prev = dc * f
template <typename T>
struct CellBwdArgs {
  int64_t rows = 0, H = 0;
  const T* gates = nullptr;
  const T* c_prev = nullptr;
  const T* c_new = nullptr;
  const T* h_new = nullptr;
  const T* dX = nullptr;  // grad of relu(h_new) from the layer above, or nullptr
  const T* gh = nullptr;  // incoming grad of h_new (T-BPTT), or nullptr
  const T* gc = nullptr;  // incoming grad of c_new, or nullptr
  T* dA = nullptr;
  T* gc_prev = nullptr;   // or nullptr
};

// out[m * K + k] = sum_j A[j * K + k] * u_m[j * us_m]   (u_m == nullptr: all ones)
template <typename T>
struct ColReduceArgs {
  int64_t rows = 0, K = 0;
  const T* A = nullptr;
  int n = 0;
  const T* u[kMaxRank1] = {};
  int64_t us[kMaxRank1] = {};
  T* out = nullptr;
};

// out[j * os] = (base ? base[j * bs] : 0) + sum_k A[j * K + k] * v[k * vs]
template <typename T>
struct RowDotArgs {
  int64_t rows = 0, K = 0;
  const T* A = nullptr;
  const T* v = nullptr;
  int64_t vs = 0;
  const T* base = nullptr;
  int64_t bs = 0;
  T* out = nullptr;
  int64_t os = 0;
};

// Final assembly of d(w_ih of cell 0) [G4, D0]: columns computed by GEMM are
// scaled by their group's fs; width-one columns come from `red` (ColReduce
// rows m_*); shared-pre columns are fs2 * colsum[k] * pre'[c].
template <typename T>
struct FinalizeArgs {
  int64_t G4 = 0, D0 = 0, P = 0, Pw = 0, cinp = 0;
  bool has_b = false, w_gemm = false, pre_shared = false, pre_gemm = false;
  const T* fs = nullptr;
  const T* colsum = nullptr;
  const T* red = nullptr;
  int m_w = -1, m_wb = -1, m_g = -1, m_gb = -1, m_pre = -1, m_post = -1;
  const T* pre = nullptr;
  int64_t npre = 0;
  bool pre_one = false;
  T* dwih0 = nullptr;
};

#define LRMT_DECLARE_KERNELS(NS)                                   \
  namespace NS {                                                   \
  template <typename T> void prep(const PrepArgs<T>&);             \
  template <typename T> void cell_fwd(const CellFwdArgs<T>&);      \
  template <typename T> void out_fwd(const OutFwdArgs<T>&);        \
  template <typename T> void fscale(const FscaleArgs<T>&);         \
  template <typename T> void out_bwd(const OutBwdArgs<T>&);        \
  template <typename T> void cell_bwd(const CellBwdArgs<T>&);      \
  template <typename T> void col_reduce(const ColReduceArgs<T>&);  \
  template <typename T> void row_dot(const RowDotArgs<T>&);        \
  template <typename T> void finalize(const FinalizeArgs<T>&);     \
  template <typename T> void relu(const T* x, T* y, int64_t n);    \
  }

// Explicit instantiation of every kernel entry point for one element type, inside the
// backend's namespace, so the lists cannot drift from the declarations. cuda_kernels.cu ends
// with LRMT_INSTANTIATE_KERNELS(float) and (double); the CPU backend is two files, so
// cpu_kernels_forward.cpp instantiates the forward half and cpu_kernels_backward.cpp the
// backward half (the two halves together are LRMT_INSTANTIATE_KERNELS).
#define LRMT_INSTANTIATE_FORWARD_KERNELS(T)                   \
  template void prep<T>(const PrepArgs<T>&);                  \
  template void cell_fwd<T>(const CellFwdArgs<T>&);           \
  template void out_fwd<T>(const OutFwdArgs<T>&);             \
  template void fscale<T>(const FscaleArgs<T>&);
#define LRMT_INSTANTIATE_BACKWARD_KERNELS(T)                  \
  template void out_bwd<T>(const OutBwdArgs<T>&);             \
  template void cell_bwd<T>(const CellBwdArgs<T>&);           \
  template void col_reduce<T>(const ColReduceArgs<T>&);       \
  template void row_dot<T>(const RowDotArgs<T>&);             \
  template void finalize<T>(const FinalizeArgs<T>&);          \
  template void relu<T>(const T*, T*, int64_t);
#define LRMT_INSTANTIATE_KERNELS(T)   \
  LRMT_INSTANTIATE_FORWARD_KERNELS(T) \
  LRMT_INSTANTIATE_BACKWARD_KERNELS(T)

LRMT_DECLARE_KERNELS(cpu)
#ifdef LRMT_WITH_CUDA
LRMT_DECLARE_KERNELS(cuda)
#endif

// CPU feature flags used by the kernels (for build_info / tests).
namespace cpu {
bool uses_avx2();
}

}  // namespace lrmt
