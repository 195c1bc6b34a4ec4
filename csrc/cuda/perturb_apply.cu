// perturb_apply forward / backward kernels (see launchers.h for the contract).
//
// Layout: one warp per image row, lanes over consecutive columns (coalesced; with a flip the
// source columns of a warp are reversed but cover the same sectors). The row index is decomposed
// into (b, c, row) once per warp instead of once per element, and each lane handles kUnroll
// columns spaced 32 apart, issuing all loads before any store to keep several loads in flight.
// Offsets and the row decomposition use index_t (uint32_t when every tensor has fewer than 2^31
// elements, else uint64_t); window bounds checks use int64 so a bad crop can never wrap around.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
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
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr int kUnroll = 4;
constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;

// Compute in double when either input is double, else in float (half/bfloat16 upcast).
template <typename x_t, typename raw_t>
using perturb_op_t =
    std::conditional_t<std::is_same_v<x_t, double> || std::is_same_v<raw_t, double>, double, float>;

// Ask for full occupancy (8 blocks of 256 threads, <= 32 registers) in the common float / 32-bit
// case, where the kernels fit without spilling; double or 64-bit variants keep their registers.
template <typename x_t, typename raw_t, typename index_t>
constexpr int kMinBlocks =
    std::is_same_v<perturb_op_t<x_t, raw_t>, float> && std::is_same_v<index_t, uint32_t> ? 8 : 1;

// Image value in [0,1]: uint8 pixels times the rounded reciprocal of 255, as in reference.py.
template <typename op_t, typename x_t>
__device__ __forceinline__ op_t load_image(x_t v) {
  if constexpr (std::is_same_v<x_t, uint8_t>) {
    return mul_rn(static_cast<op_t>(v), static_cast<op_t>(1.0 / 255.0));
  } else {
    return to_op<op_t>(v);
  }
}

// mode 0: clamp(raw, -eps, eps); mode 1: eps * tanh(raw).
template <typename op_t>
__device__ __forceinline__ op_t make_delta(op_t raw, op_t eps, int mode) {
  return mode == 0 ? clamp_nan(raw, -eps, eps) : mul_rn(eps, op_tanh(raw));
}

struct Geometry {
  int64_t B, C, H, W;  // x / raw / grad_raw
  int64_t h, w;        // out / grad_out
};

// Window of image b: (top, left) from crop (or 0, 0) and the flip flag.
__device__ __forceinline__ void window_of(int64_t b, const int64_t* crop, const bool* flip,
                                          int64_t& top, int64_t& left, bool& flipped) {
  top = crop != nullptr ? crop[2 * b] : 0;
  left = crop != nullptr ? crop[2 * b + 1] : 0;
  flipped = flip != nullptr && flip[b];
}

// out[b,c,i,j] = clamp(x[b,c,top+i,src_col(j)] + delta(raw[...]), 0, 1); one warp per (b,c,i).
template <typename x_t, typename raw_t, typename index_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks<x_t, raw_t, index_t>)
    perturb_forward_kernel(const x_t* __restrict__ x, const raw_t* __restrict__ raw,
                           const int64_t* __restrict__ crop, const bool* __restrict__ flip,
                           raw_t* __restrict__ out, Geometry g, double eps_d, int mode) {
  using op_t = perturb_op_t<x_t, raw_t>;
  const int64_t row = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= g.B * g.C * g.h) return;  // whole warp exits together
  const index_t lane = threadIdx.x % kWarpSize;

  // Row decomposition in index_t: 32-bit division is much cheaper than 64-bit.
  const index_t w = static_cast<index_t>(g.w);
  const index_t i = static_cast<index_t>(row) % static_cast<index_t>(g.h);
  const index_t bc = static_cast<index_t>(row) / static_cast<index_t>(g.h);
  int64_t top, left;
  bool flipped;
  window_of(bc / static_cast<index_t>(g.C), crop, flip, top, left, flipped);
  const int64_t r = top + static_cast<int64_t>(i);
  const bool row_ok = 0 <= r && r < g.H;  // guard only; callers validate the window

  // Element offsets of the source row in x / raw and of the output row.
  const index_t src_row = bc * static_cast<index_t>(g.H) + static_cast<index_t>(r);
  const index_t src_base = row_ok ? src_row * static_cast<index_t>(g.W) : index_t{0};
  const index_t dst_base = static_cast<index_t>(row) * w;
  const op_t eps = static_cast<op_t>(eps_d);
  const op_t zero(0), one(1);

  for (index_t j0 = lane; j0 < w; j0 += kWarpSize * kUnroll) {
    op_t xv[kUnroll], rv[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t j = j0 + k * kWarpSize;
      const int64_t q = left + static_cast<int64_t>(flipped ? w - 1 - j : j);
      ok[k] = row_ok && j < w && 0 <= q && q < g.W;
      xv[k] = zero;
      rv[k] = zero;
      if (ok[k]) {
        const index_t src = src_base + static_cast<index_t>(q);
        xv[k] = load_image<op_t>(x[src]);
        rv[k] = to_op<op_t>(raw[src]);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t j = j0 + k * kWarpSize;
      if (j < w) {
        const op_t s = add_rn(xv[k], make_delta(rv[k], eps, mode));
        const op_t y = ok[k] ? clamp_nan(s, zero, one) : zero;
        out[dst_base + j] = static_cast<raw_t>(y);
      }
    }
  }
}

// grad_raw[b,c,r,q]: zero outside the window, else the chained clamp / tanh gradient of the
// matching grad_out element. One warp per (b,c,r) row of grad_raw.
template <typename x_t, typename raw_t, typename index_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks<x_t, raw_t, index_t>)
    perturb_backward_kernel(const raw_t* __restrict__ grad_out, const x_t* __restrict__ x,
                            const raw_t* __restrict__ raw, const int64_t* __restrict__ crop,
                            const bool* __restrict__ flip, raw_t* __restrict__ grad_raw,
                            Geometry g, double eps_d, int mode) {
  using op_t = perturb_op_t<x_t, raw_t>;
  const int64_t row = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= g.B * g.C * g.H) return;  // whole warp exits together
  const index_t lane = threadIdx.x % kWarpSize;

  // Row decomposition in index_t: 32-bit division is much cheaper than 64-bit.
  const index_t W = static_cast<index_t>(g.W);
  const index_t r = static_cast<index_t>(row) % static_cast<index_t>(g.H);
  const index_t bc = static_cast<index_t>(row) / static_cast<index_t>(g.H);
  int64_t top, left;
  bool flipped;
  window_of(bc / static_cast<index_t>(g.C), crop, flip, top, left, flipped);
  const int64_t i = static_cast<int64_t>(r) - top;  // row inside the window
  const bool row_in = 0 <= i && i < g.h;

  // Element offsets of this row in x / raw / grad_raw and of the matching grad_out row.
  const index_t src_base = static_cast<index_t>(row) * W;
  const index_t go_row = bc * static_cast<index_t>(g.h) + static_cast<index_t>(i);
  const index_t go_base = row_in ? go_row * static_cast<index_t>(g.w) : index_t{0};
  const op_t eps = static_cast<op_t>(eps_d);
  const op_t zero(0), one(1);

  for (index_t q0 = lane; q0 < W; q0 += kWarpSize * kUnroll) {
    op_t gv[kUnroll], xv[kUnroll], rv[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t q = q0 + k * kWarpSize;
      const int64_t jj = static_cast<int64_t>(q) - left;
      ok[k] = row_in && q < W && 0 <= jj && jj < g.w;
      gv[k] = zero;
      xv[k] = zero;
      rv[k] = zero;
      if (ok[k]) {  // outside the window nothing is read
        const int64_t j = flipped ? g.w - 1 - jj : jj;
        gv[k] = to_op<op_t>(grad_out[go_base + static_cast<index_t>(j)]);
        xv[k] = load_image<op_t>(x[src_base + q]);
        rv[k] = to_op<op_t>(raw[src_base + q]);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const index_t q = q0 + k * kWarpSize;
      if (q < W) {
        op_t grad = zero;
        if (ok[k]) {
          const op_t rv_k = rv[k];
          const op_t t = mode == 0 ? zero : op_tanh(rv_k);  // tanh computed once
          const op_t d = mode == 0 ? clamp_nan(rv_k, -eps, eps) : mul_rn(eps, t);
          const op_t s = add_rn(xv[k], d);
          // Select, never multiply by a 0/1 mask (0 * inf = NaN). Clamp masks are inclusive.
          const op_t grad_s = (zero <= s && s <= one) ? gv[k] : zero;
          grad = mode == 0 ? ((-eps <= rv_k && rv_k <= eps) ? grad_s : zero)
                           : mul_rn(mul_rn(grad_s, eps), sub_rn(one, mul_rn(t, t)));
        }
        grad_raw[src_base + q] = static_cast<raw_t>(grad);
      }
    }
  }
}

Geometry make_geometry(const at::Tensor& full, const at::Tensor& window) {
  return Geometry{full.size(0), full.size(1), full.size(2), full.size(3), window.size(2),
                  window.size(3)};
}

const int64_t* crop_ptr(const at::Tensor& crop) {
  return crop.defined() ? crop.const_data_ptr<int64_t>() : nullptr;
}

const bool* flip_ptr(const at::Tensor& flip) {
  return flip.defined() ? flip.const_data_ptr<bool>() : nullptr;
}

// Blocks for one warp per row (rows <= numel, so this never exceeds the grid limit in practice).
unsigned int blocks_for_rows(int64_t rows) {
  const int64_t blocks = ceil_div(rows, kWarpsPerBlock);
  MTLUE_CHECK(blocks <= kMaxBlocks, "perturb_apply: tensor too large for the CUDA grid");
  return static_cast<unsigned int>(blocks);
}

// Calls f(x_t{}) with x_t the C++ type of an x dtype (uint8 or one of the four floating types).
// A separate function so that this dispatch does not shadow the enclosing one's names.
template <typename F>
void dispatch_x(at::ScalarType x_type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x_type, "perturb_apply (x)",
                                  [&] { f(scalar_t{}); });
}

}  // namespace

// x [B,C,H,W] uint8 or floating; raw [B,C,H,W] floating; crop [B,2] int64 or undefined;
// flip [B] bool or undefined; out [B,C,h,w] (dtype of raw), fully written.
void perturb_apply_forward(const at::Tensor& x, const at::Tensor& raw, double eps, int64_t mode,
                           const at::Tensor& crop, const at::Tensor& flip, at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(raw.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Geometry g = make_geometry(raw, out);
  const unsigned int blocks = blocks_for_rows(g.B * g.C * g.h);
  const bool small = fits_32bit(x.numel()) && fits_32bit(raw.numel()) && fits_32bit(out.numel());
  const int m = static_cast<int>(mode);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, raw.scalar_type(),
                                  "perturb_apply_forward", [&] {
    using raw_t = scalar_t;
    dispatch_x(x.scalar_type(), [&](auto x_tag) {
      using x_t = decltype(x_tag);
      if (small) {
        perturb_forward_kernel<x_t, raw_t, uint32_t><<<blocks, kThreads, 0, stream>>>(
            x.const_data_ptr<x_t>(), raw.const_data_ptr<raw_t>(), crop_ptr(crop), flip_ptr(flip),
            out.mutable_data_ptr<raw_t>(), g, eps, m);
      } else {
        perturb_forward_kernel<x_t, raw_t, uint64_t><<<blocks, kThreads, 0, stream>>>(
            x.const_data_ptr<x_t>(), raw.const_data_ptr<raw_t>(), crop_ptr(crop), flip_ptr(flip),
            out.mutable_data_ptr<raw_t>(), g, eps, m);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// grad_out [B,C,h,w] (dtype of raw); x, raw as in the forward; grad_raw [B,C,H,W] (dtype of raw),
// fully written: zero outside the crop window and wherever a clamp was active.
void perturb_apply_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& raw,
                            double eps, int64_t mode, const at::Tensor& crop,
                            const at::Tensor& flip, at::Tensor& grad_raw) {
  if (grad_raw.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(raw.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Geometry g = make_geometry(raw, grad_out);
  const unsigned int blocks = blocks_for_rows(g.B * g.C * g.H);
  const bool small = fits_32bit(x.numel()) && fits_32bit(raw.numel()) &&
                     fits_32bit(grad_out.numel()) && fits_32bit(grad_raw.numel());
  const int m = static_cast<int>(mode);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, raw.scalar_type(),
                                  "perturb_apply_backward", [&] {
    using raw_t = scalar_t;
    dispatch_x(x.scalar_type(), [&](auto x_tag) {
      using x_t = decltype(x_tag);
      if (small) {
        perturb_backward_kernel<x_t, raw_t, uint32_t><<<blocks, kThreads, 0, stream>>>(
            grad_out.const_data_ptr<raw_t>(), x.const_data_ptr<x_t>(), raw.const_data_ptr<raw_t>(),
            crop_ptr(crop), flip_ptr(flip), grad_raw.mutable_data_ptr<raw_t>(), g, eps, m);
      } else {
        perturb_backward_kernel<x_t, raw_t, uint64_t><<<blocks, kThreads, 0, stream>>>(
            grad_out.const_data_ptr<raw_t>(), x.const_data_ptr<x_t>(), raw.const_data_ptr<raw_t>(),
            crop_ptr(crop), flip_ptr(flip), grad_raw.mutable_data_ptr<raw_t>(), g, eps, m);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace mtlue::cuda
