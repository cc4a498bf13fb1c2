// Tensor checks and kernel arguments shared by cpu_bindings.cpp and
// cuda_bindings.cpp. The Python side (megatron_msg/ops) validates user input
// with friendlier messages first; these checks keep the raw kernels safe when
// the extension is called directly.
#pragma once

#include <torch/extension.h>

#include <tuple>

#include "params.h"

namespace masked_norm {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble: return DType::kFloat64;
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, "masked_norm: unsupported dtype ", t.scalar_type());
  return DType::kFloat32;  // not reached
}

// Statistics, mask, mean and rstd live in this type.
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_vector(const at::Tensor& v, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == x.size(1), "masked_norm: ", name,
                    " must have shape [", x.size(1), "] (the hidden size of x ", x.sizes(),
                    "), got ", v.sizes());
  TORCH_CHECK_VALUE(v.device() == x.device(), "masked_norm: ", name, " is on ", v.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_VALUE(v.is_contiguous(), "masked_norm: ", name, " must be contiguous");
}

inline void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) >= 1, "masked_norm: ", name,
                    " must be 2-D [rows, hidden >= 1], got ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "masked_norm: ", name, " must be contiguous");
}

inline void check_weight_and_mask(const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& mask) {
  check_vector(weight, "weight", x);
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type(),
                    "masked_norm: weight dtype must be float32 or x's dtype (", x.scalar_type(),
                    "), got ", weight.scalar_type());
  if (mask.has_value()) {
    check_vector(*mask, "mask", x);
    TORCH_CHECK_VALUE(mask->scalar_type() == acc_type(x), "masked_norm: mask dtype must be ",
                      acc_type(x), " for x of dtype ", x.scalar_type(), ", got ",
                      mask->scalar_type());
  }
}

inline void check_forward(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& mask, bool rms) {
  check_rows(x, "x");
  check_weight_and_mask(x, weight, mask);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(!rms, "masked_norm: RMSNorm takes no bias");
    check_vector(*bias, "bias", x);
    TORCH_CHECK_VALUE(bias->scalar_type() == weight.scalar_type(), "masked_norm: bias dtype ",
                      bias->scalar_type(), " differs from weight dtype ", weight.scalar_type());
  }
}

inline void check_stat(const at::Tensor& s, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == x.size(0) && s.scalar_type() == acc_type(x) &&
                        s.device() == x.device() && s.is_contiguous(),
                    "masked_norm: ", name, " must be a contiguous ", acc_type(x), " vector of [",
                    x.size(0), "] on ", x.device(), ", got ", s.scalar_type(), s.sizes());
}

inline void check_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& mask,
                           const c10::optional<at::Tensor>& mean, const at::Tensor& rstd,
                           bool rms) {
  check_rows(x, "x");
  check_rows(dy, "dy");
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
                        dy.device() == x.device(),
                    "masked_norm: dy ", dy.scalar_type(), dy.sizes(), " must match x ",
                    x.scalar_type(), x.sizes());
  check_weight_and_mask(x, weight, mask);
  check_stat(rstd, "rstd", x);
  if (!rms) {
    TORCH_CHECK_VALUE(mean.has_value(), "masked_norm: LayerNorm backward needs mean");
    check_stat(*mean, "mean", x);
  }
}

inline const void* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

// y, mean (empty for RMSNorm), rstd.
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline ForwardOutputs alloc_forward(const at::Tensor& x, bool rms) {
  const auto opts = x.options().dtype(acc_type(x));
  return {at::empty_like(x), at::empty({rms ? 0 : x.size(0)}, opts), at::empty({x.size(0)}, opts)};
}

inline FwdParams forward_params(const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& mask, const ForwardOutputs& out,
                                double eps, bool rms) {
  FwdParams p;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = ptr_or_null(bias);
  p.mask = ptr_or_null(mask);
  p.y = std::get<0>(out).data_ptr();
  p.mean = rms ? nullptr : std::get<1>(out).data_ptr();
  p.rstd = std::get<2>(out).data_ptr();
  p.rows = x.size(0);
  p.hidden = x.size(1);
  p.eps = eps;
  p.x_dtype = dtype_of(x);
  p.w_dtype = dtype_of(weight);
  p.rms = rms;
  return p;
}

// dx, dweight, dbias (the last two only when asked for).
using BackwardOutputs =
    std::tuple<at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>>;

inline BackwardOutputs alloc_backward(const at::Tensor& x, const at::Tensor& weight, bool rms,
                                      bool want_dweight, bool want_dbias) {
  c10::optional<at::Tensor> dw;
  c10::optional<at::Tensor> db;
  if (want_dweight) dw = at::empty_like(weight);
  if (want_dbias && !rms) db = at::empty_like(weight);
  return {at::empty_like(x), dw, db};
}

inline BwdParams backward_params(const at::Tensor& dy, const at::Tensor& x,
                                 const at::Tensor& weight, const c10::optional<at::Tensor>& mask,
                                 const c10::optional<at::Tensor>& mean, const at::Tensor& rstd,
                                 const BackwardOutputs& out, bool rms) {
  BwdParams p;
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.mask = ptr_or_null(mask);
  p.mean = rms ? nullptr : ptr_or_null(mean);
  p.rstd = rstd.data_ptr();
  p.dx = std::get<0>(out).data_ptr();
  p.dweight = std::get<1>(out).has_value() ? std::get<1>(out)->data_ptr() : nullptr;
  p.dbias = std::get<2>(out).has_value() ? std::get<2>(out)->data_ptr() : nullptr;
  p.rows = x.size(0);
  p.hidden = x.size(1);
  p.x_dtype = dtype_of(x);
  p.w_dtype = dtype_of(weight);
  p.rms = rms;
  return p;
}

}  // namespace masked_norm
