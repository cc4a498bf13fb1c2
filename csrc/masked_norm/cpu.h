// CPU masked LayerNorm / RMSNorm kernels (torch-free; cpu_bindings.cpp wraps them).
#pragma once

#include "params.h"

namespace masked_norm {

// Inputs x/dy in float64, float32 or bfloat16; weights in float64, float32 or
// bfloat16. Statistics are computed in float64 for float64 inputs, else float32.
// Rows are split over OpenMP threads (p.num_threads). The weight gradients are
// summed per thread in a fixed row range and then in thread order, so a result
// is bitwise reproducible for a given thread count.
// Throws std::invalid_argument for an unsupported dtype or a bad size.
void forward_cpu(const FwdParams& p);
void backward_cpu(const BwdParams& p);

}  // namespace masked_norm
