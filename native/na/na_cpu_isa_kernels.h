// The CPU neighborhood-attention kernels of ONE instruction set, in namespace dinat_m2f::na::cpu::DINAT_M2F_CPU_ISA.
// Included (no include guard) by native/na/na_cpu_avx2.cpp and na_cpu_avx512.cpp inside their `#pragma GCC target`
// region, after native/na/na_cpu_isa_prelude.h. Only code written in this region gets the region's ISA, and all of it
// has internal linkage (anonymous namespace) except the entry points, whose names carry the ISA namespace: no symbol
// compiled for AVX-512 can be chosen by the linker for the baseline path. native/na/na_cpu_dispatch.cpp picks the ISA
// at run time.
#if !defined(DINAT_M2F_CPU_ISA) || !defined(DINAT_M2F_CPU_LANES) || !defined(DINAT_M2F_CPU_QUERY_TILES)
#error "define DINAT_M2F_CPU_ISA (namespace), DINAT_M2F_CPU_LANES (floats per register), DINAT_M2F_CPU_QUERY_TILES"
#endif

namespace dinat_m2f::na::cpu::DINAT_M2F_CPU_ISA {
namespace {

using cpu_math::as_compute;
using cpu_math::dispatch_head_dim;
using cpu_math::dispatch_window_width;
using cpu_math::l1_data_cache_ways;
using cpu_math::parallel;
using cpu_math::strided_in;
using cpu_math::strided_out;

#include "dinat_m2f/na_cpu_simd.h"

}  // namespace

#include "na_unfused_cpu_isa.h"

#include "na_fused_cpu_isa.h"

#include "na_fused_bf16_cpu_isa.h"

}  // namespace dinat_m2f::na::cpu::DINAT_M2F_CPU_ISA
