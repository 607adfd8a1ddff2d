// lrmt_fast._C: argument checks of the ops (checks.h).
#include "checks.h"

#include <sstream>

namespace lrmt {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

Checker::Checker(const char* op_, const Tensor& first, const char* first_name)
    : op(op_), device(first.device()), dtype(first.scalar_type()) {
  TORCH_CHECK(first.defined(), op, ": argument '", first_name, "' is undefined");
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), op, ": argument '", first_name,
              "' is on ", device, "; only CPU and CUDA tensors are supported");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": argument '", first_name,
              "' must be float32 or float64, got ", dtype);
#ifndef LRMT_WITH_CUDA
  TORCH_CHECK(!device.is_cuda(), op, ": argument '", first_name,
              "' is a CUDA tensor but lrmt_fast._C was built without CUDA (rebuild with LRMT_CUDA=1)");
#endif
}

void Checker::operator()(const Tensor& t, const std::string& name) const {
  TORCH_CHECK(t.defined(), op, ": argument '", name, "' is undefined");
  TORCH_CHECK(t.device() == device, op, ": argument '", name, "' is on ", t.device(),
              " but the other tensors are on ", device, " (all tensors must be on one device)");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": argument '", name, "' has dtype ", t.scalar_type(),
              " but the other tensors are ", dtype, " (all tensors must have one dtype)");
  TORCH_CHECK(t.is_contiguous(), op, ": argument '", name, "' must be contiguous (call .contiguous())");
}

std::string idx(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

}  // namespace lrmt
