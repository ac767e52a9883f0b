// Multi-scale deformable attention on the CPU (float32, float64).
//
// Forward: parallel over (batch, query); every output row is written by one task.
// Backward: parallel over (batch, head). The gradient of value scatters into value's [n, :, m, :] slice, which no
// other (batch, head) task touches, and the gradients of locations and weights are per sample: no races, no
// atomics, and a fixed summation order, so the result is deterministic for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "dinat_m2f/ms_deform_attn_common.h"
#include "dinat_m2f/ms_deform_attn_kernels.h"

namespace dinat_m2f::msda::cpu {

namespace {

template <typename scalar_t>
void forward_kernel(const Sizes& z, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* locations, const scalar_t* weights, scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = z.M * z.D;  // stride of one spatial position in value
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, z.M * z.L * z.P * z.D));
  at::parallel_for(0, z.N * z.Lq, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(z.D);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / z.Lq;
      const int64_t q = nq % z.Lq;
      for (int64_t m = 0; m < z.M; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t l = 0; l < z.L; ++l) {
          const int64_t H = shapes[2 * l];
          const int64_t W = shapes[2 * l + 1];
          const scalar_t* level = value + ((n * z.S + starts[l]) * z.M + m) * z.D;
          for (int64_t p = 0; p < z.P; ++p) {
            const int64_t i = sample_index(n, q, m, l, p, z.Lq, z.M, z.L, z.P);
            BilinearSample<acc_t> s;
            if (!make_bilinear_sample<acc_t>(locations[2 * i], locations[2 * i + 1], H, W, s)) {
              continue;
            }
            const acc_t w = weights[i];
            for (int c = 0; c < 4; ++c) {
              if (!s.valid[c]) {
                continue;
              }
              const acc_t coeff = w * s.weight[c];
              const scalar_t* v = level + s.pos[c] * row;
              for (int64_t d = 0; d < z.D; ++d) {
                acc[d] += coeff * static_cast<acc_t>(v[d]);
              }
            }
          }
        }
        scalar_t* out = output + (nq * z.M + m) * z.D;
        for (int64_t d = 0; d < z.D; ++d) {
          out[d] = static_cast<scalar_t>(acc[d]);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Sizes& z, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const scalar_t* locations, const scalar_t* weights, const scalar_t* grad_output,
                     scalar_t* grad_value, scalar_t* grad_locations, scalar_t* grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = z.M * z.D;
  at::parallel_for(0, z.N * z.M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / z.M;
      const int64_t m = nm % z.M;
      for (int64_t q = 0; q < z.Lq; ++q) {
        const scalar_t* top = grad_output + ((n * z.Lq + q) * z.M + m) * z.D;
        for (int64_t l = 0; l < z.L; ++l) {
          const int64_t H = shapes[2 * l];
          const int64_t W = shapes[2 * l + 1];
          const int64_t offset = ((n * z.S + starts[l]) * z.M + m) * z.D;
          const scalar_t* level = value + offset;
          scalar_t* grad_level = grad_value + offset;
          for (int64_t p = 0; p < z.P; ++p) {
            const int64_t i = sample_index(n, q, m, l, p, z.Lq, z.M, z.L, z.P);
            BilinearSample<acc_t> s;
            if (!make_bilinear_sample<acc_t>(locations[2 * i], locations[2 * i + 1], H, W, s)) {
              continue;  // outside the map: zero output, zero gradients (already zero-initialised)
            }
            const acc_t w = weights[i];
            SampleGrads<acc_t> grads;
            for (int64_t d = 0; d < z.D; ++d) {
              scalar_t* grad_level_d = grad_level + d;
              backward_sample_channel(
                  s, level + d, row, static_cast<acc_t>(top[d]), w, grads,
                  [&](int64_t corner, acc_t amount) { grad_level_d[corner] += static_cast<scalar_t>(amount); });
            }
            store_sample_grads(grads, w, H, W, i, grad_locations, grad_weights);
          }
        }
      }
    }
  });
}

}  // namespace

void forward(const Sizes& z, const at::Tensor& value, const at::Tensor& spatial_shapes,
             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
             const at::Tensor& attention_weights, const at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(z, value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
                             level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
                             attention_weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>());
  });
}

void backward(const Sizes& z, const at::Tensor& value, const at::Tensor& spatial_shapes,
              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
              const at::Tensor& attention_weights, const at::Tensor& grad_output, const at::Tensor& grad_value,
              const at::Tensor& grad_sampling_locations, const at::Tensor& grad_attention_weights) {
  grad_value.zero_();  // scattered into
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(
        z, value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
        level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
        attention_weights.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
        grad_value.mutable_data_ptr<scalar_t>(), grad_sampling_locations.mutable_data_ptr<scalar_t>(),
        grad_attention_weights.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace dinat_m2f::msda::cpu
