// The functions tests/test_cuda_kernels_on_host.py calls: the CUDA launchers of the three ops,
// built for the host (one source file per op, since each .cu keeps its helpers in an anonymous
// namespace), each returning the error buffer it filled.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/error_slots.h"

namespace mtlue_host {

inline at::Tensor new_errors() { return at::zeros({mtlue::error_slot::kSlots}, at::kLong); }

std::tuple<at::Tensor, at::Tensor> perturb_forward(const at::Tensor& x, const at::Tensor& raw, double eps, int64_t mode,
                                                   const std::optional<at::Tensor>& crop,
                                                   const std::optional<at::Tensor>& flip, int64_t out_h, int64_t out_w);
std::tuple<at::Tensor, at::Tensor> perturb_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const at::Tensor& raw, double eps, int64_t mode,
                                                    const std::optional<at::Tensor>& crop,
                                                    const std::optional<at::Tensor>& flip);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x, const at::Tensor& delta);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_forward(const at::Tensor& table,
                                                                                         const at::Tensor& offsets);
at::Tensor embedding_backward(const at::Tensor& grad_intra, const at::Tensor& grad_inter, const at::Tensor& table,
                              const at::Tensor& offsets, const at::Tensor& cos, const at::Tensor& norms);

}  // namespace mtlue_host
