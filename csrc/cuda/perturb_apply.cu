// perturb_apply forward / backward kernels (see launchers.h for the contract).
//
// Layout: a block owns a tile of consecutive rows of one (b, c) plane. Those rows are one
// contiguous run of elements in every tensor involved, so the block moves them with 16-byte
// vectors (kVec elements of raw's dtype, the matching elements of x) from the first 16-byte
// boundary of the run to the last, and element by element only in the head and tail before and
// after them. The window's column offset and flip are realigned through shared memory:
//
//   forward:  the source band (the window's rows of the tile, full image width) is loaded,
//             perturbed and clamped element-wise into shared memory; the output rows are then
//             written as vectors, each element picked from its (flipped) column of the band.
//             Reading whole rows costs W/w more element reads but no more DRAM sectors for
//             windows nearly as wide as the image, and keeps every load aligned.
//   backward: the grad_out rows that fall into the tile's image rows are staged in shared memory
//             (a vector copy); grad_raw's rows are then computed as vectors from x, raw and the
//             staged grad_out, and are zero outside the window (x and raw are read only in the
//             window's rows).
//
// The sample's window and flip are read once per block, by its first thread, and handed to the
// others through shared memory. A window outside the image is clamped into it, so nothing is ever
// read outside the tensors, and recorded in the device's error buffer (launchers.h). Each thread
// keeps kUnroll vectors of every input in flight before it computes. Images wider than a tile
// (kTileElems) take a plain element-wise kernel instead.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
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
constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;

// Elements of raw's dtype in one 16-byte vector.
template <typename raw_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(raw_t));

// Vectors of each input a thread keeps in flight: 16 elements for float and 16-bit raw.
template <typename raw_t>
constexpr int kUnroll = sizeof(raw_t) == 4 ? 4 : 2;

// Elements of one tile, staged in shared memory (16 KiB for float raw, 8 KiB otherwise).
template <typename raw_t>
constexpr int kTileElems = kThreads * kUnroll<raw_t> * kVec<raw_t>;

// Compute in double when either input is double, else in float (half/bfloat16 upcast).
template <typename x_t, typename raw_t>
using perturb_op_t =
    std::conditional_t<std::is_same_v<x_t, double> || std::is_same_v<raw_t, double>, double, float>;

// Blocks per SM the tiled kernels are compiled for: forward 4 (<= 64 registers a thread, 1,024
// threads), backward 3 (<= 80, 768 threads; its index work spills at 64), each thread with kUnroll
// vectors of every input in flight. Double-precision variants keep their registers.
template <typename x_t, typename raw_t, int kFloatBlocks>
constexpr int kMinBlocks = std::is_same_v<perturb_op_t<x_t, raw_t>, float> ? kFloatBlocks : 1;

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
template <int kMode, typename op_t>
__device__ __forceinline__ op_t make_delta(op_t raw, op_t eps) {
  if constexpr (kMode == 0) {
    return clamp_nan(raw, -eps, eps);
  } else {
    return mul_rn(eps, op_tanh(raw));
  }
}

// clamp(x + delta(raw), 0, 1) in raw's dtype.
template <int kMode, typename op_t, typename x_t, typename raw_t>
__device__ __forceinline__ raw_t perturbed(x_t x, raw_t raw, op_t eps) {
  const op_t s = add_rn(load_image<op_t>(x), make_delta<kMode>(to_op<op_t>(raw), eps));
  return static_cast<raw_t>(clamp_nan(s, op_t(0), op_t(1)));
}

// d out / d raw times g: zero where a clamp was active (the masks are inclusive, as torch.clamp's).
template <int kMode, typename op_t, typename x_t, typename raw_t>
__device__ __forceinline__ raw_t raw_gradient(op_t g, x_t x, raw_t raw, op_t eps) {
  const op_t zero(0), one(1);
  const op_t r = to_op<op_t>(raw);
  if constexpr (kMode == 0) {
    const op_t s = add_rn(load_image<op_t>(x), clamp_nan(r, -eps, eps));
    // Select, never multiply by a 0/1 mask (0 * inf = NaN).
    const op_t g_s = (zero <= s && s <= one) ? g : zero;
    return static_cast<raw_t>((-eps <= r && r <= eps) ? g_s : zero);
  } else {
    const op_t t = op_tanh(r);
    const op_t s = add_rn(load_image<op_t>(x), mul_rn(eps, t));
    const op_t g_s = (zero <= s && s <= one) ? g : zero;
    return static_cast<raw_t>(mul_rn(mul_rn(g_s, eps), sub_rn(one, mul_rn(t, t))));
  }
}

struct Geometry {
  int64_t B, C, H, W;  // x / raw / grad_raw
  int64_t h, w;        // out / grad_out
};

struct Window {
  int64_t top, left;
  bool flipped;
};

// Window of sample b: crop[b] or the centred one, clamped into the image. `reporter` (one thread
// per sample and launch) records a window that had to be clamped in the error buffer.
__device__ __forceinline__ Window window_of(int64_t b, const int64_t* __restrict__ crop,
                                            const bool* __restrict__ flip, const Geometry& g,
                                            bool reporter, int64_t* __restrict__ errors) {
  const int64_t max_top = g.H - g.h, max_left = g.W - g.w;
  int64_t top = max_top / 2, left = max_left / 2;
  if (crop != nullptr) {
    top = crop[2 * b];
    left = crop[2 * b + 1];
  }
  if (top < 0 || top > max_top || left < 0 || left > max_left) {
    if (reporter && count_error(errors, error_slot::kCropCount)) {
      errors[error_slot::kCropSample] = b;
      errors[error_slot::kCropTop] = top;
      errors[error_slot::kCropLeft] = left;
      errors[error_slot::kCropHeight] = g.h;
      errors[error_slot::kCropWidth] = g.w;
      errors[error_slot::kImageHeight] = g.H;
      errors[error_slot::kImageWidth] = g.W;
    }
    top = top < 0 ? 0 : (top > max_top ? max_top : top);
    left = left < 0 ? 0 : (left > max_left ? max_left : left);
  }
  return Window{top, left, flip != nullptr && flip[b]};
}

// The window of the block's sample b, read (and clamped, and reported) by thread 0 alone and handed
// to the other threads through shared memory. Contains __syncthreads: every thread of the block
// must call it, once.
__device__ __forceinline__ Window block_window(int64_t b, const int64_t* __restrict__ crop,
                                               const bool* __restrict__ flip, const Geometry& g,
                                               bool reporter, int64_t* __restrict__ errors) {
  __shared__ Window shared;
  if (threadIdx.x == 0) shared = window_of(b, crop, flip, g, reporter, errors);
  __syncthreads();
  return shared;
}

// A run of n elements starting at element `start` of a tensor, relative to base = start - lead
// (the 16-byte boundary at or before it): elements [lead, vec_begin) and [vec_end, lead + n) are
// moved one by one, [vec_begin, vec_end) as whole vectors of E.
template <int E>
struct Run {
  int64_t base;
  uint32_t lead, vec_begin, vec_end, end;

  __device__ __forceinline__ static Run of(int64_t start, uint32_t n) {
    Run r;
    r.lead = static_cast<uint32_t>(start % E);
    r.base = start - r.lead;
    r.end = r.lead + n;
    r.vec_begin = r.lead == 0 ? 0u : static_cast<uint32_t>(E);
    r.vec_begin = r.vec_begin < r.end ? r.vec_begin : r.end;
    r.vec_end = r.end / E * E;
    r.vec_end = r.vec_end > r.vec_begin ? r.vec_end : r.vec_begin;
    return r;
  }
  __device__ __forceinline__ uint32_t vectors() const { return (vec_end - vec_begin) / E; }
  __device__ __forceinline__ uint32_t scalars() const {
    return (vec_begin - lead) + (end - vec_end);
  }
  // Relative index of the s-th element moved one by one.
  __device__ __forceinline__ uint32_t scalar(uint32_t s) const {
    const uint32_t head = vec_begin - lead;
    return s < head ? lead + s : vec_end + (s - head);
  }
};

struct Tiling {
  int64_t tiles;      // tiles per plane
  uint32_t rows;      // rows per tile (the last one may have fewer)
  FastDiv div_width;  // by the width of the rows a tile's elements are counted in
};

// Shared memory of a tile: kTileElems elements of raw_t plus room for the lead (< one vector).
template <typename raw_t>
__device__ __forceinline__ raw_t* tile_buffer() {
  alignas(16) __shared__ unsigned char bytes[(kTileElems<raw_t> + kVec<raw_t>) * sizeof(raw_t)];
  return reinterpret_cast<raw_t*>(bytes);
}

// out[b,c,i,j] = clamp(x[b,c,top+i,src(j)] + delta(raw[...]), 0, 1), src(j) = left + j, or
// left + w-1-j when flipped. Block: rows [i0, i0 + rows) of the window of one plane.
template <int kMode, int E, typename x_t, typename raw_t>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<x_t, raw_t, 4>))
    perturb_forward_tiled(const x_t* __restrict__ x, const raw_t* __restrict__ raw,
                          const int64_t* __restrict__ crop, const bool* __restrict__ flip,
                          raw_t* __restrict__ out, Geometry g, Tiling tiling, double eps_d,
                          int64_t* __restrict__ errors) {
  using op_t = perturb_op_t<x_t, raw_t>;
  raw_t* band = tile_buffer<raw_t>();
  const int64_t plane = blockIdx.x / tiling.tiles;
  const int64_t tile = blockIdx.x - plane * tiling.tiles;
  const int64_t b = plane / g.C;
  const Window win = block_window(b, crop, flip, g, tile == 0 && plane == b * g.C, errors);
  const uint32_t i0 = static_cast<uint32_t>(tile) * tiling.rows;
  const uint32_t rows = min(tiling.rows, static_cast<uint32_t>(g.h) - i0);
  const uint32_t W = static_cast<uint32_t>(g.W), w = static_cast<uint32_t>(g.w);
  const op_t eps = static_cast<op_t>(eps_d);

  // 1. The band: image rows top+i0 .. top+i0+rows, every column, perturbed into shared memory at
  //    the same offsets from its 16-byte boundary as in global memory.
  const Run<E> src = Run<E>::of((plane * g.H + win.top + i0) * g.W, rows * W);
  const x_t* xs = x + src.base;
  const raw_t* rs = raw + src.base;
  const uint32_t n_vec = src.vectors();
  for (uint32_t k0 = threadIdx.x; k0 < n_vec; k0 += kThreads * kUnroll<raw_t>) {
    Pack<x_t, E> xv[kUnroll<raw_t>];
    Pack<raw_t, E> rv[kUnroll<raw_t>];
#pragma unroll
    for (int u = 0; u < kUnroll<raw_t>; ++u) {
      const uint32_t k = k0 + u * kThreads;
      if (k < n_vec) {
        const uint32_t at = src.vec_begin + k * E;
        xv[u] = load_pack<x_t, E>(xs + at);
        rv[u] = load_pack<raw_t, E>(rs + at);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<raw_t>; ++u) {
      const uint32_t k = k0 + u * kThreads;
      if (k < n_vec) {
        Pack<raw_t, E> y;
#pragma unroll
        for (int e = 0; e < E; ++e) y.v[e] = perturbed<kMode, op_t>(xv[u].v[e], rv[u].v[e], eps);
        store_pack<raw_t, E>(band + src.vec_begin + k * E, y);
      }
    }
  }
  for (uint32_t s = threadIdx.x; s < src.scalars(); s += kThreads) {
    const uint32_t at = src.scalar(s);
    band[at] = perturbed<kMode, op_t>(xs[at], rs[at], eps);
  }
  __syncthreads();

  // 2. The output rows i0 .. i0+rows: element t of the tile is row t / w, column t % w.
  const Run<E> dst = Run<E>::of((plane * g.h + i0) * g.w, rows * w);
  raw_t* os = out + dst.base;
  const uint32_t from = src.lead + static_cast<uint32_t>(win.left);
  auto source = [&](uint32_t row, uint32_t col) {
    return band[from + row * W + (win.flipped ? w - 1 - col : col)];
  };
  const uint32_t n_out = dst.vectors();
  for (uint32_t k = threadIdx.x; k < n_out; k += kThreads) {
    const uint32_t t = dst.vec_begin + k * E - dst.lead;
    uint32_t row = tiling.div_width(t), col = t - row * w;
    Pack<raw_t, E> y;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      y.v[e] = source(row, col);
      if (++col == w) {
        col = 0;
        ++row;
      }
    }
    store_pack_global<raw_t, E>(os + dst.vec_begin + k * E, y);
  }
  for (uint32_t s = threadIdx.x; s < dst.scalars(); s += kThreads) {
    const uint32_t at = dst.scalar(s);
    const uint32_t t = at - dst.lead;
    const uint32_t row = tiling.div_width(t);
    os[at] = source(row, t - row * w);
  }
}

// grad_raw[b,c,r,q]: zero outside the window, else the clamp / tanh gradient times the matching
// grad_out element. Block: image rows [r0, r0 + rows) of one plane, full width.
template <int kMode, int E, typename x_t, typename raw_t>
__global__ void __launch_bounds__(kThreads, (kMinBlocks<x_t, raw_t, 3>))
    perturb_backward_tiled(const raw_t* __restrict__ grad_out, const x_t* __restrict__ x,
                           const raw_t* __restrict__ raw, const int64_t* __restrict__ crop,
                           const bool* __restrict__ flip, raw_t* __restrict__ grad_raw, Geometry g,
                           Tiling tiling, double eps_d, int64_t* __restrict__ errors) {
  using op_t = perturb_op_t<x_t, raw_t>;
  raw_t* staged = tile_buffer<raw_t>();
  const int64_t plane = blockIdx.x / tiling.tiles;
  const int64_t tile = blockIdx.x - plane * tiling.tiles;
  const int64_t b = plane / g.C;
  const Window win = block_window(b, crop, flip, g, tile == 0 && plane == b * g.C, errors);
  const uint32_t r0 = static_cast<uint32_t>(tile) * tiling.rows;
  const uint32_t rows = min(tiling.rows, static_cast<uint32_t>(g.H) - r0);
  const uint32_t W = static_cast<uint32_t>(g.W), w = static_cast<uint32_t>(g.w);
  const uint32_t top = static_cast<uint32_t>(win.top), left = static_cast<uint32_t>(win.left);
  // Image rows of this tile inside the window: [in0, in1) (empty when in0 >= in1).
  const uint32_t in0 = max(r0, top), in1 = min(r0 + rows, top + static_cast<uint32_t>(g.h));
  const uint32_t in_rows = in1 > in0 ? in1 - in0 : 0u;

  // 1. grad_out rows in0-top .. in1-top into shared memory (a copy).
  const Run<E> go = Run<E>::of((plane * g.h + (in0 - top)) * g.w, in_rows * w);
  const raw_t* gs = grad_out + go.base;
  const uint32_t n_go = go.vectors();
  for (uint32_t k0 = threadIdx.x; k0 < n_go; k0 += kThreads * kUnroll<raw_t>) {
    Pack<raw_t, E> v[kUnroll<raw_t>];
#pragma unroll
    for (int u = 0; u < kUnroll<raw_t>; ++u) {
      const uint32_t k = k0 + u * kThreads;
      if (k < n_go) v[u] = load_pack<raw_t, E>(gs + go.vec_begin + k * E);
    }
#pragma unroll
    for (int u = 0; u < kUnroll<raw_t>; ++u) {
      const uint32_t k = k0 + u * kThreads;
      if (k < n_go) store_pack<raw_t, E>(staged + go.vec_begin + k * E, v[u]);
    }
  }
  for (uint32_t s = threadIdx.x; s < go.scalars(); s += kThreads) {
    const uint32_t at = go.scalar(s);
    staged[at] = gs[at];
  }
  __syncthreads();

  // 2. grad_raw rows r0 .. r0+rows: element t of the tile is image row r0 + t / W, column t % W.
  const Run<E> dst = Run<E>::of((plane * g.H + r0) * g.W, rows * W);
  const x_t* xs = x + dst.base;
  const raw_t* rs = raw + dst.base;
  raw_t* os = grad_raw + dst.base;
  const op_t eps = static_cast<op_t>(eps_d);
  // Tile elements [band_lo, band_hi) span the window's rows (from its left column to its right).
  const uint32_t band_lo = (in0 - r0) * W + left;
  const uint32_t band_hi = in_rows ? (in1 - 1 - r0) * W + left + w : band_lo;
  // The gradient at image row r0 + row, column col (zero outside the window).
  auto gradient = [&](uint32_t row, uint32_t col, x_t xv, raw_t rv) {
    const uint32_t r = r0 + row;
    if (r < in0 || r >= in1 || col < left || col >= left + w) return raw_t(0);
    const uint32_t j = win.flipped ? left + w - 1 - col : col - left;
    const op_t g_out = to_op<op_t>(staged[go.lead + (r - in0) * w + j]);
    return raw_gradient<kMode>(g_out, xv, rv, eps);
  };
  const uint32_t n_vec = dst.vectors();
  for (uint32_t k0 = threadIdx.x; k0 < n_vec; k0 += kThreads * kUnroll<raw_t>) {
    Pack<x_t, E> xv[kUnroll<raw_t>];
    Pack<raw_t, E> rv[kUnroll<raw_t>];
    bool any[kUnroll<raw_t>];
#pragma unroll
    for (int u = 0; u < kUnroll<raw_t>; ++u) {
      const uint32_t k = k0 + u * kThreads;
      const uint32_t t = dst.vec_begin + k * E - dst.lead;
      any[u] = k < n_vec && t < band_hi && t + E > band_lo;
      if (any[u]) {  // outside the window's rows nothing is read
        xv[u] = load_pack<x_t, E>(xs + dst.vec_begin + k * E);
        rv[u] = load_pack<raw_t, E>(rs + dst.vec_begin + k * E);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<raw_t>; ++u) {
      const uint32_t k = k0 + u * kThreads;
      if (k < n_vec) {
        Pack<raw_t, E> y;
        if (any[u]) {
          const uint32_t t = dst.vec_begin + k * E - dst.lead;
          uint32_t row = tiling.div_width(t), col = t - row * W;
#pragma unroll
          for (int e = 0; e < E; ++e) {
            y.v[e] = gradient(row, col, xv[u].v[e], rv[u].v[e]);
            if (++col == W) {
              col = 0;
              ++row;
            }
          }
        } else {
#pragma unroll
          for (int e = 0; e < E; ++e) y.v[e] = raw_t(0);
        }
        store_pack_global<raw_t, E>(os + dst.vec_begin + k * E, y);
      }
    }
  }
  for (uint32_t s = threadIdx.x; s < dst.scalars(); s += kThreads) {
    const uint32_t at = dst.scalar(s);
    const uint32_t t = at - dst.lead;
    const uint32_t row = tiling.div_width(t), col = t - row * W;
    const uint32_t r = r0 + row;
    const bool inside = r >= in0 && r < in1 && col >= left && col < left + w;
    os[at] = inside ? gradient(row, col, xs[at], rs[at]) : raw_t(0);  // x, raw read only inside
  }
}

// Images wider than a tile: one thread per output element (64-bit offsets, no shared memory).
template <int kMode, typename x_t, typename raw_t>
__global__ void __launch_bounds__(kThreads)
    perturb_forward_wide(const x_t* __restrict__ x, const raw_t* __restrict__ raw,
                         const int64_t* __restrict__ crop, const bool* __restrict__ flip,
                         raw_t* __restrict__ out, Geometry g, double eps_d,
                         int64_t* __restrict__ errors) {
  using op_t = perturb_op_t<x_t, raw_t>;
  const int64_t n = g.B * g.C * g.h * g.w;
  const op_t eps = static_cast<op_t>(eps_d);
  for (int64_t idx = int64_t{blockIdx.x} * kThreads + threadIdx.x; idx < n;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t j = idx % g.w, i = idx / g.w % g.h, plane = idx / (g.w * g.h), b = plane / g.C;
    const Window win = window_of(b, crop, flip, g, i == 0 && j == 0 && plane == b * g.C, errors);
    const int64_t col = win.left + (win.flipped ? g.w - 1 - j : j);
    const int64_t src = (plane * g.H + win.top + i) * g.W + col;
    out[idx] = perturbed<kMode, op_t>(x[src], raw[src], eps);
  }
}

template <int kMode, typename x_t, typename raw_t>
__global__ void __launch_bounds__(kThreads)
    perturb_backward_wide(const raw_t* __restrict__ grad_out, const x_t* __restrict__ x,
                          const raw_t* __restrict__ raw, const int64_t* __restrict__ crop,
                          const bool* __restrict__ flip, raw_t* __restrict__ grad_raw, Geometry g,
                          double eps_d, int64_t* __restrict__ errors) {
  using op_t = perturb_op_t<x_t, raw_t>;
  const int64_t n = g.B * g.C * g.H * g.W;
  const op_t eps = static_cast<op_t>(eps_d);
  for (int64_t idx = int64_t{blockIdx.x} * kThreads + threadIdx.x; idx < n;
       idx += int64_t{gridDim.x} * kThreads) {
    const int64_t q = idx % g.W, r = idx / g.W % g.H, plane = idx / (g.W * g.H), b = plane / g.C;
    const Window win = window_of(b, crop, flip, g, q == 0 && r == 0 && plane == b * g.C, errors);
    const int64_t i = r - win.top, jj = q - win.left;
    raw_t grad(0);
    if (0 <= i && i < g.h && 0 <= jj && jj < g.w) {
      const int64_t j = win.flipped ? g.w - 1 - jj : jj;
      grad = raw_gradient<kMode>(to_op<op_t>(grad_out[(plane * g.h + i) * g.w + j]), x[idx],
                                 raw[idx], eps);
    }
    grad_raw[idx] = grad;
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

int64_t* errors_ptr(const at::Tensor& errors) { return errors.mutable_data_ptr<int64_t>(); }

// Tiles of `height` rows of `width` elements each, at most `max_elems` elements per tile, rows
// spread evenly over the tiles.
Tiling make_tiling(int64_t height, int64_t width, int64_t max_elems) {
  const int64_t max_rows = std::max<int64_t>(1, max_elems / width);
  const int64_t rows = ceil_div(height, ceil_div(height, max_rows));
  return Tiling{ceil_div(height, rows), static_cast<uint32_t>(rows),
                FastDiv::of(static_cast<uint32_t>(width))};
}

unsigned int checked_blocks(int64_t blocks) {
  MTLUE_CHECK(blocks <= kMaxBlocks, "perturb_apply: tensor too large for the CUDA grid");
  return static_cast<unsigned int>(blocks);
}

// Blocks of the element-wise kernels: enough to fill the device several times over.
unsigned int wide_blocks(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>(ceil_div(n, kThreads), int64_t{1} << 16));
}

// True when x, raw and every other raw-dtype tensor allow the 16-byte vector path.
template <typename x_t, typename raw_t>
bool vector_aligned(const at::Tensor& x, std::initializer_list<const at::Tensor*> raw_like) {
  constexpr int64_t x_bytes = std::min<int64_t>(16, int64_t{kVec<raw_t>} * sizeof(x_t));
  bool ok = aligned_to(x.const_data_ptr(), x_bytes);
  for (const at::Tensor* t : raw_like) ok = ok && aligned_to(t->const_data_ptr(), 16);
  return ok;
}

// Calls f(x_t{}) with x_t the C++ type of an x dtype (uint8 or one of the four floating types).
// A separate function so that this dispatch does not shadow the enclosing one's names.
template <typename F>
void dispatch_x(at::ScalarType x_type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x_type, "perturb_apply (x)",
                                  [&] { f(scalar_t{}); });
}

template <typename F>
void dispatch_mode(int64_t mode, F&& f) {
  if (mode == 0) {
    f(std::integral_constant<int, 0>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

}  // namespace

void perturb_apply_forward(const at::Tensor& x, const at::Tensor& raw, double eps, int64_t mode,
                           const at::Tensor& crop, const at::Tensor& flip, at::Tensor& out,
                           const at::Tensor& errors) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(raw.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Geometry g = make_geometry(raw, out);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, raw.scalar_type(),
                                  "perturb_apply_forward", [&] {
    using raw_t = scalar_t;
    dispatch_x(x.scalar_type(), [&](auto x_tag) {
      using x_t = decltype(x_tag);
      const x_t* xp = x.const_data_ptr<x_t>();
      const raw_t* rp = raw.const_data_ptr<raw_t>();
      raw_t* op = out.mutable_data_ptr<raw_t>();
      dispatch_mode(mode, [&](auto mode_tag) {
        constexpr int kMode = decltype(mode_tag)::value;
        if (g.W > kTileElems<raw_t>) {
          auto kernel = &perturb_forward_wide<kMode, x_t, raw_t>;
          MTLUE_LAUNCH(kernel, wide_blocks(out.numel()), kThreads, stream)(
              xp, rp, crop_ptr(crop), flip_ptr(flip), op, g, eps, errors_ptr(errors));
        } else {
          const Tiling tiling = make_tiling(g.h, g.W, kTileElems<raw_t>);
          // The output tile is counted in rows of w.
          const Tiling out_tiling{tiling.tiles, tiling.rows,
                                  FastDiv::of(static_cast<uint32_t>(g.w))};
          const unsigned int blocks = checked_blocks(g.B * g.C * tiling.tiles);
          auto kernel = vector_aligned<x_t, raw_t>(x, {&raw, &out})
                            ? &perturb_forward_tiled<kMode, kVec<raw_t>, x_t, raw_t>
                            : &perturb_forward_tiled<kMode, 1, x_t, raw_t>;
          MTLUE_LAUNCH(kernel, blocks, kThreads, stream)(xp, rp, crop_ptr(crop), flip_ptr(flip), op, g,
                                                         out_tiling, eps, errors_ptr(errors));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void perturb_apply_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& raw,
                            double eps, int64_t mode, const at::Tensor& crop,
                            const at::Tensor& flip, at::Tensor& grad_raw,
                            const at::Tensor& errors) {
  if (grad_raw.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(raw.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Geometry g = make_geometry(raw, grad_out);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, raw.scalar_type(),
                                  "perturb_apply_backward", [&] {
    using raw_t = scalar_t;
    dispatch_x(x.scalar_type(), [&](auto x_tag) {
      using x_t = decltype(x_tag);
      const raw_t* gp = grad_out.const_data_ptr<raw_t>();
      const x_t* xp = x.const_data_ptr<x_t>();
      const raw_t* rp = raw.const_data_ptr<raw_t>();
      raw_t* op = grad_raw.mutable_data_ptr<raw_t>();
      dispatch_mode(mode, [&](auto mode_tag) {
        constexpr int kMode = decltype(mode_tag)::value;
        if (g.W > kTileElems<raw_t>) {
          auto kernel = &perturb_backward_wide<kMode, x_t, raw_t>;
          MTLUE_LAUNCH(kernel, wide_blocks(grad_raw.numel()), kThreads, stream)(
              gp, xp, rp, crop_ptr(crop), flip_ptr(flip), op, g, eps, errors_ptr(errors));
        } else {
          const Tiling tiling = make_tiling(g.H, g.W, kTileElems<raw_t>);
          const unsigned int blocks = checked_blocks(g.B * g.C * tiling.tiles);
          auto kernel = vector_aligned<x_t, raw_t>(x, {&raw, &grad_out, &grad_raw})
                            ? &perturb_backward_tiled<kMode, kVec<raw_t>, x_t, raw_t>
                            : &perturb_backward_tiled<kMode, 1, x_t, raw_t>;
          MTLUE_LAUNCH(kernel, blocks, kThreads, stream)(gp, xp, rp, crop_ptr(crop), flip_ptr(flip), op,
                                                         g, tiling, eps, errors_ptr(errors));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace mtlue::cuda
