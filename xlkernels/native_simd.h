// The vector registers the native CPU kernels are compiled for (-march=native), shared by cpu_matmul.cc and
// cpu_blocks.cc, which size their register blocks by it; with AVX-512, a 16 x 16 transpose of 32-bit lanes.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>
#endif

namespace xlserve {

#if defined(__AVX512F__)
constexpr int kRegisterBytes = 64;
#elif defined(__AVX__)
constexpr int kRegisterBytes = 32;
#else
constexpr int kRegisterBytes = 16;
#endif

#if defined(__AVX512F__)
// The lane indices of transpose16's round with block size d (8, 4, 2, 1 as 0-3): row i keeps its lanes
// outside d and takes row i + d's inside (`low`), row i + d the reverse (`high`).
struct TransposeIndex {
  int32_t low[4][16], high[4][16];
  constexpr TransposeIndex() : low(), high() {
    for (int round = 0; round < 4; ++round) {
      const int d = 8 >> round;
      for (int j = 0; j < 16; ++j) {
        low[round][j] = (j & d) ? 16 + j - d : j;
        high[round][j] = (j & d) ? 16 + j : j + d;
      }
    }
  }
};

// out[j][i] = in[i][j] for 16 x 16 32-bit lanes (rows `in_stride` / `out_stride` lanes apart): four rounds,
// each swapping the off-diagonal d x d blocks of every 2d x 2d block.
inline void transpose16(const uint32_t* in, int64_t in_stride, uint32_t* out, int64_t out_stride) {
  alignas(64) static constexpr TransposeIndex kIndex;
  __m512i rows[16];
  for (int i = 0; i < 16; ++i) rows[i] = _mm512_loadu_si512(in + i * in_stride);
#pragma GCC unroll 4
  for (int round = 0; round < 4; ++round) {
    const int d = 8 >> round;
    const __m512i low = _mm512_load_si512(kIndex.low[round]), high = _mm512_load_si512(kIndex.high[round]);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if (i & d) continue;
      const __m512i top = rows[i], bottom = rows[i + d];
      rows[i] = _mm512_permutex2var_epi32(top, low, bottom);
      rows[i + d] = _mm512_permutex2var_epi32(top, high, bottom);
    }
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * out_stride, rows[i]);
}

#endif

}  // namespace xlserve
