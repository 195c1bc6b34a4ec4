// Device-independent part of mtlue::embedding_reg: the two GEMMs (Gram matrix forward, M @ table
// backward) and dtype handling. The O(R^2) pair work is passed in as a device-specific callable.
//
// Forward: gram = T T^T, norms = sqrt(diag(gram)), cos = gram / (c c^T) with c = max(norms, 1e-8),
// intra / inter = means over within-task / cross-task pairs m<n of cos / |cos|.
// Backward: d(loss)/dT = M T with M[m,n] = S_mn / (c_m c_n) (m != n, S the pair weights) and
// M[m,m] = -sum_n S_mn cos_mn / c_m^2 (0 when the norm was clamped).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <tuple>
#include <utility>

#include "checks.h"

namespace mtlue {

inline at::ScalarType embedding_compute_dtype(const at::Tensor& table) {
  return table.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// pairs(gram, task_offsets, cos, norms, intra, inter) fills the last four.
template <typename PairsForward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_reg_forward(
    const at::Tensor& table, const at::Tensor& task_offsets_in, PairsForward pairs) {
  check_embedding_args(table, task_offsets_in);
  const at::Tensor t = table.to(embedding_compute_dtype(table)).contiguous();
  const at::Tensor task_offsets = task_offsets_in.contiguous();
  const int64_t rows = t.size(0);
  const at::Tensor gram = at::mm(t, t.t()).contiguous();
  at::Tensor cos = at::empty({rows, rows}, t.options());
  at::Tensor norms = at::empty({rows}, t.options());
  at::Tensor intra = at::empty({}, t.options());
  at::Tensor inter = at::empty({}, t.options());
  pairs(gram, task_offsets, cos, norms, intra, inter);
  return {intra.to(table.scalar_type()), inter.to(table.scalar_type()), cos, norms};
}

// weights(grad_intra, grad_inter, cos, norms, task_offsets, M) fills M [R,R].
template <typename PairWeights>
at::Tensor embedding_reg_backward(const at::Tensor& grad_intra, const at::Tensor& grad_inter,
                                  const at::Tensor& table, const at::Tensor& task_offsets_in,
                                  const at::Tensor& cos, const at::Tensor& norms,
                                  PairWeights weights) {
  check_embedding_args(table, task_offsets_in);
  const int64_t rows = table.size(0);
  MTLUE_CHECK(cos.dim() == 2 && cos.size(0) == rows && cos.size(1) == rows && norms.dim() == 1 &&
                  norms.size(0) == rows,
              "embedding_reg_backward: cos must be [R,R] and norms [R] for R=", rows);
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"grad_intra", &grad_intra}, {"grad_inter", &grad_inter}, {"cos", &cos}, {"norms", &norms}};
  for (const auto& [name, t] : inputs) {
    MTLUE_CHECK(t->device() == table.device(), "embedding_reg_backward: ", name, " is on ",
                t->device(), " but table is on ", table.device());
  }
  const at::ScalarType compute = cos.scalar_type();
  const at::Tensor t = table.to(compute).contiguous();
  at::Tensor m = at::empty({rows, rows}, cos.options());
  weights(grad_intra.to(compute).contiguous(), grad_inter.to(compute).contiguous(), cos.contiguous(),
          norms.to(compute).contiguous(), task_offsets_in.contiguous(), m);
  return at::mm(m, t).to(table.scalar_type());
}

}  // namespace mtlue
