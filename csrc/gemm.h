// lrmt_fast._C: the GEMMs of the fused op on raw pointers.
//
// C = alpha * op(A) op(B) + beta * C, every matrix row-major with a leading dimension (so
// column blocks of a larger matrix are plain pointers). On the CPU this calls the BLAS that
// ATen's own CPU matmul uses (MKL's sgemm_/dgemm_ inside libtorch_cpu, looked up once) with no
// tensor in between: a ResNet-32 step runs ~1,700 small GEMMs, and at::mm_out's dispatch,
// checks and view bookkeeping (narrow / t / as_strided per call) cost ~7 us each, a fifth of
// the step (docs/performance.md). Elsewhere (CUDA, or a torch without that BLAS symbol)
// it wraps the pointers with device_view and calls at::addmm_out (cuBLAS on the GPU).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lrmt {

// CPU GEMMs go straight to the BLAS (else through at::addmm_out): true when the BLAS was
// found and not turned off (env LRMT_CPU_BLAS=aten, or set_cpu_blas_direct(false)); the op's
// other CPU-only shortcuts follow this flag too (dispatch.h: cpu_shortcuts)
bool cpu_blas_direct();
bool cpu_blas_available();
bool set_cpu_blas_direct(bool on);  // returns the new setting (false if no BLAS was found)

// A tensor over existing memory of opts' device and dtype, with the given sizes and strides;
// the device is named, so there is no pointer query (CUDA-graph safe).
template <typename T>
at::Tensor device_view(const at::TensorOptions& opts, const T* p, at::IntArrayRef sizes, at::IntArrayRef strides) {
  return at::for_blob(const_cast<T*>(p), sizes).strides(strides).target_device(opts.device()).options(opts).make_tensor();
}

void gemm_cpu_blas(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_cpu_blas(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                   const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// op(A) is M x K: A stored M x K (ta = false) or K x M (ta = true), leading dimension lda;
// op(B) is K x N likewise; C is M x N with leading dimension ldc. `opts` gives the device
// and dtype of the tensor wrappers on the fallback path.
template <typename T>
void gemm(const at::TensorOptions& opts, bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha,
          const T* A, int64_t lda, const T* B, int64_t ldb, double beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (opts.device().is_cpu() && cpu_blas_direct()) {
    gemm_cpu_blas(ta, tb, M, N, K, static_cast<T>(alpha), A, lda, B, ldb, static_cast<T>(beta), C, ldc);
    return;
  }
  // op(X) (rows x cols) of a stored matrix: X itself, or the transpose of the stored cols x rows
  auto op = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    return trans ? device_view<T>(opts, p, {rows, cols}, {1, ld}) : device_view<T>(opts, p, {rows, cols}, {ld, 1});
  };
  at::Tensor c = device_view<T>(opts, C, {M, N}, {ldc, 1});
  at::addmm_out(c, c, op(A, M, K, lda, ta), op(B, K, N, ldb, tb), beta, alpha);
}

}  // namespace lrmt
