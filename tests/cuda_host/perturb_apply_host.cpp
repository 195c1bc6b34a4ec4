// perturb_apply's CUDA kernels and launchers (csrc/cuda/perturb_apply.cu), built for the host with
// the emulated runtime (csrc/cuda/runtime.cuh), for tests/test_cuda_kernels_on_host.py. The same
// launcher code chooses the same kernels (tiled or wide, vectorised or not) as on a GPU.
#define MTLUE_CUDA_HOST_EMULATION
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "common/error_slots.h"
#include "cuda/perturb_apply.cu"

namespace {

at::Tensor new_errors() { return at::zeros({mtlue::error_slot::kSlots}, at::kLong); }

// (out [B,C,out_h,out_w], the error buffer)
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& raw, double eps, int64_t mode,
                                           const std::optional<at::Tensor>& crop, const std::optional<at::Tensor>& flip,
                                           int64_t out_h, int64_t out_w) {
  at::Tensor out = at::full({raw.size(0), raw.size(1), out_h, out_w}, NAN, raw.options());  // poisoned
  at::Tensor errors = new_errors();
  mtlue::cuda::perturb_apply_forward(x, raw, eps, mode, crop.value_or(at::Tensor()), flip.value_or(at::Tensor()), out,
                                     errors);
  return {out, errors};
}

// (grad_raw [B,C,H,W], the error buffer)
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& raw,
                                            double eps, int64_t mode, const std::optional<at::Tensor>& crop,
                                            const std::optional<at::Tensor>& flip) {
  at::Tensor grad_raw = at::full_like(raw, NAN);  // poisoned: every element must be written
  at::Tensor errors = new_errors();
  mtlue::cuda::perturb_apply_backward(grad_out, x, raw, eps, mode, crop.value_or(at::Tensor()),
                                      flip.value_or(at::Tensor()), grad_raw, errors);
  return {grad_raw, errors};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
