// Host stand-in for the few CUDA runtime names masked_norm_cuda.h/cuda.cu use, so that the
// kernels can run on threads of the host (see emulate.h). Test-only.
#pragma once

#include <cstddef>

enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
// cudaGetLastError and cudaGetErrorString: emulate.h.
