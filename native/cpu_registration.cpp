// The CPU kernels of every dinat_m2f op (schemas: dinat_m2f/op_schemas.h).
#include <torch/library.h>

#include "dinat_m2f/ms_deform_attn_ops.h"
#include "dinat_m2f/na_ops.h"

TORCH_LIBRARY_IMPL(dinat_m2f, CPU, m) {
  dinat_m2f::na::register_ops<dinat_m2f::na::kCpuKernels>(m);
  dinat_m2f::na::register_saved_attn_ops<dinat_m2f::na::kCpuSavedAttnKernels>(m);
  dinat_m2f::msda::register_ops<dinat_m2f::msda::kCpuKernels>(m);
}
