// The ATen-facing helpers of the CPU neighborhood-attention kernels: float32 copies of bfloat16 tensors, head-dim
// dispatch and the parallel loop. Compiled for the baseline ISA only: the per-ISA kernel math is in na_cpu_simd.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <type_traits>

#include <unistd.h>

#include "dinat_m2f/na_common.h"

namespace dinat_m2f::na::cpu_math {

// The strides of a [B, heads, H, W, X] tensor (1D problems: H = 1) whose last dim is unit-stride, which the op entry
// points (native/na/na_ops.cpp) guarantee; any other strides are fine.
inline Strides strides_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 5 && (t.size(4) <= 1 || t.stride(4) == 1), "na CPU kernels: a ", t.dim(),
                        "-D tensor with last-dim stride ", t.stride(-1), " reached the kernels");
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.size(1)};
}

template <typename T>
inline Strided<const T> strided_in(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), strides_of(t)};
}

template <typename T>
inline Strided<T> strided_out(const at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), strides_of(t)};
}

// Runs `fn` on float32 copies of bfloat16 tensors (the kernels accumulate in float32) and copies results back.
inline at::Tensor as_compute(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t; }

// The ways of this CPU's L1 data cache (sysconf; 8, the common count, where the system does not say): the kernels'
// choice to copy token-strided inputs depends on it (saved_backward_stages).
inline int64_t l1_data_cache_ways() {
  static const int64_t ways = [] {
#if defined(_SC_LEVEL1_DCACHE_ASSOC)
    const long reported = sysconf(_SC_LEVEL1_DCACHE_ASSOC);
    if (reported > 0) return static_cast<int64_t>(reported);
#endif
    return int64_t{8};
  }();
  return ways;
}

// Calls fn(std::integral_constant<int64_t, D>{}) for the common head dims, so the loops over channels get constant
// trip counts and unroll fully, and fn(std::integral_constant<int64_t, 0>{}) (use the runtime size) otherwise.
template <typename F>
inline void dispatch_head_dim(int64_t dim, const F& fn) {
  switch (dim) {
    case 16:
      return fn(std::integral_constant<int64_t, 16>{});
    case 32:
      return fn(std::integral_constant<int64_t, 32>{});
    case 64:
      return fn(std::integral_constant<int64_t, 64>{});
    default:
      return fn(std::integral_constant<int64_t, 0>{});
  }
}

// Calls fn(std::integral_constant<int64_t, kw>{}) for the window widths the query tiles and the bias gradient's
// run sums are compiled for (their kw logits, dO . v, dS and sums are register arrays),
// fn(std::integral_constant<int64_t, 0>{}) otherwise.
template <typename F>
inline void dispatch_window_width(int64_t kw, const F& fn) {
  switch (kw) {
    case 3:
      return fn(std::integral_constant<int64_t, 3>{});
    case 5:
      return fn(std::integral_constant<int64_t, 5>{});
    case 7:
      return fn(std::integral_constant<int64_t, 7>{});
    case 9:
      return fn(std::integral_constant<int64_t, 9>{});
    case 11:
      return fn(std::integral_constant<int64_t, 11>{});
    case 13:
      return fn(std::integral_constant<int64_t, 13>{});
    default:
      return fn(std::integral_constant<int64_t, 0>{});
  }
}

// Parallel loop over [0, n) with OpenMP dynamic scheduling in chunks of `grain` items, on torch's thread count.
// Dynamic rather than at::parallel_for's static split: on a shared machine a descheduled thread's remaining rows are
// taken over by the others instead of stalling the whole op. Falls back to a serial loop inside a parallel region.
template <typename F>
inline void parallel(int64_t n, int64_t grain, const F& fn) {
  const int threads = at::get_num_threads();
  if (threads <= 1 || n <= grain || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) {
      fn(i);
    }
    return;
  }
  // An exception must not leave an OpenMP region (it would terminate the process): keep the first, rethrow after.
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel for schedule(dynamic, grain) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    if (failed.load(std::memory_order_relaxed)) {
      continue;
    }
    try {
      fn(i);
    } catch (...) {
#pragma omp critical(dinat_na_parallel_error)
      if (!failed.exchange(true)) {
        error = std::current_exception();
      }
    }
  }
  if (error) {
    std::rethrow_exception(error);
  }
}

}  // namespace dinat_m2f::na::cpu_math
