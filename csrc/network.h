// lrmt_fast._C: the network-level drivers (a list of resolved layers: Net) and the entry
// points of the operators (registration.cpp registers them; the single-layer ops run as a
// network of one layer).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "layer.h"
#include "workspace.h"

namespace lrmt {

struct Net {
  std::vector<Layer> layers;
  c10::Device device = c10::Device(c10::kCPU);
  at::ScalarType dtype = at::kFloat;
};

// Resolves and checks every layer of the network op's lists (flags: kHasBias | kPerNeuronPre).
Net make_net(const char* op, TensorList w, TensorList wb, TensorList g, TensorList gb, TensorList pre,
             TensorList post, TensorList h, TensorList c, TensorList theta, at::IntArrayRef flags);
// The given feature scale [nl, 4] (checked), or the one computed here (into `ar` when given).
Tensor resolve_fscale(const char* op, const Net& net, const std::optional<Tensor>& fscale, Arena* ar);
int64_t max_fwd_workspace(const Net& net);

// w_new, wb_new, delta, h_new, c_new (per layer), fscale [nl, 4], saved, theta_snap
using NetOut = std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                          std::vector<Tensor>, Tensor, Tensor, Tensor>;

// a flat copy of theta (snapshot) and views of it in theta's shapes
Tensor snapshot_theta(TensorList theta, const Tensor& like);
std::vector<Tensor> theta_views(TensorList theta, const Tensor& snap);

// forward of every layer into new tensors (meta_step_net, meta_step) or in place (meta_step_net_, meta_step_)
NetOut net_forward(const char* op, Net& net, double lr, const std::optional<Tensor>& fscale, bool save,
                   bool snapshot, TensorList theta);
void net_forward_(const char* op, Net& net, double lr, const std::optional<Tensor>& fscale, TensorList delta_out);

// ------------------------------------------------------------------------------------
// operators (torch.ops.lrmt_fast.*; schemas in registration.cpp)
// ------------------------------------------------------------------------------------
NetOut meta_step_net(TensorList w, TensorList wb, TensorList g, TensorList gb, TensorList pre, TensorList post,
                     TensorList h, TensorList c, TensorList theta, at::IntArrayRef flags, double lr,
                     const std::optional<Tensor>& fscale, bool save, bool snapshot);
void meta_step_net_(TensorList w, TensorList wb, TensorList g, TensorList gb, TensorList pre, TensorList post,
                    TensorList h, TensorList c, TensorList theta, at::IntArrayRef flags, double lr,
                    const std::optional<Tensor>& fscale, TensorList delta_out);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> meta_step(const Tensor& w, const Tensor& g,
                                                                     const Tensor& pre, const Tensor& post,
                                                                     const Tensor& h, const Tensor& c,
                                                                     TensorList theta, double lr,
                                                                     const Tensor& fscale, bool save, bool snapshot);
void meta_step_(const Tensor& w, const Tensor& g, const Tensor& pre, const Tensor& post, const Tensor& h,
                const Tensor& c, TensorList theta, double lr, const Tensor& fscale,
                const std::optional<Tensor>& delta_out);
Tensor feature_scale_net(TensorList w, TensorList wb, TensorList g, TensorList gb, TensorList pre, TensorList post,
                         TensorList h, TensorList c, TensorList theta, at::IntArrayRef flags);

// backward.cpp
using OptList = c10::List<std::optional<Tensor>>;
std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
meta_step_net_backward(const OptList& grad_w_new, const OptList& grad_wb_new, const OptList& grad_delta,
                       const OptList& grad_h_new, const OptList& grad_c_new, TensorList w, TensorList wb,
                       TensorList g, TensorList gb, TensorList pre, TensorList post, TensorList h, TensorList c,
                       TensorList theta, at::IntArrayRef flags, double lr, const Tensor& fscale, TensorList h_new,
                       TensorList c_new, const Tensor& saved, const Tensor& theta_snap, bool need_w, bool need_hc,
                       bool need_theta);

}  // namespace lrmt
