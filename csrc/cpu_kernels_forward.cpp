// lrmt_fast._C: the CPU kernels of the fused step's forward stages (kernels.h).
//
// prep (the feature scale folded into the first cell's weights), cell_fwd (the LSTM cells'
// pointwise part), out_fwd (the output layer's gate and weight update) and fscale (the
// per-group feature scale, a sum of squares in double), plus uses_avx2(). Every kernel is one
// pass over its data, parallel over rows (neurons) with at::parallel_for and vectorisable
// inner loops (`#pragma omp simd`); the float32 rows run in an AVX2+FMA or a baseline build
// picked at run time, and cell_fwd / out_fwd have explicit AVX2 rows for their exp / tanh.
// The shared math, scratch and ISA dispatch are in cpu_kernels_common.h; the backward stages
// are in cpu_kernels_backward.cpp.
#include "cpu_kernels_common.h"

namespace lrmt {
namespace cpu {
using namespace detail;
namespace {

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

// ISA variants of the rows above (cpu_kernels_common.h: LRMT_VARIANTS)
#define F float
LRMT_VARIANTS(prep_rows, void, (const PrepArgs<F>& a, int64_t r0, int64_t r1), (a, r0, r1))
LRMT_VARIANTS(cell_fwd_rows, void,
              (const CellFwdArgs<F>& a, const F* v, F* b, int64_t r0, int64_t r1), (a, v, b, r0, r1))
LRMT_VARIANTS(out_fwd_rows, void, (const OutFwdArgs<F>& a, int64_t r0, int64_t r1), (a, r0, r1))
#undef F

// Explicit AVX2+FMA float32 rows (cpu_kernels_common.h: vexp / vsigmoid / vtanh)
#if defined(LRMT_HAVE_AVX2_VARIANT)
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

#undef LD
#undef ST
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

LRMT_INSTANTIATE_FORWARD_KERNELS(float)
LRMT_INSTANTIATE_FORWARD_KERNELS(double)

}  // namespace cpu
}  // namespace lrmt
