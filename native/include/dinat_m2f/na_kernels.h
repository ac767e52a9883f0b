// Device kernels of the neighborhood-attention ops. The op entry points (native/na/na_ops.cpp) check the
// inputs and shape them as 2D problems (1D: H = 1) before calling these, so every kernel may assume: tokens
// [B, heads, H, W, D], weights [B, heads, H, W, kh * kw], contiguous bias [heads, 2 kh - 1, 2 kw - 1], contiguous
// logsumexp [BH, H, W] in the accumulation type (float64 for float64 inputs, float32 otherwise), outputs allocated.
// Token and weight tensors (inputs and outputs): the CPU kernels take any strides with a unit-stride last dim
// (dinat_m2f::na::Strides); the CUDA kernels get contiguous ones (generic strides on CUDA are future work).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "dinat_m2f/na_common.h"

namespace dinat_m2f::na {

#define DINAT_NA_DECLARE_KERNELS(ns)                                                                              \
  namespace ns {                                                                                                  \
  /* attn[i, n] = q_i . k_{N(i)_n} (+ rpb) */                                                                     \
  void qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& rpb, const at::Tensor& attn, \
          const Problem& p);                                                                                      \
  /* out_i = sum_n attn[i, n] v_{N(i)_n} */                                                                       \
  void av(const at::Tensor& attn, const at::Tensor& v, const at::Tensor& out, const Problem& p);                  \
  /* out_x = sum_{i : x in N(i)} weights[i, slot_i(x)] x_i (gradient of k in QK, of v in AV) */                   \
  void inverse(const at::Tensor& weights, const at::Tensor& x, const at::Tensor& out, const Problem& p);          \
  /* grad_rpb[h, a, b] = sum over batch and queries of grad_attn at the slots whose bias index is (a, b) */       \
  void rpb_grad(const at::Tensor& grad_attn, const at::Tensor& grad_rpb, const Problem& p);                       \
  /* out = softmax(scale q.k + rpb) v with online softmax; lse = row logsumexp of the logits */                   \
  void fused_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                               \
                     const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,          \
                     const Problem& p, double scale);                                                             \
  /* Gradients of fused_forward, recomputing the weights from q, k and lse. grad_rpb may be undefined. */         \
  void fused_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,  \
                      const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,         \
                      const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,               \
                      const at::Tensor& grad_rpb, const Problem& p, double scale);                                \
  }

// cpu::* pick one of the per-ISA variants at run time (native/na/na_cpu_dispatch.cpp, dinat_m2f/na_cpu_isa.h).
DINAT_NA_DECLARE_KERNELS(cpu)
DINAT_NA_DECLARE_KERNELS(cpu::avx2)
#if defined(__x86_64__)
DINAT_NA_DECLARE_KERNELS(cpu::avx512)
#endif
#if defined(DINAT_M2F_WITH_CUDA)
DINAT_NA_DECLARE_KERNELS(cuda)
#endif

#undef DINAT_NA_DECLARE_KERNELS

// CPU only: the fused ops that save the attention weights for the backward (training). CUDA keeps recomputing them
// (dinat_m2f/ops/na.py takes this path on the CPU only), so these have no CUDA kernels.
#define DINAT_NA_DECLARE_SAVED_ATTN_KERNELS(ns)                                                                    \
  namespace ns {                                                                                                   \
  /* fused_forward that also writes attn = the normalized weights [BH, H, W, kh * kw] in the accumulation type */  \
  void fused_forward_with_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                      \
                               const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse, \
                               const at::Tensor& attn, const Problem& p, double scale);                            \
  /* Gradients of fused_forward from the saved weights attn (no recomputed logits). grad_rpb may be undefined. */  \
  void fused_backward_with_attn(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,              \
                                const at::Tensor& v, const at::Tensor& out, const at::Tensor& attn,                \
                                const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,      \
                                const at::Tensor& grad_rpb, const Problem& p, double scale);                       \
  }

DINAT_NA_DECLARE_SAVED_ATTN_KERNELS(cpu)
DINAT_NA_DECLARE_SAVED_ATTN_KERNELS(cpu::avx2)
#if defined(__x86_64__)
DINAT_NA_DECLARE_SAVED_ATTN_KERNELS(cpu::avx512)
#endif

#undef DINAT_NA_DECLARE_SAVED_ATTN_KERNELS

// The kernels of one device; the op entry points (na_ops.h) run them after checking the inputs.
struct DeviceKernels {
  decltype(&cpu::qk) qk;
  decltype(&cpu::av) av;
  decltype(&cpu::inverse) inverse;
  decltype(&cpu::rpb_grad) rpb_grad;
  decltype(&cpu::fused_forward) fused_forward;
  decltype(&cpu::fused_backward) fused_backward;
};

inline constexpr DeviceKernels kCpuKernels{
    &cpu::qk, &cpu::av, &cpu::inverse, &cpu::rpb_grad, &cpu::fused_forward, &cpu::fused_backward};
struct SavedAttnKernels {
  decltype(&cpu::fused_forward_with_attn) fused_forward_with_attn;
  decltype(&cpu::fused_backward_with_attn) fused_backward_with_attn;
};

inline constexpr SavedAttnKernels kCpuSavedAttnKernels{&cpu::fused_forward_with_attn, &cpu::fused_backward_with_attn};
#if defined(DINAT_M2F_WITH_CUDA)
inline constexpr DeviceKernels kCudaKernels{
    &cuda::qk, &cuda::av, &cuda::inverse, &cuda::rpb_grad, &cuda::fused_forward, &cuda::fused_backward};
#endif

}  // namespace dinat_m2f::na
