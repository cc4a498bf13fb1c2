// Python bindings of the CUDA masked-norm kernels: megatron_msg._masked_norm_cuda.
// The kernels (cuda.cu) see raw pointers and the current stream only.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "bindings_common.h"
#include "masked_norm_cuda.h"

namespace masked_norm {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "masked_norm CUDA ", what, " failed: ", cudaGetErrorString(err));
}

ForwardOutputs forward(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& mask, double eps, bool rms) {
  TORCH_CHECK_VALUE(x.is_cuda(), "masked_norm CUDA: x is on ", x.device());
  check_forward(x, weight, bias, mask, rms);
  const c10::cuda::CUDAGuard guard(x.device());
  ForwardOutputs out = alloc_forward(x, rms);
  const FwdParams p = forward_params(x, weight, bias, mask, out, eps, rms);
  check_cuda(forward_cuda(p, c10::cuda::getCurrentCUDAStream().stream()), "forward");
  return out;
}

BackwardOutputs backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& mask,
                         const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool rms,
                         bool want_dweight, bool want_dbias) {
  TORCH_CHECK_VALUE(x.is_cuda(), "masked_norm CUDA: x is on ", x.device());
  check_backward(dy, x, weight, mask, mean, rstd, rms);
  const c10::cuda::CUDAGuard guard(x.device());
  BackwardOutputs out = alloc_backward(x, weight, rms, want_dweight, want_dbias);
  const BwdParams p = backward_params(dy, x, weight, mask, mean, rstd, out, rms);
  at::Tensor workspace;
  if (p.dweight != nullptr || p.dbias != nullptr) {
    // Freed when this returns: the caching allocator orders its reuse on this stream.
    const auto bytes = static_cast<int64_t>(backward_workspace_bytes(p.rows, p.hidden));
    workspace = at::empty({bytes}, x.options().dtype(at::kByte));
  }
  void* ws = workspace.defined() ? workspace.data_ptr() : nullptr;
  check_cuda(backward_cuda(p, ws, c10::cuda::getCurrentCUDAStream().stream()), "backward");
  return out;
}

}  // namespace
}  // namespace masked_norm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused masked LayerNorm / RMSNorm, CUDA kernels";
  m.def("forward", &masked_norm::forward, "returns (y, mean, rstd); mean is empty for RMSNorm",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("mask"),
        pybind11::arg("eps"), pybind11::arg("rms"));
  m.def("backward", &masked_norm::backward, "returns (dx, dweight or None, dbias or None)",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("mask"),
        pybind11::arg("mean"), pybind11::arg("rstd"), pybind11::arg("rms"),
        pybind11::arg("want_dweight"), pybind11::arg("want_dbias"));
  // Input dtypes the kernels take (names of torch dtypes); others use the reference.
  m.attr("input_dtypes") = pybind11::make_tuple("float32", "float16", "bfloat16");
}
