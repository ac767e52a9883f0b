// CUDA kernels of fused neighborhood attention: out = softmax(scale * q.k + rpb) v.
//
// One warp per query: the lanes split head_dim (up to kMaxChunks * 32 channels, kept in registers), every logit is a
// warp reduction broadcast from lane 0 (so the online-softmax branch is uniform), and the output accumulator is
// rescaled when the running max grows; nothing but the row logsumexp is written besides the output.
// Backward: the same warp-per-query pass recomputes P = exp(logit - lse) and dS = P (dO . v - delta), writes both to a
// float workspace and accumulates dQ; dK and dV are then gathered over the inverse neighborhood and d-rpb reduced per
// bias entry (shared kernels of na_cuda_kernels.cuh): no atomics, deterministic.
#include <limits>

#include "dinat_m2f/na_cuda_kernels.cuh"
#include "dinat_m2f/na_kernels.h"

namespace dinat_m2f::na::cuda {
namespace {

using namespace cuda_kernels;

constexpr int kMaxChunks = 8;  // head_dim <= 256
constexpr int kWarpsPerBlock = 4;

struct QueryIndex {
  int64_t bh, h, i, j, si, sj, bi, bj;
};

__device__ __forceinline__ QueryIndex query_index(int64_t token, const Problem& p) {
  QueryIndex q;
  q.j = token % p.width;
  q.i = (token / p.width) % p.height;
  q.bh = token / (p.height * p.width);
  q.h = q.bh % p.heads;
  q.si = window_start(q.i, p.height, p.kh, p.dh);
  q.sj = window_start(q.j, p.width, p.kw, p.dw);
  q.bi = bias_start(q.i, q.si, p.kh, p.dh);
  q.bj = bias_start(q.j, q.sj, p.kw, p.dw);
  return q;
}

// Loads this lane's channels (lane, lane + 32, ...) of a D-vector times `mul`; absent channels are 0.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_lanes(const scalar_t* x, int64_t D, int lane, acc_t mul, acc_t (&r)[kMaxChunks]) {
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int64_t d = c * kWarp + lane;
    r[c] = d < D ? static_cast<acc_t>(x[d]) * mul : acc_t(0);
  }
}

// Warp-wide dot product of register lanes with a D-vector, identical on every lane.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const acc_t (&r)[kMaxChunks], const scalar_t* x, int64_t D, int lane) {
  acc_t s = 0;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int64_t d = c * kWarp + lane;
    if (d < D) {
      s += r[c] * static_cast<acc_t>(x[d]);
    }
  }
  return __shfl_sync(0xffffffffu, warp_sum(s), 0);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t bias_at(const scalar_t* rpb, const QueryIndex& qi, int64_t ki, int64_t kj,
                                         const Problem& p) {
  return rpb == nullptr ? acc_t(0) : static_cast<acc_t>(rpb[(qi.h * p.rpb_h() + qi.bi + ki) * p.rpb_w() + qi.bj + kj]);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    fused_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                         const scalar_t* __restrict__ rpb, scalar_t* __restrict__ out, acc_t* __restrict__ lse,
                         Problem p, acc_t scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t D = p.dim, W = p.width, H = p.height;
  const int64_t queries = p.batch_heads * p.tokens();
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; token < queries;
       token += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const QueryIndex qi = query_index(token, p);
    acc_t qr[kMaxChunks], acc[kMaxChunks];
    load_lanes(q + token * D, D, lane, scale, qr);
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) acc[c] = 0;
    acc_t running_max = -std::numeric_limits<acc_t>::infinity();
    acc_t running_sum = 0;
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      const int64_t row = (qi.bh * H + qi.si + ki * p.dh) * W + qi.sj;
      for (int64_t kj = 0; kj < p.kw; ++kj) {
        const int64_t key = row + kj * p.dw;
        const acc_t logit = warp_dot(qr, k + key * D, D, lane) + bias_at<scalar_t, acc_t>(rpb, qi, ki, kj, p);
        if (logit > running_max) {  // uniform across the warp: logit is lane 0's value
          const acc_t factor = exp_acc(running_max - logit);
          running_sum *= factor;
#pragma unroll
          for (int c = 0; c < kMaxChunks; ++c) acc[c] *= factor;
          running_max = logit;
        }
        const acc_t prob = exp_acc(logit - running_max);
        running_sum += prob;
        const scalar_t* vv = v + key * D;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int64_t d = c * kWarp + lane;
          if (d < D) acc[c] += prob * static_cast<acc_t>(vv[d]);
        }
      }
    }
    const acc_t inv = acc_t(1) / running_sum;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int64_t d = c * kWarp + lane;
      if (d < D) out[token * D + d] = static_cast<scalar_t>(acc[c] * inv);
    }
    if (lane == 0) lse[token] = running_max + log_acc(running_sum);
  }
}

// Query pass of the backward: P and dS into the workspace, dQ = scale * sum_n dS_n k_n.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    backward_query_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                          const scalar_t* __restrict__ rpb, const scalar_t* __restrict__ out,
                          const acc_t* __restrict__ lse, scalar_t* __restrict__ grad_q, acc_t* __restrict__ prob_ws,
                          acc_t* __restrict__ ds_ws, Problem p, acc_t scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t D = p.dim, W = p.width, H = p.height, KK = p.window();
  const int64_t queries = p.batch_heads * p.tokens();
  for (int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; token < queries;
       token += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const QueryIndex qi = query_index(token, p);
    acc_t qr[kMaxChunks], gor[kMaxChunks], dq[kMaxChunks];
    load_lanes(q + token * D, D, lane, scale, qr);
    load_lanes(grad_out + token * D, D, lane, acc_t(1), gor);
    const acc_t delta = warp_dot(gor, out + token * D, D, lane);
    const acc_t row_lse = lse[token];
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) dq[c] = 0;
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      const int64_t row = (qi.bh * H + qi.si + ki * p.dh) * W + qi.sj;
      for (int64_t kj = 0; kj < p.kw; ++kj) {
        const int64_t key = row + kj * p.dw;
        const acc_t logit = warp_dot(qr, k + key * D, D, lane) + bias_at<scalar_t, acc_t>(rpb, qi, ki, kj, p);
        const acc_t prob = exp_acc(logit - row_lse);
        const acc_t ds = prob * (warp_dot(gor, v + key * D, D, lane) - delta);
        if (lane == 0) {
          prob_ws[token * KK + ki * p.kw + kj] = prob;
          ds_ws[token * KK + ki * p.kw + kj] = ds;
        }
        const scalar_t* kv = k + key * D;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c) {
          const int64_t d = c * kWarp + lane;
          if (d < D) dq[c] += ds * static_cast<acc_t>(kv[d]);
        }
      }
    }
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int64_t d = c * kWarp + lane;
      if (d < D) grad_q[token * D + d] = static_cast<scalar_t>(dq[c] * scale);
    }
  }
}

void check_head_dim(const Problem& p) {
  TORCH_CHECK(p.dim <= kMaxChunks * kWarp,
              "fused neighborhood attention on CUDA supports head_dim <= ", kMaxChunks * kWarp, ", got ", p.dim,
              ". Use na*_qk / softmax / na*_av for larger heads.");
}

}  // namespace

void fused_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb,
                   const at::Tensor& out, const at::Tensor& lse, const Problem& p, double scale) {
  check_head_dim(p);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "na_fused_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fused_forward_kernel<scalar_t, acc_t>
        <<<blocks_for(lse.numel(), kWarpsPerBlock), kWarpsPerBlock * kWarp, 0, stream>>>(
            q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
            rpb.has_value() ? rpb->const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
            lse.mutable_data_ptr<acc_t>(), p, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fused_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,
                    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                    const at::Tensor& grad_rpb, const Problem& p, double scale) {
  check_head_dim(p);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // P and dS of every (query, window slot), in the accumulation type.
  const at::Tensor prob_ws = at::empty({lse.numel() * p.window()}, lse.options());
  const at::Tensor ds_ws = at::empty_like(prob_ws);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "na_fused_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(scale);
    backward_query_kernel<scalar_t, acc_t>
        <<<blocks_for(lse.numel(), kWarpsPerBlock), kWarpsPerBlock * kWarp, 0, stream>>>(
            grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), rpb.has_value() ? rpb->const_data_ptr<scalar_t>() : nullptr,
            out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(), grad_q.mutable_data_ptr<scalar_t>(),
            prob_ws.mutable_data_ptr<acc_t>(), ds_ws.mutable_data_ptr<acc_t>(), p, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    inverse_kernel<acc_t, scalar_t, acc_t><<<blocks_for(grad_k.numel()), kThreads, 0, stream>>>(
        ds_ws.const_data_ptr<acc_t>(), q.const_data_ptr<scalar_t>(), grad_k.mutable_data_ptr<scalar_t>(), p, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    inverse_kernel<acc_t, scalar_t, acc_t><<<blocks_for(grad_v.numel()), kThreads, 0, stream>>>(
        prob_ws.const_data_ptr<acc_t>(), grad_out.const_data_ptr<scalar_t>(), grad_v.mutable_data_ptr<scalar_t>(), p,
        acc_t(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grad_rpb.defined() && grad_rpb.numel() > 0) {  // heads == 0 would be a zero-block launch
      rpb_grad_kernel<acc_t, acc_t><<<static_cast<unsigned int>(grad_rpb.numel()), kThreads, 0, stream>>>(
          ds_ws.const_data_ptr<acc_t>(), grad_rpb.mutable_data_ptr<acc_t>(), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace dinat_m2f::na::cuda
