// The CUDA kernels of every dinat_m2f op (schemas: dinat_m2f/op_schemas.h). A build without CUDA kernels registers,
// for every op, an error that names the op, the CUDA argument and the fix, rather than leaving CUDA inputs to the
// dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

#include "dinat_m2f/op_schemas.h"

#if defined(DINAT_M2F_WITH_CUDA)

#include "dinat_m2f/ms_deform_attn_ops.h"
#include "dinat_m2f/na_ops.h"

namespace dinat_m2f {
namespace {

void cpu_only(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  TORCH_CHECK(false, op.schema().name(),
              " has CPU kernels only (it saves the attention weights for the CPU backward); on CUDA the fused "
              "forward (na1d_fused_forward / na2d_fused_forward) recomputes them in its backward.");
}

}  // namespace
}  // namespace dinat_m2f

TORCH_LIBRARY_IMPL(dinat_m2f, CUDA, m) {
  dinat_m2f::na::register_ops<dinat_m2f::na::kCudaKernels>(m);
  dinat_m2f::msda::register_ops<dinat_m2f::msda::kCudaKernels>(m);
  for (const char* name : dinat_m2f::kCpuOnlyOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&dinat_m2f::cpu_only>());
  }
}

#else

namespace dinat_m2f {
namespace {

// The name of the first CUDA tensor argument on the stack (the reason the CUDA kernel was asked for).
std::string cuda_argument(const c10::FunctionSchema& schema, const torch::jit::Stack& stack) {
  const auto& args = schema.arguments();
  const size_t first = stack.size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = stack[first + i];
    if (v.isTensor() && v.toTensor().is_cuda()) {
      return args[i].name();
    }
  }
  return "an input";
}

void built_without_cuda(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  TORCH_CHECK(false, op.schema().name(), ": ", cuda_argument(op.schema(), *stack),
              " is a CUDA tensor but dinat_m2f._C was built without CUDA kernels. Rebuild it with a CUDA toolchain "
              "(`make build`, FORCE_CUDA=1), or run on the CPU.");
}

}  // namespace
}  // namespace dinat_m2f

TORCH_LIBRARY_IMPL(dinat_m2f, CUDA, m) {
  for (const char* schema : dinat_m2f::kOpSchemas) {
    const std::string name(dinat_m2f::op_name(schema));
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&dinat_m2f::built_without_cuda>());
  }
}

#endif
