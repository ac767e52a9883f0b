// CPU kernels of fused neighborhood attention: out = softmax(scale * q.k + rpb) v.
//
// Forward: one query at a time, its kh * kw logits in a small buffer (one max, one exp over the window), so no
// attention weights are materialised in memory; the row logsumexp is stored for the backward. Tiles of kLanes
// interior queries run lane-parallel with an online softmax (forward_tile, where DINAT_M2F_CPU_QUERY_TILES is set), in
// float32 two query rows of a dilation group at a time where their logits fit the registers (forward_tile_pair). In
// float32 on AVX-512 every query of a row goes through gathered tiles instead (GatherTile: borders and narrow dilation
// groups included, K and V columns permuted into lanes).
// Backward (flash-style, spec 1.4): delta_i = dO_i . O_i; the weights are recomputed as P = exp(scale q.k + rpb - lse),
// dS = P (dO . v - delta); dQ gathers over the window, dK and dV gather over the inverse neighborhood, so no races.
// P and dS of a bounded group of (batch, head) slices are kept in a workspace between the query pass and the key pass.
// With saved weights (training, fused_forward_with_attn / fused_backward_with_attn): the forward also writes the
// normalized weights P, and the backward reads them instead of recomputing q.k, so its query pass is dO . v, dS and dQ
// only (one window product fewer than the recomputing backward, as many as the unfused backward), query by query
// (backward_saved_kernel).
// Windows that are their whole dilation group (maps of k * d, e.g. 56x56 d 8) take dense per-group products instead,
// forward and saved-weights backward alike (whole_group_tile, whole_group_backward_slices).
//
// Included by native/na/na_cpu_isa_kernels.h inside one ISA's namespace and `#pragma GCC target` region (no include
// guard: each ISA translation unit includes it once).

namespace {

// Logits of the whole window of query (i, j): out[ki kw + kj] = scale * q . k_{(si + ki dh, sj + kj dw)} + rpb, and
// the window's key rows in keys[0 .. kh kw) (x: k or v tokens).
template <typename T, int64_t kD>
inline void window_keys(Slice<const T> x, int64_t i, int64_t j, const Problem& p, const Windows& win, const T** keys) {
  for (int64_t ki = 0; ki < p.kh; ++ki) {
    const T* row = x.row_at(win.h.start[i] + ki * p.dh);
    for (int64_t kj = 0; kj < p.kw; ++kj) {
      keys[ki * p.kw + kj] = row + (win.w.start[j] + kj * p.dw) * x.col;
    }
  }
}

template <typename T, int64_t kD>
inline void window_logits(const T* qv, const T* const* keys, const T* rpb, T scale, int64_t bh, int64_t i, int64_t j,
                          const Problem& p, const Windows& win, T* out) {
  const int64_t D = kD > 0 ? kD : p.dim, KK = p.window(), RH = p.rpb_h(), RW = p.rpb_w();
  dots(qv, keys, KK, D, out);
  for (int64_t n = 0; n < KK; ++n) {
    out[n] *= scale;
  }
  if (rpb != nullptr) {
    const int64_t h = bh % p.heads;
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      const T* brow = rpb + (h * RH + win.h.bias[i] + ki) * RW + win.w.bias[j];
      for (int64_t kj = 0; kj < p.kw; ++kj) {
        out[ki * p.kw + kj] += brow[kj];
      }
    }
  }
}

// Calls fn(j) for every position j < W along W, dilation group by dilation group (r, r + dw, r + 2 dw, ..., then
// r + 1, ...): consecutive calls then share all but one window column (the keys of the query passes, the queries of
// the key pass), still in L1. In position order the next position of a group came dw calls later, after the data of
// dw - 1 other groups, from L2: at d 8 on 56 columns that made the key pass twice as slow as at d 1.
template <typename F>
inline void for_each_in_group_order(int64_t W, int64_t dw, const F& fn) {
  for (int64_t r = 0; r < std::min(dw, W); ++r) {
    for (int64_t j = r; j < W; j += dw) fn(j);
  }
}

// The rows along H in dilation-group order (r, r + dh, r + 2 dh, ..., then r + 1, ...), for the saved-weights
// backward's passes over rows: consecutive rows then share all but one window row (query pass: k and v rows; key
// pass: q, dO, P and dS rows). In row order each row's window rows were new to the cache at large dilations: backward
// alone, row / group order, 1x2x128x128 k7 d16 1.23x, 1x6x160x160 k11 d14 1.30x, the same bits.
inline std::vector<int64_t> rows_in_group_order(const Problem& p) {
  std::vector<int64_t> rows;
  rows.reserve(p.height);
  for (int64_t r = 0; r < std::min(p.dh, p.height); ++r) {
    for (int64_t i = r; i < p.height; i += p.dh) rows.push_back(i);
  }
  return rows;
}

// for_each_in_group_order in blocks: kB positions x, x + dw, ..., x + (kB - 1) dw of one group go to block(x, shift)
// where shift = fits(x) is 0 or 1 (see dispatch_block_shift), the others (fits: -1) to one(x) one at a time (the
// kernels' borders), in the same order of groups and positions.
template <int kB, typename Fits, typename One, typename Block>
inline void for_each_block_in_group_order(int64_t W, int64_t dw, const Fits& fits, const One& one, const Block& block) {
  for (int64_t r = 0; r < std::min(dw, W); ++r) {
    int64_t x = r;
    while (x + (kB - 1) * dw < W) {
      const int shift = fits(x);
      if (shift < 0) {  // alone: the block starts after it
        one(x);
        x += dw;
        continue;
      }
      block(x, shift);
      x += kB * dw;
    }
    for (; x < W; x += dw) one(x);
  }
}

// How the windows (or inverse windows) of a block's kB positions along W relate: kShift 1, each is the previous one's
// moved by one group column (interior positions); kShift 0, all the same (clamped positions at a border, e.g. the
// first queries of a group of 8 columns at k 7: 4 windows starting at its column 0, then 4 at column 1). Calls
// fn(std::integral_constant<int, shift>) for shift 0 or 1.
template <typename F>
inline void dispatch_block_shift(int shift, const F& fn) {
  if (shift == 1) return fn(std::integral_constant<int, 1>{});
  return fn(std::integral_constant<int, 0>{});
}

// Each query's window start along W in group positions (start / dw), so that a key's window column in it is
// x / dw - that, with no integer division per (key, query).
inline std::vector<int64_t> group_starts(const Problem& p, const Windows& win) {
  std::vector<int64_t> starts(p.width);
  for (int64_t j = 0; j < p.width; ++j) starts[j] = win.w.start[j] / p.dw;
  return starts;
}

// The query rows i whose window holds key row xi, with xi's window row ki in each: once per key row, not per key.
struct KeyRowSlot {
  int64_t i, ki;
};

inline void key_row_slots(int64_t xi, const Problem& p, const Windows& win, std::vector<KeyRowSlot>& out) {
  out.clear();
  for (int64_t i = win.h.inverse[xi].begin; i < win.h.inverse[xi].end; i += p.dh) {
    out.push_back({i, window_slot(xi, win.h.start[i], p.dh)});
  }
}

// A compiled head dim of at most 4 whole vectors: the sums over a window (dQ, dK, dV) can stay in registers.
template <typename T, int64_t kD>
inline constexpr bool kRowsInRegisters = kD > 0 && kD % kLanes == 0 && kD / kLanes <= 4;

// One row of kD values as kD / kLanes vectors, kept in registers by the sums over a window: an axpy into a row in
// memory reloads and stores it per term (the compiler cannot rule out aliasing with the weights read in the loop),
// and that store-to-load chain, not the multiply-adds, bounded the key pass.
template <typename T, int64_t kD>
struct RegisterRow {
  static constexpr int64_t kVectors = kD / kLanes;
  Lanes<T> v[kVectors];
  RegisterRow() {
    for (int64_t c = 0; c < kVectors; ++c) v[c] = Lanes<T>{};
  }
  void add(T alpha, const T* x) {
    for (int64_t c = 0; c < kVectors; ++c) v[c] += alpha * load_lanes(x + c * kLanes);
  }
  void store(T alpha, T* out) const {
    for (int64_t c = 0; c < kVectors; ++c) store_lanes(out + c * kLanes, v[c] * alpha);
  }
};

// Query tiles: kLanes consecutive queries of one dilation group along W whose windows are not clamped along W (the
// "interior"). Their keys at window column kj are consecutive group columns (lane l: j'0 - kw/2 + kj + l), so with
// k and v transposed to [BH * H, D, W] (W ordered by dilation group) every window slot is kLanes-wide contiguous
// loads: logits and the weighted sum become lane-parallel multiply-adds with no horizontal reductions.

// The W' order of the columns, group by group (r = 0..dw-1, then r + dw, r + 2 dw, ...): perm[c] is the column at W'
// position c, group_offset[r] the first W' position of group r.
#if DINAT_M2F_CPU_LANES == 16
// ----------------------------------------------------------------------------------------------- gathered tiles
// Gathered query tiles (AVX-512, float32): kLanes consecutive queries of a row in W' order, whatever their windows:
// clamped ones at the borders and ones of the next dilation group too. Lane l's first key is W' column base + key[l]
// (its window's columns are consecutive in W'), and every key a tile reads lies within 32 columns of base (tiles end
// early where the next query's would not). So each (d, window column) vector of K or V is a two-register permute
// (vpermt2ps) of the 32 columns at base, loaded twice per d: the lane-parallel products of forward_tile for every
// query of a row, where dilation groups narrower than kLanes + kw - 1 (most dilated layers at segmentation crops:
// 128 / 16, 64 / 8, 80 / 4 columns) left forward_tile no queries and every query went through forward_query.
struct GatherTile {
  alignas(64) int32_t key[kLanes];   // lane l's first key column - base
  alignas(64) int32_t bias[kLanes];  // lane l's first bias column (win.w.bias of its query)
  int64_t col[kLanes];               // lane l's query column j
  int64_t lanes;                     // the tile's queries; lanes past them repeat the last (computed, not stored)
  int64_t base;                      // W' column of lane 0's first key
};

// The gathered tiles of a row (they depend on the columns only): W' positions in order, kLanes at a time or fewer.
inline std::vector<GatherTile> gather_tiles(const Problem& p, const Windows& win, const std::vector<int64_t>& perm,
                                            const std::vector<int64_t>& group_offset) {
  const int64_t W = p.width;
  std::vector<int64_t> first(W);  // W' column of the first key of the query at W' position n
  for (int64_t n = 0; n < W; ++n) {
    const int64_t j = perm[n], r = j % p.dw;
    first[n] = group_offset[r] + (win.w.start[j] - r) / p.dw;
  }
  std::vector<GatherTile> tiles;
  for (int64_t n0 = 0; n0 < W;) {
    GatherTile t{};
    t.base = first[n0];
    int64_t lanes = 0;
    while (lanes < kLanes && n0 + lanes < W && first[n0 + lanes] + p.kw - t.base <= 2 * kLanes) ++lanes;
    t.lanes = lanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t n = n0 + std::min(l, lanes - 1);
      t.key[l] = static_cast<int32_t>(first[n] - t.base);
      t.bias[l] = static_cast<int32_t>(win.w.bias[perm[n]]);
      t.col[l] = perm[n];
    }
    tiles.push_back(t);
    n0 += lanes;
  }
  return tiles;
}

#endif

struct GroupOrder {
  std::vector<int64_t> perm;
  std::vector<int64_t> group_offset;
#if DINAT_M2F_CPU_LANES == 16
  std::vector<GatherTile> gather;  // every row's gathered tiles where the forward uses them (uses_gathered_tiles)
#endif
};

inline GroupOrder group_order(const Problem& p) {
  GroupOrder order;
  order.perm.reserve(p.width);
  for (int64_t r = 0; r < p.dw && r < p.width; ++r) {
    order.group_offset.push_back(static_cast<int64_t>(order.perm.size()));
    for (int64_t j = r; j < p.width; j += p.dw) order.perm.push_back(j);
  }
  return order;
}

#if defined(__x86_64__)
inline void transpose_8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

// dst[c * dst_stride + r] = row(r)[c] for r < rows, c < cols: whole 8 x 8 blocks in registers (float32), the rest
// one value at a time. row(r): a pointer to row r.
template <typename T, typename Row>
void transpose_rows(const Row& row, int64_t rows, int64_t cols, T* dst, int64_t dst_stride) {
  int64_t rows8 = 0, cols8 = 0;
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    rows8 = rows - rows % 8;
    cols8 = cols - cols % 8;
    for (int64_t r0 = 0; r0 < rows8; r0 += 8) {
      for (int64_t c0 = 0; c0 < cols8; c0 += 8) {
        __m256 x[8];
        for (int64_t i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(row(r0 + i) + c0);
        transpose_8x8(x);
        for (int64_t i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (c0 + i) * dst_stride + r0, x[i]);
      }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const T* const src = row(r);
    for (int64_t c = r < rows8 ? cols8 : 0; c < cols; ++c) dst[c * dst_stride + r] = src[c];
  }
}

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows, c < cols.
template <typename T>
void transpose_block(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst, int64_t dst_stride) {
  transpose_rows<T>([&](int64_t r) { return src + r * src_stride; }, rows, cols, dst, dst_stride);
}

// k and v of the slices [s0, s1) as [s1 - s0, H, D, W'] (contiguous, W' in group order) into kt and vt, both in one
// parallel loop. Done per group of slices right before the passes that read them, so the transposed rows are still in
// cache there: transposing all of k and v up front (four times 6.4 MB at 8x2x56x56x32) sent them through memory.
// Row i of k (or v) slice `slice` as [D, W'] (W' in group order) at out: one transpose_block per dilation group, whose
// tokens (r, r + dw, ...) are equally spaced (a value at a time cost a tenth of the fused backward's time at 56x56 d
// 1).
template <typename T>
void group_transpose_row(Slice<const T> slice, int64_t i, const GroupOrder& order, const Problem& p, T* out) {
  const int64_t W = p.width, D = p.dim;
  const int64_t groups = static_cast<int64_t>(order.group_offset.size());
  for (int64_t r = 0; r < groups; ++r) {
    const int64_t c0 = order.group_offset[r], c1 = r + 1 < groups ? order.group_offset[r + 1] : W;
    transpose_block(slice.at(i, r), p.dw * slice.col, c1 - c0, D, out + c0, W);
  }
}

// k and v of the slices [s0, s1) as [s1 - s0, H, D, W'] (contiguous, W' in group order) into kt and vt, both in one
// parallel loop. Done per group of slices right before the passes that read them, so the transposed rows are still in
// cache there: transposing all of k and v up front (four times 6.4 MB at 8x2x56x56x32) sent them through memory.
template <typename T>
void group_transpose_slices(Strided<const T> k, Strided<const T> v, int64_t s0, int64_t s1, const GroupOrder& order,
                            const Problem& p, T* kt, T* vt) {
  const int64_t H = p.height, W = p.width, D = p.dim, rows = (s1 - s0) * H;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(W * D, 1));  // a row is W * D copies
  parallel(2 * rows, grain, [&](int64_t task) {
    const bool is_v = task >= rows;
    const int64_t local_row = is_v ? task - rows : task;
    const int64_t bh = s0 + local_row / H, i = local_row % H;
    group_transpose_row((is_v ? v : k).slice(bh), i, order, p, (is_v ? vt : kt) + local_row * D * W);
  });
}

// (batch, head) slices per group of the fused kernels: as many as fit their per-slice scratch (transposed k and v,
// the backward's P / dS workspace) into about the L2 caches, at least one. The passes over a group then find what the
// previous pass wrote in cache; one group of all slices (8x2x56x56: 23 MB of workspace and transposes) made every
// pass stream it from memory, and batch 8 ran at half the per-image speed of batch 1 with two threads.
inline int64_t slices_per_group(int64_t bytes_per_slice, const Problem& p) {
  constexpr int64_t kGroupBytes = int64_t{2} << 20;
  return std::clamp<int64_t>(kGroupBytes / std::max<int64_t>(bytes_per_slice, 1), 1, p.batch_heads);
}

// A grow-only scratch array kept between calls per calling thread: the fresh pages of a new allocation cost page
// faults and zeroing comparable to a pass over them (measured with perf). Every caller writes what it reads.
// 64-byte aligned, as a tensor's data: with a vector's 16-byte alignment half the 32-byte row loads of the per-query
// dots crossed a cache line (perf: 1.5x float32's dots time in the bf16 widened-slice forward at 1x4x28x28 k7, AVX2).
template <typename T>
T* kept_scratch(int64_t elems) {
  constexpr int64_t kAlign = 64 / sizeof(T);
  thread_local std::vector<T> scratch;
  // kSlack more: gathered tiles load 32 columns at their base, past the end of the last transposed row.
  constexpr int64_t kSlack = 32;
  if (scratch.size() < static_cast<size_t>(elems + kAlign + kSlack)) {
    scratch.resize(static_cast<size_t>(elems + kAlign + kSlack));
  }
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(scratch.data()) % 64 / sizeof(T));
  return scratch.data() + (misalign == 0 ? 0 : kAlign - misalign);
}

// Token-strided inputs (q, k, v sliced from the packed qkv projection output [B, H, W, 3, heads, D]; a heads-last
// grad_out) put neighbouring tokens 3 heads D values apart. At DiNAT's shapes a window's tokens then lie multiples of
// 4 KiB apart, in the same few L1 sets, and the passes that read each token once per window holding it ran 1.2-1.5x
// slower than on contiguous slices (float32, one thread, 2x4x64x64x32 k7 d8 and 1x12x64x64x32 k11 d4). Those passes
// read a contiguous copy of each group of slices instead, made right before them, while it is in cache.
inline bool tokens_are_contiguous(const Strides& s, const Problem& p) {
  return s.col == p.dim && (p.height == 1 || s.row == p.width * p.dim);
}

// How many of xs are token-strided: the tensors stage_slices copies (each group * H * W * D values of scratch).
inline int64_t strided_token_tensors(const Problem& p, std::initializer_list<Strides> xs) {
  int64_t n = 0;
  for (const Strides& s : xs) n += tokens_are_contiguous(s, p) ? 0 : 1;
  return n;
}

// Slices [s0, s1) of x, token-strided, copied into stage (the next (s1 - s0) * H * W * D values at *stage, which it
// advances) as [s1 - s0, H, W, D]; returns the copy, addressed by the slices' own numbers. x itself when its tokens
// are contiguous.
template <typename T>
Strided<const T> stage_slices(Strided<const T> x, int64_t s0, int64_t s1, const Problem& p, T** stage) {
  if (tokens_are_contiguous(x.s, p)) return x;
  const int64_t H = p.height, W = p.width, D = p.dim, rows = (s1 - s0) * H;
  T* const dst = *stage;
  *stage += rows * W * D;
  parallel(rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(W * D, 1)), [&](int64_t row) {
    const Slice<const T> src = x.slice(s0 + row / H);
    const int64_t i = row % H;
    T* const out = dst + row * W * D;
    for (int64_t j = 0; j < W; ++j) std::memcpy(out + j * D, src.at(i, j), static_cast<size_t>(D) * sizeof(T));
  });
  Strided<const T> staged{dst, contiguous_strides(p, D)};
  staged.s.origin = staged.s.slice(s0);
  return staged;
}

// Row i's queries dilation group by dilation group: each full tile of kLanes interior queries (windows not clamped
// along W) goes to tile(r, jg, col0) (group r, its queries jg .. jg + kLanes - 1, col0 the W' column of lane 0's first
// key), every other query to one_query(j).
template <typename One, typename Tile>
inline void for_each_tile_or_query(const Problem& p, const std::vector<int64_t>& group_offset, const One& one_query,
                                   const Tile& tile) {
  const int64_t W = p.width, half = p.kw / 2;
  for (int64_t r = 0; r < std::min(p.dw, W); ++r) {
    const int64_t glen = group_length(r, W, p.dw);
    const int64_t interior_end = glen - half;  // exclusive: queries [half, glen - half) have unclamped windows
    int64_t jg = 0;
    while (jg < glen) {
      if (jg >= half && jg + kLanes <= interior_end) {
        tile(r, jg, group_offset[r] + jg - half);
        jg += kLanes;
      } else {
        one_query(r + p.dw * jg);
        ++jg;
      }
    }
  }
}

// True when some dilation group along W holds a full tile of interior queries, the ISA uses tiles and kw is one of
// dispatch_window_width's.
inline bool has_interior_tiles(const Problem& p) {
  if (!DINAT_M2F_CPU_QUERY_TILES) return false;
  bool compiled = false;
  dispatch_window_width(p.kw, [&](auto kw) { compiled = kw.value > 0; });
  const int64_t longest_group = group_length(0, p.width, p.dw);
  return compiled && longest_group - 2 * (p.kw / 2) >= kLanes;
}

// Whether the forward runs every query of a row through gathered tiles: float32 on AVX-512 with a compiled kw. They
// replace the interior tiles and the per-query border there too: forward alone, gathered / interior-and-per-query
// time at DiNAT's d 1 stages 1.00-1.89x (1x4x56x56 to 1x16x16x16 k 7, 1x6x160x160 to 1x48x20x20 k 11), 1.57-2.27x
// where the dilation groups held no interior tile (see GatherTile).
template <typename T>
inline bool uses_gathered_tiles(const Problem& p) {
#if DINAT_M2F_CPU_LANES == 16
  if constexpr (std::is_same_v<T, float>) {
    bool compiled = false;
    dispatch_window_width(p.kw, [&](auto kw) { compiled = kw.value > 0; });
    return compiled;
  }
#endif
  return false;
}

// Whether the forward of T uses query tiles: interior ones (has_interior_tiles) or gathered ones.
template <typename T>
bool has_query_tiles(const Problem& p) {
  return has_interior_tiles(p) || uses_gathered_tiles<T>(p);
}

// The W' order of a forward with tiles, with the gathered tiles where it uses them.
template <typename T>
inline GroupOrder forward_group_order(const Problem& p, const Windows& win) {
  GroupOrder order = group_order(p);
#if DINAT_M2F_CPU_LANES == 16
  if (uses_gathered_tiles<T>(p)) order.gather = gather_tiles(p, win, order.perm, order.group_offset);
#endif
  return order;
}

// A tile's per-lane rows of window values (lane l's n values at rows + l * stride: its P or dS row) and the same
// values as per-slot vectors (slots[m * kLanes + l]), converted 8 x 8 blocks at a time in registers; the last n % 8
// slots (1 for every odd square window) one by one. Reading or writing the kLanes rows one value at a time cost
// two instructions per value, as much as a tile's multiply-adds.
template <typename T>
void rows_to_slots(const T* rows, int64_t stride, int64_t n, T* slots) {
  transpose_block(rows, stride, kLanes, n, slots, kLanes);
}

template <typename T>
void slots_to_rows(const T* slots, int64_t n, T* rows, int64_t stride) {
  transpose_block(slots, kLanes, n, kLanes, rows, stride);
}

// Arrays of T, read and written as Lanes<T> (element-aligned vectors, see na_cpu_simd.h): a std::vector of the
// vector type itself would be allocated with the alignment of the baseline ISA, not the one the region's code assumes.
template <typename T>
struct TileScratch {
  std::vector<T> qt, acc;
  std::vector<T> logits;     // saving the weights: the tile's kh * kw logits ([slot][lanes]); empty otherwise
  std::vector<T> lane_rows;  // saving the weights from a gathered tile: its P as [lane][kh * kw]
  TileScratch(int64_t dim, int64_t window_if_saving)
      : qt(dim * kLanes), acc(dim * kLanes), logits(window_if_saving * kLanes), lane_rows(window_if_saving * kLanes) {}
};

// v, kept in a register: the compiler otherwise folds a load that feeds several multiply-adds into each of them as a
// memory operand, which loads it again per multiply-add (two-row tiles loaded every K and V vector twice).
template <typename V>
inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

// acc_n[d] = acc_n[d] * factor[n] + sum_kj w[n kw + kj] x[d W + kj] for the kN rows of a tile window row: the
// forward's online-softmax weighted sum of V. Each x vector is loaded once for all kN rows.
template <typename T, int64_t kKW, int kN>
inline void add_weighted_window_columns(const Lanes<T>* w, const Lanes<T>* factor, const T* x, int64_t W, int64_t D,
                                        Lanes<T>* const* acc) {
  using V = Lanes<T>;
  for (int64_t d = 0; d < D; ++d) {
    V a[kN];
    for (int n = 0; n < kN; ++n) a[n] = acc[n][d] * factor[n];
    const T* xd = x + d * W;
    for (int64_t kj = 0; kj < kKW; ++kj) {
      V value = load_lanes(xd + kj);
      if constexpr (kN > 1) value = in_register(value);
      for (int n = 0; n < kN; ++n) a[n] += w[n * kKW + kj] * value;
    }
    for (int n = 0; n < kN; ++n) acc[n][d] = a[n];
  }
}

// The window rows of query rows ia < ib = ia + dh of one dilation group along H, top to bottom, as their rows of the
// group-transposed k and v (kt, vt: the slice's, col0: lane 0's first key column): both(krow, vrow, ki) with ki = the
// window rows of ia and ib for the key rows both windows hold, one(krow, vrow, ki, second) for the one the other
// lacks (second: it is ib's). Their windows start at most one group row apart, so ib's key rows are ia's shifted by
// 0 or 1.
template <typename T, typename Both, typename One>
inline void for_each_window_row_of_pair(const T* kt, const T* vt, int64_t col0, int64_t D, const Problem& p,
                                        const Windows& win, int64_t ia, int64_t ib, const Both& both, const One& one) {
  const int64_t start_a = win.h.start[ia], shift = (win.h.start[ib] - start_a) / p.dh;
  TORCH_CHECK(shift == 0 || shift == 1, "na fused CPU kernels: query rows ", ia, " and ", ib,
              " are not neighbours in a dilation group");
  for (int64_t t = 0; t < p.kh + shift; ++t) {
    const int64_t offset = (start_a + t * p.dh) * D * p.width + col0;
    if (t >= shift && t < p.kh) {
      const int64_t ki[2] = {t, t - shift};
      both(kt + offset, vt + offset, ki);
    } else if (t < p.kh) {
      one(kt + offset, vt + offset, t, false);
    } else {
      one(kt + offset, vt + offset, t - shift, true);
    }
  }
}

// The online-softmax state of one query row of a forward tile: its Q (scaled, [D][lanes]) and weighted-sum
// accumulators in the row's TileScratch, the running max and sum, the bias row base and, when saving the weights, where
// its logits go.
template <typename T>
struct TileRow {
  Lanes<T>* qt;
  Lanes<T>* acc;
  Lanes<T> running_max, running_sum;
  const T* bias;   // the row's first bias row at the window's column kw / 2 (nullptr: no bias); + ki * rpb_w per row
  T* kept_logits;  // nullptr unless saving the weights
};

// Starts a forward tile row: the kLanes queries (i, j0 + dw * l) of q transposed and scaled into s.qt, acc zeroed.
template <typename T, int64_t kKW>
inline TileRow<T> tile_row_begin(Slice<const T> q, const T* rpb, int64_t h, int64_t i, int64_t j0, const Problem& p,
                                 const Windows& win, T scale, int64_t D, TileScratch<T>& s) {
  using V = Lanes<T>;
  TileRow<T> row{reinterpret_cast<V*>(s.qt.data()),
                 reinterpret_cast<V*>(s.acc.data()),
                 V{} - std::numeric_limits<T>::infinity(),
                 V{},
                 rpb != nullptr ? rpb + (h * p.rpb_h() + win.h.bias[i]) * p.rpb_w() + kKW / 2 : nullptr,
                 s.logits.empty() ? nullptr : s.logits.data()};
  // The tile's rows in and out 8 x 8 blocks at a time (rows_to_slots, slots_to_rows): one value at a time, each
  // vector was built from kLanes scalar stores, and reading it back stalled on store forwarding.
  rows_to_slots(q.at(i, j0), p.dw * q.col, D, reinterpret_cast<T*>(row.qt));
  for (int64_t d = 0; d < D; ++d) {
    row.qt[d] *= scale;
    row.acc[d] = V{};
  }
  return row;
}

// One window row of kN tile rows that all read key row `krow` / `vrow` (k and v group-transposed, lane 0's first
// key), ki[n] being that key row's window row for tile row n. Each K and V vector is loaded once for all kN rows: with
// two rows a load feeds two multiply-adds, and the unaligned (mostly cache-line-split) loads, not the multiply-adds,
// bounded the one-row tile. The row's kw logits (then weights) stay in registers, and each Q / accumulator vector is
// loaded once per window row, not once per key.
template <typename T, int64_t kD, int64_t kKW, int kN>
inline void tile_window_row(TileRow<T>* const* rows, const int64_t* ki, const T* krow, const T* vrow, int64_t W,
                            int64_t D, int64_t rpb_w) {
  using V = Lanes<T>;
  constexpr int64_t KW = kKW;
  V logit[kN][KW];
  for (int n = 0; n < kN; ++n) {
    const T* brow = rows[n]->bias != nullptr ? rows[n]->bias + ki[n] * rpb_w : nullptr;
    for (int64_t kj = 0; kj < KW; ++kj) logit[n][kj] = V{} + (brow != nullptr ? brow[kj] : T(0));
  }
  for (int64_t d = 0; d < D; ++d) {
    V qd[kN];
    for (int n = 0; n < kN; ++n) qd[n] = rows[n]->qt[d];
    const T* kd = krow + d * W;
    for (int64_t kj = 0; kj < KW; ++kj) {
      V key = load_lanes(kd + kj);
      if constexpr (kN > 1) key = in_register(key);
      for (int n = 0; n < kN; ++n) logit[n][kj] += qd[n] * key;
    }
  }
  V factor[kN];
  for (int n = 0; n < kN; ++n) {
    TileRow<T>& row = *rows[n];
    V new_max = row.running_max;
    for (int64_t kj = 0; kj < KW; ++kj) {
      if (row.kept_logits != nullptr) store_lanes(row.kept_logits + (ki[n] * KW + kj) * kLanes, logit[n][kj]);
      new_max = logit[n][kj] > new_max ? logit[n][kj] : new_max;
    }
    factor[n] = exp_lanes(row.running_max - new_max);  // rescale what was accumulated under the old max
    row.running_max = new_max;
    row.running_sum *= factor[n];
    for (int64_t kj = 0; kj < KW; ++kj) {
      logit[n][kj] = exp_lanes(logit[n][kj] - row.running_max);  // the unnormalised weights in place of the logits
      row.running_sum += logit[n][kj];
    }
  }
  V* acc[kN];
  for (int n = 0; n < kN; ++n) acc[n] = rows[n]->acc;
  add_weighted_window_columns<T, KW, kN>(&logit[0][0], factor, vrow, W, D, acc);
}

// Ends a forward tile row: O = acc / sum into out's queries (i, j0 + dw * l), their logsumexp into lse.
template <typename T>
inline void tile_row_end(TileRow<T>& row, Slice<T> out, T* lse, int64_t bh, int64_t i, int64_t j0, const Problem& p,
                         int64_t D) {
  const Lanes<T> inv = T(1) / row.running_sum;
  for (int64_t d = 0; d < D; ++d) row.acc[d] *= inv;
  slots_to_rows(reinterpret_cast<const T*>(row.acc), D, out.at(i, j0), p.dw * out.col);
  const int64_t token0 = (bh * p.height + i) * p.width + j0;
  for (int64_t l = 0; l < kLanes; ++l) {
    lse[token0 + p.dw * l] = row.running_max[l] + std::log(row.running_sum[l]);
  }
}

// Forward of the kLanes interior queries (i, r + dw * (jg0 + l)), l < kLanes, of slice bh; col0 is the W' column of
// lane 0's first key. Lane-parallel: Q is transposed to [D][lanes], and K, V rows are read kLanes columns at a time,
// one window row at a time (tile_window_row).
template <typename T, int64_t kD, int64_t kKW>
void forward_tile(Slice<const T> q, const T* kt, const T* vt, const T* rpb, Slice<T> out, T* lse, int64_t bh, int64_t i,
                  int64_t r, int64_t jg0, int64_t col0, const Problem& p, const Windows& win, T scale,
                  TileScratch<T>& s) {
  static_assert(kKW > 0, "forward tiles need a compile-time window width");
  const int64_t W = p.width, D = kD > 0 ? kD : p.dim, j0 = r + p.dw * jg0;
  TileRow<T> row = tile_row_begin<T, kKW>(q, rpb, bh % p.heads, i, j0, p, win, scale, D, s);
  TileRow<T>* rows[1] = {&row};
  for (int64_t ki = 0; ki < p.kh; ++ki) {
    const int64_t key_row = win.h.start[i] + ki * p.dh;
    tile_window_row<T, kD, kKW, 1>(rows, &ki, kt + key_row * D * W + col0, vt + key_row * D * W + col0, W, D,
                                   p.rpb_w());
  }
  tile_row_end(row, out, lse, bh, i, j0, p, D);
}

// Whether forward tiles of window width kKW run two query rows at a time (forward_tile_pair): their 2 * kw logits,
// two Q vectors and a key must fit the ISA's vector registers (32 with AVX-512, 16 with AVX2) with room to spare.
template <typename T, int64_t kKW>
inline constexpr bool kPairTiles = std::is_same_v<T, float> && 2 * kKW + 6 <= (kLanes == 16 ? 32 : 16);

// forward_tile for query rows ia < ib = ia + dh of one dilation group along H: the window rows both read are loaded
// once for both (for_each_window_row_of_pair). Each row sees its own key rows in forward_tile's order: the same bits.
template <typename T, int64_t kD, int64_t kKW>
void forward_tile_pair(Slice<const T> q, const T* kt, const T* vt, const T* rpb, Slice<T> out, T* lse, int64_t bh,
                       int64_t ia, int64_t ib, int64_t r, int64_t jg0, int64_t col0, const Problem& p,
                       const Windows& win, T scale, TileScratch<T>& sa, TileScratch<T>& sb) {
  const int64_t W = p.width, D = kD > 0 ? kD : p.dim, j0 = r + p.dw * jg0, h = bh % p.heads;
  TileRow<T> a = tile_row_begin<T, kKW>(q, rpb, h, ia, j0, p, win, scale, D, sa);
  TileRow<T> b = tile_row_begin<T, kKW>(q, rpb, h, ib, j0, p, win, scale, D, sb);
  TileRow<T>* rows[2] = {&a, &b};
  for_each_window_row_of_pair(
      kt, vt, col0, D, p, win, ia, ib,
      [&](const T* krow, const T* vrow, const int64_t* ki) {
        tile_window_row<T, kD, kKW, 2>(rows, ki, krow, vrow, W, D, p.rpb_w());
      },
      [&](const T* krow, const T* vrow, int64_t ki, bool second) {
        tile_window_row<T, kD, kKW, 1>(rows + second, &ki, krow, vrow, W, D, p.rpb_w());
      });
  tile_row_end(a, out, lse, bh, ia, j0, p, D);
  tile_row_end(b, out, lse, bh, ib, j0, p, D);
}

#if DINAT_M2F_CPU_LANES == 16
// Starts a gathered tile row: its queries (i, col[l]) transposed and scaled into s.qt, acc zeroed; bias: the row's
// first bias row at column 0.
template <int64_t kKW>
inline TileRow<float> gathered_row_begin(Slice<const float> q, const float* rpb, int64_t h, int64_t i,
                                         const GatherTile& t, const Problem& p, const Windows& win, float scale,
                                         int64_t D, TileScratch<float>& s) {
  using V = Lanes<float>;
  TileRow<float> row{reinterpret_cast<V*>(s.qt.data()),
                     reinterpret_cast<V*>(s.acc.data()),
                     V{} - std::numeric_limits<float>::infinity(),
                     V{},
                     rpb != nullptr ? rpb + (h * p.rpb_h() + win.h.bias[i]) * p.rpb_w() : nullptr,
                     s.logits.empty() ? nullptr : s.logits.data()};
  transpose_rows<float>([&](int64_t l) { return q.at(i, t.col[l]); }, kLanes, D, s.qt.data(), kLanes);
  for (int64_t d = 0; d < D; ++d) {
    row.qt[d] *= scale;
    row.acc[d] = V{};
  }
  return row;
}

// tile_window_row for gathered tiles: krow / vrow are the key row's group-transposed k / v at column base.
template <int64_t kKW, int kN>
inline void gathered_window_row(TileRow<float>* const* rows, const int64_t* ki, const float* krow, const float* vrow,
                                int64_t W, int64_t D, int64_t rpb_w, const GatherTile& t) {
  using V = Lanes<float>;
  constexpr int64_t KW = kKW;
  const __m512i key0 = _mm512_load_si512(t.key);
  __m512i key_idx[KW];
  for (int64_t kj = 0; kj < KW; ++kj) key_idx[kj] = _mm512_add_epi32(key0, _mm512_set1_epi32(static_cast<int>(kj)));
  V logit[kN][KW];
  for (int n = 0; n < kN; ++n) {
    if (rows[n]->bias == nullptr) {
      for (int64_t kj = 0; kj < KW; ++kj) logit[n][kj] = V{};
      continue;
    }
    // The bias row (2 kw - 1 values) in two registers, masked: the last row of rpb ends the tensor.
    const float* brow = rows[n]->bias + ki[n] * rpb_w;
    const __m512 b0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << std::min<int64_t>(rpb_w, 16)) - 1u), brow);
    const __m512 b1 = rpb_w > 16 ? _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (rpb_w - 16)) - 1u), brow + 16)
                                 : _mm512_setzero_ps();
    const __m512i bias0 = _mm512_load_si512(t.bias);
    for (int64_t kj = 0; kj < KW; ++kj) {
      logit[n][kj] =
          (V)_mm512_permutex2var_ps(b0, _mm512_add_epi32(bias0, _mm512_set1_epi32(static_cast<int>(kj))), b1);
    }
  }
  for (int64_t d = 0; d < D; ++d) {
    V qd[kN];
    for (int n = 0; n < kN; ++n) qd[n] = rows[n]->qt[d];
    const __m512 r0 = _mm512_loadu_ps(krow + d * W), r1 = _mm512_loadu_ps(krow + d * W + 16);
    for (int64_t kj = 0; kj < KW; ++kj) {
      const V key = (V)_mm512_permutex2var_ps(r0, key_idx[kj], r1);
      for (int n = 0; n < kN; ++n) logit[n][kj] += qd[n] * key;
    }
  }
  // tile_window_row's online-softmax step, written out again: as one helper shared by both (logits through a
  // pointer) it ran 0.94-0.99x and GCC fused other multiply-adds (outputs differed in the last bit).
  V factor[kN];
  for (int n = 0; n < kN; ++n) {
    TileRow<float>& row = *rows[n];
    V new_max = row.running_max;
    for (int64_t kj = 0; kj < KW; ++kj) {
      if (row.kept_logits != nullptr) store_lanes(row.kept_logits + (ki[n] * KW + kj) * kLanes, logit[n][kj]);
      new_max = logit[n][kj] > new_max ? logit[n][kj] : new_max;
    }
    factor[n] = exp_lanes(row.running_max - new_max);
    row.running_max = new_max;
    row.running_sum *= factor[n];
    for (int64_t kj = 0; kj < KW; ++kj) {
      logit[n][kj] = exp_lanes(logit[n][kj] - row.running_max);
      row.running_sum += logit[n][kj];
    }
  }
  for (int64_t d = 0; d < D; ++d) {
    V a[kN];
    for (int n = 0; n < kN; ++n) a[n] = rows[n]->acc[d] * factor[n];
    const __m512 r0 = _mm512_loadu_ps(vrow + d * W), r1 = _mm512_loadu_ps(vrow + d * W + 16);
    for (int64_t kj = 0; kj < KW; ++kj) {
      const V value = (V)_mm512_permutex2var_ps(r0, key_idx[kj], r1);
      for (int n = 0; n < kN; ++n) a[n] += logit[n][kj] * value;
    }
    for (int n = 0; n < kN; ++n) rows[n]->acc[d] = a[n];
  }
}

// Ends a gathered tile row: O = acc / sum into its queries' rows of out, their logsumexp into lse, and when saving
// the weights their rows of P (from the kept logits).
inline void gathered_row_end(TileRow<float>& row, Slice<float> out, float* lse, float* weights, int64_t bh, int64_t i,
                             const GatherTile& t, const Problem& p, int64_t D, TileScratch<float>& s) {
  using V = Lanes<float>;
  const V inv = 1.0f / row.running_sum;
  for (int64_t d = 0; d < D; ++d) row.acc[d] *= inv;
  float rows_mem[kLanes * 64];  // [lane][d] (head dims up to 64)
  const int64_t token_row = (bh * p.height + i) * p.width;
  V row_lse;
  for (int64_t l = 0; l < kLanes; ++l) row_lse[l] = row.running_max[l] + std::log(row.running_sum[l]);
  if (D <= 64 && D % kLanes == 0) {
    // whole vectors per lane: a std::memcpy of D floats was a libc call per query
    transpose_block(reinterpret_cast<const float*>(row.acc), kLanes, D, kLanes, rows_mem, D);
    for (int64_t l = 0; l < t.lanes; ++l) {
      float* const o = out.at(i, t.col[l]);
      for (int64_t d = 0; d < D; d += kLanes) store_lanes(o + d, load_lanes(rows_mem + l * D + d));
    }
  } else if (D <= 64) {
    transpose_block(reinterpret_cast<const float*>(row.acc), kLanes, D, kLanes, rows_mem, D);
    for (int64_t l = 0; l < t.lanes; ++l) std::memcpy(out.at(i, t.col[l]), rows_mem + l * D, D * sizeof(float));
  } else {
    for (int64_t l = 0; l < t.lanes; ++l) {
      float* o = out.at(i, t.col[l]);
      for (int64_t d = 0; d < D; ++d) o[d] = row.acc[d][l];
    }
  }
  for (int64_t l = 0; l < t.lanes; ++l) lse[token_row + t.col[l]] = row_lse[l];
  if (weights == nullptr) return;
  const int64_t KK = p.window();
  float* const slots = s.logits.data();
  for (int64_t n = 0; n < KK; ++n) store_lanes(slots + n * kLanes, exp_lanes(load_lanes(slots + n * kLanes) - row_lse));
  float* const lane_rows = s.lane_rows.data();
  transpose_block(slots, kLanes, KK, kLanes, lane_rows, KK);
  for (int64_t l = 0; l < t.lanes; ++l) {
    std::memcpy(weights + (token_row + t.col[l]) * KK, lane_rows + l * KK, KK * sizeof(float));
  }
}

// Forward of gathered tile t of query row i of slice bh (kt, vt: the slice's group-transposed k and v).
template <int64_t kD, int64_t kKW>
void gathered_forward_tile(Slice<const float> q, const float* kt, const float* vt, const float* rpb, Slice<float> out,
                           float* lse, float* weights, int64_t bh, int64_t i, const GatherTile& t, const Problem& p,
                           const Windows& win, float scale, TileScratch<float>& s) {
  const int64_t W = p.width, D = kD > 0 ? kD : p.dim;
  TileRow<float> row = gathered_row_begin<kKW>(q, rpb, bh % p.heads, i, t, p, win, scale, D, s);
  TileRow<float>* rows[1] = {&row};
  for (int64_t ki = 0; ki < p.kh; ++ki) {
    const int64_t key_row = win.h.start[i] + ki * p.dh;
    gathered_window_row<kKW, 1>(rows, &ki, kt + key_row * D * W + t.base, vt + key_row * D * W + t.base, W, D,
                                p.rpb_w(), t);
  }
  gathered_row_end(row, out, lse, weights, bh, i, t, p, D, s);
}

// gathered_forward_tile for query rows ia < ib = ia + dh of one dilation group along H (as forward_tile_pair).
template <int64_t kD, int64_t kKW>
void gathered_forward_tile_pair(Slice<const float> q, const float* kt, const float* vt, const float* rpb,
                                Slice<float> out, float* lse, float* weights, int64_t bh, int64_t ia, int64_t ib,
                                const GatherTile& t, const Problem& p, const Windows& win, float scale,
                                TileScratch<float>& sa, TileScratch<float>& sb) {
  const int64_t W = p.width, D = kD > 0 ? kD : p.dim, h = bh % p.heads;
  TileRow<float> a = gathered_row_begin<kKW>(q, rpb, h, ia, t, p, win, scale, D, sa);
  TileRow<float> b = gathered_row_begin<kKW>(q, rpb, h, ib, t, p, win, scale, D, sb);
  TileRow<float>* rows[2] = {&a, &b};
  for_each_window_row_of_pair(
      kt, vt, t.base, D, p, win, ia, ib,
      [&](const float* krow, const float* vrow, const int64_t* ki) {
        gathered_window_row<kKW, 2>(rows, ki, krow, vrow, W, D, p.rpb_w(), t);
      },
      [&](const float* krow, const float* vrow, int64_t ki, bool second) {
        gathered_window_row<kKW, 1>(rows + second, &ki, krow, vrow, W, D, p.rpb_w(), t);
      });
  gathered_row_end(a, out, lse, weights, bh, ia, t, p, D, sa);
  gathered_row_end(b, out, lse, weights, bh, ib, t, p, D, sb);
}
#endif

// Forward of one query: all kh * kw logits first (the window is small), then one max, one vectorised exp over the
// whole window and the weighted sum of v; no online rescaling. logits and keys hold kh * kw values.
template <typename T, int64_t kD>
__attribute__((always_inline)) inline void forward_query(Slice<const T> q, Slice<const T> k, Slice<const T> v,
                                                         const T* rpb, Slice<T> out, T* lse, int64_t bh, int64_t i,
                                                         int64_t j, const Problem& p, const Windows& win, T scale,
                                                         T* acc, T* logits, const T** keys) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const int64_t row = bh * H + i;
  window_keys<T, kD>(k, i, j, p, win, keys);
  window_logits<T, kD>(q.at(i, j), keys, rpb, scale, bh, i, j, p, win, logits);
  const T max = max_of(logits, KK);
  exp_shifted(logits, max, logits, KK);
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t n = 0; n < KK; ++n) {
    sum += logits[n];
  }
  T* o = out.at(i, j);
  const T inv = T(1) / sum;
  lse[row * W + j] = max + std::log(sum);
  if constexpr (kRowsInRegisters<T, kD>) {
    RegisterRow<T, kD> weighted;
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      const T* vrow = v.row_at(win.h.start[i] + ki * p.dh);
      const T* prow = logits + ki * p.kw;
      for (int64_t kj = 0; kj < p.kw; ++kj) weighted.add(prow[kj], vrow + (win.w.start[j] + kj * p.dw) * v.col);
    }
    weighted.store(inv, o);
    return;
  }
  std::fill(acc, acc + D, T(0));
  for (int64_t ki = 0; ki < p.kh; ++ki) {
    const T* vrow = v.row_at(win.h.start[i] + ki * p.dh);
    const T* prow = logits + ki * p.kw;
    for (int64_t kj = 0; kj < p.kw; ++kj) {
      axpy(prow[kj], vrow + (win.w.start[j] + kj * p.dw) * v.col, acc, D);
    }
  }
  for (int64_t d = 0; d < D; ++d) {
    o[d] = acc[d] * inv;
  }
}

// Saving the weights: P of one query from forward_query's window buffer (exp(logit - max) on return).
template <typename T>
inline void store_query_weights(const T* exp_logits, int64_t window, T* weights) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t n = 0; n < window; ++n) sum += exp_logits[n];
  const T inv = T(1) / sum;
  for (int64_t n = 0; n < window; ++n) weights[n] = exp_logits[n] * inv;
}

// Saving the weights: P = exp(logit - lse) of a forward_tile's kLanes queries (tokens token0 + dw * l) from the logits
// it kept, once the online softmax has their logsumexp: a second, cheap pass over the window.
template <typename T>
void store_tile_weights(TileScratch<T>& s, const T* lse, int64_t token0, const Problem& p, T* weights) {
  using V = Lanes<T>;
  const int64_t KK = p.window();
  V row_lse;
  for (int64_t l = 0; l < kLanes; ++l) row_lse[l] = lse[token0 + p.dw * l];
  T* const slots = s.logits.data();
  for (int64_t n = 0; n < KK; ++n) {
    store_lanes(slots + n * kLanes, exp_lanes(load_lanes(slots + n * kLanes) - row_lse));
  }
  slots_to_rows(slots, KK, weights + token0 * KK, p.dw * KK);
}

// The per-query and per-tile buffers of forward_row_queries (tile: only with query tiles; its logits only when saving
// the weights).
template <typename T>
struct RowScratch {
  std::vector<T> acc, logits;
  std::vector<const T*> keys;
  std::optional<TileScratch<T>> tile;
  RowScratch(int64_t dim, int64_t window, bool tiles, bool saving) : acc(dim), logits(window), keys(window) {
    if (tiles) tile.emplace(dim, saving ? window : 0);
  }
};

// Query row i of slice bh (q, k, v, out: the slice): with tiles (has_query_tiles), every query through gathered tiles
// where order.gather has them (float32 on AVX-512), else the interior queries through forward_tile on kts, vts (the
// slice's k and v group-transposed) and the others one at a time; without, all one at a time. weights: where to save P
// ([BH * H * W, kh * kw]), nullptr when not saving. Shared by the float32 forward and the bf16 forward on widened
// slices (float32 copies of the slice's rows).
template <typename T, int64_t kD>
void forward_row_queries(Slice<const T> q, Slice<const T> k, Slice<const T> v, const T* kts, const T* vts, const T* rpb,
                         Slice<T> out, T* lse, int64_t bh, int64_t i, const Problem& p, const Windows& win,
                         const GroupOrder& order, T scale, bool tiles, T* weights, RowScratch<T>& s) {
  const int64_t W = p.width, KK = p.window(), row = bh * p.height + i;
  const auto one_query = [&](int64_t j) {
    forward_query<T, kD>(q, k, v, rpb, out, lse, bh, i, j, p, win, scale, s.acc.data(), s.logits.data(), s.keys.data());
    if (weights != nullptr) store_query_weights(s.logits.data(), KK, weights + (row * W + j) * KK);
  };
  if (!tiles) {
    for_each_in_group_order(W, p.dw, one_query);
    return;
  }
#if DINAT_M2F_CPU_LANES == 16
  if constexpr (std::is_same_v<T, float>) {
    if (!order.gather.empty()) {
      dispatch_window_width(p.kw, [&](auto kw) {
        constexpr int64_t kKW = decltype(kw)::value;
        if constexpr (kKW > 0) {
          for (const GatherTile& t : order.gather) {
            gathered_forward_tile<kD, kKW>(q, kts, vts, rpb, out, lse, weights, bh, i, t, p, win, scale, *s.tile);
          }
        }
      });
      return;
    }
  }
#endif
  dispatch_window_width(p.kw, [&](auto kw) {
    constexpr int64_t kKW = decltype(kw)::value;
    if constexpr (kKW == 0) {
      TORCH_CHECK(false, "na fused forward (CPU): query tiles for kernel width ", p.kw, " are not compiled");
    } else {
      for_each_tile_or_query(p, order.group_offset, one_query, [&](int64_t r, int64_t jg, int64_t col0) {
        forward_tile<T, kD, kKW>(q, kts, vts, rpb, out, lse, bh, i, r, jg, col0, p, win, scale, *s.tile);
        if (weights != nullptr) store_tile_weights(*s.tile, lse, row * W + r + p.dw * jg, p, weights);
      });
    }
  });
}

// Query rows ia and ib = ia + dh of slice bh with tiles, where kw's tiles take two rows (pair_rows_of_forward): the
// interior queries of both through forward_tile_pair, the others one at a time (forward_row_queries' one_query).
template <typename T, int64_t kD>
void forward_row_pair_queries(Slice<const T> q, Slice<const T> k, Slice<const T> v, const T* kts, const T* vts,
                              const T* rpb, Slice<T> out, T* lse, int64_t bh, int64_t ia, int64_t ib, const Problem& p,
                              const Windows& win, const GroupOrder& order, T scale, T* weights, RowScratch<T>& sa,
                              RowScratch<T>& sb) {
  const int64_t W = p.width, KK = p.window();
  const auto one_query = [&](int64_t i, RowScratch<T>& s, int64_t j) {
    forward_query<T, kD>(q, k, v, rpb, out, lse, bh, i, j, p, win, scale, s.acc.data(), s.logits.data(), s.keys.data());
    if (weights != nullptr) {
      store_query_weights(s.logits.data(), KK, weights + ((bh * p.height + i) * W + j) * KK);
    }
  };
#if DINAT_M2F_CPU_LANES == 16
  if constexpr (std::is_same_v<T, float>) {
    if (!order.gather.empty()) {
      dispatch_window_width(p.kw, [&](auto kw) {
        constexpr int64_t kKW = decltype(kw)::value;
        if constexpr (kPairTiles<T, kKW>) {
          for (const GatherTile& t : order.gather) {
            gathered_forward_tile_pair<kD, kKW>(q, kts, vts, rpb, out, lse, weights, bh, ia, ib, t, p, win, scale,
                                                *sa.tile, *sb.tile);
          }
        }
      });
      return;
    }
  }
#endif
  dispatch_window_width(p.kw, [&](auto kw) {
    constexpr int64_t kKW = decltype(kw)::value;
    if constexpr (!kPairTiles<T, kKW>) {
      TORCH_CHECK(false, "na fused forward (CPU): two-row query tiles for kernel width ", p.kw, " are not compiled");
    } else {
      for_each_tile_or_query(
          p, order.group_offset,
          [&](int64_t j) {
            one_query(ia, sa, j);
            one_query(ib, sb, j);
          },
          [&](int64_t r, int64_t jg, int64_t col0) {
            forward_tile_pair<T, kD, kKW>(q, kts, vts, rpb, out, lse, bh, ia, ib, r, jg, col0, p, win, scale, *sa.tile,
                                          *sb.tile);
            if (weights != nullptr) {
              store_tile_weights(*sa.tile, lse, (bh * p.height + ia) * W + r + p.dw * jg, p, weights);
              store_tile_weights(*sb.tile, lse, (bh * p.height + ib) * W + r + p.dw * jg, p, weights);
            }
          });
    }
  });
}

// Whether the forward's tiles take two query rows at a time for this problem (kPairTiles of its window width).
template <typename T>
inline bool pair_rows_of_forward(const Problem& p) {
  bool pairs = false;
  dispatch_window_width(p.kw, [&](auto kw) { pairs = kPairTiles<T, decltype(kw)::value>; });
  return pairs;
}

// The units of work along H of the forward: with two-row tiles the rows of each dilation group in pairs (i, i + dh),
// a group's last row alone when it has an odd number of them; without, every row alone, top to bottom.
// unit[u] = {first row, second row or -1}.
inline std::vector<std::array<int64_t, 2>> forward_row_units(const Problem& p, bool pairs) {
  std::vector<std::array<int64_t, 2>> units;
  if (!pairs) {
    for (int64_t i = 0; i < p.height; ++i) units.push_back({i, -1});
    return units;
  }
  for (int64_t r = 0; r < std::min(p.dh, p.height); ++r) {
    for (int64_t i = r; i < p.height; i += 2 * p.dh) units.push_back({i, i + p.dh < p.height ? i + p.dh : -1});
  }
  return units;
}

// ----------------------------------------------------------------------------------------------- whole groups
// When every window is its whole dilation group (H == kh * dh and W == kw * dw, e.g. DiNAT-T's dilated layers at
// 224: 56x56 d 8, 28x28 d 4, 14x14 d 2), all kh * kw queries of a 2D dilation group share one window: the group's
// keys. A tile of kLanes of them (in group slot order, the last tile partial) computes its logits as
// sum_d q[lane][d] * k_n[d] with k_n[d] broadcast and its output as sum_n p_n[lane] * v_n[d] broadcast: the dense
// per-group products, lane-parallel, from q, k and v in place (no transposes). These problems have no interior query
// tiles (their groups are k wide), and the per-query path spent about twice the instructions per query.
// Saving the weights (training), each tile also writes its queries' rows of P (store_whole_group_weights).

}  // namespace

#include "na_whole_group_cpu_isa.h"

namespace {

inline bool window_is_whole_group(const Problem& p) { return p.height == p.kh * p.dh && p.width == p.kw * p.dw; }

// The two products of the whole-group tiles, lane-parallel with one operand broadcast from token rows (rows[n]: D
// values each). out[n] += sum_d a[d] * rows[n][d] for n < count (a: D vectors): eight rows at a time (then four, then
// one), each vector of a loaded once per eight multiply-adds.
template <typename T>
inline void broadcast_row_dots(const Lanes<T>* a, const T* const* rows, int64_t count, int64_t D, Lanes<T>* out) {
  using V = Lanes<T>;
  const auto some_rows = [&](int64_t n, auto rows_at_once) {
    constexpr int64_t kRows = decltype(rows_at_once)::value;
    V acc[kRows];
    const T* r[kRows];
    for (int64_t u = 0; u < kRows; ++u) {
      acc[u] = out[n + u];
      r[u] = rows[n + u];
    }
    for (int64_t d = 0; d < D; ++d) {
      const V ad = a[d];
      for (int64_t u = 0; u < kRows; ++u) acc[u] += ad * r[u][d];
    }
    for (int64_t u = 0; u < kRows; ++u) out[n + u] = acc[u];
  };
  int64_t n = 0;
  for (; n + 8 <= count; n += 8) some_rows(n, std::integral_constant<int64_t, 8>{});
  for (; n + 4 <= count; n += 4) some_rows(n, std::integral_constant<int64_t, 4>{});
  for (; n < count; ++n) some_rows(n, std::integral_constant<int64_t, 1>{});
}

// dst[l][d] = factor[l] * sum_n w_n[l] * rows[n][d] for lanes l < lanes, d < D (w_n: the vector at w + n * w_stride):
// eight channels at a time, their sums in registers and each weight vector loaded once per eight.
template <typename T>
inline void weighted_row_sums(const T* w, int64_t w_stride, const T* const* rows, int64_t count, int64_t D,
                              Lanes<T> factor, T* const* dst, int64_t lanes) {
  using V = Lanes<T>;
  for (int64_t d0 = 0; d0 < D; d0 += 8) {
    const int64_t width = std::min<int64_t>(8, D - d0);
    V acc[8];
    for (int64_t c = 0; c < 8; ++c) acc[c] = V{};
    if (width == 8) {
      for (int64_t n = 0; n < count; ++n) {
        const V wn = load_lanes(w + n * w_stride);
        const T* rn = rows[n] + d0;
        for (int64_t c = 0; c < 8; ++c) acc[c] += wn * rn[c];
      }
    } else {
      for (int64_t n = 0; n < count; ++n) {
        const V wn = load_lanes(w + n * w_stride);
        const T* rn = rows[n] + d0;
        for (int64_t c = 0; c < width; ++c) acc[c] += wn * rn[c];
      }
    }
    for (int64_t c = 0; c < width; ++c) {
      const V o = acc[c] * factor;
      for (int64_t l = 0; l < lanes; ++l) dst[l][d0 + c] = o[l];
    }
  }
}

// dst[d * kLanes + l] = rows[l][d] for l < count (<= kLanes), d < D: 8 x 8 blocks transposed in registers where the
// rows come in eights (float32), the rest a value at a time. Lanes past count are left as they are.
template <typename T>
inline void rows_to_lanes(const T* const* rows, int64_t count, int64_t D, T* dst) {
  int64_t l0 = 0;
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    const int64_t d8 = D - D % 8;
    for (; l0 + 8 <= count; l0 += 8) {
      for (int64_t d0 = 0; d0 < d8; d0 += 8) {
        __m256 x[8];
        for (int64_t i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(rows[l0 + i] + d0);
        transpose_8x8(x);
        for (int64_t i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (d0 + i) * kLanes + l0, x[i]);
      }
      for (int64_t d = d8; d < D; ++d) {
        for (int64_t i = 0; i < 8; ++i) dst[d * kLanes + l0 + i] = rows[l0 + i][d];
      }
    }
  }
#endif
  for (int64_t l = l0; l < count; ++l) {
    for (int64_t d = 0; d < D; ++d) dst[d * kLanes + l] = rows[l][d];
  }
}

// weighted_row_sums: dst[l][d] = factor[l] * sum_n w_n[l] * rows[n][d], the same sums in the same order. Where the
// head dim is at most 4 whole vectors, a few lanes at a time with their sums in registers, each row vector loaded once
// per few lanes and the sums stored as whole vectors (weighted_row_sums stores its [lane] sums a value at a time,
// which made the whole-group forward about 1.3x slower at 56x56 d 8).
template <typename T, int64_t kD>
inline void shared_row_weighted_sums(const T* w, int64_t w_stride, const T* const* rows, int64_t count, int64_t D,
                                     Lanes<T> factor, T* const* dst, int64_t lanes) {
  if constexpr (kD > 0 && kD % kLanes == 0 && kD / kLanes <= 4) {
    lane_weighted_row_sums<kD, true>(
        w, w_stride, count, lanes, [&](int64_t n, int64_t) { return rows[n]; },
        [&](int64_t l, int64_t c, Lanes<T> sum) { store_lanes(dst[l] + c * kLanes, sum * factor[l]); });
  } else {
    weighted_row_sums(w, w_stride, rows, count, D, factor, dst, lanes);
  }
}

// Saving the weights: P of a whole-group tile's `lanes` queries from its unnormalised weights (exp_slots: kh * kw
// vectors, [slot][lane]) and their 1 / sum: one transpose into lane rows (rows_mem, kLanes * kh * kw values), then
// each row scaled into the query's row of weights (rows[l]). The queries are not equally spaced tokens.
template <typename T>
void store_whole_group_weights(const T* exp_slots, Lanes<T> inv, int64_t lanes, int64_t window, T* rows_mem,
                               T* const* rows) {
  transpose_block(exp_slots, kLanes, window, lanes, rows_mem, window);
  for (int64_t l = 0; l < lanes; ++l) {
    const T* src = rows_mem + l * window;
    T* dst = rows[l];
    const T inv_l = inv[l];
    for (int64_t n = 0; n < window; ++n) dst[n] = src[n] * inv_l;
  }
}

// The tokens of dilation group (rh, rw) of a whole-group problem by slot: slot a kw + b is token
// (i[slot], j[slot]) = (rh + a dh, rw + b dw). Built once per group, not a division per slot and tile.
struct GroupTokens {
  std::vector<int64_t> i, j;
  GroupTokens(const Problem& p, int64_t rh, int64_t rw) {
    i.reserve(p.window());
    j.reserve(p.window());
    for (int64_t a = 0; a < p.kh; ++a) {
      for (int64_t b = 0; b < p.kw; ++b) {
        i.push_back(rh + a * p.dh);
        j.push_back(rw + b * p.dw);
      }
    }
  }
};

// Forward of query slots s0 .. s0 + kLanes - 1 (those < kh * kw) of a dilation group of slice bh (its tokens by slot;
// keys and values: its key and value rows by slot, set once per group: a division per slot and tile made that setup
// cost about as much as the tile's products at 56x56 d 8). bias: this head's group_bias_rows from slot s0 on (key n
// at n * bias_stride). Scratch: qt D vectors, logit kh * kw vectors. weights: where to save P ([BH * H * W, kh * kw],
// with rows_mem kLanes * kh * kw values of scratch), nullptr when not saving.
template <typename T, int64_t kD>
void whole_group_tile(Slice<const T> q, const T* bias, int64_t bias_stride, Slice<T> out, T* lse, int64_t bh,
                      const GroupTokens& tokens, int64_t s0, const Problem& p, T scale, T* qt_mem, T* logit_mem,
                      const T* const* keys, const T* const* values, T* weights, T* rows_mem) {
  using V = Lanes<T>;
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const int64_t lanes = std::min(kLanes, KK - s0);
  V* __restrict qt = reinterpret_cast<V*>(qt_mem);
  V* __restrict logit = reinterpret_cast<V*>(logit_mem);
  const auto token_i = [&](int64_t slot) { return tokens.i[slot]; };
  const auto token_j = [&](int64_t slot) { return tokens.j[slot]; };
  for (int64_t d = 0; d < D; ++d) qt[d] = V{};
  const T* query_rows[kLanes];
  for (int64_t l = 0; l < lanes; ++l) query_rows[l] = q.at(token_i(s0 + l), token_j(s0 + l));
  rows_to_lanes(query_rows, lanes, D, qt_mem);
  for (int64_t d = 0; d < D; ++d) qt[d] *= scale;
  for (int64_t n = 0; n < KK; ++n) logit[n] = load_lanes(bias + n * bias_stride);
  broadcast_row_dots(qt, keys, KK, D, logit);
  V row_max = V{} - std::numeric_limits<T>::infinity();
  for (int64_t n = 0; n < KK; ++n) row_max = logit[n] > row_max ? logit[n] : row_max;
  V sum = V{};
  for (int64_t n = 0; n < KK; ++n) {
    logit[n] = exp_lanes(logit[n] - row_max);
    sum += logit[n];
  }
  const V inv = T(1) / sum;
  const T* const exp_slots = reinterpret_cast<const T*>(logit);  // [slot][lane], read through `logit` (restrict)
  T* outs[kLanes];
  for (int64_t l = 0; l < lanes; ++l) outs[l] = out.at(token_i(s0 + l), token_j(s0 + l));
  const int64_t row0 = bh * H;
  if (weights != nullptr) {
    T* rows[kLanes];
    for (int64_t l = 0; l < lanes; ++l) rows[l] = weights + ((row0 + token_i(s0 + l)) * W + token_j(s0 + l)) * KK;
    store_whole_group_weights(exp_slots, inv, lanes, KK, rows_mem, rows);
  }
  shared_row_weighted_sums<T, kD>(exp_slots, kLanes, values, KK, D, inv, outs, lanes);
  for (int64_t l = 0; l < lanes; ++l) {
    lse[(row0 + token_i(s0 + l)) * W + token_j(s0 + l)] = row_max[l] + std::log(sum[l]);
  }
}

template <typename T, int64_t kD>
void whole_group_forward_kernel(Strided<const T> q_all, Strided<const T> k_all, Strided<const T> v_all, const T* rpb,
                                Strided<T> out_all, T* lse, const Problem& p, T scale, T* weights) {
  const Windows win(p);
  const int64_t D = kD > 0 ? kD : p.dim, KK = p.window();
  const int64_t tiles = (KK + kLanes - 1) / kLanes, padded = tiles * kLanes;
  const GroupBias<T> bias{rpb, next_group_bias_call(), padded};
  // One task per (slice, group): its tiles share the scratch and the key / value pointers.
  const int64_t groups = p.dh * p.dw;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(padded * KK * D, 1));
  parallel(p.batch_heads * groups, grain, [&](int64_t task) {
    const int64_t bh = task / groups, group = task % groups;
    std::vector<T> qt(D * kLanes), logit(KK * kLanes), weight_rows(weights != nullptr ? KK * kLanes : 0);
    std::vector<const T*> keys(KK), values(KK);
    const GroupTokens tokens(p, group / p.dw, group % p.dw);
    const Slice<const T> k = k_all.slice(bh), v = v_all.slice(bh);
    for (int64_t n = 0; n < KK; ++n) {
      keys[n] = k.at(tokens.i[n], tokens.j[n]);
      values[n] = v.at(tokens.i[n], tokens.j[n]);
    }
    const T* const head_bias = group_bias_rows(bias, p, win, bh % p.heads);
    const int64_t tiled = whole_group_tiled_slots(KK);
    for (int64_t s0 = 0; s0 < tiled; s0 += kLanes) {
      whole_group_tile<T, kD>(q_all.slice(bh), head_bias + s0, padded, out_all.slice(bh), lse, bh, tokens, s0, p, scale,
                              qt.data(), logit.data(), keys.data(), values.data(), weights, weight_rows.data());
    }
    // The rest one at a time: each window is the group, so the per-query forward's window keys (it rewrites `keys`
    // with the same pointers, after the tiles) and bias are the group's.
    for (int64_t slot = tiled; slot < KK; ++slot) {
      const int64_t i = tokens.i[slot], j = tokens.j[slot];
      forward_query<T, kD>(q_all.slice(bh), k, v, rpb, out_all.slice(bh), lse, bh, i, j, p, win, scale, qt.data(),
                           logit.data(), keys.data());
      if (weights != nullptr) store_query_weights(logit.data(), KK, weights + ((bh * p.height + i) * p.width + j) * KK);
    }
  });
}

// Whether the forward with query tiles runs one task per (batch, head) slice (it transposes the slice's k and v into
// its thread's scratch, then does all its rows: one parallel region, and each thread reads only the transposes it
// wrote) rather than a parallel transpose of a group of slices followed by a parallel loop over their rows (two regions
// and a barrier per group, the rows reading the other core's transposes): with two threads the group split was about as
// slow as the unfused pair at 1x4x56x56 d 1 on AVX2. Slices must split evenly over the threads (or be many of them).
inline bool forward_slice_tasks(const Problem& p) {
  const int64_t threads = at::get_num_threads();
  return p.batch_heads % threads == 0 || p.batch_heads >= 4 * threads;
}

// tiles: whether interior queries go through forward_tile (has_query_tiles); then k and v are group-transposed, per
// slice (forward_slice_tasks) or one group of slices at a time. weights: where to save P ([BH * H * W, kh * kw]),
// nullptr when not saving.
template <typename T, int64_t kD>
void forward_kernel(Strided<const T> q_all, Strided<const T> k_all, Strided<const T> v_all, const T* rpb,
                    Strided<T> out_all, T* lse, const Problem& p, T scale, bool tiles, T* weights) {
  const Windows win(p);
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const int64_t slice_kv = p.tokens() * D;  // elements of one slice of k (or v)
  const GroupOrder order = tiles ? forward_group_order<T>(p, win) : GroupOrder{};
  // With tiles of two rows (pair_rows_of_forward) the rows go in pairs of a dilation group: forward_row_units.
  const bool pairs = tiles && pair_rows_of_forward<T>(p);
  const std::vector<std::array<int64_t, 2>> units = forward_row_units(p, pairs);
  const int64_t unit_count = static_cast<int64_t>(units.size());
  // Unit u of slice bh, whose k and v rows are read from k, v; kts, vts: the slice's transposed k and v (tiles only).
  const auto forward_unit = [&](int64_t bh, int64_t u, Slice<const T> k, Slice<const T> v, const T* kts, const T* vts) {
    const auto [ia, ib] = units[u];
    RowScratch<T> scratch(D, KK, tiles, weights != nullptr);
    if (ib < 0) {
      forward_row_queries<T, kD>(q_all.slice(bh), k, v, kts, vts, rpb, out_all.slice(bh), lse, bh, ia, p, win, order,
                                 scale, tiles, weights, scratch);
      return;
    }
    RowScratch<T> second(D, KK, tiles, weights != nullptr);
    forward_row_pair_queries<T, kD>(q_all.slice(bh), k, v, kts, vts, rpb, out_all.slice(bh), lse, bh, ia, ib, p, win,
                                    order, scale, weights, scratch, second);
  };
  if (tiles && forward_slice_tasks(p)) {
    parallel(p.batch_heads, 1, [&](int64_t bh) {
      T* const kts = kept_scratch<T>(2 * slice_kv);  // this thread's
      T* const vts = kts + slice_kv;
      for (int64_t i = 0; i < H; ++i) {
        group_transpose_row(k_all.slice(bh), i, order, p, kts + i * D * W);
        group_transpose_row(v_all.slice(bh), i, order, p, vts + i * D * W);
      }
      for (int64_t u = 0; u < unit_count; ++u) forward_unit(bh, u, k_all.slice(bh), v_all.slice(bh), kts, vts);
    });
    return;
  }
  // Without tiles nothing is transposed and every row reads k and v in place (one group of all slices), or, with
  // windows of 81 keys or more, a staged copy of them where their tokens are strided (stage_slices). The copy costs
  // about a pass over k and v; with 7 x 7 windows it cost more than it saved (2x8x32x32x32 k7 d4: 2.95 -> 3.5 ms,
  // two threads), with 11 x 11 windows it saves 2-14% (1x12x80x80x32 k11 d7: 34-38 -> 32-33 ms).
  const int64_t staged = !tiles && KK >= 81 ? strided_token_tensors(p, {k_all.s, v_all.s}) : 0;
  const int64_t copies = tiles ? 2 : staged;  // k-sized copies per slice in scratch: transposes or staged slices
  const int64_t group =
      copies > 0 ? slices_per_group(copies * slice_kv * static_cast<int64_t>(sizeof(T)), p) : p.batch_heads;
  T* const scratch = copies > 0 ? kept_scratch<T>(copies * group * slice_kv) : nullptr;
  T* const kt = tiles ? scratch : nullptr;
  T* const vt = tiles ? scratch + group * slice_kv : nullptr;
  const int64_t grain = std::max<int64_t>(1, row_grain(p) / (pairs ? 2 : 1));
  for (int64_t s0 = 0; s0 < p.batch_heads; s0 += group) {
    const int64_t s1 = std::min(p.batch_heads, s0 + group);
    if (tiles) group_transpose_slices(k_all, v_all, s0, s1, order, p, kt, vt);
    T* next_stage = scratch;
    const Strided<const T> k_read = staged > 0 ? stage_slices(k_all, s0, s1, p, &next_stage) : k_all;
    const Strided<const T> v_read = staged > 0 ? stage_slices(v_all, s0, s1, p, &next_stage) : v_all;
    parallel((s1 - s0) * unit_count, grain, [&](int64_t local_unit) {
      const int64_t bh = s0 + local_unit / unit_count;
      forward_unit(bh, local_unit % unit_count, k_read.slice(bh), v_read.slice(bh),
                   tiles ? kt + (bh - s0) * slice_kv : nullptr, tiles ? vt + (bh - s0) * slice_kv : nullptr);
    });
  }
}

// True when the backward's query pass uses lane-parallel tiles: some dilation group along W holds a full tile of
// interior queries and kw is one of dispatch_window_width's. Unlike the forward's (online softmax,
// DINAT_M2F_CPU_QUERY_TILES), the backward's tiles know each row's logsumexp and pay off with 8 lanes too.
bool has_backward_query_tiles(const Problem& p) {
  bool compiled = false;
  dispatch_window_width(p.kw, [&](auto kw) { compiled = kw.value > 0; });
  const int64_t longest_group = group_length(0, p.width, p.dw);
  return compiled && longest_group - 2 * (p.kw / 2) >= kLanes;
}

template <typename T>
struct BackwardTileScratch {
  std::vector<T> qt, got, acc;
  std::vector<T> prob, ds;  // the tile's P and dS as per-slot vectors ([slot][lanes], rows_to_slots)
  BackwardTileScratch(int64_t dim, int64_t window)
      : qt(dim * kLanes), got(dim * kLanes), acc(dim * kLanes), prob(window * kLanes), ds(window * kLanes) {}
};

// Query pass of the kLanes interior queries (i, r + dw * (jg0 + l)), l < kLanes, of slice bh (col0: the W' column of
// lane 0's first key, as in forward_tile): P and dS into the workspace, dQ. Lane-parallel over queries with k and v
// group-transposed, so the recomputed logits, dO . v and the dQ sum need no horizontal reductions.
template <typename T, int64_t kD, int64_t kKW>
void backward_tile(Slice<const T> grad_out, Slice<const T> q, const T* kt, const T* vt, const T* rpb,
                   Slice<const T> out, const T* lse, Slice<T> grad_q, T* prob_ws, T* ds_ws, int64_t s0, int64_t bh,
                   int64_t i, int64_t r, int64_t jg0, int64_t col0, const Problem& p, const Windows& win, T scale,
                   BackwardTileScratch<T>& s) {
  using V = Lanes<T>;
  static_assert(kKW > 0, "backward tiles need a compile-time window width");
  constexpr int64_t KW = kKW;
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const int64_t row = bh * H + i, local_row = row - s0 * H, h = bh % p.heads;
  V* __restrict qt = reinterpret_cast<V*>(s.qt.data());
  V* __restrict got = reinterpret_cast<V*>(s.got.data());
  V* __restrict acc = reinterpret_cast<V*>(s.acc.data());
  V delta{}, row_lse{};
  for (int64_t l = 0; l < kLanes; ++l) {
    const int64_t j = r + p.dw * (jg0 + l), token = row * W + j;
    const T* qv = q.at(i, j);
    const T* go = grad_out.at(i, j);
    for (int64_t d = 0; d < D; ++d) {
      qt[d][l] = qv[d] * scale;
      got[d][l] = go[d];
    }
    delta[l] = dot(go, out.at(i, j), D);
    row_lse[l] = lse[token];
  }
  for (int64_t d = 0; d < D; ++d) acc[d] = V{};
  // Lane l's workspace row is (local_row * W + r + dw * (jg0 + l)) * KK: lanes are dw * KK apart.
  const int64_t ws0 = (local_row * W + r + p.dw * jg0) * KK, lane_stride = p.dw * KK;
  T* const prob_slots = s.prob.data();
  T* const ds_slots = s.ds.data();
  for (int64_t ki = 0; ki < p.kh; ++ki) {
    const int64_t key_row = win.h.start[i] + ki * p.dh;
    const T* krow = kt + key_row * D * W + col0;
    const T* vrow = vt + key_row * D * W + col0;
    const T* brow = rpb != nullptr ? rpb + (h * p.rpb_h() + win.h.bias[i] + ki) * p.rpb_w() + KW / 2 : nullptr;
    // One window row at a time, d outermost: the kw logits, dO . v and dS stay in registers, and every K / V row is
    // read kLanes columns at a time once per sum (a kj-outer loop would reload Q, dO and the dQ sums for every key).
    V logit[KW], go_v[KW];
    for (int64_t kj = 0; kj < KW; ++kj) {
      logit[kj] = V{} + (brow != nullptr ? brow[kj] : T(0));
      go_v[kj] = V{};
    }
    for (int64_t d = 0; d < D; ++d) {
      const V qd = qt[d];
      const T* kd = krow + d * W;
      for (int64_t kj = 0; kj < KW; ++kj) logit[kj] += qd * load_lanes(kd + kj);
    }
    for (int64_t d = 0; d < D; ++d) {
      const V gd = got[d];
      const T* vd = vrow + d * W;
      for (int64_t kj = 0; kj < KW; ++kj) go_v[kj] += gd * load_lanes(vd + kj);
    }
    for (int64_t kj = 0; kj < KW; ++kj) {
      const V prob = exp_lanes(logit[kj] - row_lse);
      const V ds = prob * (go_v[kj] - delta);
      logit[kj] = ds;  // dS in place of the logit
      const int64_t slot = ki * KW + kj;
      store_lanes(prob_slots + slot * kLanes, prob);
      store_lanes(ds_slots + slot * kLanes, ds);
    }
    for (int64_t d = 0; d < D; ++d) {
      V a = acc[d];
      const T* kd = krow + d * W;
      for (int64_t kj = 0; kj < KW; ++kj) a += logit[kj] * load_lanes(kd + kj);
      acc[d] = a;
    }
  }
  slots_to_rows(prob_slots, KK, prob_ws + ws0, lane_stride);
  slots_to_rows(ds_slots, KK, ds_ws + ws0, lane_stride);
  for (int64_t l = 0; l < kLanes; ++l) {
    T* gq = grad_q.at(i, r + p.dw * (jg0 + l));
    for (int64_t d = 0; d < D; ++d) gq[d] = acc[d][l] * scale;
  }
}

// Query pass of one query (i, j) of slice bh: P and dS into the workspace, dQ.
template <typename T, int64_t kD>
void backward_query(Slice<const T> grad_out, Slice<const T> q, Slice<const T> k, Slice<const T> v, const T* rpb,
                    Slice<const T> out, const T* lse, Slice<T> grad_q, T* prob_ws, T* ds_ws, int64_t s0, int64_t bh,
                    int64_t i, int64_t j, const Problem& p, const Windows& win, T scale, T* acc, T* go_v,
                    const T** keys, const T** values) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const int64_t row = bh * H + i, local_row = row - s0 * H, token = row * W + j;
  const T* go = grad_out.at(i, j);
  const T delta = dot(go, out.at(i, j), D);
  T* pw = prob_ws + (local_row * W + j) * KK;
  T* dsw = ds_ws + (local_row * W + j) * KK;
  // The whole window at once: the logits (one exp over kh * kw values) and dO . v of every key.
  window_keys<T, kD>(k, i, j, p, win, keys);
  window_keys<T, kD>(v, i, j, p, win, values);
  window_logits<T, kD>(q.at(i, j), keys, rpb, scale, bh, i, j, p, win, pw);
  exp_shifted(pw, lse[token], pw, KK);
  dots(go, values, KK, D, go_v);
  std::fill(acc, acc + D, T(0));
  for (int64_t n = 0; n < KK; ++n) {
    const T ds = pw[n] * (go_v[n] - delta);
    dsw[n] = ds;
    axpy(ds, keys[n], acc, D);
  }
  T* gq = grad_q.at(i, j);
  for (int64_t d = 0; d < D; ++d) {
    gq[d] = acc[d] * scale;
  }
}

// Query pass of the backward for slices [s0, s1): P and dS into the workspace, dQ. kt, vt: k and v of these slices,
// group-transposed (nullptr: no query tiles).
template <typename T, int64_t kD>
void backward_query_pass(Strided<const T> grad_out_all, Strided<const T> q_all, Strided<const T> k_all,
                         Strided<const T> v_all, const T* rpb, Strided<const T> out_all, const T* lse,
                         Strided<T> grad_q_all, T* prob_ws, T* ds_ws, int64_t s0, int64_t s1, const Problem& p,
                         const Windows& win, T scale, const T* kt, const T* vt,
                         const std::vector<int64_t>& group_offset) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  parallel((s1 - s0) * H, row_grain(p), [&](int64_t local_row) {
    const int64_t row = s0 * H + local_row;
    const int64_t bh = row / H, i = row % H;
    const Slice<const T> grad_out = grad_out_all.slice(bh), q = q_all.slice(bh), k = k_all.slice(bh);
    const Slice<const T> v = v_all.slice(bh), out = out_all.slice(bh);
    const Slice<T> grad_q = grad_q_all.slice(bh);
    std::vector<T> acc(D), go_v(KK);
    std::vector<const T*> keys(KK), values(KK);
    const auto one_query = [&](int64_t j) {
      backward_query<T, kD>(grad_out, q, k, v, rpb, out, lse, grad_q, prob_ws, ds_ws, s0, bh, i, j, p, win, scale,
                            acc.data(), go_v.data(), keys.data(), values.data());
    };
    if (kt == nullptr) {
      for_each_in_group_order(W, p.dw, one_query);
      return;
    }
    // kt and vt hold slices [s0, s1).
    const T* const kts = kt + (bh - s0) * p.tokens() * D;
    const T* const vts = vt + (bh - s0) * p.tokens() * D;
    BackwardTileScratch<T> scratch(D, KK);
    dispatch_window_width(p.kw, [&](auto kw) {
      constexpr int64_t kKW = decltype(kw)::value;
      if constexpr (kKW == 0) {
        TORCH_CHECK(false, "na fused backward (CPU): query tiles for kernel width ", p.kw, " are not compiled");
      } else {
        for_each_tile_or_query(p, group_offset, one_query, [&](int64_t r, int64_t jg, int64_t col0) {
          backward_tile<T, kD, kKW>(grad_out, q, kts, vts, rpb, out, lse, grad_q, prob_ws, ds_ws, s0, bh, i, r, jg,
                                    col0, p, win, scale, scratch);
        });
      }
    });
  });
}

// Keys of one dilation group the key pass sums together: kB consecutive keys of a group read the same query rows
// shifted by one group column, so each q and dO vector is loaded once for all the block's keys that read it
// (at k 7, 10 loads per query row for 4 keys instead of 28; the q and dO rows a key row reads, about 100 KiB at
// 56x56 x 32, do not stay in L1). perf, 1x6x128x128x32 k11 d1, 2 threads: the key pass 1.15x faster, same bits.
// The block's 2 * kB sums stay in registers: 4 keys on AVX-512 with head dims up to 2 vectors, 2 with 4; on AVX2
// 4 keys of 1 vector or 2 of 2 (head dim 32 there keeps one key at a time).
template <typename T, int64_t kD>
constexpr int key_block_size() {
  if constexpr (!kRowsInRegisters<T, kD> || !std::is_same_v<T, float>) {
    return 1;
  } else {
    constexpr int64_t vectors = kD / kLanes, registers = kLanes == 16 ? 32 : 16;
    // 2 * kB * vectors sums and 2 * vectors loaded q and dO vectors, a few registers to spare.
    for (int kB : {4, 2}) {
      if ((2 * kB + 2) * vectors <= registers - 4) return kB;
    }
    return 1;
  }
}

// Whether keys x, x + dw, ..., x + (kB - 1) dw have inverse ranges along W that are x's shifted by one group
// column per key (1: interior keys, key b's t-th query is the block's (t + b)-th) or all x's (0: key b's t-th query is
// the block's t-th); -1 otherwise.
inline int key_block_shift(int64_t x, int kB, const AxisTable& axis, int64_t dw) {
  const InverseRange first = axis.inverse[x];
  for (int shift : {1, 0}) {
    bool all = true;
    for (int b = 1; b < kB && all; ++b) {
      const InverseRange r = axis.inverse[x + b * dw];
      all = r.begin == first.begin + shift * b * dw && r.end == first.end + shift * b * dw;
    }
    if (all) return shift;
  }
  return -1;
}

// Query row pointers of backward_key_pass_in_registers: its dS and P rows at the key row's window row, its q and dO.
template <typename T>
struct KeyPassQueryRow {
  const T *ds, *prob, *q, *grad_out;
};

// dK, dV of kB keys of one group (key_block_shift kShift): key b sums, for every query row in order, its terms
// t = 0..terms-1 in order, as one_key does (the same bits); the union position u = t + kShift b holds the shared q and
// dO vectors, and slot_u[u] + b is key b's P / dS offset in that query's row. store(b, dK sums, dV sums) writes key
// b's.
template <typename T, int64_t kD, int kB, int kShift, typename Store>
inline void key_block_sums(const KeyPassQueryRow<T>* rows, int64_t nrows, const int64_t* slot_u, int64_t terms,
                           int64_t q_off, int64_t q_step, int64_t go_off, int64_t go_step, const Store& store) {
  constexpr int64_t kV = kD / kLanes;
  using V = Lanes<T>;
  V acc_k[kB][kV] = {}, acc_v[kB][kV] = {};
  const int64_t union_terms = terms + kShift * (kB - 1);
  for (int64_t r = 0; r < nrows; ++r) {
    const KeyPassQueryRow<T>& row = rows[r];
    for (int64_t u = 0; u < union_terms; ++u) {
      V qv[kV], gv[kV];
      for (int64_t c = 0; c < kV; ++c) {
        qv[c] = in_register(load_lanes(row.q + q_off + u * q_step + c * kLanes));
        gv[c] = in_register(load_lanes(row.grad_out + go_off + u * go_step + c * kLanes));
      }
#pragma GCC unroll 4
      for (int b = 0; b < kB; ++b) {
        if (u - kShift * b < 0 || u - kShift * b >= terms) continue;
        const T ds = row.ds[slot_u[u] + b], prob = row.prob[slot_u[u] + b];
        for (int64_t c = 0; c < kV; ++c) {
          acc_k[b][c] += ds * qv[c];
          acc_v[b][c] += prob * gv[c];
        }
      }
    }
  }
  for (int b = 0; b < kB; ++b) store(b, acc_k[b], acc_v[b]);
}

// backward_key_pass with the dK and dV sums of each key in registers (kRowsInRegisters).
template <typename T, int64_t kD>
void backward_key_pass_in_registers(Strided<const T> grad_out_all, Strided<const T> q_all, const T* prob_ws,
                                    const T* ds_ws, Strided<T> grad_k_all, Strided<T> grad_v_all, int64_t s0,
                                    int64_t s1, const Problem& p, const Windows& win, T scale) {
  const int64_t H = p.height, W = p.width, KK = p.window();
  const std::vector<int64_t> start_g = group_starts(p, win), key_rows = rows_in_group_order(p);
  parallel((s1 - s0) * H, row_grain(p), [&](int64_t local_row) {
    const int64_t row = s0 * H + local_row;
    const int64_t bh = row / H, xi = key_rows[row % H];
    const Slice<const T> grad_out = grad_out_all.slice(bh), q = q_all.slice(bh);
    const Slice<T> grad_k = grad_k_all.slice(bh), grad_v = grad_v_all.slice(bh);
    std::vector<KeyRowSlot> rows;
    key_row_slots(xi, p, win, rows);
    // Per query row of the key row's inverse: its dS and P rows at the key's window row, its q and dO rows (once per
    // key row, not per key: the index products per term made this pass about 1.2x slower than the bf16 key pass).
    using QueryRow = KeyPassQueryRow<T>;
    std::vector<QueryRow> query_rows;
    query_rows.reserve(rows.size());
    for (const auto [i, ki] : rows) {
      const int64_t at = ((bh - s0) * H + i) * W * KK + ki * p.kw;
      query_rows.push_back({ds_ws + at, prob_ws + at, q.row_at(i), grad_out.row_at(i)});
    }
    const int64_t q_step = p.dw * q.col, go_step = p.dw * grad_out.col;
    std::vector<int64_t> slot_w;  // each query of the key's inverse along W: its P / dS offset of the key in its row
    const auto one_key = [&](int64_t xj) {
      RegisterRow<T, kD> acc_k, acc_v;
      const int64_t j0 = win.w.inverse[xj].begin, j1 = win.w.inverse[xj].end, xg = xj / p.dw;
      slot_w.clear();
      for (int64_t j = j0; j < j1; j += p.dw) slot_w.push_back(j * KK + xg - start_g[j]);
      const auto terms = static_cast<int64_t>(slot_w.size());
      for (const QueryRow& row : query_rows) {
        const T* const q0 = row.q + j0 * q.col;
        const T* const go0 = row.grad_out + j0 * grad_out.col;
        for (int64_t t = 0; t < terms; ++t) {
          acc_k.add(row.ds[slot_w[t]], q0 + t * q_step);
          acc_v.add(row.prob[slot_w[t]], go0 + t * go_step);
        }
      }
      acc_k.store(scale, grad_k.at(xi, xj));
      acc_v.store(T(1), grad_v.at(xi, xj));
    };
    constexpr int kB = key_block_size<T, kD>();
    if constexpr (kB == 1) {
      for_each_in_group_order(W, p.dw, one_key);
      return;
    }
    std::vector<int64_t> slot_u;  // per union position u of a key block: the first key's offset (key b: + b)
    const auto fits = [&](int64_t xj) { return key_block_shift(xj, kB, win.w, p.dw); };
    for_each_block_in_group_order<kB>(W, p.dw, fits, one_key, [&](int64_t xj, int shift) {
      const int64_t j0 = win.w.inverse[xj].begin, xg = xj / p.dw;
      const int64_t terms = (win.w.inverse[xj].end - j0 + p.dw - 1) / p.dw, union_terms = terms + shift * (kB - 1);
      slot_u.clear();
      for (int64_t u = 0, j = j0; u < union_terms; ++u, j += p.dw) slot_u.push_back(j * KK + xg - start_g[j]);
      dispatch_block_shift(shift, [&](auto kShift) {
        key_block_sums<T, kD, kB, kShift.value>(query_rows.data(), static_cast<int64_t>(query_rows.size()),
                                                slot_u.data(), terms, j0 * q.col, q_step, j0 * grad_out.col, go_step,
                                                [&](int b, const Lanes<T>* sum_k, const Lanes<T>* sum_v) {
                                                  T* const gk = grad_k.at(xi, xj + b * p.dw);
                                                  T* const gv = grad_v.at(xi, xj + b * p.dw);
                                                  for (int64_t c = 0; c < kD / kLanes; ++c) {
                                                    store_lanes(gk + c * kLanes, sum_k[c] * scale);
                                                    store_lanes(gv + c * kLanes, sum_v[c] * T(1));
                                                  }
                                                });
      });
    });
  });
}

// Key pass: dK_x = scale * sum dS q_i and dV_x = sum P dO_i over the queries i whose window holds x.
template <typename T, int64_t kD>
void backward_key_pass(Strided<const T> grad_out_all, Strided<const T> q_all, const T* prob_ws, const T* ds_ws,
                       Strided<T> grad_k_all, Strided<T> grad_v_all, int64_t s0, int64_t s1, const Problem& p,
                       const Windows& win, T scale) {
  if constexpr (kRowsInRegisters<T, kD>) {
    return backward_key_pass_in_registers<T, kD>(grad_out_all, q_all, prob_ws, ds_ws, grad_k_all, grad_v_all, s0, s1, p,
                                                 win, scale);
  }
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const std::vector<int64_t> start_g = group_starts(p, win), key_rows = rows_in_group_order(p);
  parallel((s1 - s0) * H, row_grain(p), [&](int64_t local_row) {
    const int64_t row = s0 * H + local_row;
    const int64_t bh = row / H, xi = key_rows[row % H];
    const Slice<const T> grad_out = grad_out_all.slice(bh), q = q_all.slice(bh);
    const Slice<T> grad_k = grad_k_all.slice(bh), grad_v = grad_v_all.slice(bh);
    std::vector<T> acc_k(D), acc_v(D);
    std::vector<KeyRowSlot> rows;
    key_row_slots(xi, p, win, rows);
    std::vector<int64_t> slot_w;  // window column of key xj in the window of each query of its inverse along W
    for_each_in_group_order(W, p.dw, [&](int64_t xj) {
      std::fill(acc_k.begin(), acc_k.end(), T(0));
      std::fill(acc_v.begin(), acc_v.end(), T(0));
      // The slots along W once per key, not once per (query row, query).
      const int64_t j0 = win.w.inverse[xj].begin, j1 = win.w.inverse[xj].end, xg = xj / p.dw;
      slot_w.clear();
      for (int64_t j = j0; j < j1; j += p.dw) slot_w.push_back(xg - start_g[j]);
      for (const auto [i, ki] : rows) {
        const int64_t local_base = ((bh - s0) * H + i) * W;
        const T* qrow = q.row_at(i);
        const T* gorow = grad_out.row_at(i);
        for (int64_t t = 0, j = j0; j < j1; ++t, j += p.dw) {
          const int64_t slot = ki * p.kw + slot_w[t];
          axpy(ds_ws[(local_base + j) * KK + slot], qrow + j * q.col, acc_k.data(), D);
          axpy(prob_ws[(local_base + j) * KK + slot], gorow + j * grad_out.col, acc_v.data(), D);
        }
      }
      T* gk = grad_k.at(xi, xj);
      T* gv = grad_v.at(xi, xj);
      for (int64_t d = 0; d < D; ++d) {
        gk[d] = acc_k[d] * scale;
        gv[d] = acc_v[d];
      }
    });
  });
}

// Without tiles the backward's passes read k and v once per window holding each key (the query pass), q and grad_out
// once per window holding each query (the key pass): those of them with strided tokens are staged per group of slices
// (stage_slices). With tiles k and v go through their group transposes, and staging q and grad_out for the key pass
// cost more than it saved (1x2x128x128x32 k7 d1: 35 -> 39 ms, one thread).
template <typename T>
int64_t staged_backward_tensors(Strided<const T> grad_out, Strided<const T> q, Strided<const T> k, Strided<const T> v,
                                const Problem& p, bool tiles) {
  return tiles ? 0 : strided_token_tensors(p, {grad_out.s, q.s, k.s, v.s});
}

// grad_out, q, k and v as the backward's passes read them for slices [s0, s1): with `stage`, staged copies at
// stage_mem of those with strided tokens; else themselves.
template <typename T>
struct StagedBackwardInputs {
  Strided<const T> grad_out, q, k, v;
  StagedBackwardInputs(Strided<const T> grad_out_all, Strided<const T> q_all, Strided<const T> k_all,
                       Strided<const T> v_all, int64_t s0, int64_t s1, const Problem& p, bool stage, T* stage_mem)
      : grad_out(stage ? stage_slices(grad_out_all, s0, s1, p, &stage_mem) : grad_out_all),
        q(stage ? stage_slices(q_all, s0, s1, p, &stage_mem) : q_all),
        k(stage ? stage_slices(k_all, s0, s1, p, &stage_mem) : k_all),
        v(stage ? stage_slices(v_all, s0, s1, p, &stage_mem) : v_all) {}
};

// tiles: whether the query pass uses backward_tile (has_backward_query_tiles).
template <typename T, int64_t kD>
void backward_kernel(Strided<const T> grad_out, Strided<const T> q, Strided<const T> k, Strided<const T> v,
                     const T* rpb, Strided<const T> out, const T* lse, Strided<T> grad_q, Strided<T> grad_k,
                     Strided<T> grad_v, T* grad_rpb, const Problem& p, T scale, bool tiles) {
  const Windows win(p);
  const GroupOrder order = tiles ? group_order(p) : GroupOrder{};
  // Per group of slices: P and dS (the workspace), and k and v group-transposed with tiles.
  const int64_t slice_elems = p.tokens() * p.window(), slice_kv = tiles ? p.tokens() * p.dim : 0;
  const int64_t staged = staged_backward_tensors(grad_out, q, k, v, p, tiles) * p.tokens() * p.dim;
  const int64_t group =
      slices_per_group((2 * slice_elems + 2 * slice_kv + staged) * static_cast<int64_t>(sizeof(T)), p);
  // The query pass writes every element of P and dS the key pass and rpb_grad_slices read.
  T* const prob_ws = kept_scratch<T>(group * (2 * slice_elems + 2 * slice_kv + staged));
  T* const ds_ws = prob_ws + group * slice_elems;
  T* const kt = tiles ? ds_ws + group * slice_elems : nullptr;
  T* const vt = tiles ? kt + group * slice_kv : nullptr;
  for (int64_t s0 = 0; s0 < p.batch_heads; s0 += group) {
    const int64_t s1 = std::min(p.batch_heads, s0 + group);
    if (tiles) group_transpose_slices(k, v, s0, s1, order, p, kt, vt);
    const StagedBackwardInputs<T> in(grad_out, q, k, v, s0, s1, p, !tiles,
                                     ds_ws + group * (slice_elems + 2 * slice_kv));
    backward_query_pass<T, kD>(in.grad_out, q, in.k, in.v, rpb, out, lse, grad_q, prob_ws, ds_ws, s0, s1, p, win, scale,
                               kt, vt, order.group_offset);
    backward_key_pass<T, kD>(in.grad_out, in.q, prob_ws, ds_ws, grad_k, grad_v, s0, s1, p, win, scale);
    if (grad_rpb != nullptr) {
      rpb_grad_slices<T, T>({ds_ws, contiguous_strides(p, p.window())}, s0, s1, grad_rpb, p);
    }
  }
}

// ----------------------------------------------------------------------------------------------- saved weights
// The backward from the P the forward saved (fused_backward_with_attn): the query pass reads P instead of recomputing
// exp(scale q.k + rpb - lse), then the key pass and the bias gradient are the recomputing backward's, with P read
// from the saved tensor in place of the workspace.

// Query pass of one query (i, j) of slice bh from saved weights, its first half: dS into the workspace (returned).
template <typename T, int64_t kD>
T* backward_query_saved_ds(Slice<const T> grad_out, Slice<const T> v, Slice<const T> out, const T* weights, T* ds_ws,
                           int64_t s0, int64_t bh, int64_t i, int64_t j, const Problem& p, const Windows& win, T* go_v,
                           const T** values) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const int64_t row = bh * H + i, local_row = row - s0 * H, token = row * W + j;
  const T* go = grad_out.at(i, j);
  const T delta = dot(go, out.at(i, j), D);
  const T* pw = weights + token * KK;
  T* dsw = ds_ws + (local_row * W + j) * KK;
  window_keys<T, kD>(v, i, j, p, win, values);
  dots(go, values, KK, D, go_v);
  for (int64_t n = 0; n < KK; ++n) dsw[n] = pw[n] * (go_v[n] - delta);
  return dsw;
}

// Its second half: dQ = scale * sum dS k over the window, from the dS row dsw.
template <typename T, int64_t kD>
void backward_query_saved_dq(const T* dsw, Slice<const T> k, Slice<T> grad_q, int64_t i, int64_t j, const Problem& p,
                             const Windows& win, T scale, T* acc, const T** keys) {
  const int64_t D = kD > 0 ? kD : p.dim, KK = p.window();
  T* gq = grad_q.at(i, j);
  if constexpr (kRowsInRegisters<T, kD>) {
    // The window's key rows addressed in place, row by row (a pointer per term, window_keys, measured slower).
    const T* const krow0 = k.at(win.h.start[i], win.w.start[j]);
    const int64_t row_step = p.dh * k.row, col_step = p.dw * k.col;
    RegisterRow<T, kD> sum;
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      const T* const krow = krow0 + ki * row_step;
      const T* const dsrow = dsw + ki * p.kw;
      for (int64_t kj = 0; kj < p.kw; ++kj) sum.add(dsrow[kj], krow + kj * col_step);
    }
    sum.store(scale, gq);
  } else {
    window_keys<T, kD>(k, i, j, p, win, keys);
    std::fill(acc, acc + D, T(0));
    for (int64_t n = 0; n < KK; ++n) axpy(dsw[n], keys[n], acc, D);
    for (int64_t d = 0; d < D; ++d) gq[d] = acc[d] * scale;
  }
}

// Queries of one dilation group whose dQ sums the query pass runs together (see key_block_size: the same register
// budget). Alone, a query's dQ is one chain of multiply-adds per vector of the head dim (2 at 32 on AVX-512) and
// waited on their latency (perf annotate at 1x6x128x128 k11: about a third of the query pass's samples on that
// loop); kB queries are kB times as many chains, and each k vector of their windows is loaded once for all of them.
template <typename T, int64_t kD>
constexpr int query_block_size() {
  return key_block_size<T, kD>();
}

// Whether queries x, x + dw, ..., x + (kB - 1) dw have window starts along W one group column apart (1: interior
// queries, query b's window column kj is the block's column kj + b) or all at x's (0: clamped at a border, query b's
// window column kj is the block's kj); -1 otherwise.
inline int window_block_shift(int64_t x, int kB, const AxisTable& axis, int64_t dw) {
  for (int shift : {1, 0}) {
    bool all = true;
    for (int b = 1; b < kB && all; ++b) all = axis.start[x + b * dw] == axis.start[x] + shift * b * dw;
    if (all) return shift;
  }
  return -1;
}

// sum[b] = sum over the window of w[b][ki kw + kj] x[ki row_step + (kj + kShift b) col_step] for kB queries of one
// group (window_block_shift kShift), in the window's row and column order per query (as one query's RegisterRow sum:
// the same bits); store(b, sum[b]) writes query b's result.
template <typename T, int64_t kD, int kB, int kShift, typename Store>
inline void window_block_sums(const T* const* w, const T* x, int64_t row_step, int64_t col_step, const Problem& p,
                              const Store& store) {
  constexpr int64_t kV = kD / kLanes;
  using V = Lanes<T>;
  V acc[kB][kV] = {};
  const int64_t columns = p.kw + kShift * (kB - 1);
  for (int64_t ki = 0; ki < p.kh; ++ki) {
    const T* const row = x + ki * row_step;
    for (int64_t u = 0; u < columns; ++u) {
      V xv[kV];
      for (int64_t c = 0; c < kV; ++c) xv[c] = in_register(load_lanes(row + u * col_step + c * kLanes));
#pragma GCC unroll 4
      for (int b = 0; b < kB; ++b) {
        if (u - kShift * b < 0 || u - kShift * b >= p.kw) continue;
        const T wb = w[b][ki * p.kw + u - kShift * b];
        for (int64_t c = 0; c < kV; ++c) acc[b][c] += wb * xv[c];
      }
    }
  }
  for (int b = 0; b < kB; ++b) store(b, acc[b]);
}

// dQ of kB queries of one group (window_block_shift kShift) from their dS rows ds[b] (window_block_sums).
template <typename T, int64_t kD, int kB, int kShift>
void query_block_dq(const T* const* ds, Slice<const T> k, Slice<T> grad_q, int64_t i, int64_t j, const Problem& p,
                    const Windows& win, T scale) {
  constexpr int64_t kV = kD / kLanes;
  window_block_sums<T, kD, kB, kShift>(ds, k.at(win.h.start[i], win.w.start[j]), p.dh * k.row, p.dw * k.col, p,
                                       [&](int b, const Lanes<T>* sum) {
                                         T* const gq = grad_q.at(i, j + b * p.dw);
                                         for (int64_t c = 0; c < kV; ++c) store_lanes(gq + c * kLanes, sum[c] * scale);
                                       });
}

// The bias gradient of one query row, summed while the query pass has its dS rows in cache: the row's dS rows added
// up per run of queries with the same bias columns (all interior queries are one run), each run then added into the
// row's [kh, rpb_w] partial sums at its bias columns. rpb_grad_from_row_sums adds the rows up per head.
template <typename T>
class RowBiasSums {
 public:
  RowBiasSums(T* row_sums, const Problem& p) : sums_(row_sums), run_(p.window()), p_(p) {
    std::fill(sums_, sums_ + p.kh * p.rpb_w(), T(0));
  }
  void add(const T* ds_row, int64_t bias_col) {
    if (bias_col != bias_col_) {
      flush();
      bias_col_ = bias_col;
      std::copy(ds_row, ds_row + p_.window(), run_.begin());
      return;
    }
    T* const run = run_.data();
    const int64_t n = p_.window();
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) run[t] += ds_row[t];
  }
  void flush() {
    if (bias_col_ < 0) return;
    const int64_t RW = p_.rpb_w();
    for (int64_t ki = 0; ki < p_.kh; ++ki) {
      for (int64_t kj = 0; kj < p_.kw; ++kj) sums_[ki * RW + bias_col_ + kj] += run_[ki * p_.kw + kj];
    }
    bias_col_ = -1;
  }

 private:
  T* sums_;
  std::vector<T> run_;
  const Problem& p_;
  int64_t bias_col_ = -1;
};

// Query pass from saved weights for slices [s0, s1): dS into the workspace, dQ, query by query (see
// backward_saved_kernel). With bias_row_sums, also each query row's bias gradient ([(s1 - s0) H][kh][rpb_w]): a
// separate pass over dS (rpb_grad_slices) read it from memory again, 9% of the backward at 1x6x128x128 k11.
template <typename T, int64_t kD>
void backward_query_pass_saved(Strided<const T> grad_out_all, Strided<const T> k_all, Strided<const T> v_all,
                               Strided<const T> out_all, const T* weights, Strided<T> grad_q_all, T* ds_ws, int64_t s0,
                               int64_t s1, const Problem& p, const Windows& win, T scale, T* bias_row_sums = nullptr) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const std::vector<int64_t> query_rows = rows_in_group_order(p);
  parallel((s1 - s0) * H, row_grain(p), [&](int64_t local_row) {
    const int64_t bh = s0 + local_row / H, i = query_rows[local_row % H];
    const Slice<const T> grad_out = grad_out_all.slice(bh), k = k_all.slice(bh), v = v_all.slice(bh);
    const Slice<const T> out = out_all.slice(bh);
    const Slice<T> grad_q = grad_q_all.slice(bh);
    std::vector<T> acc(D), go_v(KK);
    std::vector<const T*> keys(KK), values(KK);
    std::optional<RowBiasSums<T>> bias;
    if (bias_row_sums != nullptr) bias.emplace(bias_row_sums + ((bh - s0) * H + i) * p.kh * p.rpb_w(), p);
    const auto ds_of = [&](int64_t j) {
      T* const dsw = backward_query_saved_ds<T, kD>(grad_out, v, out, weights, ds_ws, s0, bh, i, j, p, win, go_v.data(),
                                                    values.data());
      if (bias) bias->add(dsw, win.w.bias[j]);
      return dsw;
    };
    const auto one_query = [&](int64_t j) {
      backward_query_saved_dq<T, kD>(ds_of(j), k, grad_q, i, j, p, win, scale, acc.data(), keys.data());
    };
    constexpr int kB = query_block_size<T, kD>();
    if constexpr (kB == 1) {
      for_each_in_group_order(W, p.dw, one_query);
    } else {
      const auto fits = [&](int64_t j) { return window_block_shift(j, kB, win.w, p.dw); };
      for_each_block_in_group_order<kB>(W, p.dw, fits, one_query, [&](int64_t j, int shift) {
        const T* ds[kB];
        for (int b = 0; b < kB; ++b) ds[b] = ds_of(j + b * p.dw);
        dispatch_block_shift(
            shift, [&](auto kShift) { query_block_dq<T, kD, kB, kShift.value>(ds, k, grad_q, i, j, p, win, scale); });
      });
    }
    if (bias) bias->flush();
  });
}

// Adds into grad_rpb the bias gradient of slices [s0, s1) from the query pass's row sums: per (head, bias row), the
// rows of the slices of that head in order, so the sums do not depend on how the rows were split between threads.
template <typename T>
void rpb_grad_from_row_sums(const T* row_sums, int64_t s0, int64_t s1, T* grad_rpb, const Problem& p,
                            const Windows& win) {
  const int64_t H = p.height, RH = p.rpb_h(), RW = p.rpb_w();
  const int64_t heads_present = std::min(p.heads, s1 - s0);
  parallel(heads_present * RH, 1, [&](int64_t task) {
    const int64_t first = s0 + task / RH, h = first % p.heads, a = task % RH;
    T* const out = grad_rpb + (h * RH + a) * RW;
    for (int64_t bh = first; bh < s1; bh += p.heads) {
      for (int64_t i = 0; i < H; ++i) {
        const int64_t ki = a - win.h.bias[i];
        if (ki < 0 || ki >= p.kh) continue;
        const T* const sums = row_sums + (((bh - s0) * H + i) * p.kh + ki) * RW;
        for (int64_t c = 0; c < RW; ++c) out[c] += sums[c];
      }
    }
  });
}

// The saved-weights backward of whole-group windows (window_is_whole_group): per (slice, dilation group) the dense
// products of its kh * kw queries and keys, lane-parallel as the forward's whole_group_tile. The per-query passes read
// the group's P and dS one value per multiply-add row (gathers); here they are kLanes-wide loads.
template <typename T>
struct WholeGroupBackwardScratch {
  // [slot][padded], padded = kh * kw rounded up to whole vectors, zero past kh * kw: P and dS with rows per query
  // (prob, ds: the key tiles read a key vector of them) and per key (prob_t, ds_t: the query tiles read a query
  // vector). ds_sum: the task's dS summed over its groups, rows per query.
  std::vector<T> prob, prob_t, ds, ds_t, ds_sum, got, dprob;
  std::vector<const T*> qs, keys, values, grad_outs;
  WholeGroupBackwardScratch(int64_t window, int64_t padded, int64_t dim)
      : prob(window * padded),
        prob_t(window * padded),
        ds(window * padded),
        ds_t(window * padded),
        ds_sum(window * padded),
        got(dim * kLanes),
        dprob(window * kLanes),
        qs(window),
        keys(window),
        values(window),
        grad_outs(window) {}
};

// This thread's WholeGroupBackwardScratch for a window of `window` slots (`padded` per table row) and head dim `dim`,
// kept between tasks and calls and rebuilt only when that shape changes: the tasks write only the [window][window]
// corners of P and the lanes of dS that P's zero padding keeps zero, so the padding stays zero as built. Built per
// task, the tables (4 x 11 KiB at k 7) cost about as much as the task's products at DiNAT-T's 7x7 stage.
template <typename T>
WholeGroupBackwardScratch<T>& whole_group_backward_scratch(int64_t window, int64_t padded, int64_t dim) {
  thread_local std::optional<WholeGroupBackwardScratch<T>> scratch;
  thread_local int64_t built[3] = {-1, -1, -1};
  if (!scratch || built[0] != window || built[1] != padded || built[2] != dim) {
    scratch.emplace(window, padded, dim);
    built[0] = window;
    built[1] = padded;
    built[2] = dim;
  }
  return *scratch;
}

// Query tile of slots s0 .. s0 + lanes - 1 of a whole-group backward: dS (into s.ds_t) and dQ. dP = dO . v with v
// broadcast, dS = P (dP - delta), dQ = scale sum_n dS_n k_n with k broadcast.
template <typename T, int64_t kD>
void whole_group_query_tile(Slice<const T> out, int64_t s0, int64_t lanes, int64_t padded, T* const* gq,
                            const Problem& p, T scale, const int64_t* token_i, const int64_t* token_j,
                            WholeGroupBackwardScratch<T>& s) {
  using V = Lanes<T>;
  const int64_t D = kD > 0 ? kD : p.dim, KK = p.window();
  V* __restrict got = reinterpret_cast<V*>(s.got.data());
  V* __restrict dprob = reinterpret_cast<V*>(s.dprob.data());
  V delta{};
  for (int64_t d = 0; d < D; ++d) got[d] = V{};
  rows_to_lanes(s.grad_outs.data() + s0, lanes, D, s.got.data());
  for (int64_t l = 0; l < lanes; ++l) delta[l] = dot(s.grad_outs[s0 + l], out.at(token_i[s0 + l], token_j[s0 + l]), D);
  for (int64_t n = 0; n < KK; ++n) dprob[n] = V{};
  broadcast_row_dots(got, s.values.data(), KK, D, dprob);
  T* const ds_t = s.ds_t.data() + s0;
  for (int64_t n = 0; n < KK; ++n) {
    store_lanes(ds_t + n * padded, load_lanes(s.prob_t.data() + n * padded + s0) * (dprob[n] - delta));
  }
  shared_row_weighted_sums<T, kD>(ds_t, padded, s.keys.data(), KK, D, V{} + scale, gq, lanes);
}

// Query slot `slot` of a whole-group backward on its own (the queries past the last lane tile,
// whole_group_tiled_slots): dS into column `slot` of s.ds_t, dQ = scale sum_n dS_n k_n into gq. out_row: its O, prob:
// its P.
template <typename T, int64_t kD>
void whole_group_query_one(const T* out_row, const T* prob, int64_t slot, int64_t padded, T* gq, const Problem& p,
                           T scale, WholeGroupBackwardScratch<T>& s) {
  const int64_t D = kD > 0 ? kD : p.dim, KK = p.window();
  const T* const go = s.grad_outs[slot];
  const T delta = dot(go, out_row, D);
  T* const ds = s.dprob.data();  // KK * kLanes values: dP, then dS in place
  dots(go, s.values.data(), KK, D, ds);
  T* const ds_t = s.ds_t.data() + slot;
  for (int64_t n = 0; n < KK; ++n) {
    ds[n] = prob[n] * (ds[n] - delta);
    ds_t[n * padded] = ds[n];
  }
  if constexpr (kRowsInRegisters<T, kD>) {
    RegisterRow<T, kD> acc;
    for (int64_t n = 0; n < KK; ++n) acc.add(ds[n], s.keys[n]);
    acc.store(scale, gq);
  } else {
    std::fill(gq, gq + D, T(0));
    for (int64_t n = 0; n < KK; ++n) axpy(ds[n], s.keys[n], gq, D);
    for (int64_t d = 0; d < D; ++d) gq[d] *= scale;
  }
}

// P of a group's queries (prob_rows[n]: the saved weights' row of slot n) as the tiles read it: per key, transposed
// straight from the saved rows, into s.prob_t (a copy of the rows first, then a transpose of the copy, was about a
// tenth of this backward at 56x56 k7 d8); and, where the key tiles' sums do not stay in registers (they then read
// whole vectors of P), a padded copy in s.prob.
template <typename T, int64_t kD>
void whole_group_prob_tables(const T* const* prob_rows, int64_t window, int64_t padded,
                             WholeGroupBackwardScratch<T>& s) {
  if constexpr (!kRowsInRegisters<T, kD>) {
    for (int64_t n = 0; n < window; ++n) std::copy(prob_rows[n], prob_rows[n] + window, s.prob.data() + n * padded);
  }
  transpose_rows<T>([&](int64_t n) { return prob_rows[n]; }, window, window, s.prob_t.data(), padded);
}

// Key tile of slots t0 .. t0 + lanes - 1 of a whole-group backward: dK = scale sum_s dS_s q_s into dst[l], dV = sum_s
// P_s dO_s into dst_v[l] over the group's queries s, q and dO broadcast (P from the saved rows in place where the sums
// stay in registers, else from whole_group_prob_tables' padded copy).
template <typename T, int64_t kD>
void whole_group_key_tile(const T* const* prob_rows, int64_t t0, int64_t lanes, int64_t padded, const Problem& p,
                          T scale, WholeGroupBackwardScratch<T>& s, T* const* dst, T* const* dst_v) {
  const int64_t D = kD > 0 ? kD : p.dim, KK = p.window();
  shared_row_weighted_sums<T, kD>(s.ds.data() + t0, padded, s.qs.data(), KK, D, Lanes<T>{} + scale, dst, lanes);
  if constexpr (kRowsInRegisters<T, kD>) {
    lane_weighted_row_sums_of<kD, true, T>(
        [&](int64_t n) { return prob_rows[n] + t0; }, KK, lanes, [&](int64_t n, int64_t) { return s.grad_outs[n]; },
        [&](int64_t l, int64_t c, Lanes<T> sum) { store_lanes(dst_v[l] + c * kLanes, sum); });
  } else {
    shared_row_weighted_sums<T, kD>(s.prob.data() + t0, padded, s.grad_outs.data(), KK, D, Lanes<T>{} + T(1), dst_v,
                                    lanes);
  }
}

// Key slot t of a whole-group backward on its own (the keys past the last lane tile, whole_group_tiled_slots): dK =
// scale sum_s dS_s,t q_s into gk, dV = sum_s P_s,t dO_s into gv over the group's queries s (dS from s.ds, rows per
// query; P from the saved rows). Its tile of 16 lanes did the products of 16 keys (k 7: 49 keys in 4 tiles); alone,
// the backward at DiNAT-T's whole-group shapes took 0.97-1.00x the time, with the same bits.
template <typename T, int64_t kD>
void whole_group_key_one(const T* const* prob_rows, int64_t t, int64_t padded, const Problem& p, T scale,
                         const WholeGroupBackwardScratch<T>& s, T* gk, T* gv) {
  const int64_t D = kD > 0 ? kD : p.dim, KK = p.window();
  const T* const ds = s.ds.data() + t;
  if constexpr (kRowsInRegisters<T, kD>) {
    RegisterRow<T, kD> acc_k, acc_v;
    for (int64_t q = 0; q < KK; ++q) {
      acc_k.add(ds[q * padded], s.qs[q]);
      acc_v.add(prob_rows[q][t], s.grad_outs[q]);
    }
    acc_k.store(scale, gk);
    acc_v.store(T(1), gv);
  } else {
    std::fill(gk, gk + D, T(0));
    std::fill(gv, gv + D, T(0));
    for (int64_t q = 0; q < KK; ++q) {
      axpy(ds[q * padded], s.qs[q], gk, D);
      axpy(prob_rows[q][t], s.grad_outs[q], gv, D);
    }
    for (int64_t d = 0; d < D; ++d) gk[d] *= scale;
  }
}

// The whole-group backward of slices [s0, s1): dQ, dK, dV from the saved weights and, with bias_partials (else
// null), each task's bias gradient into its own [rpb_h][rpb_w] there (task t of the call at t * rpb_h * rpb_w;
// sum_bias_partials adds them up). A task is up to kGroupsPerTask dilation groups of one slice (see
// whole_group_tasks_per_slice): their dS is summed in slot space while in L1, not written to a workspace and read back
// by rpb_grad_slices.
template <typename T, int64_t kD>
void whole_group_backward_slices(Strided<const T> grad_out_all, Strided<const T> q_all, Strided<const T> k_all,
                                 Strided<const T> v_all, Strided<const T> out_all, const T* weights,
                                 Strided<T> grad_q_all, Strided<T> grad_k_all, Strided<T> grad_v_all, T* bias_partials,
                                 int64_t s0, int64_t s1, const Problem& p, const Windows& win, T scale) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const int64_t padded = (KK + kLanes - 1) / kLanes * kLanes, groups = p.dh * p.dw;
  const int64_t tasks_per_slice = whole_group_tasks_per_slice(p), tiled = whole_group_tiled_slots(KK);
  const GroupBiasStarts bias_starts(p, win);
  // Slot n of every group is token (rh + token_i[n], rw + token_j[n]); it is also window slot n of each query.
  std::vector<int64_t> slot_i(KK), slot_j(KK);
  for (int64_t n = 0; n < KK; ++n) {
    slot_i[n] = (n / p.kw) * p.dh;
    slot_j[n] = (n % p.kw) * p.dw;
  }
  parallel((s1 - s0) * tasks_per_slice, 1, [&](int64_t task) {
    const int64_t bh = s0 + task / tasks_per_slice, g0 = task % tasks_per_slice * kGroupsPerTask;
    const int64_t g1 = std::min(groups, g0 + kGroupsPerTask);
    const Slice<const T> grad_out = grad_out_all.slice(bh), q = q_all.slice(bh), k = k_all.slice(bh);
    const Slice<const T> v = v_all.slice(bh), out = out_all.slice(bh);
    const Slice<T> grad_q = grad_q_all.slice(bh), grad_k = grad_k_all.slice(bh), grad_v = grad_v_all.slice(bh);
    WholeGroupBackwardScratch<T>& s = whole_group_backward_scratch<T>(KK, padded, D);
    if (bias_partials != nullptr) std::fill(s.ds_sum.begin(), s.ds_sum.end(), T(0));
    std::vector<int64_t> token_i(KK), token_j(KK), token(KK);
    std::vector<const T*> prob_rows(KK);  // the saved weights' row (P) of each query slot
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t rh = g / p.dw, rw = g % p.dw;
      for (int64_t n = 0; n < KK; ++n) {
        token_i[n] = rh + slot_i[n];
        token_j[n] = rw + slot_j[n];
        token[n] = (bh * H + token_i[n]) * W + token_j[n];
        s.qs[n] = q.at(token_i[n], token_j[n]);
        s.keys[n] = k.at(token_i[n], token_j[n]);
        s.values[n] = v.at(token_i[n], token_j[n]);
        s.grad_outs[n] = grad_out.at(token_i[n], token_j[n]);
        prob_rows[n] = weights + token[n] * KK;
      }
      whole_group_prob_tables<T, kD>(prob_rows.data(), KK, padded, s);
      T* dst[kLanes];
      for (int64_t t0 = 0; t0 < tiled; t0 += kLanes) {
        const int64_t lanes = std::min(kLanes, KK - t0);
        for (int64_t l = 0; l < lanes; ++l) dst[l] = grad_q.at(token_i[t0 + l], token_j[t0 + l]);
        whole_group_query_tile<T, kD>(out, t0, lanes, padded, dst, p, scale, token_i.data(), token_j.data(), s);
      }
      for (int64_t slot = tiled; slot < KK; ++slot) {
        whole_group_query_one<T, kD>(out.at(token_i[slot], token_j[slot]), prob_rows[slot], slot, padded,
                                     grad_q.at(token_i[slot], token_j[slot]), p, scale, s);
      }
      transpose_block(s.ds_t.data(), padded, KK, KK, s.ds.data(), padded);
      if (bias_partials != nullptr) add_slot_rows(s.ds.data(), KK * padded, s.ds_sum.data());
      // Key tiles: dK = scale sum_s dS_s q_s, dV = sum_s P_s dO_s over the group's queries s, q and dO broadcast.
      T* dst_v[kLanes];
      for (int64_t t0 = 0; t0 < tiled; t0 += kLanes) {
        const int64_t lanes = std::min(kLanes, KK - t0);
        for (int64_t l = 0; l < lanes; ++l) {
          dst[l] = grad_k.at(token_i[t0 + l], token_j[t0 + l]);
          dst_v[l] = grad_v.at(token_i[t0 + l], token_j[t0 + l]);
        }
        whole_group_key_tile<T, kD>(prob_rows.data(), t0, lanes, padded, p, scale, s, dst, dst_v);
      }
      for (int64_t t = tiled; t < KK; ++t) {
        whole_group_key_one<T, kD>(prob_rows.data(), t, padded, p, scale, s, grad_k.at(token_i[t], token_j[t]),
                                   grad_v.at(token_i[t], token_j[t]));
      }
    }
    if (bias_partials != nullptr) {
      const int64_t bias_elems = p.rpb_h() * p.rpb_w();
      T* const partial = bias_partials + task * bias_elems;
      std::fill(partial, partial + bias_elems, T(0));
      add_group_bias_grad(s.ds_sum.data(), padded, bias_starts.rows.data(), bias_starts.cols.data(), p, partial);
    }
  });
}

// The saved-weights backward of whole-group windows, in groups of slices (whole_group_slices_per_group) whose bias
// partials are kept per calling thread between calls.
template <typename T, int64_t kD>
void backward_saved_whole_groups(Strided<const T> grad_out, Strided<const T> q, Strided<const T> k, Strided<const T> v,
                                 Strided<const T> out, const T* weights, Strided<T> grad_q, Strided<T> grad_k,
                                 Strided<T> grad_v, T* grad_rpb, const Problem& p, const Windows& win, T scale) {
  const int64_t slice_elems = bias_partial_elems(p);
  const int64_t group = whole_group_slices_per_group<T>(p);
  T* const bias_partials = grad_rpb != nullptr ? kept_scratch<T>(group * slice_elems) : nullptr;
  for (int64_t s0 = 0; s0 < p.batch_heads; s0 += group) {
    const int64_t s1 = std::min(p.batch_heads, s0 + group);
    whole_group_backward_slices<T, kD>(grad_out, q, k, v, out, weights, grad_q, grad_k, grad_v, bias_partials, s0, s1,
                                       p, win, scale);
    if (grad_rpb != nullptr) sum_bias_partials(bias_partials, s0, s1, p, grad_rpb);
  }
}

// Whether the saved-weights backward's passes read staged copies of the inputs whose tokens are strided (the packed
// qkv, the heads-last dO): they read k and v once per window holding each key (the query pass), q and dO once per
// window holding each query (the key pass). The window's tokens then lie in a few L1 sets (see tokens_are_contiguous),
// so where the copy pays off depends on the L1's ways. With 12 ways (Intel Xeon, 48 KiB) from windows of 81 keys, as
// in the forward: packed qkv at k 11 (1x12x64x64 d1, 2 threads) 34.8 ms read in place against 32.5 staged; at k 7 the
// copy cost more than it saved (8x8x14x14 d1: 3.78 ms in place against 4.29). With 8 ways (AMD EPYC Zen 3, 32 KiB)
// from 7 x 7 windows: packed qkv forward + backward at k 7 d 1, in place / staged, in-process A/B, medians of 40
// calls, the same bits: 1x4x56x56 1.12x, 8x2x56x56 1.17x, 8x4x28x28 1.15x, 8x8x14x14 1.12x, 1x8x14x14 1.06x; at the
// Mask2Former crop's maps (batch 2) 1.07-1.11x dilated (128x128 d 16, 64x64 d 8, 32x32 d 4), 0.96-1.05x at d 1.
inline bool saved_backward_stages(const Problem& p) { return p.window() >= (l1_data_cache_ways() <= 8 ? 49 : 81); }

// The saved-weights backward, query by query in both passes (the interior of a row in blocks of 4 queries or keys
// whose windows are shifted copies or, at a group's clamped edges, the same: query_block_dq, key_block_sums; the bias
// gradient summed in the query pass).
// Its query tiles (k and v group-transposed, P and dS converted between rows and per-slot vectors 8 x 8 blocks at a
// time) lost to the per-query pass at every DiNAT stage measured once the per-query pass addressed the window's rows
// in place (2 threads, AVX-512, tiles / per-query time: contiguous q, k, v 1.12-1.20 at k 7 d1, packed qkv 1.00-1.15
// and 1.00-1.04 at k 11; AVX2 path packed 1.12-1.33 and 0.99-1.11), so it has none; the recomputing backward
// (backward_kernel) keeps its tiles, which still pay off there.
template <typename T, int64_t kD>
void backward_saved_kernel(Strided<const T> grad_out, Strided<const T> q, Strided<const T> k, Strided<const T> v,
                           Strided<const T> out, const T* weights, Strided<T> grad_q, Strided<T> grad_k,
                           Strided<T> grad_v, T* grad_rpb, const Problem& p, T scale) {
  const Windows win(p);
  if (window_is_whole_group(p)) {
    backward_saved_whole_groups<T, kD>(grad_out, q, k, v, out, weights, grad_q, grad_k, grad_v, grad_rpb, p, win,
                                       scale);
    return;
  }
  // Per group of slices: dS (P is the saved tensor) and the staged inputs.
  const bool stage = saved_backward_stages(p);
  const int64_t slice_elems = p.tokens() * p.window();
  const int64_t staged = (stage ? strided_token_tensors(p, {grad_out.s, q.s, k.s, v.s}) : 0) * p.tokens() * p.dim;
  const int64_t group = slices_per_group((slice_elems + staged) * static_cast<int64_t>(sizeof(T)), p);
  T* const ds_ws = kept_scratch<T>(group * (slice_elems + staged));
  std::vector<T> bias_row_sums(grad_rpb != nullptr ? group * p.height * p.kh * p.rpb_w() : 0);
  T* const bias_rows = grad_rpb != nullptr ? bias_row_sums.data() : nullptr;
  for (int64_t s0 = 0; s0 < p.batch_heads; s0 += group) {
    const int64_t s1 = std::min(p.batch_heads, s0 + group);
    const StagedBackwardInputs<T> in(grad_out, q, k, v, s0, s1, p, stage, ds_ws + group * slice_elems);
    backward_query_pass_saved<T, kD>(in.grad_out, in.k, in.v, out, weights, grad_q, ds_ws, s0, s1, p, win, scale,
                                     bias_rows);
    backward_key_pass<T, kD>(in.grad_out, in.q, weights + s0 * slice_elems, ds_ws, grad_k, grad_v, s0, s1, p, win,
                             scale);
    if (grad_rpb != nullptr) rpb_grad_from_row_sums(bias_rows, s0, s1, grad_rpb, p, win);
  }
}

}  // namespace

namespace {

// fused_forward, and fused_forward_with_attn when `weights` is defined (a contiguous tensor of the compute dtype).
void run_fused_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,
                       const at::Tensor& weights, const Problem& p, double scale) {
  const at::Tensor qc = as_compute(q), kc = as_compute(k), vc = as_compute(v), oc = as_compute(out);
  const at::Tensor rc = rpb.has_value() ? as_compute(*rpb) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "na_fused_forward_cpu", [&] {
    dispatch_head_dim(p.dim, [&](auto dim) {
      if (window_is_whole_group(p)) {
        whole_group_forward_kernel<scalar_t, dim.value>(
            strided_in<scalar_t>(qc), strided_in<scalar_t>(kc), strided_in<scalar_t>(vc),
            rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr, strided_out<scalar_t>(oc),
            lse.mutable_data_ptr<scalar_t>(), p, static_cast<scalar_t>(scale),
            weights.defined() ? weights.mutable_data_ptr<scalar_t>() : nullptr);
        return;
      }
      forward_kernel<scalar_t, dim.value>(strided_in<scalar_t>(qc), strided_in<scalar_t>(kc), strided_in<scalar_t>(vc),
                                          rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr,
                                          strided_out<scalar_t>(oc), lse.mutable_data_ptr<scalar_t>(), p,
                                          static_cast<scalar_t>(scale), has_query_tiles<scalar_t>(p),
                                          weights.defined() ? weights.mutable_data_ptr<scalar_t>() : nullptr);
    });
  });
  if (!oc.is_same(out)) out.copy_(oc);
}

}  // namespace

void fused_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb,
                   const at::Tensor& out, const at::Tensor& lse, const Problem& p, double scale) {
  run_fused_forward(q, k, v, rpb, out, lse, at::Tensor(), p, scale);
}

void fused_forward_with_attn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor& attn, const Problem& p, double scale) {
  TORCH_CHECK(attn.is_contiguous() && attn.scalar_type() == as_compute(q).scalar_type(),
              "na fused forward (CPU): attn must be a contiguous tensor of the accumulation dtype");
  run_fused_forward(q, k, v, rpb, out, lse, attn, p, scale);
}

void fused_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,
                    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                    const at::Tensor& grad_rpb, const Problem& p, double scale) {
  const at::Tensor goc = as_compute(grad_out), qc = as_compute(q), kc = as_compute(k), vc = as_compute(v);
  const at::Tensor oc = as_compute(out), rc = rpb.has_value() ? as_compute(*rpb) : at::Tensor();
  const at::Tensor gqc = as_compute(grad_q), gkc = as_compute(grad_k), gvc = as_compute(grad_v);
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "na_fused_backward_cpu", [&] {
    dispatch_head_dim(p.dim, [&](auto dim) {
      backward_kernel<scalar_t, dim.value>(
          strided_in<scalar_t>(goc), strided_in<scalar_t>(qc), strided_in<scalar_t>(kc), strided_in<scalar_t>(vc),
          rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr, strided_in<scalar_t>(oc),
          lse.const_data_ptr<scalar_t>(), strided_out<scalar_t>(gqc), strided_out<scalar_t>(gkc),
          strided_out<scalar_t>(gvc), grad_rpb.defined() ? grad_rpb.mutable_data_ptr<scalar_t>() : nullptr, p,
          static_cast<scalar_t>(scale), has_backward_query_tiles(p));
    });
  });
  if (!gqc.is_same(grad_q)) grad_q.copy_(gqc);
  if (!gkc.is_same(grad_k)) grad_k.copy_(gkc);
  if (!gvc.is_same(grad_v)) grad_v.copy_(gvc);
}

void fused_backward_with_attn(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& out, const at::Tensor& attn, const at::Tensor& grad_q,
                              const at::Tensor& grad_k, const at::Tensor& grad_v, const at::Tensor& grad_rpb,
                              const Problem& p, double scale) {
  const at::Tensor goc = as_compute(grad_out), qc = as_compute(q), kc = as_compute(k), vc = as_compute(v);
  const at::Tensor oc = as_compute(out);
  const at::Tensor gqc = as_compute(grad_q), gkc = as_compute(grad_k), gvc = as_compute(grad_v);
  TORCH_CHECK(attn.is_contiguous() && attn.scalar_type() == qc.scalar_type(),
              "na fused backward (CPU): attn must be a contiguous tensor of the accumulation dtype");
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "na_fused_backward_with_attn_cpu", [&] {
    dispatch_head_dim(p.dim, [&](auto dim) {
      backward_saved_kernel<scalar_t, dim.value>(
          strided_in<scalar_t>(goc), strided_in<scalar_t>(qc), strided_in<scalar_t>(kc), strided_in<scalar_t>(vc),
          strided_in<scalar_t>(oc), attn.const_data_ptr<scalar_t>(), strided_out<scalar_t>(gqc),
          strided_out<scalar_t>(gkc), strided_out<scalar_t>(gvc),
          grad_rpb.defined() ? grad_rpb.mutable_data_ptr<scalar_t>() : nullptr, p, static_cast<scalar_t>(scale));
    });
  });
  if (!gqc.is_same(grad_q)) grad_q.copy_(gqc);
  if (!gkc.is_same(grad_k)) grad_k.copy_(gkc);
  if (!gvc.is_same(grad_v)) grad_v.copy_(gvc);
}
