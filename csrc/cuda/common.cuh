// Shared device helpers for the mtlue CUDA kernels.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

namespace mtlue::cuda::detail {

constexpr int kWarpSize = 32;

// Round-to-nearest arithmetic that the compiler may not contract into FMA, so the results match a
// reference that performs the multiply and the add as separate (rounded) operations.
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// Math overloads resolved on the argument type (float stays float).
__device__ __forceinline__ float op_tanh(float v) { return ::tanhf(v); }
__device__ __forceinline__ double op_tanh(double v) { return ::tanh(v); }
__device__ __forceinline__ float op_sqrt(float v) { return ::sqrtf(v); }
__device__ __forceinline__ double op_sqrt(double v) { return ::sqrt(v); }
__device__ __forceinline__ float op_abs(float v) { return ::fabsf(v); }
__device__ __forceinline__ double op_abs(double v) { return ::fabs(v); }
__device__ __forceinline__ float op_rint(float v) { return ::rintf(v); }  // half to even
__device__ __forceinline__ double op_rint(double v) { return ::rint(v); }

// torch.clamp semantics: NaN compares false both ways and so passes through unchanged.
template <typename T>
__device__ __forceinline__ T clamp_nan(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// torch.clamp(v, min=lo): NaN passes through.
template <typename T>
__device__ __forceinline__ T clamp_min_nan(T v, T lo) {
  return v < lo ? lo : v;
}

// torch.sign: -1, 0 or 1; 0 for +-0 and for NaN.
template <typename T>
__device__ __forceinline__ T sign_of(T v) {
  return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0));
}

// Converts a stored element to the compute type. c10::Half / c10::BFloat16 convert through float
// (exact); integer pixels are converted exactly.
template <typename op_t, typename T>
__device__ __forceinline__ op_t to_op(T v) {
  using via_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  return static_cast<op_t>(static_cast<via_t>(v));
}

// Sum over a warp (full mask: every lane of the warp must call it).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the block, returned to every thread. Deterministic for a fixed blockDim (fixed
// reduction tree, warp partials added in warp order). blockDim.x must be a multiple of 32 and
// every thread of the block must call it (it contains __syncthreads).
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partials[32];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading `partials`
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  T total = T(0);
  for (int i = 0; i < num_warps; ++i) total += partials[i];
  return total;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when every element offset below `numel` fits comfortably in 32-bit unsigned arithmetic
// (kernels add small unroll strides to in-range offsets, hence the strict 2^31 bound).
inline bool fits_32bit(int64_t numel) { return numel < (int64_t{1} << 31); }

}  // namespace mtlue::cuda::detail
