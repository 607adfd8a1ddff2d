// CUDA pointwise / reduction stages of the fused meta-update step (see kernels.h).
//
// The GEMMs between these kernels run through ATen (cuBLAS) in forward.cpp / backward.cpp.
// Every kernel is launched on the current stream, with no host synchronisation and
// no allocation, so a whole step can be captured in a CUDA graph once the
// workspace is warm. Reductions are deterministic (fixed grids, fixed order).
#include "kernels.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

namespace lrmt {
namespace cuda {
namespace {

__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double d_tanh(double x) { return tanh(x); }
template <typename T>
__device__ __forceinline__ T d_sigmoid(T x) {
  return T(1) / (T(1) + d_exp(-x));
}

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 8;  // block (32, 8): lanes over hidden units / columns, 8 rows

inline int blocks_for(int64_t n, int threads = kThreads, int64_t cap = 4096) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, cap)));
}
inline int row_blocks(int64_t rows) {
  return static_cast<int>(std::max<int64_t>(1, (rows + kRowsPerBlock - 1) / kRowsPerBlock));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int col_group(int64_t col, int64_t P, int64_t cinp) {
  return col < P ? 0 : (col < 2 * P ? 1 : (col < 2 * P + cinp ? 2 : 3));
}

// ---------------------------------------------------------------------------------
template <typename T>
__global__ void prep_scale_kernel(PrepArgs<T> a) {
  const int64_t n = a.G4 * a.D0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t col = i % a.D0;
    a.ws[i] = a.wih0[i] * a.fs[col_group(col, a.P, a.cinp)];
  }
}

// one warp per row k of w_ih0: bvec[k] = b0[k] + fs2 * w_ih0[k, pre cols] . pre'
template <typename T>
__global__ void prep_bias_kernel(PrepArgs<T> a) {
  const int64_t k = blockIdx.x * (int64_t)kRowsPerBlock + threadIdx.y;
  if (k >= a.G4) return;
  const T* wp = a.wih0 + k * a.D0 + 2 * a.P;
  T s = 0;
  if (a.pre) {
    for (int64_t c = threadIdx.x; c < a.npre; c += 32) s += wp[c] * a.pre[c];
  }
  s = warp_sum(s);
  if (threadIdx.x == 0) {
    T extra = (a.pre && a.pre_one) ? wp[a.npre] : T(0);
    a.bvec[k] = a.b0[k] + a.fs[2] * (s + extra);
  }
}

template <typename T>
__global__ void cell_fwd_kernel(CellFwdArgs<T> a) {
  const int64_t j = blockIdx.x * (int64_t)kRowsPerBlock + threadIdx.y;
  if (j >= a.rows) return;
  const int64_t H = a.H, G4 = 4 * H;
  T um[kMaxRank1];
#pragma unroll
  for (int m = 0; m < kMaxRank1; ++m) um[m] = m < a.r1.n ? a.r1.u[m][j * a.r1.us[m]] : T(0);
  const T* Aj = a.A + j * G4;
  for (int64_t k = threadIdx.x; k < H; k += 32) {
    T g4[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t kk = q * H + k;
      T v = Aj[kk] + a.bias[kk];
#pragma unroll
      for (int m = 0; m < kMaxRank1; ++m)
        if (m < a.r1.n) v += um[m] * a.r1.v[m][kk * a.r1.vs[m]];
      g4[q] = v;
    }
    const T i = d_sigmoid(g4[0]), f = d_sigmoid(g4[1]), g = d_tanh(g4[2]), o = d_sigmoid(g4[3]);
    const T c = f * a.c_in[j * H + k] + i * g;
    const T h = o * d_tanh(c);
    a.c_out[j * H + k] = c;
    a.h_out[j * H + k] = h;
    if (a.gates) {
      T* gj = a.gates + j * G4;
      gj[k] = i;
      gj[H + k] = f;
      gj[2 * H + k] = g;
      gj[3 * H + k] = o;
    }
    if (a.x_out) a.x_out[j * H + k] = h > T(0) ? h : T(0);
  }
}

template <typename T>
__global__ void out_fwd_kernel(OutFwdArgs<T> a) {
  const int64_t n = a.rows * a.P;
  const T s = *a.scale;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i / a.P, p = i - j * a.P;
    const T t = d_tanh(a.Z[i] + a.b_out[p]);
    const T d = s * t;
    if (p < a.Pw) {
      const int64_t q = j * a.Pw + p;
      a.W_out[q] = a.W[q] - a.lr * d * a.G[q];
    } else {
      a.Wb_out[j] = a.Wb[j] - a.lr * d * a.Gb[j];
    }
    if (a.delta) a.delta[i] = d;
    if (a.t_save) a.t_save[i] = t;
  }
}

// grid (4): block m reduces group m in double
template <typename T>
__global__ void fscale_kernel(FscaleArgs<T> a) {
  __shared__ double sh[kThreads];
  const int m = blockIdx.x;
  double s = 0;
  for (int q = 0; q < 2; ++q) {
    const T* x = q == 0 ? a.a[m] : a.b[m];
    const int64_t n = q == 0 ? a.na[m] : a.nb[m];
    if (!x) continue;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const double v = static_cast<double>(x[i]);
      s += v * v;
    }
  }
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double total = sh[0] + static_cast<double>(a.ones[m]);
    const int64_t count = a.na[m] + a.nb[m] + a.ones[m];
    const float mean = static_cast<float>(total / static_cast<double>(count > 0 ? count : 1));
    const float rms = sqrtf(mean);
    a.out[m] = static_cast<T>(1.0f / (rms + 1e-8f));
  }
}

template <typename T>
__global__ void out_bwd_kernel(OutBwdArgs<T> a) {
  __shared__ double sh[kThreads];
  const int64_t n = a.rows * a.P;
  const T s = *a.scale;
  double acc = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i / a.P, p = i - j * a.P;
    const T t = a.t[i];
    T e = a.gdelta ? a.gdelta[i] : T(0);
    if (p < a.Pw) {
      const int64_t q = j * a.Pw + p;
      if (a.gWn) e -= a.lr * a.G[q] * a.gWn[q];
    } else {
      if (a.gWbn) e -= a.lr * a.Gb[j] * a.gWbn[j];
    }
    a.dZ[i] = e * s * (T(1) - t * t);
    acc += static_cast<double>(e * t);
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) a.partial[blockIdx.x] = static_cast<T>(sh[0]);
}

template <typename T>
__global__ void sum_partials_kernel(const T* partial, int n, T* out) {
  __shared__ double sh[kThreads];
  double acc = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += static_cast<double>(partial[i]);
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<T>(sh[0]);
}

template <typename T>
__global__ void cell_bwd_kernel(CellBwdArgs<T> a) {
  const int64_t j = blockIdx.x * (int64_t)kRowsPerBlock + threadIdx.y;
  if (j >= a.rows) return;
  const int64_t H = a.H, G4 = 4 * H;
  const T* g = a.gates + j * G4;
  T* dA = a.dA + j * G4;
  for (int64_t k = threadIdx.x; k < H; k += 32) {
    const int64_t q = j * H + k;
    T dh = a.gh ? a.gh[q] : T(0);
    if (a.dX && a.h_new[q] > T(0)) dh += a.dX[q];
    const T tc = d_tanh(a.c_new[q]);
    const T i = g[k], f = g[H + k], gv = g[2 * H + k], o = g[3 * H + k];
    const T dc = (a.gc ? a.gc[q] : T(0)) + dh * o * (T(1) - tc * tc);
    dA[k] = dc * gv * i * (T(1) - i);
    dA[H + k] = dc * a.c_prev[q] * f * (T(1) - f);
    dA[2 * H + k] = dc * i * (T(1) - gv * gv);
    dA[3 * H + k] = dh * tc * o * (T(1) - o);
    if (a.gc_prev) a.gc_prev[q] = dc * f;
  }
}

// block (32, 8) over 32 columns; the 8 row-lanes stride over all rows, then reduce
template <typename T>
__global__ void col_reduce_kernel(ColReduceArgs<T> a) {
  __shared__ double sh[kRowsPerBlock][32];
  const int64_t k = blockIdx.x * 32 + threadIdx.x;
  double acc[kMaxRank1];
#pragma unroll
  for (int m = 0; m < kMaxRank1; ++m) acc[m] = 0;
  if (k < a.K) {
    for (int64_t j = threadIdx.y; j < a.rows; j += kRowsPerBlock) {
      const double v = static_cast<double>(a.A[j * a.K + k]);
#pragma unroll
      for (int m = 0; m < kMaxRank1; ++m)
        if (m < a.n) acc[m] += v * (a.u[m] ? static_cast<double>(a.u[m][j * a.us[m]]) : 1.0);
    }
  }
  for (int m = 0; m < a.n; ++m) {
    sh[threadIdx.y][threadIdx.x] = acc[m];
    __syncthreads();
    if (threadIdx.y == 0 && k < a.K) {
      double s = 0;
#pragma unroll
      for (int r = 0; r < kRowsPerBlock; ++r) s += sh[r][threadIdx.x];
      a.out[m * a.K + k] = static_cast<T>(s);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void row_dot_kernel(RowDotArgs<T> a) {
  const int64_t j = blockIdx.x * (int64_t)kRowsPerBlock + threadIdx.y;
  if (j >= a.rows) return;
  double s = 0;
  for (int64_t k = threadIdx.x; k < a.K; k += 32)
    s += static_cast<double>(a.A[j * a.K + k]) * static_cast<double>(a.v[k * a.vs]);
  s = warp_sum(s);
  if (threadIdx.x == 0)
    a.out[j * a.os] = static_cast<T>((a.base ? static_cast<double>(a.base[j * a.bs]) : 0.0) + s);
}

template <typename T>
__global__ void finalize_kernel(FinalizeArgs<T> a) {
  const int64_t n = a.G4 * a.D0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t k = i / a.D0, col = i - k * a.D0;
    const int grp = col_group(col, a.P, a.cinp);
    const T f = a.fs[grp];
    T* out = a.dwih0 + i;
    if (grp < 2) {
      const int64_t p = col - grp * a.P;
      if (p < a.Pw) {
        if (a.w_gemm) *out *= f;
        else *out = f * a.red[(grp == 0 ? a.m_w : a.m_g) * a.G4 + k];
      } else {
        *out = f * a.red[(grp == 0 ? a.m_wb : a.m_gb) * a.G4 + k];
      }
    } else if (grp == 2) {
      const int64_t c = col - 2 * a.P;
      if (a.pre_shared) *out = f * a.colsum[k] * (c < a.npre ? a.pre[c] : T(1));
      else if (a.pre_gemm) *out *= f;
      else *out = f * a.red[a.m_pre * a.G4 + k];
    } else {
      *out = f * a.red[a.m_post * a.G4 + k];
    }
  }
}

template <typename T>
__global__ void relu_kernel(const T* x, T* y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    y[i] = x[i] > T(0) ? x[i] : T(0);
}

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }
const dim3 kRowBlock(32, kRowsPerBlock);

}  // namespace

template <typename T>
void prep(const PrepArgs<T>& a) {
  prep_scale_kernel<T><<<blocks_for(a.G4 * a.D0), kThreads, 0, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.bvec) {
    prep_bias_kernel<T><<<row_blocks(a.G4), kRowBlock, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void cell_fwd(const CellFwdArgs<T>& a) {
  cell_fwd_kernel<T><<<row_blocks(a.rows), kRowBlock, 0, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void out_fwd(const OutFwdArgs<T>& a) {
  out_fwd_kernel<T><<<blocks_for(a.rows * a.P), kThreads, 0, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void fscale(const FscaleArgs<T>& a) {
  fscale_kernel<T><<<4, kThreads, 0, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void out_bwd(const OutBwdArgs<T>& a) {
  const int nb = blocks_for(a.rows * a.P, kThreads, kPartials);
  out_bwd_kernel<T><<<nb, kThreads, 0, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_partials_kernel<T><<<1, kThreads, 0, stream()>>>(a.partial, nb, a.g_scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void cell_bwd(const CellBwdArgs<T>& a) {
  cell_bwd_kernel<T><<<row_blocks(a.rows), kRowBlock, 0, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void col_reduce(const ColReduceArgs<T>& a) {
  if (a.n == 0) return;
  const int nb = static_cast<int>((a.K + 31) / 32);
  col_reduce_kernel<T><<<nb, kRowBlock, 0, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void row_dot(const RowDotArgs<T>& a) {
  row_dot_kernel<T><<<row_blocks(a.rows), kRowBlock, 0, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void finalize(const FinalizeArgs<T>& a) {
  finalize_kernel<T><<<blocks_for(a.G4 * a.D0), kThreads, 0, stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void relu(const T* x, T* y, int64_t n) {
  relu_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(x, y, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

LRMT_INSTANTIATE_KERNELS(float)
LRMT_INSTANTIATE_KERNELS(double)

}  // namespace cuda
}  // namespace lrmt
