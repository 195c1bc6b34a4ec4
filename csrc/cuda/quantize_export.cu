// quantize_export kernel (see launchers.h).
//
// Element-wise. Each block owns a tile of kThreads * kUnroll consecutive elements; thread t handles
// tile + t + k * kThreads (coalesced, all loads issued before any store). The count of
// out-of-int8-range differences is reduced per warp and added with one atomic per warp.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../common/message.h"
#include "common.cuh"
#include "launchers.h"

namespace mtlue::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kTile = int64_t{kThreads} * kUnroll;
constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;

template <typename delta_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    quantize_export_kernel(const uint8_t* __restrict__ x, const delta_t* __restrict__ delta,
                           uint8_t* __restrict__ protected_img, int8_t* __restrict__ delta_q,
                           index_t numel, unsigned long long* __restrict__ overflow_count) {
  using op_t = std::conditional_t<std::is_same_v<delta_t, double>, double, float>;
  const index_t first =
      static_cast<index_t>(blockIdx.x) * static_cast<index_t>(kTile) + threadIdx.x;

  uint8_t xs[kUnroll];
  op_t ds[kUnroll];
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const index_t idx = first + k * kThreads;
    xs[k] = 0;
    ds[k] = op_t(0);
    if (idx < numel) {
      xs[k] = x[idx];
      ds[k] = to_op<op_t>(delta[idx]);
    }
  }

  unsigned int overflows = 0;
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const index_t idx = first + k * kThreads;
    if (idx < numel) {
      const op_t d = ds[k] != ds[k] ? op_t(0) : ds[k];  // NaN -> 0
      // Separate rounded mul and add (no FMA), then clamp and round half to even.
      const op_t v = clamp_nan(add_rn(static_cast<op_t>(xs[k]), mul_rn(op_t(255), d)), op_t(0),
                               op_t(255));
      const int p = static_cast<int>(op_rint(v));  // in [0, 255]
      const int dq = p - static_cast<int>(xs[k]);  // in [-255, 255]
      overflows += (dq > 127 || dq < -127) ? 1u : 0u;
      protected_img[idx] = static_cast<uint8_t>(p);
      // Saturated to +-127 like the CPU kernel (the caller raises whenever the count is nonzero).
      delta_q[idx] = static_cast<int8_t>(dq < -127 ? -127 : (dq > 127 ? 127 : dq));
    }
  }

  // Every thread reaches this point (no early return), so full-mask shuffles are safe.
  overflows = warp_sum(overflows);
  if (threadIdx.x % kWarpSize == 0 && overflows != 0) {
    atomicAdd(overflow_count, static_cast<unsigned long long>(overflows));
  }
}

}  // namespace

// x [N,C,H,W] uint8; delta [N,C,H,W] half/bfloat16/float/double; protected_img uint8 and
// delta_q int8, both [N,C,H,W], fully written. Returns the number of elements with
// |protected - x| > 127 (delta_q is saturated to +-127 there); reading the count synchronises.
int64_t quantize_export(const at::Tensor& x, const at::Tensor& delta, at::Tensor& protected_img,
                        at::Tensor& delta_q) {
  const int64_t numel = x.numel();
  if (numel == 0) return 0;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Zero-filled on the current stream, so ordered before the kernel.
  const at::Tensor count = at::zeros({1}, x.options().dtype(at::kLong));
  const int64_t blocks = ceil_div(numel, kTile);
  MTLUE_CHECK(blocks <= kMaxBlocks, "quantize_export: tensor too large for the CUDA grid");
  // int64 and unsigned long long have the same size; the count never exceeds numel.
  auto* counter = reinterpret_cast<unsigned long long*>(count.mutable_data_ptr<int64_t>());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(),
                                  "quantize_export", [&] {
    const uint8_t* x_ptr = x.const_data_ptr<uint8_t>();
    const scalar_t* d_ptr = delta.const_data_ptr<scalar_t>();
    uint8_t* p_ptr = protected_img.mutable_data_ptr<uint8_t>();
    int8_t* q_ptr = delta_q.mutable_data_ptr<int8_t>();
    // 32-bit offsets when numel + kTile cannot overflow uint32 arithmetic.
    if (fits_32bit(numel)) {
      quantize_export_kernel<scalar_t, uint32_t>
          <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
              x_ptr, d_ptr, p_ptr, q_ptr, static_cast<uint32_t>(numel), counter);
    } else {
      quantize_export_kernel<scalar_t, uint64_t>
          <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
              x_ptr, d_ptr, p_ptr, q_ptr, static_cast<uint64_t>(numel), counter);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return count.item<int64_t>();
}

}  // namespace mtlue::cuda
