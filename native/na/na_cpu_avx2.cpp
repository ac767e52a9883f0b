// The baseline CPU kernels: AVX2 + FMA (x86-64-v3), 8 float lanes per vector. See na_cpu_isa_kernels.h.
#include "na_cpu_isa_prelude.h"

#define DINAT_M2F_CPU_ISA avx2
#define DINAT_M2F_CPU_LANES 8
// The lane-parallel query tiles of the fused forward: on with AVX2 too, measured faster than the per-query path
// (1x4x56x56x32 k7 d1, 1 thread, AMD EPYC Zen4, process time: inference 1.78-1.86 ms against 1.98-2.05 ms, training
// about equal).
#define DINAT_M2F_CPU_QUERY_TILES 1
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#include "na_cpu_isa_kernels.h"
#if defined(__x86_64__)
#pragma GCC pop_options
#endif
