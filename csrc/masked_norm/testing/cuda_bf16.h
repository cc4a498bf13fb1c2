// Host stand-in for cuda_bf16.h (test-only), same rounding as c10::BFloat16.
#pragma once

#include "common.h"

struct __nv_bfloat16 {
  unsigned short bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
  return masked_norm::bf16_to_float(masked_norm::bf16_t{v.bits});
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{masked_norm::float_to_bf16(f).bits};
}
