// Multi-scale deformable attention on CUDA (float32, float64, float16, bfloat16; accumulation in float or double).
//
// Forward: one thread per output element (n, q, m, d); a warp reads D consecutive channels of each corner.
// Backward: one warp per sample (n, q, m, l, p); lanes stride over the D channels, reduce the gradients of the
// sample's location and weight with warp shuffles, and scatter the gradient of value with atomicAdd into an
// opmath (float/double) buffer that is cast to the input dtype at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dinat_m2f/cuda_launch.cuh"
#include "dinat_m2f/ms_deform_attn_common.h"
#include "dinat_m2f/ms_deform_attn_kernels.h"

namespace dinat_m2f::msda::cuda {

namespace {

using cuda_launch::device_filling_blocks;
using cuda_launch::kThreads;
using cuda_launch::kWarp;
using cuda_launch::warp_sum;

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(Sizes z, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights, scalar_t* __restrict__ output) {
  const int64_t total = z.N * z.Lq * z.M * z.D;
  const int64_t row = z.M * z.D;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = idx % z.D;
    const int64_t m = (idx / z.D) % z.M;
    const int64_t q = (idx / row) % z.Lq;
    const int64_t n = idx / (row * z.Lq);
    acc_t acc = 0;
    for (int64_t l = 0; l < z.L; ++l) {
      const int64_t H = shapes[2 * l];
      const int64_t W = shapes[2 * l + 1];
      const scalar_t* level = value + ((n * z.S + starts[l]) * z.M + m) * z.D + d;
      for (int64_t p = 0; p < z.P; ++p) {
        const int64_t i = sample_index(n, q, m, l, p, z.Lq, z.M, z.L, z.P);
        BilinearSample<acc_t> s;
        if (!make_bilinear_sample<acc_t>(static_cast<acc_t>(locations[2 * i]), static_cast<acc_t>(locations[2 * i + 1]),
                                         H, W, s)) {
          continue;
        }
        const acc_t w = static_cast<acc_t>(weights[i]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (s.valid[c]) {
            acc += w * s.weight[c] * static_cast<acc_t>(level[s.pos[c] * row]);
          }
        }
      }
    }
    output[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(Sizes z, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                                const scalar_t* __restrict__ weights, const scalar_t* __restrict__ grad_output,
                                acc_t* __restrict__ grad_value, scalar_t* __restrict__ grad_locations,
                                scalar_t* __restrict__ grad_weights) {
  const int64_t samples = z.N * z.Lq * z.M * z.L * z.P;
  const int64_t row = z.M * z.D;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = int64_t(gridDim.x) * (blockDim.x / kWarp);
  // The loop bound is uniform across the warp, so every lane takes part in the shuffles.
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; i < samples; i += warps_per_grid) {
    const int64_t l = (i / z.P) % z.L;
    const int64_t m = (i / (z.P * z.L)) % z.M;
    const int64_t q = (i / (z.P * z.L * z.M)) % z.Lq;
    const int64_t n = i / (z.P * z.L * z.M * z.Lq);
    const int64_t H = shapes[2 * l];
    const int64_t W = shapes[2 * l + 1];
    BilinearSample<acc_t> s;
    if (!make_bilinear_sample<acc_t>(static_cast<acc_t>(locations[2 * i]), static_cast<acc_t>(locations[2 * i + 1]), H,
                                     W, s)) {
      continue;  // uniform across the warp; the gradients stay zero
    }
    const acc_t w = static_cast<acc_t>(weights[i]);
    const int64_t offset = ((n * z.S + starts[l]) * z.M + m) * z.D;
    const scalar_t* top = grad_output + ((n * z.Lq + q) * z.M + m) * z.D;
    SampleGrads<acc_t> grads;
    for (int64_t d = lane; d < z.D; d += kWarp) {
      acc_t* grad_value_d = grad_value + offset + d;
      backward_sample_channel(s, value + offset + d, row, static_cast<acc_t>(top[d]), w, grads,
                              [=](int64_t corner, acc_t amount) { atomicAdd(grad_value_d + corner, amount); });
    }
    grads.weight = warp_sum(grads.weight);
    grads.h_im = warp_sum(grads.h_im);
    grads.w_im = warp_sum(grads.w_im);
    if (lane == 0) {
      store_sample_grads(grads, w, H, W, i, grad_locations, grad_weights);
    }
  }
}

}  // namespace

void forward(const Sizes& z, const at::Tensor& value, const at::Tensor& spatial_shapes,
             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
             const at::Tensor& attention_weights, const at::Tensor& output) {
  const int64_t total = output.numel();
  if (total == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(value.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<device_filling_blocks(total), kThreads, 0, stream>>>(
        z, value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
        level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
        attention_weights.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward(const Sizes& z, const at::Tensor& value, const at::Tensor& spatial_shapes,
              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
              const at::Tensor& attention_weights, const at::Tensor& grad_output, const at::Tensor& grad_value,
              const at::Tensor& grad_sampling_locations, const at::Tensor& grad_attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  // value's gradient is scattered with atomicAdd into an opmath (float/double) buffer, cast to value's dtype at the
  // end.
  const auto opmath = at::toOpMathType(value.scalar_type());
  const at::Tensor grad_value_acc =
      opmath == value.scalar_type() ? grad_value.zero_() : at::zeros(value.sizes(), value.options().dtype(opmath));
  const int64_t samples = attention_weights.numel();
  if (samples == 0 || z.D == 0) {
    grad_value.zero_();
    return;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, acc_t><<<device_filling_blocks(samples * kWarp), kThreads, 0, stream>>>(
        z, value.const_data_ptr<scalar_t>(), spatial_shapes.const_data_ptr<int64_t>(),
        level_start_index.const_data_ptr<int64_t>(), sampling_locations.const_data_ptr<scalar_t>(),
        attention_weights.const_data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
        grad_value_acc.mutable_data_ptr<acc_t>(), grad_sampling_locations.mutable_data_ptr<scalar_t>(),
        grad_attention_weights.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!grad_value_acc.is_same(grad_value)) {
    grad_value.copy_(grad_value_acc);
  }
}

}  // namespace dinat_m2f::msda::cuda
