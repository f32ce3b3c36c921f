// bfloat16 as the native CPU kernels read it (cpu_decode.cc, cpu_matmul.cc): the upper half of a float32, so
// widening is a shift into the high 16 bits, which compilers vectorize without any conversion instruction.
#pragma once

#include <cstdint>
#include <cstring>

namespace xlserve {

inline float widen_bf16(uint16_t w) {
  const uint32_t wide = static_cast<uint32_t>(w) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

}  // namespace xlserve
