// The Python module `dinat_m2f._C`. The ops are defined by native/registration.cpp (TORCH_LIBRARY(dinat_m2f, ...)),
// their kernels registered per device, and reached through torch.ops.dinat_m2f; this module only reports how it was
// built.
#include <torch/extension.h>

#include "dinat_m2f/na_cpu_isa.h"
#include "dinat_m2f_build_config.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list backends;
  backends.append("cpu");
  if (DINAT_M2F_BUILT_WITH_CUDA) {
    backends.append("cuda");
  }
  info["backends"] = backends;
  info["cuda_archs"] = std::string(DINAT_M2F_CUDA_ARCHS);
  info["cxx_flags"] = std::string(DINAT_M2F_CXX_FLAGS);
  info["nvcc_flags"] = std::string(DINAT_M2F_NVCC_FLAGS);
  info["torch_version"] = std::string(DINAT_M2F_TORCH_VERSION);
  info["torch_cuda_version"] = std::string(DINAT_M2F_TORCH_CUDA_VERSION);
  // The instruction set the CPU kernels take now (DINAT_M2F_CPU_ISA may force the baseline) and those this CPU has.
  info["cpu_isa"] = std::string(dinat_m2f::na::cpu::cpu_isa_name(dinat_m2f::na::cpu::selected_cpu_isa()));
  pybind11::list isas;
  for (const auto& isa : dinat_m2f::na::cpu::supported_cpu_isas()) {
    isas.append(isa);
  }
  info["cpu_isas_supported"] = isas;
  // Whether the bf16 kernels use the AVX512_BF16 instructions now (DINAT_M2F_CPU_BF16 may turn them off), and whether
  // the CPU has them.
  info["cpu_bf16_dot"] = dinat_m2f::na::cpu::selected_cpu_bf16_dot();
  info["cpu_has_avx512_bf16"] = dinat_m2f::na::cpu::cpu_has_avx512_bf16();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dinat-m2f native kernels (neighborhood attention, multi-scale deformable attention)";
  m.def("build_info", &build_info,
        "How this extension was built (backends, CUDA archs, flags, torch version) and which CPU ISA path runs.");
}
