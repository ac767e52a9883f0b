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
// Whether the bf16 forward on the AVX512_BF16 path hands p to the AVX-512 variant's (float32's rows on widened slices,
// na_fused_bf16_cpu_isa.h) instead of its vdpbf16ps row blocks: in inference (saving the weights it keeps them; not
// measured against the widened slices on an AVX512_BF16 machine), maps that are not whole groups where the row blocks
// would take no 16-query interior tile, or (k >= 9 along W, no dilation) a partial one of at most half its lanes, the
// other queries one at a time with vdpbf16ps dots and horizontal sums. Measured (one thread, EPYC Zen4), forward ms
// row blocks / widened: 1x48x16x16 k11 d1 4.24-4.34 / 3.99-4.02 (float32 3.93-4.04), 1x24x40x40 k11 d3 13.97-14.5 /
// 13.2-13.3; kept where the row blocks won: 1x12x64x64 k11 d4 18.3-19.2 / 20.1-20.7, 1x48x20x20 k11 d1 5.78 / 6.16,
// 1x8x14x14 k7 d1 0.223 / 0.259.
inline bool bf16_dot_forward_prefers_widened_slices(const Problem& p, bool saves_weights) {
  constexpr int64_t kLanes = 16;  // the AVX-512 tile width
  if (saves_weights) return false;
  if (p.height == p.kh * p.dh && p.width == p.kw * p.dw) return false;       // whole groups: their own tiles
  const int64_t interior = group_length(0, p.width, p.dw) - 2 * (p.kw / 2);  // in the longest dilation group
  return interior <= kLanes / 4 || (p.dw == 1 && p.kw >= 9 && interior <= kLanes / 2);
}

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
