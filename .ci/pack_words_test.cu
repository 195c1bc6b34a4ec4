// Host-side check of pack_words (csrc/cuda/common.cuh): the four words of a 16-byte pack must hold
// its bytes exactly as memory does, for 1-, 2-, 4- and 8-byte elements. Built and run by
// .ci/check_cuda with nvcc; needs no GPU.
#include <cstdio>
#include <cstring>
#include <random>

#include "../csrc/cuda/common.cuh"

using mtlue::cuda::detail::Pack;
using mtlue::cuda::detail::pack_words;

template <typename T, int N>
int check(std::mt19937_64& rng, const char* name) {
  int failures = 0;
  for (int trial = 0; trial < 1000; ++trial) {
    Pack<T, N> pack;
    unsigned char bytes[16];
    for (unsigned char& b : bytes) b = static_cast<unsigned char>(rng());
    std::memcpy(&pack, bytes, 16);
    const uint4 w = pack_words(pack);
    unsigned char got[16];
    std::memcpy(got, &w, 16);
    if (std::memcmp(got, bytes, 16) != 0) ++failures;
  }
  if (failures) std::fprintf(stderr, "pack_words: %s: %d of 1000 packs differ from memory\n", name, failures);
  return failures;
}

int main() {
  std::mt19937_64 rng(0);
  const int failures = check<uint8_t, 16>(rng, "16 x uint8") + check<uint16_t, 8>(rng, "8 x uint16") +
                       check<float, 4>(rng, "4 x float") + check<double, 2>(rng, "2 x double");
  if (failures == 0) std::printf("pack_words: byte layout ok for 1-, 2-, 4- and 8-byte elements\n");
  return failures == 0 ? 0 : 1;
}
