// Multi-scale deformable attention (Deformable DETR / Mask2Former pixel decoder): input checks and the op entry points
// declared in dinat_m2f/ms_deform_attn_ops.h. Kernels: ms_deform_attn_cpu.cpp (CPU), ms_deform_attn_cuda.cu (CUDA).
#include "dinat_m2f/ms_deform_attn_ops.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "dinat_m2f/exact_int.h"

namespace dinat_m2f::msda {

namespace {

void check_device_and_dtype(const char* op, const at::Tensor& value) {
  const auto dt = value.scalar_type();
  TORCH_CHECK(at::isFloatingType(dt), op, ": value must be a floating tensor, got ", dt);
  TORCH_CHECK(value.device().is_cpu() || value.device().is_cuda(), op,
              ": value must be a CPU or CUDA tensor, got device ", value.device());
  if (value.device().is_cpu()) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": the CPU kernel supports float32 and float64, got ", dt,
                " (under autocast, run the deformable attention in float32)");
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
                ": the CUDA kernel supports float32, float64, float16 and bfloat16, got ", dt);
  }
}

void check_float_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& value) {
  TORCH_CHECK(t.scalar_type() == value.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but value has dtype ", value.scalar_type(), "; all floating inputs must share one dtype");
  TORCH_CHECK(t.device() == value.device(), op, ": ", name, " is on ", t.device(), " but value is on ", value.device(),
              "; all inputs must be on one device");
}

// spatial_shapes and level_start_index: int64, on value's device or on the CPU (sizes the caller knows on the host).
void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& value) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == value.device() || t.device().is_cpu(), op, ": ", name, " is on ", t.device(),
              " but value is on ", value.device(), "; all inputs must be on one device (", name,
              " may also be on the CPU)");
}

// The kernels index value through spatial_shapes and level_start_index: inconsistent ones would read out of bounds.
// Sums are exact (128-bit): a wrapped H * W could otherwise add up to S.
void check_levels(const char* op, const Sizes& s, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index) {
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* sh = shapes.const_data_ptr<int64_t>();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  Int128 total = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = sh[2 * l];
    const int64_t W = sh[2 * l + 1];
    TORCH_CHECK(H > 0 && W > 0, op, ": spatial_shapes[", l, "] = (", H, ", ", W, ") must be positive");
    TORCH_CHECK(st[l] == total, op, ": level_start_index[", l, "] = ", st[l],
                " but the spatial shapes of the earlier levels add up to ", to_decimal(total));
    // Stop once past S (before the last level too): the sum stays below 2^127 and cannot overflow.
    total += exact_product(H, W);
    TORCH_CHECK(total <= s.S, op, ": value has S = ", s.S, " positions but spatial_shapes",
                l + 1 < s.L ? "[:" + std::to_string(l + 1) + "] already" : std::string(),
                " add up to sum(H * W) = ", to_decimal(total));
  }
  TORCH_CHECK(total == s.S, op, ": value has S = ", s.S,
              " positions but spatial_shapes add up to sum(H * W) = ", to_decimal(total));
}

}  // namespace

Sizes check_inputs(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights, const at::Tensor* grad_output) {
  TORCH_CHECK(value.dim() == 4, op, ": value must be [N, S, heads, channels], got shape ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op,
              ": spatial_shapes must be [levels, 2] (H, W per level), got shape ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0), op,
              ": level_start_index must be [levels] with levels = ", spatial_shapes.size(0), ", got shape ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2, op,
              ": sampling_locations must be [N, queries, heads, levels, points, 2], got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, op,
              ": attention_weights must be [N, queries, heads, levels, points], got shape ", attention_weights.sizes());
  check_device_and_dtype(op, value);

  Sizes s{};
  s.N = value.size(0);
  s.S = value.size(1);
  s.M = value.size(2);
  s.D = value.size(3);
  s.Lq = sampling_locations.size(1);
  s.L = spatial_shapes.size(0);
  s.P = sampling_locations.size(4);
  TORCH_CHECK(s.L > 0, op, ": spatial_shapes must name at least one level");

  const std::vector<int64_t> expected_loc{s.N, s.Lq, s.M, s.L, s.P, 2};
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef(expected_loc), op, ": sampling_locations has shape ",
              sampling_locations.sizes(), " but value (N=", s.N, ", heads=", s.M, ") and spatial_shapes (levels=", s.L,
              ") require ", at::IntArrayRef(expected_loc));
  const std::vector<int64_t> expected_attn{s.N, s.Lq, s.M, s.L, s.P};
  TORCH_CHECK(attention_weights.sizes() == at::IntArrayRef(expected_attn), op, ": attention_weights has shape ",
              attention_weights.sizes(), " but sampling_locations requires ", at::IntArrayRef(expected_attn));

  check_float_tensor(op, "sampling_locations", sampling_locations, value);
  check_float_tensor(op, "attention_weights", attention_weights, value);
  check_index_tensor(op, "spatial_shapes", spatial_shapes, value);
  check_index_tensor(op, "level_start_index", level_start_index, value);
  if (grad_output != nullptr) {
    const std::vector<int64_t> expected_grad{s.N, s.Lq, s.M * s.D};
    TORCH_CHECK(grad_output->sizes() == at::IntArrayRef(expected_grad), op, ": grad_output has shape ",
                grad_output->sizes(), ", expected ", at::IntArrayRef(expected_grad));
    check_float_tensor(op, "grad_output", *grad_output, value);
  }
  check_levels(op, s, spatial_shapes, level_start_index);
  return s;
}

namespace {

// An index tensor as the kernels take it: contiguous, on value's device (a host-to-device copy without a device sync
// when it was given on the CPU).
at::Tensor index_on_device(const at::Tensor& t, const at::Tensor& value) {
  return t.to(value.device(), /*non_blocking=*/true).contiguous();
}

}  // namespace

at::Tensor forward_op(const DeviceKernels& kernels, const at::Tensor& value, const at::Tensor& spatial_shapes,
                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                      const at::Tensor& attention_weights) {
  const Sizes z = check_inputs("ms_deform_attn_forward", value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights);
  at::Tensor output = at::empty({z.N, z.Lq, z.M * z.D}, value.options());
  kernels.forward(z, value.contiguous(), index_on_device(spatial_shapes, value),
                  index_on_device(level_start_index, value), sampling_locations.contiguous(),
                  attention_weights.contiguous(), output);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const DeviceKernels& kernels, const at::Tensor& value,
                                                           const at::Tensor& spatial_shapes,
                                                           const at::Tensor& level_start_index,
                                                           const at::Tensor& sampling_locations,
                                                           const at::Tensor& attention_weights,
                                                           const at::Tensor& grad_output) {
  const Sizes z = check_inputs("ms_deform_attn_backward", value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights, &grad_output);
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  at::Tensor grad_value = at::empty(value.sizes(), value.options());  // the kernels zero it (or fill it)
  at::Tensor grad_loc = at::zeros_like(loc);
  at::Tensor grad_attn = at::zeros_like(attn);
  kernels.backward(z, value.contiguous(), index_on_device(spatial_shapes, value),
                   index_on_device(level_start_index, value), loc, attn, grad_output.contiguous(), grad_value, grad_loc,
                   grad_attn);
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace dinat_m2f::msda
