// CPU pointwise / reduction stages of the fused meta-update step.
//
// Every kernel is one pass over its data, parallel over rows (neurons) with
// at::parallel_for and vectorisable inner loops (`#pragma omp simd`). float32
// uses branch-free polynomial exp / tanh (Cephes-style, about 1 ulp) so that the
// loops vectorise; float64 uses libm. The float32 row functions are compiled
// twice, for AVX2+FMA and for the baseline ISA, and picked at run time.
// Denormals are flushed to zero (FTZ/DAZ) inside the kernels.
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
namespace {

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

int64_t grain_rows(int64_t cols) {
  // about 16k elements per task
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
}

// ----------------------------------------------------------------------------------
// row-range implementations (inlined into the ISA-specific wrappers below)
// ----------------------------------------------------------------------------------
template <typename T>
LRMT_INLINE void prep_rows(const PrepArgs<T>& a, int64_t k0, int64_t k1) {
  const int64_t P = a.P, D0 = a.D0, c0 = 2 * P, c1 = 2 * P + a.cinp;
  const T f0 = a.fs[0], f1 = a.fs[1], f2 = a.fs[2], f3 = a.fs[3];
  for (int64_t k = k0; k < k1; ++k) {
    const T* src = a.wih0 + k * D0;
    T* dst = a.ws + k * D0;
    const int64_t sk = a.skip;
#pragma omp simd
    for (int64_t i = sk; i < P; ++i) dst[i] = src[i] * f0;
#pragma omp simd
    for (int64_t i = P + sk; i < c0; ++i) dst[i] = src[i] * f1;
#pragma omp simd
    for (int64_t i = c0; i < c1; ++i) dst[i] = src[i] * f2;
    dst[c1] = src[c1] * f3;
    if (a.bvec) {
      T acc = a.b0[k];
      if (a.pre) {
        const T* wp = dst + c0;
        const T* pre = a.pre;
        const int64_t np = a.npre;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t c = 0; c < np; ++c) s += wp[c] * pre[c];
        acc += s;
        if (a.pre_one) acc += wp[np];
      }
      a.bvec[k] = acc;
    }
  }
}

template <typename T>
LRMT_INLINE void cell_fwd_rows(const CellFwdArgs<T>& a, const T* vbuf, T* buf, int64_t r0, int64_t r1) {
  const int64_t H = a.H, G4 = 4 * H;
  const int nr = a.r1.n;
  for (int64_t j = r0; j < r1; ++j) {
    const T* Aj = a.A + j * G4;
    const T* bias = a.bias;
#pragma omp simd
    for (int64_t k = 0; k < G4; ++k) buf[k] = Aj[k] + bias[k];
    for (int m = 0; m < nr; ++m) {
      const T um = a.r1.u[m][j * a.r1.us[m]];
      const T* vm = vbuf + m * G4;
#pragma omp simd
      for (int64_t k = 0; k < G4; ++k) buf[k] += um * vm[k];
    }
    const T* cin = a.c_in + j * H;
    T* hout = a.h_out + j * H;
    T* cout = a.c_out + j * H;
    const T* bi = buf;
    const T* bf = buf + H;
    const T* bg = buf + 2 * H;
    const T* bo = buf + 3 * H;
    if (a.gates && a.x_out) {
      T* gj = a.gates + j * G4;
      T* xj = a.x_out + j * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        T i = t_sigmoid(bi[k]), f = t_sigmoid(bf[k]), g = t_tanh(bg[k]), o = t_sigmoid(bo[k]);
        T c = f * cin[k] + i * g;
        T h = o * t_tanh(c);
        cout[k] = c;
        hout[k] = h;
        gj[k] = i;
        gj[H + k] = f;
        gj[2 * H + k] = g;
        gj[3 * H + k] = o;
        xj[k] = h > T(0) ? h : T(0);
      }
    } else {
      T* xj = a.x_out ? a.x_out + j * H : buf + G4;  // buf has room for a dummy row
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) {
        T i = t_sigmoid(bi[k]), f = t_sigmoid(bf[k]), g = t_tanh(bg[k]), o = t_sigmoid(bo[k]);
        T c = f * cin[k] + i * g;
        T h = o * t_tanh(c);
        cout[k] = c;
        hout[k] = h;
        xj[k] = h > T(0) ? h : T(0);
      }
    }
  }
}

template <typename T, bool kDelta, bool kT>
LRMT_INLINE void out_fwd_rows_t(const OutFwdArgs<T>& a, int64_t r0, int64_t r1) {
  const int64_t P = a.P, Pw = a.Pw;
  const T s = *a.scale, lr = a.lr;
  const T* bout = a.b_out;
  for (int64_t j = r0; j < r1; ++j) {
    const T* Zj = a.Z + j * P;
    const T* Gj = a.G + j * Pw;
    const T* Wj = a.W + j * Pw;
    T* Woj = a.W_out + j * Pw;
    T* dj = kDelta ? a.delta + j * P : nullptr;
    T* tj = kT ? a.t_save + j * P : nullptr;
#pragma omp simd
    for (int64_t p = 0; p < Pw; ++p) {
      T t = t_tanh(Zj[p] + bout[p]);
      T d = s * t;
      Woj[p] = Wj[p] - lr * d * Gj[p];
      if (kDelta) dj[p] = d;
      if (kT) tj[p] = t;
    }
    if (a.Wb) {
      T t = t_tanh(Zj[Pw] + bout[Pw]);
      T d = s * t;
      a.Wb_out[j] = a.Wb[j] - lr * d * a.Gb[j];
      if (kDelta) dj[Pw] = d;
      if (kT) tj[Pw] = t;
    }
  }
}

template <typename T>
LRMT_INLINE void out_fwd_rows(const OutFwdArgs<T>& a, int64_t r0, int64_t r1) {
  if (a.delta && a.t_save) out_fwd_rows_t<T, true, true>(a, r0, r1);
  else if (a.delta) out_fwd_rows_t<T, true, false>(a, r0, r1);
  else if (a.t_save) out_fwd_rows_t<T, false, true>(a, r0, r1);
  else out_fwd_rows_t<T, false, false>(a, r0, r1);
}

// returns sum(e * t) over the rows
template <typename T>
LRMT_INLINE double out_bwd_rows(const OutBwdArgs<T>& a, const T* zrow, int64_t r0, int64_t r1) {
  const int64_t P = a.P, Pw = a.Pw;
  const T s = *a.scale, lr = a.lr;
  double total = 0;
  for (int64_t j = r0; j < r1; ++j) {
    const T* gd = a.gdelta ? a.gdelta + j * P : zrow;
    const T* gw = a.gWn ? a.gWn + j * Pw : zrow;
    const T* Gj = a.G + j * Pw;
    const T* tj = a.t + j * P;
    T* dz = a.dZ + j * P;
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t p = 0; p < Pw; ++p) {
      T t = tj[p];
      T e = gd[p] - lr * Gj[p] * gw[p];
      dz[p] = e * s * (T(1) - t * t);
      acc += static_cast<double>(e * t);
    }
    if (P > Pw) {
      T t = tj[Pw];
      T e = gd[Pw] - lr * a.Gb[j] * (a.gWbn ? a.gWbn[j] : T(0));
      dz[Pw] = e * s * (T(1) - t * t);
      acc += static_cast<double>(e * t);
    }
    total += acc;
  }
  return total;
}

template <typename T>
LRMT_INLINE void cell_bwd_rows(const CellBwdArgs<T>& a, const T* zrow, T* srow, int64_t r0, int64_t r1) {
  const int64_t H = a.H, G4 = 4 * H;
  for (int64_t j = r0; j < r1; ++j) {
    const T* g = a.gates + j * G4;
    const T* gi = g;
    const T* gf = g + H;
    const T* gg = g + 2 * H;
    const T* go = g + 3 * H;
    const T* cp = a.c_prev + j * H;
    const T* cn = a.c_new + j * H;
    const T* hn = a.h_new + j * H;
    const T* dX = a.dX ? a.dX + j * H : zrow;
    const T* gh = a.gh ? a.gh + j * H : zrow;
    const T* gc = a.gc ? a.gc + j * H : zrow;
    T* dA = a.dA + j * G4;
    T* gcp = a.gc_prev ? a.gc_prev + j * H : srow;
#pragma omp simd
    for (int64_t k = 0; k < H; ++k) {
      T dh = gh[k] + (hn[k] > T(0) ? dX[k] : T(0));
      T tc = t_tanh(cn[k]);
      T i = gi[k], f = gf[k], gv = gg[k], o = go[k];
      T dc = gc[k] + dh * o * (T(1) - tc * tc);
      dA[k] = dc * gv * i * (T(1) - i);
      dA[H + k] = dc * cp[k] * f * (T(1) - f);
      dA[2 * H + k] = dc * i * (T(1) - gv * gv);
      dA[3 * H + k] = dh * tc * o * (T(1) - o);
      gcp[k] = dc * f;
    }
  }
}

template <typename T>
LRMT_INLINE void col_reduce_rows(const ColReduceArgs<T>& a, double* acc, int64_t r0, int64_t r1) {
  const int64_t K = a.K;
  for (int m = 0; m < a.n; ++m) {
    double* am = acc + m * K;
    for (int64_t k = 0; k < K; ++k) am[k] = 0.0;
  }
  for (int64_t j = r0; j < r1; ++j) {
    const T* Aj = a.A + j * K;
    for (int m = 0; m < a.n; ++m) {
      const double um = a.u[m] ? static_cast<double>(a.u[m][j * a.us[m]]) : 1.0;
      double* am = acc + m * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) am[k] += um * static_cast<double>(Aj[k]);
    }
  }
}

template <typename T>
LRMT_INLINE void row_dot_rows(const RowDotArgs<T>& a, const T* vbuf, int64_t r0, int64_t r1) {
  const int64_t K = a.K;
  for (int64_t j = r0; j < r1; ++j) {
    const T* Aj = a.A + j * K;
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += static_cast<double>(Aj[k]) * static_cast<double>(vbuf[k]);
    a.out[j * a.os] = static_cast<T>((a.base ? static_cast<double>(a.base[j * a.bs]) : 0.0) + s);
  }
}

template <typename T>
LRMT_INLINE void finalize_rows(const FinalizeArgs<T>& a, int64_t k0, int64_t k1) {
  const int64_t P = a.P, Pw = a.Pw, G4 = a.G4;
  const T f0 = a.fs[0], f1 = a.fs[1], f2 = a.fs[2], f3 = a.fs[3];
  for (int64_t k = k0; k < k1; ++k) {
    T* row = a.dwih0 + k * a.D0;
    // w and g groups
    for (int grp = 0; grp < 2; ++grp) {
      const T f = grp == 0 ? f0 : f1;
      T* r = row + grp * P;
      if (a.w_gemm) {
#pragma omp simd
        for (int64_t p = 0; p < Pw; ++p) r[p] *= f;
      } else {
        const int m = grp == 0 ? a.m_w : a.m_g;
        r[0] = f * a.red[m * G4 + k];
      }
      if (a.has_b) r[Pw] = f * a.red[(grp == 0 ? a.m_wb : a.m_gb) * G4 + k];
    }
    T* rp = row + 2 * P;
    if (a.pre_shared) {
      const T cs = f2 * a.colsum[k];
      const T* pre = a.pre;
#pragma omp simd
      for (int64_t c = 0; c < a.npre; ++c) rp[c] = cs * pre[c];
      if (a.pre_one) rp[a.npre] = cs;
    } else if (a.pre_gemm) {
#pragma omp simd
      for (int64_t c = 0; c < a.cinp; ++c) rp[c] *= f2;
    } else {
      rp[0] = f2 * a.red[a.m_pre * G4 + k];
    }
    row[2 * P + a.cinp] = f3 * a.red[a.m_post * G4 + k];
  }
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

bool detect_avx2() {
#if defined(LRMT_HAVE_AVX2_VARIANT)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
const bool kAvx2 = detect_avx2();

#define LRMT_VARIANTS(NAME, RET, PARAMS, ARGS)                          \
  LRMT_AVX2_ATTR RET NAME##_avx2_f PARAMS { return NAME<float> ARGS; } \
  RET NAME##_base_f PARAMS { return NAME<float> ARGS; }

#define F float
LRMT_VARIANTS(prep_rows, void, (const PrepArgs<F>& a, int64_t r0, int64_t r1), (a, r0, r1))
LRMT_VARIANTS(cell_fwd_rows, void,
              (const CellFwdArgs<F>& a, const F* v, F* b, int64_t r0, int64_t r1), (a, v, b, r0, r1))
LRMT_VARIANTS(out_fwd_rows, void, (const OutFwdArgs<F>& a, int64_t r0, int64_t r1), (a, r0, r1))
LRMT_VARIANTS(out_bwd_rows, double, (const OutBwdArgs<F>& a, const F* z, int64_t r0, int64_t r1),
              (a, z, r0, r1))
LRMT_VARIANTS(cell_bwd_rows, void,
              (const CellBwdArgs<F>& a, const F* z, F* s, int64_t r0, int64_t r1), (a, z, s, r0, r1))
LRMT_VARIANTS(col_reduce_rows, void, (const ColReduceArgs<F>& a, double* acc, int64_t r0, int64_t r1),
              (a, acc, r0, r1))
LRMT_VARIANTS(row_dot_rows, void, (const RowDotArgs<F>& a, const F* v, int64_t r0, int64_t r1),
              (a, v, r0, r1))
LRMT_VARIANTS(finalize_rows, void, (const FinalizeArgs<F>& a, int64_t r0, int64_t r1), (a, r0, r1))
#undef F


// ----------------------------------------------------------------------------------
// Explicit AVX2+FMA float32 rows for the stages with transcendentals. GCC does not
// vectorise the scalar exp / tanh above inside `omp simd` loops (it keeps the clamp
// and the tanh range select as control flow), so these stages ran scalar; the same
// polynomials are written here with intrinsics, 8 lanes at a time, and the scalar
// functions handle the tail (H and P need not be multiples of 8).
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
#define LD _mm256_loadu_ps
#define ST _mm256_storeu_ps

LRMT_AVX2_ATTR void cell_fwd_rows_v(const CellFwdArgs<float>& a, const float* vbuf, float* buf, int64_t r0,
                                    int64_t r1) {
  const int64_t H = a.H, G4 = 4 * H;
  const int nr = a.r1.n;
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t j = r0; j < r1; ++j) {
    const float* Aj = a.A + j * G4;
    const float* bias = a.bias;
    for (int64_t k = 0; k < G4; ++k) buf[k] = Aj[k] + bias[k];
    for (int m = 0; m < nr; ++m) {
      const float um = a.r1.u[m][j * a.r1.us[m]];
      const float* vm = vbuf + m * G4;
      for (int64_t k = 0; k < G4; ++k) buf[k] += um * vm[k];
    }
    const float* cin = a.c_in + j * H;
    float* hout = a.h_out + j * H;
    float* cout = a.c_out + j * H;
    float* gj = a.gates ? a.gates + j * G4 : nullptr;
    float* xj = a.x_out ? a.x_out + j * H : nullptr;
    const float* bi = buf;
    const float* bf = buf + H;
    const float* bg = buf + 2 * H;
    const float* bo = buf + 3 * H;
    int64_t k = 0;
    for (; k + 8 <= H; k += 8) {
      const __m256 i = vsigmoid(LD(bi + k)), f = vsigmoid(LD(bf + k)), g = vtanh(LD(bg + k)),
                   o = vsigmoid(LD(bo + k));
      const __m256 c = _mm256_fmadd_ps(f, LD(cin + k), _mm256_mul_ps(i, g));
      const __m256 h = _mm256_mul_ps(o, vtanh(c));
      ST(cout + k, c);
      ST(hout + k, h);
      if (gj) {
        ST(gj + k, i);
        ST(gj + H + k, f);
        ST(gj + 2 * H + k, g);
        ST(gj + 3 * H + k, o);
      }
      if (xj) ST(xj + k, _mm256_max_ps(h, zero));
    }
    for (; k < H; ++k) {
      const float i = fsigmoid(bi[k]), f = fsigmoid(bf[k]), g = ftanh(bg[k]), o = fsigmoid(bo[k]);
      const float c = f * cin[k] + i * g;
      const float h = o * ftanh(c);
      cout[k] = c;
      hout[k] = h;
      if (gj) {
        gj[k] = i;
        gj[H + k] = f;
        gj[2 * H + k] = g;
        gj[3 * H + k] = o;
      }
      if (xj) xj[k] = h > 0.0f ? h : 0.0f;
    }
  }
}

template <bool kDelta, bool kT>
LRMT_AVX2_ATTR void out_fwd_rows_vt(const OutFwdArgs<float>& a, int64_t r0, int64_t r1) {
  const int64_t P = a.P, Pw = a.Pw;
  const float s = *a.scale, lr = a.lr;
  const __m256 vs = _mm256_set1_ps(s), vlr = _mm256_set1_ps(lr);
  const float* bout = a.b_out;
  for (int64_t j = r0; j < r1; ++j) {
    const float* Zj = a.Z + j * P;
    const float* Gj = a.G + j * Pw;
    const float* Wj = a.W + j * Pw;
    float* Woj = a.W_out + j * Pw;
    float* dj = kDelta ? a.delta + j * P : nullptr;
    float* tj = kT ? a.t_save + j * P : nullptr;
    int64_t p = 0;
    for (; p + 8 <= Pw; p += 8) {
      const __m256 t = vtanh(_mm256_add_ps(LD(Zj + p), LD(bout + p)));
      const __m256 d = _mm256_mul_ps(vs, t);
      ST(Woj + p, _mm256_fnmadd_ps(_mm256_mul_ps(vlr, d), LD(Gj + p), LD(Wj + p)));
      if (kDelta) ST(dj + p, d);
      if (kT) ST(tj + p, t);
    }
    for (; p < Pw; ++p) {
      const float t = ftanh(Zj[p] + bout[p]);
      const float d = s * t;
      Woj[p] = Wj[p] - lr * d * Gj[p];
      if (kDelta) dj[p] = d;
      if (kT) tj[p] = t;
    }
    if (a.Wb) {
      const float t = ftanh(Zj[Pw] + bout[Pw]);
      const float d = s * t;
      a.Wb_out[j] = a.Wb[j] - lr * d * a.Gb[j];
      if (kDelta) dj[Pw] = d;
      if (kT) tj[Pw] = t;
    }
  }
}

LRMT_AVX2_ATTR void out_fwd_rows_v(const OutFwdArgs<float>& a, int64_t r0, int64_t r1) {
  if (a.delta && a.t_save) out_fwd_rows_vt<true, true>(a, r0, r1);
  else if (a.delta) out_fwd_rows_vt<true, false>(a, r0, r1);
  else if (a.t_save) out_fwd_rows_vt<false, true>(a, r0, r1);
  else out_fwd_rows_vt<false, false>(a, r0, r1);
}

LRMT_AVX2_ATTR void cell_bwd_rows_v(const CellBwdArgs<float>& a, const float* zrow, float* srow, int64_t r0,
                                    int64_t r1) {
  const int64_t H = a.H, G4 = 4 * H;
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  for (int64_t j = r0; j < r1; ++j) {
    const float* g = a.gates + j * G4;
    const float* gi = g;
    const float* gf = g + H;
    const float* gg = g + 2 * H;
    const float* go = g + 3 * H;
    const float* cp = a.c_prev + j * H;
    const float* cn = a.c_new + j * H;
    const float* hn = a.h_new + j * H;
    const float* dX = a.dX ? a.dX + j * H : zrow;
    const float* gh = a.gh ? a.gh + j * H : zrow;
    const float* gc = a.gc ? a.gc + j * H : zrow;
    float* dA = a.dA + j * G4;
    float* gcp = a.gc_prev ? a.gc_prev + j * H : srow;
    int64_t k = 0;
    for (; k + 8 <= H; k += 8) {
      const __m256 pos = _mm256_cmp_ps(LD(hn + k), zero, _CMP_GT_OQ);
      const __m256 dh = _mm256_add_ps(LD(gh + k), _mm256_and_ps(pos, LD(dX + k)));
      const __m256 tc = vtanh(LD(cn + k));
      const __m256 i = LD(gi + k), f = LD(gf + k), gv = LD(gg + k), o = LD(go + k);
      const __m256 dc = _mm256_fmadd_ps(_mm256_mul_ps(dh, o), _mm256_fnmadd_ps(tc, tc, one), LD(gc + k));
      ST(dA + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dc, gv), i), _mm256_sub_ps(one, i)));
      ST(dA + H + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dc, LD(cp + k)), f), _mm256_sub_ps(one, f)));
      ST(dA + 2 * H + k, _mm256_mul_ps(_mm256_mul_ps(dc, i), _mm256_fnmadd_ps(gv, gv, one)));
      ST(dA + 3 * H + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dh, tc), o), _mm256_sub_ps(one, o)));
      ST(gcp + k, _mm256_mul_ps(dc, f));
    }
    for (; k < H; ++k) {
      const float dxk = dX[k];
      const float dh = gh[k] + (hn[k] > 0.0f ? dxk : 0.0f);
      const float tc = ftanh(cn[k]);
      const float i = gi[k], f = gf[k], gv = gg[k], o = go[k];
      const float dc = gc[k] + dh * o * (1.0f - tc * tc);
      dA[k] = dc * gv * i * (1.0f - i);
      dA[H + k] = dc * cp[k] * f * (1.0f - f);
      dA[2 * H + k] = dc * i * (1.0f - gv * gv);
      dA[3 * H + k] = dh * tc * o * (1.0f - o);
      gcp[k] = dc * f;
    }
  }
}
#undef LD
#undef ST
#undef LRMT_V
#endif  // LRMT_HAVE_AVX2_VARIANT


// Sum of squares in double (the feature scale). Four independent accumulators: the
// plain loop is one serial chain of double adds (~4 cycles an element), GCC does not
// vectorise it (reassociation), and for LeNet's fc1 (w and g: 800k values a step) it
// cost ~1 ms, a tenth of the whole step.
template <typename T>
double sumsq_generic(const T* x, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const double a = x[i], b = x[i + 1], c = x[i + 2], d = x[i + 3];
    s0 += a * a;
    s1 += b * b;
    s2 += c * c;
    s3 += d * d;
  }
  for (; i < n; ++i) {
    const double a = x[i];
    s0 += a * a;
  }
  return (s0 + s1) + (s2 + s3);
}
#if defined(LRMT_HAVE_AVX2_VARIANT)
LRMT_AVX2_ATTR double sumsq_avx2(const float* x, int64_t n) {
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
    const __m256d p0 = _mm256_cvtps_pd(_mm256_castps256_ps128(u)), p1 = _mm256_cvtps_pd(_mm256_extractf128_ps(u, 1));
    const __m256d p2 = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), p3 = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    a0 = _mm256_fmadd_pd(p0, p0, a0);
    a1 = _mm256_fmadd_pd(p1, p1, a1);
    a2 = _mm256_fmadd_pd(p2, p2, a2);
    a3 = _mm256_fmadd_pd(p3, p3, a3);
  }
  const __m256d t = _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3));
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, t);
  double s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) {
    const double a = x[i];
    s += a * a;
  }
  return s;
}
#endif
template <typename T>
double sumsq(const T* x, int64_t n) {
#if defined(LRMT_HAVE_AVX2_VARIANT)
  if constexpr (std::is_same_v<T, float>) {
    if (kAvx2) return sumsq_avx2(x, n);
  }
#endif
  return sumsq_generic(x, n);
}

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
// reductions below sum the pieces in order, so results do not depend on scheduling.
inline int64_t num_chunks(int64_t n, int64_t min_per_chunk) {
  int64_t c = std::min<int64_t>(at::get_num_threads(), (n + min_per_chunk - 1) / std::max<int64_t>(1, min_per_chunk));
  return std::max<int64_t>(1, c);
}

}  // namespace

bool uses_avx2() { return kAvx2; }

// ----------------------------------------------------------------------------------
// kernels
// ----------------------------------------------------------------------------------
template <typename T>
void prep(const PrepArgs<T>& a) {
  at::parallel_for(0, a.G4, grain_rows(a.D0), [&](int64_t k0, int64_t k1) {
    FtzGuard ftz;
    LRMT_CALL(prep_rows, T, a, k0, k1);
  });
}

template <typename T>
void cell_fwd(const CellFwdArgs<T>& a) {
  const int64_t G4 = 4 * a.H;
  // gather the rank-1 weight columns into contiguous rows once
  T* vbuf = scratch<T>(0, std::max<int64_t>(1, a.r1.n * G4));
  for (int m = 0; m < a.r1.n; ++m)
    for (int64_t k = 0; k < G4; ++k) vbuf[m * G4 + k] = a.r1.v[m][k * a.r1.vs[m]];
  const T* vb = vbuf;
  at::parallel_for(0, a.rows, grain_rows(G4), [&](int64_t r0, int64_t r1) {
    FtzGuard ftz;
    T* buf = scratch<T>(1, G4 + a.H);
    if (!LRMT_CALL_V(cell_fwd_rows_v, T, a, vb, buf, r0, r1)) LRMT_CALL(cell_fwd_rows, T, a, vb, buf, r0, r1);
  });
}

template <typename T>
void out_fwd(const OutFwdArgs<T>& a) {
  at::parallel_for(0, a.rows, grain_rows(a.P), [&](int64_t r0, int64_t r1) {
    FtzGuard ftz;
    if (!LRMT_CALL_V(out_fwd_rows_v, T, a, r0, r1)) LRMT_CALL(out_fwd_rows, T, a, r0, r1);
  });
}

template <typename T>
void fscale(const FscaleArgs<T>& a) {
  FtzGuard ftz;
  for (int m = 0; m < 4; ++m) {
    double total = static_cast<double>(a.ones[m]);
    const T* arrs[2] = {a.a[m], a.b[m]};
    const int64_t ns[2] = {a.na[m], a.nb[m]};
    for (int q = 0; q < 2; ++q) {
      const T* x = arrs[q];
      const int64_t n = ns[q];
      if (!x || n == 0) continue;
      const int64_t nc = num_chunks(n, 32768);
      double parts[64] = {0};
      const int64_t ncc = std::min<int64_t>(nc, 64);
      const int64_t per = (n + ncc - 1) / ncc;
      at::parallel_for(0, ncc, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i0 = c * per, i1 = std::min(n, i0 + per);
          parts[c] = sumsq(x + i0, std::max<int64_t>(0, i1 - i0));
        }
      });
      for (int64_t c = 0; c < ncc; ++c) total += parts[c];
    }
    const int64_t count = a.na[m] + a.nb[m] + a.ones[m];
    const float mean = static_cast<float>(total / static_cast<double>(std::max<int64_t>(count, 1)));
    const float rms = std::sqrt(mean);
    a.out[m] = static_cast<T>(1.0f / (rms + 1e-8f));
  }
}

template <typename T>
void out_bwd(const OutBwdArgs<T>& a) {
  const int64_t ncc = std::min<int64_t>(num_chunks(a.rows, grain_rows(a.P)), 256);
  const int64_t per = (a.rows + ncc - 1) / ncc;
  double parts[256] = {0};
  at::parallel_for(0, ncc, 1, [&](int64_t c0, int64_t c1) {
    FtzGuard ftz;
    const T* z = zeros<T>(std::max<int64_t>(a.P, 1));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = std::min(a.rows, c * per), r1 = std::min(a.rows, r0 + per);
      if (r0 < r1) parts[c] = LRMT_CALL(out_bwd_rows, T, a, z, r0, r1);
    }
  });
  double total = 0;
  for (int64_t c = 0; c < ncc; ++c) total += parts[c];
  a.g_scale[0] = static_cast<T>(total);
}

template <typename T>
void cell_bwd(const CellBwdArgs<T>& a) {
  at::parallel_for(0, a.rows, grain_rows(4 * a.H), [&](int64_t r0, int64_t r1) {
    FtzGuard ftz;
    const T* z = zeros<T>(a.H);
    T* s = scratch<T>(2, a.H);
    if (!LRMT_CALL_V(cell_bwd_rows_v, T, a, z, s, r0, r1)) LRMT_CALL(cell_bwd_rows, T, a, z, s, r0, r1);
  });
}

template <typename T>
void col_reduce(const ColReduceArgs<T>& a) {
  if (a.n == 0) return;
  const int64_t K = a.K;
  const int64_t ncc = std::min<int64_t>(num_chunks(a.rows, 64), 64);
  const int64_t per = (a.rows + ncc - 1) / ncc;
  double* parts = scratch<double>(3, ncc * a.n * K);
  at::parallel_for(0, ncc, 1, [&](int64_t c0, int64_t c1) {
    FtzGuard ftz;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = std::min(a.rows, c * per), r1 = std::min(a.rows, r0 + per);
      LRMT_CALL(col_reduce_rows, T, a, parts + c * a.n * K, r0, r1);
    }
  });
  for (int m = 0; m < a.n; ++m) {
    T* o = a.out + m * K;
    for (int64_t k = 0; k < K; ++k) {
      double s = 0;
      for (int64_t c = 0; c < ncc; ++c) s += parts[(c * a.n + m) * K + k];
      o[k] = static_cast<T>(s);
    }
  }
}

template <typename T>
void row_dot(const RowDotArgs<T>& a) {
  T* vbuf = scratch<T>(0, std::max<int64_t>(1, a.K));
  for (int64_t k = 0; k < a.K; ++k) vbuf[k] = a.v[k * a.vs];
  const T* vb = vbuf;
  at::parallel_for(0, a.rows, grain_rows(a.K), [&](int64_t r0, int64_t r1) {
    FtzGuard ftz;
    LRMT_CALL(row_dot_rows, T, a, vb, r0, r1);
  });
}

template <typename T>
void finalize(const FinalizeArgs<T>& a) {
  at::parallel_for(0, a.G4, grain_rows(a.D0), [&](int64_t k0, int64_t k1) {
    FtzGuard ftz;
    LRMT_CALL(finalize_rows, T, a, k0, k1);
  });
}

template <typename T>
void relu(const T* x, T* y, int64_t n) {
  at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) y[i] = x[i] > T(0) ? x[i] : T(0);
  });
}

LRMT_INSTANTIATE_KERNELS(float)
LRMT_INSTANTIATE_KERNELS(double)

}  // namespace cpu
}  // namespace lrmt
