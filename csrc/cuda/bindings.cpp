// CUDA registrations of the mtlue ops: validate, make inputs contiguous, allocate outputs, launch.
// Kernels live in the .cu files next to this one (light includes only; see launchers.h).
// Checks of tensor values (crop windows, export overflow, task offsets) would synchronise here; the
// kernels record them in the device's error buffer instead, which mtlue::take_pending_errors reads.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <optional>

#include "../common/checks.h"
#include "../common/embedding_reg_driver.h"
#include "launchers.h"

namespace mtlue::cuda {
namespace {

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// The error buffer of a device (int64 [error_slot::kSlots], zeroed on the current stream when first
// used). Kept for the life of the process: never freed, so no CUDA call runs at exit. Made outside
// CUDA-graph capture only: made during one, its memory would come from the graph's pool and its
// zeroing would be recorded into the graph (not run, and re-run at every replay).
const at::Tensor& error_buffer(const c10::Device& device) {
  static std::mutex mutex;
  static auto* buffers = new std::map<c10::DeviceIndex, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = (*buffers)[device.index()];
  if (!buffer.defined()) {
    MTLUE_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "mtlue ops: the first call on ", device,
                " is inside a CUDA graph capture; call the op once on this device before capturing "
                "(as a warm-up; that call creates the device's error record)");
    buffer = at::zeros({error_slot::kSlots}, at::TensorOptions().dtype(at::kLong).device(device));
  }
  return buffer;
}

// The errors recorded on like's device since the last call, as a CPU int64 [kSlots] tensor, and
// the buffer cleared. Synchronises with the current stream (the only call that does); ops queued on
// other streams must have been synchronised with it first.
at::Tensor take_pending_errors_cuda(const at::Tensor& like) {
  MTLUE_CHECK(like.is_cuda(), "take_pending_errors: expected a CUDA tensor, got one on ",
              like.device());
  const c10::cuda::CUDAGuard guard(like.device());
  const at::Tensor& buffer = error_buffer(like.device());
  at::Tensor snapshot = buffer.clone();
  buffer.zero_();
  return snapshot.cpu();
}

at::Tensor perturb_apply_cuda(const at::Tensor& x_in, const at::Tensor& raw_in, double eps,
                              int64_t mode, const std::optional<at::Tensor>& crop,
                              const std::optional<at::Tensor>& flip, int64_t out_h, int64_t out_w) {
  check_perturb_args(x_in, raw_in, eps, mode, crop, flip, out_h, out_w);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), raw = raw_in.contiguous();
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, raw.options());
  perturb_apply_forward(x, raw, eps, mode, contiguous_or_undefined(crop),
                        contiguous_or_undefined(flip), out, error_buffer(x.device()));
  return out;
}

at::Tensor perturb_apply_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                       const at::Tensor& raw_in, double eps, int64_t mode,
                                       const std::optional<at::Tensor>& crop,
                                       const std::optional<at::Tensor>& flip) {
  MTLUE_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(0) == x_in.size(0) &&
                  grad_out_in.size(1) == x_in.size(1),
              "perturb_apply_backward: grad_out must be [B,C,h,w] matching x ", x_in.sizes(),
              ", got ", grad_out_in.sizes());
  MTLUE_CHECK(grad_out_in.device() == x_in.device(), "perturb_apply_backward: grad_out is on ",
              grad_out_in.device(), " but x is on ", x_in.device());
  check_perturb_args(x_in, raw_in, eps, mode, crop, flip, grad_out_in.size(2), grad_out_in.size(3));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), raw = raw_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(raw.scalar_type()).contiguous();
  at::Tensor grad_raw = at::empty_like(raw, at::MemoryFormat::Contiguous);
  perturb_apply_backward(grad_out, x, raw, eps, mode, contiguous_or_undefined(crop),
                         contiguous_or_undefined(flip), grad_raw, error_buffer(x.device()));
  return grad_raw;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_reg_cuda(
    const at::Tensor& table, const at::Tensor& task_offsets) {
  const c10::cuda::CUDAGuard guard(table.device());
  const at::Tensor& errors = error_buffer(table.device());
  auto pairs = [&](const at::Tensor& gram, const at::Tensor& offsets, at::Tensor& cos,
                   at::Tensor& norms, at::Tensor& intra, at::Tensor& inter) {
    embedding_reg_forward_pairs(gram, offsets, cos, norms, intra, inter, errors);
  };
  return embedding_reg_forward(table, task_offsets, pairs);
}

at::Tensor embedding_reg_backward_cuda(const at::Tensor& grad_intra, const at::Tensor& grad_inter,
                                       const at::Tensor& table, const at::Tensor& task_offsets,
                                       const at::Tensor& cos, const at::Tensor& norms) {
  const c10::cuda::CUDAGuard guard(table.device());
  return embedding_reg_backward(grad_intra, grad_inter, table, task_offsets, cos, norms,
                                embedding_reg_backward_weights);
}

std::tuple<at::Tensor, at::Tensor> quantize_export_cuda(const at::Tensor& x_in,
                                                        const at::Tensor& delta_in) {
  check_export_args(x_in, delta_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), delta = delta_in.contiguous();
  at::Tensor protected_img = at::empty(x.sizes(), x.options());
  at::Tensor delta_q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  quantize_export(x, delta, protected_img, delta_q, error_buffer(x.device()));
  return {protected_img, delta_q};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlue, CUDA, m) {
  m.impl("perturb_apply", &perturb_apply_cuda);
  m.impl("perturb_apply_backward", &perturb_apply_backward_cuda);
  m.impl("embedding_reg", &embedding_reg_cuda);
  m.impl("embedding_reg_backward", &embedding_reg_backward_cuda);
  m.impl("quantize_export", &quantize_export_cuda);
  m.impl("take_pending_errors", &take_pending_errors_cuda);
}

}  // namespace mtlue::cuda
