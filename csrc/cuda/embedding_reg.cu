// embedding_reg pair reduction (forward) and weight matrix (backward); see launchers.h.
//
// R (number of embeddings) is small, so the [R,R] passes use one block per row m with threads
// over n. All reductions use fixed trees (per-row block sums, then one block summing the row
// partials in row order), so results are deterministic run to run.
//
// Task membership: offsets are sorted with offsets[0] = 0 and offsets[K] = R, so the task of m is
// found by binary search once per row; n shares m's task iff offsets[k] <= n < offsets[k+1].

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"
#include "runtime.cuh"

namespace mtlue::cuda {
namespace {

using namespace detail;

constexpr int kRowThreads = 256;
constexpr int kFinalThreads = 1024;
constexpr double kNormFloor = 1e-8;  // c = max(norm, 1e-8)

struct TaskRange {
  int64_t begin, end;  // [begin, end): rows of the task that owns m
};

// Largest k in [0, K) with offsets[k] <= m (invariant: offsets[lo] <= m < offsets[hi]).
__device__ __forceinline__ TaskRange task_range_of(int64_t m, const int64_t* offsets, int64_t K) {
  int64_t lo = 0, hi = K;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= m) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return TaskRange{offsets[lo], offsets[lo + 1]};
}

// Number of same-task pairs m < n: sum_k C_k (C_k - 1) / 2. Called by every thread of the block.
__device__ __forceinline__ int64_t within_pairs(const int64_t* offsets, int64_t K) {
  int64_t part = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t c = offsets[k + 1] - offsets[k];
    part += c * (c - 1) / 2;
  }
  return block_sum(part);
}

template <typename T>
__device__ __forceinline__ T clamped_norm(T norm) {
  return clamp_min_nan(norm, static_cast<T>(kNormFloor));
}

// norms[m] = sqrt(gram[m,m]).
template <typename T>
__global__ void norms_kernel(const T* __restrict__ gram, int64_t R, T* __restrict__ norms) {
  const int64_t m = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (m < R) norms[m] = op_sqrt(gram[m * R + m]);
}

// Block m: cos[m, :] and the row partials over n > m: partials[m] = sum of same-task cos,
// partials[R + m] = sum of cross-task |cos|.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    cos_rows_kernel(const T* __restrict__ gram, const T* __restrict__ norms,
                    const int64_t* __restrict__ offsets, int64_t K, int64_t R,
                    T* __restrict__ cos, T* __restrict__ partials) {
  const int64_t m = blockIdx.x;
  const TaskRange task = task_range_of(m, offsets, K);
  const T cm = clamped_norm(norms[m]);
  T intra = T(0), inter = T(0);
  for (int64_t n = threadIdx.x; n < R; n += blockDim.x) {
    const T c = div_rn(gram[m * R + n], mul_rn(cm, clamped_norm(norms[n])));
    cos[m * R + n] = c;
    if (n > m) {
      if (task.begin <= n && n < task.end) {
        intra += c;
      } else {
        inter += op_abs(c);
      }
    }
  }
  intra = block_sum(intra);
  inter = block_sum(inter);
  if (threadIdx.x == 0) {
    partials[m] = intra;
    partials[R + m] = inter;
  }
}

// Records offsets that are not 0 = o_0 < ... < o_K = R in the error buffer (index -1: the end
// points). Bad offsets make the results meaningless but every read above stays in bounds.
__device__ __forceinline__ void check_offsets(const int64_t* __restrict__ offsets, int64_t K,
                                              int64_t R, int64_t* __restrict__ errors) {
  auto record = [&](int64_t k, int64_t low, int64_t high) {
    if (count_error(errors, error_slot::kOffsetsCount)) {
      errors[error_slot::kOffsetsIndex] = k;
      errors[error_slot::kOffsetsLow] = low;
      errors[error_slot::kOffsetsHigh] = high;
      errors[error_slot::kOffsetsRows] = R;
    }
  };
  if (threadIdx.x == 0 && (offsets[0] != 0 || offsets[K] != R)) record(-1, offsets[0], offsets[K]);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    if (!(offsets[k] < offsets[k + 1])) record(k, offsets[k], offsets[k + 1]);
  }
}

// Single block: checks the offsets, sums the row partials in a fixed order and divides by the pair
// counts.
template <typename T>
__global__ void __launch_bounds__(kFinalThreads)
    pair_means_kernel(const T* __restrict__ partials, const int64_t* __restrict__ offsets,
                      int64_t K, int64_t R, T* __restrict__ intra, T* __restrict__ inter,
                      int64_t* __restrict__ errors) {
  check_offsets(offsets, K, R, errors);
  T intra_sum = T(0), inter_sum = T(0);
  for (int64_t m = threadIdx.x; m < R; m += blockDim.x) {
    intra_sum += partials[m];
    inter_sum += partials[R + m];
  }
  intra_sum = block_sum(intra_sum);
  inter_sum = block_sum(inter_sum);
  const int64_t p_within = within_pairs(offsets, K);
  const int64_t p_cross = R * (R - 1) / 2 - p_within;
  if (threadIdx.x == 0) {
    *intra = p_within > 0 ? div_rn(intra_sum, static_cast<T>(p_within)) : T(0);
    *inter = p_cross > 0 ? div_rn(inter_sum, static_cast<T>(p_cross)) : T(0);
  }
}

// Block m: row m of M. Off-diagonal M[m,n] = S_mn / (c_m c_n); diagonal
// M[m,m] = -(sum_{n != m} S_mn cos_mn) / c_m^2 where the 1e-8 floor is not active, else 0.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    weights_kernel(const T* __restrict__ grad_intra, const T* __restrict__ grad_inter,
                   const T* __restrict__ cos, const T* __restrict__ norms,
                   const int64_t* __restrict__ offsets, int64_t K, int64_t R,
                   T* __restrict__ weights) {
  const int64_t m = blockIdx.x;
  const int64_t p_within = within_pairs(offsets, K);
  const int64_t p_cross = R * (R - 1) / 2 - p_within;
  const TaskRange task = task_range_of(m, offsets, K);
  const T gi = *grad_intra;
  const T ge = *grad_inter;
  // A mean over an empty pair set is the constant 0 and contributes no gradient.
  const T s_within = p_within > 0 ? div_rn(gi, static_cast<T>(p_within)) : T(0);
  // ge * sign / P_c == (ge / P_c) * sign exactly (sign is -1, 0 or 1), so divide once.
  const T s_cross = p_cross > 0 ? div_rn(ge, static_cast<T>(p_cross)) : T(0);
  const T norm_m = norms[m];
  const T cm = clamped_norm(norm_m);

  T diag = T(0);
  for (int64_t n = threadIdx.x; n < R; n += blockDim.x) {
    if (n == m) continue;
    const T c = cos[m * R + n];
    const T s = (task.begin <= n && n < task.end) ? s_within : mul_rn(s_cross, sign_of(c));
    weights[m * R + n] = div_rn(s, mul_rn(cm, clamped_norm(norms[n])));
    diag = add_rn(diag, mul_rn(s, c));
  }
  diag = block_sum(diag);
  if (threadIdx.x == 0) {
    // Inclusive like the clamp's gradient mask; NaN norms give 0.
    const bool floor_inactive = norm_m >= static_cast<T>(kNormFloor);
    weights[m * R + m] = floor_inactive ? -div_rn(diag, mul_rn(cm, cm)) : T(0);
  }
}

}  // namespace

// gram [R,R] float/double; task_offsets [K+1] int64 (0 = o_0 < ... < o_K = R, else recorded).
// Writes norms [R], cos [R,R] and the 0-dim intra / inter (all dtype of gram).
void embedding_reg_forward_pairs(const at::Tensor& gram, const at::Tensor& task_offsets,
                                 at::Tensor& cos, at::Tensor& norms, at::Tensor& intra,
                                 at::Tensor& inter, const at::Tensor& errors) {
  const c10::cuda::CUDAGuard guard(gram.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t R = gram.size(0);
  const int64_t K = task_offsets.size(0) - 1;
  // Row partials [2, R]: same-task sums, then cross-task sums.
  const at::Tensor partials = at::empty({2, R}, gram.options());

  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "embedding_reg_forward_pairs", [&] {
    const int64_t* offsets = task_offsets.const_data_ptr<int64_t>();
    if (R > 0) {
      auto norms_of = &norms_kernel<scalar_t>;
      MTLUE_LAUNCH(norms_of, static_cast<unsigned int>(ceil_div(R, kRowThreads)), kRowThreads, stream)(
          gram.const_data_ptr<scalar_t>(), R, norms.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto cos_rows = &cos_rows_kernel<scalar_t>;
      MTLUE_LAUNCH(cos_rows, static_cast<unsigned int>(R), kRowThreads, stream)(
          gram.const_data_ptr<scalar_t>(), norms.const_data_ptr<scalar_t>(), offsets, K, R,
          cos.mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Always launched so intra / inter are written (0 when R == 0).
    auto pair_means = &pair_means_kernel<scalar_t>;
    MTLUE_LAUNCH(pair_means, 1u, kFinalThreads, stream)(
        partials.const_data_ptr<scalar_t>(), offsets, K, R, intra.mutable_data_ptr<scalar_t>(),
        inter.mutable_data_ptr<scalar_t>(), errors.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_intra, grad_inter: 0-dim (dtype of cos), read on the device; cos [R,R]; norms [R]
// (unclamped); task_offsets [K+1] int64. weights [R,R] (dtype of cos), fully written.
void embedding_reg_backward_weights(const at::Tensor& grad_intra, const at::Tensor& grad_inter,
                                    const at::Tensor& cos, const at::Tensor& norms,
                                    const at::Tensor& task_offsets, at::Tensor& weights) {
  const int64_t R = cos.size(0);
  if (R == 0) return;
  const c10::cuda::CUDAGuard guard(cos.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = task_offsets.size(0) - 1;

  AT_DISPATCH_FLOATING_TYPES(cos.scalar_type(), "embedding_reg_backward_weights", [&] {
    auto kernel = &weights_kernel<scalar_t>;
    MTLUE_LAUNCH(kernel, static_cast<unsigned int>(R), kRowThreads, stream)(
        grad_intra.const_data_ptr<scalar_t>(), grad_inter.const_data_ptr<scalar_t>(),
        cos.const_data_ptr<scalar_t>(), norms.const_data_ptr<scalar_t>(),
        task_offsets.const_data_ptr<int64_t>(), K, R, weights.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mtlue::cuda
