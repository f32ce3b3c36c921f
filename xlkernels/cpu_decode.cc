// Paged decode attention for XLA:CPU, as an XLA FFI handler (xlkernels/cpu_decode.py builds and loads it).
//
// One query token per row; each (row, KV head) pair walks its own pages up to its context and keeps a
// running-max ("online") softmax for the query heads of its group, reading every key and value once,
// straight from the page pool. The XLA loop (xla_attention.py) instead gathers each chunk of pages into
// a new buffer and runs two batched products on it: a 16-row step spent most of its attention time on
// those copies and products (docs/perf-notes.md, "Eighth session").
//
// Layouts (row-major): q f32[B, Hq, D] with head = kv_head * G + g; k_pages, v_pages f32 or bf16[Hkv, P, PS, D]
// (bf16: the CPU's bf16 serving mode, its 16-bit patterns; each page is widened to f32 once, `page_floats`);
// block_tables s32[B, W]; q_positions, kv_lens s32[B]; out f32[B, Hq, D]. A row sees the tokens before
// min(kv_len, q_position + 1); one that sees none comes out as zeros, as from the XLA paths. Page numbers
// are clamped into the pool, as XLA clamps a gather's indices.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "native_bf16.h"
#include "native_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename Page>  // float or uint16_t (bfloat16's bits)
struct Problem {
  const float* q;
  const Page* k;
  const Page* v;
  const int32_t* tables;
  const int32_t* positions;
  const int32_t* lens;
  float* out;
  int64_t rows, kv_heads, group, head_dim, pages, page_size, table_width;
  float scale;
};

// scores[t] = q . keys[t] * scale for n keys of `d` floats. With AVX2 and FMA, eight keys a pass: eight
// vectors of partial sums, then one shuffle tree turns them into the eight scores (a horizontal sum per key
// was most of this loop's work). Elsewhere four keys a pass: four independent sums keep the FMA units busy
// where one dot's chain of dependent adds would wait on each (~4x on Zen 3).
inline void key_scores(const float* q, const float* keys, int64_t n, int64_t d, float scale, float* scores) {
  int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (d % 8 == 0) {
    const __m256 scales = _mm256_set1_ps(scale);
    for (; t + 8 <= n; t += 8) {
      const float* k = keys + t * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 qi = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + d + i), a1);
        a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 2 * d + i), a2);
        a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 3 * d + i), a3);
        a4 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 4 * d + i), a4);
        a5 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 5 * d + i), a5);
        a6 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 6 * d + i), a6);
        a7 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 7 * d + i), a7);
      }
      // hadd(x, y) = [x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7]: two rounds leave each key's
      // sums of lanes 0-3 in the low half and of lanes 4-7 in the high half, in key order.
      const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
      const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                        _mm256_permute2f128_ps(h0123, h4567, 0x31));
      _mm256_storeu_ps(scores + t, _mm256_mul_ps(sums, scales));
    }
  }
#endif
  for (; t + 4 <= n; t += 4) {
    const float *k0 = keys + t * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < d; ++i) {
      s0 += q[i] * k0[i];
      s1 += q[i] * k1[i];
      s2 += q[i] * k2[i];
      s3 += q[i] * k3[i];
    }
    scores[t] = s0 * scale, scores[t + 1] = s1 * scale, scores[t + 2] = s2 * scale, scores[t + 3] = s3 * scale;
  }
  for (; t < n; ++t) {
    const float* k = keys + t * d;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < d; ++i) sum += q[i] * k[i];
    scores[t] = sum * scale;
  }
}

// exp(x) for x <= 0 in a form the compiler vectorizes (glibc's expf is a call per element: at a context of
// 1000 the exponentials were most of the kernel's time). Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2,
// e^r by a degree-6 polynomial, 2^n from the exponent bits; within 2 ulp of expf. Below -87.3 it
// returns ~1e-38 rather than 0: nothing against the sums it joins.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3f);
  // n = x log2(e) rounded to the nearest integer by adding and taking away 1.5 * 2^23 (cephes floors x log2(e) +
  // 0.5, which differs only at exact halves, where |r| is ln2 / 2 either way). std::floor kept GCC from
  // vectorizing the loop that calls this (it may raise the inexact flag): ~1 us of a (row, KV head) pair's ~4.
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// Eight floats as one value: GCC and Clang keep such locals in vector registers (a float array of the same
// size went through the stack on every token, each add waiting on the store before it).
typedef float Floats8 __attribute__((vector_size(32)));

inline Floats8 load8(const float* p) {
  Floats8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// acc [D] += sum over t of weights[t] * values[t] [D]. Four vectors of the accumulators stay in registers
// while the page's values stream past them (the page is in L1 for the group's heads): one load a
// multiply-add. Summed per token for all of D, the accumulators went through memory on every token.
inline void accumulate_values(const float* weights, const float* values, int64_t n, int64_t D, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) {
    Floats8 a0 = load8(acc + d0), a1 = load8(acc + d0 + 8), a2 = load8(acc + d0 + 16), a3 = load8(acc + d0 + 24);
    const float* value = values + d0;
    for (int64_t t = 0; t < n; ++t, value += D) {
      const Floats8 w = Floats8{} + weights[t];
      a0 += w * load8(value), a1 += w * load8(value + 8), a2 += w * load8(value + 16), a3 += w * load8(value + 24);
    }
    std::memcpy(acc + d0, &a0, sizeof a0), std::memcpy(acc + d0 + 8, &a1, sizeof a1);
    std::memcpy(acc + d0 + 16, &a2, sizeof a2), std::memcpy(acc + d0 + 24, &a3, sizeof a3);
  }
  for (int64_t t = 0; t < n && d0 < D; ++t)  // a head size that is no multiple of 32
    for (int64_t d = d0; d < D; ++d) acc[d] += weights[t] * values[t * D + d];
}

// Per-thread scratch: scores [G, PS], running max and sum [G], accumulators [G, D]; for bfloat16 pages, one
// page's keys and values widened [PS, D] each.
struct Scratch {
  std::vector<float> scores, running_max, denominator, acc, keys, values;
  template <typename Page>
  void resize(const Problem<Page>& p) {
    scores.resize(p.group * p.page_size);
    running_max.resize(p.group);
    denominator.resize(p.group);
    acc.resize(p.group * p.head_dim);
    if (!std::is_same_v<Page, float>) keys.resize(p.page_size * p.head_dim), values.resize(p.page_size * p.head_dim);
  }
};

// A page's n x D keys or values as float32: float32 pages as they are; bfloat16 ones widened once into `scratch`
// (16 KB at 64 x 64, in L1 while the group's query heads read it), not once per query head as they are read.
inline const float* page_floats(const float* page, int64_t, std::vector<float>&) { return page; }

inline const float* page_floats(const uint16_t* page, int64_t count, std::vector<float>& scratch) {
  float* out = scratch.data();
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = xlserve::widen_bf16(page[i]);
  return out;
}

template <typename Page>
void attend_pair(const Problem<Page>& p, int64_t pair, Scratch& s) {
  const int64_t row = pair / p.kv_heads, head = pair % p.kv_heads;
  const int64_t G = p.group, D = p.head_dim, PS = p.page_size;
  const int64_t first = (row * p.kv_heads + head) * G * D;  // of this pair's query heads in q and out
  const float* q = p.q + first;
  float* out = p.out + first;
  int64_t bound = std::min<int64_t>(p.lens[row], static_cast<int64_t>(p.positions[row]) + 1);
  bound = std::min(bound, p.table_width * PS);
  if (bound <= 0) {
    std::fill(out, out + G * D, 0.f);
    return;
  }
  std::fill(s.running_max.begin(), s.running_max.end(), -std::numeric_limits<float>::infinity());
  std::fill(s.denominator.begin(), s.denominator.end(), 0.f);
  std::fill(s.acc.begin(), s.acc.end(), 0.f);
  for (int64_t start = 0; start < bound; start += PS) {
    const int64_t page = std::clamp<int64_t>(p.tables[row * p.table_width + start / PS], 0, p.pages - 1);
    const int64_t n = std::min(PS, bound - start);
    const int64_t offset = (head * p.pages + page) * PS * D;
    const float* keys = page_floats(p.k + offset, n * D, s.keys);
    const float* values = page_floats(p.v + offset, n * D, s.values);
    for (int64_t g = 0; g < G; ++g)  // a page's keys (16 KB at 64 x 64) stay in L1 across the group
      key_scores(q + g * D, keys, n, D, p.scale, s.scores.data() + g * PS);
    for (int64_t g = 0; g < G; ++g) {
      float* scores = s.scores.data() + g * PS;
      float page_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : page_max)
      for (int64_t t = 0; t < n; ++t) page_max = std::max(page_max, scores[t]);
      const float new_max = std::max(s.running_max[g], page_max);
      // Earlier pages' sums were taken against a smaller max (exp(-inf) = 0 on the first page).
      const float rescale = std::exp(s.running_max[g] - new_max);
      s.denominator[g] *= rescale;
      float* acc = s.acc.data() + g * D;
      for (int64_t d = 0; d < D; ++d) acc[d] *= rescale;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {
        scores[t] = exp_nonpositive(scores[t] - new_max);
        sum += scores[t];
      }
      s.denominator[g] += sum;
      s.running_max[g] = new_max;
    }
    for (int64_t g = 0; g < G; ++g) accumulate_values(s.scores.data() + g * PS, values, n, D, s.acc.data() + g * D);
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inverse = 1.f / s.denominator[g];
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = s.acc[g * D + d] * inverse;
  }
}

template <ffi::DataType PageType>
ffi::Error PagedDecode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<PageType> k_pages,
                       ffi::Buffer<PageType> v_pages, ffi::Buffer<ffi::S32> block_tables,
                       ffi::Buffer<ffi::S32> q_positions, ffi::Buffer<ffi::S32> kv_lens, float scale,
                       ffi::ResultBuffer<ffi::F32> out) {
  using Page = ffi::NativeType<PageType>;
  const auto qd = q.dimensions();
  const auto kd = k_pages.dimensions();
  const auto td = block_tables.dimensions();
  const auto vd = v_pages.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("paged decode: expected q [B, Hq, D], pages [Hkv, P, PS, D], tables [B, W]");
  if (qd[1] % kd[0] != 0 || qd[2] != kd[3] || td[0] != qd[0])
    return ffi::Error::InvalidArgument("paged decode: q, pages and tables disagree on heads, head size or rows");
  const Problem<Page> problem{q.typed_data(),        k_pages.typed_data(), v_pages.typed_data(),
                              block_tables.typed_data(), q_positions.typed_data(), kv_lens.typed_data(),
                              out->typed_data(),     qd[0],                kd[0],
                              qd[1] / kd[0],         qd[2],                kd[1],
                              kd[2],                 td[1],                scale};
  // A task is one (row, KV head) pair; each thread keeps its own scratch.
  xlserve::run_tasks(pool, qd[0] * kd[0], [&problem] {
    Scratch scratch;
    scratch.resize(problem);
    return [&problem, scratch = std::move(scratch)](int64_t pair) mutable { attend_pair(problem, pair, scratch); };
  });
  return ffi::Error::Success();
}

template <ffi::DataType PageType>
auto PagedDecodeBinding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()   // q
      .template Arg<ffi::Buffer<PageType>>()   // k_pages
      .template Arg<ffi::Buffer<PageType>>()   // v_pages
      .template Arg<ffi::Buffer<ffi::S32>>()   // block_tables
      .template Arg<ffi::Buffer<ffi::S32>>()   // q_positions
      .template Arg<ffi::Buffer<ffi::S32>>()   // kv_lens
      .template Attr<float>("scale")
      .template Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(XlservePagedDecodeF32, PagedDecode<ffi::F32>, PagedDecodeBinding<ffi::F32>());
// bfloat16 pages arrive as their 16-bit patterns (xlkernels/kv_quant.py, BF16_BITS).
XLA_FFI_DEFINE_HANDLER_SYMBOL(XlservePagedDecodeBf16, PagedDecode<ffi::U16>, PagedDecodeBinding<ffi::U16>());
