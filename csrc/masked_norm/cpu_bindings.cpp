// Python bindings of the CPU masked-norm kernels: megatron_msg._masked_norm_cpu.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "bindings_common.h"
#include "cpu.h"

namespace masked_norm {
namespace {

ForwardOutputs forward(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& mask, double eps, bool rms) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "masked_norm CPU: x is on ", x.device());
  check_forward(x, weight, bias, mask, rms);
  ForwardOutputs out = alloc_forward(x, rms);
  FwdParams p = forward_params(x, weight, bias, mask, out, eps, rms);
  p.num_threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    forward_cpu(p);
  }
  return out;
}

BackwardOutputs backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool rms,
                         bool want_dweight, bool want_dbias) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "masked_norm CPU: x is on ", x.device());
  check_backward(dy, x, weight, mask, mean, rstd, rms);
  BackwardOutputs out = alloc_backward(x, weight, rms, want_dweight, want_dbias);
  BwdParams p = backward_params(dy, x, weight, mask, mean, rstd, out, rms);
  p.num_threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    backward_cpu(p);
  }
  return out;
}

}  // namespace
}  // namespace masked_norm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused masked LayerNorm / RMSNorm, CPU (OpenMP) kernels";
  m.def("forward", &masked_norm::forward, "returns (y, mean, rstd); mean is empty for RMSNorm",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("mask"),
        pybind11::arg("eps"), pybind11::arg("rms"));
  m.def("backward", &masked_norm::backward, "returns (dx, dweight or None, dbias or None)",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("mask"),
        pybind11::arg("mean"), pybind11::arg("rstd"), pybind11::arg("rms"),
        pybind11::arg("want_dweight"), pybind11::arg("want_dbias"));
  // Input dtypes the kernels take (names of torch dtypes); others use the reference.
  m.attr("input_dtypes") = pybind11::make_tuple("float64", "float32", "bfloat16");
}
