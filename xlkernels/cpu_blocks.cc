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
// lanes, 16 at a time by one shuffle tree. R is 16 with AVX-512 (4 otherwise: the accumulators must stay in
// registers). The rows are copied into a zero-padded, 64-byte-aligned buffer, each tile's block-interleaved
// ([K / 32][R][32]: a block's inputs for all the tile's rows are contiguous), its last tile rounded up to a
// power of two (an unaligned 64-byte load that crosses two cache lines halved the rate). Any number of rows
// runs, a tile at a time, each tile decoding the weight again (prompt chunks: the decode is ~1/4 of the
// work at 16 rows). Output channels are split into tasks for the calling thread and XLA's intra-op threads
// (native_tasks.h). Rates are in docs/perf-notes.md ("Sixteenth session").

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "native_simd.h"
#include "native_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef int8_t v16s8 __attribute__((vector_size(16)));

constexpr int64_t kBlock = 32;  // weights per GGUF block
constexpr int kMaxTile = xlserve::kRegisterBytes >= 64 ? 16 : 4;  // rows a tile's accumulators hold
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

// Each format decodes one block into its elements 0-15 (`lo`) and 16-31 (`hi`), as gguf's dequantize_blocks.
struct Q4_0 {  // f16 d, 16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble
  static constexpr int64_t kBytes = 18;
  static inline void decode(const uint8_t* block, v16& lo, v16& hi) {
    const float d = block_half(block);
    const v16i qs = widen_unsigned(block + 2);
    lo = (low_nibbles(qs) - 8.0f) * d;
    hi = (high_nibbles(qs) - 8.0f) * d;
  }
};

struct Q4_1 {  // f16 d, f16 m, 16 bytes of nibbles as Q4_0's: w = d * q + m
  static constexpr int64_t kBytes = 20;
  static inline void decode(const uint8_t* block, v16& lo, v16& hi) {
    const float d = block_half(block), m = block_half(block + 2);
    const v16i qs = widen_unsigned(block + 4);
    lo = low_nibbles(qs) * d + m;
    hi = high_nibbles(qs) * d + m;
  }
};

struct Q8_0 {  // f16 d, 32 signed bytes: w = d * q
  static constexpr int64_t kBytes = 34;
  static inline void decode(const uint8_t* block, v16& lo, v16& hi) {
    const float d = block_half(block);
    lo = signed_floats(block + 2) * d;
    hi = signed_floats(block + 18) * d;
  }
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
      default: tile<F, 16>(p, r0, c0, c1, pending); break;
#else
      default: tile<F, 4>(p, r0, c0, c1, pending); break;
#endif
    }
  }
  if (pending.count) pending.flush(p.out);
}

// Rows padded so that every tile is a whole power of two: full tiles, then the rest rounded up.
int64_t padded(int64_t rows) {
  const int64_t whole = rows - rows % kMaxTile, rest = rows % kMaxTile;
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

template <typename F>
ffi::Error BlocksMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                        ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] % kBlock || wd[1] != xd[1] / kBlock * F::kBytes)
    return ffi::Error::InvalidArgument("blocks matmul: expected x [M, K] (K a multiple of 32) and w [N, K/32 blocks]");
  const int64_t m = xd[0], k = xd[1], n = wd[0], rows = padded(m);
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
                                    .Ret<ffi::Buffer<ffi::F32>>()); /* out [M, N] */

XLSERVE_BLOCKS_HANDLER(XlserveBlocksMatmulQ4_0, Q4_0)
XLSERVE_BLOCKS_HANDLER(XlserveBlocksMatmulQ4_1, Q4_1)
XLSERVE_BLOCKS_HANDLER(XlserveBlocksMatmulQ8_0, Q8_0)
