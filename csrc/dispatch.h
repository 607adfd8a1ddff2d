// lrmt_fast._C: device dispatch of the kernels (kernels.h: cpu:: / cuda::) and the small
// device-aware helpers of the host code (GEMMs of one layer, column sums, copies).
#pragma once

#include <ATen/ATen.h>

#include <cstring>

#include "gemm.h"
#include "kernels.h"

namespace lrmt {

using at::Tensor;

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
inline bool cpu_shortcuts(const c10::Device& d) { return d.is_cpu() && cpu_blas_direct(); }

template <typename T>
void k_copy(const c10::Device& d, const T* src, T* dst, int64_t n) {
  if (cpu_shortcuts(d)) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
  else device_view<T>(opts_of<T>(d), dst, {n}, {1}).copy_(device_view<T>(opts_of<T>(d), src, {n}, {1}));
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
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

}  // namespace lrmt
