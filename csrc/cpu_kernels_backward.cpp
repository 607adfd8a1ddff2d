// lrmt_fast._C: the CPU kernels of the fused step's backward stages (kernels.h).
//
// out_bwd (the output stage's backward and the scale's gradient, summed in fixed chunks),
// cell_bwd (the LSTM cells' pointwise backward), col_reduce / row_dot (the width-one feature
// columns' gradients, accumulated in double), finalize (assembly of the first cell's input
// weight gradient) and relu (the backward's recompute of a layer's input). Every kernel is
// one pass over its data, parallel over rows (neurons) with at::parallel_for and vectorisable
// inner loops (`#pragma omp simd`); the float32 rows run in an AVX2+FMA or a baseline build
// picked at run time, and cell_bwd has explicit AVX2 rows for its tanh. The reductions sum
// their chunks in a fixed order, so results do not depend on scheduling. The shared math,
// scratch and ISA dispatch are in cpu_kernels_common.h; the forward stages are in
// cpu_kernels_forward.cpp.
#include "cpu_kernels_common.h"

namespace lrmt {
namespace cpu {
using namespace detail;
namespace {

// ----------------------------------------------------------------------------------
// row-range implementations (inlined into the ISA-specific wrappers below)
// ----------------------------------------------------------------------------------
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

// ISA variants of the rows above (cpu_kernels_common.h: LRMT_VARIANTS)
#define F float
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

// Explicit AVX2+FMA float32 rows (cpu_kernels_common.h: vexp / vsigmoid / vtanh)
#if defined(LRMT_HAVE_AVX2_VARIANT)
#define LD _mm256_loadu_ps
#define ST _mm256_storeu_ps

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
#endif  // LRMT_HAVE_AVX2_VARIANT

}  // namespace

// ----------------------------------------------------------------------------------
// kernels
// ----------------------------------------------------------------------------------
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

LRMT_INSTANTIATE_BACKWARD_KERNELS(float)
LRMT_INSTANTIATE_BACKWARD_KERNELS(double)

}  // namespace cpu
}  // namespace lrmt
