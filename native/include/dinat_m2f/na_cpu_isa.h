// Run-time choice of the instruction set of the CPU neighborhood-attention kernels (native/na/na_cpu_dispatch.cpp).
// The best ISA the CPU has is used, unless the environment variable DINAT_M2F_CPU_ISA names one: "avx2" forces the
// baseline (so a test run on an AVX-512 machine covers both paths), "avx512" requires AVX-512 (an error where the CPU
// lacks it), "auto" or unset picks. It is read at every call, so a process can switch paths between calls.
#pragma once

#include <string>
#include <vector>

namespace dinat_m2f::na::cpu {

enum class CpuIsa { avx2, avx512 };

const char* cpu_isa_name(CpuIsa isa);

// The ISAs this CPU can run (baseline first).
std::vector<std::string> supported_cpu_isas();

// The ISA the kernels take now (honours DINAT_M2F_CPU_ISA; raises a c10::Error for a bad or unsupported value).
CpuIsa selected_cpu_isa();

// Whether this CPU has the AVX512_BF16 instructions.
bool cpu_has_avx512_bf16();

// Whether the bf16 kernels use them now (honours DINAT_M2F_CPU_BF16 and DINAT_M2F_CPU_ISA; raises a c10::Error for a
// bad or unsupported value).
bool selected_cpu_bf16_dot();

}  // namespace dinat_m2f::na::cpu
