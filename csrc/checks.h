// lrmt_fast._C: argument checks of the ops (named arguments, flash-attention style).
//
// Every check names the argument (with its index in a list: 'w[2]', 'theta[9]') and says
// what was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace lrmt {

using at::Tensor;
using at::TensorList;

std::string shape_str(at::IntArrayRef s);

#define LRMT_CHECK_SHAPE_NOTE(OP, x, name, note, ...)                                          \
  do {                                                                                        \
    const std::vector<int64_t> _exp = {__VA_ARGS__};                                          \
    TORCH_CHECK((x).sizes().vec() == _exp, OP, ": argument '", name, "'", note,               \
                " must have shape ", shape_str(_exp), ", got ", shape_str((x).sizes()));      \
  } while (0)
#define LRMT_CHECK_SHAPE(OP, x, name, ...) LRMT_CHECK_SHAPE_NOTE(OP, x, name, "", __VA_ARGS__)

// The first tensor fixes the device and dtype; operator() checks each further tensor
// against them (defined, same device, same dtype, contiguous).
struct Checker {
  const char* op;
  c10::Device device;
  at::ScalarType dtype;

  Checker(const char* op_, const Tensor& first, const char* first_name);
  void operator()(const Tensor& t, const std::string& name) const;
};

// "name[i]"
std::string idx(const char* name, size_t i);

}  // namespace lrmt
