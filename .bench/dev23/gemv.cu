// Standalone one-row GEMV timing at Llama-3.1-8B shapes: bf16 weights [K, N] and fp8 e4m3 weights [N, K].
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <cmath>
#include <algorithm>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

__device__ __forceinline__ float bf(uint32_t v, int hi) { return __uint_as_float(hi ? (v & 0xffff0000u) : (v << 16)); }
__device__ __forceinline__ uint4 ldg_stream(const void* p) {
  uint4 r; asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p)); return r; }
__device__ __forceinline__ float2 e4m3x2(uint16_t v) {
  uint32_t h; asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(v));
  float lo, hi; asm("{.reg .f16 a, b; mov.b32 {a, b}, %2; cvt.f32.f16 %0, a; cvt.f32.f16 %1, b;}" : "=f"(lo), "=f"(hi) : "r"(h));
  return make_float2(lo, hi); }

// bf16 [K, N]: a block owns COLS = LPR * 8 columns and all K; lane l reads 8 columns (16 B) of row
// (warp * RPW + l / LPR) + i * ROWS_PER_PASS; partial sums over warps meet in shared memory.
template <int THREADS, int LPR, int U>
__global__ void __launch_bounds__(THREADS) gemv_kn_bf16(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                                      __nv_bfloat16* __restrict__ y, int K, int N) {
  constexpr int COLS = LPR * 8, RPW = 32 / LPR, WARPS = THREADS / 32, RPP = RPW * WARPS;
  extern __shared__ float xs[];  // K
  for (int i = threadIdx.x; i < K; i += THREADS) xs[i] = __bfloat162float(x[i]);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = blockIdx.x * COLS + (lane % LPR) * 8;
  int row = warp * RPW + lane / LPR;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const __nv_bfloat16* base = w + col;
  for (; row + (U - 1) * RPP < K; row += U * RPP) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = ldg_stream(base + (size_t)(row + u * RPP) * N);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float xv = xs[row + u * RPP];
      acc[0] += xv * bf(v[u].x, 0); acc[1] += xv * bf(v[u].x, 1); acc[2] += xv * bf(v[u].y, 0); acc[3] += xv * bf(v[u].y, 1);
      acc[4] += xv * bf(v[u].z, 0); acc[5] += xv * bf(v[u].z, 1); acc[6] += xv * bf(v[u].w, 0); acc[7] += xv * bf(v[u].w, 1);
    }
  }
  for (; row < K; row += RPP) {
    uint4 v = ldg_stream(base + (size_t)row * N); float xv = xs[row];
    acc[0] += xv * bf(v.x, 0); acc[1] += xv * bf(v.x, 1); acc[2] += xv * bf(v.y, 0); acc[3] += xv * bf(v.y, 1);
    acc[4] += xv * bf(v.z, 0); acc[5] += xv * bf(v.z, 1); acc[6] += xv * bf(v.w, 0); acc[7] += xv * bf(v.w, 1);
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
    for (int off = LPR; off < 32; off <<= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
  __syncthreads();
  float* part = xs;  // [WARPS][COLS]
  if (lane < LPR)
    for (int j = 0; j < 8; ++j) part[warp * COLS + lane * 8 + j] = acc[j];
  __syncthreads();
  for (int c = threadIdx.x; c < COLS; c += THREADS) {
    float s = 0; for (int q = 0; q < WARPS; ++q) s += part[q * COLS + c];
    y[blockIdx.x * COLS + c] = __float2bfloat16(s);
  }
}

// fp8 [N, K]: a warp owns CH channels; lane l reads 16 bytes at k = l * 16 + m * 512 of each.
// x sits in shared memory as float4s laid out so that a warp's 32 lanes read 512 contiguous bytes.
template <int WARPS, int CH, int U>
__global__ void __launch_bounds__(WARPS * 32) gemv_nk_fp8(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                                                        const float* __restrict__ scale, __nv_bfloat16* __restrict__ y, int K, int N) {
  extern __shared__ float4 xs4[];  // [K / 512][4][32] float4
  float* xs = reinterpret_cast<float*>(xs4);
  for (int k = threadIdx.x; k < K; k += WARPS * 32) {
    int m = k >> 9, r = k & 511, l = r >> 4, j = r & 15;
    xs[(((m * 4 + (j >> 2)) * 32 + l) << 2) + (j & 3)] = __bfloat162float(x[k]);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * WARPS + warp) * CH;
  float acc[CH];
#pragma unroll
  for (int c = 0; c < CH; ++c) acc[c] = 0;
  const int chunks = K >> 9;
  const uint8_t* base = w + (size_t)n0 * K + lane * 16;
  for (int m = 0; m < chunks; m += U) {
    uint4 v[U][CH];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int c = 0; c < CH; ++c) v[u][c] = (m + u < chunks) ? ldg_stream(base + (size_t)c * K + (m + u) * 512) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (m + u >= chunks) break;
      float4 xq[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) xq[q] = xs4[((m + u) * 4 + q) * 32 + lane];
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        uint32_t words[4] = {v[u][c].x, v[u][c].y, v[u][c].z, v[u][c].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float2 a = e4m3x2(words[q] & 0xffff), b = e4m3x2(words[q] >> 16);
          acc[c] += a.x * xq[q].x + a.y * xq[q].y + b.x * xq[q].z + b.y * xq[q].w;
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    float s = acc[c];
    for (int off = 16; off; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) y[n0 + c] = __float2bfloat16(s * scale[n0 + c]);
  }
}


template <int THREADS, int LPR, int U>
__global__ void __launch_bounds__(THREADS) gemv_kn_bf16_v2(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                                         __nv_bfloat16* __restrict__ y, int K, int N) {
  constexpr int COLS = LPR * 8, RPW = 32 / LPR, WARPS = THREADS / 32, RPP = RPW * WARPS;
  __shared__ float part[WARPS][COLS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int col = blockIdx.x * COLS + (lane % LPR) * 8;
  int row = warp * RPW + lane / LPR;
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const __nv_bfloat16* base = w + col;
  for (; row + (U - 1) * RPP < K; row += U * RPP) {
    uint4 v[U]; float xv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = ldg_stream(base + (size_t)(row + u * RPP) * N);
#pragma unroll
    for (int u = 0; u < U; ++u) xv[u] = __uint_as_float((uint32_t)__ldg(xb + row + u * RPP) << 16);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      acc[0] += xv[u] * bf(v[u].x, 0); acc[1] += xv[u] * bf(v[u].x, 1); acc[2] += xv[u] * bf(v[u].y, 0); acc[3] += xv[u] * bf(v[u].y, 1);
      acc[4] += xv[u] * bf(v[u].z, 0); acc[5] += xv[u] * bf(v[u].z, 1); acc[6] += xv[u] * bf(v[u].w, 0); acc[7] += xv[u] * bf(v[u].w, 1);
    }
  }
  for (; row < K; row += RPP) {
    uint4 v = ldg_stream(base + (size_t)row * N); float xv = __uint_as_float((uint32_t)__ldg(xb + row) << 16);
    acc[0] += xv * bf(v.x, 0); acc[1] += xv * bf(v.x, 1); acc[2] += xv * bf(v.y, 0); acc[3] += xv * bf(v.y, 1);
    acc[4] += xv * bf(v.z, 0); acc[5] += xv * bf(v.z, 1); acc[6] += xv * bf(v.w, 0); acc[7] += xv * bf(v.w, 1);
  }
#pragma unroll
  for (int j = 0; j < 8; ++j)
    for (int off = LPR; off < 32; off <<= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
  if (lane < LPR)
    for (int j = 0; j < 8; ++j) part[warp][lane * 8 + j] = acc[j];
  __syncthreads();
  for (int c = threadIdx.x; c < COLS; c += THREADS) {
    float s = 0; for (int q = 0; q < WARPS; ++q) s += part[q][c];
    y[blockIdx.x * COLS + c] = __float2bfloat16(s);
  }
}

template <int WARPS, int CH, int U>
__global__ void __launch_bounds__(WARPS * 32) gemv_nk_fp8_v2(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                                                           const float* __restrict__ scale, __nv_bfloat16* __restrict__ y, int K, int N) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * WARPS + warp) * CH;
  float acc[CH];
#pragma unroll
  for (int c = 0; c < CH; ++c) acc[c] = 0;
  const int chunks = K >> 9;
  const uint8_t* base = w + (size_t)n0 * K + lane * 16;
  const uint4* xv4 = reinterpret_cast<const uint4*>(x) + lane * 2;  // 16 bf16 = 2 uint4 at k = lane * 16 + m * 512
  for (int m = 0; m < chunks; m += U) {
    uint4 v[U][CH];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int c = 0; c < CH; ++c) v[u][c] = (m + u < chunks) ? ldg_stream(base + (size_t)c * K + (m + u) * 512) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (m + u >= chunks) break;
      uint4 xa = __ldg(xv4 + (m + u) * 64), xb = __ldg(xv4 + (m + u) * 64 + 1);
      uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        uint32_t words[4] = {v[u][c].x, v[u][c].y, v[u][c].z, v[u][c].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float2 a = e4m3x2(words[q] & 0xffff), b = e4m3x2(words[q] >> 16);
          acc[c] += a.x * bf(xw[2 * q], 0) + a.y * bf(xw[2 * q], 1) + b.x * bf(xw[2 * q + 1], 0) + b.y * bf(xw[2 * q + 1], 1);
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    float s = acc[c];
    for (int off = 16; off; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) y[n0 + c] = __float2bfloat16(s * scale[n0 + c]);
  }
}


// v3: fp8 [N, K] with the layer's glue fused: NORM: x = g * bf16(h * rsqrt(mean(h^2) + eps)) computed per block;
// RESID: y = resid + bf16(acc * scale).
template <int WARPS, int CH, int U, bool NORM, bool RESID>
__global__ void __launch_bounds__(WARPS * 32) gemv_nk_fp8_v3(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ g,
    const uint8_t* __restrict__ w, const float* __restrict__ scale, const __nv_bfloat16* __restrict__ resid,
    __nv_bfloat16* __restrict__ y, int K, int N) {
  __shared__ float red[WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * WARPS + warp) * CH;
  const int chunks = K >> 9;
  const uint8_t* base = w + (size_t)n0 * K + lane * 16;
  const uint4* xv4 = reinterpret_cast<const uint4*>(x) + lane * 2;
  const uint4* gv4 = reinterpret_cast<const uint4*>(g) + lane * 2;
  uint4 v[U][CH];
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int c = 0; c < CH; ++c) v[u][c] = (u < chunks) ? ldg_stream(base + (size_t)c * K + u * 512) : make_uint4(0, 0, 0, 0);
  float inv = 1.f;
  if (NORM) {
    float ss = 0;
    for (int i = threadIdx.x; i < K / 8; i += WARPS * 32) {
      uint4 q = __ldg(reinterpret_cast<const uint4*>(x) + i);
      uint32_t ws[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) { float a = bf(ws[j], 0), b = bf(ws[j], 1); ss += a * a + b * b; }
    }
    for (int off = 16; off; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (lane == 0) red[warp] = ss;
    __syncthreads();
    ss = 0;
#pragma unroll
    for (int q = 0; q < WARPS; ++q) ss += red[q];
    inv = rsqrtf(ss / K + 1e-5f);
  }
  float acc[CH];
#pragma unroll
  for (int c = 0; c < CH; ++c) acc[c] = 0;
  for (int m = 0; m < chunks; m += U) {
    if (m) {
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int c = 0; c < CH; ++c) v[u][c] = (m + u < chunks) ? ldg_stream(base + (size_t)c * K + (m + u) * 512) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (m + u >= chunks) break;
      uint4 xa = __ldg(xv4 + (m + u) * 64), xb = __ldg(xv4 + (m + u) * 64 + 1);
      float xf[16];
      uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
      for (int j = 0; j < 16; ++j) xf[j] = bf(xw[j / 2], j & 1);
      if (NORM) {
        uint4 ga = __ldg(gv4 + (m + u) * 64), gb = __ldg(gv4 + (m + u) * 64 + 1);
        uint32_t gw[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
#pragma unroll
        for (int j = 0; j < 16; ++j) xf[j] = __bfloat162float(__float2bfloat16(__bfloat162float(__float2bfloat16(xf[j] * inv)) * bf(gw[j / 2], j & 1)));
      }
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        uint32_t words[4] = {v[u][c].x, v[u][c].y, v[u][c].z, v[u][c].w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float2 a = e4m3x2(words[q] & 0xffff), b = e4m3x2(words[q] >> 16);
          acc[c] += a.x * xf[4 * q] + a.y * xf[4 * q + 1] + b.x * xf[4 * q + 2] + b.y * xf[4 * q + 3];
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    float s = acc[c];
    for (int off = 16; off; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
      float o = s * scale[n0 + c];
      if (RESID) o = __bfloat162float(__float2bfloat16(o)) + __bfloat162float(resid[n0 + c]);
      y[n0 + c] = __float2bfloat16(o);
    }
  }
}

// references: f32, one thread a channel
__global__ void ref_kn(const __nv_bfloat16* x, const __nv_bfloat16* w, float* y, int K, int N) {
  int n = blockIdx.x * blockDim.x + threadIdx.x; if (n >= N) return; float s = 0;
  for (int k = 0; k < K; ++k) s += __bfloat162float(x[k]) * __bfloat162float(w[(size_t)k * N + n]); y[n] = s; }
__global__ void ref_nk(const __nv_bfloat16* x, const uint8_t* w, const float* sc, float* y, int K, int N) {
  int n = blockIdx.x * blockDim.x + threadIdx.x; if (n >= N) return; float s = 0;
  for (int k = 0; k < K; k += 2) { uint16_t p = *(const uint16_t*)(w + (size_t)n * K + k);
    uint32_t h; asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(p));
    __half2 hh = *reinterpret_cast<__half2*>(&h); float2 f = __half22float2(hh);
    s += f.x * __bfloat162float(x[k]) + f.y * __bfloat162float(x[k + 1]); }
  y[n] = s * sc[n]; }

__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xffff) / 65536.0f - 0.5f) * 0.1f); } }
__global__ void fill_u8(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995; h ^= h >> 15;
    uint8_t b = h & 0xff; if ((b & 0x7f) == 0x7f) b = 0x30; p[i] = b; } }

struct Shape { const char* name; int K, N; };
static const Shape shapes[] = {{"wqkv", 4096, 6144}, {"wo", 4096, 4096}, {"w_gate_up", 4096, 28672}, {"w_down", 14336, 4096}};
constexpr int COPIES = 8, REPS = 30;

template <class Launch> float time_it(Launch launch) {
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  for (int c = 0; c < COPIES; ++c) launch(c);
  CK(cudaEventRecord(a));
  for (int r = 0; r < REPS; ++r) for (int c = 0; c < COPIES; ++c) launch(c);
  CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b)); CK(cudaGetLastError());
  float ms; CK(cudaEventElapsedTime(&ms, a, b)); return ms * 1000.f / (REPS * COPIES); }

static float check(const __nv_bfloat16* y, const float* ref, int N) {
  std::vector<__nv_bfloat16> hy(N); std::vector<float> hr(N);
  CK(cudaMemcpy(hy.data(), y, N * 2, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(hr.data(), ref, N * 4, cudaMemcpyDeviceToHost));
  double num = 0, den = 0; for (int i = 0; i < N; ++i) { double d = (double)__bfloat162float(hy[i]) - hr[i]; num += d * d; den += (double)hr[i] * hr[i]; }
  return (float)std::sqrt(num / den); }

template <int THREADS, int LPR, int U> void run_kn(const Shape& s, __nv_bfloat16* x, std::vector<__nv_bfloat16*>& w, __nv_bfloat16* y, float* ref) {
  constexpr int COLS = LPR * 8; int blocks = s.N / COLS; size_t smem = std::max<size_t>(s.K * 4, (THREADS / 32) * COLS * 4);
  auto k = gemv_kn_bf16<THREADS, LPR, U>; CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000));
  CK(cudaMemset(y, 0xff, s.N * 2)); k<<<blocks, THREADS, smem>>>(x, w[0], y, s.K, s.N); CK(cudaDeviceSynchronize());
  float err = check(y, ref, s.N);
  float us = time_it([&](int c) { k<<<blocks, THREADS, smem>>>(x, w[c], y, s.K, s.N); });
  double bytes = (double)s.K * s.N * 2;
  printf("%-10s bf16 [K,N] threads=%3d cols=%3d U=%d blocks=%4d  %7.2f us  %5.2f TB/s  err %.1e\n", s.name, THREADS, COLS, U, blocks, us, bytes / us / 1e6, err); }

template <int WARPS, int CH, int U> void run_nk(const Shape& s, __nv_bfloat16* x, std::vector<uint8_t*>& w, float* sc, __nv_bfloat16* y, float* ref) {
  int blocks = s.N / (WARPS * CH); size_t smem = s.K * 4;
  auto k = gemv_nk_fp8<WARPS, CH, U>; CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000));
  CK(cudaMemset(y, 0xff, s.N * 2)); k<<<blocks, WARPS * 32, smem>>>(x, w[0], sc, y, s.K, s.N); CK(cudaDeviceSynchronize());
  float err = check(y, ref, s.N);
  float us = time_it([&](int c) { k<<<blocks, WARPS * 32, smem>>>(x, w[c], sc, y, s.K, s.N); });
  double bytes = (double)s.K * s.N;
  printf("%-10s fp8  [N,K] warps=%d ch=%d U=%d blocks=%4d  %7.2f us  %5.2f TB/s  err %.1e\n", s.name, WARPS, CH, U, blocks, us, bytes / us / 1e6, err); }


template <int THREADS, int LPR, int U> void run_kn2(const Shape& s, __nv_bfloat16* x, std::vector<__nv_bfloat16*>& w, __nv_bfloat16* y, float* ref) {
  constexpr int COLS = LPR * 8; int blocks = s.N / COLS;
  auto k = gemv_kn_bf16_v2<THREADS, LPR, U>;
  CK(cudaMemset(y, 0xff, s.N * 2)); k<<<blocks, THREADS>>>(x, w[0], y, s.K, s.N); CK(cudaDeviceSynchronize());
  float err = check(y, ref, s.N);
  float us = time_it([&](int c) { k<<<blocks, THREADS>>>(x, w[c], y, s.K, s.N); });
  double bytes = (double)s.K * s.N * 2;
  printf("%-10s bf16 v2 threads=%3d cols=%3d U=%d blocks=%4d  %7.2f us  %5.2f TB/s  err %.1e\n", s.name, THREADS, COLS, U, blocks, us, bytes / us / 1e6, err); }
template <int WARPS, int CH, int U> void run_nk2(const Shape& s, __nv_bfloat16* x, std::vector<uint8_t*>& w, float* sc, __nv_bfloat16* y, float* ref) {
  int blocks = s.N / (WARPS * CH);
  auto k = gemv_nk_fp8_v2<WARPS, CH, U>;
  CK(cudaMemset(y, 0xff, s.N * 2)); k<<<blocks, WARPS * 32>>>(x, w[0], sc, y, s.K, s.N); CK(cudaDeviceSynchronize());
  float err = check(y, ref, s.N);
  float us = time_it([&](int c) { k<<<blocks, WARPS * 32>>>(x, w[c], sc, y, s.K, s.N); });
  double bytes = (double)s.K * s.N;
  printf("%-10s fp8  v2 warps=%d ch=%d U=%d blocks=%4d  %7.2f us  %5.2f TB/s  err %.1e\n", s.name, WARPS, CH, U, blocks, us, bytes / us / 1e6, err); }

template <int WARPS, int CH, int U, bool NORM, bool RESID> void run_nk3(const Shape& s, __nv_bfloat16* x, std::vector<uint8_t*>& w, float* sc, __nv_bfloat16* y, float* ref) {
  int blocks = s.N / (WARPS * CH);
  auto k = gemv_nk_fp8_v3<WARPS, CH, U, NORM, RESID>;
  __nv_bfloat16* resid = x;  // any bf16 vector of >= N? use y2
  __nv_bfloat16* r2; CK(cudaMalloc(&r2, s.N * 2)); CK(cudaMemset(r2, 0, s.N * 2));
  CK(cudaMemset(y, 0xff, s.N * 2)); k<<<blocks, WARPS * 32>>>(x, x, w[0], sc, r2, y, s.K, s.N); CK(cudaDeviceSynchronize());
  float err = (NORM) ? -1.f : check(y, ref, s.N);
  float us = time_it([&](int c) { k<<<blocks, WARPS * 32>>>(x, x, w[c], sc, r2, y, s.K, s.N); });
  double bytes = (double)s.K * s.N; (void)resid; CK(cudaFree(r2));
  printf("%-10s fp8  v3 warps=%d ch=%d U=%d norm=%d resid=%d blocks=%4d  %7.2f us  %5.2f TB/s  err %.1e\n", s.name, WARPS, CH, U, NORM, RESID, blocks, us, bytes / us / 1e6, err); }

int main() {
  for (const Shape& s : shapes) {
    __nv_bfloat16 *x, *y; float *ref, *sc;
    CK(cudaMalloc(&x, s.K * 2)); CK(cudaMalloc(&y, s.N * 2)); CK(cudaMalloc(&ref, s.N * 4)); CK(cudaMalloc(&sc, s.N * 4));
    fill_bf16<<<64, 256>>>(x, s.K, 7);
    std::vector<float> hs(s.N); for (int i = 0; i < s.N; ++i) hs[i] = 0.01f + 0.001f * (i % 17);
    CK(cudaMemcpy(sc, hs.data(), s.N * 4, cudaMemcpyHostToDevice));
    std::vector<__nv_bfloat16*> wb(COPIES); std::vector<uint8_t*> w8(COPIES);
    for (int c = 0; c < COPIES; ++c) { CK(cudaMalloc(&wb[c], (size_t)s.K * s.N * 2)); fill_bf16<<<1024, 256>>>(wb[c], (size_t)s.K * s.N, 100 + c);
                                       CK(cudaMalloc(&w8[c], (size_t)s.K * s.N)); fill_u8<<<1024, 256>>>(w8[c], (size_t)s.K * s.N, 200 + c); }
    ref_kn<<<(s.N + 127) / 128, 128>>>(x, wb[0], ref, s.K, s.N); CK(cudaDeviceSynchronize());
    run_kn<512, 4, 4>(s, x, wb, y, ref); run_kn<256, 8, 4>(s, x, wb, y, ref);
    run_kn2<512, 4, 4>(s, x, wb, y, ref); run_kn2<512, 4, 8>(s, x, wb, y, ref); run_kn2<256, 4, 8>(s, x, wb, y, ref);
    run_kn2<256, 8, 4>(s, x, wb, y, ref); run_kn2<512, 8, 4>(s, x, wb, y, ref); run_kn2<256, 2, 8>(s, x, wb, y, ref);
    run_kn2<512, 2, 8>(s, x, wb, y, ref); run_kn2<1024, 4, 4>(s, x, wb, y, ref); run_kn2<1024, 2, 4>(s, x, wb, y, ref);
    ref_nk<<<(s.N + 127) / 128, 128>>>(x, w8[0], sc, ref, s.K, s.N); CK(cudaDeviceSynchronize());
    run_nk<8, 1, 4>(s, x, w8, sc, y, ref);
    run_nk2<8, 1, 4>(s, x, w8, sc, y, ref); run_nk2<4, 1, 4>(s, x, w8, sc, y, ref); run_nk2<4, 2, 4>(s, x, w8, sc, y, ref);
    run_nk2<8, 2, 2>(s, x, w8, sc, y, ref); run_nk2<8, 2, 4>(s, x, w8, sc, y, ref); run_nk2<4, 4, 2>(s, x, w8, sc, y, ref);
    run_nk2<8, 1, 8>(s, x, w8, sc, y, ref); run_nk2<2, 1, 8>(s, x, w8, sc, y, ref); run_nk2<4, 1, 8>(s, x, w8, sc, y, ref);
    run_nk2<8, 4, 2>(s, x, w8, sc, y, ref);
    run_nk3<8, 1, 4, false, false>(s, x, w8, sc, y, ref); run_nk3<8, 1, 4, true, false>(s, x, w8, sc, y, ref);
    run_nk3<8, 1, 4, false, true>(s, x, w8, sc, y, ref); run_nk3<8, 2, 4, false, false>(s, x, w8, sc, y, ref);
    run_nk3<8, 1, 8, false, false>(s, x, w8, sc, y, ref); run_nk3<4, 2, 4, true, false>(s, x, w8, sc, y, ref);
    for (int c = 0; c < COPIES; ++c) { CK(cudaFree(wb[c])); CK(cudaFree(w8[c])); }
    CK(cudaFree(x)); CK(cudaFree(y)); CK(cudaFree(ref)); CK(cudaFree(sc));
  }
  // copy bandwidth for scale
  size_t n = 1ull << 30; void *a, *b; CK(cudaMalloc(&a, n)); CK(cudaMalloc(&b, n));
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1); cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
  cudaEventRecord(e0); for (int i = 0; i < 10; ++i) cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice); cudaEventRecord(e1); cudaEventSynchronize(e1);
  float ms; cudaEventElapsedTime(&ms, e0, e1); printf("copy %.2f TB/s (read + write)\n", 2.0 * n * 10 / (ms * 1e-3) / 1e12);
}
