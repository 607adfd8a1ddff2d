// lrmt_fast._C: the direct CPU BLAS calls of gemm.h.
#include "gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>

#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace lrmt {
namespace {

// the Fortran BLAS interface with 32-bit integers, as ATen declares and calls it (CPUBlas.cpp)
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                         const double*, const int*, const double*, const int*, const double*, double*,
                         const int*);

struct Blas {
  sgemm_t s = nullptr;
  dgemm_t d = nullptr;
};

const Blas& blas() {
  static const Blas b = [] {
    Blas r;
#if defined(__linux__)
    // only libtorch_cpu's own BLAS (the one at::mm uses), never another library's sgemm_;
    // LRMT_CPU_BLAS=aten keeps every GEMM on at::addmm_out
    const char* env = std::getenv("LRMT_CPU_BLAS");
    if (env != nullptr && std::string(env) == "aten") return r;
    void* h = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (h != nullptr) {
      r.s = reinterpret_cast<sgemm_t>(dlsym(h, "sgemm_"));
      r.d = reinterpret_cast<dgemm_t>(dlsym(h, "dgemm_"));
      if (r.s == nullptr || r.d == nullptr) r = Blas();
      dlclose(h);  // NOLOAD took a reference: the library stays loaded
    }
#endif
    return r;
  }();
  return b;
}

std::atomic<bool>& direct_flag() {
  static std::atomic<bool> f{blas().s != nullptr};
  return f;
}

bool fits_int(int64_t x) { return x <= std::numeric_limits<int>::max(); }

// row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands
template <typename T, typename F>
void call(F f, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
          int64_t ldb, T beta, T* C, int64_t ldc) {
  TORCH_CHECK(fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) && fits_int(ldb) && fits_int(ldc),
              "lrmt_fast: a GEMM dimension exceeds the 32-bit BLAS interface");
  if (K == 0) {  // C = beta * C (BLAS would do the same; some reject lda = 0)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const char tB = tb ? 'T' : 'N', tA = ta ? 'T' : 'N';
  // BLAS wants each leading dimension >= the stored rows of its column-major view
  const int n = static_cast<int>(N), m = static_cast<int>(M), k = static_cast<int>(K);
  const int ldb_ = static_cast<int>(std::max<int64_t>(ldb, tb ? K : N));
  const int lda_ = static_cast<int>(std::max<int64_t>(lda, ta ? M : K));
  const int ldc_ = static_cast<int>(std::max<int64_t>(ldc, N));
  f(&tB, &tA, &n, &m, &k, &alpha, B, &ldb_, A, &lda_, &beta, C, &ldc_);
}

}  // namespace

bool cpu_blas_direct() { return direct_flag().load(std::memory_order_relaxed); }

bool cpu_blas_available() { return blas().s != nullptr; }

bool set_cpu_blas_direct(bool on) {
  direct_flag().store(on && cpu_blas_available());
  return cpu_blas_direct();
}

void gemm_cpu_blas(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  call<float>(blas().s, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm_cpu_blas(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                   const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  call<double>(blas().d, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace lrmt
