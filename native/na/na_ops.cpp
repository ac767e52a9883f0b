// Neighborhood-attention op entry points (declared in dinat_m2f/na_ops.h): input checks with clear messages, the 2D
// views the kernels expect (1D problems get a single row), output allocation, and the call of the kernels of the
// device the entry point is registered for. Sizes are checked without overflowing int64: a wrapped product would let
// a check pass, and messages print the true values.
//
// Layouts: the CPU kernels read and write tensors with any strides whose last dim (head_dim or window) has stride 1
// (dinat_m2f::na::Strides), so strided views such as q, k, v sliced from the packed qkv projection output are used in
// place; a tensor whose last dim is strided is copied once here. The CUDA kernels still assume contiguous tensors
// (generic strides on CUDA are future work): on CUDA the entry points pass them contiguous inputs and contiguous
// temporaries for outputs of another layout. Token-shaped outputs are allocated in the memory order of the op's
// token input (empty_in_order_of), on every device: the fake kernels (dinat_m2f/ops/na.py) give the same strides.
#include "dinat_m2f/na_ops.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "dinat_m2f/exact_int.h"
#include "dinat_m2f/na_common.h"

namespace dinat_m2f::na {
namespace {

using at::Tensor;

std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_kernel_and_dilation(const Call& c) {
  TORCH_CHECK(c.kernel_size > 1 && c.kernel_size % 2 == 1, c.op,
              ": kernel_size must be an odd integer greater than 1, got ", c.kernel_size, ".");
  TORCH_CHECK(c.dilation >= 1, c.op, ": dilation must be an integer >= 1, got ", c.dilation, ".");
}

void check_dtype_and_device(const Call& c, const Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), c.op, ": ", name,
              " must be a CPU or CUDA tensor, got device ", t.device(), ".");
  TORCH_CHECK(t.layout() == at::kStrided, c.op, ": ", name, " must be a dense (strided) tensor.");
  if (t.device().is_cpu()) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, c.op,
                ": CPU kernels support float32, float64 and bfloat16, but ", name, " has dtype ", dt, ".");
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, c.op,
                ": CUDA kernels support float32, float64, float16 and bfloat16, but ", name, " has dtype ", dt, ".");
  }
}

void check_same(const Call& c, const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), c.op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all inputs must be on the same device.");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), c.op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type(), "; all inputs must have the same dtype.");
}

// Checks a token tensor ([B, heads, H, W, D] or [B, heads, L, D]) and returns the problem it defines.
Problem token_problem(const Call& c, const Tensor& t, const char* name) {
  check_kernel_and_dilation(c);
  check_dtype_and_device(c, t, name);
  const int64_t want_dim = c.dims + 3;
  TORCH_CHECK(t.dim() == want_dim, c.op, ": ", name, " must be a ", want_dim, "-D tensor ",
              c.dims == 2 ? "[B, heads, H, W, D]" : "[B, heads, L, D]", ", got shape ", shape_str(t), ".");
  const char* axis_names[2] = {c.dims == 2 ? "H" : "L", "W"};
  for (int a = 0; a < c.dims; ++a) {
    const int64_t size = t.size(2 + a);
    // size >= kernel_size * dilation, written so that nothing overflows (kernel_size > 1 and dilation >= 1 here).
    TORCH_CHECK(c.dilation <= size / c.kernel_size, c.op, ": the ", axis_names[a], " axis of ", name, " has size ",
                size, ", smaller than kernel_size * dilation = ", c.kernel_size, " * ", c.dilation, " = ",
                to_decimal(exact_product(c.kernel_size, c.dilation)),
                ". Each spatial axis must be at least kernel_size * dilation.");
  }
  Problem p{};
  p.batch_heads = t.size(0) * t.size(1);
  p.heads = t.size(1);
  p.height = c.dims == 2 ? t.size(2) : 1;
  p.width = c.dims == 2 ? t.size(3) : t.size(2);
  p.dim = t.size(-1);
  p.kh = c.dims == 2 ? c.kernel_size : 1;
  p.dh = c.dims == 2 ? c.dilation : 1;
  p.kw = c.kernel_size;
  p.dw = c.dilation;
  return p;
}

void check_same_shape(const Call& c, const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_same(c, t, name, ref, ref_name);
  TORCH_CHECK(t.sizes() == ref.sizes(), c.op, ": ", name, " must have the shape of ", ref_name, " ", shape_str(ref),
              ", got ", shape_str(t), ".");
}

// attn must be [*tokens.shape[:-1], kernel_size ** dims].
void check_weights(const Call& c, const Tensor& w, const char* name, const Tensor& tokens, const char* tokens_name) {
  check_same(c, w, name, tokens, tokens_name);
  const Int128 window = c.dims == 2 ? exact_product(c.kernel_size, c.kernel_size) : c.kernel_size;
  TORCH_CHECK(w.dim() == tokens.dim(), c.op, ": ", name, " must be a ", tokens.dim(), "-D tensor, got shape ",
              shape_str(w), ".");
  TORCH_CHECK(w.size(-1) == window, c.op, ": the last dimension of ", name, " must be the window size ",
              c.dims == 2 ? "kernel_size**2 = " : "kernel_size = ", to_decimal(window), ", got ", w.size(-1), ".");
  for (int64_t i = 0; i + 1 < tokens.dim(); ++i) {
    TORCH_CHECK(w.size(i) == tokens.size(i), c.op, ": ", name, " has shape ", shape_str(w), " but ", tokens_name,
                " has shape ", shape_str(tokens), "; they must agree in every dimension but the last.");
  }
}

// After token_problem: kernel_size <= a tensor size, so 2 * kernel_size - 1 fits.
void check_rpb(const Call& c, const Tensor& rpb, const Tensor& q) {
  check_same(c, rpb, "rpb", q, "q");
  const int64_t width = 2 * c.kernel_size - 1;
  const bool ok = c.dims == 2
                      ? (rpb.dim() == 3 && rpb.size(0) == q.size(1) && rpb.size(1) == width && rpb.size(2) == width)
                      : (rpb.dim() == 2 && rpb.size(0) == q.size(1) && rpb.size(1) == width);
  TORCH_CHECK(ok, c.op, ": rpb must have shape [heads, ", c.dims == 2 ? "2k-1, 2k-1" : "2k-1", "] = [", q.size(1), ", ",
              width, c.dims == 2 ? (", " + std::to_string(width)) : std::string(), "], got ", shape_str(rpb), ".");
}

// The layout the device's kernels read: any strides with a unit-stride last dim on the CPU, contiguous elsewhere.
bool kernel_readable(const Tensor& t) {
  return t.is_cpu() ? (t.size(-1) <= 1 || t.stride(-1) == 1) : t.is_contiguous();
}

// Kernel views: tokens / weights [B, heads, H, W, X] (1D inputs get H = 1), bias [heads, 2kh-1, 2kw-1].
Tensor as2d(const Call& c, const Tensor& t) {
  const Tensor x = kernel_readable(t) ? t : t.contiguous();
  return c.dims == 2 ? x : x.unsqueeze(2);
}

// A new tensor of `sizes` (the rank of `like`) whose outer dims lie in memory in the order of `like`'s strides,
// largest first (a stable sort: ties keep the logical order), with the last dim innermost and dense. The output of
// a heads-last q ([B, H, W, heads, D] memory) is heads-last too, so the permute + reshape to [B, H, W, C] for the
// output projection is free; contiguous `like` gives a contiguous result (as empty_like). The fake kernels
// (dinat_m2f/ops/na.py, _empty_in_order_of) implement the same rule.
Tensor empty_in_order_of(at::IntArrayRef sizes, const Tensor& like, const at::TensorOptions& options) {
  const int64_t n = like.dim();
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(sizes.size()) == n && n >= 1);
  std::vector<int64_t> order(n - 1);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return like.stride(a) > like.stride(b); });
  order.push_back(n - 1);
  std::vector<int64_t> physical_sizes(n), logical_of(n);
  for (int64_t d = 0; d < n; ++d) {
    physical_sizes[d] = sizes[order[d]];
    logical_of[order[d]] = d;
  }
  return at::empty(physical_sizes, options).permute(logical_of);
}

// Where a kernel writes an output: the output itself when the device's kernels can write its layout, else a
// contiguous temporary that finish_output copies back.
Tensor kernel_output(const Tensor& out) { return kernel_readable(out) ? out : at::empty(out.sizes(), out.options()); }

void finish_output(const Tensor& out, const Tensor& written) {
  if (!written.is_same(out)) {
    out.copy_(written);
  }
}

Tensor rpb_as2d(const Call& c, const Tensor& rpb) {
  const Tensor x = rpb.contiguous();
  return c.dims == 2 ? x : x.unsqueeze(1);
}

Tensor from2d(const Call& c, const Tensor& t) { return c.dims == 2 ? t : t.squeeze(2); }

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::optional<Tensor> optional_rpb(const Call& c, const std::optional<Tensor>& rpb) {
  if (!rpb.has_value()) {
    return std::nullopt;
  }
  return rpb_as2d(c, *rpb);
}

// Checks q, k, v (one token shape) and the optional bias of an attention op and returns its problem.
Problem check_qkv(const Call& c, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& rpb) {
  const Problem p = token_problem(c, q, "q");
  check_same_shape(c, k, "k", q, "q");
  check_same_shape(c, v, "v", q, "q");
  if (rpb.has_value()) {
    check_rpb(c, *rpb, q);
  }
  return p;
}

// check_qkv, and the forward output and its gradient of a backward op, both of q's shape.
Problem check_backward_inputs(const Call& c, const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                              const std::optional<Tensor>& rpb, const Tensor& out) {
  const Problem p = check_qkv(c, q, k, v, rpb);
  check_same_shape(c, out, "out", q, "q");
  check_same_shape(c, grad_out, "grad_out", q, "q");
  return p;
}

// A backward kernel's run into grad_q, grad_k, grad_v (views of q's shape with any strides, e.g. slices of one
// packed buffer): the kernel writes through run(rpb, gq, gk, gv, grad_rpb_acc); returns the bias gradient (empty
// without rpb).
template <typename RunKernel>
Tensor run_backward_into(const Call& c, const Tensor& q, const std::optional<Tensor>& rpb_in, const Tensor& grad_q_in,
                         const Tensor& grad_k_in, const Tensor& grad_v_in, RunKernel run) {
  const auto rpb = optional_rpb(c, rpb_in);
  const Tensor grad_q = c.dims == 2 ? grad_q_in : grad_q_in.unsqueeze(2);
  const Tensor grad_k = c.dims == 2 ? grad_k_in : grad_k_in.unsqueeze(2);
  const Tensor grad_v = c.dims == 2 ? grad_v_in : grad_v_in.unsqueeze(2);
  const Tensor gq = kernel_output(grad_q), gk = kernel_output(grad_k), gv = kernel_output(grad_v);
  Tensor grad_rpb_acc;
  if (rpb.has_value()) {
    grad_rpb_acc = at::zeros(rpb->sizes(), rpb->options().dtype(acc_type(q.scalar_type())));
  }
  run(rpb, gq, gk, gv, grad_rpb_acc);
  finish_output(grad_q, gq);
  finish_output(grad_k, gk);
  finish_output(grad_v, gv);
  return rpb.has_value() ? grad_rpb_acc.to(rpb->scalar_type()).view(rpb_in->sizes()) : at::empty({0}, q.options());
}

// ----------------------------------------------------------------------------------------------- ops

}  // namespace

Tensor qk_op(const DeviceKernels& kernels, const Call& c, const Tensor& q_in, const Tensor& k_in,
             const std::optional<Tensor>& rpb_in) {
  const Problem p = token_problem(c, q_in, "q");
  check_same_shape(c, k_in, "k", q_in, "q");
  if (rpb_in.has_value()) {
    check_rpb(c, *rpb_in, q_in);
  }
  const Tensor q = as2d(c, q_in), k = as2d(c, k_in);
  const auto rpb = optional_rpb(c, rpb_in);
  Tensor attn = empty_in_order_of({q.size(0), q.size(1), q.size(2), q.size(3), p.window()}, q, q.options());
  const Tensor attn_k = kernel_output(attn);
  kernels.qk(q, k, rpb, attn_k, p);
  finish_output(attn, attn_k);
  return from2d(c, attn);
}

Tensor av_op(const DeviceKernels& kernels, const Call& c, const Tensor& attn_in, const Tensor& v_in) {
  const Problem p = token_problem(c, v_in, "v");
  check_weights(c, attn_in, "attn", v_in, "v");
  const Tensor attn = as2d(c, attn_in), v = as2d(c, v_in);
  Tensor out = empty_in_order_of(v.sizes(), v, v.options());
  const Tensor out_k = kernel_output(out);
  kernels.av(attn, v, out_k, p);
  finish_output(out, out_k);
  return from2d(c, out);
}

Tensor inverse_op(const DeviceKernels& kernels, const Call& c, const Tensor& w_in, const Tensor& x_in) {
  const Problem p = token_problem(c, x_in, "x");
  check_weights(c, w_in, "weights", x_in, "x");
  const Tensor w = as2d(c, w_in), x = as2d(c, x_in);
  Tensor out = empty_in_order_of(x.sizes(), x, x.options());
  const Tensor out_k = kernel_output(out);
  kernels.inverse(w, x, out_k, p);
  finish_output(out, out_k);
  return from2d(c, out);
}

Tensor rpb_grad_op(const DeviceKernels& kernels, const Call& c, const Tensor& g_in) {
  check_kernel_and_dilation(c);
  check_dtype_and_device(c, g_in, "grad_attn");
  TORCH_CHECK(g_in.dim() == c.dims + 3, c.op, ": grad_attn must be a ", c.dims + 3, "-D tensor, got shape ",
              shape_str(g_in), ".");
  // The token shape is grad_attn's without the window axis; check it as a token tensor.
  const Problem p = token_problem(c, g_in.narrow(-1, 0, 1), "grad_attn");
  const int64_t window = p.window();
  TORCH_CHECK(g_in.size(-1) == window, c.op, ": the last dimension of grad_attn must be the window size ", window,
              ", got ", g_in.size(-1), ".");
  const Tensor g = as2d(c, g_in);
  Tensor acc = at::zeros({p.heads, p.rpb_h(), p.rpb_w()}, g.options().dtype(acc_type(g.scalar_type())));
  kernels.rpb_grad(g, acc, p);
  Tensor out = acc.to(g.scalar_type());
  return c.dims == 2 ? out : out.squeeze(1);
}

std::tuple<Tensor, Tensor> fused_forward_op(const DeviceKernels& kernels, const Call& c, const Tensor& q_in,
                                            const Tensor& k_in, const Tensor& v_in, const std::optional<Tensor>& rpb_in,
                                            double scale) {
  const Problem p = check_qkv(c, q_in, k_in, v_in, rpb_in);
  const Tensor q = as2d(c, q_in), k = as2d(c, k_in), v = as2d(c, v_in);
  const auto rpb = optional_rpb(c, rpb_in);
  Tensor out = empty_in_order_of(q.sizes(), q, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(acc_type(q.scalar_type())));
  const Tensor out_k = kernel_output(out);
  kernels.fused_forward(q, k, v, rpb, out_k, lse, p, scale);
  finish_output(out, out_k);
  return {from2d(c, out), c.dims == 2 ? lse : lse.squeeze(2)};
}

namespace {

// fused_backward_op's work once its inputs are checked: the gradients of q, k, v into grad_q, grad_k, grad_v (views
// of q's shape with any strides, e.g. slices of one packed buffer); returns the bias gradient (empty without rpb).
Tensor fused_backward_into(const DeviceKernels& kernels, const Call& c, const Problem& p, const Tensor& grad_out_in,
                           const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                           const std::optional<Tensor>& rpb_in, const Tensor& out_in, const Tensor& lse_in,
                           double scale, const Tensor& grad_q_in, const Tensor& grad_k_in, const Tensor& grad_v_in) {
  const Tensor q = as2d(c, q_in), k = as2d(c, k_in), v = as2d(c, v_in), out = as2d(c, out_in);
  const Tensor grad_out = as2d(c, grad_out_in);
  const Tensor lse = c.dims == 2 ? lse_in.contiguous() : lse_in.contiguous().unsqueeze(2);
  return run_backward_into(c, q, rpb_in, grad_q_in, grad_k_in, grad_v_in,
                           [&](const std::optional<Tensor>& rpb, const Tensor& gq, const Tensor& gk, const Tensor& gv,
                               const Tensor& grad_rpb_acc) {
                             kernels.fused_backward(grad_out, q, k, v, rpb, out, lse, gq, gk, gv, grad_rpb_acc, p,
                                                    scale);
                           });
}

// Checks the inputs of a fused backward and returns its problem.
Problem check_fused_backward(const Call& c, const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
                             const std::optional<Tensor>& rpb, const Tensor& out, const Tensor& lse) {
  const Problem p = check_backward_inputs(c, grad_out, q, k, v, rpb, out);
  const auto lse_dtype = acc_type(q.scalar_type());
  TORCH_CHECK(
      lse.scalar_type() == lse_dtype && lse.device() == q.device() && lse.sizes() == q.sizes().slice(0, q.dim() - 1),
      c.op, ": lse must be a ", lse_dtype, " tensor of shape q.shape[:-1] on q's device, got ", lse.scalar_type(), " ",
      shape_str(lse), " on ", lse.device(), ".");
  return p;
}

// q, k, v of a packed qkv [B, H, W, 3, heads, D] (1D: [B, L, 3, heads, D]) as [B, heads, H, W, D] views.
std::array<Tensor, 3> unpack_qkv(const Call& c, const Tensor& qkv, const char* name) {
  check_dtype_and_device(c, qkv, name);
  const int64_t want_dim = c.dims + 4;
  TORCH_CHECK(qkv.dim() == want_dim && qkv.size(c.dims + 1) == 3, c.op, ": ", name, " must be a ", want_dim,
              "-D tensor ", c.dims == 2 ? "[B, H, W, 3, heads, D]" : "[B, L, 3, heads, D]",
              " (the qkv projection output viewed per head), got shape ", shape_str(qkv), ".");
  const int64_t packed = c.dims + 1;
  return {qkv.select(packed, 0).movedim(packed, 1), qkv.select(packed, 1).movedim(packed, 1),
          qkv.select(packed, 2).movedim(packed, 1)};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_backward_op(const DeviceKernels& kernels, const Call& c,
                                                             const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                                             const Tensor& v, const std::optional<Tensor>& rpb,
                                                             const Tensor& out, const Tensor& lse, double scale) {
  const Problem p = check_fused_backward(c, grad_out, q, k, v, rpb, out, lse);
  // The gradients take the layouts of q, k, v (as the forward's output takes q's).
  Tensor grad_q = empty_in_order_of(q.sizes(), q, q.options());
  Tensor grad_k = empty_in_order_of(k.sizes(), k, k.options());
  Tensor grad_v = empty_in_order_of(v.sizes(), v, v.options());
  Tensor grad_rpb = fused_backward_into(kernels, c, p, grad_out, q, k, v, rpb, out, lse, scale, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v, grad_rpb};
}

std::tuple<Tensor, Tensor> qkv_fused_forward_op(const DeviceKernels& kernels, const Call& c, const Tensor& qkv,
                                                const std::optional<Tensor>& rpb, double scale) {
  const auto [q, k, v] = unpack_qkv(c, qkv, "qkv");
  return fused_forward_op(kernels, c, q, k, v, rpb, scale);
}

std::tuple<Tensor, Tensor> qkv_fused_backward_op(const DeviceKernels& kernels, const Call& c, const Tensor& grad_out,
                                                 const Tensor& qkv, const std::optional<Tensor>& rpb, const Tensor& out,
                                                 const Tensor& lse, double scale) {
  const auto [q, k, v] = unpack_qkv(c, qkv, "qkv");
  const Problem p = check_fused_backward(c, grad_out, q, k, v, rpb, out, lse);
  // One contiguous buffer, the gradient of the qkv projection output: the kernels write dQ, dK, dV into its slices.
  Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());
  const auto [grad_q, grad_k, grad_v] = unpack_qkv(c, grad_qkv, "grad_qkv");
  Tensor grad_rpb = fused_backward_into(kernels, c, p, grad_out, q, k, v, rpb, out, lse, scale, grad_q, grad_k, grad_v);
  return {grad_qkv, grad_rpb};
}

// ------------------------------------------------------------------------------------ saved weights (CPU)

std::tuple<Tensor, Tensor> fused_forward_with_attn_op(const SavedAttnKernels& kernels, const Call& c,
                                                      const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                      const std::optional<Tensor>& rpb_in, double scale) {
  const Problem p = check_qkv(c, q_in, k_in, v_in, rpb_in);
  const Tensor q = as2d(c, q_in), k = as2d(c, k_in), v = as2d(c, v_in);
  const auto rpb = optional_rpb(c, rpb_in);
  const auto acc_options = q.options().dtype(acc_type(q.scalar_type()));
  Tensor out = empty_in_order_of(q.sizes(), q, q.options());
  // The row logsumexp is only a by-product here: the backward reads the weights.
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, acc_options);
  Tensor attn = at::empty({q.size(0), q.size(1), q.size(2), q.size(3), p.window()}, acc_options);
  const Tensor out_k = kernel_output(out);
  kernels.fused_forward_with_attn(q, k, v, rpb, out_k, lse, attn, p, scale);
  finish_output(out, out_k);
  return {from2d(c, out), from2d(c, attn)};
}

namespace {

// Checks the inputs of a backward from saved weights and returns its problem.
Problem check_backward_with_attn(const Call& c, const Tensor& grad_out, const Tensor& q, const Tensor& k,
                                 const Tensor& v, const std::optional<Tensor>& rpb, const Tensor& out,
                                 const Tensor& attn) {
  const Problem p = check_backward_inputs(c, grad_out, q, k, v, rpb, out);
  const auto attn_dtype = acc_type(q.scalar_type());
  std::vector<int64_t> attn_shape(q.sizes().begin(), q.sizes().end() - 1);
  attn_shape.push_back(p.window());
  TORCH_CHECK(
      attn.scalar_type() == attn_dtype && attn.device() == q.device() && attn.sizes() == at::IntArrayRef(attn_shape),
      c.op, ": attn must be a ", attn_dtype,
      " tensor of shape [*q.shape[:-1], window] on q's device (the weights the forward saved), got ",
      attn.scalar_type(), " ", shape_str(attn), " on ", attn.device(), ".");
  return p;
}

// The gradients of q, k, v from the saved weights into grad_q, grad_k, grad_v (views of q's shape with any strides,
// e.g. slices of one packed buffer); returns the bias gradient (empty without rpb).
Tensor fused_backward_with_attn_into(const SavedAttnKernels& kernels, const Call& c, const Problem& p,
                                     const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in,
                                     const Tensor& v_in, const std::optional<Tensor>& rpb_in, const Tensor& out_in,
                                     const Tensor& attn_in, double scale, const Tensor& grad_q_in,
                                     const Tensor& grad_k_in, const Tensor& grad_v_in) {
  const Tensor q = as2d(c, q_in), k = as2d(c, k_in), v = as2d(c, v_in), out = as2d(c, out_in);
  const Tensor grad_out = as2d(c, grad_out_in), attn = as2d(c, attn_in).contiguous();
  // The weights already hold the bias: the kernel needs only its gradient's accumulator.
  return run_backward_into(c, q, rpb_in, grad_q_in, grad_k_in, grad_v_in,
                           [&](const std::optional<Tensor>&, const Tensor& gq, const Tensor& gk, const Tensor& gv,
                               const Tensor& grad_rpb_acc) {
                             kernels.fused_backward_with_attn(grad_out, q, k, v, out, attn, gq, gk, gv, grad_rpb_acc, p,
                                                              scale);
                           });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_backward_with_attn_op(
    const SavedAttnKernels& kernels, const Call& c, const Tensor& grad_out, const Tensor& q, const Tensor& k,
    const Tensor& v, const std::optional<Tensor>& rpb, const Tensor& out, const Tensor& attn, double scale) {
  const Problem p = check_backward_with_attn(c, grad_out, q, k, v, rpb, out, attn);
  // The gradients take the layouts of q, k, v (as fused_backward_op's).
  Tensor grad_q = empty_in_order_of(q.sizes(), q, q.options());
  Tensor grad_k = empty_in_order_of(k.sizes(), k, k.options());
  Tensor grad_v = empty_in_order_of(v.sizes(), v, v.options());
  Tensor grad_rpb =
      fused_backward_with_attn_into(kernels, c, p, grad_out, q, k, v, rpb, out, attn, scale, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v, grad_rpb};
}

std::tuple<Tensor, Tensor> qkv_fused_forward_with_attn_op(const SavedAttnKernels& kernels, const Call& c,
                                                          const Tensor& qkv, const std::optional<Tensor>& rpb,
                                                          double scale) {
  const auto [q, k, v] = unpack_qkv(c, qkv, "qkv");
  return fused_forward_with_attn_op(kernels, c, q, k, v, rpb, scale);
}

std::tuple<Tensor, Tensor> qkv_fused_backward_with_attn_op(const SavedAttnKernels& kernels, const Call& c,
                                                           const Tensor& grad_out, const Tensor& qkv,
                                                           const std::optional<Tensor>& rpb, const Tensor& out,
                                                           const Tensor& attn, double scale) {
  const auto [q, k, v] = unpack_qkv(c, qkv, "qkv");
  const Problem p = check_backward_with_attn(c, grad_out, q, k, v, rpb, out, attn);
  // One contiguous buffer, the gradient of the qkv projection output: the kernels write dQ, dK, dV into its slices.
  Tensor grad_qkv = at::empty(qkv.sizes(), qkv.options());
  const auto [grad_q, grad_k, grad_v] = unpack_qkv(c, grad_qkv, "grad_qkv");
  Tensor grad_rpb =
      fused_backward_with_attn_into(kernels, c, p, grad_out, q, k, v, rpb, out, attn, scale, grad_q, grad_k, grad_v);
  return {grad_qkv, grad_rpb};
}

}  // namespace dinat_m2f::na
