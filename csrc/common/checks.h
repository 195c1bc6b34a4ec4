// Argument checks shared by the CPU and CUDA registrations. The Python wrappers in
// mtlue_fast/ops validate first with friendlier messages; these protect direct torch.ops calls.
// Only shapes, dtypes and devices are checked here: values (crop windows, task offsets) are checked
// by the kernels themselves (raised at once on the CPU, recorded on CUDA; see error_slots.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "message.h"

namespace mtlue {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_perturb_args(const at::Tensor& x, const at::Tensor& raw, double eps, int64_t mode,
                               const std::optional<at::Tensor>& crop,
                               const std::optional<at::Tensor>& flip, int64_t out_h, int64_t out_w) {
  MTLUE_CHECK(x.dim() == 4, "perturb_apply: x must be [B,C,H,W], got ", x.sizes());
  MTLUE_CHECK(raw.sizes() == x.sizes(), "perturb_apply: raw ", raw.sizes(), " must match x ", x.sizes());
  MTLUE_CHECK(x.scalar_type() == at::kByte || is_float_dtype(x.scalar_type()),
              "perturb_apply: x must be uint8 or floating, got ", x.scalar_type());
  MTLUE_CHECK(is_float_dtype(raw.scalar_type()), "perturb_apply: raw must be floating, got ",
              raw.scalar_type());
  MTLUE_CHECK(raw.device() == x.device(), "perturb_apply: raw is on ", raw.device(), " but x is on ",
              x.device());
  MTLUE_CHECK(eps >= 0.0 && eps < INFINITY, "perturb_apply: eps must be finite and >= 0, got ", eps);
  MTLUE_CHECK(mode == 0 || mode == 1, "perturb_apply: mode must be 0 (clamp) or 1 (tanh), got ", mode);
  const int64_t batch = x.size(0), height = x.size(2), width = x.size(3);
  MTLUE_CHECK(out_h >= 1 && out_h <= height && out_w >= 1 && out_w <= width,
              "perturb_apply: out size (", out_h, ", ", out_w, ") must lie within the image (", height,
              ", ", width, ")");
  if (crop.has_value()) {
    MTLUE_CHECK(crop->scalar_type() == at::kLong, "perturb_apply: crop must be int64, got ",
                crop->scalar_type());
    MTLUE_CHECK(crop->dim() == 2 && crop->size(0) == batch && crop->size(1) == 2,
                "perturb_apply: crop must be [B,2], got ", crop->sizes());
    MTLUE_CHECK(crop->device() == x.device(), "perturb_apply: crop is on ", crop->device(),
                " but x is on ", x.device());
  }
  if (flip.has_value()) {
    MTLUE_CHECK(flip->scalar_type() == at::kBool, "perturb_apply: flip must be bool, got ",
                flip->scalar_type());
    MTLUE_CHECK(flip->dim() == 1 && flip->size(0) == batch, "perturb_apply: flip must be [B], got ",
                flip->sizes());
    MTLUE_CHECK(flip->device() == x.device(), "perturb_apply: flip is on ", flip->device(),
                " but x is on ", x.device());
  }
}

inline void check_embedding_args(const at::Tensor& table, const at::Tensor& task_offsets) {
  MTLUE_CHECK(table.dim() == 2, "embedding_reg: table must be [R,D], got ", table.sizes());
  MTLUE_CHECK(is_float_dtype(table.scalar_type()), "embedding_reg: table must be floating, got ",
              table.scalar_type());
  MTLUE_CHECK(task_offsets.scalar_type() == at::kLong && task_offsets.dim() == 1 &&
                  task_offsets.size(0) >= 2,
              "embedding_reg: task_offsets must be int64 [K+1] with K >= 1, got ",
              task_offsets.scalar_type(), " ", task_offsets.sizes());
  MTLUE_CHECK(task_offsets.device() == table.device(), "embedding_reg: task_offsets is on ",
              task_offsets.device(), " but table is on ", table.device());
}

inline void check_export_args(const at::Tensor& x, const at::Tensor& delta) {
  MTLUE_CHECK(x.dim() == 4 && x.scalar_type() == at::kByte,
              "quantize_export: x must be uint8 [N,C,H,W], got ", x.scalar_type(), " ", x.sizes());
  MTLUE_CHECK(delta.sizes() == x.sizes(), "quantize_export: delta ", delta.sizes(), " must match x ",
              x.sizes());
  MTLUE_CHECK(is_float_dtype(delta.scalar_type()), "quantize_export: delta must be floating, got ",
              delta.scalar_type());
  MTLUE_CHECK(delta.device() == x.device(), "quantize_export: delta is on ", delta.device(),
              " but x is on ", x.device());
}

// Number of within-task (m<n) pairs for the given offsets (host values).
inline int64_t within_pairs(const int64_t* offsets, int64_t num_tasks) {
  int64_t pairs = 0;
  for (int64_t k = 0; k < num_tasks; ++k) {
    const int64_t c = offsets[k + 1] - offsets[k];
    pairs += c * (c - 1) / 2;
  }
  return pairs;
}

}  // namespace mtlue
