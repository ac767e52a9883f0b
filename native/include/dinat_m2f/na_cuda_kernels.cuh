// CUDA kernels and device helpers shared by the unfused neighborhood-attention ops (native/na/na_cuda.cu) and the
// fused backward (native/na/na_fused_cuda.cu); include only from .cu files.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "dinat_m2f/cuda_launch.cuh"
#include "dinat_m2f/na_common.h"

namespace dinat_m2f::na::cuda_kernels {

using cuda_launch::blocks_for;
using cuda_launch::kThreads;
using cuda_launch::kWarp;
using cuda_launch::warp_sum;

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return __logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// ----------------------------------------------------------------------------------------------- shared kernels
// Used by both the unfused ops (weights in the input dtype) and the fused backward (weights in the float workspace).

// out_x = scale * sum_{i : x in N(i)} w[i, slot_i(x)] x_i: one thread per output element (token, channel); the
// inverse neighborhood makes it a gather, so there are no atomics.
template <typename w_t, typename scalar_t, typename acc_t>
__global__ void inverse_kernel(const w_t* __restrict__ w, const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                               Problem p, acc_t scale) {
  const int64_t H = p.height, W = p.width, D = p.dim, KK = p.window();
  DINAT_CUDA_LOOP(idx, p.batch_heads * H * W * D) {
    const int64_t d = idx % D;
    const int64_t token = idx / D;
    const int64_t xj = token % W, xi = (token / W) % H, bh = token / (H * W);
    const InverseRange rh = inverse_range(xi, H, p.kh, p.dh);
    const InverseRange rw = inverse_range(xj, W, p.kw, p.dw);
    acc_t acc = 0;
    for (int64_t i = rh.begin; i < rh.end; i += p.dh) {
      const int64_t ki = window_slot(xi, window_start(i, H, p.kh, p.dh), p.dh);
      const int64_t base = (bh * H + i) * W;
      for (int64_t j = rw.begin; j < rw.end; j += p.dw) {
        const int64_t kj = window_slot(xj, window_start(j, W, p.kw, p.dw), p.dw);
        acc += static_cast<acc_t>(w[(base + j) * KK + ki * p.kw + kj]) * static_cast<acc_t>(x[(base + j) * D + d]);
      }
    }
    out[idx] = static_cast<scalar_t>(acc * scale);
  }
}

// grad_rpb[h, a, c] += sum over batch and queries of g at the window slot whose bias index is (a, c): one block per
// bias entry, a block-wide tree reduction, no atomics (deterministic).
template <typename g_t, typename acc_t>
__global__ void rpb_grad_kernel(const g_t* __restrict__ g, acc_t* __restrict__ grad_rpb, Problem p) {
  __shared__ acc_t partial[kThreads];
  const int64_t H = p.height, W = p.width, KK = p.window(), RH = p.rpb_h(), RW = p.rpb_w();
  const int64_t entry = blockIdx.x;
  const int64_t h = entry / (RH * RW), a = (entry / RW) % RH, c = entry % RW;
  const int64_t batch = p.batch_heads / p.heads;
  acc_t sum = 0;
  for (int64_t t = threadIdx.x; t < batch * H * W; t += blockDim.x) {
    const int64_t j = t % W, i = (t / W) % H, b = t / (H * W);
    const int64_t ki = a - bias_start(i, window_start(i, H, p.kh, p.dh), p.kh, p.dh);
    const int64_t kj = c - bias_start(j, window_start(j, W, p.kw, p.dw), p.kw, p.dw);
    if (ki >= 0 && ki < p.kh && kj >= 0 && kj < p.kw) {
      sum += static_cast<acc_t>(g[(((b * p.heads + h) * H + i) * W + j) * KK + ki * p.kw + kj]);
    }
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      partial[threadIdx.x] += partial[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    grad_rpb[entry] += partial[0];
  }
}

}  // namespace dinat_m2f::na::cuda_kernels
