// lrmt_fast._C: the workspace arena (workspace.h).
#include "workspace.h"

namespace lrmt {

std::mutex g_stats_mutex;
WorkspaceStats g_stats;

std::map<ArenaKey, Arena>& arenas() {
  thread_local std::map<ArenaKey, Arena> m;
  return m;
}
Arena& get_arena(const c10::Device& dev, at::ScalarType dtype, int64_t n) {
  ArenaKey key{static_cast<int>(dev.type()), static_cast<int>(dev.index()), static_cast<int>(dtype)};
  Arena& a = arenas()[key];
  a.reserve(dev, dtype, n);
  return a;
}

}  // namespace lrmt
