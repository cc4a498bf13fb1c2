// CUDA kernels of the masked norms. Formulas: common.h.
//
// Forward and dx: one block per row (grid-stride over rows). Statistics are
// two-pass in float32 (sum(c*x) then sum(c*(x-mu)^2)); the later passes re-read
// the row from L1/L2, so DRAM traffic stays one read of x (and dy) and one
// write. Loads are 16-byte packs when the hidden size and every pointer allow
// it, else scalar, so any hidden size works. Block sums: warp shuffles, then one
// fixed-order sum over the warps, identical in every thread.
//
// Weight gradients: dw = c * sum_rows(dy*xhat), db = c * sum_rows(dy), reduced
// per chunk of rows into float partials, then over chunks in order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.h"
#include "masked_norm_cuda.h"

namespace masked_norm {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;
constexpr int kColTile = 32;  // columns per block of the partial weight-gradient kernel
constexpr int kColRows = 8;   // row lanes per block of that kernel
constexpr int kFinalThreads = 256;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load_f(const T* base, int pack, float (&out)[N]) {
  const Pack<T, N> p = reinterpret_cast<const Pack<T, N>*>(base)[pack];
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_f(p.v[k]);
}

template <int N, typename T>
__device__ __forceinline__ void store_f(T* base, int pack, const float (&in)[N]) {
  Pack<T, N> p;
#pragma unroll
  for (int k = 0; k < N; ++k) p.v[k] = from_f<T>(in[k]);
  reinterpret_cast<Pack<T, N>*>(base)[pack] = p;
}

template <int N, bool MASKED>
__device__ __forceinline__ void load_mask(const float* c, int pack, float (&out)[N]) {
  if constexpr (MASKED) {
    load_f<N>(c, pack, out);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = 1.0f;
  }
}

// Sums K values over the block; every thread gets the same (deterministic) result.
// blockDim.x must be a multiple of 32; smem is reusable on return.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float (*smem)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[warp][k] = v[k];
  }
  __syncthreads();
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.0f;
    for (int w = 0; w < warps; ++w) s += smem[w][k];
    v[k] = s;
  }
  __syncthreads();
}

template <typename T, typename W, int VEC, bool MASKED, bool RMS, bool BIAS>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(const T* __restrict__ x, const W* __restrict__ w, const W* __restrict__ b,
                   const float* __restrict__ c, T* __restrict__ y, float* __restrict__ mean_out,
                   float* __restrict__ rstd_out, int64_t rows, int hidden, float eps) {
  __shared__ float smem2[kWarp][2];
  __shared__ float smem1[kWarp][1];
  const int packs = hidden / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    // Pass 1: sum(c*x) (LayerNorm) or sum(c*x^2) (RMSNorm), and sum(c).
    float acc[2] = {0.0f, 0.0f};
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
      float xv[VEC], cv[VEC];
      load_f<VEC>(xr, p, xv);
      load_mask<VEC, MASKED>(c, p, cv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc[0] += cv[k] * (RMS ? xv[k] * xv[k] : xv[k]);
        acc[1] += cv[k];
      }
    }
    block_sum<2>(acc, smem2);
    const float inv_n = 1.0f / (MASKED ? acc[1] : static_cast<float>(hidden));
    float mean = 0.0f;
    float moment[1] = {acc[0]};
    if constexpr (!RMS) {
      // Pass 2: exact centring instead of E[x^2] - mu^2.
      mean = acc[0] * inv_n;
      moment[0] = 0.0f;
      for (int p = threadIdx.x; p < packs; p += blockDim.x) {
        float xv[VEC], cv[VEC];
        load_f<VEC>(xr, p, xv);
        load_mask<VEC, MASKED>(c, p, cv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) moment[0] += cv[k] * (xv[k] - mean) * (xv[k] - mean);
      }
      block_sum<1>(moment, smem1);
    }
    const float rstd = rstd_from_moment(moment[0], inv_n, eps);
    if (threadIdx.x == 0) {
      if constexpr (!RMS) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    T* yr = y + row * hidden;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
      float xv[VEC], cv[VEC], wv[VEC], bv[VEC], out[VEC];
      load_f<VEC>(xr, p, xv);
      load_mask<VEC, MASKED>(c, p, cv);
      load_f<VEC>(w, p, wv);
      if constexpr (BIAS) load_f<VEC>(b, p, bv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out[k] = forward_elem((xv[k] - mean) * rstd, wv[k], BIAS ? bv[k] : 0.0f, cv[k]);
      }
      store_f<VEC>(yr, p, out);
    }
  }
}

template <typename T, typename W, int VEC, bool MASKED, bool RMS>
__global__ void __launch_bounds__(kMaxThreads)
    backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                       const W* __restrict__ w, const float* __restrict__ c,
                       const float* __restrict__ mean, const float* __restrict__ rstd,
                       T* __restrict__ dx, int64_t rows, int hidden) {
  __shared__ float smem[kWarp][3];
  const int packs = hidden / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    const T* dyr = dy + row * hidden;
    const float mu = RMS ? 0.0f : mean[row];
    const float rs = rstd[row];
    float acc[3] = {0.0f, 0.0f, 0.0f};  // sum(g), sum(g*xhat), sum(c)
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
      float xv[VEC], gv[VEC], wv[VEC], cv[VEC];
      load_f<VEC>(xr, p, xv);
      load_f<VEC>(dyr, p, gv);
      load_f<VEC>(w, p, wv);
      load_mask<VEC, MASKED>(c, p, cv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float g = grad_out_elem(gv[k], wv[k], cv[k]);
        acc[0] += g;
        acc[1] += g * ((xv[k] - mu) * rs);
        acc[2] += cv[k];
      }
    }
    block_sum<3>(acc, smem);
    const float inv_n = 1.0f / (MASKED ? acc[2] : static_cast<float>(hidden));
    const float sum_g = RMS ? 0.0f : acc[0];  // no mean, so no mean term in dx
    T* dxr = dx + row * hidden;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
      float xv[VEC], gv[VEC], wv[VEC], cv[VEC], out[VEC];
      load_f<VEC>(xr, p, xv);
      load_f<VEC>(dyr, p, gv);
      load_f<VEC>(w, p, wv);
      load_mask<VEC, MASKED>(c, p, cv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float g = grad_out_elem(gv[k], wv[k], cv[k]);
        out[k] = dx_elem(g, (xv[k] - mu) * rs, cv[k], rs, inv_n, sum_g, acc[1]);
      }
      store_f<VEC>(dxr, p, out);
    }
  }
}

// Stage 1: block (kColTile x kColRows) sums dy*xhat and dy over one chunk of
// rows for kColTile columns; warps read kColTile consecutive elements of a row.
template <typename T, bool RMS>
__global__ void __launch_bounds__(kColTile* kColRows)
    weight_grad_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                               const float* __restrict__ mean, const float* __restrict__ rstd,
                               float* __restrict__ part_dw, float* __restrict__ part_db,
                               int64_t rows, int hidden, int64_t rows_per_chunk) {
  __shared__ float sw[kColRows][kColTile + 1];
  __shared__ float sb[kColRows][kColTile + 1];
  const int col = blockIdx.x * kColTile + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float aw = 0.0f;
  float ab = 0.0f;
  if (col < hidden) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColRows) {
      const int64_t i = r * hidden + col;
      const float g = to_f(dy[i]);
      aw += g * ((to_f(x[i]) - (RMS ? 0.0f : mean[r])) * rstd[r]);
      ab += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    float tw = 0.0f;
    float tb = 0.0f;
#pragma unroll
    for (int k = 0; k < kColRows; ++k) {
      tw += sw[k][threadIdx.x];
      tb += sb[k][threadIdx.x];
    }
    const int64_t out = static_cast<int64_t>(blockIdx.y) * hidden + col;
    part_dw[out] = tw;
    part_db[out] = tb;
  }
}

// Stage 2: one thread per column sums the chunk partials in chunk order.
template <typename W>
__global__ void __launch_bounds__(kFinalThreads)
    weight_grad_final_kernel(const float* __restrict__ part_dw, const float* __restrict__ part_db,
                             const float* __restrict__ c, W* __restrict__ dw, W* __restrict__ db,
                             int hidden, int64_t chunks) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= hidden) return;
  float tw = 0.0f;
  float tb = 0.0f;
  for (int64_t k = 0; k < chunks; ++k) {
    tw += part_dw[k * hidden + col];
    tb += part_db[k * hidden + col];
  }
  const float ci = c != nullptr ? c[col] : 1.0f;
  if (dw != nullptr) dw[col] = from_f<W>(tw * ci);
  if (db != nullptr) db[col] = from_f<W>(tb * ci);
}

template <typename T, int VEC>
bool aligned(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * VEC) == 0;
}

// A multiple of 32 threads, at most kMaxThreads, that splits the packs of a
// row into equal rounds (640 packs: 2 rounds of 320, not 512 + 128).
int row_threads(int packs) {
  const int rounds = (packs + kMaxThreads - 1) / kMaxThreads;
  const int per_round = (packs + rounds - 1) / rounds;
  const int threads = (per_round + kWarp - 1) / kWarp * kWarp;
  return threads < kWarp ? kWarp : threads;
}

unsigned row_grid(int64_t rows) {
  const int64_t max_grid = int64_t{1} << 30;
  return static_cast<unsigned>(rows < max_grid ? rows : max_grid);
}

template <typename T, typename W, int VEC, bool MASKED, bool RMS, bool BIAS>
void launch_forward(const FwdParams& p, cudaStream_t stream) {
  const int hidden = static_cast<int>(p.hidden);
  forward_kernel<T, W, VEC, MASKED, RMS, BIAS>
      <<<row_grid(p.rows), row_threads(hidden / VEC), 0, stream>>>(
          static_cast<const T*>(p.x), static_cast<const W*>(p.weight),
          static_cast<const W*>(p.bias), static_cast<const float*>(p.mask), static_cast<T*>(p.y),
          static_cast<float*>(p.mean), static_cast<float*>(p.rstd), p.rows, hidden,
          static_cast<float>(p.eps));
}

template <typename T, typename W, int VEC, bool RMS, bool BIAS>
void launch_forward_any_mask(const FwdParams& p, cudaStream_t stream) {
  if (p.mask != nullptr) {
    launch_forward<T, W, VEC, true, RMS, BIAS>(p, stream);
  } else {
    launch_forward<T, W, VEC, false, RMS, BIAS>(p, stream);
  }
}

template <typename T, typename W, int VEC>
void launch_forward_vec(const FwdParams& p, cudaStream_t stream) {
  if (p.rms) {
    launch_forward_any_mask<T, W, VEC, true, false>(p, stream);
  } else if (p.bias != nullptr) {
    launch_forward_any_mask<T, W, VEC, false, true>(p, stream);
  } else {
    launch_forward_any_mask<T, W, VEC, false, false>(p, stream);
  }
}

template <typename T, typename W>
cudaError_t forward_typed(const FwdParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.hidden % kVec == 0 && aligned<T, kVec>(p.x) && aligned<T, kVec>(p.y) &&
                   aligned<W, kVec>(p.weight) && aligned<W, kVec>(p.bias) &&
                   aligned<float, kVec>(p.mask);
  if (vec) {
    launch_forward_vec<T, W, kVec>(p, stream);
  } else {
    launch_forward_vec<T, W, 1>(p, stream);
  }
  return cudaGetLastError();
}

template <typename T, typename W, int VEC, bool MASKED, bool RMS>
void launch_backward_dx(const BwdParams& p, cudaStream_t stream) {
  const int hidden = static_cast<int>(p.hidden);
  backward_dx_kernel<T, W, VEC, MASKED, RMS><<<row_grid(p.rows), row_threads(hidden / VEC), 0, stream>>>(
      static_cast<const T*>(p.dy), static_cast<const T*>(p.x), static_cast<const W*>(p.weight),
      static_cast<const float*>(p.mask), static_cast<const float*>(p.mean),
      static_cast<const float*>(p.rstd), static_cast<T*>(p.dx), p.rows, hidden);
}

template <typename T, typename W, int VEC>
void launch_backward_dx_vec(const BwdParams& p, cudaStream_t stream) {
  if (p.mask != nullptr) {
    p.rms ? launch_backward_dx<T, W, VEC, true, true>(p, stream)
          : launch_backward_dx<T, W, VEC, true, false>(p, stream);
  } else {
    p.rms ? launch_backward_dx<T, W, VEC, false, true>(p, stream)
          : launch_backward_dx<T, W, VEC, false, false>(p, stream);
  }
}

template <typename T, typename W>
void launch_weight_grads(const BwdParams& p, void* workspace, cudaStream_t stream) {
  const int hidden = static_cast<int>(p.hidden);
  const int64_t chunks = p.rows > 0 ? grad_chunks(p.rows) : 0;
  float* part_dw = static_cast<float*>(workspace);
  float* part_db = part_dw + chunks * p.hidden;
  if (chunks > 0) {
    const dim3 grid((hidden + kColTile - 1) / kColTile, static_cast<unsigned>(chunks));
    const dim3 block(kColTile, kColRows);
    const T* dy = static_cast<const T*>(p.dy);
    const T* x = static_cast<const T*>(p.x);
    const float* mean = static_cast<const float*>(p.mean);
    const float* rstd = static_cast<const float*>(p.rstd);
    const int64_t rpc = rows_per_grad_chunk(p.rows);
    if (p.rms) {
      weight_grad_partial_kernel<T, true>
          <<<grid, block, 0, stream>>>(dy, x, mean, rstd, part_dw, part_db, p.rows, hidden, rpc);
    } else {
      weight_grad_partial_kernel<T, false>
          <<<grid, block, 0, stream>>>(dy, x, mean, rstd, part_dw, part_db, p.rows, hidden, rpc);
    }
  }
  // With no rows the partials are empty and the gradients come out as zeros.
  weight_grad_final_kernel<W><<<(hidden + kFinalThreads - 1) / kFinalThreads, kFinalThreads, 0, stream>>>(
      part_dw, part_db, static_cast<const float*>(p.mask), static_cast<W*>(p.dweight),
      static_cast<W*>(p.rms ? nullptr : p.dbias), hidden, chunks);
}

template <typename T, typename W>
cudaError_t backward_typed(const BwdParams& p, void* workspace, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (p.rows > 0) {
    const bool vec = p.hidden % kVec == 0 && aligned<T, kVec>(p.dy) && aligned<T, kVec>(p.x) &&
                     aligned<T, kVec>(p.dx) && aligned<W, kVec>(p.weight) &&
                     aligned<float, kVec>(p.mask);
    if (vec) {
      launch_backward_dx_vec<T, W, kVec>(p, stream);
    } else {
      launch_backward_dx_vec<T, W, 1>(p, stream);
    }
  }
  if (p.dweight != nullptr || p.dbias != nullptr) launch_weight_grads<T, W>(p, workspace, stream);
  return cudaGetLastError();
}

bool bad_sizes(int64_t rows, int64_t hidden, DType x_dtype, DType w_dtype) {
  return rows < 0 || hidden < 1 || hidden > INT32_MAX ||
         (w_dtype != DType::kFloat32 && w_dtype != x_dtype);
}

}  // namespace

cudaError_t forward_cuda(const FwdParams& p, cudaStream_t stream) {
  if (bad_sizes(p.rows, p.hidden, p.x_dtype, p.w_dtype)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const bool w32 = p.w_dtype == DType::kFloat32;
  switch (p.x_dtype) {
    case DType::kFloat32: return forward_typed<float, float>(p, stream);
    case DType::kFloat16:
      return w32 ? forward_typed<__half, float>(p, stream) : forward_typed<__half, __half>(p, stream);
    case DType::kBFloat16:
      return w32 ? forward_typed<__nv_bfloat16, float>(p, stream)
                 : forward_typed<__nv_bfloat16, __nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t backward_cuda(const BwdParams& p, void* workspace, cudaStream_t stream) {
  if (bad_sizes(p.rows, p.hidden, p.x_dtype, p.w_dtype)) return cudaErrorInvalidValue;
  const bool w32 = p.w_dtype == DType::kFloat32;
  switch (p.x_dtype) {
    case DType::kFloat32: return backward_typed<float, float>(p, workspace, stream);
    case DType::kFloat16:
      return w32 ? backward_typed<__half, float>(p, workspace, stream)
                 : backward_typed<__half, __half>(p, workspace, stream);
    case DType::kBFloat16:
      return w32 ? backward_typed<__nv_bfloat16, float>(p, workspace, stream)
                 : backward_typed<__nv_bfloat16, __nv_bfloat16>(p, workspace, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace masked_norm
