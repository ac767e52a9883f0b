// Multi-scale deformable attention: index math and bilinear sampling shared by the CPU and CUDA kernels.
//
// Layouts (all contiguous):
//   value              [N, S, M, D]          S = sum over levels of H_l * W_l, M heads, D channels per head
//   spatial_shapes     [L, 2] int64          (H_l, W_l)
//   level_start_index  [L] int64             offset of level l inside S
//   sampling_locations [N, Lq, M, L, P, 2]   (x, y) normalised to [0, 1] of the level's map
//   attention_weights  [N, Lq, M, L, P]
//   output             [N, Lq, M * D]
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): the pixel
// coordinate of x is x * W - 0.5, and corners outside the map read as zero.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define DINAT_M2F_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DINAT_M2F_HOST_DEVICE inline
#endif

namespace dinat_m2f::msda {

template <typename acc_t>
DINAT_M2F_HOST_DEVICE acc_t floor_value(acc_t v) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<acc_t, float>) {
    return floorf(v);
  } else {
    return ::floor(v);
  }
#else
  return std::floor(v);
#endif
}

// The four corners of one bilinear sample: top-left, top-right, bottom-left, bottom-right.
template <typename acc_t>
struct BilinearSample {
  int64_t pos[4];   // spatial index h * W + w of each corner inside its level
  bool valid[4];    // corner inside the map (an outside corner reads as zero)
  acc_t lh, lw;     // fractional offsets from the top-left corner
  acc_t weight[4];  // bilinear weights (1-lh)(1-lw), (1-lh)lw, lh(1-lw), lh lw
};

// Fills `s` for the normalised location (x, y) on an H x W map. Returns false when the sample lies entirely
// outside the map (or is NaN): it then contributes nothing and receives no gradient.
template <typename acc_t>
DINAT_M2F_HOST_DEVICE bool make_bilinear_sample(acc_t x, acc_t y, int64_t H, int64_t W, BilinearSample<acc_t>& s) {
  const acc_t h_im = y * static_cast<acc_t>(H) - static_cast<acc_t>(0.5);
  const acc_t w_im = x * static_cast<acc_t>(W) - static_cast<acc_t>(0.5);
  // negated form so that NaN coordinates are rejected too
  if (!(h_im > acc_t(-1) && w_im > acc_t(-1) && h_im < static_cast<acc_t>(H) && w_im < static_cast<acc_t>(W))) {
    return false;
  }
  const acc_t h_floor = floor_value(h_im);
  const acc_t w_floor = floor_value(w_im);
  const int64_t h_low = static_cast<int64_t>(h_floor);
  const int64_t w_low = static_cast<int64_t>(w_floor);
  const int64_t h_high = h_low + 1;
  const int64_t w_high = w_low + 1;
  s.lh = h_im - h_floor;
  s.lw = w_im - w_floor;
  const acc_t hh = acc_t(1) - s.lh;
  const acc_t hw = acc_t(1) - s.lw;
  s.weight[0] = hh * hw;
  s.weight[1] = hh * s.lw;
  s.weight[2] = s.lh * hw;
  s.weight[3] = s.lh * s.lw;
  const bool top = h_low >= 0;
  const bool bottom = h_high <= H - 1;
  const bool left = w_low >= 0;
  const bool right = w_high <= W - 1;
  s.valid[0] = top && left;
  s.valid[1] = top && right;
  s.valid[2] = bottom && left;
  s.valid[3] = bottom && right;
  s.pos[0] = h_low * W + w_low;
  s.pos[1] = h_low * W + w_high;
  s.pos[2] = h_high * W + w_low;
  s.pos[3] = h_high * W + w_high;
  return true;
}

// Bilinear value from the four corner values v (zero for invalid corners) and its derivatives with respect
// to the pixel coordinates h_im and w_im (multiply by H, W for the normalised coordinates).
template <typename acc_t>
DINAT_M2F_HOST_DEVICE void bilinear_value_and_grad(const BilinearSample<acc_t>& s, const acc_t v[4], acc_t& value,
                                                   acc_t& d_h, acc_t& d_w) {
  const acc_t hh = acc_t(1) - s.lh;
  const acc_t hw = acc_t(1) - s.lw;
  value = s.weight[0] * v[0] + s.weight[1] * v[1] + s.weight[2] * v[2] + s.weight[3] * v[3];
  d_h = -hw * v[0] - s.lw * v[1] + hw * v[2] + s.lw * v[3];
  d_w = -hh * v[0] + hh * v[1] - s.lh * v[2] + s.lh * v[3];
}

// Gradients of one sample with respect to its attention weight and its pixel coordinates, summed over channels.
template <typename acc_t>
struct SampleGrads {
  acc_t weight = 0;
  acc_t h_im = 0;
  acc_t w_im = 0;
};

// Channel d of one sample's backward, shared by the CPU and CUDA kernels. value_d points at channel d of the sample's
// level and head (corner c reads value_d[pos[c] * row]), g is grad_output at channel d and w the sample's attention
// weight. Adds to `grads` and hands each corner's value gradient to scatter(offset from value_d, amount): a plain add
// on the CPU, atomicAdd on CUDA.
template <typename scalar_t, typename acc_t, typename Scatter>
DINAT_M2F_HOST_DEVICE void backward_sample_channel(const BilinearSample<acc_t>& s, const scalar_t* value_d, int64_t row,
                                                   acc_t g, acc_t w, SampleGrads<acc_t>& grads,
                                                   const Scatter& scatter) {
  acc_t v[4];
  for (int c = 0; c < 4; ++c) {
    v[c] = s.valid[c] ? static_cast<acc_t>(value_d[s.pos[c] * row]) : acc_t(0);
  }
  acc_t sample, d_h, d_w;
  bilinear_value_and_grad(s, v, sample, d_h, d_w);
  grads.weight += g * sample;
  grads.h_im += g * d_h;
  grads.w_im += g * d_w;
  const acc_t gw = g * w;
  for (int c = 0; c < 4; ++c) {
    if (s.valid[c]) {
      scatter(s.pos[c] * row, gw * s.weight[c]);
    }
  }
}

// Stores sample i's gradients: of its weight, and of its normalised location (x, y) = (w_im, h_im) / (W, H).
template <typename scalar_t, typename acc_t>
DINAT_M2F_HOST_DEVICE void store_sample_grads(const SampleGrads<acc_t>& grads, acc_t w, int64_t H, int64_t W, int64_t i,
                                              scalar_t* grad_locations, scalar_t* grad_weights) {
  grad_weights[i] = static_cast<scalar_t>(grads.weight);
  grad_locations[2 * i] = static_cast<scalar_t>(w * grads.w_im * static_cast<acc_t>(W));
  grad_locations[2 * i + 1] = static_cast<scalar_t>(w * grads.h_im * static_cast<acc_t>(H));
}

// Flat index of (n, q, m, l, p) in attention_weights (times 2 for sampling_locations).
DINAT_M2F_HOST_DEVICE int64_t sample_index(int64_t n, int64_t q, int64_t m, int64_t l, int64_t p, int64_t Lq, int64_t M,
                                           int64_t L, int64_t P) {
  return (((n * Lq + q) * M + m) * L + l) * P + p;
}

}  // namespace dinat_m2f::msda
