// Intel AMX tiles for the native CPU kernels (cpu_blocks.cc): whether this process may use them, a thread's
// tile configuration, and a 16 x 16 transpose of 32-bit lanes. XLSERVE_TILES is defined only where the
// compiler targets AMX-BF16 and AVX512-BF16 (-march=native on such a CPU); the kernels keep their AVX form
// elsewhere, and wherever the kernel refuses the tiles at run time.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define XLSERVE_TILES 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace xlserve {

// Linux gives a process the tiles' register state only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); asked once a process, the answer kept.
inline bool tiles_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                        18 /* XFEATURE_XTILEDATA */) == 0;
  return permitted;
}

// All eight tiles as 16 rows of 64 bytes on this thread for the scope's life. The configuration is the
// thread's state, released at the end so that other code on XLA's threads (oneDNN) starts from none.
class TileScope {
 public:
  TileScope() {
    alignas(64) uint8_t config[64] = {};
    config[0] = 1;  // palette 1
    for (int tile = 0; tile < 8; ++tile) {
      config[16 + 2 * tile] = 64;  // bytes a row (little-endian 16 bits)
      config[48 + tile] = 16;  // rows
    }
    // GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes, which let it drop the rest of the stores.
    asm volatile("ldtilecfg %0" : : "m"(*reinterpret_cast<const uint8_t(*)[64]>(config)));
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

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

}  // namespace xlserve

#endif
