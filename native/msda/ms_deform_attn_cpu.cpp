// Multi-scale deformable attention on the CPU (float32, float64).
//
// Both kernels work on one sample at a time (one location of one query, head, level and point) and loop over its D
// contiguous channels in D-inner loops that the compiler vectorizes (omp simd; the dot products' partial sums
// per SIMD lane are a fixed order for a given build).
// Forward: parallel over (batch, query); every output row is written by one task.
// Backward: parallel over (batch, head). The gradient of value scatters into value's [n, :, m, :] slice (staged in a
// contiguous per-thread copy), which no other (batch, head) task touches, and the gradients of locations and weights
// are per sample: no races, no atomics, and a fixed summation order, so the result is deterministic for any thread
// count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "dinat_m2f/ms_deform_attn_common.h"
#include "dinat_m2f/ms_deform_attn_kernels.h"

namespace dinat_m2f::msda::cpu {

namespace {

// Task sizes for at::parallel_for: a range smaller than this many multiply-adds runs on the calling thread.
constexpr int64_t kWorkPerTask = 32768;

// Calls f(std::integral_constant<int64_t, kChannels>) with kChannels = D for the channel counts compiled in (the
// channel loops then have a fixed length: unrolled, no remainder), else kChannels = 0 (D read at run time).
// Mask2Former's encoder has 256 channels in 8 heads.
template <typename F>
void dispatch_channels(int64_t D, const F& f) {
  if (D == 32) {
    f(std::integral_constant<int64_t, 32>{});
  } else {
    f(std::integral_constant<int64_t, 0>{});
  }
}

// One sample's contribution to the output: acc[d] += w * bilinear(value)[d] over the D contiguous channels of the
// sample's level and head (a corner's channels start at level + pos * row).
template <typename scalar_t, typename acc_t>
inline void forward_sample(const BilinearSample<acc_t>& s, acc_t w, const scalar_t* level, int64_t row, int64_t D,
                           acc_t* __restrict__ acc) {
  for (int c = 0; c < 4; ++c) {
    if (!s.valid[c]) {
      continue;
    }
    const acc_t coeff = w * s.weight[c];
    const scalar_t* __restrict__ v = level + s.pos[c] * row;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      acc[d] += coeff * static_cast<acc_t>(v[d]);
    }
  }
}

template <typename scalar_t, int64_t kChannels>
void forward_kernel(const Sizes& z, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* locations, const scalar_t* weights, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = kChannels > 0 ? kChannels : z.D;
  const int64_t row = z.M * D;  // stride of one spatial position in value
  const int64_t grain = std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, z.M * z.L * z.P * 4 * D));
  at::parallel_for(0, z.N * z.Lq, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_buffer(kChannels > 0 ? 0 : D);
    acc_t acc_fixed[kChannels > 0 ? kChannels : 1];  // a fixed-size accumulator can live in registers
    acc_t* __restrict__ acc = kChannels > 0 ? acc_fixed : acc_buffer.data();
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / z.Lq;
      const int64_t q = nq % z.Lq;
      for (int64_t m = 0; m < z.M; ++m) {
        std::fill_n(acc, D, acc_t(0));
        for (int64_t l = 0; l < z.L; ++l) {
          const int64_t H = shapes[2 * l];
          const int64_t W = shapes[2 * l + 1];
          const scalar_t* level = value + ((n * z.S + starts[l]) * z.M + m) * D;
          for (int64_t p = 0; p < z.P; ++p) {
            const int64_t i = sample_index(n, q, m, l, p, z.Lq, z.M, z.L, z.P);
            BilinearSample<acc_t> s;
            if (make_bilinear_sample<acc_t>(locations[2 * i], locations[2 * i + 1], H, W, s)) {
              forward_sample(s, static_cast<acc_t>(weights[i]), level, row, D, acc);
            }
          }
        }
        scalar_t* __restrict__ out = output + (nq * z.M + m) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          out[d] = static_cast<scalar_t>(acc[d]);
        }
      }
    }
  });
}

// One sample's backward over the D contiguous channels of its level and head. The sample is linear in the corner
// values, so its gradients follow from one dot product per corner, dot[c] = sum_d top[d] * value_corner[d]: the
// weight's gradient is the bilinear combination of the dots, the coordinates' the derivative combinations
// (bilinear_value_and_grad applied to the dots). Each corner's value gradient is top * (w * corner weight). Both are
// D-inner loops that vectorize; a sample with all four corners inside the map (most) runs them as one loop.
template <typename scalar_t, typename acc_t>
inline SampleGrads<acc_t> backward_sample(const BilinearSample<acc_t>& s, acc_t w, const scalar_t* level,
                                          scalar_t* grad_level, int64_t row, int64_t D,
                                          const scalar_t* __restrict__ top) {
  acc_t dot[4] = {0, 0, 0, 0};
  if (s.valid[0] && s.valid[1] && s.valid[2] && s.valid[3]) {
    const scalar_t* __restrict__ v0 = level + s.pos[0] * row;
    const scalar_t* __restrict__ v1 = level + s.pos[1] * row;
    const scalar_t* __restrict__ v2 = level + s.pos[2] * row;
    const scalar_t* __restrict__ v3 = level + s.pos[3] * row;
    scalar_t* __restrict__ g0 = grad_level + s.pos[0] * row;
    scalar_t* __restrict__ g1 = grad_level + s.pos[1] * row;
    scalar_t* __restrict__ g2 = grad_level + s.pos[2] * row;
    scalar_t* __restrict__ g3 = grad_level + s.pos[3] * row;
    const acc_t c0 = w * s.weight[0], c1 = w * s.weight[1], c2 = w * s.weight[2], c3 = w * s.weight[3];
    acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t t = static_cast<acc_t>(top[d]);
      d0 += t * static_cast<acc_t>(v0[d]);
      d1 += t * static_cast<acc_t>(v1[d]);
      d2 += t * static_cast<acc_t>(v2[d]);
      d3 += t * static_cast<acc_t>(v3[d]);
      g0[d] = static_cast<scalar_t>(static_cast<acc_t>(g0[d]) + c0 * t);
      g1[d] = static_cast<scalar_t>(static_cast<acc_t>(g1[d]) + c1 * t);
      g2[d] = static_cast<scalar_t>(static_cast<acc_t>(g2[d]) + c2 * t);
      g3[d] = static_cast<scalar_t>(static_cast<acc_t>(g3[d]) + c3 * t);
    }
    dot[0] = d0;
    dot[1] = d1;
    dot[2] = d2;
    dot[3] = d3;
  } else {
    for (int c = 0; c < 4; ++c) {
      if (!s.valid[c]) {
        continue;
      }
      const scalar_t* __restrict__ v = level + s.pos[c] * row;
      scalar_t* __restrict__ gv = grad_level + s.pos[c] * row;
      const acc_t coeff = w * s.weight[c];
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) {
        const acc_t t = static_cast<acc_t>(top[d]);
        sum += t * static_cast<acc_t>(v[d]);
        gv[d] = static_cast<scalar_t>(static_cast<acc_t>(gv[d]) + coeff * t);
      }
      dot[c] = sum;
    }
  }
  SampleGrads<acc_t> grads;
  bilinear_value_and_grad(s, dot, grads.weight, grads.h_im, grads.w_im);
  return grads;
}

// A thread's contiguous copies of one (batch, head) slice of value and of its gradient, [S, D] each, kept between
// tasks and calls (a fresh allocation per task would page-fault on first touch).
template <typename scalar_t>
struct StagedHead {
  std::vector<scalar_t> value;
  std::vector<scalar_t> grad;
};

template <typename scalar_t>
StagedHead<scalar_t>& staged_head(int64_t elements) {
  thread_local StagedHead<scalar_t> staged;
  if (static_cast<int64_t>(staged.value.size()) < elements) {
    staged.value.resize(elements);
    staged.grad.resize(elements);
  }
  return staged;
}

// The backward of one (batch, head) slice works on contiguous copies of value[n, :, m, :] and of its gradient
// ([S, D]; the gradient copied out at the end). In place, a head's rows lie M * D elements apart (1 KiB in
// Mask2Former's encoder), so the L1 and L2 sets they map to are a small fraction of all and the random corner reads
// and scatters missed in L2; contiguous, the two copies (688 KiB each at 512x512) stay in L2. The same operations in
// the same order: the same bits.
template <typename scalar_t, int64_t kChannels>
void backward_kernel(const Sizes& z, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const scalar_t* locations, const scalar_t* weights, const scalar_t* grad_output,
                     scalar_t* grad_value, scalar_t* grad_locations, scalar_t* grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = kChannels > 0 ? kChannels : z.D;
  const int64_t row = z.M * D;  // stride of one spatial position in value and grad_value
  const int64_t grain = std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(1, z.Lq * z.L * z.P * 8 * D));
  at::parallel_for(0, z.N * z.M, grain, [&](int64_t begin, int64_t end) {
    StagedHead<scalar_t>& staged = staged_head<scalar_t>(z.S * D);
    scalar_t* __restrict__ head_value = staged.value.data();
    scalar_t* __restrict__ head_grad = staged.grad.data();
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / z.M;
      const int64_t m = nm % z.M;
      const scalar_t* value_head = value + (n * z.S * z.M + m) * D;
      scalar_t* grad_head = grad_value + (n * z.S * z.M + m) * D;
      for (int64_t pos = 0; pos < z.S; ++pos) {
        std::copy_n(value_head + pos * row, D, head_value + pos * D);
      }
      std::fill_n(head_grad, z.S * D, scalar_t(0));
      for (int64_t q = 0; q < z.Lq; ++q) {
        const scalar_t* top = grad_output + ((n * z.Lq + q) * z.M + m) * D;
        for (int64_t l = 0; l < z.L; ++l) {
          const int64_t H = shapes[2 * l];
          const int64_t W = shapes[2 * l + 1];
          const int64_t offset = starts[l] * D;
          for (int64_t p = 0; p < z.P; ++p) {
            const int64_t i = sample_index(n, q, m, l, p, z.Lq, z.M, z.L, z.P);
            BilinearSample<acc_t> s;
            if (!make_bilinear_sample<acc_t>(locations[2 * i], locations[2 * i + 1], H, W, s)) {
              continue;  // outside the map: zero output, zero gradients (already zero-initialised)
            }
            const acc_t w = weights[i];
            const SampleGrads<acc_t> grads = backward_sample(s, w, head_value + offset, head_grad + offset, D, D, top);
            store_sample_grads(grads, w, H, W, i, grad_locations, grad_weights);
          }
        }
      }
      for (int64_t pos = 0; pos < z.S; ++pos) {
        std::copy_n(head_grad + pos * D, D, grad_head + pos * row);
      }
    }
  });
}

}  // namespace

void forward(const Sizes& z, const at::Tensor& value, const at::Tensor& spatial_shapes,
             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
             const at::Tensor& attention_weights, const at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    dispatch_channels(z.D, [&](auto channels) {
      forward_kernel<scalar_t, channels()>(
          z, value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
          level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
          attention_weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>());
    });
  });
}

void backward(const Sizes& z, const at::Tensor& value, const at::Tensor& spatial_shapes,
              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
              const at::Tensor& attention_weights, const at::Tensor& grad_output, const at::Tensor& grad_value,
              const at::Tensor& grad_sampling_locations, const at::Tensor& grad_attention_weights) {
  // grad_value is zeroed by the kernel, slice by slice
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    dispatch_channels(z.D, [&](auto channels) {
      backward_kernel<scalar_t, channels()>(
          z, value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
          level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
          attention_weights.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
          grad_value.mutable_data_ptr<scalar_t>(), grad_sampling_locations.mutable_data_ptr<scalar_t>(),
          grad_attention_weights.mutable_data_ptr<scalar_t>());
    });
  });
}

}  // namespace dinat_m2f::msda::cpu
