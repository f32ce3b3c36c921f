// The vector registers the native CPU kernels are compiled for (-march=native), shared by cpu_matmul.cc and
// cpu_blocks.cc, which size their register blocks by it.
#pragma once

namespace xlserve {

#if defined(__AVX512F__)
constexpr int kRegisterBytes = 64;
#elif defined(__AVX__)
constexpr int kRegisterBytes = 32;
#else
constexpr int kRegisterBytes = 16;
#endif

}  // namespace xlserve
