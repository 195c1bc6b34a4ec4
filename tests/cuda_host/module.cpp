// The Python module of the host-built CUDA launchers (see host_ops.h).
#include <torch/extension.h>

#include "host_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("perturb_forward", &mtlue_host::perturb_forward);
  m.def("perturb_backward", &mtlue_host::perturb_backward);
  m.def("quantize", &mtlue_host::quantize);
  m.def("embedding_forward", &mtlue_host::embedding_forward);
  m.def("embedding_backward", &mtlue_host::embedding_backward);
}
