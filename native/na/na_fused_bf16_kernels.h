// Entry points of the bf16 fused forward (and backward from saved weights) of each CPU variant
// (native/na/na_fused_bf16_cpu_isa.h); na_cpu_dispatch.cpp picks one for bfloat16 inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "dinat_m2f/na_common.h"

#define DINAT_NA_DECLARE_BF16_FORWARD(ns)                                                                       \
  namespace ns {                                                                                                \
  /* fused_forward of bf16 q, k, v, rpb into bf16 out and float32 lse; saves the float32 weights into attn when \
     attn is defined (fused_forward_with_attn) */                                                               \
  void fused_forward_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                        \
                          const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,   \
                          const at::Tensor& attn, const Problem& p, double scale);                              \
  }

// The query pass of the bf16 fused_backward_with_attn for slices [s0, s1) (dS into ds, the float32 workspace whose
// rows start at slice s0; dQ), of each variant: the AVX512_BF16 one takes dO . v with vdpbf16ps.
#define DINAT_NA_DECLARE_BF16_BACKWARD_QUERY_PASS(ns)                                                          \
  namespace ns {                                                                                               \
  void fused_backward_query_pass_bf16(const at::Tensor& grad_out, const at::Tensor& k, const at::Tensor& v,    \
                                      const at::Tensor& out, const at::Tensor& attn, const at::Tensor& grad_q, \
                                      float* ds, int64_t s0, int64_t s1, const Problem& p, double scale);      \
  }

namespace dinat_m2f::na::cpu {
using Bf16BackwardQueryPass = void (*)(const at::Tensor& grad_out, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& out, const at::Tensor& attn, const at::Tensor& grad_q,
                                       float* ds, int64_t s0, int64_t s1, const Problem& p, double scale);
}  // namespace dinat_m2f::na::cpu

// The bf16 fused_backward_with_attn (float32 attn and grad_rpb) of the AVX2 and AVX-512 variants, with the query pass
// of the selected one (query_pass).
#define DINAT_NA_DECLARE_BF16_BACKWARD(ns)                                                                         \
  namespace ns {                                                                                                   \
  void fused_backward_with_attn_bf16(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,         \
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& attn,           \
                                     const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v, \
                                     const at::Tensor& grad_rpb, const Problem& p, double scale,                   \
                                     Bf16BackwardQueryPass query_pass);                                            \
  }

namespace dinat_m2f::na::cpu {
DINAT_NA_DECLARE_BF16_FORWARD(avx2)
#if defined(__x86_64__)
DINAT_NA_DECLARE_BF16_FORWARD(avx512)
DINAT_NA_DECLARE_BF16_FORWARD(avx512::bf16_dot)
#endif
DINAT_NA_DECLARE_BF16_BACKWARD_QUERY_PASS(avx2)
#if defined(__x86_64__)
DINAT_NA_DECLARE_BF16_BACKWARD_QUERY_PASS(avx512)
DINAT_NA_DECLARE_BF16_BACKWARD_QUERY_PASS(avx512::bf16_dot)
#endif
DINAT_NA_DECLARE_BF16_BACKWARD(avx2)
#if defined(__x86_64__)
DINAT_NA_DECLARE_BF16_BACKWARD(avx512)
#endif
}  // namespace dinat_m2f::na::cpu

#undef DINAT_NA_DECLARE_BF16_FORWARD
#undef DINAT_NA_DECLARE_BF16_BACKWARD
#undef DINAT_NA_DECLARE_BF16_BACKWARD_QUERY_PASS
