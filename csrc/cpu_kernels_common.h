// lrmt_fast._C: what the CPU kernels share (cpu_kernels_forward.cpp, cpu_kernels_backward.cpp).
//
// Internal header, included by those two files only. It holds the float32 math that lets
// the kernels' loops vectorise: branch-free polynomial exp / sigmoid / tanh (Cephes-style,
// about 1 ulp; float64 uses libm through the same t_sigmoid / t_tanh overloads) and their
// AVX2+FMA 8-lane versions (vexp / vsigmoid / vtanh); the FTZ/DAZ guard (denormals are
// flushed to zero inside the kernels); grow-only per-thread scratch buffers; the row grain
// and the fixed chunking of the reductions; and the run-time ISA dispatch: the float32 row
// functions are compiled twice, for AVX2+FMA and for the baseline ISA (LRMT_VARIANTS), and
// LRMT_CALL / LRMT_CALL_V pick one at run time (kAvx2). Everything is in lrmt::cpu::detail,
// as inline functions and variables (one instance in the program: the scratch buffers are
// shared by both files as they were by the one file before), or static inline for the
// AVX2 vector math.
#pragma once

#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <xmmintrin.h>
#define LRMT_X86 1
#endif

#if defined(__GNUC__)
#define LRMT_INLINE inline __attribute__((always_inline))
#else
#define LRMT_INLINE inline
#endif

namespace lrmt {
namespace cpu {
namespace detail {

// ----------------------------------------------------------------------------------
// scalar math
// ----------------------------------------------------------------------------------
LRMT_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
LRMT_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) for float32: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial (Cephes expf).
LRMT_INLINE float fexp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: round to nearest integer by addition
  float n = (x * 1.44269504088896341f + kMagic) - kMagic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * bits_to_float(e);
}

LRMT_INLINE float fsigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }

// tanh for float32: odd polynomial for |x| < 0.625 (Cephes tanhf), else 1 - 2/(exp(2|x|)+1).
LRMT_INLINE float ftanh(float x) {
  float ax = std::fabs(x);
  float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  float small = x + x * z * p;
  float e = fexp(std::min(2.0f * ax, 88.0f));
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = std::copysign(big, x);
  // branch-free select (a ternary here is kept as control flow by GCC and blocks vectorisation)
  const int32_t m = -static_cast<int32_t>(ax < 0.625f);
  return bits_to_float((float_to_bits(small) & m) | (float_to_bits(big) & ~m));
}

LRMT_INLINE float t_sigmoid(float x) { return fsigmoid(x); }
LRMT_INLINE float t_tanh(float x) { return ftanh(x); }
LRMT_INLINE double t_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
LRMT_INLINE double t_tanh(double x) { return std::tanh(x); }

struct FtzGuard {
#ifdef LRMT_X86
  unsigned int old;
  FtzGuard() : old(_mm_getcsr()) { _mm_setcsr(old | 0x8040u); }  // FTZ | DAZ
  ~FtzGuard() { _mm_setcsr(old); }
#endif
};

// Grow-only per-thread scratch (no allocation once warm).
template <typename T>
T* scratch(int slot, int64_t n) {
  thread_local std::vector<T> bufs[4];
  auto& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(static_cast<size_t>(n));
  return b.data();
}
template <typename T>
const T* zeros(int64_t n) {
  thread_local std::vector<T> z;
  if (static_cast<int64_t>(z.size()) < n) z.assign(static_cast<size_t>(n), T(0));
  return z.data();
}

inline int64_t grain_rows(int64_t cols) {
  // about 16k elements per task
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
}

// ----------------------------------------------------------------------------------
// ISA variants: the float32 row functions are compiled for AVX2+FMA and baseline.
// ----------------------------------------------------------------------------------
#if defined(LRMT_X86) && defined(__GNUC__)
#define LRMT_AVX2_ATTR __attribute__((target("avx2,fma")))
#define LRMT_HAVE_AVX2_VARIANT 1
#else
#define LRMT_AVX2_ATTR
#endif

inline bool detect_avx2() {
#if defined(LRMT_HAVE_AVX2_VARIANT)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
inline const bool kAvx2 = detect_avx2();

#define LRMT_VARIANTS(NAME, RET, PARAMS, ARGS)                          \
  LRMT_AVX2_ATTR RET NAME##_avx2_f PARAMS { return NAME<float> ARGS; } \
  RET NAME##_base_f PARAMS { return NAME<float> ARGS; }


// ----------------------------------------------------------------------------------
// Explicit AVX2+FMA float32 rows for the stages with transcendentals. GCC does not
// vectorise the scalar exp / tanh above inside `omp simd` loops (it keeps the clamp
// and the tanh range select as control flow), so these stages ran scalar; the same
// polynomials are written here with intrinsics, 8 lanes at a time, and the scalar
// functions handle the tail (H and P need not be multiples of 8). The rows themselves are in
// cpu_kernels_forward.cpp (cell_fwd, out_fwd) and cpu_kernels_backward.cpp (cell_bwd).
// ----------------------------------------------------------------------------------
#if defined(LRMT_HAVE_AVX2_VARIANT)
#define LRMT_V LRMT_AVX2_ATTR static inline
LRMT_V __m256 vexp(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic), magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
LRMT_V __m256 vsigmoid(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, vexp(_mm256_xor_ps(x, _mm256_set1_ps(-0.0f)))));
}
LRMT_V __m256 vtanh(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign, x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422e-1f));
  const __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(x, z), p, x);
  const __m256 e = vexp(_mm256_min_ps(_mm256_add_ps(ax, ax), _mm256_set1_ps(88.0f)));
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
  big = _mm256_or_ps(big, _mm256_and_ps(x, sign));  // big >= 0: copysign by OR-ing x's sign
  return _mm256_blendv_ps(big, small, _mm256_cmp_ps(ax, _mm256_set1_ps(0.625f), _CMP_LT_OQ));
}
#undef LRMT_V
#endif  // LRMT_HAVE_AVX2_VARIANT

// dispatch helpers: float -> ISA variant, double -> generic
#define LRMT_CALL(NAME, T, ...)                                         \
  [&]() {                                                               \
    if constexpr (std::is_same_v<T, float>) {                           \
      return kAvx2 ? NAME##_avx2_f(__VA_ARGS__) : NAME##_base_f(__VA_ARGS__); \
    } else {                                                            \
      return NAME<T>(__VA_ARGS__);                                      \
    }                                                                   \
  }()


// explicit-AVX2 float rows where they exist: returns true when it ran
#if defined(LRMT_HAVE_AVX2_VARIANT)
#define LRMT_CALL_V(NAME, T, ...)                                       \
  [&]() -> bool {                                                       \
    if constexpr (std::is_same_v<T, float>) {                           \
      if (kAvx2) {                                                      \
        NAME(__VA_ARGS__);                                              \
        return true;                                                    \
      }                                                                 \
    }                                                                   \
    return false;                                                       \
  }()
#else
#define LRMT_CALL_V(NAME, T, ...) false
#endif

// Fixed chunking of [0, n) into at most `at::get_num_threads()` pieces: the
// reductions (fscale, out_bwd, col_reduce) sum the pieces in order, so results do not
// depend on scheduling.
inline int64_t num_chunks(int64_t n, int64_t min_per_chunk) {
  int64_t c = std::min<int64_t>(at::get_num_threads(), (n + min_per_chunk - 1) / std::max<int64_t>(1, min_per_chunk));
  return std::max<int64_t>(1, c);
}

}  // namespace detail
}  // namespace cpu
}  // namespace lrmt
