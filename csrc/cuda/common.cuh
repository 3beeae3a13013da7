// Device helpers shared by the CUDA kernels: storage <-> opmath conversion, dtype dispatch,
// launch geometry.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "launchers.h"

namespace gfl::cuda {

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

__device__ __forceinline__ float to_opmath(float x) { return x; }
__device__ __forceinline__ double to_opmath(double x) { return x; }
__device__ __forceinline__ float to_opmath(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_opmath(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_opmath(opmath_t<T> x);
template <>
__device__ __forceinline__ float from_opmath<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_opmath<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_opmath<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_opmath<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// exp(x) as ex2.approx.ftz of x log2(e): what __expf is, without the three instructions of the
// subnormal range that __expf gets in a build that does not flush subnormals; 2 instructions
// (FMUL, MUFU.EX2) against expf's 8.  Error 2 + floor(1.173 |x|) ulp (CUDA C Programming Guide,
// Intrinsic Functions); results below 2^-126 (x < -87.3) are flushed to 0.  Where each kernel
// uses it, and why its tolerances hold there, is said at the call (QflOps, rows_exp).  The host
// build calls expf, or GFL_EMULATED_FAST_EXPF where defined: the warp emulator
// (tests/cuda_emulation) defines it as expf off by this error bound, so that its tests check the
// tolerance arguments against the worst case.
__host__ __device__ __forceinline__ float fast_expf(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.44269504088896341f));
  return r;
#elif defined(GFL_EMULATED_FAST_EXPF)
  return GFL_EMULATED_FAST_EXPF(x);
#else
  return ::expf(x);
#endif
}

// log2(x) as lg2.approx.f32 (MUFU.LG2): at most 2 ulp off for x outside [0.5, 2], 2^-22
// absolute inside (CUDA C Programming Guide, Intrinsic Functions, __log2f), so relative to the
// result a few ulp wherever |log2 x| >= 1, i.e. x <= 1/2 -- the only place QflOps uses it; near
// x = 1 the absolute bound is no relative bound at all.  kFtz: the .ftz form (1 instruction),
// which takes a subnormal x as 0 (-inf); without it the compiler scales subnormals first (3
// more).  The host build: log2f, or GFL_EMULATED_FAST_LOG2F where defined (the warp emulator's
// worst case, as for fast_expf).
template <bool kFtz>
__host__ __device__ __forceinline__ float fast_log2f(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  if constexpr (kFtz) {
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  } else {
    asm("lg2.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  }
  return r;
#elif defined(GFL_EMULATED_FAST_LOG2F)
  return GFL_EMULATED_FAST_LOG2F(x, kFtz);
#else
  return ::log2f(kFtz && ::fabsf(x) < 0x1p-126f ? 0.0f : x);
#endif
}

// 2^x as ex2.approx.ftz.f32 (MUFU.EX2, 1 instruction): the instruction CUDA's exp2f runs (2 ulp,
// CUDA C Programming Guide, Mathematical Functions), without exp2f's 3-instruction scaling of
// subnormal results: results below 2^-126 (x < -126) are flushed to 0.  The host build: exp2f
// with that flush, or GFL_EMULATED_FAST_EXP2F where defined (the warp emulator's worst case).
__host__ __device__ __forceinline__ float fast_exp2f(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#elif defined(GFL_EMULATED_FAST_EXP2F)
  return GFL_EMULATED_FAST_EXP2F(x);
#else
  const float r = ::exp2f(x);
  return r < 0x1p-126f ? 0.0f : r;
#endif
}

// 2^x by CUDA's exp2f (MUFU.EX2 with the scaling of subnormal results; 2 ulp over the full range,
// CUDA C Programming Guide, Mathematical Functions).  The host build: exp2f, or
// GFL_EMULATED_EXP2F where defined (the warp emulator's worst case).
__host__ __device__ __forceinline__ float exp2f_2ulp(float x) {
#if defined(__CUDA_ARCH__) || !defined(GFL_EMULATED_EXP2F)
  return ::exp2f(x);
#else
  return GFL_EMULATED_EXP2F(x);
#endif
}

// Expands to `CALL(storage_t)` for the runtime dtype `dt` (a macro keeps this C++17-friendly).
#define GFL_DISPATCH_DTYPE(dt, CALL)                      \
  switch (dt) {                                           \
    case ::gfl::cuda::DType::kFloat: CALL(float); break;  \
    case ::gfl::cuda::DType::kDouble: CALL(double); break; \
    case ::gfl::cuda::DType::kHalf: CALL(__half); break;  \
    case ::gfl::cuda::DType::kBFloat16: CALL(__nv_bfloat16); break; \
  }

constexpr int kBlock = 256;

// Declares `name` as the block's dynamic shared memory (unsigned char[], 16-byte aligned).  The
// warp emulator (tests/cuda_emulation) defines this macro first, to hand out its block's buffer.
#ifndef GFL_DYNAMIC_SHARED
#define GFL_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Blocks for `threads` threads of kBlock each, capped (the kernels loop grid-stride).
inline unsigned int grid_for(int64_t threads) {
  const int64_t blocks = (threads + kBlock - 1) / kBlock;
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// A thread's place in the grid-stride loop over rows of the row kernels, where a group of TPR
// lanes (a power of two dividing 32) takes one row.  The loop runs by warp: every lane of a warp
// has the same `first` and `stride`, so all 32 run the same number of iterations (the shuffles
// need the whole warp); the thread's row is base + offset, which is past the end for some lanes
// in the last iteration.
struct RowGroupLoop {
  int lane;        // the thread's lane within its group
  int64_t first;   // the first group of the thread's warp
  int64_t offset;  // the thread's group within its warp
  int64_t stride;  // groups in the whole grid
};

template <int TPR>
__device__ __forceinline__ RowGroupLoop row_group_loop() {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = (thread / 32) * (32 / TPR);
  return {static_cast<int>(threadIdx.x % TPR), first, thread / TPR - first,
          static_cast<int64_t>(gridDim.x) * blockDim.x / TPR};
}

// Sum over the TPR lanes of a row group (TPR a power of two dividing 32); every lane gets the
// total, in the same order on every run.
template <int TPR, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset, TPR);
  return v;
}

template <int TPR, typename T>
__device__ __forceinline__ T group_max(T v) {
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset, TPR);
    v = other > v ? other : v;
  }
  return v;
}

}  // namespace gfl::cuda
