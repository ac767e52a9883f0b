// Launch helpers and warp primitives shared by the CUDA kernels of both op families; include only from .cu files.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace dinat_m2f::cuda_launch {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Blocks of `per_block` threads for one thread per item (capped at 2^30 blocks; kernels loop grid-stride).
inline unsigned int blocks_for(int64_t items, int64_t per_block = kThreads) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 30)));
}

// Blocks of kThreads for a grid-stride loop over `threads_needed` threads: enough to fill the device, no more.
inline unsigned int device_filling_blocks(int64_t threads_needed) {
  int device = 0;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t max_blocks = int64_t(sm_count) * 32;
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, max_blocks)));
}

// Sum over the warp, identical on every lane (butterfly; lane 0 adds in the same order as a shuffle-down tree).
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

}  // namespace dinat_m2f::cuda_launch

// Grid-stride loop over [0, n).
#define DINAT_CUDA_LOOP(i, n)                                                            \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
