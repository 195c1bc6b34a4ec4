// CPU kernels of mtlue::perturb_apply and its backward: one pass over memory each.
// Parallel over image rows; the inner loop over columns is branch-free so the compiler vectorises
// it (the flipped variant writes the row in reverse).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/dispatch.h"

namespace mtlue::cpu {
namespace {

constexpr int64_t kGrain = 16;  // rows per task; a row is one image row of one channel

template <typename T>
inline T clamp_nan(T v, T lo, T hi) {  // torch.clamp: NaN passes through
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename opmath_t, typename x_t>
inline opmath_t to_unit(x_t v) {
  if constexpr (std::is_same_v<x_t, uint8_t>) {
    return static_cast<opmath_t>(v) * static_cast<opmath_t>(1.0 / 255.0);  // as reference.py
  } else {
    return static_cast<opmath_t>(v);
  }
}

// tanh of raw's values as float, bit for bit std::tanh. A 16-bit raw (bfloat16, half: what a
// generator under autocast produces) has 65,536 possible values, so their tanh is looked up in a
// table of std::tanh computed once (256 KiB) instead of calling the scalar libm function per
// element, which otherwise takes most of the kernels' time. Float and double raw, and double
// arithmetic (a double x), call std::tanh.
template <typename raw_t, typename opmath_t>
constexpr bool kTabulated = std::is_same_v<opmath_t, float> &&
                            (std::is_same_v<raw_t, c10::BFloat16> || std::is_same_v<raw_t, c10::Half>);

template <typename raw_t>
const float* tanh_table() {
  static const std::vector<float> table = [] {
    std::vector<float> values(1 << 16);
    for (uint32_t bits = 0; bits < values.size(); ++bits) {
      values[bits] = std::tanh(static_cast<float>(raw_t(static_cast<uint16_t>(bits), raw_t::from_bits())));
    }
    return values;
  }();
  return table.data();
}

template <typename raw_t, typename opmath_t>
struct Tanh {
  const float* table = nullptr;  // tanh_table when kTabulated, unused otherwise
  opmath_t operator()(raw_t v) const {
    if constexpr (kTabulated<raw_t, opmath_t>) {
      return static_cast<opmath_t>(table[v.x]);
    } else {
      return std::tanh(static_cast<opmath_t>(v));
    }
  }
};

// The tanh a kernel of mode kMode uses (the table only in tanh mode), fetched before its parallel
// region so that the table is built on first use outside it.
template <int kMode, typename raw_t, typename opmath_t>
Tanh<raw_t, opmath_t> make_tanh() {
  Tanh<raw_t, opmath_t> f;
  if constexpr (kMode == 1 && kTabulated<raw_t, opmath_t>) f.table = tanh_table<raw_t>();
  return f;
}

template <int kMode, typename raw_t, typename opmath_t>
inline opmath_t delta_of(raw_t raw, opmath_t eps, const Tanh<raw_t, opmath_t>& tanh_of) {
  if constexpr (kMode == 0) {
    return clamp_nan(static_cast<opmath_t>(raw), -eps, eps);
  } else {
    return eps * tanh_of(raw);
  }
}

// Per-sample window: top/left of the crop (the centred window without one) and its flip.
struct Windows {
  const int64_t* crop;  // [B,2] or nullptr
  const bool* flip;     // [B] or nullptr
  int64_t centre_top, centre_left;
  int64_t top(int64_t b) const { return crop ? crop[2 * b] : centre_top; }
  int64_t left(int64_t b) const { return crop ? crop[2 * b + 1] : centre_left; }
  bool flipped(int64_t b) const { return flip && flip[b]; }
};

template <int kMode, typename x_t, typename raw_t>
void forward_kernel(const x_t* x, const raw_t* raw, raw_t* out, Windows win, double eps_d,
                    int64_t channels, int64_t height, int64_t width, int64_t out_h, int64_t out_w,
                    int64_t out_rows) {
  using opmath_t = mtlue::opmath_of<x_t, raw_t>;
  const opmath_t eps = static_cast<opmath_t>(eps_d);
  const Tanh<raw_t, opmath_t> tanh_of = make_tanh<kMode, raw_t, opmath_t>();
  at::parallel_for(0, out_rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / out_h, i = row % out_h, b = plane / channels;
      const int64_t src = (plane * height + win.top(b) + i) * width + win.left(b);
      const x_t* x_row = x + src;
      const raw_t* raw_row = raw + src;
      raw_t* out_row = out + row * out_w;
      auto value = [&](int64_t j) {
        const opmath_t d = delta_of<kMode>(raw_row[j], eps, tanh_of);
        return static_cast<raw_t>(clamp_nan(to_unit<opmath_t>(x_row[j]) + d, opmath_t(0), opmath_t(1)));
      };
      if (win.flipped(b)) {
        for (int64_t j = 0; j < out_w; ++j) out_row[out_w - 1 - j] = value(j);
      } else {
        for (int64_t j = 0; j < out_w; ++j) out_row[j] = value(j);
      }
    }
  });
}

template <int kMode, typename x_t, typename raw_t>
void backward_kernel(const raw_t* grad_out, const x_t* x, const raw_t* raw, raw_t* grad_raw,
                     Windows win, double eps_d, int64_t channels, int64_t height, int64_t width,
                     int64_t out_h, int64_t out_w, int64_t rows) {
  using opmath_t = mtlue::opmath_of<x_t, raw_t>;
  const opmath_t eps = static_cast<opmath_t>(eps_d);
  const Tanh<raw_t, opmath_t> tanh_of = make_tanh<kMode, raw_t, opmath_t>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / height, r = row % height, b = plane / channels;
      const int64_t top = win.top(b), left = win.left(b);
      raw_t* g_row = grad_raw + row * width;
      if (r < top || r >= top + out_h) {
        for (int64_t q = 0; q < width; ++q) g_row[q] = raw_t(0);
        continue;
      }
      for (int64_t q = 0; q < left; ++q) g_row[q] = raw_t(0);
      for (int64_t q = left + out_w; q < width; ++q) g_row[q] = raw_t(0);
      const x_t* x_row = x + row * width + left;
      const raw_t* raw_row = raw + row * width + left;
      const raw_t* go_row = grad_out + (plane * out_h + (r - top)) * out_w;
      raw_t* g_win = g_row + left;
      auto grad = [&](int64_t jj, opmath_t g) {
        if constexpr (kMode == 0) {
          const opmath_t rv = static_cast<opmath_t>(raw_row[jj]);
          const opmath_t s = to_unit<opmath_t>(x_row[jj]) + clamp_nan(rv, -eps, eps);
          const opmath_t g_s = (s >= opmath_t(0) && s <= opmath_t(1)) ? g : opmath_t(0);
          return static_cast<raw_t>((rv >= -eps && rv <= eps) ? g_s : opmath_t(0));
        } else {
          const opmath_t t = tanh_of(raw_row[jj]);
          const opmath_t s = to_unit<opmath_t>(x_row[jj]) + eps * t;
          const opmath_t g_s = (s >= opmath_t(0) && s <= opmath_t(1)) ? g : opmath_t(0);
          return static_cast<raw_t>((g_s * eps) * (opmath_t(1) - t * t));
        }
      };
      if (win.flipped(b)) {
        for (int64_t jj = 0; jj < out_w; ++jj)
          g_win[jj] = grad(jj, static_cast<opmath_t>(go_row[out_w - 1 - jj]));
      } else {
        for (int64_t jj = 0; jj < out_w; ++jj) g_win[jj] = grad(jj, static_cast<opmath_t>(go_row[jj]));
      }
    }
  });
}

void check_crop_bounds(const at::Tensor& crop, int64_t height, int64_t width, int64_t out_h,
                       int64_t out_w) {
  const int64_t* c = crop.data_ptr<int64_t>();
  for (int64_t b = 0; b < crop.size(0); ++b) {
    const int64_t top = c[2 * b], left = c[2 * b + 1];
    MTLUE_CHECK(top >= 0 && left >= 0 && top + out_h <= height && left + out_w <= width,
                "perturb_apply: crop[", b, "] = (", top, ", ", left, ") puts the ", out_h, "x", out_w,
                " window outside the ", height, "x", width, " image; crop windows must satisfy "
                "0 <= top <= ", height - out_h, " and 0 <= left <= ", width - out_w);
  }
}

// Contiguous crop/flip and the Windows view of them (the tensors must outlive the view).
struct PreparedWindows {
  std::optional<at::Tensor> crop, flip;
  int64_t centre_top = 0, centre_left = 0;
  Windows view() const {
    return {crop ? crop->data_ptr<int64_t>() : nullptr, flip ? flip->data_ptr<bool>() : nullptr,
            centre_top, centre_left};
  }
};

PreparedWindows prepare_windows(const std::optional<at::Tensor>& crop,
                                const std::optional<at::Tensor>& flip, int64_t height, int64_t width,
                                int64_t out_h, int64_t out_w) {
  PreparedWindows w;
  w.centre_top = (height - out_h) / 2;
  w.centre_left = (width - out_w) / 2;
  if (crop) {
    w.crop = crop->contiguous();
    check_crop_bounds(*w.crop, height, width, out_h, out_w);
  }
  if (flip) w.flip = flip->contiguous();
  return w;
}

at::Tensor perturb_apply_cpu(const at::Tensor& x_in, const at::Tensor& raw_in, double eps,
                             int64_t mode, const std::optional<at::Tensor>& crop,
                             const std::optional<at::Tensor>& flip, int64_t out_h, int64_t out_w) {
  check_perturb_args(x_in, raw_in, eps, mode, crop, flip, out_h, out_w);
  const at::Tensor x = x_in.contiguous(), raw = raw_in.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const PreparedWindows win = prepare_windows(crop, flip, height, width, out_h, out_w);
  at::Tensor out = at::empty({batch, channels, out_h, out_w}, raw.options());
  MTLUE_DISPATCH_X_RAW(x.scalar_type(), raw.scalar_type(), "perturb_apply_cpu", [&] {
    auto run = [&](auto kernel) {
      kernel(x.data_ptr<x_t>(), raw.data_ptr<raw_t>(), out.data_ptr<raw_t>(), win.view(), eps,
             channels, height, width, out_h, out_w, batch * channels * out_h);
    };
    if (mode == 0) run(forward_kernel<0, x_t, raw_t>);
    else run(forward_kernel<1, x_t, raw_t>);
  });
  return out;
}

at::Tensor perturb_apply_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                      const at::Tensor& raw_in, double eps, int64_t mode,
                                      const std::optional<at::Tensor>& crop,
                                      const std::optional<at::Tensor>& flip) {
  MTLUE_CHECK(grad_out_in.dim() == 4, "perturb_apply_backward: grad_out must be [B,C,h,w], got ",
              grad_out_in.sizes());
  const int64_t out_h = grad_out_in.size(2), out_w = grad_out_in.size(3);
  check_perturb_args(x_in, raw_in, eps, mode, crop, flip, out_h, out_w);
  MTLUE_CHECK(grad_out_in.size(0) == x_in.size(0) && grad_out_in.size(1) == x_in.size(1),
              "perturb_apply_backward: grad_out ", grad_out_in.sizes(), " does not match x ",
              x_in.sizes());
  const at::Tensor x = x_in.contiguous(), raw = raw_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(raw.scalar_type()).contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  const PreparedWindows win = prepare_windows(crop, flip, height, width, out_h, out_w);
  at::Tensor grad_raw = at::empty_like(raw, at::MemoryFormat::Contiguous);
  MTLUE_DISPATCH_X_RAW(x.scalar_type(), raw.scalar_type(), "perturb_apply_backward_cpu", [&] {
    auto run = [&](auto kernel) {
      kernel(grad_out.data_ptr<raw_t>(), x.data_ptr<x_t>(), raw.data_ptr<raw_t>(),
             grad_raw.data_ptr<raw_t>(), win.view(), eps, channels, height, width, out_h, out_w,
             batch * channels * height);
    };
    if (mode == 0) run(backward_kernel<0, x_t, raw_t>);
    else run(backward_kernel<1, x_t, raw_t>);
  });
  return grad_raw;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlue, CPU, m) {
  m.impl("perturb_apply", &perturb_apply_cpu);
  m.impl("perturb_apply_backward", &perturb_apply_backward_cpu);
}

}  // namespace mtlue::cpu
