// lrmt_fast._C: the workspace arena: one grow-only buffer per (thread, device, dtype).
//
// The ops take their scratch matrices from it (Arena::take / take_ptr), so a warm step
// allocates no workspace; _C._workspace_stats / _workspace_buffers / _workspace_clear
// (registration.cpp) report and free this thread's buffers.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

namespace lrmt {

using at::Tensor;

struct WorkspaceStats {
  int64_t allocations = 0;
  int64_t bytes = 0;
};
extern std::mutex g_stats_mutex;
extern WorkspaceStats g_stats;  // all threads, guarded by g_stats_mutex

constexpr int64_t kAlign = 16;  // elements
inline int64_t round_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

class Arena {
 public:
  void reserve(const c10::Device& dev, at::ScalarType dtype, int64_t n) {
    if (!buf_.defined() || buf_.numel() < n) {
      buf_ = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().device(dev).dtype(dtype));
      std::lock_guard<std::mutex> lk(g_stats_mutex);
      g_stats.allocations += 1;
      g_stats.bytes += buf_.numel() * static_cast<int64_t>(buf_.element_size());
    }
    off_ = 0;
  }
  Tensor take(at::IntArrayRef shape) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    TORCH_INTERNAL_ASSERT(off_ + n <= buf_.numel(), "lrmt_fast: workspace too small");
    Tensor v = buf_.narrow(0, off_, n).view(shape);
    off_ += round_up(n);
    return v;
  }
  template <typename T>
  T* take_ptr(int64_t n) {
    TORCH_INTERNAL_ASSERT(off_ + n <= buf_.numel(), "lrmt_fast: workspace too small");
    T* p = buf_.data_ptr<T>() + off_;
    off_ += round_up(n);
    return p;
  }
  int64_t mark() const { return off_; }
  void reset(int64_t m) { off_ = m; }
  const Tensor& buffer() const { return buf_; }
  void clear() { buf_ = Tensor(); }

 private:
  Tensor buf_;
  int64_t off_ = 0;
};

using ArenaKey = std::tuple<int, int, int>;
std::map<ArenaKey, Arena>& arenas();  // this thread's
// this thread's arena of (dev, dtype), grown to at least n elements and reset to its start
Arena& get_arena(const c10::Device& dev, at::ScalarType dtype, int64_t n);

}  // namespace lrmt
