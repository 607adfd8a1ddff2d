// lrmt_fast._C: a caching allocator for the CPU tensors the ops return.
//
// A T-BPTT window keeps every step's outputs alive (saved gates, the theta snapshot, new
// weights and LSTM states) and frees them together when the window's graph goes; backward
// returns fresh gradients every step. glibc serves blocks of this size (100 KiB to a few
// MiB) with mmap or gives them back to the OS when the heap top is freed, so each step
// page-faults its outputs in again: on a LeNet meta-train step that cost more than the
// theta snapshot's copy itself (docs/performance.md). This pool keeps freed blocks by size
// and hands them out again, as PyTorch's CUDA caching allocator does on the GPU (CUDA
// tensors keep using that one). Blocks under `kPoolMinBytes` go to the default allocator.
//
// Allocations and frees are reported to the profiler (`torch.profiler`, profile_memory)
// as live bytes, so memory measurements see the op's tensors as before; the cache on top
// is at most `limit` bytes (env LRMT_CPU_POOL_MB, default 1024; 0 turns the pool off).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lrmt {

constexpr size_t kPoolMinBytes = 64 << 10;

// at::empty, from the pool for CPU tensors of at least kPoolMinBytes (else at::empty)
at::Tensor op_empty(at::IntArrayRef sizes, const at::TensorOptions& opts);
inline at::Tensor op_empty_like(const at::Tensor& t) { return op_empty(t.sizes(), t.options()); }

struct PoolStats {
  int64_t os_allocations = 0;  // blocks taken from the system
  int64_t reuses = 0;          // allocations served from the cache
  int64_t live_bytes = 0;      // bytes in tensors alive now
  int64_t cached_bytes = 0;    // freed bytes kept for reuse
  int64_t limit_bytes = 0;     // cap on cached_bytes (0: the pool is off)
};
PoolStats pool_stats();
void pool_clear();                    // give every cached block back to the system
void pool_set_limit(int64_t bytes);   // 0 turns the pool off (and clears it)

}  // namespace lrmt
