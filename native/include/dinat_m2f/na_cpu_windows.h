// Per-axis lookup tables and the loop grain shared by the CPU neighborhood-attention kernels
// (native/na/na_unfused_cpu_isa.h, native/na/na_fused_cpu_isa.h): the index math of na_common.h evaluated once per
// position instead of once per token.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dinat_m2f/na_common.h"

namespace dinat_m2f::na::cpu {

// Window start, bias start and inverse neighborhood of every position along one axis.
struct AxisTable {
  std::vector<int64_t> start;
  std::vector<int64_t> bias;
  std::vector<InverseRange> inverse;
  AxisTable(int64_t length, int64_t kernel, int64_t dilation) : start(length), bias(length), inverse(length) {
    for (int64_t i = 0; i < length; ++i) {
      start[i] = window_start(i, length, kernel, dilation);
      bias[i] = bias_start(i, start[i], kernel, dilation);
      inverse[i] = inverse_range(i, length, kernel, dilation);
    }
  }
};

// The tables of both axes of a problem (1D problems: a single row, h has one entry).
struct Windows {
  AxisTable h;
  AxisTable w;
  explicit Windows(const Problem& p) : h(p.height, p.kh, p.dh), w(p.width, p.kw, p.dw) {}
};

// Grain for parallel loops over rows: a row is W * window * D multiply-adds.
inline int64_t row_grain(const Problem& p) {
  const int64_t work = p.width * p.window() * p.dim;
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work, 1));
}

}  // namespace dinat_m2f::na::cpu
