// Per-element and per-row arithmetic of the masked norms, shared by the CPU and
// CUDA kernels so that the CPU tests exercise the same formulas the GPU runs.
//
// With mask c (DESIGN.md, "Masks"), n = sum(c), inv_n = 1/n:
//   LayerNorm: mu = sum(c*x)*inv_n, var = sum(c*(x-mu)^2)*inv_n, rstd = 1/sqrt(var+eps)
//   RMSNorm:   mu = 0,              rstd = 1/sqrt(sum(c*x^2)*inv_n + eps)
//   xhat = (x-mu)*rstd;  y = c*(w*xhat + b)  (b = 0 for RMSNorm)
// Backward, g = dy*c*w:
//   dx = rstd*(g - c*inv_n*(sum(g) + xhat*sum(g*xhat)))   (sum(g) term only for LayerNorm)
//   dw = sum_rows(dy*xhat)*c, db = sum_rows(dy)*c
// The plain norm is c = 1 everywhere, n = hidden.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define MN_HD __host__ __device__ __forceinline__
#else
#define MN_HD inline
#endif

namespace masked_norm {

MN_HD float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
MN_HD double inv_sqrt(double v) { return 1.0 / sqrt(v); }

// rstd from a (masked) second moment: LayerNorm passes sum(c*(x-mu)^2), RMSNorm sum(c*x^2).
template <typename A>
MN_HD A rstd_from_moment(A sum_c_sq, A inv_n, A eps) {
  return inv_sqrt(sum_c_sq * inv_n + eps);
}

template <typename A>
MN_HD A forward_elem(A xhat, A w, A b, A c) {
  return c * (w * xhat + b);
}

template <typename A>
MN_HD A grad_out_elem(A dy, A w, A c) {
  return dy * c * w;
}

template <typename A>
MN_HD A dx_elem(A g, A xhat, A c, A rstd, A inv_n, A sum_g, A sum_g_xhat) {
  return rstd * (g - c * inv_n * (sum_g + xhat * sum_g_xhat));
}

// bfloat16 on the host, bit-compatible with c10::BFloat16 (round to nearest
// even, NaN -> 0x7FC0). Device code uses cuda_bf16.h instead.
struct bf16_t {
  uint16_t bits;
};

inline float bf16_to_float(bf16_t v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

inline bf16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

}  // namespace masked_norm
