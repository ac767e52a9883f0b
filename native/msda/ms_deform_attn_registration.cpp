// Multi-scale deformable attention (Deformable DETR / Mask2Former pixel decoder): op schemas and input checks.
// Kernels: ms_deform_attn_cpu.cpp (CPU), ms_deform_attn_cuda.cu (CUDA). Autograd and fake kernels are
// registered from Python (dinat_m2f/ops/ms_deform_attn.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace dinat_m2f::msda {

namespace {

void check_float_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& value) {
  TORCH_CHECK(
      t.scalar_type() == value.scalar_type(),
      op, ": ", name, " has dtype ", t.scalar_type(), " but value has dtype ", value.scalar_type(),
      "; all floating inputs must share one dtype");
  TORCH_CHECK(
      t.device() == value.device(),
      op, ": ", name, " is on ", t.device(), " but value is on ", value.device(), "; all inputs must be on one device");
}

void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& value) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == value.device(),
      op, ": ", name, " is on ", t.device(), " but value is on ", value.device(), "; all inputs must be on one device");
}

}  // namespace

Sizes check_inputs(
    const char* op,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor* grad_output) {
  TORCH_CHECK(value.dim() == 4, op, ": value must be [N, S, heads, channels], got shape ", value.sizes());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
      op, ": spatial_shapes must be [levels, 2] (H, W per level), got shape ", spatial_shapes.sizes());
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0),
      op, ": level_start_index must be [levels] with levels = ", spatial_shapes.size(0), ", got shape ",
      level_start_index.sizes());
  TORCH_CHECK(
      sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
      op, ": sampling_locations must be [N, queries, heads, levels, points, 2], got shape ", sampling_locations.sizes());
  TORCH_CHECK(
      attention_weights.dim() == 5,
      op, ": attention_weights must be [N, queries, heads, levels, points], got shape ", attention_weights.sizes());
  TORCH_CHECK(
      at::isFloatingType(value.scalar_type()), op, ": value must be a floating tensor, got ", value.scalar_type());

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
  TORCH_CHECK(
      sampling_locations.sizes() == at::IntArrayRef(expected_loc),
      op, ": sampling_locations has shape ", sampling_locations.sizes(), " but value (N=", s.N, ", heads=", s.M,
      ") and spatial_shapes (levels=", s.L, ") require ", at::IntArrayRef(expected_loc));
  const std::vector<int64_t> expected_attn{s.N, s.Lq, s.M, s.L, s.P};
  TORCH_CHECK(
      attention_weights.sizes() == at::IntArrayRef(expected_attn),
      op, ": attention_weights has shape ", attention_weights.sizes(), " but sampling_locations requires ",
      at::IntArrayRef(expected_attn));

  check_float_tensor(op, "sampling_locations", sampling_locations, value);
  check_float_tensor(op, "attention_weights", attention_weights, value);
  check_index_tensor(op, "spatial_shapes", spatial_shapes, value);
  check_index_tensor(op, "level_start_index", level_start_index, value);
  if (grad_output != nullptr) {
    const std::vector<int64_t> expected_grad{s.N, s.Lq, s.M * s.D};
    TORCH_CHECK(
        grad_output->sizes() == at::IntArrayRef(expected_grad),
        op, ": grad_output has shape ", grad_output->sizes(), ", expected ", at::IntArrayRef(expected_grad));
    check_float_tensor(op, "grad_output", *grad_output, value);
  }

  // The kernels index value through spatial_shapes and level_start_index: inconsistent ones would read out
  // of bounds, so check them on the host (a small copy; a sync on CUDA).
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t H = sh[2 * l];
    const int64_t W = sh[2 * l + 1];
    TORCH_CHECK(H > 0 && W > 0, op, ": spatial_shapes[", l, "] = (", H, ", ", W, ") must be positive");
    TORCH_CHECK(
        st[l] == total,
        op, ": level_start_index[", l, "] = ", st[l], " but the spatial shapes of the earlier levels add up to ",
        total);
    total += H * W;
  }
  TORCH_CHECK(
      total == s.S,
      op, ": value has S = ", s.S, " positions but spatial_shapes add up to sum(H * W) = ", total);
  return s;
}

}  // namespace dinat_m2f::msda

TORCH_LIBRARY_FRAGMENT(dinat_m2f, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
}
