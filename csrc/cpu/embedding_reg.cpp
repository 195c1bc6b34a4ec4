// CPU kernels of mtlue::embedding_reg: the pair reductions around the two GEMMs of
// common/embedding_reg_driver.h. R (the number of class embeddings) is small, so plain loops.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "../common/embedding_reg_driver.h"

namespace mtlue::cpu {
namespace {

constexpr double kNormEps = 1e-8;

// Task index of every row; validates the offsets (the CPU path sees them on the host).
std::vector<int64_t> task_of_rows(const at::Tensor& task_offsets, int64_t rows) {
  const int64_t* off = task_offsets.data_ptr<int64_t>();
  const int64_t tasks = task_offsets.size(0) - 1;
  MTLUE_CHECK(off[0] == 0 && off[tasks] == rows,
              "embedding_reg: task_offsets must be strictly increasing from 0 to R=", rows,
              ", got ", off[0], " ... ", off[tasks]);
  for (int64_t k = 0; k < tasks; ++k) {  // all checked before any row is filled in
    MTLUE_CHECK(off[k] < off[k + 1], "embedding_reg: task_offsets must be strictly increasing, got ",
                off[k], " then ", off[k + 1], " at index ", k);
  }
  std::vector<int64_t> task(rows);
  for (int64_t k = 0; k < tasks; ++k) {
    for (int64_t r = off[k]; r < off[k + 1]; ++r) task[r] = k;
  }
  return task;
}

// Pair counts (within, cross) for the offsets.
std::pair<int64_t, int64_t> pair_counts(const at::Tensor& task_offsets, int64_t rows) {
  const int64_t within = within_pairs(task_offsets.data_ptr<int64_t>(), task_offsets.size(0) - 1);
  return {within, rows * (rows - 1) / 2 - within};
}

template <typename T>
void pairs_forward_impl(const at::Tensor& gram_t, const at::Tensor& task_offsets, at::Tensor& cos_t,
                   at::Tensor& norms_t, at::Tensor& intra_t, at::Tensor& inter_t) {
  const int64_t rows = gram_t.size(0);
  const std::vector<int64_t> task = task_of_rows(task_offsets, rows);
  const auto [n_within, n_cross] = pair_counts(task_offsets, rows);
  const T* gram = gram_t.data_ptr<T>();
  T* cos = cos_t.data_ptr<T>();
  T* norms = norms_t.data_ptr<T>();
  std::vector<T> clamped(rows);
  for (int64_t m = 0; m < rows; ++m) {
    norms[m] = std::sqrt(gram[m * rows + m]);
    clamped[m] = std::max(norms[m], static_cast<T>(kNormEps));
  }
  T sum_within = 0, sum_cross = 0;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t n = 0; n < rows; ++n) {
      const T c = gram[m * rows + n] / (clamped[m] * clamped[n]);
      cos[m * rows + n] = c;
      if (n <= m) continue;
      if (task[m] == task[n]) sum_within += c;
      else sum_cross += std::abs(c);
    }
  }
  *intra_t.data_ptr<T>() = n_within ? sum_within / static_cast<T>(n_within) : T(0);
  *inter_t.data_ptr<T>() = n_cross ? sum_cross / static_cast<T>(n_cross) : T(0);
}

template <typename T>
T sign_of(T v) {  // torch.sign / abs' gradient: 0 at 0
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

template <typename T>
void pair_weights_impl(const at::Tensor& grad_intra, const at::Tensor& grad_inter,
                  const at::Tensor& cos_t, const at::Tensor& norms_t,
                  const at::Tensor& task_offsets, at::Tensor& m_t) {
  const int64_t rows = cos_t.size(0);
  const std::vector<int64_t> task = task_of_rows(task_offsets, rows);
  const auto [n_within, n_cross] = pair_counts(task_offsets, rows);
  const T w_within = n_within ? *grad_intra.data_ptr<T>() / static_cast<T>(n_within) : T(0);
  const T w_cross = n_cross ? *grad_inter.data_ptr<T>() / static_cast<T>(n_cross) : T(0);
  const T* cos = cos_t.data_ptr<T>();
  const T* norms = norms_t.data_ptr<T>();
  T* out = m_t.data_ptr<T>();
  for (int64_t m = 0; m < rows; ++m) {
    const T c_m = std::max(norms[m], static_cast<T>(kNormEps));
    T diag = 0;
    for (int64_t n = 0; n < rows; ++n) {
      if (n == m) continue;
      const T c_n = std::max(norms[n], static_cast<T>(kNormEps));
      const T cmn = cos[m * rows + n];
      const T s = task[m] == task[n] ? w_within : w_cross * sign_of(cmn);
      out[m * rows + n] = s / (c_m * c_n);
      diag += s * cmn;
    }
    out[m * rows + m] = norms[m] >= static_cast<T>(kNormEps) ? -diag / (c_m * c_m) : T(0);
  }
}

void pairs_forward(const at::Tensor& gram, const at::Tensor& task_offsets, at::Tensor& cos,
                   at::Tensor& norms, at::Tensor& intra, at::Tensor& inter) {
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "embedding_reg_cpu", [&] {
    pairs_forward_impl<scalar_t>(gram, task_offsets, cos, norms, intra, inter);
  });
}

void pair_weights(const at::Tensor& grad_intra, const at::Tensor& grad_inter, const at::Tensor& cos,
                  const at::Tensor& norms, const at::Tensor& task_offsets, at::Tensor& weights) {
  AT_DISPATCH_FLOATING_TYPES(cos.scalar_type(), "embedding_reg_backward_cpu", [&] {
    pair_weights_impl<scalar_t>(grad_intra, grad_inter, cos, norms, task_offsets, weights);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_reg_cpu(
    const at::Tensor& table, const at::Tensor& task_offsets) {
  return embedding_reg_forward(table, task_offsets, pairs_forward);
}

at::Tensor embedding_reg_backward_cpu(const at::Tensor& grad_intra, const at::Tensor& grad_inter,
                                      const at::Tensor& table, const at::Tensor& task_offsets,
                                      const at::Tensor& cos, const at::Tensor& norms) {
  return embedding_reg_backward(grad_intra, grad_inter, table, task_offsets, cos, norms, pair_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlue, CPU, m) {
  m.impl("embedding_reg", &embedding_reg_cpu);
  m.impl("embedding_reg_backward", &embedding_reg_backward_cpu);
}

}  // namespace mtlue::cpu
