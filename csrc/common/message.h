// Error messages built without iostreams, and MTLUE_CHECK, the check every op uses.
//
// TORCH_CHECK formats a message of several parts with std::ostringstream. On the GPU machine of the
// first device check (Ubuntu 24.04, g++ 13, torch 2.11 wheel) formatting an integer that way inside
// this library crashed the process (SIGSEGV in std::ostream::_M_insert<long>, reached from a locale
// facet lookup) instead of raising. MTLUE_CHECK builds the message here from std::to_string and
// snprintf and hands TORCH_CHECK a single std::string, which c10 passes on without a stream.
// The message is only built when the check fails.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdio>
#include <string>
#include <type_traits>

namespace mtlue {
namespace detail {

inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, const std::string& text) { out += text; }
inline void append(std::string& out, c10::ScalarType dtype) { out += c10::toString(dtype); }
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }

inline void append(std::string& out, c10::IntArrayRef sizes) {  // "[2, 3, 4]", as torch prints
  out += '[';
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  out += ']';
}

inline void append(std::string& out, double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", value);
  out += text;
}

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline void append(std::string& out, T value) {
  out += std::to_string(value);
}

}  // namespace detail

// The parts concatenated: C strings, std::string, integers, doubles (%g), sizes, dtypes, devices.
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  (detail::append(out, parts), ...);
  return out;
}

}  // namespace mtlue

// TORCH_CHECK with the message built by mtlue::message (only evaluated when cond is false).
#define MTLUE_CHECK(cond, ...) TORCH_CHECK(cond, ::mtlue::message(__VA_ARGS__))
