// CUDA masked LayerNorm / RMSNorm kernels (torch-free: compiles with plain nvcc).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "params.h"

namespace masked_norm {

// The weight gradients are reduced in two stages: per chunk of rows into
// float partials [chunks, hidden], then over the chunks in a fixed order (no
// atomics, so the result is deterministic).
// At least 32 rows per chunk, at most 256 chunks.
inline int64_t rows_per_grad_chunk(int64_t rows) {
  const int64_t max_chunks = 256;
  const int64_t rpc = (rows + max_chunks - 1) / max_chunks;
  return rpc < 32 ? 32 : rpc;
}

inline int64_t grad_chunks(int64_t rows) {
  const int64_t rows_per_chunk = rows_per_grad_chunk(rows);
  return (rows + rows_per_chunk - 1) / rows_per_chunk;
}

// Bytes of device workspace backward_cuda needs (two float partial matrices).
inline size_t backward_workspace_bytes(int64_t rows, int64_t hidden) {
  return static_cast<size_t>(2 * grad_chunks(rows) * hidden) * sizeof(float);
}

// x in float32, float16 or bfloat16; weight in float32 or x's dtype; mask,
// mean and rstd float32. Returns cudaErrorInvalidValue for anything else.
cudaError_t forward_cuda(const FwdParams& p, cudaStream_t stream);
// workspace: backward_workspace_bytes(rows, hidden) bytes on the same device.
cudaError_t backward_cuda(const BwdParams& p, void* workspace, cudaStream_t stream);

}  // namespace masked_norm
