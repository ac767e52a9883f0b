// Entry points of the neighborhood-attention ops, one code path for every device (native/na/na_ops.cpp): they check
// the inputs with clear messages, give the kernels the layouts they read (strided views on the CPU, see na_ops.cpp),
// shape 1D problems as 2D ones with a single row, allocate the outputs and run the kernels of the device they are
// registered for (native/cpu_registration.cpp,
// native/cuda_registration.cpp). Schemas: dinat_m2f/op_schemas.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "dinat_m2f/na_kernels.h"

namespace dinat_m2f::na {

// One call: the op's name (for messages), 1D or 2D, kernel size and dilation.
struct Call {
  const char* op;
  int dims;  // 1 or 2
  int64_t kernel_size;
  int64_t dilation;
};

at::Tensor qk_op(const DeviceKernels& kernels, const Call& c, const at::Tensor& q, const at::Tensor& k,
                 const std::optional<at::Tensor>& rpb);
at::Tensor av_op(const DeviceKernels& kernels, const Call& c, const at::Tensor& attn, const at::Tensor& v);
at::Tensor inverse_op(const DeviceKernels& kernels, const Call& c, const at::Tensor& weights, const at::Tensor& x);
at::Tensor rpb_grad_op(const DeviceKernels& kernels, const Call& c, const at::Tensor& grad_attn);
std::tuple<at::Tensor, at::Tensor> fused_forward_op(const DeviceKernels& kernels, const Call& c, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& rpb, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_op(
    const DeviceKernels& kernels, const Call& c, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,
    double scale);
// The fused op on the packed qkv projection output ([B, H, W, 3, heads, D]; 1D: [B, L, 3, heads, D]): q, k, v are
// read in place, and the backward writes dQ, dK, dV into one buffer of qkv's shape (the gradient of the projection).
std::tuple<at::Tensor, at::Tensor> qkv_fused_forward_op(const DeviceKernels& kernels, const Call& c,
                                                        const at::Tensor& qkv, const std::optional<at::Tensor>& rpb,
                                                        double scale);
std::tuple<at::Tensor, at::Tensor> qkv_fused_backward_op(const DeviceKernels& kernels, const Call& c,
                                                         const at::Tensor& grad_out, const at::Tensor& qkv,
                                                         const std::optional<at::Tensor>& rpb, const at::Tensor& out,
                                                         const at::Tensor& lse, double scale);
// CPU only (training): the fused forward that also returns the weights, and the backward that reads them.
std::tuple<at::Tensor, at::Tensor> fused_forward_with_attn_op(const SavedAttnKernels& kernels, const Call& c,
                                                              const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const std::optional<at::Tensor>& rpb,
                                                              double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_with_attn_op(
    const SavedAttnKernels& kernels, const Call& c, const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb, const at::Tensor& out,
    const at::Tensor& attn, double scale);
std::tuple<at::Tensor, at::Tensor> qkv_fused_forward_with_attn_op(const SavedAttnKernels& kernels, const Call& c,
                                                                  const at::Tensor& qkv,
                                                                  const std::optional<at::Tensor>& rpb, double scale);
std::tuple<at::Tensor, at::Tensor> qkv_fused_backward_with_attn_op(const SavedAttnKernels& kernels, const Call& c,
                                                                   const at::Tensor& grad_out, const at::Tensor& qkv,
                                                                   const std::optional<at::Tensor>& rpb,
                                                                   const at::Tensor& out, const at::Tensor& attn,
                                                                   double scale);

// The ops of one dimensionality with the signatures of their schemas, running the kernels `kKernels`.
template <int kDims, const DeviceKernels& kKernels>
struct Ops {
  static constexpr bool k2d = kDims == 2;

  static at::Tensor qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& rpb,
                       int64_t kernel_size, int64_t dilation) {
    return qk_op(kKernels, {k2d ? "na2d_qk" : "na1d_qk", kDims, kernel_size, dilation}, q, k, rpb);
  }
  static at::Tensor av(const at::Tensor& attn, const at::Tensor& v, int64_t kernel_size, int64_t dilation) {
    return av_op(kKernels, {k2d ? "na2d_av" : "na1d_av", kDims, kernel_size, dilation}, attn, v);
  }
  static at::Tensor inverse(const at::Tensor& weights, const at::Tensor& x, int64_t kernel_size, int64_t dilation) {
    return inverse_op(kKernels, {k2d ? "na2d_inverse" : "na1d_inverse", kDims, kernel_size, dilation}, weights, x);
  }
  static at::Tensor rpb_grad(const at::Tensor& grad_attn, int64_t kernel_size, int64_t dilation) {
    return rpb_grad_op(kKernels, {k2d ? "na2d_rpb_grad" : "na1d_rpb_grad", kDims, kernel_size, dilation}, grad_attn);
  }
  // Named after the public op (na1d / na2d): its messages are the ones users see.
  static std::tuple<at::Tensor, at::Tensor> fused_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                          const std::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                          int64_t dilation, double scale) {
    return fused_forward_op(kKernels, {k2d ? "na2d" : "na1d", kDims, kernel_size, dilation}, q, k, v, rpb, scale);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse, int64_t kernel_size,
      int64_t dilation, double scale) {
    return fused_backward_op(kKernels,
                             {k2d ? "na2d_fused_backward" : "na1d_fused_backward", kDims, kernel_size, dilation},
                             grad_out, q, k, v, rpb, out, lse, scale);
  }
  static std::tuple<at::Tensor, at::Tensor> qkv_fused_forward(const at::Tensor& qkv,
                                                              const std::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                              int64_t dilation, double scale) {
    return qkv_fused_forward_op(kKernels, {k2d ? "na2d_qkv" : "na1d_qkv", kDims, kernel_size, dilation}, qkv, rpb,
                                scale);
  }
  static std::tuple<at::Tensor, at::Tensor> qkv_fused_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                               const std::optional<at::Tensor>& rpb,
                                                               const at::Tensor& out, const at::Tensor& lse,
                                                               int64_t kernel_size, int64_t dilation, double scale) {
    return qkv_fused_backward_op(
        kKernels, {k2d ? "na2d_qkv_fused_backward" : "na1d_qkv_fused_backward", kDims, kernel_size, dilation}, grad_out,
        qkv, rpb, out, lse, scale);
  }
};

// Registers the neighborhood-attention ops for one dispatch key (call inside its TORCH_LIBRARY_IMPL block).
template <const DeviceKernels& kKernels>
void register_ops(torch::Library& m) {
  using Ops1d = Ops<1, kKernels>;
  using Ops2d = Ops<2, kKernels>;
  m.impl("na1d_qk", TORCH_FN(Ops1d::qk));
  m.impl("na1d_av", TORCH_FN(Ops1d::av));
  m.impl("na1d_inverse", TORCH_FN(Ops1d::inverse));
  m.impl("na1d_rpb_grad", TORCH_FN(Ops1d::rpb_grad));
  m.impl("na1d_fused_forward", TORCH_FN(Ops1d::fused_forward));
  m.impl("na1d_fused_backward", TORCH_FN(Ops1d::fused_backward));
  m.impl("na1d_qkv_fused_forward", TORCH_FN(Ops1d::qkv_fused_forward));
  m.impl("na1d_qkv_fused_backward", TORCH_FN(Ops1d::qkv_fused_backward));
  m.impl("na2d_qk", TORCH_FN(Ops2d::qk));
  m.impl("na2d_av", TORCH_FN(Ops2d::av));
  m.impl("na2d_inverse", TORCH_FN(Ops2d::inverse));
  m.impl("na2d_rpb_grad", TORCH_FN(Ops2d::rpb_grad));
  m.impl("na2d_fused_forward", TORCH_FN(Ops2d::fused_forward));
  m.impl("na2d_fused_backward", TORCH_FN(Ops2d::fused_backward));
  m.impl("na2d_qkv_fused_forward", TORCH_FN(Ops2d::qkv_fused_forward));
  m.impl("na2d_qkv_fused_backward", TORCH_FN(Ops2d::qkv_fused_backward));
}

// The saved-weights ops of one dimensionality (schemas na1d_fused_*_with_attn, na2d_fused_*_with_attn).
template <int kDims, const SavedAttnKernels& kKernels>
struct SavedAttnOps {
  static constexpr bool k2d = kDims == 2;

  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& rpb, int64_t kernel_size,
                                                    int64_t dilation, double scale) {
    return fused_forward_with_attn_op(kKernels, {k2d ? "na2d" : "na1d", kDims, kernel_size, dilation}, q, k, v, rpb,
                                      scale);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& attn, int64_t kernel_size,
      int64_t dilation, double scale) {
    return fused_backward_with_attn_op(
        kKernels,
        {k2d ? "na2d_fused_backward_with_attn" : "na1d_fused_backward_with_attn", kDims, kernel_size, dilation},
        grad_out, q, k, v, rpb, out, attn, scale);
  }
  static std::tuple<at::Tensor, at::Tensor> qkv_forward(const at::Tensor& qkv, const std::optional<at::Tensor>& rpb,
                                                        int64_t kernel_size, int64_t dilation, double scale) {
    return qkv_fused_forward_with_attn_op(kKernels, {k2d ? "na2d_qkv" : "na1d_qkv", kDims, kernel_size, dilation}, qkv,
                                          rpb, scale);
  }
  static std::tuple<at::Tensor, at::Tensor> qkv_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                         const std::optional<at::Tensor>& rpb, const at::Tensor& out,
                                                         const at::Tensor& attn, int64_t kernel_size, int64_t dilation,
                                                         double scale) {
    return qkv_fused_backward_with_attn_op(
        kKernels,
        {k2d ? "na2d_qkv_fused_backward_with_attn" : "na1d_qkv_fused_backward_with_attn", kDims, kernel_size, dilation},
        grad_out, qkv, rpb, out, attn, scale);
  }
};

// Registers the saved-weights ops (CPU only; call inside its TORCH_LIBRARY_IMPL block).
template <const SavedAttnKernels& kKernels>
void register_saved_attn_ops(torch::Library& m) {
  m.impl("na1d_fused_forward_with_attn", TORCH_FN((SavedAttnOps<1, kKernels>::forward)));
  m.impl("na1d_fused_backward_with_attn", TORCH_FN((SavedAttnOps<1, kKernels>::backward)));
  m.impl("na2d_fused_forward_with_attn", TORCH_FN((SavedAttnOps<2, kKernels>::forward)));
  m.impl("na2d_fused_backward_with_attn", TORCH_FN((SavedAttnOps<2, kKernels>::backward)));
  m.impl("na1d_qkv_fused_forward_with_attn", TORCH_FN((SavedAttnOps<1, kKernels>::qkv_forward)));
  m.impl("na1d_qkv_fused_backward_with_attn", TORCH_FN((SavedAttnOps<1, kKernels>::qkv_backward)));
  m.impl("na2d_qkv_fused_forward_with_attn", TORCH_FN((SavedAttnOps<2, kKernels>::qkv_forward)));
  m.impl("na2d_qkv_fused_backward_with_attn", TORCH_FN((SavedAttnOps<2, kKernels>::qkv_backward)));
}

}  // namespace dinat_m2f::na
