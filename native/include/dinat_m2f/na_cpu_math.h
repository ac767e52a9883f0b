// Small vectorisable building blocks of the CPU neighborhood-attention kernels (native/na/*_cpu.cpp).
// The loops use `#pragma omp simd` so the compiler vectorises them for the build's -march (the reductions are allowed
// to reassociate), and a branch-free exp that vectorises too (std::exp calls do not).
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

namespace dinat_m2f::na::cpu_math {

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

// y += alpha * x
template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] += alpha * x[i];
  }
}

template <typename T>
inline void scale_inplace(T alpha, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] *= alpha;
  }
}

// exp(x) in float32 to ~2 ulp: range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial (Cephes expf),
// 2^n assembled in the exponent bits. Inputs are clamped to [-87, 88] (exp(-87) ~ 1.6e-38 stands in for 0).
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3333519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(e);
}

inline double exp_approx(double x) { return std::exp(x); }

// Lanes: kLanes values of T in one GCC vector (zmm registers with AVX-512, split into halves or quarters otherwise).
constexpr int64_t kLanes = 16;

template <typename T>
struct LanesOf;
template <>
struct LanesOf<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct LanesOf<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};
template <typename T>
using Lanes = typename LanesOf<T>::type;

template <typename T>
inline Lanes<T> load_lanes(const T* p) {
  Lanes<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Lane-wise exp, the same approximation as cpu_math::exp_approx (float: round to nearest by the 1.5 * 2^23 trick,
// degree-6 polynomial, 2^n built in the exponent bits).
inline Lanes<float> exp_lanes(Lanes<float> x) {
  typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));
  x = x < -87.0f ? Lanes<float>{} - 87.0f : x;
  x = x > 88.0f ? Lanes<float>{} + 88.0f : x;
  const Lanes<float> n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  Lanes<float> r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Lanes<float> p = Lanes<float>{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3333519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;
  return p * (Lanes<float>)bits;  // same-size vector cast: reinterprets the bits
}

inline Lanes<double> exp_lanes(Lanes<double> x) {
  for (int64_t l = 0; l < kLanes; ++l) x[l] = std::exp(x[l]);
  return x;
}

// out[i] = exp(in[i] - shift) (in and out may be the same array); the compiler vectorises the loop.
template <typename T>
inline void exp_shifted(const T* in, T shift, T* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = exp_approx(in[i] - shift);
  }
}

// Runs `fn` on float32 copies of bfloat16 tensors (the kernels accumulate in float32) and copies results back.
inline at::Tensor as_compute(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t; }

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
