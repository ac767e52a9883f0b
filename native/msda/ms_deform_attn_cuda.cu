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
#include <cuda_runtime.h>
#include <torch/library.h>

#include "dinat_m2f/ms_deform_attn_common.h"
#include "ms_deform_attn.h"

namespace dinat_m2f::msda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Grid size for a grid-stride loop: enough blocks to fill the device, no more than needed.
int64_t blocks_for(int64_t threads_needed) {
  int device = 0;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t max_blocks = int64_t(sm_count) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, max_blocks));
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(
    Sizes z,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ locations,
    const scalar_t* __restrict__ weights,
    scalar_t* __restrict__ output) {
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
        if (!make_bilinear_sample<acc_t>(
                static_cast<acc_t>(locations[2 * i]), static_cast<acc_t>(locations[2 * i + 1]), H, W, s)) {
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

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(
    Sizes z,
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ locations,
    const scalar_t* __restrict__ weights,
    const scalar_t* __restrict__ grad_output,
    acc_t* __restrict__ grad_value,
    scalar_t* __restrict__ grad_locations,
    scalar_t* __restrict__ grad_weights) {
  const int64_t samples = z.N * z.Lq * z.M * z.L * z.P;
  const int64_t row = z.M * z.D;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = int64_t(gridDim.x) * (blockDim.x / kWarp);
  // The loop bound is uniform across the warp, so every lane takes part in the shuffles.
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; i < samples; i += warps_per_grid) {
    const int64_t p = i % z.P;
    const int64_t l = (i / z.P) % z.L;
    const int64_t m = (i / (z.P * z.L)) % z.M;
    const int64_t q = (i / (z.P * z.L * z.M)) % z.Lq;
    const int64_t n = i / (z.P * z.L * z.M * z.Lq);
    const int64_t H = shapes[2 * l];
    const int64_t W = shapes[2 * l + 1];
    BilinearSample<acc_t> s;
    if (!make_bilinear_sample<acc_t>(
            static_cast<acc_t>(locations[2 * i]), static_cast<acc_t>(locations[2 * i + 1]), H, W, s)) {
      continue;  // uniform across the warp; the gradients stay zero
    }
    const acc_t w = static_cast<acc_t>(weights[i]);
    const int64_t offset = ((n * z.S + starts[l]) * z.M + m) * z.D;
    const scalar_t* top = grad_output + ((n * z.Lq + q) * z.M + m) * z.D;
    acc_t grad_w = 0, grad_h_im = 0, grad_w_im = 0;
    for (int64_t d = lane; d < z.D; d += kWarp) {
      acc_t v[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        v[c] = s.valid[c] ? static_cast<acc_t>(value[offset + s.pos[c] * row + d]) : acc_t(0);
      }
      acc_t sample, d_h, d_w;
      bilinear_value_and_grad(s, v, sample, d_h, d_w);
      const acc_t g = static_cast<acc_t>(top[d]);
      grad_w += g * sample;
      grad_h_im += g * d_h;
      grad_w_im += g * d_w;
      const acc_t gw = g * w;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (s.valid[c]) {
          atomicAdd(grad_value + offset + s.pos[c] * row + d, gw * s.weight[c]);
        }
      }
    }
    grad_w = warp_sum(grad_w);
    grad_h_im = warp_sum(grad_h_im);
    grad_w_im = warp_sum(grad_w_im);
    if (lane == 0) {
      grad_weights[i] = static_cast<scalar_t>(grad_w);
      grad_locations[2 * i] = static_cast<scalar_t>(w * grad_w_im * static_cast<acc_t>(W));
      grad_locations[2 * i + 1] = static_cast<scalar_t>(w * grad_h_im * static_cast<acc_t>(H));
    }
  }
}

void check_cuda(const char* op, const at::Tensor& value) {
  TORCH_CHECK(value.is_cuda(), op, ": the CUDA kernel got a tensor on ", value.device());
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  constexpr const char* op = "ms_deform_attn_forward";
  check_cuda(op, value);
  const Sizes z = check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor v = value.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  at::Tensor output = at::empty({z.N, z.Lq, z.M * z.D}, value.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        z, v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  constexpr const char* op = "ms_deform_attn_backward";
  check_cuda(op, value);
  const Sizes z =
      check_inputs(op, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, &grad_output);
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor v = value.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  const at::Tensor grad = grad_output.contiguous();
  at::Tensor grad_loc = at::zeros_like(loc);
  at::Tensor grad_attn = at::zeros_like(attn);
  const auto opmath = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(v.sizes(), v.options().dtype(opmath));
  const int64_t samples = attn.numel();
  if (samples > 0 && z.D > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t, acc_t><<<blocks_for(samples * kWarp), kThreads, 0, stream>>>(
              z, v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
              loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
              grad_value_acc.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
              grad_attn.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace dinat_m2f::msda

TORCH_LIBRARY_IMPL(dinat_m2f, CUDA, m) {
  m.impl("ms_deform_attn_forward", &dinat_m2f::msda::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &dinat_m2f::msda::ms_deform_attn_backward_cuda);
}
