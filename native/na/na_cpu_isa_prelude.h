// Everything the per-ISA CPU kernel translation units (native/na/na_cpu_avx2.cpp, na_cpu_avx512.cpp) include BEFORE
// they open their `#pragma GCC target` region. Header code (ATen, c10, the standard library, the index math) is thus
// compiled for the baseline ISA of the build (-march, default x86-64-v3) in every translation unit: the copies of
// its inline functions and template instantiations that the linker merges across translation units are all
// baseline code, so an AVX-512 translation unit cannot leak AVX-512 instructions into a function the AVX2 path
// calls (the SIGILL hazard of compiling whole files with -mavx512f). tests/test_cpu_isa.py checks the built
// extension for it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "dinat_m2f/na_common.h"
#include "dinat_m2f/na_cpu_math.h"
#include "dinat_m2f/na_cpu_windows.h"
#include "dinat_m2f/na_kernels.h"
