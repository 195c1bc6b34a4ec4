// quantize_export's CUDA kernel and launcher (csrc/cuda/quantize_export.cu) built for the host with
// the emulated runtime. Outputs start filled with a marker value.
#define MTLUE_CUDA_HOST_EMULATION
#include "host_ops.h"

#include "cuda/quantize_export.cu"

namespace mtlue_host {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x, const at::Tensor& delta) {
  at::Tensor protected_img = at::full(x.sizes(), 77, x.options());
  at::Tensor delta_q = at::full(x.sizes(), 77, x.options().dtype(at::kChar));
  at::Tensor errors = new_errors();
  mtlue::cuda::quantize_export(x, delta, protected_img, delta_q, errors);
  return {protected_img, delta_q, errors};
}

}  // namespace mtlue_host
