// Every operator of the torch.ops.dinat_m2f library, written out in full. native/registration.cpp defines them (the
// one TORCH_LIBRARY(dinat_m2f, ...) of the extension); the kernels are registered per device by
// native/cpu_registration.cpp and native/cuda_registration.cpp; fake kernels and autograd come from Python
// (dinat_m2f/ops/na.py, dinat_m2f/ops/ms_deform_attn.py).
#pragma once

#include <string_view>

namespace dinat_m2f {

inline constexpr const char* kOpSchemas[] = {
    // Neighborhood attention (native/na/). 1D tokens [B, heads, L, D], 2D tokens [B, heads, H, W, D].
    "na1d_qk(Tensor q, Tensor k, Tensor? rpb, int kernel_size, int dilation) -> Tensor",
    "na1d_av(Tensor attn, Tensor v, int kernel_size, int dilation) -> Tensor",
    "na1d_inverse(Tensor weights, Tensor x, int kernel_size, int dilation) -> Tensor",
    "na1d_rpb_grad(Tensor grad_attn, int kernel_size, int dilation) -> Tensor",
    "na1d_fused_forward(Tensor q, Tensor k, Tensor v, Tensor? rpb, int kernel_size, int dilation, float scale) "
    "-> (Tensor, Tensor)",
    "na1d_fused_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor out, Tensor lse, "
    "int kernel_size, int dilation, float scale) -> (Tensor, Tensor, Tensor, Tensor)",
    // The fused op on the packed qkv projection output [B, L, 3, heads, D]; the backward returns (grad_qkv, grad_rpb).
    "na1d_qkv_fused_forward(Tensor qkv, Tensor? rpb, int kernel_size, int dilation, float scale) -> (Tensor, Tensor)",
    "na1d_qkv_fused_backward(Tensor grad_out, Tensor qkv, Tensor? rpb, Tensor out, Tensor lse, int kernel_size, "
    "int dilation, float scale) -> (Tensor, Tensor)",
    // CPU only: the fused forward that also returns the weights (training), and the backward that reads them.
    "na1d_fused_forward_with_attn(Tensor q, Tensor k, Tensor v, Tensor? rpb, int kernel_size, int dilation, "
    "float scale) -> (Tensor, Tensor)",
    "na1d_fused_backward_with_attn(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor out, "
    "Tensor attn, int kernel_size, int dilation, float scale) -> (Tensor, Tensor, Tensor, Tensor)",
    // CPU only: the packed-qkv fused op that saves the weights; the backward returns (grad_qkv, grad_rpb).
    "na1d_qkv_fused_forward_with_attn(Tensor qkv, Tensor? rpb, int kernel_size, int dilation, float scale) "
    "-> (Tensor, Tensor)",
    "na1d_qkv_fused_backward_with_attn(Tensor grad_out, Tensor qkv, Tensor? rpb, Tensor out, Tensor attn, "
    "int kernel_size, int dilation, float scale) -> (Tensor, Tensor)",
    "na2d_qk(Tensor q, Tensor k, Tensor? rpb, int kernel_size, int dilation) -> Tensor",
    "na2d_av(Tensor attn, Tensor v, int kernel_size, int dilation) -> Tensor",
    "na2d_inverse(Tensor weights, Tensor x, int kernel_size, int dilation) -> Tensor",
    "na2d_rpb_grad(Tensor grad_attn, int kernel_size, int dilation) -> Tensor",
    "na2d_fused_forward(Tensor q, Tensor k, Tensor v, Tensor? rpb, int kernel_size, int dilation, float scale) "
    "-> (Tensor, Tensor)",
    "na2d_fused_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor out, Tensor lse, "
    "int kernel_size, int dilation, float scale) -> (Tensor, Tensor, Tensor, Tensor)",
    // The fused op on the packed qkv projection output [B, H, W, 3, heads, D]; the backward returns (grad_qkv,
    // grad_rpb).
    "na2d_qkv_fused_forward(Tensor qkv, Tensor? rpb, int kernel_size, int dilation, float scale) -> (Tensor, Tensor)",
    "na2d_qkv_fused_backward(Tensor grad_out, Tensor qkv, Tensor? rpb, Tensor out, Tensor lse, int kernel_size, "
    "int dilation, float scale) -> (Tensor, Tensor)",
    // CPU only: the fused forward that also returns the weights (training), and the backward that reads them.
    "na2d_fused_forward_with_attn(Tensor q, Tensor k, Tensor v, Tensor? rpb, int kernel_size, int dilation, "
    "float scale) -> (Tensor, Tensor)",
    "na2d_fused_backward_with_attn(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor out, "
    "Tensor attn, int kernel_size, int dilation, float scale) -> (Tensor, Tensor, Tensor, Tensor)",
    // CPU only: the packed-qkv fused op that saves the weights; the backward returns (grad_qkv, grad_rpb).
    "na2d_qkv_fused_forward_with_attn(Tensor qkv, Tensor? rpb, int kernel_size, int dilation, float scale) "
    "-> (Tensor, Tensor)",
    "na2d_qkv_fused_backward_with_attn(Tensor grad_out, Tensor qkv, Tensor? rpb, Tensor out, Tensor attn, "
    "int kernel_size, int dilation, float scale) -> (Tensor, Tensor)",
    // Multi-scale deformable attention (native/msda/).
    "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
    "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)",
};

// The ops with CPU kernels only (the saved-weights training path); a CUDA build registers a clear error for them.
inline constexpr const char* kCpuOnlyOps[] = {
    "na1d_fused_forward_with_attn",     "na1d_fused_backward_with_attn",     "na2d_fused_forward_with_attn",
    "na2d_fused_backward_with_attn",    "na1d_qkv_fused_forward_with_attn",  "na1d_qkv_fused_backward_with_attn",
    "na2d_qkv_fused_forward_with_attn", "na2d_qkv_fused_backward_with_attn",
};

// The operator name of a schema: what precedes the argument list.
constexpr std::string_view op_name(std::string_view schema) { return schema.substr(0, schema.find('(')); }

}  // namespace dinat_m2f
