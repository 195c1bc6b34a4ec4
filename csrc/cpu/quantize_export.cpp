// CPU kernel of mtlue::quantize_export: uint8 image + float delta -> uint8 protected image and
// int8 delta, in one pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>

#include "../common/checks.h"
#include "../common/dispatch.h"

namespace mtlue::cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;

// Round half to even for 0 <= v < 2^22 without a libm call: adding and subtracting 1.5 * 2^23
// (2^52 for double) leaves v rounded by the FPU's default mode. Branch-free, so the loop vectorises
// (std::nearbyint is a call per element on baseline x86-64). Needs no -ffast-math, which would fold it.
template <typename T>
inline T round_half_even_small(T v) {
  constexpr T kMagic = std::is_same_v<T, double> ? T(6755399441055744.0) : T(12582912.0f);
  return (v + kMagic) - kMagic;
}

template <typename delta_t>
int64_t quantize_kernel(const uint8_t* x, const delta_t* delta, uint8_t* protected_img,
                        int8_t* delta_q, int64_t numel) {
  using opmath_t = mtlue::opmath_of<delta_t>;
  std::atomic<int64_t> overflow{0};
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    int64_t local_overflow = 0;
    for (int64_t i = begin; i < end; ++i) {
      const opmath_t raw = static_cast<opmath_t>(delta[i]);
      const opmath_t d = raw != raw ? opmath_t(0) : raw;  // NaN counts as no perturbation
      opmath_t v = static_cast<opmath_t>(x[i]) + d * opmath_t(255);
      v = v < opmath_t(0) ? opmath_t(0) : (v > opmath_t(255) ? opmath_t(255) : v);
      const int32_t p = static_cast<int32_t>(round_half_even_small(v));
      const int32_t dq = p - static_cast<int32_t>(x[i]);
      local_overflow += (dq > 127) | (dq < -127);
      protected_img[i] = static_cast<uint8_t>(p);
      delta_q[i] = static_cast<int8_t>(dq < -127 ? -127 : (dq > 127 ? 127 : dq));
    }
    overflow += local_overflow;
  });
  return overflow.load();
}

std::tuple<at::Tensor, at::Tensor> quantize_export_cpu(const at::Tensor& x_in,
                                                       const at::Tensor& delta_in) {
  check_export_args(x_in, delta_in);
  const at::Tensor x = x_in.contiguous(), delta = delta_in.contiguous();
  at::Tensor protected_img = at::empty(x.sizes(), x.options());
  at::Tensor delta_q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  int64_t overflow = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "quantize_export", [&] {
    overflow = quantize_kernel(x.data_ptr<uint8_t>(), delta.data_ptr<scalar_t>(),
                               protected_img.data_ptr<uint8_t>(), delta_q.data_ptr<int8_t>(), x.numel());
  });
  MTLUE_CHECK(overflow == 0, "quantize_export: ", overflow,
              " element(s) of delta move a pixel by more than 127/255; delta_q is int8, so |255*delta| "
              "must stay <= 127");
  return {protected_img, delta_q};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtlue, CPU, m) { m.impl("quantize_export", &quantize_export_cpu); }

}  // namespace mtlue::cpu
