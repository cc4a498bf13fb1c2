// CPU kernels of the masked norms: OpenMP over rows, `omp simd` inner loops.
// Formulas: common.h. Each row is read from memory once per pass while it is
// still in cache, so a forward costs one read of x and one write of y, a
// backward one read of x and dy and one write of dx.
#include "cpu.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"

// The row loops are compiled twice, for AVX2+FMA (x86-64-v3) and for the
// baseline ISA, and the loader picks one, so a portable build still runs
// 8-wide on the machines that have it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MN_CPU_CLONES
#endif

namespace masked_norm {
namespace {

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <typename T, typename A>
inline A to_acc(T v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return static_cast<A>(bf16_to_float(v));
  } else {
    return static_cast<A>(v);
  }
}

template <typename T, typename A>
inline T from_acc(A v) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return float_to_bf16(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// The row in the acc type: the input itself, or converted into scratch.
template <typename T, typename A>
inline const A* row_as_acc(const T* src, A* scratch, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) scratch[i] = to_acc<T, A>(src[i]);
    return scratch;
  }
}

template <typename A, bool MASKED>
inline A mask_at(const A* c, int64_t i) {
  if constexpr (MASKED) {
    return c[i];
  } else {
    return A(1);
  }
}

// sum(term(i)) over i < n in kLanes independent accumulators (four AVX2
// vectors), combined pairwise: accurate for long rows of same-sign terms and
// not bound by the latency of one add chain. Fixed order, so deterministic.
template <typename A, typename F>
inline A lane_sum(int64_t n, F term) {
  constexpr int kLanes = 128 / sizeof(A);
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) acc[j] += term(i + j);
  }
  for (int j = 0; i < n; ++i, ++j) acc[j] += term(i);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  }
  return acc[0];
}

// Two sums of one pass, as lane_sum.
template <typename A, typename F1, typename F2>
inline void lane_sum2(int64_t n, F1 term1, F2 term2, A& sum1, A& sum2) {
  constexpr int kLanes = 128 / sizeof(A);
  A acc1[kLanes] = {};
  A acc2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      acc1[j] += term1(i + j);
      acc2[j] += term2(i + j);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    acc1[j] += term1(i);
    acc2[j] += term2(i);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) {
      acc1[j] += acc1[j + width];
      acc2[j] += acc2[j + width];
    }
  }
  sum1 = acc1[0];
  sum2 = acc2[0];
}

template <typename T, typename A, bool MASKED, bool RMS, bool BIAS>
MN_CPU_CLONES void forward_row(const T* x, T* y, const A* w, const A* b, const A* c, A inv_n,
                               A eps, A* mean_out, A* rstd_out, A* scratch, int64_t h) {
  const A* xa = row_as_acc<T, A>(x, scratch, h);
  A mean = 0;
  if constexpr (!RMS) {
    const A s = lane_sum<A>(h, [&](int64_t i) { return mask_at<A, MASKED>(c, i) * xa[i]; });
    mean = s * inv_n;
  }
  // Second pass over the cached row: exact centring instead of E[x^2]-mu^2.
  const A moment = lane_sum<A>(h, [&](int64_t i) {
    const A d = xa[i] - mean;
    return mask_at<A, MASKED>(c, i) * d * d;
  });
  const A rstd = rstd_from_moment(moment, inv_n, eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const A bi = BIAS ? b[i] : A(0);
    y[i] = from_acc<T, A>(forward_elem((xa[i] - mean) * rstd, w[i], bi, mask_at<A, MASKED>(c, i)));
  }
  if constexpr (!RMS) *mean_out = mean;
  *rstd_out = rstd;
}

// dx of one row; adds dy*xhat and dy into this thread's weight-gradient partials.
template <typename T, typename A, bool MASKED, bool RMS>
MN_CPU_CLONES void backward_row(const T* dy, const T* x, T* dx, const A* w, const A* c, A inv_n,
                                A mean, A rstd, A* dw_acc, A* db_acc, A* scratch, int64_t h) {
  const A* xa = row_as_acc<T, A>(x, scratch, h);
  const A* ga = row_as_acc<T, A>(dy, scratch + h, h);
  A sum_g = 0;
  A sum_gx = 0;
  lane_sum2<A>(
      h, [&](int64_t i) { return grad_out_elem(ga[i], w[i], mask_at<A, MASKED>(c, i)); },
      [&](int64_t i) {
        return grad_out_elem(ga[i], w[i], mask_at<A, MASKED>(c, i)) * ((xa[i] - mean) * rstd);
      },
      sum_g, sum_gx);
  if constexpr (RMS) sum_g = 0;  // no mean, so no mean term in dx
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) {
    const A ci = mask_at<A, MASKED>(c, i);
    const A xhat = (xa[i] - mean) * rstd;
    dx[i] = from_acc<T, A>(dx_elem(grad_out_elem(ga[i], w[i], ci), xhat, ci, rstd, inv_n, sum_g, sum_gx));
    dw_acc[i] += ga[i] * xhat;
    db_acc[i] += ga[i];
  }
}

template <typename A, typename W>
void copy_to_acc(const void* src, A* dst, int64_t n) {
  const W* s = static_cast<const W*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = to_acc<W, A>(s[i]);
}

template <typename A>
std::vector<A> vector_as_acc(const void* src, DType dtype, int64_t n) {
  std::vector<A> out(static_cast<size_t>(n));
  switch (dtype) {
    case DType::kFloat64: copy_to_acc<A, double>(src, out.data(), n); break;
    case DType::kFloat32: copy_to_acc<A, float>(src, out.data(), n); break;
    case DType::kBFloat16: copy_to_acc<A, bf16_t>(src, out.data(), n); break;
    default: throw std::invalid_argument("masked_norm CPU: weight dtype must be float64, float32 or bfloat16");
  }
  return out;
}

template <typename A, typename W>
void copy_from_acc(const A* src, void* dst, int64_t n) {
  W* d = static_cast<W*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = from_acc<W, A>(src[i]);
}

template <typename A>
void store_vector(const std::vector<A>& src, void* dst, DType dtype) {
  const auto n = static_cast<int64_t>(src.size());
  switch (dtype) {
    case DType::kFloat64: copy_from_acc<A, double>(src.data(), dst, n); break;
    case DType::kFloat32: copy_from_acc<A, float>(src.data(), dst, n); break;
    case DType::kBFloat16: copy_from_acc<A, bf16_t>(src.data(), dst, n); break;
    default: throw std::invalid_argument("masked_norm CPU: weight dtype must be float64, float32 or bfloat16");
  }
}

// 1/sum(c), summed in double: 2560 channels at 0.3 summed in float drift by 1e-4.
template <typename A>
A inv_count(const A* c, int64_t h) {
  if (c == nullptr) return A(1) / static_cast<A>(h);
  double n = 0;
  for (int64_t i = 0; i < h; ++i) n += static_cast<double>(c[i]);
  return static_cast<A>(1.0 / n);
}

template <typename T, typename A, bool MASKED, bool RMS, bool BIAS>
void forward_rows(const FwdParams& p, const A* w, const A* b, const A* c, A inv_n) {
  const int64_t h = p.hidden;
  const int nt = std::max(1, p.num_threads);
  std::vector<A> scratch(std::is_same_v<T, A> ? 0 : static_cast<size_t>(nt) * h);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  A* mean = static_cast<A*>(p.mean);
  A* rstd = static_cast<A*>(p.rstd);
  const A eps = static_cast<A>(p.eps);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    A* s = scratch.empty() ? nullptr : scratch.data() + static_cast<int64_t>(thread_id()) * h;
    forward_row<T, A, MASKED, RMS, BIAS>(x + r * h, y + r * h, w, b, c, inv_n, eps,
                                         RMS ? nullptr : mean + r, rstd + r, s, h);
  }
}

template <typename T, typename A, bool RMS, bool BIAS>
void forward_rows_any_mask(const FwdParams& p, const A* w, const A* b, const A* c, A inv_n) {
  if (c != nullptr) {
    forward_rows<T, A, true, RMS, BIAS>(p, w, b, c, inv_n);
  } else {
    forward_rows<T, A, false, RMS, BIAS>(p, w, b, c, inv_n);
  }
}

template <typename T, typename A>
void forward_typed(const FwdParams& p) {
  const int64_t h = p.hidden;
  const std::vector<A> w = vector_as_acc<A>(p.weight, p.w_dtype, h);
  const bool has_bias = !p.rms && p.bias != nullptr;
  const std::vector<A> b = has_bias ? vector_as_acc<A>(p.bias, p.w_dtype, h) : std::vector<A>();
  const A* c = static_cast<const A*>(p.mask);
  const A inv_n = inv_count(c, h);
  if (p.rms) {
    forward_rows_any_mask<T, A, true, false>(p, w.data(), nullptr, c, inv_n);
  } else if (has_bias) {
    forward_rows_any_mask<T, A, false, true>(p, w.data(), b.data(), c, inv_n);
  } else {
    forward_rows_any_mask<T, A, false, false>(p, w.data(), nullptr, c, inv_n);
  }
}

// Thread k owns rows [rows*k/parts, rows*(k+1)/parts) and partial sums k.
template <typename T, typename A, bool MASKED, bool RMS>
void backward_rows(const BwdParams& p, const A* w, const A* c, A inv_n, A* dw_part, A* db_part,
                   int64_t parts) {
  const int64_t h = p.hidden;
  const int nt = std::max(1, p.num_threads);
  std::vector<A> scratch(std::is_same_v<T, A> ? 0 : static_cast<size_t>(nt) * 2 * h);
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.dx);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t k = 0; k < parts; ++k) {
    A* s = scratch.empty() ? nullptr : scratch.data() + static_cast<int64_t>(thread_id()) * 2 * h;
    A* dw_k = dw_part + k * h;
    A* db_k = db_part + k * h;
    const int64_t r_end = p.rows * (k + 1) / parts;
    for (int64_t r = p.rows * k / parts; r < r_end; ++r) {
      const A mu = RMS ? A(0) : mean[r];
      backward_row<T, A, MASKED, RMS>(dy + r * h, x + r * h, dx + r * h, w, c, inv_n, mu, rstd[r],
                                      dw_k, db_k, s, h);
    }
  }
}

// Sums the per-thread partials in thread order, then applies the mask.
template <typename A>
void reduce_parts(const std::vector<A>& part, int64_t parts, int64_t h, const A* c, void* out,
                  DType dtype) {
  std::vector<A> sum(part.begin(), part.begin() + h);
  for (int64_t k = 1; k < parts; ++k) {
    const A* pk = part.data() + k * h;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) sum[i] += pk[i];
  }
  if (c != nullptr) {
    for (int64_t i = 0; i < h; ++i) sum[i] *= c[i];
  }
  store_vector(sum, out, dtype);
}

template <typename T, typename A>
void backward_typed(const BwdParams& p) {
  const int64_t h = p.hidden;
  const std::vector<A> w = vector_as_acc<A>(p.weight, p.w_dtype, h);
  const A* c = static_cast<const A*>(p.mask);
  const A inv_n = inv_count(c, h);
  const int64_t parts = std::min<int64_t>(std::max(1, p.num_threads), p.rows);
  // Both partials are always accumulated (one fused loop); only wanted ones are stored.
  std::vector<A> dw_part(static_cast<size_t>(parts * h), A(0));
  std::vector<A> db_part(static_cast<size_t>(parts * h), A(0));
  A* dw = dw_part.data();
  A* db = db_part.data();
  if (c != nullptr) {
    p.rms ? backward_rows<T, A, true, true>(p, w.data(), c, inv_n, dw, db, parts)
          : backward_rows<T, A, true, false>(p, w.data(), c, inv_n, dw, db, parts);
  } else {
    p.rms ? backward_rows<T, A, false, true>(p, w.data(), c, inv_n, dw, db, parts)
          : backward_rows<T, A, false, false>(p, w.data(), c, inv_n, dw, db, parts);
  }
  if (p.dweight != nullptr) reduce_parts(dw_part, parts, h, c, p.dweight, p.w_dtype);
  if (!p.rms && p.dbias != nullptr) reduce_parts(db_part, parts, h, c, p.dbias, p.w_dtype);
}

void check_sizes(int64_t rows, int64_t hidden) {
  if (rows < 0 || hidden < 1) {
    throw std::invalid_argument("masked_norm CPU: need rows >= 0 and hidden >= 1, got rows=" +
                                std::to_string(rows) + ", hidden=" + std::to_string(hidden));
  }
}

}  // namespace

void forward_cpu(const FwdParams& p) {
  check_sizes(p.rows, p.hidden);
  if (p.rows == 0) return;
  switch (p.x_dtype) {
    case DType::kFloat64: forward_typed<double, double>(p); break;
    case DType::kFloat32: forward_typed<float, float>(p); break;
    case DType::kBFloat16: forward_typed<bf16_t, float>(p); break;
    default: throw std::invalid_argument("masked_norm CPU: x dtype must be float64, float32 or bfloat16");
  }
}

void backward_cpu(const BwdParams& p) {
  check_sizes(p.rows, p.hidden);
  if (p.rows == 0) {
    // Nothing flowed into the weights; their gradients are exact zeros.
    const std::vector<double> zeros(static_cast<size_t>(p.hidden), 0.0);
    if (p.dweight != nullptr) store_vector(zeros, p.dweight, p.w_dtype);
    if (!p.rms && p.dbias != nullptr) store_vector(zeros, p.dbias, p.w_dtype);
    return;
  }
  switch (p.x_dtype) {
    case DType::kFloat64: backward_typed<double, double>(p); break;
    case DType::kFloat32: backward_typed<float, float>(p); break;
    case DType::kBFloat16: backward_typed<bf16_t, float>(p); break;
    default: throw std::invalid_argument("masked_norm CPU: x dtype must be float64, float32 or bfloat16");
  }
}

}  // namespace masked_norm
