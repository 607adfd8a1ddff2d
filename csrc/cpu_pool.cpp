// lrmt_fast._C: the caching allocator of cpu_pool.h.
#include "cpu_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace lrmt {
namespace {

constexpr size_t kPage = 4096;

int64_t limit_from_env() {
  const char* s = std::getenv("LRMT_CPU_POOL_MB");
  if (s == nullptr || *s == '\0') return int64_t(1024) << 20;
  char* end = nullptr;
  long long mb = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && mb >= 0, "lrmt_fast: LRMT_CPU_POOL_MB must be a whole number of MiB >= 0, got '",
              s, "'");
  return static_cast<int64_t>(mb) << 20;
}

class CpuPool final : public c10::Allocator {
 public:
  CpuPool() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::kCPU);
    if (nbytes == 0) return {nullptr, nullptr, nullptr, cpu};
    const size_t n = (nbytes + kPage - 1) / kPage * kPage;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = free_.find(n);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        stats_.cached_bytes -= static_cast<int64_t>(n);
        stats_.reuses += 1;
      }
    }
    const bool fresh = p == nullptr;
    if (fresh) p = c10::alloc_cpu(n);  // outside the lock
    const bool profiled = c10::memoryProfilingEnabled();
    size_t live;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (fresh) stats_.os_allocations += 1;
      size_[p] = Block{n, profiled};
      stats_.live_bytes += static_cast<int64_t>(n);
      live = static_cast<size_t>(stats_.live_bytes);
    }
    if (profiled) report(p, static_cast<int64_t>(n), live);
    return {p, p, &CpuPool::release, cpu};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static void release(void* p);

  void put(void* p) {
    size_t n, live;
    bool keep, profiled;
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = size_.find(p);
      TORCH_INTERNAL_ASSERT(it != size_.end(), "lrmt_fast: a block freed to the CPU pool that it did not allocate");
      n = it->second.bytes;
      profiled = it->second.profiled;
      size_.erase(it);
      stats_.live_bytes -= static_cast<int64_t>(n);
      live = static_cast<size_t>(stats_.live_bytes);
      keep = stats_.cached_bytes + static_cast<int64_t>(n) <= limit_;
      if (keep) {
        free_[n].push_back(p);
        stats_.cached_bytes += static_cast<int64_t>(n);
      }
    }
    // as c10's allocator: a block allocated before profiling started is not reported freed
    if (profiled && c10::memoryProfilingEnabled()) report(p, -static_cast<int64_t>(n), live);
    if (!keep) c10::free_cpu(p);
  }

  bool enabled() {
    std::lock_guard<std::mutex> lk(mu_);
    return limit_ > 0;
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> lk(mu_);
    PoolStats s = stats_;
    s.limit_bytes = limit_;
    return s;
  }

  void clear() {
    std::unordered_map<size_t, std::vector<void*>> blocks;
    {
      std::lock_guard<std::mutex> lk(mu_);
      blocks.swap(free_);
      stats_.cached_bytes = 0;
    }
    for (auto& kv : blocks)
      for (void* p : kv.second) c10::free_cpu(p);
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "lrmt_fast: the CPU pool limit must be >= 0 bytes, got ", bytes);
    {
      std::lock_guard<std::mutex> lk(mu_);
      limit_ = bytes;
    }
    clear();
  }

 private:
  // the profiler's memory events (torch.profiler(profile_memory=True)) count live bytes
  static void report(void* p, int64_t delta, size_t live) {
    c10::reportMemoryUsageToProfiler(p, delta, live, live, c10::Device(c10::kCPU));
  }
  struct Block {
    size_t bytes;
    bool profiled;  // its allocation was reported to the profiler
  };

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, Block> size_;
  PoolStats stats_;
  int64_t limit_;
};

// never destroyed: tensors from the pool may outlive every static object at exit
CpuPool& pool() {
  static CpuPool* p = new CpuPool();
  return *p;
}

void CpuPool::release(void* p) { pool().put(p); }

}  // namespace

at::Tensor op_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!opts.device().is_cpu() || opts.layout() != at::kStrided) return at::empty(sizes, opts);
  size_t numel = 1;
  for (auto s : sizes) numel *= static_cast<size_t>(s);
  const auto dtype = c10::typeMetaToScalarType(opts.dtype());
  if (numel * c10::elementSize(dtype) < kPoolMinBytes || !pool().enabled()) return at::empty(sizes, opts);
  return at::Tensor(at::detail::empty_generic(sizes, &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                              std::nullopt));
}

PoolStats pool_stats() { return pool().stats(); }
void pool_clear() { pool().clear(); }
void pool_set_limit(int64_t bytes) { pool().set_limit(bytes); }

}  // namespace lrmt
