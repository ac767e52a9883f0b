// cpu::qk, cpu::av, ... (the CPU kernels registered for the ops) forward to the variant of the instruction set chosen
// at run time: AVX-512 where the CPU has it, else the AVX2 + FMA baseline; DINAT_M2F_CPU_ISA overrides the choice.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "dinat_m2f/na_cpu_isa.h"
#include "dinat_m2f/na_kernels.h"
#include "na_fused_bf16_kernels.h"

namespace dinat_m2f::na::cpu {
namespace {

constexpr const char* kIsaEnv = "DINAT_M2F_CPU_ISA";
constexpr const char* kBf16Env = "DINAT_M2F_CPU_BF16";

bool cpu_has_avx2() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The instructions the AVX-512 variant is compiled for (na_cpu_avx512.cpp's target pragma).
bool cpu_has_avx512() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_has_avx2();
#else
  return false;
#endif
}

DeviceKernels kernels_of(CpuIsa isa) {
  switch (isa) {
#if defined(__x86_64__)
    case CpuIsa::avx512:
      return {&avx512::qk,
              &avx512::av,
              &avx512::inverse,
              &avx512::rpb_grad,
              &avx512::fused_forward,
              &avx512::fused_backward};
#endif
    default:
      return {&avx2::qk, &avx2::av, &avx2::inverse, &avx2::rpb_grad, &avx2::fused_forward, &avx2::fused_backward};
  }
}

// The bf16 fused forward of the selected path for p: with vdpbf16ps logits where selected_cpu_bf16_dot(), but for
// the inference maps where the AVX-512 variant's float32 rows on widened slices are faster
// (bf16_dot_forward_prefers_widened_slices).
decltype(&avx2::fused_forward_bf16) selected_bf16_forward(const Problem& p, bool saves_weights) {
  const bool dot = selected_cpu_bf16_dot();  // first: it rejects DINAT_M2F_CPU_BF16=on on the AVX2 path
#if defined(__x86_64__)
  if (selected_cpu_isa() == CpuIsa::avx512) {
    return dot && !bf16_dot_forward_prefers_widened_slices(p, saves_weights) ? &avx512::bf16_dot::fused_forward_bf16
                                                                             : &avx512::fused_forward_bf16;
  }
#endif
  return &avx2::fused_forward_bf16;
}

// The query pass of the bf16 backward from saved weights on the selected path: dO . v with vdpbf16ps where
// selected_cpu_bf16_dot().
Bf16BackwardQueryPass selected_bf16_backward_query_pass() {
  const bool dot = selected_cpu_bf16_dot();  // first: it rejects DINAT_M2F_CPU_BF16=on on the AVX2 path
#if defined(__x86_64__)
  if (selected_cpu_isa() == CpuIsa::avx512) {
    return dot ? &avx512::bf16_dot::fused_backward_query_pass_bf16 : &avx512::fused_backward_query_pass_bf16;
  }
#endif
  return &avx2::fused_backward_query_pass_bf16;
}

DeviceKernels selected_kernels() { return kernels_of(selected_cpu_isa()); }

SavedAttnKernels selected_saved_attn_kernels() {
#if defined(__x86_64__)
  if (selected_cpu_isa() == CpuIsa::avx512) {
    return {&avx512::fused_forward_with_attn, &avx512::fused_backward_with_attn};
  }
#endif
  return {&avx2::fused_forward_with_attn, &avx2::fused_backward_with_attn};
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) { return isa == CpuIsa::avx512 ? "avx512" : "avx2"; }

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> isas;
  if (cpu_has_avx2()) isas.emplace_back("avx2");
  if (cpu_has_avx512()) isas.emplace_back("avx512");
  return isas;
}

CpuIsa selected_cpu_isa() {
#if defined(__x86_64__)
  TORCH_CHECK(cpu_has_avx2(), "dinat_m2f CPU kernels need AVX2 and FMA (x86-64-v3), which this CPU lacks.");
#endif
  const char* env = std::getenv(kIsaEnv);
  const std::string wanted = env != nullptr ? env : "";
  if (wanted.empty() || wanted == "auto") {
    return cpu_has_avx512() ? CpuIsa::avx512 : CpuIsa::avx2;
  }
  if (wanted == "avx2") {
    return CpuIsa::avx2;
  }
  TORCH_CHECK(wanted == "avx512", kIsaEnv, "='", wanted,
              "' is not an instruction set of the CPU kernels; use avx2, avx512 or auto (or unset it).");
  TORCH_CHECK(cpu_has_avx512(), kIsaEnv,
              "=avx512 but this CPU lacks AVX-512 (F, BW, VL, DQ); use avx2 or auto (or unset it).");
  return CpuIsa::avx512;
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool selected_cpu_bf16_dot() {
  const char* env = std::getenv(kBf16Env);
  const std::string wanted = env != nullptr ? env : "";
  const bool avx512_path = selected_cpu_isa() == CpuIsa::avx512;
  if (wanted.empty() || wanted == "auto") {
    return avx512_path && cpu_has_avx512_bf16();
  }
  if (wanted == "off") {
    return false;
  }
  TORCH_CHECK(wanted == "on", kBf16Env, "='", wanted,
              "' is not a choice of the bf16 kernels; use on, off or auto (or unset it).");
  TORCH_CHECK(cpu_has_avx512_bf16(), kBf16Env, "=on but this CPU lacks AVX512_BF16; use off or auto (or unset it).");
  TORCH_CHECK(avx512_path, kBf16Env, "=on needs the AVX-512 path but ", kIsaEnv, " selects avx2; unset one of them.");
  return true;
}

void qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& rpb, const at::Tensor& attn,
        const Problem& p) {
  selected_kernels().qk(q, k, rpb, attn, p);
}

void av(const at::Tensor& attn, const at::Tensor& v, const at::Tensor& out, const Problem& p) {
  selected_kernels().av(attn, v, out, p);
}

void inverse(const at::Tensor& weights, const at::Tensor& x, const at::Tensor& out, const Problem& p) {
  selected_kernels().inverse(weights, x, out, p);
}

void rpb_grad(const at::Tensor& grad_attn, const at::Tensor& grad_rpb, const Problem& p) {
  selected_kernels().rpb_grad(grad_attn, grad_rpb, p);
}

void fused_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb,
                   const at::Tensor& out, const at::Tensor& lse, const Problem& p, double scale) {
  if (q.scalar_type() == at::kBFloat16) {
    selected_bf16_forward(p, false)(q, k, v, rpb, out, lse, at::Tensor(), p, scale);
    return;
  }
  selected_kernels().fused_forward(q, k, v, rpb, out, lse, p, scale);
}

void fused_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,
                    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                    const at::Tensor& grad_rpb, const Problem& p, double scale) {
  selected_kernels().fused_backward(grad_out, q, k, v, rpb, out, lse, grad_q, grad_k, grad_v, grad_rpb, p, scale);
}

void fused_forward_with_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor& attn, const Problem& p, double scale) {
  if (q.scalar_type() == at::kBFloat16) {
    selected_bf16_forward(p, true)(q, k, v, rpb, out, lse, attn, p, scale);
    return;
  }
  selected_saved_attn_kernels().fused_forward_with_attn(q, k, v, rpb, out, lse, attn, p, scale);
}

void fused_backward_with_attn(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& attn, const at::Tensor& grad_q,
                              const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& grad_rpb,
                              const Problem& p, double scale) {
  if (q.scalar_type() == at::kBFloat16) {
    const Bf16BackwardQueryPass query_pass = selected_bf16_backward_query_pass();
#if defined(__x86_64__)
    if (selected_cpu_isa() == CpuIsa::avx512) {
      avx512::fused_backward_with_attn_bf16(grad_out, q, k, v, out, attn, grad_q, grad_k, grad_v, grad_rpb, p, scale,
                                            query_pass);
      return;
    }
#endif
    avx2::fused_backward_with_attn_bf16(grad_out, q, k, v, out, attn, grad_q, grad_k, grad_v, grad_rpb, p, scale,
                                        query_pass);
    return;
  }
  selected_saved_attn_kernels().fused_backward_with_attn(grad_out, q, k, v, out, attn, grad_q, grad_k, grad_v, grad_rpb,
                                                         p, scale);
}

}  // namespace dinat_m2f::na::cpu
