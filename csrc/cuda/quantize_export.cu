// quantize_export kernel (see launchers.h).
//
// Element-wise. Each thread owns 16 consecutive elements: one 16-byte vector of x, of protected_img
// and of delta_q, and 16 elements of delta (one to eight 16-byte vectors), all loads issued before
// any store; element by element only at the end of the tensor or when a pointer is not 16-byte
// aligned. Out-of-int8-range differences are counted per warp and added to the device's error
// buffer with one atomic per warp that saw any.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../common/message.h"
#include "common.cuh"
#include "launchers.h"
#include "runtime.cuh"

namespace mtlue::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kPerThread = 16;  // uint8 elements: one 16-byte vector of x
constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;

// One element: protected = round(clamp(x + 255 * delta, 0, 255)) (NaN delta counts as 0),
// delta_q = protected - x saturated to +-127, counting the saturated ones.
template <typename delta_t>
__device__ __forceinline__ void quantize_one(uint8_t x, delta_t delta, uint8_t& protected_px,
                                             int8_t& delta_q, unsigned int& overflows) {
  using op_t = std::conditional_t<std::is_same_v<delta_t, double>, double, float>;
  const op_t d_raw = to_op<op_t>(delta);
  const op_t d = d_raw != d_raw ? op_t(0) : d_raw;  // NaN -> 0
  // Separate rounded mul and add (no FMA), then clamp and round half to even.
  const op_t v =
      clamp_nan(add_rn(static_cast<op_t>(x), mul_rn(op_t(255), d)), op_t(0), op_t(255));
  const int p = static_cast<int>(op_rint(v));  // in [0, 255]
  const int dq = p - static_cast<int>(x);     // in [-255, 255]
  overflows += (dq > 127 || dq < -127) ? 1u : 0u;
  protected_px = static_cast<uint8_t>(p);
  delta_q = static_cast<int8_t>(dq < -127 ? -127 : (dq > 127 ? 127 : dq));
}

template <bool kVector, typename delta_t>
__global__ void __launch_bounds__(kThreads)
    quantize_export_kernel(const uint8_t* __restrict__ x, const delta_t* __restrict__ delta,
                           uint8_t* __restrict__ protected_img, int8_t* __restrict__ delta_q,
                           int64_t numel, int64_t* __restrict__ errors) {
  const int64_t first = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * kPerThread;
  unsigned int overflows = 0;
  if (kVector && first + kPerThread <= numel) {
    const Pack<uint8_t, kPerThread> xv = load_pack<uint8_t, kPerThread>(x + first);
    const Pack<delta_t, kPerThread> dv = load_pack<delta_t, kPerThread>(delta + first);
    Pack<uint8_t, kPerThread> pv;
    Pack<int8_t, kPerThread> qv;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      quantize_one(xv.v[e], dv.v[e], pv.v[e], qv.v[e], overflows);
    }
    store_pack<uint8_t, kPerThread>(protected_img + first, pv);
    store_pack<int8_t, kPerThread>(delta_q + first, qv);
  } else {
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int64_t idx = first + e;
      if (idx < numel) {
        quantize_one(x[idx], delta[idx], protected_img[idx], delta_q[idx], overflows);
      }
    }
  }
  // Every thread reaches this point (no early return), so full-mask shuffles are safe.
  overflows = warp_sum(overflows);
  if (threadIdx.x % kWarpSize == 0 && overflows != 0) {
    count_error(errors, error_slot::kExportOverflow, overflows);
  }
}

}  // namespace

void quantize_export(const at::Tensor& x, const at::Tensor& delta, at::Tensor& protected_img,
                     at::Tensor& delta_q, const at::Tensor& errors) {
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = ceil_div(numel, int64_t{kThreads} * kPerThread);
  MTLUE_CHECK(blocks <= kMaxBlocks, "quantize_export: tensor too large for the CUDA grid");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(),
                                  "quantize_export", [&] {
    const uint8_t* x_ptr = x.const_data_ptr<uint8_t>();
    const scalar_t* d_ptr = delta.const_data_ptr<scalar_t>();
    uint8_t* p_ptr = protected_img.mutable_data_ptr<uint8_t>();
    int8_t* q_ptr = delta_q.mutable_data_ptr<int8_t>();
    const bool vector = aligned_to(x_ptr, 16) && aligned_to(d_ptr, 16) && aligned_to(p_ptr, 16) &&
                        aligned_to(q_ptr, 16);
    auto kernel = vector ? &quantize_export_kernel<true, scalar_t>
                         : &quantize_export_kernel<false, scalar_t>;
    MTLUE_LAUNCH(kernel, static_cast<unsigned int>(blocks), kThreads, stream)(
        x_ptr, d_ptr, p_ptr, q_ptr, numel, errors.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mtlue::cuda
