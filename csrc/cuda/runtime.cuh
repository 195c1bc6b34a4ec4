// The CUDA runtime as a launcher sees it: CUDA's own under nvcc, or the host emulation
// (host_emulation.h) when MTLUE_CUDA_HOST_EMULATION is defined. The emulation compiles the same
// kernels and launchers with a host C++ compiler and runs each block's threads as host threads, so
// tests/test_cuda_kernels_on_host.py can check the kernels' indexing against the reference on a
// machine without a GPU. It says nothing about speed, memory ordering or the device's arithmetic.
//
// A launch is written MTLUE_LAUNCH(kernel, blocks, threads, stream)(arguments...).
#pragma once

#ifdef MTLUE_CUDA_HOST_EMULATION
#include "host_emulation.h"
#define MTLUE_LAUNCH(kernel, blocks, threads, stream) \
  ::mtlue::emulation::launch((kernel), (blocks), (threads))
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#define MTLUE_LAUNCH(kernel, blocks, threads, stream) (kernel)<<<(blocks), (threads), 0, (stream)>>>
#endif
