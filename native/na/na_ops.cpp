// Neighborhood-attention op entry points (declared in dinat_m2f/na_ops.h): input checks with clear messages, the
// contiguous 2D views the kernels expect (1D problems get a single row), output allocation, and the call of the
// kernels of the device the entry point is registered for. Sizes are checked without overflowing int64: a wrapped
// product would let a check pass, and messages print the true values.
#include "dinat_m2f/na_ops.h"

#include <ATen/ATen.h>

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

// Contiguous 2D views: tokens [B, heads, H, W, X] (1D inputs get H = 1), bias [heads, 2kh-1, 2kw-1].
Tensor as2d(const Call& c, const Tensor& t) {
  const Tensor x = t.contiguous();
  return c.dims == 2 ? x : x.unsqueeze(2);
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
  Tensor attn = at::empty({q.size(0), q.size(1), q.size(2), q.size(3), p.window()}, q.options());
  kernels.qk(q, k, rpb, attn, p);
  return from2d(c, attn);
}

Tensor av_op(const DeviceKernels& kernels, const Call& c, const Tensor& attn_in, const Tensor& v_in) {
  const Problem p = token_problem(c, v_in, "v");
  check_weights(c, attn_in, "attn", v_in, "v");
  const Tensor attn = as2d(c, attn_in), v = as2d(c, v_in);
  Tensor out = at::empty_like(v);
  kernels.av(attn, v, out, p);
  return from2d(c, out);
}

Tensor inverse_op(const DeviceKernels& kernels, const Call& c, const Tensor& w_in, const Tensor& x_in) {
  const Problem p = token_problem(c, x_in, "x");
  check_weights(c, w_in, "weights", x_in, "x");
  const Tensor w = as2d(c, w_in), x = as2d(c, x_in);
  Tensor out = at::empty_like(x);
  kernels.inverse(w, x, out, p);
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
  const Problem p = token_problem(c, q_in, "q");
  check_same_shape(c, k_in, "k", q_in, "q");
  check_same_shape(c, v_in, "v", q_in, "q");
  if (rpb_in.has_value()) {
    check_rpb(c, *rpb_in, q_in);
  }
  const Tensor q = as2d(c, q_in), k = as2d(c, k_in), v = as2d(c, v_in);
  const auto rpb = optional_rpb(c, rpb_in);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(acc_type(q.scalar_type())));
  kernels.fused_forward(q, k, v, rpb, out, lse, p, scale);
  return {from2d(c, out), c.dims == 2 ? lse : lse.squeeze(2)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_backward_op(const DeviceKernels& kernels, const Call& c,
                                                             const Tensor& grad_out_in, const Tensor& q_in,
                                                             const Tensor& k_in, const Tensor& v_in,
                                                             const std::optional<Tensor>& rpb_in, const Tensor& out_in,
                                                             const Tensor& lse_in, double scale) {
  const Problem p = token_problem(c, q_in, "q");
  check_same_shape(c, k_in, "k", q_in, "q");
  check_same_shape(c, v_in, "v", q_in, "q");
  check_same_shape(c, out_in, "out", q_in, "q");
  check_same_shape(c, grad_out_in, "grad_out", q_in, "q");
  if (rpb_in.has_value()) {
    check_rpb(c, *rpb_in, q_in);
  }
  const auto lse_dtype = acc_type(q_in.scalar_type());
  TORCH_CHECK(lse_in.scalar_type() == lse_dtype && lse_in.device() == q_in.device() &&
                  lse_in.sizes() == q_in.sizes().slice(0, q_in.dim() - 1),
              c.op, ": lse must be a ", lse_dtype, " tensor of shape q.shape[:-1] on q's device, got ",
              lse_in.scalar_type(), " ", shape_str(lse_in), " on ", lse_in.device(), ".");
  const Tensor q = as2d(c, q_in), k = as2d(c, k_in), v = as2d(c, v_in), out = as2d(c, out_in);
  const Tensor grad_out = as2d(c, grad_out_in);
  const Tensor lse = c.dims == 2 ? lse_in.contiguous() : lse_in.contiguous().unsqueeze(2);
  const auto rpb = optional_rpb(c, rpb_in);
  Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  Tensor grad_rpb_acc;
  if (rpb.has_value()) {
    grad_rpb_acc = at::zeros(rpb->sizes(), rpb->options().dtype(lse_dtype));
  }
  kernels.fused_backward(grad_out, q, k, v, rpb, out, lse, grad_q, grad_k, grad_v, grad_rpb_acc, p, scale);
  Tensor grad_rpb =
      rpb.has_value() ? grad_rpb_acc.to(rpb->scalar_type()).view(rpb_in->sizes()) : at::empty({0}, q.options());
  return {from2d(c, grad_q), from2d(c, grad_k), from2d(c, grad_v), grad_rpb};
}

// ------------------------------------------------------------------------------------ saved weights (CPU)

std::tuple<Tensor, Tensor> fused_forward_with_attn_op(const SavedAttnKernels& kernels, const Call& c,
                                                      const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                      const std::optional<Tensor>& rpb_in, double scale) {
  const Problem p = token_problem(c, q_in, "q");
  check_same_shape(c, k_in, "k", q_in, "q");
  check_same_shape(c, v_in, "v", q_in, "q");
  if (rpb_in.has_value()) {
    check_rpb(c, *rpb_in, q_in);
  }
  const Tensor q = as2d(c, q_in), k = as2d(c, k_in), v = as2d(c, v_in);
  const auto rpb = optional_rpb(c, rpb_in);
  const auto acc_options = q.options().dtype(acc_type(q.scalar_type()));
  Tensor out = at::empty_like(q);
  // The row logsumexp is only a by-product here: the backward reads the weights.
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, acc_options);
  Tensor attn = at::empty({q.size(0), q.size(1), q.size(2), q.size(3), p.window()}, acc_options);
  kernels.fused_forward_with_attn(q, k, v, rpb, out, lse, attn, p, scale);
  return {from2d(c, out), from2d(c, attn)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fused_backward_with_attn_op(const SavedAttnKernels& kernels, const Call& c,
                                                                       const Tensor& grad_out_in, const Tensor& q_in,
                                                                       const Tensor& k_in, const Tensor& v_in,
                                                                       const std::optional<Tensor>& rpb_in,
                                                                       const Tensor& out_in, const Tensor& attn_in,
                                                                       double scale) {
  const Problem p = token_problem(c, q_in, "q");
  check_same_shape(c, k_in, "k", q_in, "q");
  check_same_shape(c, v_in, "v", q_in, "q");
  check_same_shape(c, out_in, "out", q_in, "q");
  check_same_shape(c, grad_out_in, "grad_out", q_in, "q");
  if (rpb_in.has_value()) {
    check_rpb(c, *rpb_in, q_in);
  }
  const auto attn_dtype = acc_type(q_in.scalar_type());
  std::vector<int64_t> attn_shape(q_in.sizes().begin(), q_in.sizes().end() - 1);
  attn_shape.push_back(p.window());
  TORCH_CHECK(attn_in.scalar_type() == attn_dtype && attn_in.device() == q_in.device() &&
                  attn_in.sizes() == at::IntArrayRef(attn_shape),
              c.op, ": attn must be a ", attn_dtype,
              " tensor of shape [*q.shape[:-1], window] on q's device (the weights the forward saved), got ",
              attn_in.scalar_type(), " ", shape_str(attn_in), " on ", attn_in.device(), ".");
  const Tensor q = as2d(c, q_in), k = as2d(c, k_in), v = as2d(c, v_in), out = as2d(c, out_in);
  const Tensor grad_out = as2d(c, grad_out_in), attn = as2d(c, attn_in);
  const auto rpb = optional_rpb(c, rpb_in);
  Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  Tensor grad_rpb_acc;
  if (rpb.has_value()) {
    grad_rpb_acc = at::zeros(rpb->sizes(), rpb->options().dtype(attn_dtype));
  }
  kernels.fused_backward_with_attn(grad_out, q, k, v, out, attn, grad_q, grad_k, grad_v, grad_rpb_acc, p, scale);
  Tensor grad_rpb =
      rpb.has_value() ? grad_rpb_acc.to(rpb->scalar_type()).view(rpb_in->sizes()) : at::empty({0}, q.options());
  return {from2d(c, grad_q), from2d(c, grad_k), from2d(c, grad_v), grad_rpb};
}

}  // namespace dinat_m2f::na
