// Entry points of the multi-scale deformable attention ops, one code path for every device
// (native/msda/ms_deform_attn_ops.cpp): they check the inputs with clear messages, make them contiguous, allocate the
// outputs and run the kernels of the device they are registered for (native/cpu_registration.cpp,
// native/cuda_registration.cpp). Schemas: dinat_m2f/op_schemas.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "dinat_m2f/ms_deform_attn_kernels.h"

namespace dinat_m2f::msda {

// Checks ranks, sizes, dtypes and devices of the forward inputs (and of grad_output when given) and that the
// spatial shapes add up to S with consistent level start indices; raises c10::Error naming the offending argument.
// spatial_shapes and level_start_index are read on the host: given on the CPU (also for CUDA values) that costs
// nothing, given on CUDA it is a copy that waits for the device.
Sizes check_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights, const at::Tensor* grad_output = nullptr);

at::Tensor forward_op(const DeviceKernels& kernels, const at::Tensor& value, const at::Tensor& spatial_shapes,
                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                      const at::Tensor& attention_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const DeviceKernels& kernels, const at::Tensor& value,
                                                           const at::Tensor& spatial_shapes,
                                                           const at::Tensor& level_start_index,
                                                           const at::Tensor& sampling_locations,
                                                           const at::Tensor& attention_weights,
                                                           const at::Tensor& grad_output);

// The ops with the signatures of their schemas, running the kernels `kKernels`.
template <const DeviceKernels& kKernels>
struct Ops {
  static at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
    return forward_op(kKernels, value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
      const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
    return backward_op(kKernels, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                       grad_output);
  }
};

// Registers the multi-scale deformable attention ops for one dispatch key (call inside its TORCH_LIBRARY_IMPL).
template <const DeviceKernels& kKernels>
void register_ops(torch::Library& m) {
  m.impl("ms_deform_attn_forward", TORCH_FN(Ops<kKernels>::forward));
  m.impl("ms_deform_attn_backward", TORCH_FN(Ops<kKernels>::backward));
}

}  // namespace dinat_m2f::msda
