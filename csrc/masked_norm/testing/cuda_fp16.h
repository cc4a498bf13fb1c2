// Host stand-in for cuda_fp16.h (test-only): IEEE binary16 in software,
// round to nearest even, subnormals, infinities and NaN.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float v = ldexpf(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  const uint32_t bits = exp == 0x1f ? (sign | 0x7f800000u | (mant << 13))
                                    : (sign | ((exp - 15 + 127) << 23) | (mant << 13));
  float f;
  memcpy(&f, &bits, sizeof(f));
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof(x));
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mant = x & 0x7fffffu;
  const int32_t exp = static_cast<int32_t>((x >> 23) & 0xffu);
  if (exp == 0xff) return __half{static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u))};
  const int32_t e = exp - 127 + 15;
  if (e >= 0x1f) return __half{static_cast<uint16_t>(sign | 0x7c00u)};
  uint32_t shift = 13;
  uint32_t base = sign | (static_cast<uint32_t>(e) << 10);
  if (e <= 0) {  // subnormal half (or zero)
    if (e < -10) return __half{static_cast<uint16_t>(sign)};
    mant |= 0x800000u;
    shift = static_cast<uint32_t>(14 - e);
    base = sign;
  }
  uint32_t h = base | (mant >> shift);
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;  // a carry rounds up into the exponent
  return __half{static_cast<uint16_t>(h)};
}
