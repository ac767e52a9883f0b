// The bf16 fused forward with AVX512_BF16 (vdpbf16ps) logits and the bf16 backward's query pass with vdpbf16ps dO . v,
// on top of the AVX-512 variant's instructions; run only where the CPU has them and DINAT_M2F_CPU_BF16 allows
// (native/na/na_cpu_dispatch.cpp). Its own translation unit:
// the target pragma of the AVX-512 unit must not gain avx512bf16, which lets the compiler emit bf16 instructions in
// code that AVX-512 CPUs without them run. The namespace dinat_m2f::na::cpu::avx512::bf16_dot keeps its code inside
// the one tests/test_cpu_isa.py allows AVX-512 instructions in.
#if defined(__x86_64__)
#include "na_cpu_isa_prelude.h"

#define DINAT_M2F_CPU_LANES 16
#define DINAT_M2F_CPU_BF16_DOT 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")

namespace dinat_m2f::na::cpu::avx512::bf16_dot {
namespace {

using cpu_math::dispatch_head_dim;
using cpu_math::parallel;

#include "dinat_m2f/na_cpu_simd.h"

}  // namespace

#include "na_fused_bf16_cpu_isa.h"

}  // namespace dinat_m2f::na::cpu::avx512::bf16_dot

#pragma GCC pop_options
#endif
