// The one definition of the dinat_m2f operator library: the schemas of dinat_m2f/op_schemas.h. Kernels are
// registered per device (native/cpu_registration.cpp, native/cuda_registration.cpp).
#include <torch/library.h>

#include "dinat_m2f/op_schemas.h"

TORCH_LIBRARY(dinat_m2f, m) {
  for (const char* schema : dinat_m2f::kOpSchemas) {
    m.def(schema);
  }
}
