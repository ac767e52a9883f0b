// CPU kernels of the unfused neighborhood-attention primitives (NATTEN's PN / NN / IN / RPB-grad, spec 1.4):
// QK (pointwise-neighborhood), AV (neighborhood-neighborhood), the inverse-neighborhood gather that gives the
// gradients of k and v, and the bias gradient. All are race-free: every output element is written by the one task
// that owns its row (the inverse neighborhood turns the scatter of dK/dV into a gather; the bias gradient is split
// by (head, bias row)). Work is parallel over batch x heads x rows and vectorised over head_dim.
// float32/float64 run natively; bfloat16 runs on float32 copies (accumulation in float32).
//
// Included by native/na/na_cpu_isa_kernels.h inside one ISA's namespace and `#pragma GCC target` region (no include
// guard: each ISA translation unit includes it once).

namespace {

template <typename T, int64_t kD>
void qk_kernel(Strided<const T> q, Strided<const T> k, const T* rpb, Strided<T> attn, const Problem& p) {
  const Windows win(p);
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim;
  const int64_t RH = p.rpb_h(), RW = p.rpb_w();
  parallel(p.batch_heads * H, row_grain(p), [&](int64_t row) {
    const int64_t bh = row / H, i = row % H;
    const int64_t h = bh % p.heads;
    const Slice<const T> qs = q.slice(bh), ks = k.slice(bh);
    const Slice<T> as = attn.slice(bh);
    for (int64_t j = 0; j < W; ++j) {
      const T* qv = qs.at(i, j);
      T* out = as.at(i, j);
      for (int64_t ki = 0; ki < p.kh; ++ki) {
        const int64_t ki_pos = win.h.start[i] + ki * p.dh;
        const T* krow = ks.row_at(ki_pos);
        for (int64_t kj = 0; kj < p.kw; ++kj) {
          out[ki * p.kw + kj] = dot(qv, krow + (win.w.start[j] + kj * p.dw) * ks.col, D);
        }
        if (rpb != nullptr) {
          const T* brow = rpb + (h * RH + win.h.bias[i] + ki) * RW + win.w.bias[j];
          for (int64_t kj = 0; kj < p.kw; ++kj) {
            out[ki * p.kw + kj] += brow[kj];
          }
        }
      }
    }
  });
}

template <typename T, int64_t kD>
void av_kernel(Strided<const T> attn, Strided<const T> v, Strided<T> out, const Problem& p) {
  const Windows win(p);
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim;
  parallel(p.batch_heads * H, row_grain(p), [&](int64_t row) {
    const int64_t bh = row / H, i = row % H;
    const Slice<const T> as = attn.slice(bh), vs = v.slice(bh);
    const Slice<T> os = out.slice(bh);
    std::vector<T> acc(D);
    for (int64_t j = 0; j < W; ++j) {
      const T* a = as.at(i, j);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t ki = 0; ki < p.kh; ++ki) {
        const T* vrow = vs.row_at(win.h.start[i] + ki * p.dh);
        for (int64_t kj = 0; kj < p.kw; ++kj) {
          axpy(a[ki * p.kw + kj], vrow + (win.w.start[j] + kj * p.dw) * vs.col, acc.data(), D);
        }
      }
      std::copy(acc.begin(), acc.end(), os.at(i, j));
    }
  });
}

template <typename T, int64_t kD>
void inverse_kernel(Strided<const T> w, Strided<const T> x, Strided<T> out, const Problem& p) {
  const int64_t H = p.height, W = p.width, D = kD > 0 ? kD : p.dim;
  const Windows win(p);
  parallel(p.batch_heads * H, row_grain(p), [&](int64_t row) {
    const int64_t bh = row / H, xi = row % H;
    const Slice<const T> ws = w.slice(bh), xs = x.slice(bh);
    const Slice<T> os = out.slice(bh);
    std::vector<T> acc(D);
    for (int64_t xj = 0; xj < W; ++xj) {
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t i = win.h.inverse[xi].begin; i < win.h.inverse[xi].end; i += p.dh) {
        const int64_t ki = window_slot(xi, win.h.start[i], p.dh);
        const T* wrow = ws.row_at(i);
        const T* xrow = xs.row_at(i);
        for (int64_t j = win.w.inverse[xj].begin; j < win.w.inverse[xj].end; j += p.dw) {
          const int64_t kj = window_slot(xj, win.w.start[j], p.dw);
          axpy(wrow[j * ws.col + ki * p.kw + kj], xrow + j * xs.col, acc.data(), D);
        }
      }
      std::copy(acc.begin(), acc.end(), os.at(xi, xj));
    }
  });
}

// acc[bias_w[j] + kj] += row[j * col + kj] for j < W, kj < kw (window row ki of every query of one row). The queries
// of a run with the same bias column (all whose windows are not clamped along W share one) are summed in registers
// first and added once: added query by query, each add waited on the previous query's store to the same element
// (about 7% of the fused backward at 1x2x56x56x32 k7 d1, one thread).
template <typename T, typename Acc>
inline void add_window_rows_to_bias_row(const T* row, int64_t col, const int64_t* bias_w, int64_t W, int64_t kw,
                                        Acc* acc) {
  dispatch_window_width(kw, [&](auto width) {
    constexpr int64_t kKW = decltype(width)::value;
    if constexpr (kKW == 0) {
      for (int64_t j = 0; j < W; ++j) {
        for (int64_t kj = 0; kj < kw; ++kj) acc[bias_w[j] + kj] += static_cast<Acc>(row[j * col + kj]);
      }
    } else {
      for (int64_t j = 0; j < W;) {
        const int64_t b = bias_w[j];
        Acc run[kKW] = {};
        for (; j < W && bias_w[j] == b; ++j) {
          for (int64_t kj = 0; kj < kKW; ++kj) run[kj] += static_cast<Acc>(row[j * col + kj]);
        }
        for (int64_t kj = 0; kj < kKW; ++kj) acc[b + kj] += run[kj];
      }
    }
  });
}

// Shared with the fused backward: adds into grad_rpb (accumulation type) the bias gradient of the weight gradients
// g of slices [slice_begin, slice_end) (g's slice 0 is slice_begin). Parallel over (head, bias row): race-free.
// Only the heads the slices hold get tasks: a group of fewer slices than heads (DiNAT-L's 48 heads at k 11 come in
// groups of 3-10) made a task per head and bias row that found nothing to add but still allocated and stored.
template <typename T, typename Acc>
void rpb_grad_slices(Strided<const T> g, int64_t slice_begin, int64_t slice_end, Acc* grad_rpb, const Problem& p) {
  const Windows win(p);
  const int64_t H = p.height, W = p.width, RH = p.rpb_h(), RW = p.rpb_w();
  const int64_t heads_present = std::min(p.heads, slice_end - slice_begin);
  parallel(heads_present * RH, 1, [&](int64_t task) {
    const int64_t first = slice_begin + task / RH, h = first % p.heads, a = task % RH;
    std::vector<Acc> acc(RW, Acc(0));
    for (int64_t bh = first; bh < slice_end; bh += p.heads) {
      for (int64_t i = 0; i < H; ++i) {
        const int64_t ki = a - win.h.bias[i];
        if (ki < 0 || ki >= p.kh) {
          continue;
        }
        const T* grow = g.row_at(bh - slice_begin, i) + ki * p.kw;  // one division per row of W windows
        add_window_rows_to_bias_row(grow, g.s.col, win.w.bias.data(), W, p.kw, acc.data());
      }
    }
    Acc* out = grad_rpb + (h * RH + a) * RW;
    for (int64_t c = 0; c < RW; ++c) {
      out[c] += acc[c];
    }
  });
}

}  // namespace

void qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& rpb, const at::Tensor& attn,
        const Problem& p) {
  const at::Tensor qc = as_compute(q), kc = as_compute(k);
  const at::Tensor rc = rpb.has_value() ? as_compute(*rpb) : at::Tensor();
  const at::Tensor out = as_compute(attn);
  AT_DISPATCH_FLOATING_TYPES(qc.scalar_type(), "na_qk_cpu", [&] {
    dispatch_head_dim(p.dim, [&](auto dim) {
      qk_kernel<scalar_t, dim.value>(strided_in<scalar_t>(qc), strided_in<scalar_t>(kc),
                                     rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr, strided_out<scalar_t>(out),
                                     p);
    });
  });
  if (!out.is_same(attn)) attn.copy_(out);
}

void av(const at::Tensor& attn, const at::Tensor& v, const at::Tensor& out, const Problem& p) {
  const at::Tensor ac = as_compute(attn), vc = as_compute(v), oc = as_compute(out);
  AT_DISPATCH_FLOATING_TYPES(vc.scalar_type(), "na_av_cpu", [&] {
    dispatch_head_dim(p.dim, [&](auto dim) {
      av_kernel<scalar_t, dim.value>(strided_in<scalar_t>(ac), strided_in<scalar_t>(vc), strided_out<scalar_t>(oc), p);
    });
  });
  if (!oc.is_same(out)) out.copy_(oc);
}

void inverse(const at::Tensor& weights, const at::Tensor& x, const at::Tensor& out, const Problem& p) {
  const at::Tensor wc = as_compute(weights), xc = as_compute(x), oc = as_compute(out);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "na_inverse_cpu", [&] {
    dispatch_head_dim(p.dim, [&](auto dim) {
      inverse_kernel<scalar_t, dim.value>(strided_in<scalar_t>(wc), strided_in<scalar_t>(xc), strided_out<scalar_t>(oc),
                                          p);
    });
  });
  if (!oc.is_same(out)) out.copy_(oc);
}

void rpb_grad(const at::Tensor& grad_attn, const at::Tensor& grad_rpb, const Problem& p) {
  const at::Tensor gc = as_compute(grad_attn);
  AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "na_rpb_grad_cpu", [&] {
    rpb_grad_slices<scalar_t, scalar_t>(strided_in<scalar_t>(gc), 0, p.batch_heads,
                                        grad_rpb.mutable_data_ptr<scalar_t>(), p);
  });
}
