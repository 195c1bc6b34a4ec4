// Dtype dispatch helpers shared by the CPU kernels (host code only).
#pragma once

#include <ATen/Dispatch.h>
#include <type_traits>

namespace mtlue {

// Arithmetic type: double when any operand is double, float otherwise (half/bfloat16 included).
template <typename... Ts>
using opmath_of = std::conditional_t<(std::is_same_v<Ts, double> || ...), double, float>;

}  // namespace mtlue

// Runs the body with `raw_t` bound to raw's dtype and `x_t` to x's (uint8 or floating).
#define MTLUE_DISPATCH_X_RAW(X_TYPE, RAW_TYPE, NAME, ...)                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, RAW_TYPE, NAME, [&] {              \
    using raw_t = scalar_t;                                                                    \
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, X_TYPE, NAME, [&] {   \
      using x_t = scalar_t;                                                                    \
      __VA_ARGS__();                                                                           \
    });                                                                                        \
  })
