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
#include <torch/library.h>

#include <vector>

#include "dinat_m2f/ms_deform_attn_common.h"
#include "ms_deform_attn.h"

namespace dinat_m2f::msda {

namespace {

template <typename scalar_t>
void forward_kernel(
    const Sizes& z,
    const scalar_t* value,
    const int64_t* shapes,
    const int64_t* starts,
    const scalar_t* locations,
    const scalar_t* weights,
    scalar_t* output) {
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
void backward_kernel(
    const Sizes& z,
    const scalar_t* value,
    const int64_t* shapes,
    const int64_t* starts,
    const scalar_t* locations,
    const scalar_t* weights,
    const scalar_t* grad_output,
    scalar_t* grad_value,
    scalar_t* grad_locations,
    scalar_t* grad_weights) {
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
            acc_t grad_w = 0, grad_h_im = 0, grad_w_im = 0;
            for (int64_t d = 0; d < z.D; ++d) {
              acc_t v[4];
              for (int c = 0; c < 4; ++c) {
                v[c] = s.valid[c] ? static_cast<acc_t>(level[s.pos[c] * row + d]) : acc_t(0);
              }
              acc_t sample, d_h, d_w;
              bilinear_value_and_grad(s, v, sample, d_h, d_w);
              const acc_t g = static_cast<acc_t>(top[d]);
              grad_w += g * sample;
              grad_h_im += g * d_h;
              grad_w_im += g * d_w;
              const acc_t gw = g * w;
              for (int c = 0; c < 4; ++c) {
                if (s.valid[c]) {
                  grad_level[s.pos[c] * row + d] += static_cast<scalar_t>(gw * s.weight[c]);
                }
              }
            }
            grad_weights[i] = static_cast<scalar_t>(grad_w);
            grad_locations[2 * i] = static_cast<scalar_t>(w * grad_w_im * static_cast<acc_t>(W));
            grad_locations[2 * i + 1] = static_cast<scalar_t>(w * grad_h_im * static_cast<acc_t>(H));
          }
        }
      }
    }
  });
}

void check_cpu(const char* op, const at::Tensor& value) {
  TORCH_CHECK(value.device().is_cpu(), op, ": the CPU kernel got a tensor on ", value.device());
  TORCH_CHECK(
      value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
      op, ": the CPU kernel supports float32 and float64, got ", value.scalar_type(),
      " (under autocast, run the deformable attention in float32)");
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  constexpr const char* op = "ms_deform_attn_forward";
  const Sizes z = check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_cpu(op, value);
  const at::Tensor v = value.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  at::Tensor output = at::empty({z.N, z.Lq, z.M * z.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(
        z, v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>());
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  constexpr const char* op = "ms_deform_attn_backward";
  const Sizes z =
      check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, &grad_output);
  check_cpu(op, value);
  const at::Tensor v = value.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  const at::Tensor grad = grad_output.contiguous();
  at::Tensor grad_value = at::zeros_like(v);
  at::Tensor grad_loc = at::zeros_like(loc);
  at::Tensor grad_attn = at::zeros_like(attn);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(
        z, v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        grad_value.mutable_data_ptr<scalar_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
        grad_attn.mutable_data_ptr<scalar_t>());
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace dinat_m2f::msda

TORCH_LIBRARY_IMPL(dinat_m2f, CPU, m) {
  m.impl("ms_deform_attn_forward", &dinat_m2f::msda::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &dinat_m2f::msda::ms_deform_attn_backward_cpu);
}
