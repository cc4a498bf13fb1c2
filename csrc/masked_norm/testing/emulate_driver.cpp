// C entry points to the CUDA kernels run on host threads (emulate.h), for
// ctypes. MN_EMULATED_CUDA_SOURCE names cuda.cu with its launches rewritten
// (tests/unit/test_masked_norm_cuda_emulated.py does that). Test-only.
#include "emulate.h"

#include MN_EMULATED_CUDA_SOURCE

using masked_norm::BwdParams;
using masked_norm::DType;
using masked_norm::FwdParams;

extern "C" {

int mn_emu_forward(const void* x, const void* weight, const void* bias, const void* mask, void* y,
                   void* mean, void* rstd, int64_t rows, int64_t hidden, double eps, int x_dtype,
                   int w_dtype, int rms) {
  FwdParams p;
  p.x = x;
  p.weight = weight;
  p.bias = bias;
  p.mask = mask;
  p.y = y;
  p.mean = mean;
  p.rstd = rstd;
  p.rows = rows;
  p.hidden = hidden;
  p.eps = eps;
  p.x_dtype = static_cast<DType>(x_dtype);
  p.w_dtype = static_cast<DType>(w_dtype);
  p.rms = rms != 0;
  return static_cast<int>(masked_norm::forward_cuda(p, nullptr));
}

int64_t mn_emu_workspace_bytes(int64_t rows, int64_t hidden) {
  return static_cast<int64_t>(masked_norm::backward_workspace_bytes(rows, hidden));
}

int mn_emu_backward(const void* dy, const void* x, const void* weight, const void* mask,
                    const void* mean, const void* rstd, void* dx, void* dweight, void* dbias,
                    int64_t rows, int64_t hidden, int x_dtype, int w_dtype, int rms,
                    void* workspace) {
  BwdParams p;
  p.dy = dy;
  p.x = x;
  p.weight = weight;
  p.mask = mask;
  p.mean = mean;
  p.rstd = rstd;
  p.dx = dx;
  p.dweight = dweight;
  p.dbias = dbias;
  p.rows = rows;
  p.hidden = hidden;
  p.x_dtype = static_cast<DType>(x_dtype);
  p.w_dtype = static_cast<DType>(w_dtype);
  p.rms = rms != 0;
  return static_cast<int>(masked_norm::backward_cuda(p, workspace, nullptr));
}

}  // extern "C"
