// Intel AMX tiles for the native CPU kernels (cpu_blocks.cc): whether this process may use them, and a thread's
// tile configuration. XLSERVE_TILES is defined only where the
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

}  // namespace xlserve

#endif
