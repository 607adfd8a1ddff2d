// ReLU + 2x2 max-pool (stride 2, even H and W) on the CPU: the student's
// F.max_pool2d(F.relu(x), 2) in meta-training's inner step (lrmt_fast/models/lenet.py,
// relu_max_pool2; docs/performance.md "The inner step").
//
// ATen's CPU max_pool2d_with_indices for NCHW handles one window at a time through a generic
// loop and writes int64 indices: 6.9 ms for LeNet's [128, 20, 24, 24] at one thread, ~10x one
// pass over the data. Here one pass reads the four elements of each window and writes the
// pooled value and a one-byte winner code; the backward writes every element of the input
// gradient once (the gradient at the winner, zero elsewhere).
//
// The function and its gradient are max_pool2d(relu(x))'s (the proof is in lenet.py):
//   - pooled value: relu(max of the window), NaN if the window has one;
//   - winner: max_pool2d's scan takes an element when `val > maxval || isnan(val)` in row
//     order, i.e. the first maximum, or the last NaN; two stages (within each row, then
//     row 1 against row 0) with the same rule pick the same element;
//   - gradient: g at the winner when relu's output there is not <= 0 (threshold_backward),
//     zero elsewhere.
//
// Operators (CPU only; the Python wrapper uses the plain ops elsewhere):
//   relu_max_pool2(Tensor x) -> (Tensor out, Tensor code)           code: uint8, 0..3 = 2r + s
//   relu_max_pool2_backward(Tensor grad, Tensor out, Tensor code) -> Tensor grad_x
// x may be NCHW-contiguous or channels-last-contiguous; out, code and grad_x keep its layout.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace lrmt {
namespace {

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define LRMT_POOL_AVX2 __attribute__((target("avx2,fma")))
#define LRMT_POOL_HAVE_AVX2 1
#else
#define LRMT_POOL_AVX2
#endif

bool pool_avx2() {
#if defined(LRMT_POOL_HAVE_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
const bool kPoolAvx2 = pool_avx2();

// n windows; window k's four elements at p00[k*s], p01[k*s], p10[k*s], p11[k*s]; outputs
// contiguous. Branch-free so that the loop vectorises.
template <typename T>
inline void fwd_run(const T* __restrict p00, const T* __restrict p01, const T* __restrict p10,
                    const T* __restrict p11, int64_t s, T* __restrict out, uint8_t* __restrict code, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const T a00 = p00[k * s], a01 = p01[k * s], a10 = p10[k * s], a11 = p11[k * s];
    const bool c0 = (a01 > a00) | (a01 != a01);
    const T m0 = c0 ? a01 : a00;
    const bool c1 = (a11 > a10) | (a11 != a11);
    const T m1 = c1 ? a11 : a10;
    const bool cr = (m1 > m0) | (m1 != m1);
    const T m = cr ? m1 : m0;
    out[k] = (m <= T(0)) ? T(0) : m;  // relu: NaN stays NaN
    code[k] = static_cast<uint8_t>(cr ? (2 + static_cast<int>(c1)) : static_cast<int>(c0));
  }
}

template <typename T>
inline void bwd_run(const T* __restrict g, const T* __restrict out, const uint8_t* __restrict code,
                    T* __restrict p00, T* __restrict p01, T* __restrict p10, T* __restrict p11, int64_t s,
                    int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const T v = (out[k] <= T(0)) ? T(0) : g[k];  // threshold_backward(g, relu output, 0)
    const int w = code[k];
    p00[k * s] = (w == 0) ? v : T(0);
    p01[k * s] = (w == 1) ? v : T(0);
    p10[k * s] = (w == 2) ? v : T(0);
    p11[k * s] = (w == 3) ? v : T(0);
  }
}

#if defined(LRMT_POOL_HAVE_AVX2)
// 8 windows at a time. Row pairs of NCHW (input stride 2) are de-interleaved from two 8-float
// loads; channels-last (stride 1) loads the four elements directly. The same comparisons as
// fwd_run: GT_OQ and LE_OQ are false on NaN, UNORD(x, x) is isnan(x).
struct Spread {  // byte i of lut[m] = bit i of m
  uint64_t lut[256];
  Spread() {
    for (int m = 0; m < 256; ++m) {
      uint64_t v = 0;
      for (int i = 0; i < 8; ++i) v |= uint64_t((m >> i) & 1) << (8 * i);
      lut[m] = v;
    }
  }
};
const Spread kSpread;

LRMT_POOL_AVX2 inline void load_pair(const float* p, __m256& even, __m256& odd) {
  const __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
  const __m256 e = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 o = _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
}

LRMT_POOL_AVX2 inline void store_pair(float* p, __m256 even, __m256 odd) {
  const __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);
  _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}

LRMT_POOL_AVX2 void fwd_run_avx2(const float* p00, const float* p01, const float* p10, const float* p11, int64_t s,
                                 float* out, uint8_t* code, int64_t n) {
  const __m256 zero = _mm256_setzero_ps();
  if (n < 8) return fwd_run<float>(p00, p01, p10, p11, s, out, code, n);
  // blocks of 8; a last partial block is redone as the final 8 (same values written twice)
  for (int64_t k = 0;; k = std::min(k + 8, n - 8)) {
    __m256 a00, a01, a10, a11;
    if (s == 2) {
      load_pair(p00 + 2 * k, a00, a01);
      load_pair(p10 + 2 * k, a10, a11);
    } else {
      a00 = _mm256_loadu_ps(p00 + k * s);
      a01 = _mm256_loadu_ps(p01 + k * s);
      a10 = _mm256_loadu_ps(p10 + k * s);
      a11 = _mm256_loadu_ps(p11 + k * s);
    }
    const __m256 c0 = _mm256_or_ps(_mm256_cmp_ps(a01, a00, _CMP_GT_OQ), _mm256_cmp_ps(a01, a01, _CMP_UNORD_Q));
    const __m256 m0 = _mm256_blendv_ps(a00, a01, c0);
    const __m256 c1 = _mm256_or_ps(_mm256_cmp_ps(a11, a10, _CMP_GT_OQ), _mm256_cmp_ps(a11, a11, _CMP_UNORD_Q));
    const __m256 m1 = _mm256_blendv_ps(a10, a11, c1);
    const __m256 cr = _mm256_or_ps(_mm256_cmp_ps(m1, m0, _CMP_GT_OQ), _mm256_cmp_ps(m1, m1, _CMP_UNORD_Q));
    const __m256 m = _mm256_blendv_ps(m0, m1, cr);
    _mm256_storeu_ps(out + k, _mm256_andnot_ps(_mm256_cmp_ps(m, zero, _CMP_LE_OQ), m));
    const int mr = _mm256_movemask_ps(cr), mc = _mm256_movemask_ps(_mm256_blendv_ps(c0, c1, cr));
    const uint64_t bytes = kSpread.lut[mc] | (kSpread.lut[mr] << 1);
    std::memcpy(code + k, &bytes, 8);
    if (k + 8 == n) break;
  }
}

LRMT_POOL_AVX2 void bwd_run_avx2(const float* g, const float* out, const uint8_t* code, float* p00, float* p01,
                                 float* p10, float* p11, int64_t s, int64_t n) {
  const __m256 zero = _mm256_setzero_ps();
  if (n < 8) return bwd_run<float>(g, out, code, p00, p01, p10, p11, s, n);
  for (int64_t k = 0;; k = std::min(k + 8, n - 8)) {
    const __m256 v = _mm256_andnot_ps(_mm256_cmp_ps(_mm256_loadu_ps(out + k), zero, _CMP_LE_OQ),
                                      _mm256_loadu_ps(g + k));
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(code + k)));
    const __m256 v00 = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(w, _mm256_set1_epi32(0))), v);
    const __m256 v01 = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(w, _mm256_set1_epi32(1))), v);
    const __m256 v10 = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(w, _mm256_set1_epi32(2))), v);
    const __m256 v11 = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(w, _mm256_set1_epi32(3))), v);
    if (s == 2) {
      store_pair(p00 + 2 * k, v00, v01);
      store_pair(p10 + 2 * k, v10, v11);
    } else {
      _mm256_storeu_ps(p00 + k * s, v00);
      _mm256_storeu_ps(p01 + k * s, v01);
      _mm256_storeu_ps(p10 + k * s, v10);
      _mm256_storeu_ps(p11 + k * s, v11);
    }
    if (k + 8 == n) break;
  }
}
#endif

template <typename T>
void fwd_dispatch(const T* p00, const T* p01, const T* p10, const T* p11, int64_t s, T* out, uint8_t* code,
                  int64_t n) {
#if defined(LRMT_POOL_HAVE_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (kPoolAvx2 && (s == 1 || (s == 2 && p01 == p00 + 1 && p11 == p10 + 1)))
      return fwd_run_avx2(p00, p01, p10, p11, s, out, code, n);
  }
#endif
  fwd_run<T>(p00, p01, p10, p11, s, out, code, n);
}

template <typename T>
void bwd_dispatch(const T* g, const T* out, const uint8_t* code, T* p00, T* p01, T* p10, T* p11, int64_t s,
                  int64_t n) {
#if defined(LRMT_POOL_HAVE_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (kPoolAvx2 && (s == 1 || (s == 2 && p01 == p00 + 1 && p11 == p10 + 1)))
      return bwd_run_avx2(g, out, code, p00, p01, p10, p11, s, n);
  }
#endif
  bwd_run<T>(g, out, code, p00, p01, p10, p11, s, n);
}

bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "relu_max_pool2: ", what, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4, "relu_max_pool2: ", what, " must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), "relu_max_pool2: ", what,
              " must be contiguous (NCHW or channels-last)");
}

// Walk the windows of a [N, C, H, W] input (H, W = 2 * pooled sizes) in runs along the
// innermost dense dimension: NCHW runs along W (input stride 2 per window), channels-last
// along C (stride 1). `f(in_offset_of_a00, out_offset, run_length, in_step)` per run.
template <typename F>
void for_runs(int64_t N, int64_t C, int64_t H2, int64_t W2, bool cl, F&& f) {
  const int64_t H = 2 * H2, W = 2 * W2;
  if (!cl) {
    const int64_t rows = N * C * H2;  // one run per (plane, pooled row)
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(W2, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t plane = r / H2, i = r % H2;
        f(plane * H * W + 2 * i * W, r * W2, W2, int64_t(2), W, int64_t(1));
      }
    });
  } else {
    const int64_t runs = N * H2 * W2;  // one run per pooled position, along C
    at::parallel_for(0, runs, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / (H2 * W2), ij = r % (H2 * W2), i = ij / W2, j = ij % W2;
        f(((n * H + 2 * i) * W + 2 * j) * C, r * C, C, int64_t(1), W * C, C);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> relu_max_pool2(const at::Tensor& x) {
  check_input(x, "x");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0, "relu_max_pool2: H and W must be even, got ", x.sizes());
  const bool cl = is_channels_last(x);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const int64_t H2 = H / 2, W2 = W / 2;
  at::Tensor out = at::empty({N, C, H2, W2}, x.options().memory_format(fmt));
  at::Tensor code = at::empty({N, C, H2, W2}, x.options().dtype(at::kByte).memory_format(fmt));
  if (x.numel() == 0) return {out, code};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_max_pool2", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    uint8_t* pc = code.mutable_data_ptr<uint8_t>();
    // row_step: offset from row 0 to row 1 of a window; col_step: from column 0 to column 1
    for_runs(N, C, H2, W2, cl, [&](int64_t in, int64_t o, int64_t n, int64_t s, int64_t row_step, int64_t col_step) {
      const scalar_t* a00 = px + in;
      fwd_dispatch<scalar_t>(a00, a00 + col_step, a00 + row_step, a00 + row_step + col_step, s, po + o, pc + o, n);
    });
  });
  return {out, code};
}

at::Tensor relu_max_pool2_backward(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& code) {
  check_input(out, "out");
  TORCH_CHECK(code.scalar_type() == at::kByte && code.sizes() == out.sizes() && code.strides() == out.strides(),
              "relu_max_pool2_backward: code must be the uint8 tensor of the forward");
  const bool cl = is_channels_last(out);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(grad.sizes() == out.sizes(), "relu_max_pool2_backward: grad must have the output's shape");
  const at::Tensor g = grad.contiguous(fmt).to(out.scalar_type());
  const int64_t N = out.size(0), C = out.size(1), H2 = out.size(2), W2 = out.size(3);
  at::Tensor gx = at::empty({N, C, 2 * H2, 2 * W2}, out.options().memory_format(fmt));
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "relu_max_pool2_backward", [&] {
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const scalar_t* po = out.const_data_ptr<scalar_t>();
    const uint8_t* pc = code.const_data_ptr<uint8_t>();
    scalar_t* px = gx.mutable_data_ptr<scalar_t>();
    for_runs(N, C, H2, W2, cl, [&](int64_t in, int64_t o, int64_t n, int64_t s, int64_t row_step, int64_t col_step) {
      scalar_t* a00 = px + in;
      bwd_dispatch<scalar_t>(pg + o, po + o, pc + o, a00, a00 + col_step, a00 + row_step, a00 + row_step + col_step,
                             s, n);
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lrmt_fast, m) {
  m.def("relu_max_pool2(Tensor x) -> (Tensor, Tensor)");
  m.def("relu_max_pool2_backward(Tensor grad, Tensor out, Tensor code) -> Tensor");
}

TORCH_LIBRARY_IMPL(lrmt_fast, CPU, m) {
  m.impl("relu_max_pool2", &relu_max_pool2);
  m.impl("relu_max_pool2_backward", &relu_max_pool2_backward);
}

}  // namespace lrmt
