// Products over weights kept in a GGUF file's own blocks (Q4_0, Q4_1, Q8_0), as an XLA FFI handler
// (xlkernels/cpu_blocks.py loads it).
//
// out[M, N] = x[M, K] @ w^T for float32 rows x and a weight stored as GGUF writes it: each output channel's
// K inputs in blocks of 32, a block holding a float16 scale (and Q4_1 a float16 minimum) and 32 codes of 4 or
// 8 bits. Each block is decoded to float32 exactly as the gguf package's `dequantize` does (the scale times
// the code, plus the minimum: a float16 times a code of at most 8 bits is exact in float32, so a fused
// multiply-add rounds the sum once, as numpy's separate multiply and add do), and multiplied in float32. The
// products are therefore those of the file's float32 weights, at 4.5-8.5 bits a weight read instead of 32.
//
// The dot form: a block's 32 weights, decoded once into two 16-lane vectors, multiply the matching 32 inputs
// of each row of a tile of R rows (R accumulators per channel, C channels at a time), so the rows are read
// straight from their [R, K] layout. At the end of a channel group the accumulators are summed across their
// lanes, 16 at a time by one shuffle tree. R is 16 with AVX-512, or 8 (kMaxTile says where), 4 otherwise (the
// accumulators must stay in registers). The rows are copied into a zero-padded, 64-byte-aligned buffer, each
// tile's block-interleaved ([K / 32][R][32]: a block's inputs for all the tile's rows are contiguous), its last
// tile rounded up to a power of two (an unaligned 64-byte load that crosses two cache lines halved the rate).
// Any number of rows runs, a tile at a time, each tile decoding the weight again (prompt chunks: the decode is
// ~1/4 of the work at 16 rows). Output channels are split into tasks for the calling thread and XLA's intra-op
// threads (native_tasks.h). Rates are in docs/perf-notes.md ("Sixteenth session", "Twentieth session").
//
// Two more forms: the lanes form (below: AVX-512 without AMX, over weights stored in the lanes layout, 16
// channels in a vector's lanes) and the tile form (AMX).

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "native_simd.h"
#include "native_tasks.h"
#include "native_tiles.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef int8_t v16s8 __attribute__((vector_size(16)));

constexpr int64_t kBlock = 32;  // weights per GGUF block
constexpr int64_t kLanes = 16;  // output channels a group of the lanes layout holds (one AVX-512 float vector)
// Rows a tile's accumulators hold: 16 with AVX-512, one channel a group, so each input vector loaded feeds one
// FMA. Where 512-bit operations run as two 256-bit halves (AMD Zen 4, which AVX512-BF16 without AMX stands for
// here), that one load per FMA is what limits: 8 rows and two channels a group load once per two FMAs, and run
// faster there although each block is decoded twice per 16 rows (docs/perf-notes.md, "Twentieth session").
#if defined(__AVX512BF16__) && !defined(__AMX_TILE__)
constexpr int kMaxTile = 8;
#else
constexpr int kMaxTile = xlserve::kRegisterBytes >= 64 ? 16 : 4;
#endif
constexpr int64_t kTaskChannels = 16;

// IEEE half -> float, exact (subnormals included): F16C's conversion, or the bits moved by hand.
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exponent = 113;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

inline float block_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return half_to_float(h);
}

// 16 bytes widened to 32-bit lanes, zero- or sign-extended. GCC's __builtin_convertvector widened them one
// byte at a time (an insert per lane: 6x slower overall); AVX-512 does it in one instruction.
inline v16i widen_unsigned(const uint8_t* bytes) {
#if defined(__AVX512F__)
  return reinterpret_cast<v16i>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
#else
  v16u8 narrow;
  std::memcpy(&narrow, bytes, sizeof(narrow));
  return __builtin_convertvector(narrow, v16i);
#endif
}

inline v16 signed_floats(const uint8_t* bytes) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
#else
  v16s8 narrow;
  std::memcpy(&narrow, bytes, sizeof(narrow));
  return __builtin_convertvector(narrow, v16);
#endif
}

inline v16 low_nibbles(v16i wide) { return __builtin_convertvector(wide & 15, v16); }
inline v16 high_nibbles(v16i wide) { return __builtin_convertvector(wide >> 4, v16); }

#if defined(__AVX512F__)
// The lanes layout's 16 float16s (scales or minimums: one per channel of the group) as floats.
inline __m512 half_lanes(const uint8_t* halves) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves)));
}

// A 4-bit format's 16 channels' code bytes (byte j of each: element j low, j + 16 high) decoded as the channels'
// weights d * q + offset, element by element.
template <typename Use>
inline void nibble_lanes(const uint8_t* codes, __m512 d, __m512 offset, Use use) {
  const __m512i low = _mm512_set1_epi32(15);
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + kLanes * j)));
    use(j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), d, offset));
    use(j + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), d, offset));
  }
}
#endif

// Each format decodes one block into its elements 0-15 (`lo`) and 16-31 (`hi`), as gguf's dequantize_blocks.
struct Q4_0 {  // f16 d, 16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble
  static constexpr int64_t kBytes = 18;
  static constexpr int kCodesAt = 2, kCodeOffset = 8;  // the tile form's view: w = d * (q - 8)
  static constexpr bool kMinimum = false;
  static inline void decode(const uint8_t* block, v16& lo, v16& hi) {
    const float d = block_half(block);
    const v16i qs = widen_unsigned(block + 2);
    lo = (low_nibbles(qs) - 8.0f) * d;
    hi = (high_nibbles(qs) - 8.0f) * d;
  }
#if defined(__AVX512F__)
  // The lanes form's block of 16 channels: use(j, w) for each element j, w its 16 channels' weights. q * d - 8d
  // is (q - 8) * d exactly: both products are exact, and so is their difference (a code of 4 bits times d).
  template <typename Use>
  static inline void lanes(const uint8_t* group_block, Use use) {
    const __m512 d = half_lanes(group_block), offset = _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
    nibble_lanes(group_block + kLanes * kCodesAt, d, offset, use);
  }
#endif
};

struct Q4_1 {  // f16 d, f16 m, 16 bytes of nibbles as Q4_0's: w = d * q + m
  static constexpr int64_t kBytes = 20;
  static constexpr int kCodesAt = 4, kCodeOffset = 0;
  static constexpr bool kMinimum = true;
  static inline void decode(const uint8_t* block, v16& lo, v16& hi) {
    const float d = block_half(block), m = block_half(block + 2);
    const v16i qs = widen_unsigned(block + 4);
    lo = low_nibbles(qs) * d + m;
    hi = high_nibbles(qs) * d + m;
  }
#if defined(__AVX512F__)
  template <typename Use>
  static inline void lanes(const uint8_t* group_block, Use use) {
    nibble_lanes(group_block + kLanes * kCodesAt, half_lanes(group_block), half_lanes(group_block + kLanes * 2), use);
  }
#endif
};

struct Q8_0 {  // f16 d, 32 signed bytes: w = d * q
  static constexpr int64_t kBytes = 34;
  static constexpr int kCodesAt = 2, kCodeOffset = 0;
  static constexpr bool kMinimum = false;
  static inline void decode(const uint8_t* block, v16& lo, v16& hi) {
    const float d = block_half(block);
    lo = signed_floats(block + 2) * d;
    hi = signed_floats(block + 18) * d;
  }
#if defined(__AVX512F__)
  template <typename Use>
  static inline void lanes(const uint8_t* group_block, Use use) {
    const __m512 d = half_lanes(group_block);
#pragma GCC unroll 32
    for (int j = 0; j < kBlock; ++j) {
      const auto* codes = reinterpret_cast<const __m128i*>(group_block + kLanes * (kCodesAt + j));  // byte j of each
      use(j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes))), d));
    }
  }
#endif
};

// out[i] = in[2i] + in[2i + 1] folded in two: the lanes `low` picks from the pair (0-15: in[2i]'s, 16-31:
// in[2i + 1]'s) plus those `high` picks. `count` outputs.
inline void fold_pairs(const v16* in, v16* out, int count, v16i low, v16i high) {
#pragma GCC unroll 8
  for (int i = 0; i < count; ++i)
    out[i] = __builtin_shuffle(in[2 * i], in[2 * i + 1], low) + __builtin_shuffle(in[2 * i], in[2 * i + 1], high);
}

// 16 vectors -> their 16 lane sums, in order: each level adds the two halves of every vector, two vectors'
// halves packed into one, so four levels leave one lane per input vector.
inline v16 lane_sums(const v16* in) {
  v16 level[8], sums;
  fold_pairs(in, level, 8, v16i{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
             v16i{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  fold_pairs(level, level, 4, v16i{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
             v16i{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  fold_pairs(level, level, 2, v16i{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
             v16i{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  fold_pairs(level, &sums, 1, v16i{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
             v16i{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
  return sums;
}

struct Problem {
  const float* x;  // [padded rows, K] as tiles [K / 32][R][32], 64-byte aligned, zero rows past `rows`
  const uint8_t* w;  // [N, K / 32 blocks]
  float* out;  // [rows, N]
  int64_t rows, n, k, row_bytes;
};

// Accumulators waiting to be summed across lanes, with where each sum goes (-1: padding, dropped).
struct Pending {
  v16 acc[16];
  int64_t dest[16];
  int count = 0;

  void flush(float* out) {
    for (int i = count; i < 16; ++i) acc[i] = v16{}, dest[i] = -1;
    float sums[16];
    const v16 s = lane_sums(acc);
    std::memcpy(sums, &s, sizeof(sums));
    for (int i = 0; i < 16; ++i)
      if (dest[i] >= 0) out[dest[i]] = sums[i];
    count = 0;
  }
};

// Channels [c0, c0 + C) over the R rows from r0, blocks [b0, b1): R * C accumulators, one block of each
// channel at a time. They start from `partial` unless `first`, and go back to it unless `last`, when they
// are queued in `pending` to be summed across their lanes.
template <typename F, int R, int C>
inline void group(const Problem& p, int64_t r0, int64_t c0, int64_t b0, int64_t b1, v16* partial, bool first,
                  bool last, Pending& pending) {
  const float* x = p.x + r0 * p.k;  // the tile's rows, block-interleaved: [K / 32][R][32]
  const uint8_t* w = p.w + c0 * p.row_bytes;
  v16 acc[C][R];
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[c][r] = first ? v16{} : partial[c * R + r];
  for (int64_t b = b0; b < b1; ++b) {
    v16 lo[C], hi[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) F::decode(w + c * p.row_bytes + b * F::kBytes, lo[c], hi[c]);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const v16 x0 = *reinterpret_cast<const v16*>(x + (b * R + r) * kBlock);
      const v16 x1 = *reinterpret_cast<const v16*>(x + (b * R + r) * kBlock + 16);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        acc[c][r] += lo[c] * x0;
        acc[c][r] += hi[c] * x1;
      }
    }
  }
  if (!last) {
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) partial[c * R + r] = acc[c][r];
    return;
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      pending.acc[pending.count] = acc[c][r];
      pending.dest[pending.count] = r0 + r < p.rows ? (r0 + r) * p.n + c0 + c : -1;
      if (++pending.count == 16) pending.flush(p.out);
    }
}

// Channels per group for a tile of R rows: R * C accumulators fit the registers beside the decoded weights.
template <int R>
constexpr int kGroupChannels = R >= 16 ? 1 : R >= 8 ? 2 : 4;

// Blocks per pass over a task's channels: the tile's rows for them (R x 32 x 4 bytes a block, at most 32 KB)
// stay in L1 beside the task's partial sums, where a whole row of 1536 inputs (96 KB at 16 rows) was read
// from L2 for every channel (w_down at 16 rows: 52-62 -> 113-139 GFLOP/s on two cores).
template <int R>
constexpr int64_t kChunkBlocks = std::max<int64_t>(1, 32768 / (R * kBlock * 4));

template <typename F, int R>
void tile(const Problem& p, int64_t r0, int64_t c0, int64_t c1, Pending& pending) {
  constexpr int C = kGroupChannels<R>;
  v16 partial[kTaskChannels * R];
  const int64_t blocks = p.k / kBlock, chunks = (blocks + kChunkBlocks<R> - 1) / kChunkBlocks<R>;
  const int64_t chunk = (blocks + chunks - 1) / chunks;  // as even as the chunks can be
  for (int64_t b0 = 0; b0 < blocks; b0 += chunk) {
    const int64_t b1 = std::min(blocks, b0 + chunk);
    const bool first = b0 == 0, last = b1 == blocks;
    int64_t c = c0;
    for (; c + C <= c1; c += C) group<F, R, C>(p, r0, c, b0, b1, partial + (c - c0) * R, first, last, pending);
    for (; c < c1; ++c) group<F, R, 1>(p, r0, c, b0, b1, partial + (c - c0) * R, first, last, pending);
  }
}

template <typename F>
void task_channels(const Problem& p, int64_t padded_rows, int64_t c0, int64_t c1) {
  Pending pending;
  for (int64_t r0 = 0; r0 < padded_rows; r0 += kMaxTile) {
    switch (std::min<int64_t>(kMaxTile, padded_rows - r0)) {
      case 1: tile<F, 1>(p, r0, c0, c1, pending); break;
      case 2: tile<F, 2>(p, r0, c0, c1, pending); break;
      case 4: tile<F, 4>(p, r0, c0, c1, pending); break;
#if defined(__AVX512F__)
      case 8: tile<F, 8>(p, r0, c0, c1, pending); break;
      default: tile<F, kMaxTile>(p, r0, c0, c1, pending); break;
#else
      default: tile<F, 4>(p, r0, c0, c1, pending); break;
#endif
    }
  }
  if (pending.count) pending.flush(p.out);
}

// Rows padded so that every tile of at most `tile` rows is a whole power of two: full tiles, then the rest
// rounded up.
int64_t padded(int64_t rows, int64_t tile_rows = kMaxTile) {
  const int64_t whole = rows - rows % tile_rows, rest = rows % tile_rows;
  int64_t tile = 1;
  while (tile < rest) tile *= 2;
  return whole + (rest ? tile : 0);
}

// The rows x [M, K] into `tiles`: each tile of R rows (kMaxTile, the last one smaller) as [K / 32][R][32],
// the rows past M zero.
void interleave(const float* x, int64_t m, int64_t k, int64_t rows, float* tiles) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxTile) {
    const int64_t tile = std::min<int64_t>(kMaxTile, rows - r0);
    float* out = tiles + r0 * k;
    for (int64_t b = 0; b < k / kBlock; ++b)
      for (int64_t r = 0; r < tile; ++r, out += kBlock) {
        if (r0 + r < m)
          std::memcpy(out, x + (r0 + r) * k + b * kBlock, kBlock * sizeof(float));
        else
          std::memset(out, 0, kBlock * sizeof(float));
      }
  }
}

#if defined(__AVX512F__)
// The lanes form (AVX-512 without AMX: xlkernels/cpu_blocks.py, `lanes_applies`), over weights stored in the lanes
// layout: the output channels in groups of 16, each group's bytes (rows 16g .. 16g + 15 of the [N, K / 32 *
// bytes] array) as [K / 32 blocks][16 * bytes]: a block's 16 float16 scales (Q4_1: then its 16 minimums), then
// its codes byte by byte, byte j of the 16 channels together. So a vector holds one element of 16 channels'
// weights, decoded exactly as the dot form decodes them (the format's `lanes`), and each row's input is broadcast
// into its FMA: a channel's products are summed in its lane, in element order, and no lane sums are left at
// the end. The dot form reads the file's layout, where a group's codes would have to be transposed per block
// (tried: ~79 GFLOP/s against ~108 for this form on one Zen 4 core, and the dot form's ~75).
//
// The rows go in tiles of at most 16 (the last rounded up to a power of two), each [K][R]: an input's R rows
// together, broadcast one by one from L1. Each tile decodes the group's blocks again, as the dot form does.
constexpr int64_t kLanesRows = 16;

struct LanesProblem {
  const float* x;  // the row tiles, each [K][R], zero rows past `rows`
  const uint8_t* w;  // [N / 16][K / 32][16 * bytes]
  float* out;  // [rows, N]
  int64_t rows, n, k;
};

// Which of two accumulators element j of a block adds into, so that consecutive elements alternate (4-bit
// formats visit j then j + 16).
constexpr int alternate(int j) { return (j ^ (j >> 4)) & 1; }

// Group g's 16 channels over the R rows of the tile at r0. With 8 rows or fewer, a row's sums alternate between
// two accumulators, so that each chain of dependent FMAs is half as long.
template <typename F, int R>
void lanes_tile(const LanesProblem& p, int64_t r0, int64_t g) {
  constexpr int S = R <= 8 ? 2 : 1;
  const int64_t blocks = p.k / kBlock;
  const float* x = p.x + r0 * p.k;
  const uint8_t* w = p.w + g * blocks * kLanes * F::kBytes;
  __m512 acc[S][R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[s][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * kBlock * R;
    F::lanes(w + b * kLanes * F::kBytes, [&](int j, __m512 wj) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        __m512& sum = acc[S == 2 ? alternate(j) : 0][r];
        sum = _mm512_fmadd_ps(wj, _mm512_set1_ps(xb[j * R + r]), sum);
      }
    });
  }
  for (int r = 0; r < R && r0 + r < p.rows; ++r)
    _mm512_storeu_ps(p.out + (r0 + r) * p.n + g * kLanes, S == 2 ? _mm512_add_ps(acc[0][r], acc[S - 1][r]) : acc[0][r]);
}

template <typename F>
void lanes_group(const LanesProblem& p, int64_t padded_rows, int64_t g) {
  for (int64_t r0 = 0; r0 < padded_rows; r0 += kLanesRows) {
    switch (std::min(kLanesRows, padded_rows - r0)) {
      case 1: lanes_tile<F, 1>(p, r0, g); break;
      case 2: lanes_tile<F, 2>(p, r0, g); break;
      case 4: lanes_tile<F, 4>(p, r0, g); break;
      case 8: lanes_tile<F, 8>(p, r0, g); break;
      default: lanes_tile<F, 16>(p, r0, g); break;
    }
  }
}

// The rows x [M, K] as the lanes form's tiles ([K][R] each, R = 16 but for the last), zero past M: whole tiles
// by 16 x 16 transposes (K is whole blocks of 32).
void lanes_rows(const float* x, int64_t m, int64_t k, int64_t rows, float* tiles) {
  for (int64_t r0 = 0; r0 < rows; r0 += kLanesRows) {
    const int64_t tile = std::min(kLanesRows, rows - r0);
    float* out = tiles + r0 * k;
    if (tile == kLanesRows && r0 + tile <= m) {
      for (int64_t i = 0; i < k; i += 16)
        xlserve::transpose16(reinterpret_cast<const uint32_t*>(x + r0 * k + i), k,
                             reinterpret_cast<uint32_t*>(out + i * kLanesRows), kLanesRows);
      continue;
    }
    for (int64_t i = 0; i < k; ++i)
      for (int64_t r = 0; r < tile; ++r) out[i * tile + r] = r0 + r < m ? x[(r0 + r) * k + i] : 0.0f;
  }
}

template <typename F>
ffi::Error lanes_matmul(ffi::ThreadPool& pool, const float* x, const uint8_t* w, float* out, int64_t m, int64_t k,
                        int64_t n) {
  if (n % kLanes) return ffi::Error::InvalidArgument("blocks matmul: the lanes layout needs channels in groups of 16");
  const int64_t rows = padded(m, kLanesRows);
  std::unique_ptr<float, decltype(&std::free)> copy(
      static_cast<float*>(std::aligned_alloc(64, ((rows * k * sizeof(float) + 63) / 64) * 64)), &std::free);
  if (!copy) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "blocks matmul: no memory");
  const LanesProblem problem{copy.get(), w, out, m, n, k};
  xlserve::run_tasks_after(pool, n / kLanes, [&problem, rows] {
    return [&problem, rows](int64_t g) { lanes_group<F>(problem, rows, g); };
  }, [&] { lanes_rows(x, m, k, rows, copy.get()); });
  return ffi::Error::Success();
}

#endif  // __AVX512F__

#if defined(XLSERVE_TILES)
// The tile form (AMX), where the CPU has it: float32 arithmetic as in the AVX form, from bfloat16 tiles.
//
// A block's codes are small integers, exact in bfloat16; a float32 input is exactly the sum of three
// bfloat16 parts (8 + 8 + 8 significant bits), and a part times a code is exact in float32. So for each
// block, 16 channels' codes (tile A: [16 channels][32 codes]) times each part of 16 rows' inputs (tile B:
// [16 pairs of inputs][16 rows][2]) accumulate, on the tiles in float32, the block's sum of code times input
// for every channel and row; the block's scale (and Q4_1's minimum times the block's inputs summed) is then
// applied in float32 vectors. The per-block scale is why each block's tile product leaves the tiles: three
// tile products a block, then 32 fused multiply-adds a channel tile. Q4_1's minimum times the block's input sum
// rounds against |minimum| x the inputs' magnitudes, where the AVX form's decoded weights round against |w|.
//
// Codes and inputs pair elements 2i and 2i + 1 in a 32-bit lane (the tiles' layout for bfloat16).

// bfloat16 bits of the codes 0-15 less `offset`, twice over: a lookup by the low 5 bits of a 16-bit lane.
__m512i nibble_table(int offset) {
  alignas(64) uint16_t table[32];
  for (int j = 0; j < 32; ++j) {
    const float code = static_cast<float>((j & 15) - offset);
    uint32_t bits;
    std::memcpy(&bits, &code, sizeof(bits));
    table[j] = static_cast<uint16_t>(bits >> 16);  // exact: at most 4 significant bits
  }
  return _mm512_load_si512(table);
}

// A block's 32 codes as bfloat16, in element order.
template <typename F>
inline __m512i block_codes(const uint8_t* block, __m512i table) {
  const uint8_t* codes = block + F::kCodesAt;
  if constexpr (F::kBytes == Q8_0::kBytes) {
    const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes))));
    const __m512 high =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16))));
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));  // elements 0-15 from `low`
  } else {
    // Elements 0-15 are the low nibbles of the 16 bytes, 16-31 the high ones: the table reads 5 bits, so the
    // high nibble's bits left in a low nibble's lane are ignored, as its entries repeat every 16.
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    const __m512i index = _mm512_inserti64x4(_mm512_castsi256_si512(bytes), _mm256_srli_epi16(bytes, 4), 1);
    return _mm512_permutexvar_epi16(index, table);
  }
}

struct TileProblem {
  const uint32_t* parts;  // [row tiles][K / 32][3 parts][16 pairs][16 rows]: the rows' bfloat16 pairs
  const float* sums;  // [row tiles][K / 32][16 rows]: each block's inputs summed (Q4_1's minimum)
  const uint8_t* w;  // [N, K / 32 blocks]
  float* out;  // [rows, N]
  int64_t rows, n, k, row_bytes;
};

constexpr int64_t kTileParts = 3 * 256;  // 32-bit lanes of a block's three B tiles

// x [M, K] as the tiles' rows, 16 at a time (zero past M): each block's inputs as three bfloat16 parts (x
// less the parts before it, rounded to nearest), and summed. A row's block of a part is one vector of 16
// pairs; the 16 rows' vectors, transposed, are the part's B tile.
void split_rows(const float* x, int64_t m, int64_t k, uint32_t* parts, float* sums) {
  const int64_t blocks = k / kBlock;
  alignas(64) uint32_t rows[3][16][16];  // [part][row][pair]
  alignas(64) v16 row_sums[16];
  for (int64_t r0 = 0; r0 < m; r0 += 16)
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t r = 0; r < 16; ++r) {
        __m512 low = _mm512_setzero_ps(), high = _mm512_setzero_ps();  // elements 0-15, 16-31
        if (r0 + r < m) {
          low = _mm512_loadu_ps(x + (r0 + r) * k + b * kBlock);
          high = _mm512_loadu_ps(x + (r0 + r) * k + b * kBlock + 16);
        }
        row_sums[r] = reinterpret_cast<v16>(_mm512_add_ps(low, high));
        for (int part = 0; part < 3; ++part) {
          const __m512i bf16 = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
          _mm512_store_si512(rows[part][r], bf16);
          const __m512i low_back = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(bf16)), 16);
          const __m512i high_back = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(bf16, 1)), 16);
          low = _mm512_sub_ps(low, _mm512_castsi512_ps(low_back));  // exact: the part's rounding error
          high = _mm512_sub_ps(high, _mm512_castsi512_ps(high_back));
        }
      }
      uint32_t* out = parts + (r0 / 16 * blocks + b) * kTileParts;
      for (int part = 0; part < 3; ++part) xlserve::transpose16(rows[part][0], 16, out + part * 256, 16);
      const v16 sum = lane_sums(row_sums);
      std::memcpy(sums + (r0 / 16 * blocks + b) * 16, &sum, sizeof(sum));
    }
}

constexpr int64_t kPrefetchBlocks = 4;  // how far ahead a channel's next blocks are fetched: the next cache line

// Channels [c, c + count) of block b as tile A's rows (zero past count), with their scales and minimums.
template <typename F>
inline void channel_codes(const TileProblem& p, int64_t c, int64_t count, int64_t b, __m512i table, uint16_t* a,
                          float* scale, float* minimum) {
  const uint8_t* first = p.w + c * p.row_bytes + b * F::kBytes;
  // The 16 blocks' first 4 bytes (the scale, and Q4_1's minimum) in one gather, converted 16 at a time.
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int32_t>(p.row_bytes)));
  const __mmask16 live = count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
  const __m512i heads = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets, first, 1);
  _mm512_store_ps(scale, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(heads)));
  if constexpr (F::kMinimum) _mm512_store_ps(minimum, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(heads, 16))));
  // The task's channels are read a block at a time, 128 rows apart: too many streams for the prefetcher. A line
  // ahead, every block whose successor starts a new line.
  const bool fetch = b + kPrefetchBlocks < p.k / kBlock && (b * F::kBytes) / 64 != ((b + 1) * F::kBytes) / 64;
  for (int64_t ch = 0; ch < 16; ++ch) {
    const uint8_t* block = first + ch * p.row_bytes;
    if (ch >= count) {
      _mm512_store_si512(a + ch * 32, _mm512_setzero_si512());
      continue;
    }
    if (fetch) _mm_prefetch(reinterpret_cast<const char*>(block) + kPrefetchBlocks * F::kBytes, _MM_HINT_T0);
    _mm512_store_si512(a + ch * 32, block_codes<F>(block, table));
  }
}

// acc[channel][row] += scale * the block's tile product (+ minimum * the block's inputs summed).
template <typename F>
inline void scale_into(const float* product, const float* scale, const float* minimum, __m512 sums, float* acc) {
#pragma GCC unroll 16
  for (int ch = 0; ch < 16; ++ch) {
    __m512 sum = _mm512_fmadd_ps(_mm512_set1_ps(scale[ch]), _mm512_load_ps(product + ch * 16),
                                 _mm512_load_ps(acc + ch * 16));
    if constexpr (F::kMinimum) sum = _mm512_fmadd_ps(_mm512_set1_ps(minimum[ch]), sums, sum);
    _mm512_store_ps(acc + ch * 16, sum);
  }
}

constexpr int64_t kTaskTiles = 8;  // channel tiles a task at most

// Channels [c0, c1) (at most kTaskTiles tiles) for every row tile, summed in `acc` ([row tile][channel][row],
// 1 KB a tile: L1 for one row tile, L2 for a prompt chunk's). Blocks go outermost: a block's codes are decoded
// once for all the row tiles, and a row tile's B tiles loaded once for all the channel tiles. Channel tiles
// go in pairs, two chains of tile multiplies at a time. On this VM's Sapphire Rapids cores the tile work and
// the vector work (decoding, scaling) did not overlap whatever their order: a 16-row tile-block costs their
// sum (docs/perf-notes.md, "Seventeenth session").
template <typename F>
void tile_channels(const TileProblem& p, int64_t c0, int64_t c1, float* acc) {
  const xlserve::TileScope scope;
  const __m512i table = nibble_table(F::kCodeOffset);
  const int64_t blocks = p.k / kBlock, row_tiles = (p.rows + 15) / 16, tiles = (c1 - c0 + 15) / 16;
  alignas(64) uint16_t a[kTaskTiles][16 * 32];
  alignas(64) float product[2][256], scale[kTaskTiles][16], minimum[kTaskTiles][16] = {}, rows[256];
  std::memset(acc, 0, row_tiles * tiles * 256 * sizeof(float));
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t tile = 0; tile < tiles; ++tile)
      channel_codes<F>(p, c0 + tile * 16, std::min<int64_t>(16, c1 - c0 - tile * 16), b, table, a[tile], scale[tile],
                       minimum[tile]);
    for (int64_t t = 0; t < row_tiles; ++t) {
      const uint32_t* parts = p.parts + (t * blocks + b) * kTileParts;
      _tile_loadd(2, parts, 64);
      _tile_loadd(3, parts + 256, 64);
      _tile_loadd(4, parts + 512, 64);
      const __m512 sums = _mm512_load_ps(p.sums + (t * blocks + b) * 16);
      float* row_acc = acc + t * tiles * 256;
      for (int64_t tile = 0; tile < tiles; tile += 2) {
        const bool pair = tile + 1 < tiles;
        _tile_loadd(0, a[tile], 64);
        _tile_zero(5);
        _tile_dpbf16ps(5, 0, 2);
        _tile_dpbf16ps(5, 0, 3);
        _tile_dpbf16ps(5, 0, 4);
        if (pair) {
          _tile_loadd(1, a[tile + 1], 64);
          _tile_zero(6);
          _tile_dpbf16ps(6, 1, 2);
          _tile_dpbf16ps(6, 1, 3);
          _tile_dpbf16ps(6, 1, 4);
        }
        _tile_stored(5, product[0], 64);
        scale_into<F>(product[0], scale[tile], minimum[tile], sums, row_acc + tile * 256);
        if (pair) {
          _tile_stored(6, product[1], 64);
          scale_into<F>(product[1], scale[tile + 1], minimum[tile + 1], sums, row_acc + (tile + 1) * 256);
        }
      }
    }
  }
  for (int64_t t = 0; t < row_tiles; ++t)
    for (int64_t tile = 0; tile < tiles; ++tile) {  // [channel][row] -> out's [row][channel]
      xlserve::transpose16(reinterpret_cast<const uint32_t*>(acc + (t * tiles + tile) * 256), 16,
                           reinterpret_cast<uint32_t*>(rows), 16);
      const int64_t c = c0 + tile * 16;
      for (int64_t r = 0; r < std::min<int64_t>(16, p.rows - t * 16); ++r)
        std::memcpy(p.out + (t * 16 + r) * p.n + c, rows + r * 16, std::min<int64_t>(16, c1 - c) * sizeof(float));
    }
}

template <typename F>
ffi::Error tiles_matmul(ffi::ThreadPool& pool, const float* x, const uint8_t* w, float* out, int64_t m, int64_t k,
                        int64_t n, int64_t row_bytes) {
  const int64_t row_tiles = (m + 15) / 16, blocks = k / kBlock;
  std::unique_ptr<uint32_t, decltype(&std::free)> parts(
      static_cast<uint32_t*>(std::aligned_alloc(64, row_tiles * blocks * (kTileParts + 16) * sizeof(uint32_t))),
      &std::free);
  if (!parts) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "blocks matmul: no memory");
  float* sums = reinterpret_cast<float*>(parts.get() + row_tiles * blocks * kTileParts);
  const TileProblem problem{parts.get(), sums, w, out, m, n, k, row_bytes};
  // Tasks of at most kTaskTiles channel tiles, as many as a multiple of the threads, so that they share evenly.
  const int64_t channel_tiles = (n + 15) / 16, threads = std::max<int64_t>(1, pool.num_threads());
  int64_t tasks = (channel_tiles + kTaskTiles - 1) / kTaskTiles;
  tasks = std::min(channel_tiles, (tasks + threads - 1) / threads * threads);
  const int64_t task_channels = (channel_tiles + tasks - 1) / tasks * 16;
  const auto make_worker = [&problem, task_channels, row_tiles] {
    auto acc = std::make_shared<std::vector<v16>>(row_tiles * task_channels);  // this thread's sums, aligned
    return [&problem, task_channels, acc](int64_t task) {
      const int64_t c0 = task * task_channels;
      tile_channels<F>(problem, c0, std::min(problem.n, c0 + task_channels), reinterpret_cast<float*>(acc->data()));
    };
  };
  xlserve::run_tasks_after(pool, (n + task_channels - 1) / task_channels, make_worker,
                           [&] { split_rows(x, m, k, parts.get(), sums); });
  return ffi::Error::Success();
}
#endif  // XLSERVE_TILES

template <typename F>
ffi::Error BlocksMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                        ffi::ResultBuffer<ffi::F32> out, bool tiles, bool lanes) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] % kBlock || wd[1] != xd[1] / kBlock * F::kBytes)
    return ffi::Error::InvalidArgument("blocks matmul: expected x [M, K] (K a multiple of 32) and w [N, K/32 blocks]");
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  if (lanes) {
#if defined(__AVX512F__)
    return lanes_matmul<F>(pool, x.typed_data(), w.typed_data(), out->typed_data(), m, k, n);
#else
    return ffi::Error::InvalidArgument("blocks matmul: the lanes layout needs AVX-512");
#endif
  }
#if defined(XLSERVE_TILES)
  if (tiles && xlserve::tiles_permitted())
    return tiles_matmul<F>(pool, x.typed_data(), w.typed_data(), out->typed_data(), m, k, n, wd[1]);
#endif
  const int64_t rows = padded(m);
  std::unique_ptr<float, decltype(&std::free)> copy(
      static_cast<float*>(std::aligned_alloc(64, ((rows * k * sizeof(float) + 63) / 64) * 64)), &std::free);
  if (!copy) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "blocks matmul: no memory");
  interleave(x.typed_data(), m, k, rows, copy.get());
  const Problem problem{copy.get(), w.typed_data(), out->typed_data(), m, n, k, wd[1]};
  xlserve::run_tasks(pool, (n + kTaskChannels - 1) / kTaskChannels, [&problem, rows] {
    return [&problem, rows](int64_t task) {
      const int64_t c0 = task * kTaskChannels;
      task_channels<F>(problem, rows, c0, std::min(problem.n, c0 + kTaskChannels));
    };
  });
  return ffi::Error::Success();
}

// The whole weight decoded, w u8[N, K / 32 blocks] -> f32[N, K], for products of many rows (prompt chunks),
// which then run as XLA's dot: decoding once per call is cheaper there than once per tile of 16 rows.
template <typename F>
ffi::Error BlocksDecode(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> w, ffi::ResultBuffer<ffi::F32> out) {
  const auto wd = w.dimensions();
  if (wd.size() != 2 || wd[1] % F::kBytes)
    return ffi::Error::InvalidArgument("blocks decode: expected w [N, K/32 blocks]");
  const int64_t n = wd[0], blocks = wd[1] / F::kBytes;
  const uint8_t* ws = w.typed_data();
  float* os = out->typed_data();
  constexpr int64_t kTaskRows = 64;
  xlserve::run_tasks(pool, (n + kTaskRows - 1) / kTaskRows, [=] {
    return [=](int64_t task) {
      for (int64_t row = task * kTaskRows; row < std::min(n, (task + 1) * kTaskRows); ++row)
        for (int64_t b = 0; b < blocks; ++b) {
          v16 lo, hi;
          F::decode(ws + (row * blocks + b) * F::kBytes, lo, hi);
          std::memcpy(os + (row * blocks + b) * kBlock, &lo, sizeof(lo));
          std::memcpy(os + (row * blocks + b) * kBlock + 16, &hi, sizeof(hi));
        }
    };
  });
  return ffi::Error::Success();
}

}  // namespace

#define XLSERVE_DECODE_HANDLER(symbol, format)                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, BlocksDecode<format>,                              \
                                ffi::Ffi::Bind()                                           \
                                    .Ctx<ffi::ThreadPool>()                                \
                                    .Arg<ffi::Buffer<ffi::U8>>()  /* w [N, K/32 blocks] */ \
                                    .Ret<ffi::Buffer<ffi::F32>>()); /* out [N, K] */

XLSERVE_DECODE_HANDLER(XlserveBlocksDecodeQ4_0, Q4_0)
XLSERVE_DECODE_HANDLER(XlserveBlocksDecodeQ4_1, Q4_1)
XLSERVE_DECODE_HANDLER(XlserveBlocksDecodeQ8_0, Q8_0)

#define XLSERVE_BLOCKS_HANDLER(symbol, format)                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, BlocksMatmul<format>,                              \
                                ffi::Ffi::Bind()                                           \
                                    .Ctx<ffi::ThreadPool>()                                \
                                    .Arg<ffi::Buffer<ffi::F32>>() /* x [M, K] */           \
                                    .Arg<ffi::Buffer<ffi::U8>>()  /* w [N, K/32 blocks] */ \
                                    .Ret<ffi::Buffer<ffi::F32>>() /* out [M, N] */         \
                                    .Attr<bool>("tiles")  /* AMX where permitted */        \
                                    .Attr<bool>("lanes")); /* the lanes layout */

XLSERVE_BLOCKS_HANDLER(XlserveBlocksMatmulQ4_0, Q4_0)
XLSERVE_BLOCKS_HANDLER(XlserveBlocksMatmulQ4_1, Q4_1)
XLSERVE_BLOCKS_HANDLER(XlserveBlocksMatmulQ8_0, Q8_0)
