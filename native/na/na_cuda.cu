// CUDA kernels of the unfused neighborhood-attention primitives (QK, AV, inverse neighborhood, bias gradient).
// float32/float64/float16/bfloat16 with float32 (float64 for float64) accumulation. Kernel size and dilation are
// runtime values: one instantiation per dtype keeps the build short. One thread per output element; the window and
// bias index math is the host/device code of na_common.h shared with the CPU kernels.
#include "dinat_m2f/na_cuda_kernels.cuh"
#include "dinat_m2f/na_kernels.h"

namespace dinat_m2f::na::cuda {
namespace {

using namespace cuda_kernels;

// attn[token, n] = q_token . k_{N(token)_n} + rpb: one thread per (token, window slot).
template <typename scalar_t, typename acc_t>
__global__ void qk_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                          const scalar_t* __restrict__ rpb, scalar_t* __restrict__ attn, Problem p) {
  const int64_t H = p.height, W = p.width, D = p.dim, KK = p.window();
  DINAT_CUDA_LOOP(idx, p.batch_heads * H * W * KK) {
    const int64_t n = idx % KK;
    const int64_t token = idx / KK;
    const int64_t j = token % W, i = (token / W) % H, bh = token / (H * W);
    const int64_t ki = n / p.kw, kj = n % p.kw;
    const int64_t si = window_start(i, H, p.kh, p.dh), sj = window_start(j, W, p.kw, p.dw);
    const int64_t key = (bh * H + si + ki * p.dh) * W + sj + kj * p.dw;
    const scalar_t* qv = q + token * D;
    const scalar_t* kv = k + key * D;
    acc_t s = 0;
    for (int64_t d = 0; d < D; ++d) {
      s += static_cast<acc_t>(qv[d]) * static_cast<acc_t>(kv[d]);
    }
    if (rpb != nullptr) {
      const int64_t h = bh % p.heads;
      const int64_t a = bias_start(i, si, p.kh, p.dh) + ki, c = bias_start(j, sj, p.kw, p.dw) + kj;
      s += static_cast<acc_t>(rpb[(h * p.rpb_h() + a) * p.rpb_w() + c]);
    }
    attn[idx] = static_cast<scalar_t>(s);
  }
}

// out[token, d] = sum_n attn[token, n] v[N(token)_n, d]: one thread per (token, channel), coalesced over channels.
template <typename scalar_t, typename acc_t>
__global__ void av_kernel(const scalar_t* __restrict__ attn, const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                          Problem p) {
  const int64_t H = p.height, W = p.width, D = p.dim, KK = p.window();
  DINAT_CUDA_LOOP(idx, p.batch_heads * H * W * D) {
    const int64_t d = idx % D;
    const int64_t token = idx / D;
    const int64_t j = token % W, i = (token / W) % H, bh = token / (H * W);
    const int64_t si = window_start(i, H, p.kh, p.dh), sj = window_start(j, W, p.kw, p.dw);
    const scalar_t* a = attn + token * KK;
    acc_t acc = 0;
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      const int64_t row = (bh * H + si + ki * p.dh) * W + sj;
      for (int64_t kj = 0; kj < p.kw; ++kj) {
        acc += static_cast<acc_t>(a[ki * p.kw + kj]) * static_cast<acc_t>(v[(row + kj * p.dw) * D + d]);
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

void qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& rpb, const at::Tensor& attn,
        const Problem& p) {
  const c10::cuda::CUDAGuard guard(q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "na_qk_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    qk_kernel<scalar_t, acc_t><<<blocks_for(attn.numel()), kThreads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
        rpb.has_value() ? rpb->const_data_ptr<scalar_t>() : nullptr, attn.mutable_data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void av(const at::Tensor& attn, const at::Tensor& v, const at::Tensor& out, const Problem& p) {
  const c10::cuda::CUDAGuard guard(v.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "na_av_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    av_kernel<scalar_t, acc_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        attn.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void inverse(const at::Tensor& weights, const at::Tensor& x, const at::Tensor& out, const Problem& p) {
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "na_inverse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    inverse_kernel<scalar_t, scalar_t, acc_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        weights.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), p,
        acc_t(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rpb_grad(const at::Tensor& grad_attn, const at::Tensor& grad_rpb, const Problem& p) {
  const c10::cuda::CUDAGuard guard(grad_attn.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_attn.scalar_type(), "na_rpb_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_INTERNAL_ASSERT(grad_rpb.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
    if (grad_rpb.numel() == 0) {
      return;  // heads == 0: nothing to reduce, and a zero-block launch is an invalid configuration
    }
    rpb_grad_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(grad_rpb.numel()), kThreads, 0, stream>>>(
        grad_attn.const_data_ptr<scalar_t>(), grad_rpb.mutable_data_ptr<acc_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace dinat_m2f::na::cuda
