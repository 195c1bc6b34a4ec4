// CUDA launchers for the mtlue ops. Implemented in csrc/cuda/*.cu, registered for the CUDA dispatch
// key in csrc/cuda/bindings.cpp, which validates arguments and allocates outputs before calling them.
//
// Preconditions (guaranteed by the caller): every tensor is on the same CUDA device and contiguous;
// shapes and dtypes are as documented; optional tensors are passed undefined (`at::Tensor()`) when
// absent. Launchers run on the current CUDA stream and never synchronise.
//
// Value errors that only the data can reveal (a crop window outside the image, an export delta
// beyond the int8 range, task offsets that are not increasing) are not raised here: reading them
// back would synchronise every call. The kernels record them instead in the device's error buffer
// (`errors`, int64 [error_slot::kSlots], see common/error_slots.h) and carry on safely; the buffer
// is read and cleared only by mtlue::take_pending_errors.
#pragma once

#include <ATen/core/Tensor.h>
#include <cstdint>

#include "../common/error_slots.h"

namespace mtlue::cuda {

// perturb_apply forward.
//   x    [B,C,H,W] uint8 (scaled by 1/255) or half/bfloat16/float/double in [0,1]
//   raw  [B,C,H,W] half/bfloat16/float/double
//   crop [B,2] int64 (top, left) or undefined (the centred window ((H-h)/2, (W-w)/2))
//   flip [B] bool or undefined (no flip)
//   out  [B,C,h,w], dtype of raw; fully written.
//   errors: the device's error buffer. A window outside the image is clamped into it (nothing is
//   ever read outside the image) and recorded in the crop slots.
// mode 0: delta = clamp(raw, -eps, eps); mode 1: delta = eps * tanh(raw).
void perturb_apply_forward(const at::Tensor& x, const at::Tensor& raw, double eps, int64_t mode,
                           const at::Tensor& crop, const at::Tensor& flip, at::Tensor& out,
                           const at::Tensor& errors);

// perturb_apply backward: gradient with respect to raw.
//   grad_out [B,C,h,w] dtype of raw; grad_raw [B,C,H,W] dtype of raw, fully written
//   (zero outside the crop window and wherever a clamp was active). Windows as in the forward.
void perturb_apply_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& raw,
                            double eps, int64_t mode, const at::Tensor& crop,
                            const at::Tensor& flip, at::Tensor& grad_raw, const at::Tensor& errors);

// embedding_reg, pair reduction of the forward pass.
//   gram [R,R] float/double = table @ table^T (table already up-cast to float/double)
//   task_offsets [K+1] int64 on the device; expected 0 = o_0 < ... < o_K = R. Other values are
//   recorded in the offsets slots of `errors` (the results are then meaningless, but every read
//   stays in bounds).
// Writes norms [R] = sqrt(diag(gram)) (unclamped), cos [R,R] = gram_mn / (c_m c_n) with
// c = max(norms, 1e-8), and the 0-dim intra / inter means (0 when there is no such pair).
void embedding_reg_forward_pairs(const at::Tensor& gram, const at::Tensor& task_offsets,
                                 at::Tensor& cos, at::Tensor& norms, at::Tensor& intra,
                                 at::Tensor& inter, const at::Tensor& errors);

// embedding_reg, the [R,R] matrix M with d(loss)/d(table) = M @ table.
//   grad_intra, grad_inter: 0-dim tensors (dtype of cos) read on the device (no sync).
void embedding_reg_backward_weights(const at::Tensor& grad_intra, const at::Tensor& grad_inter,
                                    const at::Tensor& cos, const at::Tensor& norms,
                                    const at::Tensor& task_offsets, at::Tensor& weights);

// quantize_export.
//   x [N,C,H,W] uint8; delta [N,C,H,W] half/bfloat16/float/double (image scale [0,1])
//   protected_img uint8, delta_q int8, both [N,C,H,W].
// Elements whose |protected - x| exceeds 127 (int8 range) get delta_q saturated to +-127 and are
// counted in the export slot of `errors`.
void quantize_export(const at::Tensor& x, const at::Tensor& delta, at::Tensor& protected_img,
                     at::Tensor& delta_q, const at::Tensor& errors);

}  // namespace mtlue::cuda
