// lrmt_fast._C: one adapted layer, resolved and checked (Layer, make_layer), and the
// per-layer stages that run on it: feature scale and forward (forward.cpp), backward
// (backward.cpp). The stages are instantiated for float and double.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "kernels.h"
#include "workspace.h"

namespace lrmt {

enum : int64_t { kHasBias = 1, kPerNeuronPre = 2 };

struct Layer {
  int64_t cout = 0, H = 0, L = 0, Pw = 0, P = 0, cinp = 0, npre = 0, D0 = 0;
  bool has_b = false, pre_shared = true, pre_one = false, w_gemm = false, pre_gemm = false;
  Tensor W, Wb, G, Gb, pre, post, h, c;  // W, G [cout, Pw]; Wb, Gb [cout]; pre [npre] or [cout, cinp]; post [cout]
  std::vector<Tensor> th;                // 3L + 3

  int64_t fwd_workspace() const {
    const int64_t G4 = 4 * H;
    return round_up(G4 * D0) + round_up(G4) + round_up(cout * G4) + round_up(cout * H) + round_up(cout * P);
  }
  int64_t bwd_workspace() const {
    const int64_t G4 = 4 * H;
    return round_up(G4 * D0) + round_up(G4) + round_up(cout * P) + round_up(cout * G4) + 2 * round_up(cout * H) +
           round_up(kMaxRank1 * G4) + round_up(kPartials) + round_up(1);
  }
  int64_t saved_numel() const { return L * cout * 4 * H + cout * P; }
};

// Resolves one layer. W may have any shape [cout, ...] (a student weight) and is
// viewed as [cout, Pw]; `single` = the per-layer op (w [cout, P], pre [1|cout, Cin'], post [cout, 1]).
Layer make_layer(const Checker& ck, bool single, size_t i, const Tensor& W, const Tensor* Wb, const Tensor& G,
                 const Tensor* Gb, const Tensor& pre, const Tensor& post, const Tensor& h, const Tensor& c,
                 bool per_neuron, TensorList theta, size_t tbase, size_t nth);

// prep's arguments of one layer (kernels.h: PrepArgs)
template <typename T>
PrepArgs<T> prep_args(const Layer& s, const T* fs, T* ws, T* bvec) {
  PrepArgs<T> pa;
  pa.G4 = 4 * s.H;
  pa.D0 = s.D0;
  pa.P = s.P;
  pa.cinp = s.cinp;
  pa.wih0 = ptr<T>(s.th[0]);
  pa.b0 = ptr<T>(s.th[2]);
  pa.fs = fs;
  pa.pre = s.pre_shared ? ptr<T>(s.pre) : nullptr;
  pa.npre = s.npre;
  pa.pre_one = s.pre_one;
  pa.ws = ws;
  pa.bvec = bvec;
  return pa;
}

// feature scale of one layer (meta_learner.feature_scale on the packed rows) into out4 [4]
template <typename T>
void feature_scale_layer(const Layer& s, const Tensor& out4);

// forward of one layer (forward.cpp): W_out / Wb_out / h_out / c_out may be the layer's own
// tensors (in place); delta, gates and t_save may be undefined (not written)
template <typename T>
void forward_layer(const Layer& s, const T* fs, double lr, const Tensor& W_out, const Tensor& Wb_out,
                   const Tensor& delta, const Tensor& h_out, const Tensor& c_out, const Tensor& gates,
                   const Tensor& t_save, Arena& ar);

// backward of one layer (backward.cpp)
struct LayerGrads {
  Tensor gWn, gWbn, gdelta, gh, gc;  // incoming (may be undefined)
  Tensor gW, gWb, gh_in, gc_in;      // outgoing (undefined when not needed)
  std::vector<Tensor> gth;           // empty when not needed
};

template <typename T>
void backward_layer(const Layer& s, const T* fs, double lr, const Tensor& h_new, const Tensor& c_new,
                    const Tensor& gates, const Tensor& t, LayerGrads& g, bool need_w, bool need_hc, bool need_theta,
                    Arena& ar);

}  // namespace lrmt
