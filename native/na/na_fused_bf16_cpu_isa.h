// The bfloat16 fused neighborhood attention on the CPU, forward: out = softmax(scale * q.k + rpb) v with bf16 q, k, v
// and out, float32 logits, softmax and accumulation, float32 row logsumexp (and float32 saved weights).
//
// It reads q, k, v in place (any strides with a unit-stride last dim), never as float32 copies of whole tensors:
// - Work unit: a block of consecutive query rows of one (batch, head) slice and one dilation group along H. The key
//   rows their windows cover (the block's rows plus kh - 1 more, in the group) are converted once per unit into a
//   per-thread float32 scratch, so each k and v element is converted ~(block + kh - 1) / block times, not once per
//   window it appears in (kh * kw times).
// - q.k: with vdpbf16ps (DINAT_M2F_CPU_BF16_DOT, the AVX512_BF16 translation unit na_cpu_avx512bf16.cpp) straight
//   from the bf16 rows of q and k, pairs of head-dim elements per instruction with float32 sums, so k is not
//   converted at all; without it from the float32 scratch, as the float32 kernel does.
// - Softmax over the window and the weighted sum of v in float32 (v from the scratch), then one rounding of the
//   output to bf16 (round to nearest even, as c10::BFloat16).
// The backward from saved weights (training on the CPU) follows below, in the same row blocks. The float32 kernels
// (na_fused_cpu_isa.h) are untouched by this path; the bf16 backward that recomputes the weights (fused_backward,
// not taken by CPU training) still runs them on float32 copies.
//
// Included (no include guard) inside one ISA's namespace and `#pragma GCC target` region, after na_cpu_simd.h:
// by na_cpu_isa_kernels.h for the AVX2 and AVX-512 variants, and by na_cpu_avx512bf16.cpp for the AVX512_BF16 one.

#if !defined(DINAT_M2F_CPU_BF16_DOT)
#define DINAT_M2F_CPU_BF16_DOT 0
#endif

namespace {

// bf16 values as their 16 bits: the kernels only load, widen and round them.
using Bf16Bits = uint16_t;

typedef uint16_t Bf16Lanes
    __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(alignof(uint16_t)), may_alias));
typedef uint32_t Bf16WideLanes __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// kLanes bf16 values as floats: a bf16 is the upper half of the float with the same value.
inline Lanes<float> bf16_load_lanes(const Bf16Bits* p) {
  const Bf16WideLanes wide = __builtin_convertvector(*reinterpret_cast<const Bf16Lanes*>(p), Bf16WideLanes) << 16;
  return (Lanes<float>)wide;  // same-size vector cast: reinterprets the bits
}

inline float bf16_to_float(Bf16Bits x) { return std::bit_cast<float>(static_cast<uint32_t>(x) << 16); }

// Round to nearest even, NaN stays a (quiet) NaN: c10::BFloat16's conversion, so outputs match torch's .to(bf16).
inline Bf16Bits float_to_bf16(float x) {
  if (std::isnan(x)) return 0x7FC0;
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  return static_cast<Bf16Bits>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline void bf16_store_lanes(Bf16Bits* p, Lanes<float> x) {
  Bf16WideLanes bits = (Bf16WideLanes)x;
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  bits = x != x ? Bf16WideLanes{} + 0x7FC0u : bits;
  *reinterpret_cast<Bf16Lanes*>(p) = __builtin_convertvector(bits, Bf16Lanes);
}

// The first n - n % kLanes of n elements, whole vectors. The row loops run their scalar tails from it, not from where
// a loop of `i + kLanes <= n` stopped: GCC cannot see that such an i is at most n (the sum might overflow), so after
// inlining a compile-time n (the head dim) it warned of undefined behaviour in tails that never run
// (-Waggressive-loop-optimizations: a false alarm, the tails run n % kLanes times).
inline int64_t whole_vectors(int64_t n) { return n - n % kLanes; }

// out[0..n) = float(in[0..n)).
inline void bf16_widen_row(const Bf16Bits* __restrict in, float* __restrict out, int64_t n) {
  const int64_t body = whole_vectors(n);
  for (int64_t i = 0; i < body; i += kLanes) store_lanes(out + i, bf16_load_lanes(in + i));
  for (int64_t i = body; i < n; ++i) out[i] = bf16_to_float(in[i]);
}

// out[0..n) = bf16(alpha * in[0..n)).
inline void bf16_round_row(float alpha, const float* __restrict in, Bf16Bits* __restrict out, int64_t n) {
  const int64_t body = whole_vectors(n);
  for (int64_t i = 0; i < body; i += kLanes) bf16_store_lanes(out + i, load_lanes(in + i) * alpha);
  for (int64_t i = body; i < n; ++i) out[i] = float_to_bf16(alpha * in[i]);
}

#if DINAT_M2F_CPU_BF16_DOT
// The 8 sums of 8 vectors in one vector (a transposing hadd tree).
inline __m256 bf16_sum8x8(const __m256* acc) {
  const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]);
  const __m256 h23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]);
  const __m256 h67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23);
  const __m256 h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

inline __m256bh bf16_load16(const Bf16Bits* p) {
  return reinterpret_cast<__m256bh>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// out[t] = q . keys[t] for t < n, d % 16 == 0: vdpbf16ps multiplies 16 pairs of bf16 elements and adds each pair's
// sum to a float lane, so a 32-dim dot is two instructions; 8 keys at a time, reduced by one hadd tree.
inline void bf16_dots(const Bf16Bits* __restrict q, const Bf16Bits* const* keys, int64_t n, int64_t d,
                      float* __restrict out) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m256bh qv = bf16_load16(q + i);
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_dpbf16_ps(acc[u], qv, bf16_load16(keys[t + u] + i));
    }
    _mm256_storeu_ps(out + t, bf16_sum8x8(acc));
  }
  for (; t < n; ++t) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) acc = _mm256_dpbf16_ps(acc, bf16_load16(q + i), bf16_load16(keys[t] + i));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    out[t] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
  }
}
#endif

// A work unit: query rows r + m dh, m in [m0, m1), of slice bh (r: the dilation group along H).
struct Bf16RowBlock {
  int64_t bh, r, m0, m1;
};

// Rows per unit: more rows convert each key row fewer times ((rows + kh - 1) / rows), fewer give more units to
// share between threads.
constexpr int64_t kBf16BlockRows = 16;

std::vector<Bf16RowBlock> bf16_row_blocks(const Problem& p) {
  std::vector<Bf16RowBlock> blocks;
  for (int64_t bh = 0; bh < p.batch_heads; ++bh) {
    for (int64_t r = 0; r < std::min(p.dh, p.height); ++r) {
      const int64_t glen = group_length(r, p.height, p.dh);
      for (int64_t m0 = 0; m0 < glen; m0 += kBf16BlockRows) {
        blocks.push_back({bh, r, m0, std::min(glen, m0 + kBf16BlockRows)});
      }
    }
  }
  return blocks;
}

// run(std::true_type{}) where this unit has vdpbf16ps and the head dim is whole 16-wide bf16 vectors, else
// run(std::false_type{}): the kDot flag of the block kernels.
template <typename Run>
void run_with_bf16_dot_where_it_fits(const Problem& p, const Run& run) {
#if DINAT_M2F_CPU_BF16_DOT
  if (p.dim % 16 == 0) {
    run(std::true_type{});
    return;
  }
#endif
  run(std::false_type{});
}

// Calls fn(j) for every column j < W dilation group by dilation group (r, r + dw, ..., then r + 1, ...), as
// na_fused_cpu_isa.h's for_each_in_group_order (not compiled into the AVX512_BF16 unit): consecutive columns then
// share all but one window column, still in L1. In column order the bf16 backward at d 4 and 8 was 1.3x slower than
// float32's.
template <typename F>
inline void bf16_for_each_in_group_order(int64_t W, int64_t dw, const F& fn) {
  for (int64_t r = 0; r < std::min(dw, W); ++r) {
    for (int64_t j = r; j < W; j += dw) fn(j);
  }
}

// Per-thread float32 scratch, kept between calls (fresh pages of a new allocation per unit cost page faults).
struct Bf16Scratch {
  std::vector<float> keys, values, query, acc, logits;
  std::vector<const float*> key_rows, value_rows;
  std::vector<const Bf16Bits*> key_rows_bf16;
  std::vector<float> tile_logits;          // query tiles: [n][lane]
  std::vector<uint32_t> tile_query_words;  // [word][lane], bf16_tile_query_words
  std::vector<uint32_t> key_words;         // interior tiles: the block's key rows, bf16_transpose_rows
  std::vector<int64_t> columns;            // the column of each slot (bf16_column_slots' inverse)
};

Bf16Scratch& bf16_scratch() {
  thread_local Bf16Scratch scratch;
  return scratch;
}

// Group row of the first key row of query row i's window (key rows are r + m dh, m = this .. this + kh - 1).
inline int64_t bf16_window_group_row(const Windows& win, int64_t i, int64_t r, int64_t dh) {
  return (win.h.start[i] - r) / dh;
}

// The scratch column of each column j < W: the row scratch stores a row's columns dilation group by dilation group
// (r, r + dw, r + 2 dw, ..., then r + 1, ...), so the dw-strided keys of a window are consecutive (kw * D contiguous
// floats per window row), as in the float32 kernel's group-transposed k and v. In column order the AVX2 bf16 forward
// was 0.84x float32 at 56x56 d 8 (1.16x with this order; d 1 unchanged). Per thread, rebuilt per block (W values).
inline const int64_t* bf16_column_slots(const Problem& p) {
  thread_local std::vector<int64_t> slots;
  slots.resize(p.width);
  int64_t next = 0;
  bf16_for_each_in_group_order(p.width, p.dw, [&](int64_t j) { slots[j] = next++; });
  return slots.data();
}

// The float32 [rows, W, D] copy of group rows [g0, g1) of x (one slice), columns in bf16_column_slots order.
inline void bf16_widen_rows(Slice<const Bf16Bits> x, int64_t r, int64_t g0, int64_t g1, const Problem& p,
                            const int64_t* slots, float* out) {
  const int64_t W = p.width, D = p.dim;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t i = r + g * p.dh;
    float* dst = out + (g - g0) * W * D;
    for (int64_t j = 0; j < W; ++j) bf16_widen_row(x.at(i, j), dst + slots[j] * D, D);
  }
}

// dst = bf16(alpha * sum_n w[n] * row_n) over a window's rows in a row cache (D floats each; window row ki's rows at
// row0 + ki * row_step, consecutive): the forward's weighted values and the query pass's dQ. The sum stays in
// registers where the head dim allows (see na_fused_cpu_isa.h's RegisterRow; acc: D floats of scratch otherwise),
// then one rounding to bf16.
template <int64_t kD>
inline void bf16_window_weighted_rows(const float* row0, int64_t row_step, const float* w, const Problem& p,
                                      float alpha, float* acc, Bf16Bits* dst) {
  const int64_t D = kD > 0 ? kD : p.dim;
  if constexpr (kD > 0 && kD % kLanes == 0 && kD / kLanes <= 4) {
    constexpr int64_t kVectors = kD / kLanes;
    Lanes<float> sum[kVectors];
    for (int64_t c = 0; c < kVectors; ++c) sum[c] = Lanes<float>{};
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      const float* const row = row0 + ki * row_step;
      const float* const wrow = w + ki * p.kw;
      for (int64_t kj = 0; kj < p.kw; ++kj) {
        for (int64_t c = 0; c < kVectors; ++c) sum[c] += wrow[kj] * load_lanes(row + kj * D + c * kLanes);
      }
    }
    for (int64_t c = 0; c < kVectors; ++c) bf16_store_lanes(dst + c * kLanes, sum[c] * alpha);
  } else {
    std::fill(acc, acc + D, 0.0f);
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      for (int64_t kj = 0; kj < p.kw; ++kj) axpy(w[ki * p.kw + kj], row0 + ki * row_step + kj * D, acc, D);
    }
    bf16_round_row(alpha, acc, dst, D);
  }
}

}  // namespace

#include "na_whole_group_cpu_isa.h"

namespace {

// ------------------------------------------------------------------------------------------------ query tiles
// kLanes queries at a time, one per vector lane: the tile's logits are [window slot][lane] vectors, so q . k is one
// lane-parallel multiply-add per head-dim element (with vdpbf16ps one per element pair) with no horizontal sums, the
// softmax runs lane-parallel, and each key row read serves the whole tile. The softmax is the per-query path's (all
// logits, one max, one exp, float32 sums) and the output is rounded to bf16 once.

// The queries of a tile: lane l < lanes is token (i[l], j[l]); the lanes past `lanes` (a partial tile) compute on
// zero queries and are never stored.
struct Bf16Tile {
  int64_t i[kLanes], j[kLanes];
  int64_t lanes;
};

// The two bf16 elements 2e, 2e + 1 of row as one 32-bit word: vdpbf16ps multiplies such pairs.
inline uint32_t bf16_pair(const Bf16Bits* row, int64_t e) {
  uint32_t pair;
  std::memcpy(&pair, row + 2 * e, sizeof(pair));
  return pair;
}

typedef uint32_t Bf16Words8 __attribute__((vector_size(8 * sizeof(uint32_t)), aligned(alignof(uint16_t)), may_alias));
typedef uint16_t Bf16Halves8 __attribute__((vector_size(8 * sizeof(uint16_t)), aligned(alignof(uint16_t)), may_alias));

// out[w] = column w of the 8 x 8 matrix of 32-bit words whose rows are in[0..8): three rounds of interleaving (words,
// then word pairs, then 128-bit halves).
inline void bf16_transpose_words8(const Bf16Words8* in, Bf16Words8* out) {
  Bf16Words8 a[8], b[8];
  for (int x = 0; x < 8; x += 2) {
    a[x] = __builtin_shufflevector(in[x], in[x + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    a[x + 1] = __builtin_shufflevector(in[x], in[x + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int x = 0; x < 8; x += 4) {
    for (int y = 0; y < 2; ++y) {
      b[x + 2 * y] = __builtin_shufflevector(a[x + y], a[x + y + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      b[x + 2 * y + 1] = __builtin_shufflevector(a[x + y], a[x + y + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int y = 0; y < 4; ++y) {
    out[y] = __builtin_shufflevector(b[y], b[y + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    out[y + 4] = __builtin_shufflevector(b[y], b[y + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// Word w of a bf16 row: the float bits of element w (kWiden) or the element pair w.
template <bool kWiden>
inline uint32_t bf16_word(const Bf16Bits* row, int64_t w) {
  if constexpr (kWiden) {
    return static_cast<uint32_t>(row[w]) << 16;
  } else {
    return bf16_pair(row, w);
  }
}

// Words w0 .. w0 + 7 of a bf16 row.
template <bool kWiden>
inline Bf16Words8 bf16_words8(const Bf16Bits* row, int64_t w0) {
  if constexpr (kWiden) {
    return __builtin_convertvector(*reinterpret_cast<const Bf16Halves8*>(row + w0), Bf16Words8) << 16;
  } else {
    return *reinterpret_cast<const Bf16Words8*>(row + 2 * w0);
  }
}

// dst[w * dst_stride + c] = word w of rows[c], c < 8, w < words: 8 x 8 blocks transposed in registers.
template <bool kWiden>
inline void bf16_transpose_8_rows(const Bf16Bits* const* rows, int64_t words, uint32_t* dst, int64_t dst_stride) {
  const int64_t blocks = words - words % 8;  // whole_vectors' bound form
  for (int64_t w0 = 0; w0 < blocks; w0 += 8) {
    Bf16Words8 in[8], cols[8];
    for (int c = 0; c < 8; ++c) in[c] = bf16_words8<kWiden>(rows[c], w0);
    bf16_transpose_words8(in, cols);
    for (int w = 0; w < 8; ++w) *reinterpret_cast<Bf16Words8*>(dst + (w0 + w) * dst_stride) = cols[w];
  }
  for (int64_t w0 = blocks; w0 < words; ++w0) {
    for (int c = 0; c < 8; ++c) dst[w0 * dst_stride + c] = bf16_word<kWiden>(rows[c], w0);
  }
}

// qt[w][l] = word w of lane l's query (kWiden: its widened elements, as float bits; else its bf16 pairs for
// vdpbf16ps), zero in the lanes past a partial tile's queries.
template <bool kWiden>
inline void bf16_tile_query_words(Slice<const Bf16Bits> q, const Bf16Tile& t, int64_t words, uint32_t* qt) {
  const int64_t blocks = t.lanes - t.lanes % 8;  // whole_vectors' bound form
  for (int64_t l0 = 0; l0 < blocks; l0 += 8) {
    const Bf16Bits* rows[8];
    for (int c = 0; c < 8; ++c) rows[c] = q.at(t.i[l0 + c], t.j[l0 + c]);
    bf16_transpose_8_rows<kWiden>(rows, words, qt + l0, kLanes);
  }
  for (int64_t l = blocks; l < kLanes; ++l) {
    const Bf16Bits* row = l < t.lanes ? q.at(t.i[l], t.j[l]) : nullptr;
    for (int64_t w = 0; w < words; ++w) qt[w * kLanes + l] = row != nullptr ? bf16_word<kWiden>(row, w) : 0u;
  }
}

// Calls body(n, count) over n < KK in runs of up to eight keys (count: a compile-time 8, then one run of the rest):
// the run's logits stay in registers and each query vector of the tile is loaded once per run, not once per key.
template <typename Body>
inline void bf16_for_each_key_run(int64_t KK, const Body& body) {
  int64_t n = 0;
  for (; n + 8 <= KK; n += 8) body(n, std::integral_constant<int64_t, 8>{});
  const auto rest = [&](auto count) {
    if (KK - n == decltype(count)::value) body(n, count);
  };
  rest(std::integral_constant<int64_t, 1>{});
  rest(std::integral_constant<int64_t, 2>{});
  rest(std::integral_constant<int64_t, 3>{});
  rest(std::integral_constant<int64_t, 4>{});
  rest(std::integral_constant<int64_t, 5>{});
  rest(std::integral_constant<int64_t, 6>{});
  rest(std::integral_constant<int64_t, 7>{});
}

// kLanes 32-bit words, element-aligned: a query or key vector of a tile as float bits or bf16 pairs.
typedef uint32_t Bf16WordLanes
    __attribute__((vector_size(kLanes * sizeof(uint32_t)), aligned(alignof(uint32_t)), may_alias));

// acc[u] += sum_w qt[w] * key(u, w) per lane for the u < kCount keys of a run: qt the tile's query words
// ([word][lane], bf16_tile_query_words), key(u, w) the kLanes words key u meets word w with (Bf16WordLanes: one key
// broadcast in a whole-group tile, kLanes consecutive keys loaded in an interior tile). kDot: the words are bf16
// pairs, multiplied by vdpbf16ps; otherwise floats.
template <int64_t kCount, bool kDot, typename Key>
inline void bf16_tile_key_dots(const uint32_t* qt, int64_t words, Lanes<float>* acc, const Key& key) {
  using V = Lanes<float>;
#if DINAT_M2F_CPU_BF16_DOT
  if constexpr (kDot) {
    __m512 sums[kCount];
    for (int64_t u = 0; u < kCount; ++u) sums[u] = reinterpret_cast<__m512>(acc[u]);
    for (int64_t w = 0; w < words; ++w) {
      const auto qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qt + w * kLanes));
      for (int64_t u = 0; u < kCount; ++u) sums[u] = _mm512_dpbf16_ps(sums[u], qv, (__m512bh)key(u, w));
    }
    for (int64_t u = 0; u < kCount; ++u) acc[u] = reinterpret_cast<V>(sums[u]);
  }
#endif
  if constexpr (!kDot) {
    const auto* qf = reinterpret_cast<const float*>(qt);
    for (int64_t w = 0; w < words; ++w) {
      const V qw = load_lanes(qf + w * kLanes);
      for (int64_t u = 0; u < kCount; ++u) acc[u] += qw * (V)key(u, w);
    }
  }
}

// In place exp(logit - max) per lane of the tile's logits ([n][lane]); writes the logsumexp (and the normalized
// weights when saving them) of its queries and returns 1 / sum per lane.
inline Lanes<float> bf16_tile_softmax(float* logits, int64_t KK, const Bf16Tile& t, int64_t row0, int64_t W, float* lse,
                                      float* weights) {
  using V = Lanes<float>;
  V max = load_lanes(logits);
  for (int64_t n = 1; n < KK; ++n) {
    const V x = load_lanes(logits + n * kLanes);
    max = x > max ? x : max;
  }
  V sum = V{};
  for (int64_t n = 0; n < KK; ++n) {
    const V e = exp_lanes(load_lanes(logits + n * kLanes) - max);
    store_lanes(logits + n * kLanes, e);
    sum += e;
  }
  const V inv = 1.0f / sum;
  for (int64_t l = 0; l < t.lanes; ++l) {
    const int64_t token = (row0 + t.i[l]) * W + t.j[l];
    lse[token] = max[l] + std::log(sum[l]);
    if (weights == nullptr) continue;
    float* w = weights + token * KK;
    for (int64_t n = 0; n < KK; ++n) w[n] = logits[n * kLanes + l] * inv[l];
  }
  return inv;
}

// out of each tile query l = inv[l] * sum_n probs[n][l] * (values[n] + l * lane_step), rounded to bf16 once.
// kSharedValues: lane_step is 0 (a whole-group tile: every lane weighs the same value rows), so each value vector is
// loaded once per register tile of queries. The sums stay in registers for a head dim of at most 4 vectors.
template <int64_t kD, bool kSharedValues>
void bf16_tile_weighted_values(const float* probs, Lanes<float> inv, const float* const* values, int64_t lane_step,
                               int64_t KK, int64_t D, const Bf16Tile& t, Slice<Bf16Bits> out, float* acc_row) {
  if constexpr (kD > 0 && kD % kLanes == 0 && kD / kLanes <= 4) {
    lane_weighted_row_sums<kD, kSharedValues>(
        probs, kLanes, KK, t.lanes, [&](int64_t n, int64_t l) { return values[n] + l * lane_step; },
        [&](int64_t l, int64_t c, Lanes<float> sum) {
          bf16_store_lanes(out.at(t.i[l], t.j[l]) + c * kLanes, sum * inv[l]);
        });
  } else {
    for (int64_t l = 0; l < t.lanes; ++l) {
      std::fill(acc_row, acc_row + D, 0.0f);
      for (int64_t n = 0; n < KK; ++n) axpy(probs[n * kLanes + l], values[n] + l * lane_step, acc_row, D);
      bf16_round_row(inv[l], acc_row, out.at(t.i[l], t.j[l]), D);
    }
  }
}

// ----------------------------------------------------------------------------------------------- whole groups
// When every window is its whole dilation group (H == kh * dh and W == kw * dw: DiNAT-T's dilated layers at 224,
// 56x56 d 8, 28x28 d 4, 14x14 d 2, and its 7x7 stage), the kh * kw queries of a group share one window, the group's
// keys: a tile of any kLanes of them reads key n's elements as broadcasts (no transposed copy of k), and its output
// weighs the same value rows in every lane.

inline bool bf16_window_is_whole_group(const Problem& p) { return p.height == p.kh * p.dh && p.width == p.kw * p.dw; }

// The whole-group bias rows (GroupBias, group_bias_rows of na_whole_group_cpu_isa.h) with a vector of zeros past the
// last slot, so that a tile starting at any slot reads whole vectors: float32's rows, drawn per fused_forward_bf16
// call.
using Bf16GroupBias = GroupBias<float>;

// Logits of a whole-group tile into logits ([n][lane]): scale * q . k_n + bias (rows of kLanes, bias_stride apart).
// kDot: qt holds bf16 pairs (bf16_tile_query_words) and keys_bf16 the key rows, multiplied by vdpbf16ps; otherwise
// qt holds floats (bf16_tile_query_words) and keys the widened key rows. Every lane reads the same key: broadcasts.
template <int64_t kD, bool kDot>
void bf16_whole_group_logits(const uint32_t* qt, const Bf16Bits* const* keys_bf16, const float* const* keys, int64_t KK,
                             int64_t D, float scale, const float* bias, int64_t bias_stride, float* logits) {
  bf16_for_each_key_run(KK, [&](int64_t n, auto count) {
    constexpr int64_t kCount = decltype(count)::value;
    Lanes<float> acc[kCount] = {};
    bf16_tile_key_dots<kCount, kDot>(qt, kDot ? D / 2 : D, acc, [&](int64_t u, int64_t w) {
      if constexpr (kDot) {
        return Bf16WordLanes{} + bf16_pair(keys_bf16[n + u], w);
      } else {
        return Bf16WordLanes{} + std::bit_cast<uint32_t>(keys[n + u][w]);
      }
    });
    for (int64_t u = 0; u < kCount; ++u) {
      store_lanes(logits + (n + u) * kLanes, acc[u] * scale + load_lanes(bias + (n + u) * bias_stride));
    }
  });
}

// The queries of a block (group rows [m0, m1) of dilation group r along H) in whole-group tiles, dilation group by
// dilation group along W; a last partial tile of at most a quarter of the lanes (whole_group_tiled_slots) goes to
// one_query(i, j) query by query, as in the float32 forward (k 7: 49 slots are 3 tiles of 16 and one query, not 4
// tiles). keys, values: the block's widened rows from group row g0 on (bf16_widen_rows; keys unused with kDot, which
// reads k in place). head_bias: this head's Bf16GroupBias rows.
template <int64_t kD, bool kDot, typename Query>
void bf16_whole_group_block(Slice<const Bf16Bits> q, Slice<const Bf16Bits> k, const float* keys, const float* values,
                            int64_t g0, const float* head_bias, int64_t bias_stride, Slice<Bf16Bits> out, float* lse,
                            float* weights, const Problem& p, const int64_t* slots, float scale,
                            const Bf16RowBlock& block, Bf16Scratch& s, const Query& one_query) {
  const int64_t W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window(), r = block.r;
  s.tile_query_words.resize(D * kLanes);
  s.tile_logits.resize(KK * kLanes);
  s.acc.resize(D);
  s.key_rows.resize(KK);
  s.value_rows.resize(KK);
  s.key_rows_bf16.resize(KK);
  float* const logits = s.tile_logits.data();
  float* const acc = s.acc.data();
  const float** const key_rows = s.key_rows.data();
  const float** const value_rows = s.value_rows.data();
  const Bf16Bits** const key_rows_bf16 = s.key_rows_bf16.data();
  const uint32_t* const qt = s.tile_query_words.data();
  const int64_t first = block.m0 * p.kw, end = block.m1 * p.kw;  // the block's query slots in each group
  const int64_t tiled_end = first + whole_group_tiled_slots(end - first);
  for (int64_t rw = 0; rw < std::min(p.dw, W); ++rw) {
    for (int64_t n = 0; n < KK; ++n) {
      const int64_t ki = n / p.kw, kj = n % p.kw, at = ((ki - g0) * W + slots[rw] + kj) * D;
      value_rows[n] = values + at;
      if constexpr (kDot) {
        key_rows_bf16[n] = k.at(r + ki * p.dh, rw + kj * p.dw);
      } else {
        key_rows[n] = keys + at;
      }
    }
    for (int64_t s0 = first; s0 < tiled_end; s0 += kLanes) {
      Bf16Tile t;
      t.lanes = std::min(kLanes, tiled_end - s0);
      for (int64_t l = 0; l < t.lanes; ++l) {
        t.i[l] = r + ((s0 + l) / p.kw) * p.dh;
        t.j[l] = rw + ((s0 + l) % p.kw) * p.dw;
      }
      bf16_tile_query_words<!kDot>(q, t, kDot ? D / 2 : D, s.tile_query_words.data());
      bf16_whole_group_logits<kD, kDot>(qt, key_rows_bf16, key_rows, KK, D, scale, head_bias + s0, bias_stride, logits);
      const Lanes<float> inv = bf16_tile_softmax(logits, KK, t, block.bh * p.height, W, lse, weights);
      bf16_tile_weighted_values<kD, true>(logits, inv, value_rows, 0, KK, D, t, out, acc);
    }
    for (int64_t slot = tiled_end; slot < end; ++slot) one_query(r + (slot / p.kw) * p.dh, rw + (slot % p.kw) * p.dw);
  }
}

// ------------------------------------------------------------------------------------------- interior tiles
// Up to kLanes consecutive queries of one dilation group along W whose windows are not clamped along W ("interior")
// and one query row: lane l's key at window slot (ki, kj) is group column jg0 + l - kw / 2 + kj of the same key row for
// every lane, so with the block's key rows transposed to [row][word][slot] (slots in bf16_column_slots order) each
// key vector of the tile is one load, kLanes consecutive slots. Words: the widened float elements, or with vdpbf16ps
// the bf16 element pairs (k is never widened there).

// Group rows [g0, g1) of x (one slice) as [row][word][slot]: out[((g - g0) * words + w) * stride + slots[j]] = word w
// of token (r + g dh, j), 8 x 8 blocks of (slot, word) transposed in registers. stride: W plus a vector of slots
// that no column fills, which a partial tile's unused lanes read.
template <bool kWiden>
void bf16_transpose_rows(Slice<const Bf16Bits> x, int64_t r, int64_t g0, int64_t g1, const Problem& p,
                         const int64_t* columns, int64_t words, int64_t stride, uint32_t* out) {
  const int64_t W = p.width;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t i = r + g * p.dh;
    uint32_t* const dst = out + (g - g0) * words * stride;
    const int64_t blocks = W - W % 8;  // whole_vectors' bound form
    for (int64_t c0 = 0; c0 < blocks; c0 += 8) {
      const Bf16Bits* rows[8];
      for (int c = 0; c < 8; ++c) rows[c] = x.at(i, columns[c0 + c]);
      bf16_transpose_8_rows<kWiden>(rows, words, dst + c0, stride);
    }
    for (int64_t c0 = blocks; c0 < W; ++c0) {
      const Bf16Bits* row = x.at(i, columns[c0]);
      for (int64_t w = 0; w < words; ++w) dst[w * stride + c0] = bf16_word<kWiden>(row, w);
    }
  }
}

// Logits of an interior tile into logits ([n][lane]): kt the block's transposed key rows (bf16_transpose_rows, rows
// `stride` slots long),
// first_row the cache row of window row 0, col0 the slot of lane 0's first key; brow: the tile's bias row of window
// row 0 (rows rpb_w apart, the same for every lane), or null. kDot: qt and kt hold bf16 pairs, multiplied by vdpbf16ps.
template <bool kDot>
void bf16_interior_logits(const uint32_t* qt, const uint32_t* kt, int64_t words, int64_t stride, int64_t first_row,
                          int64_t col0, const Problem& p, float scale, const float* brow, float* logits) {
  for (int64_t ki = 0; ki < p.kh; ++ki) {
    const uint32_t* const krow = kt + (first_row + ki) * words * stride + col0;
    bf16_for_each_key_run(p.kw, [&](int64_t kj, auto count) {
      constexpr int64_t kCount = decltype(count)::value;
      Lanes<float> acc[kCount] = {};
      bf16_tile_key_dots<kCount, kDot>(qt, words, acc, [&](int64_t u, int64_t w) {
        return *reinterpret_cast<const Bf16WordLanes*>(krow + w * stride + kj + u);
      });
      for (int64_t u = 0; u < kCount; ++u) {
        const float bias = brow != nullptr ? brow[ki * p.rpb_w() + kj + u] : 0.0f;
        store_lanes(logits + (ki * p.kw + kj + u) * kLanes, acc[u] * scale + bias);
      }
    });
  }
}

// Calls tile(jg0, lanes) for the interior tiles of a dilation group of glen queries along W and query(jg) for every
// query they leave out: the tiles cover [kw / 2, glen - kw / 2) kLanes queries at a time; a remainder of more than a
// quarter tile is one partial tile, a smaller one goes query by query (as do the clamped windows at both ends).
template <typename Tile, typename Query>
inline void bf16_for_each_interior_tile(int64_t glen, int64_t kw, const Tile& tile, const Query& query) {
  const int64_t half = kw / 2, end = glen - half;
  int64_t jg = 0;
  for (; jg < std::min(half, glen); ++jg) query(jg);
  for (; end - jg >= kLanes; jg += kLanes) tile(jg, kLanes);
  if (end - jg > kLanes / 4) {
    tile(jg, end - jg);
    jg = end;
  }
  for (; jg < glen; ++jg) query(jg);
}

// True when some dilation group along W gets an interior tile (the first group is the longest).
inline bool bf16_has_interior_tiles(const Problem& p) {
  return group_length(0, p.width, p.dw) - 2 * (p.kw / 2) > kLanes / 4;
}

// One unit of the forward. kDot: q.k with vdpbf16ps from the bf16 rows (needs D % 16 == 0). group_bias: where every
// window is its whole group (bf16_window_is_whole_group), whose tiles (bf16_whole_group_block) then take the block's
// queries; else null.
template <int64_t kD, bool kDot>
void bf16_forward_block(Strided<const Bf16Bits> q_all, Strided<const Bf16Bits> k_all, Strided<const Bf16Bits> v_all,
                        const float* rpb, const Bf16GroupBias* group_bias, Strided<Bf16Bits> out_all, float* lse,
                        float* weights, const Problem& p, const Windows& win, float scale, const Bf16RowBlock& block) {
  static_assert(!kDot || DINAT_M2F_CPU_BF16_DOT, "vdpbf16ps logits are compiled in the AVX512_BF16 unit only");
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window(), dh = p.dh, r = block.r;
  const Slice<const Bf16Bits> q = q_all.slice(block.bh), k = k_all.slice(block.bh), v = v_all.slice(block.bh);
  const Slice<Bf16Bits> out = out_all.slice(block.bh);
  // The key rows of the block's windows: window starts are non-decreasing along the group.
  const int64_t g0 = bf16_window_group_row(win, r + block.m0 * dh, r, dh);
  const int64_t g1 = bf16_window_group_row(win, r + (block.m1 - 1) * dh, r, dh) + p.kh;
  const auto cached = static_cast<size_t>((g1 - g0) * W * D);
  Bf16Scratch& s = bf16_scratch();
  if (s.values.size() < cached) s.values.resize(cached);
  const int64_t* const slots = bf16_column_slots(p);
  bf16_widen_rows(v, r, g0, g1, p, slots, s.values.data());
  if constexpr (!kDot) {
    if (s.keys.size() < cached) s.keys.resize(cached);
    bf16_widen_rows(k, r, g0, g1, p, slots, s.keys.data());
  }
  const bool tiles = group_bias == nullptr && bf16_has_interior_tiles(p);
  const int64_t words = kDot ? D / 2 : D, stride = W + kLanes;
  if (tiles) {
    s.columns.resize(W);
    for (int64_t j = 0; j < W; ++j) s.columns[slots[j]] = j;
    const auto transposed = static_cast<size_t>((g1 - g0) * words * stride);
    if (s.key_words.size() < transposed) s.key_words.resize(transposed);
    bf16_transpose_rows<!kDot>(k, r, g0, g1, p, s.columns.data(), words, stride, s.key_words.data());
    s.tile_query_words.resize(D * kLanes);
    s.tile_logits.resize(KK * kLanes);
    s.value_rows.resize(KK);
  }
  s.query.resize(D);
  s.acc.resize(D);
  s.logits.resize(KK);
  s.key_rows.resize(KK);
  s.key_rows_bf16.resize(KK);
  // Plain pointers, read once: stores into the pointer arrays could alias the vectors' own pointers otherwise.
  float* const logits = s.logits.data();
  const float* const values = s.values.data();
  const float* const key_cache = kDot ? nullptr : s.keys.data();
  float* const query = s.query.data();
  const float** const key_rows = s.key_rows.data();
  const Bf16Bits** const key_rows_bf16 = s.key_rows_bf16.data();
  const uint32_t* const key_words = s.key_words.data();
  float* const tile_logits = s.tile_logits.data();
  const float** const value_rows = s.value_rows.data();
  const uint32_t* const qt = s.tile_query_words.data();
  const int64_t h = block.bh % p.heads;
  const auto one_query = [&](int64_t i, int64_t j) {
    const int64_t row = block.bh * H + i;
    const int64_t g_first = bf16_window_group_row(win, i, r, dh) - g0;
    // The window's key / value rows.
    for (int64_t ki = 0; ki < p.kh; ++ki) {
      const int64_t cache_row = (g_first + ki) * W;
      for (int64_t kj = 0; kj < p.kw; ++kj) {
        const int64_t n = ki * p.kw + kj;
        if constexpr (kDot) {
          key_rows_bf16[n] = k.at(win.h.start[i] + ki * dh, win.w.start[j] + kj * p.dw);
        } else {
          key_rows[n] = key_cache + (cache_row + slots[win.w.start[j]] + kj) * D;
        }
      }
    }
#if DINAT_M2F_CPU_BF16_DOT
    if constexpr (kDot) {
      bf16_dots(q.at(i, j), key_rows_bf16, KK, D, logits);
    }
#endif
    if constexpr (!kDot) {
      bf16_widen_row(q.at(i, j), query, D);
      dots(query, key_rows, KK, D, logits);
    }
    for (int64_t n = 0; n < KK; ++n) logits[n] *= scale;
    if (rpb != nullptr) {
      for (int64_t ki = 0; ki < p.kh; ++ki) {
        const float* brow = rpb + (h * p.rpb_h() + win.h.bias[i] + ki) * p.rpb_w() + win.w.bias[j];
        for (int64_t kj = 0; kj < p.kw; ++kj) logits[ki * p.kw + kj] += brow[kj];
      }
    }
    const float max = max_of(logits, KK);
    exp_shifted(logits, max, logits, KK);
    float sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t n = 0; n < KK; ++n) sum += logits[n];
    const float inv = 1.0f / sum;
    lse[row * W + j] = max + std::log(sum);
    if (weights != nullptr) {
      float* w = weights + (row * W + j) * KK;
      for (int64_t n = 0; n < KK; ++n) w[n] = logits[n] * inv;
    }
    bf16_window_weighted_rows<kD>(values + (g_first * W + slots[win.w.start[j]]) * D, W * D, logits, p, inv,
                                  s.acc.data(), out.at(i, j));
  };
  if (group_bias != nullptr) {
    const float* head_bias = group_bias_rows(*group_bias, p, win, block.bh % p.heads);
    bf16_whole_group_block<kD, kDot>(q, k, s.keys.data(), s.values.data(), g0, head_bias, group_bias->stride, out, lse,
                                     weights, p, slots, scale, block, s, one_query);
    return;
  }
  for (int64_t m = block.m0; m < block.m1; ++m) {
    const int64_t i = r + m * dh;
    const int64_t g_first = bf16_window_group_row(win, i, r, dh) - g0;
    if (!tiles) {
      bf16_for_each_in_group_order(W, p.dw, [&](int64_t j) { one_query(i, j); });
      continue;
    }
    const auto tile = [&](int64_t rw, int64_t jg0, int64_t lanes) {
      Bf16Tile t;
      t.lanes = lanes;
      for (int64_t l = 0; l < lanes; ++l) {
        t.i[l] = i;
        t.j[l] = rw + (jg0 + l) * p.dw;
      }
      bf16_tile_query_words<!kDot>(q, t, kDot ? D / 2 : D, s.tile_query_words.data());
      const int64_t col0 = slots[rw] + jg0 - p.kw / 2;
      const float* brow =
          rpb != nullptr ? rpb + (h * p.rpb_h() + win.h.bias[i]) * p.rpb_w() + win.w.bias[t.j[0]] : nullptr;
      bf16_interior_logits<kDot>(qt, key_words, words, stride, g_first, col0, p, scale, brow, tile_logits);
      const Lanes<float> inv = bf16_tile_softmax(tile_logits, KK, t, block.bh * H, W, lse, weights);
      for (int64_t n = 0; n < KK; ++n) value_rows[n] = values + ((g_first + n / p.kw) * W + col0 + n % p.kw) * D;
      bf16_tile_weighted_values<kD, false>(tile_logits, inv, value_rows, D, KK, D, t, out, s.acc.data());
    };
    for (int64_t rw = 0; rw < std::min(p.dw, W); ++rw) {
      bf16_for_each_interior_tile(
          group_length(rw, W, p.dw), p.kw, [&](int64_t jg0, int64_t lanes) { tile(rw, jg0, lanes); },
          [&](int64_t jg) { one_query(i, rw + jg * p.dw); });
    }
  }
}

#if !DINAT_M2F_CPU_BF16_DOT
// ------------------------------------------------------------------------------------------- widened slices
// Without vdpbf16ps bf16 has no faster arithmetic than float32, so the inference forward of maps that are not whole
// groups runs float32's own row code (forward_tile, forward_query of na_fused_cpu_isa.h) on the slice's k and v and
// each row's q widened once into the thread's float32 scratch, each output row rounded to bf16 once: its cost over
// float32's is the widening and the rounding. The row blocks above lost to it where k = 7 and 11 leave a few interior
// queries per group (1x4x28x28 d 1 AVX2: whole tiles in registers against all logits in memory; 1x24x40x40 d 3:
// half-empty partial tiles where float32 goes query by query).

// Rows [i0, i1) of a slice as float32 [rows][W][D] (contiguous): token (i, j) at ((i - i0) W + j) D. One long
// loop over each run of contiguous tokens (a row, or the rows), not one per token of D elements.
inline void bf16_widen_slice_rows(Slice<const Bf16Bits> x, int64_t i0, int64_t i1, const Problem& p, float* dst) {
  const int64_t W = p.width, D = p.dim;
  if (x.col == D && x.row == W * D) {
    bf16_widen_row(x.row_at(i0), dst, (i1 - i0) * W * D);
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    float* const row = dst + (i - i0) * W * D;
    if (x.col == D) {
      bf16_widen_row(x.row_at(i), row, W * D);
      continue;
    }
    for (int64_t j = 0; j < W; ++j) bf16_widen_row(x.at(i, j), row + j * D, D);
  }
}

// row[0 .. W D) (float32 token rows) rounded into row i of a bf16 slice.
inline void bf16_round_slice_row(const float* row, Slice<Bf16Bits> x, int64_t i, int64_t W, int64_t D) {
  if (x.col == D) {
    bf16_round_row(1.0f, row, x.row_at(i), W * D);
    return;
  }
  for (int64_t j = 0; j < W; ++j) bf16_round_row(1.0f, row + j * D, x.at(i, j), D);
}

// Inference forward (no weights saved) of slice bh through float32's rows (forward_row_queries, and
// forward_row_pair_queries where float32's tiles take two rows: pair_rows_of_forward), tiles: has_query_tiles(p). The
// slice's float32 k and v (and, with tiles, k and v group-transposed as forward_kernel's) live in this thread's
// kept_scratch. A row alone has its queries widened into a one-row buffer and its float32 outputs written to another
// (both stay in L1); a pair of rows uses slice-sized buffers at the rows' own places (the rows are dh apart), widened
// right before the pair reads them. The outputs are then rounded to bf16.
template <int64_t kD>
void bf16_widened_slice_forward(Strided<const Bf16Bits> q_all, Strided<const Bf16Bits> k_all,
                                Strided<const Bf16Bits> v_all, const float* rpb, Strided<Bf16Bits> out_all, float* lse,
                                float* weights, const Problem& p, const Windows& win, const GroupOrder& order,
                                bool tiles, float scale, int64_t bh) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window(), slice = p.tokens() * D;
  const bool pairs = tiles && pair_rows_of_forward<float>(p);
  const int64_t pair_rows = pairs ? 2 * slice : 0;  // the pairs' query and output buffers
  float* const kf = kept_scratch<float>((tiles ? 4 : 2) * slice + pair_rows + 2 * W * D);  // this thread's, aligned
  float* const vf = kf + slice;
  float* const kts = vf + slice;
  float* const vts = kts + slice;  // kts, vts: with tiles only
  float* const row_q = kf + (tiles ? 4 : 2) * slice;
  float* const row_out = row_q + W * D;
  float* const pair_q = row_out + W * D;  // pairs only
  float* const pair_out = pair_q + slice;
  const Slice<const Bf16Bits> q_bf16 = q_all.slice(bh), k_bf16 = k_all.slice(bh), v_bf16 = v_all.slice(bh);
  const Slice<const float> k{kf, W * D, D}, v{vf, W * D, D};
  // k and v rows widened (and transposed) as the rows' windows first reach them, so each is still in L1 when
  // transposed and read: widening the whole slice first took twice the time
  // (perf: 4.1% against 1.8% of the call at 1x24x32x32 k11 d2, AVX2, one thread).
  int64_t widened = 0;  // rows [0, widened) are in the scratch
  const auto widen_key_rows_until = [&](int64_t end) {
    if (end <= widened) return;
    bf16_widen_slice_rows(k_bf16, widened, end, p, kf + widened * W * D);
    bf16_widen_slice_rows(v_bf16, widened, end, p, vf + widened * W * D);
    for (int64_t x = widened; tiles && x < end; ++x) {
      group_transpose_row(k, x, order, p, kts + x * D * W);
      group_transpose_row(v, x, order, p, vts + x * D * W);
    }
    widened = end;
  };
  // Query row i widened to `to` (a row), after the key rows of its window.
  const auto widen_query_row = [&](int64_t i, float* to) {
    widen_key_rows_until(std::min(H, win.h.start[i] + (p.kh - 1) * p.dh + 1));  // the window's last key row
    bf16_widen_slice_rows(q_bf16, i, i + 1, p, to);
  };
  const Slice<Bf16Bits> out = out_all.slice(bh);
  RowScratch<float> first(D, KK, tiles, weights != nullptr), second(D, KK, tiles, weights != nullptr);
  for (const auto& [ia, ib] : forward_row_units(p, pairs)) {
    if (ib < 0) {
      widen_query_row(ia, row_q);
      const Slice<const float> q{row_q, 0, D};  // every row alone in the one buffer
      forward_row_queries<float, kD>(q, k, v, kts, vts, rpb, Slice<float>{row_out, 0, D}, lse, bh, ia, p, win, order,
                                     scale, tiles, weights, first);
      bf16_round_slice_row(row_out, out, ia, W, D);
      continue;
    }
    widen_query_row(ia, pair_q + ia * W * D);
    widen_query_row(ib, pair_q + ib * W * D);
    forward_row_pair_queries<float, kD>(Slice<const float>{pair_q, W * D, D}, k, v, kts, vts, rpb,
                                        Slice<float>{pair_out, W * D, D}, lse, bh, ia, ib, p, win, order, scale,
                                        weights, first, second);
    bf16_round_slice_row(pair_out + ia * W * D, out, ia, W, D);
    bf16_round_slice_row(pair_out + ib * W * D, out, ib, W, D);
  }
}

// Whether training (saving the weights) takes float32's own kernels on widened slices, forward and backward: on the
// AVX-512 path for windows of 81 keys or more. Forward + backward at DiNAT-L's k 11 cells (14 cells of
// benchmark_ops.py's dinat-l-512/640 at batch 1, 2 threads, float32 / bf16 time alternating in one process, two runs
// each), AVX-512: row blocks 0.79-0.95, widened 0.88-0.98; AVX2: row blocks 0.89-1.08, widened 0.85-0.99 (at k 7 the
// row blocks are as fast as float32's kernels there, and the widening would come on top).
inline bool bf16_widens_large_window(const Problem& p) { return kLanes == 16 && p.window() >= 81; }

// Whether the forward takes bf16_widened_slice_forward: maps that are not whole groups (those keep the whole-group
// tiles), with slices that split evenly over the threads (forward_slice_tasks, one task per slice); saving the weights
// (training) only where bf16_widens_large_window. At k 7 the row blocks won there (float32's tiles take a second exp
// pass and a transpose per tile when saving: forward + backward bf16/f32 at d 1 of DiNAT-T 1.22-1.42 against
// 1.31-1.50, AVX2, 2 threads, 3 runs each); at DiNAT-L's k 11 on AVX-512 the widened slices did (forward with weights,
// float32 / bf16 time, 2 threads, one process alternating, 9 cells: row blocks 0.77-1.27 and widened 0.96-1.28
// with contiguous q, k, v, 0.90-1.37 and 1.02-1.39 with the packed qkv).
inline bool bf16_forward_widens_slices(const Problem& p, bool saves_weights) {
  return (!saves_weights || bf16_widens_large_window(p)) && !bf16_window_is_whole_group(p) && forward_slice_tasks(p);
}
#endif

template <typename T>
Strided<T> bf16_strided(const at::Tensor& t) {
  using Elem = std::remove_const_t<T>;
  static_assert(std::is_same_v<Elem, Bf16Bits>);
  if constexpr (std::is_const_v<T>) {
    return {reinterpret_cast<const Bf16Bits*>(t.const_data_ptr<at::BFloat16>()), cpu_math::strides_of(t)};
  } else {
    return {reinterpret_cast<Bf16Bits*>(t.mutable_data_ptr<at::BFloat16>()), cpu_math::strides_of(t)};
  }
}

}  // namespace

// fused_forward for bf16 q, k, v (and rpb, out); lse float32. attn: undefined, or the float32 weights to save
// (fused_forward_with_attn).
void fused_forward_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& rpb, const at::Tensor& out, const at::Tensor& lse,
                        const at::Tensor& attn, const Problem& p, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
              "na fused forward (CPU, bf16): q, k, v and out must be bfloat16");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat,
              "na fused forward (CPU, bf16): lse must be a contiguous float32 tensor");
  TORCH_CHECK(!attn.defined() || (attn.is_contiguous() && attn.scalar_type() == at::kFloat),
              "na fused forward (CPU, bf16): attn must be a contiguous float32 tensor");
  // The bias as floats (a few thousand values): widened here, not by an ATen op, whose dispatch costs more than the
  // conversion at DiNAT's small stages.
  std::vector<float> rpb_f;
  if (rpb.has_value()) {
    TORCH_CHECK(rpb->is_contiguous() && rpb->scalar_type() == at::kBFloat16,
                "na fused forward (CPU, bf16): rpb must be a contiguous bfloat16 tensor");
    rpb_f.resize(rpb->numel());
    bf16_widen_row(reinterpret_cast<const Bf16Bits*>(rpb->const_data_ptr<at::BFloat16>()), rpb_f.data(), rpb->numel());
  }
  const Windows win(p);
  const auto qs = bf16_strided<const Bf16Bits>(q), ks = bf16_strided<const Bf16Bits>(k);
  const auto vs = bf16_strided<const Bf16Bits>(v);
  const auto os = bf16_strided<Bf16Bits>(out);
  const float* rp = rpb.has_value() ? rpb_f.data() : nullptr;
  float* lp = lse.mutable_data_ptr<float>();
  float* wp = attn.defined() ? attn.mutable_data_ptr<float>() : nullptr;
  const auto fs = static_cast<float>(scale);
  const Bf16GroupBias group_bias{rp, next_group_bias_call(), p.window() + kLanes};
  const Bf16GroupBias* const whole = bf16_window_is_whole_group(p) ? &group_bias : nullptr;
  // A unit is kBf16BlockRows rows of work at most: one at a time per thread.
#if !DINAT_M2F_CPU_BF16_DOT
  if (bf16_forward_widens_slices(p, wp != nullptr)) {
    const bool tiles = has_query_tiles<float>(p);
    const GroupOrder order = tiles ? forward_group_order<float>(p, win) : GroupOrder{};
    dispatch_head_dim(p.dim, [&](auto dim) {
      parallel(p.batch_heads, 1, [&](int64_t bh) {
        bf16_widened_slice_forward<dim.value>(qs, ks, vs, rp, os, lp, wp, p, win, order, tiles, fs, bh);
      });
    });
    return;
  }
#endif
  const std::vector<Bf16RowBlock> blocks = bf16_row_blocks(p);
  const auto run = [&](auto dot) {
    dispatch_head_dim(p.dim, [&](auto dim) {
      parallel(static_cast<int64_t>(blocks.size()), 1, [&](int64_t b) {
        bf16_forward_block<dim.value, decltype(dot)::value>(qs, ks, vs, rp, whole, os, lp, wp, p, win, fs, blocks[b]);
      });
    });
  };
  run_with_bf16_dot_where_it_fits(p, run);
}

// ------------------------------------------------------------------------------------------ backward, saved weights
// The bf16 fused_backward_with_attn (training on the CPU): the float32 kernel's two passes (na_fused_cpu_isa.h) on
// row blocks, reading the bf16 tensors in place (float32 scratch of only the rows a block reads, never float32
// copies of whole tensors):
// - query pass, per block of query rows: dS = P (dO . v - dO . O) into a float32 workspace, dQ = scale sum dS k
//   (the k rows of the block's windows converted once per block). With vdpbf16ps (the AVX512_BF16 unit) dO . v and
//   dO . O straight from the bf16 rows, so v, dO and O are not converted at all; without it v's rows converted once
//   per block like k's, dO and O once per query.
// - key pass, per block of key rows: dK = scale sum dS q, dV = sum P dO over each key's inverse neighborhood (the q
//   and dO rows of the block's inverse neighborhoods converted once per block).
// - where every window is its whole dilation group, neither: one pass per (slice, dilation group) of dense
//   lane-parallel products on the group's widened rows (bf16_whole_group_backward_slices, in the driver's unit).
// - on the AVX-512 path without vdpbf16ps, windows of 81 keys or more: float32's own passes on widened groups of
//   slices (bf16_widened_saved_backward).
// Gradients are rounded to bf16 once; the bias gradient sums dS in float32 (the float32 kernel's rpb_grad_slices,
// or its query pass's row sums on widened slices).
// dS and P are float32 (the float32 kernel's precision): dQ, dK and dV by vdpbf16ps would round them to bf16 first.
// The query pass is compiled in every unit (fused_backward_query_pass_bf16); the key pass and the driver in the
// AVX2 and AVX-512 ones, which take the query pass of the selected unit.
namespace {

struct Bf16BackwardScratch {
  std::vector<float> rows_a, rows_b, grad_out, out, go_v, acc_a, acc_b;
  std::vector<const float*> ptrs_b;
  std::vector<const Bf16Bits*> ptrs_bf16;
};

Bf16BackwardScratch& bf16_backward_scratch() {
  thread_local Bf16BackwardScratch scratch;
  return scratch;
}

#if DINAT_M2F_CPU_BF16_DOT
// x . y for d % 16 == 0 with vdpbf16ps (bf16_dots's single-key path).
inline float bf16_dot(const Bf16Bits* x, const Bf16Bits* y, int64_t d) {
  float out;
  bf16_dots(x, &y, 1, d, &out);
  return out;
}
#endif

// Query pass of one block: dS of its queries into ds_ws (slice bh's rows at (bh - s0) * H), dQ. kDot: dO . v and
// dO . O with vdpbf16ps from the bf16 rows (needs D % 16 == 0).
template <int64_t kD, bool kDot>
void bf16_backward_query_block(Strided<const Bf16Bits> grad_out_all, Strided<const Bf16Bits> k_all,
                               Strided<const Bf16Bits> v_all, Strided<const Bf16Bits> out_all, const float* attn,
                               Strided<Bf16Bits> grad_q_all, float* ds_ws, int64_t s0, const Problem& p,
                               const Windows& win, float scale, const Bf16RowBlock& block) {
  static_assert(!kDot || DINAT_M2F_CPU_BF16_DOT, "vdpbf16ps dot products are compiled in the AVX512_BF16 unit only");
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window(), dh = p.dh, r = block.r;
  const Slice<const Bf16Bits> grad_out = grad_out_all.slice(block.bh), k = k_all.slice(block.bh);
  const Slice<const Bf16Bits> v = v_all.slice(block.bh), out = out_all.slice(block.bh);
  const Slice<Bf16Bits> grad_q = grad_q_all.slice(block.bh);
  const int64_t g0 = bf16_window_group_row(win, r + block.m0 * dh, r, dh);
  const int64_t g1 = bf16_window_group_row(win, r + (block.m1 - 1) * dh, r, dh) + p.kh;
  const auto cached = static_cast<size_t>((g1 - g0) * W * D);
  Bf16BackwardScratch& s = bf16_backward_scratch();
  if (s.rows_a.size() < cached) s.rows_a.resize(cached);
  float* const keys = s.rows_a.data();
  const int64_t* const slots = bf16_column_slots(p);
  bf16_widen_rows(k, r, g0, g1, p, slots, keys);
  float* values = nullptr;
  if constexpr (!kDot) {
    if (s.rows_b.size() < cached) s.rows_b.resize(cached);
    values = s.rows_b.data();
    bf16_widen_rows(v, r, g0, g1, p, slots, values);
  }
  s.grad_out.resize(D);
  s.out.resize(D);
  s.acc_a.resize(D);
  s.go_v.resize(KK);
  s.ptrs_b.resize(KK);
  s.ptrs_bf16.resize(KK);
  // Plain pointers, read once (as the forward's).
  float* const go_v = s.go_v.data();
  float* const grad_out_f = s.grad_out.data();
  float* const out_f = s.out.data();
  [[maybe_unused]] const float** const value_rows = s.ptrs_b.data();
  [[maybe_unused]] const Bf16Bits** const value_rows_bf16 = s.ptrs_bf16.data();
  for (int64_t m = block.m0; m < block.m1; ++m) {
    const int64_t i = r + m * dh, row = block.bh * H + i, local_row = row - s0 * H;
    const int64_t g_first = bf16_window_group_row(win, i, r, dh) - g0;
    // dS of query j into the workspace (returned).
    const auto ds_of = [&](int64_t j) {
      float delta;
#if DINAT_M2F_CPU_BF16_DOT
      if constexpr (kDot) {
        for (int64_t ki = 0; ki < p.kh; ++ki) {
          for (int64_t kj = 0; kj < p.kw; ++kj) {
            value_rows_bf16[ki * p.kw + kj] = v.at(win.h.start[i] + ki * dh, win.w.start[j] + kj * p.dw);
          }
        }
        delta = bf16_dot(grad_out.at(i, j), out.at(i, j), D);
        bf16_dots(grad_out.at(i, j), value_rows_bf16, KK, D, go_v);
      }
#endif
      if constexpr (!kDot) {
        for (int64_t ki = 0; ki < p.kh; ++ki) {
          for (int64_t kj = 0; kj < p.kw; ++kj) {
            value_rows[ki * p.kw + kj] = values + ((g_first + ki) * W + slots[win.w.start[j]] + kj) * D;
          }
        }
        bf16_widen_row(grad_out.at(i, j), grad_out_f, D);
        bf16_widen_row(out.at(i, j), out_f, D);
        delta = dot(grad_out_f, out_f, D);
        dots(grad_out_f, value_rows, KK, D, go_v);
      }
      const float* prob = attn + (row * W + j) * KK;
      float* ds = ds_ws + (local_row * W + j) * KK;
      for (int64_t n = 0; n < KK; ++n) ds[n] = prob[n] * (go_v[n] - delta);
      return ds;
    };
    // dQ = scale sum dS k, the key rows addressed in place (a pointer per term measured slower).
    const auto one_query = [&](int64_t j) {
      bf16_window_weighted_rows<kD>(keys + (g_first * W + slots[win.w.start[j]]) * D, W * D, ds_of(j), p, scale,
                                    s.acc_a.data(), grad_q.at(i, j));
    };
#if DINAT_M2F_CPU_BF16_DOT
    bf16_for_each_in_group_order(W, p.dw, one_query);  // this unit has no float32 kernels (window_block_sums)
#else
    // As float32's query pass: the dQ of query_block_size queries of a group together (the same bits), their key
    // rows consecutive slots of the widened rows.
    constexpr int kB = query_block_size<float, kD>();
    if constexpr (kB == 1) {
      bf16_for_each_in_group_order(W, p.dw, one_query);
    } else {
      constexpr int64_t kV = kD / kLanes;
      const auto fits = [&](int64_t j) { return window_block_shift(j, kB, win.w, p.dw); };
      for_each_block_in_group_order<kB>(W, p.dw, fits, one_query, [&](int64_t j, int shift) {
        const float* ds[kB];
        for (int b = 0; b < kB; ++b) ds[b] = ds_of(j + b * p.dw);
        dispatch_block_shift(shift, [&](auto kShift) {
          window_block_sums<float, kD, kB, kShift.value>(ds, keys + (g_first * W + slots[win.w.start[j]]) * D, W * D, D,
                                                         p, [&](int b, const Lanes<float>* sum) {
                                                           Bf16Bits* const gq = grad_q.at(i, j + b * p.dw);
                                                           for (int64_t c = 0; c < kV; ++c) {
                                                             bf16_store_lanes(gq + c * kLanes, sum[c] * scale);
                                                           }
                                                         });
        });
      });
    }
#endif
  }
}

// The row blocks of slices [s0, s1), one parallel region of the backward: each (slice, dilation group) of glen rows
// in nb blocks of nearly equal rows, nb in [glen / 24, glen / 8] (rounded up) such that the busiest thread (static
// chunks of whole blocks) has the fewest rows, the fewest blocks among equals. 16-row blocks left threads idle where a
// region has few of them: 5 blocks of an 80-row slice on 2 threads are 3 against 2 (libgomp's wait was 4% of the
// call at 1x12x80x80 k11, one slice per group).
std::vector<Bf16RowBlock> bf16_backward_row_blocks(const Problem& p, int64_t s0, int64_t s1) {
  const int64_t groups = std::min(p.dh, p.height), glen = group_length(0, p.height, p.dh);  // group 0 is the longest
  const int64_t pairs = (s1 - s0) * groups, threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t best = 1, best_rows = std::numeric_limits<int64_t>::max();
  for (int64_t nb = std::max<int64_t>(1, (glen + 23) / 24); nb <= std::max<int64_t>(1, (glen + 7) / 8); ++nb) {
    const int64_t busiest = (pairs * nb + threads - 1) / threads * ((glen + nb - 1) / nb);
    if (busiest < best_rows) best = nb, best_rows = busiest;
  }
  std::vector<Bf16RowBlock> blocks;
  for (int64_t bh = s0; bh < s1; ++bh) {
    for (int64_t r = 0; r < groups; ++r) {
      const int64_t len = group_length(r, p.height, p.dh), nb = std::min(best, len);
      for (int64_t b = 0; b < nb; ++b) blocks.push_back({bh, r, b * len / nb, (b + 1) * len / nb});
    }
  }
  return blocks;
}

}  // namespace

// The query pass for slices [s0, s1): dS into ds (their rows from slice s0 on), dQ.
void fused_backward_query_pass_bf16(const at::Tensor& grad_out, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& out, const at::Tensor& attn, const at::Tensor& grad_q, float* ds,
                                    int64_t s0, int64_t s1, const Problem& p, double scale) {
  const Windows win(p);
  const std::vector<Bf16RowBlock> blocks = bf16_backward_row_blocks(p, s0, s1);
  const auto gos = bf16_strided<const Bf16Bits>(grad_out), ks = bf16_strided<const Bf16Bits>(k);
  const auto vs = bf16_strided<const Bf16Bits>(v), os = bf16_strided<const Bf16Bits>(out);
  const auto gqs = bf16_strided<Bf16Bits>(grad_q);
  const float* prob = attn.const_data_ptr<float>();
  const auto fs = static_cast<float>(scale);
  const auto run = [&](auto dot) {
    dispatch_head_dim(p.dim, [&](auto dim) {
      parallel(static_cast<int64_t>(blocks.size()), 1, [&](int64_t b) {
        bf16_backward_query_block<dim.value, decltype(dot)::value>(gos, ks, vs, os, prob, gqs, ds, s0, p, win, fs,
                                                                   blocks[b]);
      });
    });
  };
  run_with_bf16_dot_where_it_fits(p, run);
}

#if !DINAT_M2F_CPU_BF16_DOT
namespace {

// Group row range [begin, end) of the queries whose windows hold some key row of [x0, x1) (group rows of group r).
inline std::pair<int64_t, int64_t> bf16_inverse_group_rows(const Windows& win, int64_t r, int64_t x0, int64_t x1,
                                                           int64_t dh) {
  return {(win.h.inverse[r + x0 * dh].begin - r) / dh, (win.h.inverse[r + (x1 - 1) * dh].end - r + dh - 1) / dh};
}

// Key pass of one block (its rows are key rows): dK, dV.
template <int64_t kD>
void bf16_backward_key_block(Strided<const Bf16Bits> grad_out_all, Strided<const Bf16Bits> q_all, const float* attn,
                             const float* ds_ws, Strided<Bf16Bits> grad_k_all, Strided<Bf16Bits> grad_v_all, int64_t s0,
                             const Problem& p, const Windows& win, float scale, const Bf16RowBlock& block) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window(), dh = p.dh, r = block.r;
  const Slice<const Bf16Bits> grad_out = grad_out_all.slice(block.bh), q = q_all.slice(block.bh);
  const Slice<Bf16Bits> grad_k = grad_k_all.slice(block.bh), grad_v = grad_v_all.slice(block.bh);
  const auto [g0, g1] = bf16_inverse_group_rows(win, r, block.m0, block.m1, dh);
  const auto cached = static_cast<size_t>((g1 - g0) * W * D);
  Bf16BackwardScratch& s = bf16_backward_scratch();
  if (s.rows_a.size() < cached) s.rows_a.resize(cached);
  if (s.rows_b.size() < cached) s.rows_b.resize(cached);
  float* const queries = s.rows_a.data();
  float* const grads = s.rows_b.data();
  const int64_t* const slots = bf16_column_slots(p);
  bf16_widen_rows(q, r, g0, g1, p, slots, queries);
  bf16_widen_rows(grad_out, r, g0, g1, p, slots, grads);
  s.acc_a.resize(D);
  s.acc_b.resize(D);
  const float* const slice_ds = ds_ws + (block.bh - s0) * H * W * KK;
  const float* const slice_prob = attn + block.bh * H * W * KK;
  // Window columns and rows without an integer division per (key, query): each query's window start along W in
  // group columns, and each key row's query rows (their dS / P rows at the key's window row, their cache row) once
  // per key row, not per key (divisions per term made this pass 1.3x slower than float32's).
  std::vector<int64_t> start_g(W), slot_w;
  for (int64_t j = 0; j < W; ++j) start_g[j] = win.w.start[j] / p.dw;
  struct QueryRow {
    const float *ds, *prob;
    int64_t cache_at;
  };
  std::vector<QueryRow> rows;
  for (int64_t x = block.m0; x < block.m1; ++x) {
    const int64_t xi = r + x * dh;
    rows.clear();
    for (int64_t i = win.h.inverse[xi].begin; i < win.h.inverse[xi].end; i += dh) {
      const int64_t ki = window_slot(xi, win.h.start[i], dh), at = i * W * KK + ki * p.kw;
      rows.push_back({slice_ds + at, slice_prob + at, ((i - r) / dh - g0) * W * D});
    }
    const auto one_key = [&](int64_t xj) {
      const int64_t j0 = win.w.inverse[xj].begin, j1 = win.w.inverse[xj].end, xg = xj / p.dw;
      slot_w.clear();
      for (int64_t j = j0; j < j1; j += p.dw) slot_w.push_back(j * KK + xg - start_g[j]);
      const auto n_w = static_cast<int64_t>(slot_w.size());
      // dK and dV of the key summed straight from the workspace and the row caches (in registers where they fit).
      const auto add_terms = [&](auto&& add) {
        for (const QueryRow& row : rows) {
          const int64_t at0 = row.cache_at + slots[j0] * D;  // the inverse's columns: consecutive slots
          for (int64_t t = 0; t < n_w; ++t) add(row.ds[slot_w[t]], row.prob[slot_w[t]], at0 + t * D);
        }
      };
      if constexpr (kD > 0 && kD % kLanes == 0 && kD / kLanes <= 4) {
        constexpr int64_t kVectors = kD / kLanes;
        Lanes<float> acc_k[kVectors], acc_v[kVectors];
        for (int64_t c = 0; c < kVectors; ++c) acc_k[c] = acc_v[c] = Lanes<float>{};
        add_terms([&](float ds, float prob, int64_t at) {
          for (int64_t c = 0; c < kVectors; ++c) {
            acc_k[c] += ds * load_lanes(queries + at + c * kLanes);
            acc_v[c] += prob * load_lanes(grads + at + c * kLanes);
          }
        });
        for (int64_t c = 0; c < kVectors; ++c) {
          bf16_store_lanes(grad_k.at(xi, xj) + c * kLanes, acc_k[c] * scale);
          bf16_store_lanes(grad_v.at(xi, xj) + c * kLanes, acc_v[c]);
        }
      } else {
        float* acc_k = s.acc_a.data();
        float* acc_v = s.acc_b.data();
        std::fill(acc_k, acc_k + D, 0.0f);
        std::fill(acc_v, acc_v + D, 0.0f);
        add_terms([&](float ds, float prob, int64_t at) {
          axpy(ds, queries + at, acc_k, D);
          axpy(prob, grads + at, acc_v, D);
        });
        bf16_round_row(scale, acc_k, grad_k.at(xi, xj), D);
        bf16_round_row(1.0f, acc_v, grad_v.at(xi, xj), D);
      }
    };
    // As float32's key pass: key_block_size keys of a group together (the same bits), the q and dO rows of their
    // inverse windows consecutive slots of the row caches.
    constexpr int kB = key_block_size<float, kD>();
    if constexpr (kB == 1) {
      bf16_for_each_in_group_order(W, p.dw, one_key);
    } else {
      std::vector<KeyPassQueryRow<float>> block_rows;
      for (const QueryRow& row : rows) {
        block_rows.push_back({row.ds, row.prob, queries + row.cache_at, grads + row.cache_at});
      }
      std::vector<int64_t> slot_u;
      const auto fits = [&](int64_t xj) { return key_block_shift(xj, kB, win.w, p.dw); };
      for_each_block_in_group_order<kB>(W, p.dw, fits, one_key, [&](int64_t xj, int shift) {
        const int64_t j0 = win.w.inverse[xj].begin, xg = xj / p.dw;
        const int64_t terms = (win.w.inverse[xj].end - j0 + p.dw - 1) / p.dw;
        slot_u.clear();
        for (int64_t u = 0, j = j0; u < terms + shift * (kB - 1); ++u, j += p.dw) {
          slot_u.push_back(j * KK + xg - start_g[j]);
        }
        dispatch_block_shift(shift, [&](auto kShift) {
          key_block_sums<float, kD, kB, kShift.value>(block_rows.data(), static_cast<int64_t>(block_rows.size()),
                                                      slot_u.data(), terms, slots[j0] * D, D, slots[j0] * D, D,
                                                      [&](int b, const Lanes<float>* sum_k, const Lanes<float>* sum_v) {
                                                        Bf16Bits* const gk = grad_k.at(xi, xj + b * p.dw);
                                                        Bf16Bits* const gv = grad_v.at(xi, xj + b * p.dw);
                                                        for (int64_t c = 0; c < kD / kLanes; ++c) {
                                                          bf16_store_lanes(gk + c * kLanes, sum_k[c] * scale);
                                                          bf16_store_lanes(gv + c * kLanes, sum_v[c]);
                                                        }
                                                      });
        });
      });
    }
  }
}

// ----------------------------------------------------------------------------------------------- whole groups
// The saved-weights backward where every window is its whole dilation group (bf16_window_is_whole_group): per
// (slice, dilation group) the float32 kernel's dense lane-parallel products (whole_group_query_tile,
// shared_row_weighted_sums of na_fused_cpu_isa.h) on the group's q, k, v, dO and O rows widened once (kh kw rows each,
// while the products are kh kw times as many), each gradient rounded to bf16 once. The per-query passes gathered the
// group's P and dS one value per multiply-add row; on the vdpbf16ps path too this runs widened (its driver is the
// AVX-512 unit's): dO . v is one of the four products, and dS, P are float32 anyway.

// The group's widened rows: row n of each tensor (its slot n) at n * dim.
struct Bf16GroupRows {
  std::vector<float> q, k, v, grad_out, out, grads;  // grads: kLanes rows of a tile's gradients before rounding
};

// A thread's scratch of the whole-group backward, kept between tasks and calls: built per (slice, group) task, its
// P / dS tables (zeroed, 4 x 11 KiB at k 7) and token vectors cost about as much as the task's products at DiNAT-T's
// 7x7 stage (49 queries and keys), where bf16's widening and rounding come on top of float32's same products.
struct Bf16WholeGroupScratch {
  std::optional<WholeGroupBackwardScratch<float>> tables;
  int64_t window = 0, padded = 0, dim = 0;  // the shape `tables` was built for
  std::vector<int64_t> token_i, token_j, token;
  std::vector<const float*> prob_rows;  // the saved weights' row (P) of each query slot
  Bf16GroupRows rows;
};

// The scratch for a window of `window` slots (`padded` per table row) and head dim `dim`. The tables are rebuilt only
// when that shape changes: the tasks write only the [window][window] corners, so the padding stays zero as built
// (whole_group_query_tile reads P's padded lanes).
inline Bf16WholeGroupScratch& bf16_whole_group_scratch(int64_t window, int64_t padded, int64_t dim) {
  thread_local Bf16WholeGroupScratch scratch;
  if (!scratch.tables || scratch.window != window || scratch.padded != padded || scratch.dim != dim) {
    scratch.tables.emplace(window, padded, dim);
    scratch.window = window;
    scratch.padded = padded;
    scratch.dim = dim;
    scratch.token_i.resize(window);
    scratch.token_j.resize(window);
    scratch.token.resize(window);
    scratch.prob_rows.resize(window);
  }
  return scratch;
}

inline void bf16_widen_group_rows(Slice<const Bf16Bits> x, const int64_t* token_i, const int64_t* token_j,
                                  int64_t window, int64_t D, std::vector<float>& rows, const float** row_ptrs) {
  rows.resize(window * D);
  for (int64_t n = 0; n < window; ++n) {
    bf16_widen_row(x.at(token_i[n], token_j[n]), rows.data() + n * D, D);
    if (row_ptrs != nullptr) row_ptrs[n] = rows.data() + n * D;
  }
}

// Rounds a tile's float32 gradient rows (tile_rows[l], l < lanes) into the bf16 tokens of slots t0 + l.
inline void bf16_round_tile_rows(float* const* tile_rows, int64_t lanes, int64_t t0, Slice<Bf16Bits> grad,
                                 const int64_t* token_i, const int64_t* token_j, int64_t D) {
  for (int64_t l = 0; l < lanes; ++l) bf16_round_row(1.0f, tile_rows[l], grad.at(token_i[t0 + l], token_j[t0 + l]), D);
}

// The whole-group backward of slices [s0, s1): dQ, dK, dV from the saved float32 weights and, with bias_partials
// (else null), each task's bias gradient into its own [rpb_h][rpb_w] there (task t of the call at t * rpb_h * rpb_w;
// sum_bias_partials adds them up). A task is up to kGroupsPerTask dilation groups of one slice, their dS summed in
// slot space while in L1 (as the float32 whole_group_backward_slices).
template <int64_t kD>
void bf16_whole_group_backward_slices(Strided<const Bf16Bits> grad_out_all, Strided<const Bf16Bits> q_all,
                                      Strided<const Bf16Bits> k_all, Strided<const Bf16Bits> v_all,
                                      Strided<const Bf16Bits> out_all, const float* weights,
                                      Strided<Bf16Bits> grad_q_all, Strided<Bf16Bits> grad_k_all,
                                      Strided<Bf16Bits> grad_v_all, float* bias_partials, int64_t s0, int64_t s1,
                                      const Problem& p, const Windows& win, float scale) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim, KK = p.window();
  const int64_t padded = (KK + kLanes - 1) / kLanes * kLanes, groups = p.dh * p.dw;
  const int64_t tasks_per_slice = whole_group_tasks_per_slice(p), tiled = whole_group_tiled_slots(KK);
  const GroupBiasStarts bias_starts(p, win);
  // whole_group_query_tile reads O of slot n at out.at(n, 0): the widened rows, one slot per row.
  std::vector<int64_t> slot_rows(KK), slot_cols(KK, 0);
  for (int64_t n = 0; n < KK; ++n) slot_rows[n] = n;
  parallel((s1 - s0) * tasks_per_slice, 1, [&](int64_t task) {
    const int64_t bh = s0 + task / tasks_per_slice, g0 = task % tasks_per_slice * kGroupsPerTask;
    const int64_t g1 = std::min(groups, g0 + kGroupsPerTask);
    Bf16WholeGroupScratch& scratch = bf16_whole_group_scratch(KK, padded, D);
    WholeGroupBackwardScratch<float>& s = *scratch.tables;
    Bf16GroupRows& rows = scratch.rows;
    int64_t* const token_i = scratch.token_i.data();
    int64_t* const token_j = scratch.token_j.data();
    int64_t* const token = scratch.token.data();
    const float** const prob_rows = scratch.prob_rows.data();
    if (bias_partials != nullptr) std::fill(s.ds_sum.begin(), s.ds_sum.end(), 0.0f);
    rows.grads.resize(2 * kLanes * D);
    float* dst[kLanes];
    float* dst_v[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      dst[l] = rows.grads.data() + l * D;
      dst_v[l] = rows.grads.data() + (kLanes + l) * D;
    }
    const Slice<Bf16Bits> grad_q = grad_q_all.slice(bh), grad_k = grad_k_all.slice(bh);
    const Slice<Bf16Bits> grad_v = grad_v_all.slice(bh);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t rh = g / p.dw, rw = g % p.dw;
      for (int64_t n = 0; n < KK; ++n) {
        token_i[n] = rh + (n / p.kw) * p.dh;
        token_j[n] = rw + (n % p.kw) * p.dw;
        token[n] = (bh * H + token_i[n]) * W + token_j[n];
        prob_rows[n] = weights + token[n] * KK;
      }
      whole_group_prob_tables<float, kD>(prob_rows, KK, padded, s);
      const int64_t *ti = token_i, *tj = token_j;
      bf16_widen_group_rows(q_all.slice(bh), ti, tj, KK, D, rows.q, s.qs.data());
      bf16_widen_group_rows(k_all.slice(bh), ti, tj, KK, D, rows.k, s.keys.data());
      bf16_widen_group_rows(v_all.slice(bh), ti, tj, KK, D, rows.v, s.values.data());
      bf16_widen_group_rows(grad_out_all.slice(bh), ti, tj, KK, D, rows.grad_out, s.grad_outs.data());
      bf16_widen_group_rows(out_all.slice(bh), ti, tj, KK, D, rows.out, nullptr);
      const Slice<const float> out_rows{rows.out.data(), D, 0};
      for (int64_t t0 = 0; t0 < tiled; t0 += kLanes) {
        const int64_t lanes = std::min(kLanes, KK - t0);
        whole_group_query_tile<float, kD>(out_rows, t0, lanes, padded, dst, p, scale, slot_rows.data(),
                                          slot_cols.data(), s);
        bf16_round_tile_rows(dst, lanes, t0, grad_q, ti, tj, D);
      }
      for (int64_t slot = tiled; slot < KK; ++slot) {
        whole_group_query_one<float, kD>(out_rows.at(slot, 0), prob_rows[slot], slot, padded, dst[0], p, scale, s);
        bf16_round_tile_rows(dst, 1, slot, grad_q, ti, tj, D);
      }
      transpose_block(s.ds_t.data(), padded, KK, KK, s.ds.data(), padded);
      if (bias_partials != nullptr) add_slot_rows(s.ds.data(), KK * padded, s.ds_sum.data());
      // Key tiles: dK = scale sum_s dS_s q_s, dV = sum_s P_s dO_s over the group's queries s, q and dO broadcast.
      for (int64_t t0 = 0; t0 < tiled; t0 += kLanes) {
        const int64_t lanes = std::min(kLanes, KK - t0);
        whole_group_key_tile<float, kD>(prob_rows, t0, lanes, padded, p, scale, s, dst, dst_v);
        bf16_round_tile_rows(dst, lanes, t0, grad_k, ti, tj, D);
        bf16_round_tile_rows(dst_v, lanes, t0, grad_v, ti, tj, D);
      }
      for (int64_t slot = tiled; slot < KK; ++slot) {
        whole_group_key_one<float, kD>(prob_rows, slot, padded, p, scale, s, dst[0], dst_v[0]);
        bf16_round_tile_rows(dst, 1, slot, grad_k, ti, tj, D);
        bf16_round_tile_rows(dst_v, 1, slot, grad_v, ti, tj, D);
      }
    }
    if (bias_partials != nullptr) {
      const int64_t bias_elems = p.rpb_h() * p.rpb_w();
      float* const partial = bias_partials + task * bias_elems;
      std::fill(partial, partial + bias_elems, 0.0f);
      add_group_bias_grad(s.ds_sum.data(), padded, bias_starts.rows.data(), bias_starts.cols.data(), p, partial);
    }
  });
}

// ------------------------------------------------------------------------------------------- widened slices
// On the AVX-512 path (without vdpbf16ps) windows of 81 keys or more (bf16_widens_large_window) take float32's
// saved-weights backward itself (backward_query_pass_saved, backward_key_pass of na_fused_cpu_isa.h) on each group of
// slices widened to float32 right before its passes (as float32 stages its token-strided inputs there), the gradients
// rounded to bf16 once after them, while the group is in cache: its cost over float32's is the widening and the
// rounding.

// Rows of work for the widening and rounding passes: about 32K values per task.
inline int64_t bf16_slice_row_grain(const Problem& p) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(p.width * p.dim, 1));
}

// Slices [s0, s1) of each xs[t] widened into float32 at stage + t * (s1 - s0) H W D as [s1 - s0, H, W, D], in one
// parallel pass (a pass per tensor cost a fork and join each, a visible share at 16x16 maps); returns the copies,
// addressed by the slices' own numbers.
template <size_t kN>
std::array<Strided<const float>, kN> bf16_widen_slices(const std::array<Strided<const Bf16Bits>, kN>& xs, int64_t s0,
                                                       int64_t s1, const Problem& p, float* stage) {
  const int64_t H = p.height, W = p.width, D = p.dim, rows = (s1 - s0) * H, n = rows * W * D;
  parallel(rows, bf16_slice_row_grain(p), [&](int64_t row) {
    const int64_t i = row % H;
    for (size_t t = 0; t < kN; ++t)
      bf16_widen_slice_rows(xs[t].slice(s0 + row / H), i, i + 1, p, stage + t * n + row * W * D);
  });
  std::array<Strided<const float>, kN> widened;
  for (size_t t = 0; t < kN; ++t) {
    widened[t] = {stage + t * n, contiguous_strides(p, D)};
    widened[t].s.origin = widened[t].s.slice(s0);
  }
  return widened;
}

// Float32 slices [s0, s1) at src + t * (s1 - s0) H W D rounded into xs[t], in one parallel pass.
template <size_t kN>
void bf16_round_slices(const float* src, const std::array<Strided<Bf16Bits>, kN>& xs, int64_t s0, int64_t s1,
                       const Problem& p) {
  const int64_t H = p.height, W = p.width, D = p.dim, rows = (s1 - s0) * H, n = rows * W * D;
  parallel(rows, bf16_slice_row_grain(p), [&](int64_t row) {
    for (size_t t = 0; t < kN; ++t)
      bf16_round_slice_row(src + t * n + row * W * D, xs[t].slice(s0 + row / H), row % H, W, D);
  });
}

// The saved-weights backward on widened slices (bf16_widens_large_window): dQ, dK, dV and the bias gradient.
template <int64_t kD>
void bf16_widened_saved_backward(Strided<const Bf16Bits> grad_out_all, Strided<const Bf16Bits> q_all,
                                 Strided<const Bf16Bits> k_all, Strided<const Bf16Bits> v_all,
                                 Strided<const Bf16Bits> out_all, const float* prob, Strided<Bf16Bits> grad_q_all,
                                 Strided<Bf16Bits> grad_k_all, Strided<Bf16Bits> grad_v_all, float* rpb_grad,
                                 const Problem& p, const Windows& win, float scale) {
  // Per slice: dS, the five widened inputs and the three float32 gradients.
  const int64_t slice_elems = p.tokens() * p.window(), slice_kv = p.tokens() * p.dim;
  const int64_t per_slice = slice_elems + 8 * slice_kv;
  const int64_t group = slices_per_group(per_slice * static_cast<int64_t>(sizeof(float)), p);
  float* const ds_ws = kept_scratch<float>(group * per_slice);
  std::vector<float> bias_row_sums(rpb_grad != nullptr ? group * p.height * p.kh * p.rpb_w() : 0);
  float* const bias_rows = rpb_grad != nullptr ? bias_row_sums.data() : nullptr;
  for (int64_t s0 = 0; s0 < p.batch_heads; s0 += group) {
    const int64_t s1 = std::min(p.batch_heads, s0 + group);
    // dO, q, k, v, out widened, then dQ, dK, dV in float32: each [s1 - s0, H, W, D].
    const auto [grad_out, q, k, v, out] =
        bf16_widen_slices<5>({grad_out_all, q_all, k_all, v_all, out_all}, s0, s1, p, ds_ws + group * slice_elems);
    float* const grads = ds_ws + group * slice_elems + 5 * (s1 - s0) * slice_kv;
    const auto group_grad = [&](int64_t t) {
      Strided<float> g{grads + t * (s1 - s0) * slice_kv, contiguous_strides(p, p.dim)};
      g.s.origin = g.s.slice(s0);
      return g;
    };
    backward_query_pass_saved<float, kD>(grad_out, k, v, out, prob, group_grad(0), ds_ws, s0, s1, p, win, scale,
                                         bias_rows);
    backward_key_pass<float, kD>(grad_out, q, prob + s0 * slice_elems, ds_ws, group_grad(1), group_grad(2), s0, s1, p,
                                 win, scale);
    if (rpb_grad != nullptr) rpb_grad_from_row_sums(bias_rows, s0, s1, rpb_grad, p, win);
    bf16_round_slices<3>(grads, {grad_q_all, grad_k_all, grad_v_all}, s0, s1, p);
  }
}

}  // namespace

// fused_backward_with_attn for bf16 grad_out, q, k, v, out and grads; float32 attn (the saved weights) and grad_rpb
// (undefined without a bias). query_pass: fused_backward_query_pass_bf16 of the selected unit.
void fused_backward_with_attn_bf16(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& attn,
                                   const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                                   const at::Tensor& grad_rpb, const Problem& p, double scale,
                                   decltype(&fused_backward_query_pass_bf16) query_pass) {
  for (const at::Tensor* t : {&grad_out, &q, &k, &v, &out, &grad_q, &grad_k, &grad_v}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16,
                "na fused backward (CPU, bf16): grad_out, q, k, v, out and the gradients must be bfloat16");
  }
  TORCH_CHECK(attn.is_contiguous() && attn.scalar_type() == at::kFloat,
              "na fused backward (CPU, bf16): attn must be a contiguous float32 tensor");
  TORCH_CHECK(!grad_rpb.defined() || (grad_rpb.is_contiguous() && grad_rpb.scalar_type() == at::kFloat),
              "na fused backward (CPU, bf16): grad_rpb must be a contiguous float32 tensor");
  const Windows win(p);
  const auto gos = bf16_strided<const Bf16Bits>(grad_out), qs = bf16_strided<const Bf16Bits>(q);
  const auto gks = bf16_strided<Bf16Bits>(grad_k), gvs = bf16_strided<Bf16Bits>(grad_v);
  const auto ks = bf16_strided<const Bf16Bits>(k), vs = bf16_strided<const Bf16Bits>(v);
  const auto os = bf16_strided<const Bf16Bits>(out);
  const auto gqs = bf16_strided<Bf16Bits>(grad_q);
  // Whole-group windows take the dense per-group products and sum the bias gradient per group.
  const bool whole_groups = bf16_window_is_whole_group(p);
  const float* prob = attn.const_data_ptr<float>();
  float* rpb_grad = grad_rpb.defined() ? grad_rpb.mutable_data_ptr<float>() : nullptr;
  const auto fs = static_cast<float>(scale);
  // This unit's own query pass selected (no vdpbf16ps): large windows on AVX-512 take float32's widened passes.
  if (!whole_groups && query_pass == &fused_backward_query_pass_bf16 && bf16_widens_large_window(p)) {
    dispatch_head_dim(p.dim, [&](auto dim) {
      bf16_widened_saved_backward<dim.value>(gos, qs, ks, vs, os, prob, gqs, gks, gvs, rpb_grad, p, win, fs);
    });
    return;
  }
  // dS of a group of slices, kept per calling thread between calls. The group takes the float32 kernel's size
  // (slices_per_group: about the L2 caches, at least one slice), so that the key pass finds the dS the query pass
  // wrote in cache: in one group of up to 64 MiB the key pass streamed it from memory, 27 ms against float32's 24 at
  // 1x12x64x64 k11 (one thread). Whole groups keep only their bias partials there (a slice's dh dw groups of rpb_h
  // rpb_w floats), up to ~64 MiB of them per group.
  const int64_t slice_elems = whole_groups ? bias_partial_elems(p) : p.tokens() * p.window();
  const int64_t group_slices = whole_groups ? whole_group_slices_per_group<float>(p)
                                            : slices_per_group(slice_elems * static_cast<int64_t>(sizeof(float)), p);
  thread_local std::vector<float> workspace;
  const auto group_elems = static_cast<size_t>(group_slices * slice_elems);
  if (workspace.size() < group_elems) workspace.resize(group_elems);
  float* const ds_ws = workspace.data();
  for (int64_t s0 = 0; s0 < p.batch_heads; s0 += group_slices) {
    const int64_t s1 = std::min(p.batch_heads, s0 + group_slices);
    if (whole_groups) {
      float* const bias_partials = rpb_grad != nullptr ? ds_ws : nullptr;
      dispatch_head_dim(p.dim, [&](auto dim) {
        bf16_whole_group_backward_slices<dim.value>(gos, qs, ks, vs, os, prob, gqs, gks, gvs, bias_partials, s0, s1, p,
                                                    win, fs);
      });
      if (rpb_grad != nullptr) sum_bias_partials(bias_partials, s0, s1, p, rpb_grad);
      continue;
    }
    query_pass(grad_out, k, v, out, attn, grad_q, ds_ws, s0, s1, p, scale);
    const std::vector<Bf16RowBlock> group = bf16_backward_row_blocks(p, s0, s1);
    dispatch_head_dim(p.dim, [&](auto dim) {
      parallel(static_cast<int64_t>(group.size()), 1, [&](int64_t b) {
        bf16_backward_key_block<dim.value>(gos, qs, prob, ds_ws, gks, gvs, s0, p, win, fs, group[b]);
      });
    });
    if (rpb_grad != nullptr) {
      rpb_grad_slices<float, float>({ds_ws, contiguous_strides(p, p.window())}, s0, s1, rpb_grad, p);
    }
  }
}
#endif
