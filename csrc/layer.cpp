// lrmt_fast._C: one adapted layer, resolved and checked (layer.h).
#include "layer.h"

#include <string>

namespace lrmt {

// Checks theta of one layer (3L + 3 tensors) against the layer's sizes.
void check_theta(const Checker& ck, const Layer& s, TensorList theta, size_t base, const char* tname) {
  const int64_t G4 = 4 * s.H;
  for (int64_t l = 0; l < s.L; ++l) {
    const Tensor& wih = theta[base + 3 * l];
    const Tensor& whh = theta[base + 3 * l + 1];
    const Tensor& b = theta[base + 3 * l + 2];
    ck(wih, idx(tname, base + 3 * l));
    ck(whh, idx(tname, base + 3 * l + 1));
    ck(b, idx(tname, base + 3 * l + 2));
    const int64_t d = l == 0 ? s.D0 : s.H;
    const std::string cell = std::to_string(l) + ")";
    LRMT_CHECK_SHAPE_NOTE(ck.op, wih, idx(tname, base + 3 * l), " (w_ih of cell " + cell, G4, d);
    LRMT_CHECK_SHAPE_NOTE(ck.op, whh, idx(tname, base + 3 * l + 1), " (w_hh of cell " + cell, G4, s.H);
    LRMT_CHECK_SHAPE_NOTE(ck.op, b, idx(tname, base + 3 * l + 2), " (bias of cell " + cell, G4);
  }
  const size_t o = base + 3 * s.L;
  ck(theta[o], idx(tname, o));
  ck(theta[o + 1], idx(tname, o + 1));
  ck(theta[o + 2], idx(tname, o + 2));
  LRMT_CHECK_SHAPE_NOTE(ck.op, theta[o], idx(tname, o), " (w_out)", s.P, s.H);
  LRMT_CHECK_SHAPE_NOTE(ck.op, theta[o + 1], idx(tname, o + 1), " (b_out)", s.P);
  TORCH_CHECK(theta[o + 2].numel() == 1, ck.op, ": argument '", idx(tname, o + 2),
              "' (scale) must have one element, got shape ", shape_str(theta[o + 2].sizes()));
}

// Resolves one layer. W may have any shape [cout, ...] (a student weight) and is
// viewed as [cout, Pw]; `single` = the per-layer op (w [cout, P], pre [1|cout, Cin'], post [cout, 1]).
Layer make_layer(const Checker& ck, bool single, size_t i, const Tensor& W, const Tensor* Wb, const Tensor& G,
                 const Tensor* Gb, const Tensor& pre, const Tensor& post, const Tensor& h, const Tensor& c,
                 bool per_neuron, TensorList theta, size_t tbase, size_t nth) {
  auto nm = [&](const char* n) { return single ? std::string(n) : idx(n, i); };
  Layer s;
  ck(h, nm("h"));
  ck(c, nm("c"));
  TORCH_CHECK(h.dim() == 3, ck.op, ": argument '", nm("h"), "' must have shape [L, Cout, H], got ", shape_str(h.sizes()));
  s.L = h.size(0);
  s.cout = h.size(1);
  s.H = h.size(2);
  TORCH_CHECK(s.L >= 1 && s.cout >= 1 && s.H >= 1, ck.op, ": argument '", nm("h"), "' has an empty dimension: ",
              shape_str(h.sizes()));
  LRMT_CHECK_SHAPE(ck.op, c, nm("c"), s.L, s.cout, s.H);
  TORCH_CHECK(static_cast<int64_t>(nth) == 3 * s.L + 3, ck.op, ": theta", single ? "" : " (per layer)",
              " must hold 3L+3 = ", 3 * s.L + 3, " tensors for L = ", s.L, " LSTM cells (h.size(0)), got ", nth);
  ck(W, nm("w"));
  ck(G, nm("g"));
  if (single) {
    TORCH_CHECK(W.dim() == 2 && W.size(0) == s.cout, ck.op, ": argument 'w' must have shape [Cout=", s.cout,
                ", P], got ", shape_str(W.sizes()));
  } else {
    TORCH_CHECK(W.dim() >= 1 && W.size(0) == s.cout && W.numel() > 0, ck.op, ": argument '", nm("w"),
                "' must have shape [Cout=", s.cout, ", ...], got ", shape_str(W.sizes()));
  }
  TORCH_CHECK(G.sizes() == W.sizes(), ck.op, ": argument '", nm("g"), "' must have the shape of '", nm("w"), "' ",
              shape_str(W.sizes()), ", got ", shape_str(G.sizes()));
  s.Pw = W.numel() / s.cout;
  s.W = W.view({s.cout, s.Pw});
  s.G = G.view({s.cout, s.Pw});
  s.has_b = Wb != nullptr;
  if (s.has_b) {
    ck(*Wb, nm("wb"));
    ck(*Gb, nm("gb"));
    LRMT_CHECK_SHAPE(ck.op, *Wb, nm("wb"), s.cout);
    LRMT_CHECK_SHAPE(ck.op, *Gb, nm("gb"), s.cout);
    s.Wb = *Wb;
    s.Gb = *Gb;
  }
  s.P = s.Pw + (s.has_b ? 1 : 0);
  ck(pre, nm("pre"));
  ck(post, nm("post"));
  if (single) {
    TORCH_CHECK(pre.dim() == 2 && (pre.size(0) == 1 || pre.size(0) == s.cout) && pre.size(1) >= 1, ck.op,
                ": argument 'pre' must have shape [1, Cin'] (shared) or [Cout=", s.cout, ", Cin'] (per neuron), got ",
                shape_str(pre.sizes()));
    LRMT_CHECK_SHAPE(ck.op, post, "post", s.cout, 1);
    per_neuron = pre.size(0) == s.cout && s.cout > 1;
  }
  s.pre_shared = !per_neuron;
  s.pre_one = s.has_b;  // the bias synapse's pre-activation is the constant 1
  if (s.pre_shared) {
    s.npre = pre.numel();
    s.cinp = s.npre + (s.pre_one ? 1 : 0);
    TORCH_CHECK(s.cinp >= 1, ck.op, ": argument '", nm("pre"), "' is empty");
    s.pre = pre.view({s.npre});
  } else {
    TORCH_CHECK(pre.numel() >= s.cout && pre.numel() % s.cout == 0, ck.op, ": argument '", nm("pre"),
                "' is per neuron and must have Cout=", s.cout, " rows, got shape ", shape_str(pre.sizes()));
    TORCH_CHECK(!s.has_b, ck.op, ": layer ", i, ": a per-neuron 'pre' cannot be combined with a bias synapse");
    s.cinp = pre.numel() / s.cout;
    s.npre = s.cinp;
    s.pre = pre.view({s.cout, s.cinp});
  }
  TORCH_CHECK(post.numel() == s.cout, ck.op, ": argument '", nm("post"), "' must have Cout=", s.cout,
              " elements, got shape ", shape_str(post.sizes()));
  s.post = post.view({s.cout});
  s.h = h;
  s.c = c;
  s.D0 = 2 * s.P + s.cinp + 1;
  s.w_gemm = s.Pw > 1;
  s.pre_gemm = !s.pre_shared && s.cinp > 1;
  check_theta(ck, s, theta, tbase, "theta");
  s.th.assign(theta.begin() + tbase, theta.begin() + tbase + nth);
  return s;
}

}  // namespace lrmt
