// Few-row float32 products for XLA:CPU, as an XLA FFI handler (xlkernels/cpu_matmul.py loads it).
//
// out[M, N] = x[M, K] @ w[N, K]^T for M <= 16 rows, the weight stored inputs-last as every CPU matmul
// weight is (model/weight_quant.py). A decode step's products are of this kind: at 16 rows XLA:CPU's
// dots ran at ~100 GFLOP/s where a hand-written register-blocked loop reached 112-120 on the same two
// cores (docs/perf-notes.md, "Ninth session"; measured against XLA in "Tenth session").
//
// The broadcast form: the rows are packed transposed, xt[K, R] (R = 16 or 8 lanes, padded with zeros),
// so one input position's rows are one vector; a block of C output channels keeps C such vectors of
// accumulators in registers and, per input position, multiplies each channel's weight (a broadcast
// scalar from its [N, K] row) into them. Each weight element is loaded once per call and used for all the
// rows; the rows come from L1 (`kInputChunk` positions at a time). C is chosen for the register file
// (AVX-512: 12 channels of 16 or 8 rows; AVX2: 6 channels of 16 rows or 12 of 8). Written with GCC vector
// extensions, so it compiles anywhere (without AVX the vectors are split into SSE or scalar operations)
// and -march=native picks the widest instructions; GCC contracts the multiply-adds into FMAs where the
// target has them.
//
// The output channels are split into tasks for the calling thread and XLA's intra-op threads
// (native_tasks.h).
//
// One row over bfloat16 weights (`--weight-quant bf16`): out[N] = x[K] @ w[N, K]^T with w in bfloat16,
// products and sums in f32. XLA:CPU runs products of 2-16 rows over bf16 weights on the AMX tiles, but
// one row as a slow matrix-vector loop (6x slower than its f32 one at SmolLM2-135M's shapes), while a
// one-row product only has to stream the weight: here each channel's bf16 row is widened to f32 as it is
// read (bf16 is f32's upper half: a shift or a mask), half the bytes of the f32 product.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "native_bf16.h"
#include "native_simd.h"
#include "native_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 16;

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));

// A block's accumulators take 12 vector registers: enough independent FMA chains to cover the FMA latency
// on two ports (4 cycles x 2), and on AVX-512 (12 channels of 16 rows) few enough channels that each
// channel's row pointer stays in a general register (24 spilled them to the stack; 8 and 16 were no
// faster). On AVX2 a 16-row vector is two registers (6 channels), without AVX four (3 channels).
constexpr int kAccumulators = 12;

template <typename V>
constexpr int kChannels = std::max<int>(1, kAccumulators / std::max<int>(1, sizeof(V) / xlserve::kRegisterBytes));

// Output channels per task: a few register blocks, enough tasks to balance two or three threads on the
// smallest weight (576 channels), few enough that handing them out costs nothing.
constexpr int64_t kTaskBlocks = 2;

// Inputs per pass over a task's blocks: 512 positions of 16 rows are 32 KB of packed rows, which stay in
// L1 while the task's blocks pass over them (w_down's 1536 inputs, 96 KB, did not fit: 0.71-0.78x XLA).
constexpr int64_t kInputChunk = 512;
// Each weight row is prefetched (into L2) this many floats ahead, a line per row every 16 positions: the
// hardware prefetcher alone did not keep up with C rows streamed 4 bytes at a time (single-thread on the
// tied head ~30 GFLOP/s; prefetching ~53).
constexpr int64_t kPrefetchAhead = 64;

struct Problem {
  const float* xt;  // [K, lanes], the rows transposed and zero-padded
  const float* w;   // [N, K]
  float* out;       // [M, N]
  int64_t rows, n, k;
};

// out[:, c0 : c0 + C] for one block of C channels over inputs [k0, k1): the accumulators start from
// `partial` unless `first`, and go to `partial` unless `last`, when they are scattered into the output.
template <typename V, int C>
inline void block(const Problem& p, int64_t c0, int64_t k0, int64_t k1, V* partial, bool first, bool last) {
  constexpr int lanes = sizeof(V) / sizeof(float);
  const V* xt = reinterpret_cast<const V*>(p.xt);
  const float* w = p.w + c0 * p.k;
  V acc[C];
#pragma GCC unroll 32
  for (int j = 0; j < C; ++j) acc[j] = first ? V{} : partial[j];
  for (int64_t i = k0; i < k1; ++i) {
    if (i % 16 == 0) {
#pragma GCC unroll 32
      for (int j = 0; j < C; ++j) __builtin_prefetch(w + j * p.k + i + kPrefetchAhead, 0, 1);
    }
    const V x = xt[i];
#pragma GCC unroll 32
    for (int j = 0; j < C; ++j) acc[j] += w[j * p.k + i] * x;
  }
  if (!last) {
#pragma GCC unroll 32
    for (int j = 0; j < C; ++j) partial[j] = acc[j];
    return;
  }
  // The accumulators are the output transposed ([C, lanes]): scatter the real rows.
  float lane[lanes];
#pragma GCC unroll 32
  for (int j = 0; j < C; ++j) {
    std::memcpy(lane, &acc[j], sizeof(lane));
    for (int64_t r = 0; r < p.rows; ++r) p.out[r * p.n + c0 + j] = lane[r];
  }
}

// Channels [c0, c1) (at most one task's), kInputChunk inputs at a time: whole blocks of C, then the rest
// four and one at a time.
template <typename V>
void channels(const Problem& p, int64_t c0, int64_t c1) {
  constexpr int C = kChannels<V>;
  static_assert(kTaskBlocks * C <= 64, "a task's partial sums fit `partial`");
  V partial[64];
  for (int64_t k0 = 0; k0 < p.k; k0 += kInputChunk) {
    const int64_t k1 = std::min<int64_t>(p.k, k0 + kInputChunk);
    const bool first = k0 == 0, last = k1 == p.k;
    int64_t c = c0;
    V* part = partial;
    for (; c + C <= c1; c += C, part += C) block<V, C>(p, c, k0, k1, part, first, last);
    for (; c + 4 <= c1; c += 4, part += 4) block<V, 4>(p, c, k0, k1, part, first, last);
    for (; c < c1; ++c, ++part) block<V, 1>(p, c, k0, k1, part, first, last);
  }
}

// Output channels [c0, c1) of `p`, in rows of 8 lanes (<= 8 rows) or 16.
void task_channels(const Problem& p, bool narrow, int64_t c0, int64_t c1) {
  if (narrow)
    channels<v8>(p, c0, c1);
  else
    channels<v16>(p, c0, c1);
}

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || xd[0] < 1 || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument("rows matmul: expected x [M <= 16, K] and w [N, K]");
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  const bool narrow = m <= 8;  // 8 lanes rather than 16
  const int64_t lanes = narrow ? 8 : 16;
  std::unique_ptr<float, decltype(&std::free)> packed(
      static_cast<float*>(std::aligned_alloc(64, ((k * lanes * sizeof(float) + 63) / 64) * 64)), &std::free);
  if (!packed) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "rows matmul: no memory");
  float* xt = packed.get();
  const float* xs = x.typed_data();
  std::memset(xt, 0, k * lanes * sizeof(float));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) xt[i * lanes + r] = xs[r * k + i];
  const Problem problem{xt, w.typed_data(), out->typed_data(), m, n, k};
  const int64_t per_task = kTaskBlocks * (narrow ? kChannels<v8> : kChannels<v16>);
  xlserve::run_tasks(pool, (n + per_task - 1) / per_task, [&problem, narrow, per_task] {
    return [&problem, narrow, per_task](int64_t task) {
      const int64_t c0 = task * per_task;
      task_channels(problem, narrow, c0, std::min(problem.n, c0 + per_task));
    };
  });
  return ffi::Error::Success();
}

typedef uint32_t v16u __attribute__((vector_size(64)));

// Channels per register block of the one-row bf16 product: each keeps a 16-lane accumulator, summed
// across its lanes at the end.
constexpr int kRowChannels = 8;
constexpr int64_t kRowTaskChannels = 64;

inline v16 as_floats(v16u bits) {
  v16 out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// The row's inputs split by parity: even[m] = x[2m], odd[m] = x[2m + 1].
struct SplitRow {
  const float* even;
  const float* odd;
  const float* x;
};

// out[c0 : c0 + C] for one block of C channels. 32 bf16 weights load as 16 32-bit pairs; shifting each
// pair left by 16 gives the even-indexed weights as f32, masking its low half the odd-indexed ones, so
// no instruction moves data across lanes (zero-extending 16 bf16 to 32 bits took three shuffles a vector).
template <int C>
inline void row_block(const SplitRow& x, const uint16_t* w, float* out, int64_t k, int64_t c0) {
  const uint16_t* rows = w + c0 * k;
  const int64_t whole = k - k % 32;
  v16 acc[C];
#pragma GCC unroll 16
  for (int j = 0; j < C; ++j) acc[j] = v16{};
  for (int64_t i = 0; i < whole; i += 32) {
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) __builtin_prefetch(rows + j * k + i + 2 * kPrefetchAhead, 0, 1);
    v16 even, odd;
    std::memcpy(&even, x.even + i / 2, sizeof(even));
    std::memcpy(&odd, x.odd + i / 2, sizeof(odd));
#pragma GCC unroll 16
    for (int j = 0; j < C; ++j) {
      v16u pairs;
      std::memcpy(&pairs, rows + j * k + i, sizeof(pairs));
      acc[j] += as_floats(pairs << 16) * even + as_floats(pairs & 0xFFFF0000u) * odd;
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < C; ++j) {
    float lane[16];
    std::memcpy(lane, &acc[j], sizeof(lane));
    float sum = 0.0f;
    for (float v : lane) sum += v;
    for (int64_t i = whole; i < k; ++i) sum += x.x[i] * xlserve::widen_bf16(rows[j * k + i]);
    out[c0 + j] = sum;
  }
}

ffi::Error RowMatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                         ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || xd[0] != 1)
    return ffi::Error::InvalidArgument("row matmul bf16: expected x [1, K] and w [N, K]");
  const int64_t k = xd[1], n = wd[0];
  const float* xs = x.typed_data();
  std::unique_ptr<float[]> split(new float[k + 1]);
  const int64_t half = k / 2;
  for (int64_t m = 0; m < half; ++m) {
    split[m] = xs[2 * m];
    split[half + m] = xs[2 * m + 1];
  }
  const SplitRow row{split.get(), split.get() + half, xs};
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(w.typed_data());
  float* os = out->typed_data();
  xlserve::run_tasks(pool, (n + kRowTaskChannels - 1) / kRowTaskChannels, [=, &row] {
    return [=, &row](int64_t task) {
      const int64_t c1 = std::min(n, (task + 1) * kRowTaskChannels);
      int64_t c = task * kRowTaskChannels;
      for (; c + kRowChannels <= c1; c += kRowChannels) row_block<kRowChannels>(row, ws, os, k, c);
      for (; c < c1; ++c) row_block<1>(row, ws, os, k, c);
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlserveRowMatmulBf16, RowMatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [1, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [N, K]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [1, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlserveRowsMatmulF32, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [N, K]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, N]
