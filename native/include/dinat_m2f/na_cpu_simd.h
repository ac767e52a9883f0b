// Small vectorisable building blocks of the CPU neighborhood-attention kernels, compiled once per instruction set.
// NO include guard on purpose: native/na/na_cpu_isa.h includes this file inside the `#pragma GCC target` region and
// the anonymous namespace of each ISA, so every function here gets that ISA's code and internal linkage (it can never
// be merged by the linker with another ISA's copy). The std headers it needs are included by na_cpu_isa.h first.
// The loops use `#pragma omp simd` so the compiler vectorises them for the region's ISA (the reductions are allowed
// to reassociate), and a branch-free exp that vectorises too (std::exp calls do not).
// Expects DINAT_M2F_CPU_LANES (the lanes of one native float vector register of the ISA: 8 for AVX2, 16 for AVX-512).

// 8-float (256-bit) vectors, element-aligned: the dot product's accumulator on every ISA.
typedef float Floats8 __attribute__((vector_size(8 * sizeof(float)), aligned(alignof(float)), may_alias));

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  int64_t i = 0;
  T s = 0;
  if constexpr (std::is_same_v<T, float>) {
    // Two 256-bit accumulators and one reduction at the end: an `omp simd` reduction over the head dim (32) used
    // 512-bit registers with AVX-512, whose horizontal sum made the QK kernel 1.8x slower than with AVX2.
    Floats8 acc0{}, acc1{};
    for (; i + 16 <= n; i += 16) {
      acc0 += *reinterpret_cast<const Floats8*>(a + i) * *reinterpret_cast<const Floats8*>(b + i);
      acc1 += *reinterpret_cast<const Floats8*>(a + i + 8) * *reinterpret_cast<const Floats8*>(b + i + 8);
    }
    for (; i + 8 <= n; i += 8) {
      acc0 += *reinterpret_cast<const Floats8*>(a + i) * *reinterpret_cast<const Floats8*>(b + i);
    }
    const Floats8 acc = acc0 + acc1;
    s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  }
#pragma omp simd reduction(+ : s)
  for (int64_t t = i; t < n; ++t) {
    s += a[t] * b[t];
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

// Lanes: kLanes float values in one GCC vector: one register of the ISA (ymm with AVX2, zmm with AVX-512), so no
// operation is split or scalarised; float64 vectors take two registers. Element-aligned: the vector types' natural
// alignment follows the build's baseline (-march), not the region's ISA, so heap arrays of them (std::vector) would
// not be aligned as the region's aligned loads assume; unaligned loads cost nothing on these CPUs.
constexpr int64_t kLanes = DINAT_M2F_CPU_LANES;

template <typename T>
struct LanesOf;
template <>
struct LanesOf<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float)), may_alias));
};
template <>
struct LanesOf<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double)), aligned(alignof(double)), may_alias));
};
template <typename T>
using Lanes = typename LanesOf<T>::type;

// Unaligned vector load / store through the element-aligned, may_alias vector type: one vmovups. (A std::memcpy
// compiled with AVX2 went through the stack and general registers: store-forwarding stalls, 5x slower tiles.)
template <typename T>
inline Lanes<T> load_lanes(const T* p) {
  return *reinterpret_cast<const Lanes<T>*>(p);
}

template <typename T>
inline void store_lanes(T* p, Lanes<T> v) {
  *reinterpret_cast<Lanes<T>*>(p) = v;
}

// Lane-wise exp, the same approximation as cpu_math::exp_approx (float: round to nearest by the 1.5 * 2^23 trick,
// degree-6 polynomial, 2^n built in the exponent bits). Always inlined: as a call it was 9-11% of the forward's
// samples at 1x4x56x56 k7 (perf); inlined, the forward ran 1.01-1.05x faster.
__attribute__((always_inline)) inline Lanes<float> exp_lanes(Lanes<float> x) {
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

// out[i] = exp(in[i] - shift) (in and out may be the same array): kLanes at a time with exp_lanes, the tail scalar.
// (An `omp simd` loop over exp_approx measured ~2x slower than torch's softmax at DiNAT window sizes.)
template <typename T>
inline void exp_shifted(const T* in, T shift, T* out, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + kLanes <= n; i += kLanes) {
      store_lanes(out + i, exp_lanes(load_lanes(in + i) - shift));
    }
  }
  for (; i < n; ++i) {
    out[i] = exp_approx(in[i] - shift);
  }
}

// max(x[0..n)), kLanes at a time (a scalar compare chain costs as much as the exp at DiNAT window sizes).
template <typename T>
inline T max_of(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (n >= kLanes) {
      Lanes<float> acc = load_lanes(x);
      for (i = kLanes; i + kLanes <= n; i += kLanes) {
        const Lanes<float> v = load_lanes(x + i);
        acc = v > acc ? v : acc;
      }
      for (int64_t l = 0; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
    }
  }
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// out[t] = a . keys[t] for t < n (each of length d). float with d % 8 == 0: 8 keys at a time into 8 accumulators,
// then one transposing reduction (hadd tree) gives the 8 sums in one register, instead of 8 horizontal sums.
// Always inlined, so that a compiled head dim unrolls the loop over d: GCC cloned it per constant head dim only while
// the translation unit was small, and the per-query forward of maps without tiles lost 3-7% when it stopped.
template <typename T>
__attribute__((always_inline)) inline void dots(const T* __restrict a, const T* const* keys, int64_t n, int64_t d,
                                                T* __restrict out) {
  int64_t t = 0;
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (d % 8 == 0) {
      for (; t + 8 <= n; t += 8) {
        Floats8 acc[8] = {};
        for (int64_t i = 0; i < d; i += 8) {
          const Floats8 av = *reinterpret_cast<const Floats8*>(a + i);
          for (int u = 0; u < 8; ++u) {
            acc[u] += av * *reinterpret_cast<const Floats8*>(keys[t + u] + i);
          }
        }
        const __m256 h01 = _mm256_hadd_ps(__m256(acc[0]), __m256(acc[1]));
        const __m256 h23 = _mm256_hadd_ps(__m256(acc[2]), __m256(acc[3]));
        const __m256 h45 = _mm256_hadd_ps(__m256(acc[4]), __m256(acc[5]));
        const __m256 h67 = _mm256_hadd_ps(__m256(acc[6]), __m256(acc[7]));
        const __m256 h0123 = _mm256_hadd_ps(h01, h23);  // [s0..s3 of lanes 0-3 | s0..s3 of lanes 4-7]
        const __m256 h4567 = _mm256_hadd_ps(h45, h67);
        const __m256 sums =
            _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
        _mm256_storeu_ps(out + t, sums);
      }
    }
  }
#endif
  for (; t < n; ++t) {
    out[t] = dot(a, keys[t], d);
  }
}
