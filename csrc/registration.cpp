// lrmt_fast._C: the fused meta-update step (docs/method.md section 2): operator schemas and
// their CPU / CUDA kernels, and the Python module (build facts, workspace statistics).
//
// One call runs, for every neuron row of one or more student layers:
// feature scaling, the 3 stacked LSTM cells, the output layer, the gate and the
// weight update. GEMMs go through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA) into
// reused workspaces; everything between two GEMMs is one fused kernel
// (kernels.h; cpu_kernels_forward.cpp, cpu_kernels_backward.cpp and cuda_kernels.cu).
// The first cell's input GEMM is split by feature group (w@Ww^T + g@Wg^T + pre@Wpre^T +
// post*Wpost) so the features [w | g | pre | post] are never materialised; a shared `pre`
// becomes a bias vector computed once per layer.
//
// Operators (torch.ops.lrmt_fast.*):
//   meta_step(w, g, pre, post, h, c, theta, lr, fscale, save, snapshot)
//       -> (w_new, delta, h_new, c_new, saved, theta_snap)           [differentiable]
//   meta_step_(w!, g, pre, post, h!, c!, theta, lr, fscale, delta_out!?)   [no grad, in place]
//   meta_step_net(...)  / meta_step_net_(...)      the same for a list of layers
//   meta_step_net_backward(...)                    backward of both
//   feature_scale_net(...)                          the per-layer feature scale [nl, 4]
// `saved` (activated gates and tanh outputs) and `theta_snap` (a copy of theta, for
// T-BPTT while an optimiser updates theta in place) are opaque buffers the backward reads.
//
// Where the code lives: checks.h (argument checks), workspace.h (scratch arena), layer.h
// (one resolved layer), dispatch.h (device dispatch of kernels.h), forward.cpp and
// backward.cpp (one layer; backward.cpp also the backward operator), network.cpp (drivers
// and forward operators), autograd.cpp (the Autograd-key kernels of both forward ops),
// cpu_kernels_forward.cpp / cpu_kernels_backward.cpp (the fused CPU kernels, sharing
// cpu_kernels_common.h) / cuda_kernels.cu (the fused CUDA kernels), gemm.cpp, cpu_pool.cpp.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/headeronly/version.h>

#include <mutex>
#include <string>
#include <vector>

#include "cpu_pool.h"
#include "gemm.h"
#include "kernels.h"
#include "network.h"
#include "workspace.h"

namespace lrmt {

// ------------------------------------------------------------------------------------
// registration
// ------------------------------------------------------------------------------------
TORCH_LIBRARY(lrmt_fast, m) {
  m.def(
      "meta_step(Tensor w, Tensor g, Tensor pre, Tensor post, Tensor h, Tensor c, Tensor[] theta, float lr, "
      "Tensor fscale, bool save=True, bool snapshot=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "meta_step_(Tensor(a!) w, Tensor g, Tensor pre, Tensor post, Tensor(b!) h, Tensor(c!) c, Tensor[] theta, "
      "float lr, Tensor fscale, Tensor(d!)? delta_out=None) -> ()");
  m.def(
      "meta_step_net(Tensor[] w, Tensor[] wb, Tensor[] g, Tensor[] gb, Tensor[] pre, Tensor[] post, Tensor[] h, "
      "Tensor[] c, Tensor[] theta, int[] flags, float lr, Tensor? fscale=None, bool save=True, bool snapshot=False) "
      "-> (Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor, Tensor, Tensor)");
  m.def(
      "meta_step_net_(Tensor(a!)[] w, Tensor(b!)[] wb, Tensor[] g, Tensor[] gb, Tensor[] pre, Tensor[] post, "
      "Tensor(c!)[] h, Tensor(d!)[] c, Tensor[] theta, int[] flags, float lr, Tensor? fscale, Tensor(e!)[] delta_out) "
      "-> ()");
  m.def(
      "meta_step_net_backward(Tensor?[] grad_w_new, Tensor?[] grad_wb_new, Tensor?[] grad_delta, "
      "Tensor?[] grad_h_new, Tensor?[] grad_c_new, Tensor[] w, Tensor[] wb, Tensor[] g, Tensor[] gb, Tensor[] pre, "
      "Tensor[] post, Tensor[] h, Tensor[] c, Tensor[] theta, int[] flags, float lr, Tensor fscale, "
      "Tensor[] h_new, Tensor[] c_new, Tensor saved, Tensor theta_snap, bool need_w, bool need_hc, bool need_theta) "
      "-> (Tensor[], Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "feature_scale_net(Tensor[] w, Tensor[] wb, Tensor[] g, Tensor[] gb, Tensor[] pre, Tensor[] post, "
      "Tensor[] h, Tensor[] c, Tensor[] theta, int[] flags) -> Tensor");
}

#define LRMT_IMPLS(m)                                          \
  m.impl("meta_step", &meta_step);                             \
  m.impl("meta_step_", &meta_step_);                           \
  m.impl("meta_step_net", &meta_step_net);                     \
  m.impl("meta_step_net_", &meta_step_net_);                   \
  m.impl("meta_step_net_backward", &meta_step_net_backward);   \
  m.impl("feature_scale_net", &feature_scale_net);

TORCH_LIBRARY_IMPL(lrmt_fast, CPU, m) { LRMT_IMPLS(m) }
#ifdef LRMT_WITH_CUDA
TORCH_LIBRARY_IMPL(lrmt_fast, CUDA, m) { LRMT_IMPLS(m) }
#endif

}  // namespace lrmt

// ------------------------------------------------------------------------------------
// Python module: build facts and workspace statistics
// ------------------------------------------------------------------------------------
#ifndef LRMT_CUDA_ARCH_LIST
#define LRMT_CUDA_ARCH_LIST ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrmt_fast fused meta-update kernels (ops under torch.ops.lrmt_fast)";
  m.def("_build_info", []() {
    pybind11::dict d;
#ifdef LRMT_WITH_CUDA
    d["cuda_compiled"] = true;
#else
    d["cuda_compiled"] = false;
#endif
    d["cpu_compiled"] = true;
    d["cuda_arch_list"] = std::string(LRMT_CUDA_ARCH_LIST);
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["cpu_avx2_kernels"] = lrmt::cpu::uses_avx2();
    d["cpu_blas_direct"] = lrmt::cpu_blas_direct();
    d["torch_version_built"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
    return d;
  });
  m.def("_workspace_stats", []() {
    std::lock_guard<std::mutex> lk(lrmt::g_stats_mutex);
    pybind11::dict d;
    d["allocations"] = lrmt::g_stats.allocations;
    d["bytes"] = lrmt::g_stats.bytes;
    int64_t live = 0;
    int64_t n = 0;
    for (auto& kv : lrmt::arenas()) {
      if (kv.second.buffer().defined()) {
        live += kv.second.buffer().numel() * static_cast<int64_t>(kv.second.buffer().element_size());
        ++n;
      }
    }
    d["this_thread_buffers"] = n;
    d["this_thread_bytes"] = live;
    return d;
  });
  m.def("_workspace_buffers", []() {
    std::vector<at::Tensor> v;
    for (auto& kv : lrmt::arenas())
      if (kv.second.buffer().defined()) v.push_back(kv.second.buffer());
    return v;
  }, "this thread's workspace buffers (held by a captured CUDA graph)");
  m.def("_workspace_clear", []() { lrmt::arenas().clear(); }, "free this thread's workspaces");
  m.def("_pool_stats", []() {
    lrmt::PoolStats s = lrmt::pool_stats();
    pybind11::dict d;
    d["os_allocations"] = s.os_allocations;
    d["reuses"] = s.reuses;
    d["live_bytes"] = s.live_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["limit_bytes"] = s.limit_bytes;
    return d;
  });
  m.def("_set_cpu_blas_direct", &lrmt::set_cpu_blas_direct,
        "CPU GEMMs straight to the BLAS (True) or through at::addmm_out (False); returns the setting");
  m.def("_pool_clear", &lrmt::pool_clear, "give the CPU pool's cached blocks back to the system");
  m.def("_pool_set_limit", &lrmt::pool_set_limit, "cap (bytes) on the CPU pool's cache; 0 turns the pool off");
}
