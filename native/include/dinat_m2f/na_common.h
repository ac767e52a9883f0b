// Neighborhood-attention index math shared by the CPU (C++) and CUDA kernels: written once, inline, usable on host
// and device. Semantics are NATTEN 0.14-0.17's (see shared/spec/neighborhood-attention.md, sections 1.2-1.4):
//   - along an axis of length L with odd kernel k and dilation d, query i belongs to dilation group r = i % d, which
//     holds Lg = ceil((L - r) / d) tokens; inside the group the window starts at clamp(i / d - k / 2, 0, Lg - k), so
//     it is shifted inward at the borders and always covers exactly k tokens: start + t * d, t = 0..k-1;
//   - the relative-position-bias index of a (query, key) pair is (key - query) / d + k - 1;
//   - the inverse neighborhood of key x (the queries whose window holds x) is a contiguous range of the group.
// 1D problems are 2D problems with one row (H = 1, kernel 1, dilation 1 along H), so every kernel is written once.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DINAT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DINAT_HOST_DEVICE inline
#endif

namespace dinat_m2f::na {

// Number of tokens in the dilation group of position i (all positions r, r + d, r + 2d, ... < length).
DINAT_HOST_DEVICE int64_t group_length(int64_t i, int64_t length, int64_t dilation) {
  const int64_t r = i % dilation;
  return (length - r + dilation - 1) / dilation;
}

// First key position of the window of query i (the window is start, start + d, ..., start + (k - 1) d).
DINAT_HOST_DEVICE int64_t window_start(int64_t i, int64_t length, int64_t kernel, int64_t dilation) {
  const int64_t r = i % dilation;
  const int64_t glen = group_length(i, length, dilation);
  int64_t s = i / dilation - kernel / 2;
  s = s < 0 ? 0 : s;
  s = s > glen - kernel ? glen - kernel : s;
  return s * dilation + r;
}

// Bias index of window slot 0 for query i whose window starts at `start`: (start - i) / d + k - 1. The division is
// exact (start and i are in the same dilation group); slot t has bias index bias_start + t.
DINAT_HOST_DEVICE int64_t bias_start(int64_t i, int64_t start, int64_t kernel, int64_t dilation) {
  return (start - i) / dilation + kernel - 1;
}

// The queries whose window contains key x: q_begin, q_begin + d, ..., < q_end (all in x's dilation group).
// In group coordinates (x' = x / d, group length Lg): queries [0 if x' < k else x' - k/2, Lg if x' >= Lg - k else
// x' + k/2 + 1); both bounds follow from window_start being clamp(i' - k/2, 0, Lg - k), which is non-decreasing.
struct InverseRange {
  int64_t begin;  // first query position
  int64_t end;    // exclusive bound; step is the dilation
};

DINAT_HOST_DEVICE InverseRange inverse_range(int64_t x, int64_t length, int64_t kernel, int64_t dilation) {
  const int64_t r = x % dilation;
  const int64_t xg = x / dilation;
  const int64_t glen = group_length(x, length, dilation);
  const int64_t half = kernel / 2;
  const int64_t gb = xg < kernel ? 0 : xg - half;
  const int64_t ge = xg >= glen - kernel ? glen : xg + half + 1;
  return {gb * dilation + r, ge * dilation + r};
}

// Window slot of key x in a window starting at `start` (window_start of the query; x must be in that window).
DINAT_HOST_DEVICE int64_t window_slot(int64_t x, int64_t start, int64_t dilation) { return (x - start) / dilation; }

// Shape of one neighborhood-attention problem, seen as 2D: [BH = batch * heads, H, W, D] tokens, attention weights
// [BH, H, W, kh * kw], bias [heads, 2 kh - 1, 2 kw - 1]. For 1D: H = 1, kh = 1, dh = 1.
struct Problem {
  int64_t batch_heads;
  int64_t heads;
  int64_t height;
  int64_t width;
  int64_t dim;
  int64_t kh;
  int64_t kw;
  int64_t dh;
  int64_t dw;

  DINAT_HOST_DEVICE int64_t window() const { return kh * kw; }
  DINAT_HOST_DEVICE int64_t tokens() const { return height * width; }
  DINAT_HOST_DEVICE int64_t rpb_h() const { return 2 * kh - 1; }
  DINAT_HOST_DEVICE int64_t rpb_w() const { return 2 * kw - 1; }
};

// Where the rows of a [B, heads, H, W, X] tensor (tokens: X = D; weights: X = kh * kw) lie: the element strides of
// its four outer dims, in any order; its last dim has stride 1. The kernels address every tensor through these, so
// they read and write strided views in place (e.g. q, k, v as heads-last slices [B, H, W, heads, D] of the packed
// qkv projection output [B, H, W, 3, heads, D]) instead of contiguous copies.
struct Strides {
  int64_t batch;
  int64_t head;
  int64_t row;  // along H
  int64_t col;  // along W
  int64_t heads;
  // Subtracted from every slice's offset: a copy of slices [s0, s1) only (the CPU kernels' staged slices) is addressed
  // by the slices' own numbers with origin = its offset of slice s0.
  int64_t origin = 0;

  // Offset of the first element of slice bh = b * heads + h (the kernels number slices that way).
  DINAT_HOST_DEVICE int64_t slice(int64_t bh) const { return (bh / heads) * batch + (bh % heads) * head - origin; }
  DINAT_HOST_DEVICE int64_t row_at(int64_t bh, int64_t i) const { return slice(bh) + i * row; }
};

// The strides of a contiguous [slices, H, W, X] tensor seen as [slices / heads, heads, H, W, X].
DINAT_HOST_DEVICE Strides contiguous_strides(const Problem& p, int64_t last) {
  const int64_t col = last, row = p.width * col, head = p.height * row;
  return {p.heads * head, head, row, col, p.heads};
}

// One (batch, head) slice of a strided tensor: the X values of token (i, j) start at data + i * row + j * col.
template <typename T>
struct Slice {
  T* data;
  int64_t row;
  int64_t col;

  DINAT_HOST_DEVICE T* row_at(int64_t i) const { return data + i * row; }
  DINAT_HOST_DEVICE T* at(int64_t i, int64_t j) const { return data + i * row + j * col; }
};

// A tensor of the kernels: its data and strides. Kernels take x.slice(bh) once per row of work (the slice offset
// costs an integer division) and address tokens through the slice.
template <typename T>
struct Strided {
  T* data;
  Strides s;

  DINAT_HOST_DEVICE Slice<T> slice(int64_t bh) const { return {data + s.slice(bh), s.row, s.col}; }
  DINAT_HOST_DEVICE T* row_at(int64_t bh, int64_t i) const { return data + s.row_at(bh, i); }
};

}  // namespace dinat_m2f::na
