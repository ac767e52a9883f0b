// Device kernels of multi-scale deformable attention. The op entry points (dinat_m2f/ms_deform_attn_ops.h) check the
// inputs before calling these, so every kernel may assume: contiguous tensors with the layouts of
// ms_deform_attn_common.h, consistent sizes `z`, spatial_shapes and level_start_index on value's device, outputs
// allocated; the backward's grad_sampling_locations and grad_attention_weights zero-filled, grad_value uninitialised
// (the CUDA kernel accumulates it in a float buffer when value is half precision).
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

#define DINAT_MSDA_DECLARE_KERNELS(ns)                                                                            \
  namespace ns {                                                                                                  \
  /* output[n, q, m * D + d] = sum over levels and points of weight * bilinear sample of value */                 \
  void forward(const Sizes& z, const at::Tensor& value, const at::Tensor& spatial_shapes,                         \
               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,                         \
               const at::Tensor& attention_weights, const at::Tensor& output);                                    \
  /* Gradients of forward given grad_output. */                                                                   \
  void backward(const Sizes& z, const at::Tensor& value, const at::Tensor& spatial_shapes,                        \
                const at::Tensor& level_start_index, const at::Tensor& sampling_locations,                        \
                const at::Tensor& attention_weights, const at::Tensor& grad_output, const at::Tensor& grad_value, \
                const at::Tensor& grad_sampling_locations, const at::Tensor& grad_attention_weights);             \
  }

DINAT_MSDA_DECLARE_KERNELS(cpu)
#if defined(DINAT_M2F_WITH_CUDA)
DINAT_MSDA_DECLARE_KERNELS(cuda)
#endif

#undef DINAT_MSDA_DECLARE_KERNELS

// The kernels of one device; the op entry points run them after checking the inputs.
struct DeviceKernels {
  decltype(&cpu::forward) forward;
  decltype(&cpu::backward) backward;
};

inline constexpr DeviceKernels kCpuKernels{&cpu::forward, &cpu::backward};
#if defined(DINAT_M2F_WITH_CUDA)
inline constexpr DeviceKernels kCudaKernels{&cuda::forward, &cuda::backward};
#endif

}  // namespace dinat_m2f::msda
