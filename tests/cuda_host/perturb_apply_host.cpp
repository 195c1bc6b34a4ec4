// perturb_apply's CUDA kernels and launchers (csrc/cuda/perturb_apply.cu) built for the host with
// the emulated runtime (csrc/cuda/runtime.cuh). The same launcher code picks the same kernels (tiled
// or wide, vectorised or not) as on a GPU. Outputs start as NaN, so an element no thread wrote shows.
#define MTLUE_CUDA_HOST_EMULATION
#include "host_ops.h"

#include "cuda/perturb_apply.cu"

namespace mtlue_host {

std::tuple<at::Tensor, at::Tensor> perturb_forward(const at::Tensor& x, const at::Tensor& raw, double eps, int64_t mode,
                                                   const std::optional<at::Tensor>& crop,
                                                   const std::optional<at::Tensor>& flip, int64_t out_h, int64_t out_w) {
  at::Tensor out = at::full({raw.size(0), raw.size(1), out_h, out_w}, NAN, raw.options());
  at::Tensor errors = new_errors();
  mtlue::cuda::perturb_apply_forward(x, raw, eps, mode, crop.value_or(at::Tensor()), flip.value_or(at::Tensor()), out,
                                     errors);
  return {out, errors};
}

std::tuple<at::Tensor, at::Tensor> perturb_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const at::Tensor& raw, double eps, int64_t mode,
                                                    const std::optional<at::Tensor>& crop,
                                                    const std::optional<at::Tensor>& flip) {
  at::Tensor grad_raw = at::full_like(raw, NAN);
  at::Tensor errors = new_errors();
  mtlue::cuda::perturb_apply_backward(grad_out, x, raw, eps, mode, crop.value_or(at::Tensor()),
                                      flip.value_or(at::Tensor()), grad_raw, errors);
  return {grad_raw, errors};
}

}  // namespace mtlue_host
