// Host emulation of what the mtlue kernels use from CUDA (see runtime.cuh): the qualifiers, the
// thread and block indices, __syncthreads, block-shared arrays, the rounding intrinsics, 64-bit
// atomicAdd, full-warp __shfl_down_sync, uint4, and a launch that runs every block's threads as
// host threads, block after block. Only for MTLUE_CUDA_HOST_EMULATION builds (tests). A block's
// thread count must be a multiple of 32 when its kernel shuffles.
#pragma once

#ifndef MTLUE_CUDA_HOST_EMULATION
#error "host_emulation.h is for MTLUE_CUDA_HOST_EMULATION builds only"
#endif

#include <c10/core/Device.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Function-local `static`: one array per kernel instantiation, shared by the block's threads
// (blocks run one after another).
#define __shared__ static

struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return uint4{x, y, z, w}; }
using cudaStream_t = void*;

namespace mtlue::emulation {
struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};
inline std::barrier<>* block_barrier = nullptr;  // the running block's

// A warp's exchange for the shuffles: a barrier of its 32 threads and a slot per lane.
struct Warp {
  explicit Warp() : sync(32) {}
  std::barrier<> sync;
  unsigned char slots[32][8];
};
inline thread_local Warp* this_warp = nullptr;
}  // namespace mtlue::emulation

inline thread_local mtlue::emulation::Dim3 threadIdx, blockIdx;
inline mtlue::emulation::Dim3 blockDim, gridDim;

inline void __syncthreads() { mtlue::emulation::block_barrier->arrive_and_wait(); }

// Lane l gets lane l + offset's value (its own where that is past the warp). Every lane of the
// warp must call it (the full mask is the only one emulated).
template <typename T>
T __shfl_down_sync(unsigned int /*mask*/, T value, int offset) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  mtlue::emulation::Warp& warp = *mtlue::emulation::this_warp;
  const unsigned int lane = threadIdx.x % 32;
  std::memcpy(warp.slots[lane], &value, sizeof(T));
  warp.sync.arrive_and_wait();
  T result = value;
  if (lane + static_cast<unsigned int>(offset) < 32) std::memcpy(&result, warp.slots[lane + offset], sizeof(T));
  warp.sync.arrive_and_wait();  // no lane writes its slot again before every lane has read
  return result;
}

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// IEEE round-to-nearest host arithmetic; built with -ffp-contract=off, so nothing is fused.
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace mtlue::emulation {

// kernel<<<blocks, threads>>>(arguments...): each block's threads run as host threads, the
// blocks one after another.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  unsigned int blocks, threads;

  template <typename... Args>
  void operator()(Args... args) const {
    gridDim = Dim3{blocks, 1, 1};
    blockDim = Dim3{threads, 1, 1};
    for (unsigned int b = 0; b < blocks; ++b) {
      std::barrier<> sync(static_cast<std::ptrdiff_t>(threads));
      block_barrier = &sync;
      std::vector<std::unique_ptr<Warp>> warps;
      for (unsigned int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
      std::vector<std::thread> team;
      team.reserve(threads);
      for (unsigned int t = 0; t < threads; ++t) {
        team.emplace_back([&, t] {
          threadIdx = Dim3{t, 0, 0};
          blockIdx = Dim3{b, 0, 0};
          this_warp = warps[t / 32].get();
          kernel(args...);
        });
      }
      for (std::thread& member : team) member.join();
      block_barrier = nullptr;
    }
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), unsigned int blocks, unsigned int threads) {
  return Launch<Params...>{kernel, blocks, threads};
}

}  // namespace mtlue::emulation
