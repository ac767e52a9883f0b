// The AVX-512 CPU kernels (F, BW, VL, DQ), 16 float lanes per vector. Run only where the CPU has these instructions
// (na_cpu_dispatch.cpp); the target pragma, not the build's -march, enables them, so the extension still runs on
// AVX2-only machines. See na_cpu_isa_kernels.h for why no AVX-512 code can reach the baseline path.
#if defined(__x86_64__)
#include "na_cpu_isa_prelude.h"

#define DINAT_M2F_CPU_ISA avx512
#define DINAT_M2F_CPU_LANES 16
#define DINAT_M2F_CPU_QUERY_TILES 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include "na_cpu_isa_kernels.h"
#pragma GCC pop_options
#endif
