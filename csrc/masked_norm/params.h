// Arguments of the masked-norm kernels, free of torch so that the CUDA file
// compiles with plain nvcc and the CPU kernel with a plain C++ compiler.
#pragma once

#include <cstdint>

namespace masked_norm {

enum class DType : int { kFloat64 = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

// "acc" below is the statistics type: float64 for float64 inputs, else float32.
// mask, mean and rstd are always in the acc type.
struct FwdParams {
  const void* x = nullptr;       // [rows, hidden], x_dtype, contiguous
  const void* weight = nullptr;  // [hidden], w_dtype
  const void* bias = nullptr;    // [hidden], w_dtype; nullptr: no bias (always for RMSNorm)
  const void* mask = nullptr;    // [hidden], acc; nullptr: plain (unmasked) norm
  void* y = nullptr;             // [rows, hidden], x_dtype
  void* mean = nullptr;          // [rows], acc; unused (may be nullptr) for RMSNorm
  void* rstd = nullptr;          // [rows], acc: 1/sqrt(var + eps) or 1/rms
  int64_t rows = 0;
  int64_t hidden = 0;
  double eps = 1e-5;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
  bool rms = false;
  int num_threads = 1;  // CPU only
};

struct BwdParams {
  const void* dy = nullptr;      // [rows, hidden], x_dtype
  const void* x = nullptr;       // [rows, hidden], x_dtype
  const void* weight = nullptr;  // [hidden], w_dtype
  const void* mask = nullptr;    // [hidden], acc; nullptr: plain norm
  const void* mean = nullptr;    // [rows], acc (LayerNorm only)
  const void* rstd = nullptr;    // [rows], acc
  void* dx = nullptr;            // [rows, hidden], x_dtype
  void* dweight = nullptr;       // [hidden], w_dtype; nullptr: not wanted
  void* dbias = nullptr;         // [hidden], w_dtype; nullptr: not wanted
  int64_t rows = 0;
  int64_t hidden = 0;
  DType x_dtype = DType::kFloat32;
  DType w_dtype = DType::kFloat32;
  bool rms = false;
  int num_threads = 1;  // CPU only
};

}  // namespace masked_norm
