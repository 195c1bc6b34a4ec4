// Shared device helpers for the mtlue CUDA kernels.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#ifdef MTLUE_CUDA_HOST_EMULATION
#include "host_emulation.h"
#else
#include <cuda_runtime.h>
#endif

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

// N elements of T moved as one access: 16 bytes (one vector load or store) when N * sizeof(T) is
// 16, several 16-byte accesses when it is more, one narrower access when it is less. The address
// must be aligned to min(16, N * sizeof(T)) bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

#ifdef MTLUE_CUDA_HOST_EMULATION
// x86 accepts any address; a GPU faults ("misaligned address") on a vector access that is not
// aligned. The emulation stops on one so that the host tests catch it.
template <typename T, int N>
inline void check_pack_alignment(const void* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(Pack<T, N>) != 0) {
    std::fprintf(stderr, "mtlue CUDA emulation: misaligned %zu-byte pack access at %p\n",
                 sizeof(Pack<T, N>), p);
    std::abort();
  }
}
#endif

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
#ifdef MTLUE_CUDA_HOST_EMULATION
  check_pack_alignment<T, N>(p);
#endif
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
#ifdef MTLUE_CUDA_HOST_EMULATION
  check_pack_alignment<T, N>(p);
#endif
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// The bits of a 16-byte pack as four 32-bit words, little-endian as in memory: element e fills
// bytes [e * sizeof(T), (e + 1) * sizeof(T)) of the 16.
template <typename T, int N>
__host__ __device__ __forceinline__ uint4 pack_words(const Pack<T, N>& v) {
  static_assert(sizeof(T) * N == 16, "pack_words takes a 16-byte pack");
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < N; ++e) {
    if constexpr (sizeof(T) == 8) {
      uint64_t b;
      memcpy(&b, &v.v[e], 8);
      w[2 * e] = static_cast<uint32_t>(b);
      w[2 * e + 1] = static_cast<uint32_t>(b >> 32);
    } else if constexpr (sizeof(T) == 4) {
      memcpy(&w[e], &v.v[e], 4);
    } else {
      constexpr int kBits = 8 * static_cast<int>(sizeof(T));
      std::conditional_t<sizeof(T) == 2, uint16_t, uint8_t> b;
      memcpy(&b, &v.v[e], sizeof(T));
      w[e * kBits / 32] |= static_cast<uint32_t>(b) << (e * kBits % 32);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// A pack stored to global memory, a 16-byte one as one st.global.v4. A plain store of a Pack (or
// of a uint4) is split into N element stores once the compiler has scalarised the pack, as it
// does in perturb_apply's tiled kernels (their SASS had no STG.E.128); the instruction is spelled
// out here so the store stays one 16-byte access. .ci/check_cuda checks the PTX for it.
template <typename T, int N>
__device__ __forceinline__ void store_pack_global(T* p, const Pack<T, N>& v) {
  if constexpr (sizeof(T) * N == 16) {
    const uint4 w = pack_words(v);
#ifdef MTLUE_CUDA_HOST_EMULATION
    check_pack_alignment<T, N>(p);
    memcpy(p, &w, sizeof(w));
#else
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
        : "memory");
#endif
  } else {
    store_pack(p, v);
  }
}

inline bool aligned_to(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Division by a divisor d >= 1 fixed at launch, for numerators n with n * d < 2^32:
// floor(n / d) == floor(n * m / 2^32) with m = floor(2^32 / d) + 1 (one wide multiply, no divide).
struct FastDiv {
  uint64_t magic;
  static FastDiv of(uint32_t d) { return FastDiv{(uint64_t{1} << 32) / d + 1}; }
  __device__ __forceinline__ uint32_t operator()(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
  }
};

// Adds n to errors[slot] (an int64 count of the device's error buffer); true for exactly the one
// caller that found it at 0, which then describes the error in the slots after it.
__device__ __forceinline__ bool count_error(int64_t* errors, int slot, int64_t n = 1) {
  static_assert(sizeof(unsigned long long) == sizeof(int64_t));
  return atomicAdd(reinterpret_cast<unsigned long long*>(errors + slot),
                   static_cast<unsigned long long>(n)) == 0ull;
}

// True when every element offset below `numel` fits comfortably in 32-bit unsigned arithmetic
// (kernels add small unroll strides to in-range offsets, hence the strict 2^31 bound).
inline bool fits_32bit(int64_t numel) { return numel < (int64_t{1} << 31); }

}  // namespace mtlue::cuda::detail
