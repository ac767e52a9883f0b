// Multi-scale deformable attention: input validation shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dinat_m2f::msda {

struct Sizes {
  int64_t N;   // batch
  int64_t S;   // flattened spatial size of all levels
  int64_t M;   // heads
  int64_t D;   // channels per head
  int64_t Lq;  // queries
  int64_t L;   // levels
  int64_t P;   // points per level
};

// Checks ranks, sizes, dtypes and devices of the forward inputs (and of grad_output when given) and that the
// spatial shapes add up to S with consistent level start indices. Raises c10::Error with a message naming the
// offending argument. `op` names the op in messages.
Sizes check_inputs(
    const char* op,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor* grad_output = nullptr);

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

}  // namespace dinat_m2f::msda
