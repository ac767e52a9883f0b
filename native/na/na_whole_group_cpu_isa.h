// Whole-group helpers shared by the float32 (na_fused_cpu_isa.h) and bfloat16 (na_fused_bf16_cpu_isa.h) fused CPU
// kernels, for windows that are their whole dilation group (H == kh * dh and W == kw * dw): the forward's bias rows,
// built per thread once per call, the backward's bias gradient summed per (slice, group) task from its dS, and the
// tiles' weighted row sums in registers (also the bf16 query tiles').
//
// Included inside one ISA's namespace and `#pragma GCC target` region by both kernel headers: once per translation
// unit (the guard), as the AVX2 and AVX-512 units include both headers and the AVX512_BF16 unit only the bf16 one.

#ifndef DINAT_M2F_NA_WHOLE_GROUP_CPU_ISA_H
#define DINAT_M2F_NA_WHOLE_GROUP_CPU_ISA_H

namespace {

// The bias between query slot s and key slot n of a group (both a * kw + b; the same in every group) of one head:
// [n][s], s padded past the last slot (stride: a whole number of vectors) so that a tile's lanes read whole vectors.
// Each thread builds the rows of the heads its tasks meet, once per call (call: a number drawn per kernel call, so
// rows of an earlier call's bias are never reused), into storage kept between calls: one table for all heads built
// by one thread before the parallel tasks was 65 of the 170 us of the bf16 forward at 1x16x7x7 k 7 (a fresh
// allocation and a division per element). Shared by the float32 and bf16 whole-group forwards.
template <typename T>
struct GroupBias {
  const T* rpb = nullptr;  // [heads, rpb_h, rpb_w], or null: no bias (zero rows)
  uint64_t call = 0;
  int64_t stride = 0;  // between the rows of consecutive n
};

inline uint64_t next_group_bias_call() {
  static std::atomic<uint64_t> calls{0};
  return ++calls;
}

// Row n of head h (slot s at s): rpb at the bias offsets of query slot s = (a, b), token (a dh, b dw) of group
// (0, 0), plus key slot n = (ki, kj); no division per element.
template <typename T>
inline void build_group_bias(const GroupBias<T>& bias, const Problem& p, const Windows& win, int64_t h, T* rows) {
  for (int64_t ki = 0; ki < p.kh; ++ki) {
    for (int64_t kj = 0; kj < p.kw; ++kj) {
      T* const row = rows + (ki * p.kw + kj) * bias.stride;
      std::fill(row, row + bias.stride, T(0));
      if (bias.rpb == nullptr) continue;
      for (int64_t a = 0; a < p.kh; ++a) {
        const T* const brow = bias.rpb + (h * p.rpb_h() + win.h.bias[a * p.dh] + ki) * p.rpb_w() + kj;
        for (int64_t b = 0; b < p.kw; ++b) row[a * p.kw + b] = brow[win.w.bias[b * p.dw]];
      }
    }
  }
}

// Head h's rows of this call's group bias, built by this thread on first use.
template <typename T>
inline const T* group_bias_rows(const GroupBias<T>& bias, const Problem& p, const Windows& win, int64_t h) {
  struct Rows {
    uint64_t call = 0;
    std::vector<T> table;        // [heads][n][stride]
    std::vector<uint8_t> built;  // per head
  };
  thread_local Rows rows;
  const int64_t head_elems = p.window() * bias.stride;
  if (rows.call != bias.call) {
    rows.call = bias.call;
    rows.built.assign(p.heads, 0);
    if (rows.table.size() < static_cast<size_t>(p.heads * head_elems)) rows.table.resize(p.heads * head_elems);
  }
  T* const head_rows = rows.table.data() + h * head_elems;
  if (!rows.built[h]) {
    build_group_bias(bias, p, win, h, head_rows);
    rows.built[h] = 1;
  }
  return head_rows;
}

// Adds dS of a group's (query slot, key slot) pairs to its bias gradient out ([rpb_h][rpb_w]): dS of query slot
// (a, b) (ds row a kw + b, `padded` apart) and key slot (ki, kj) goes to bias (bias_h[a] + ki, bias_cols[b] + kj),
// bias_h[a] and bias_cols[b] the bias starts of the query slot's row and column. The loop over b is innermost:
// consecutive b reach distinct bias columns, so the adds do not wait on each other. rpb_grad_slices, which sums the
// same dS from the workspace query by query, adds a query's window into columns the previous query's window overlaps
// (each add waits on the store before it): 30 of the 210 us of the backward at 1x16x7x7 k7.
template <typename T>
inline void add_group_bias_grad(const T* ds, int64_t padded, const int64_t* bias_h, const int64_t* bias_cols,
                                const Problem& p, T* out) {
  const int64_t RW = p.rpb_w();
  for (int64_t a = 0; a < p.kh; ++a) {
    const T* const ds_rows = ds + a * p.kw * padded;
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      T* const row = out + (bias_h[a] + ki) * RW;
      for (int64_t kj = 0; kj < p.kw; ++kj) {
        const T* const src = ds_rows + ki * p.kw + kj;
        for (int64_t b = 0; b < p.kw; ++b) row[bias_cols[b] + kj] += src[b * padded];
      }
    }
  }
}

// The slots of a whole group that go through lane tiles: all but a last partial tile of at most a quarter of the
// lanes, whose queries (and in the backward's key tiles, keys) run one at a time (k 7: 49 slots are 3 tiles of 16 and
// one slot, whose tile of 16 lanes cost as much as a full one in the products over the window). Shared by the
// float32 forward and both backwards.
inline int64_t whole_group_tiled_slots(int64_t window) {
  const int64_t rest = window % kLanes;
  return rest <= kLanes / 4 ? window - rest : window;
}

// The whole-group backward's tasks: each takes up to kGroupsPerTask dilation groups of one slice, one after another,
// sums their dS in slot space ([query slot][key slot], vector adds) and adds that to its bias partial once
// (add_group_bias_grad): the bias index of a (query slot, key slot) pair, (key - query) / d + k - 1, is the same in
// every group. One scatter of (kh kw)^2 scalar adds per group was 10% of the backward at 1x4x56x56 k7 d8 (64 groups).
// A fixed number of groups per task, not per thread, keeps the sums the same for every thread count.
inline constexpr int64_t kGroupsPerTask = 8;

inline int64_t whole_group_tasks_per_slice(const Problem& p) {
  return (p.dh * p.dw + kGroupsPerTask - 1) / kGroupsPerTask;
}

// The bias starts of the query slots of every group: rows[a] of slot row a, cols[b] of slot column b (group (0, 0)'s).
struct GroupBiasStarts {
  std::vector<int64_t> rows, cols;
  GroupBiasStarts(const Problem& p, const Windows& win) : rows(p.kh), cols(p.kw) {
    for (int64_t a = 0; a < p.kh; ++a) rows[a] = win.h.bias[a * p.dh];
    for (int64_t b = 0; b < p.kw; ++b) cols[b] = win.w.bias[b * p.dw];
  }
};

// sum[0 .. n) += x[0 .. n), n a whole number of vectors: a group's dS added to its task's slot-space sum.
template <typename T>
inline void add_slot_rows(const T* __restrict x, int64_t n, T* __restrict sum) {
  for (int64_t i = 0; i < n; i += kLanes) store_lanes(sum + i, load_lanes(sum + i) + load_lanes(x + i));
}

// The elements of one slice's bias partials (one rpb_h x rpb_w partial per task), and how many slices the
// whole-group backward takes per group: partials of up to ~64 MiB, at least one slice.
inline int64_t bias_partial_elems(const Problem& p) { return whole_group_tasks_per_slice(p) * p.rpb_h() * p.rpb_w(); }

template <typename T>
inline int64_t whole_group_slices_per_group(const Problem& p) {
  const int64_t slice_bytes = bias_partial_elems(p) * static_cast<int64_t>(sizeof(T));
  return std::clamp<int64_t>((int64_t{64} << 20) / std::max<int64_t>(slice_bytes, 1), 1, p.batch_heads);
}

// rpb_grad[h] += the bias partials (whole_group_backward_slices, bf16_whole_group_backward_slices) of the tasks of
// slices [s0, s1) of head h.
template <typename T>
inline void sum_bias_partials(const T* partials, int64_t s0, int64_t s1, const Problem& p, T* rpb_grad) {
  const int64_t tasks = whole_group_tasks_per_slice(p), elems = p.rpb_h() * p.rpb_w(), per_slice = tasks * elems;
  // Per head a thread; in the calling thread where that is less work than starting them (DiNAT-T's 7x7 stage: 16
  // heads of one 13x13 partial each).
  const int64_t grain = (s1 - s0) * per_slice < (int64_t{1} << 16) ? p.heads : 1;
  parallel(p.heads, grain, [&](int64_t h) {
    T* const dst = rpb_grad + h * elems;
    for (int64_t bh = s0 + ((h - s0 % p.heads) % p.heads + p.heads) % p.heads; bh < s1; bh += p.heads) {
      const T* const slice = partials + (bh - s0) * per_slice;
      for (int64_t t = 0; t < tasks; ++t) {
        const T* const src = slice + t * elems;
        for (int64_t e = 0; e < elems; ++e) dst[e] += src[e];
      }
    }
  });
}

// The weighted sums of a tile's lanes l < lanes over kD-wide float rows: sum_n w_row(n)[l] * row(n, l), handed to
// store(l, c, sum) per vector c < kD / kLanes (w_row(n): the weights of term n, lane 0's first). A few lanes at a time
// with their sums in registers (a head dim of at most 4 vectors), each sum over n in order, one multiply-add per row.
// kShared: row(n, l) is the same row for every lane (whole-group tiles), so each of its vectors is loaded once per few
// lanes. Used by the float32 whole-group tiles (shared_row_weighted_sums, float32 outputs) and the bf16 query tiles
// (bf16_tile_weighted_values, bf16 outputs).
template <int64_t kD, bool kShared, typename T, typename WRow, typename Row, typename Store>
inline void lane_weighted_row_sums_of(const WRow& w_row, int64_t count, int64_t lanes, const Row& row,
                                      const Store& store) {
  static_assert(kD > 0 && kD % kLanes == 0 && kD / kLanes <= 4, "the sums stay in registers: at most 4 vectors");
  using V = Lanes<T>;
  constexpr int64_t kVectors = kD / kLanes, kQueries = kVectors <= 2 ? 4 : 2;
  const auto some_lanes = [&](int64_t l0, auto lanes_at_once) {
    constexpr int64_t kCount = decltype(lanes_at_once)::value;
    V acc[kCount][kVectors] = {};
    for (int64_t n = 0; n < count; ++n) {
      const T* wn = w_row(n) + l0;
      if constexpr (kShared) {
        const T* r = row(n, l0);
        for (int64_t c = 0; c < kVectors; ++c) {
          const V x = load_lanes(r + c * kLanes);
          for (int64_t u = 0; u < kCount; ++u) acc[u][c] += wn[u] * x;
        }
      } else {
        for (int64_t u = 0; u < kCount; ++u) {
          const T* r = row(n, l0 + u);
          for (int64_t c = 0; c < kVectors; ++c) acc[u][c] += wn[u] * load_lanes(r + c * kLanes);
        }
      }
    }
    for (int64_t u = 0; u < kCount; ++u) {
      for (int64_t c = 0; c < kVectors; ++c) store(l0 + u, c, acc[u][c]);
    }
  };
  int64_t l0 = 0;
  for (; l0 + kQueries <= lanes; l0 += kQueries) some_lanes(l0, std::integral_constant<int64_t, kQueries>{});
  for (; l0 < lanes; ++l0) some_lanes(l0, std::integral_constant<int64_t, 1>{});
}

// lane_weighted_row_sums_of with term n's weights at w + n * w_stride.
template <int64_t kD, bool kShared, typename T, typename Row, typename Store>
inline void lane_weighted_row_sums(const T* w, int64_t w_stride, int64_t count, int64_t lanes, const Row& row,
                                   const Store& store) {
  lane_weighted_row_sums_of<kD, kShared, T>([&](int64_t n) { return w + n * w_stride; }, count, lanes, row, store);
}

}  // namespace

#endif  // DINAT_M2F_NA_WHOLE_GROUP_CPU_ISA_H
