// DFL and softmax-integral CUDA kernels, and the backward's row scaling: device code and launch
// geometry (the launchers are softmax_rows.cu).  Kept apart from the launchers so that
// tests/cuda_emulation can compile them for the host and run them on emulated blocks.
//
// The tile kernel (every bin count whose row fits a tile: 2..64 and well beyond): a block takes a
// tile of 32 to 1024 consecutive rows, each of its threads whole rows (1 to 12; see
// rows_geometry).  The tile's rows x bins logits are contiguous in memory, so the block copies
// them into shared memory with coalesced 16-byte loads (single elements where the pointer is not
// 16-byte aligned), converted to the opmath type; each thread then works through its rows there
// -- no lane idles whatever the bin count, and there are no shuffles -- and leaves each row's
// gradient in place, which the block stores with coalesced 16-byte stores.  Each logit is read
// from global memory once, each gradient written once, and the exp of each logit computed once.
// The counts 2..17 and 33 get kernels compiled for their count, which keep the row in registers
// (with_rows_tile_kernel below), the others a kernel for a runtime count that keeps it in shared
// memory and works through two of a thread's rows side by side (tile_row's kRows); rows too long
// for a tile take a warp per row (softmax_rows_warp_kernel).
// benchmarks/cuda_rows_kernel.md has the instruction counts and the bandwidth bound they give.
//
// The per-row math is gfl_math.h's and the CPU kernel's (csrc/cpu/kernels_impl.h), in the same
// order: the row max (for the integral also its lowest bin p, the pivot), sum_j e_j with
// e_j = exp(z_j - max), for the integral sum_j e_j (j - p) so that y_hat - p = sum_j S_j (j - p)
// is formed from exact small integers, then the gradient from the e_j.  A row is reduced by one
// thread in bin order, so its results do not depend on the launch geometry.  The one departure:
// for 16-bit data the tile kernels' exp is the fast one (rows_exp below).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../gfl_math.h"
#include "common.cuh"

namespace gfl::cuda {

// ---------------------------------------------------------------------------------------------
// Tile geometry (host and device).
//
// Row i of a tile lives at tile + i * pitch (opmath elements).  In the per-row passes the 32
// threads of a warp read bin j of 32 rows at once; an access kVec elements wide hits 32 different
// banks when the rows of consecutive threads are an odd number of kVec-element units apart (the
// hardware splits LDS.64 / LDS.128 into half / quarter warps).  So kVec = the largest power of
// two dividing bins, up to 16 bytes, and rows that are a multiple of 32 bytes (float bins 8, 16,
// 24, ...; double 4, 8, ...) get one 16-byte pad, which makes pitch / kVec odd; consecutive
// threads take consecutive rows.  (The kernels compiled for an odd count instead give each thread
// groups of 4 adjacent rows and read them 16 bytes at a time: TileRow's kPhased.)
constexpr int rows_vec(int64_t bins, int acc_size) {
  int vec = 1;
  while (vec * acc_size < 16 && bins % (2 * vec) == 0) vec *= 2;
  return vec;
}

constexpr int64_t rows_pitch(int64_t bins, int acc_size) {
  return bins % (2 * (16 / acc_size)) == 0 ? bins + 16 / acc_size : bins;
}

// A tile takes at most this much shared memory: a few tiles per SM keep tens of KB of loads in
// flight, what HBM needs to reach its bandwidth.
constexpr int64_t kTileBytes = 32 * 1024;

// Rows a thread of the runtime-count kernel works through side by side (tile_row's kRows).
constexpr int kRuntimeRows = 2;

struct RowsGeometry {
  bool tiled;           // false: rows too long for a tile of 32; a warp per row instead
  int pitch;            // shared-memory row pitch, opmath elements
  int vec;              // opmath elements per shared-memory access in the per-row passes
  int block;            // threads per block
  int rows_per_thread;  // a tile is block * rows_per_thread rows
};

// The bin counts with kernels compiled for them (with_rows_tile_kernel; float opmath only): every
// count from 2 to 17 -- 8 is reg_max 7 (NanoDet, PicoDet), 16 Ultralytics', 17 mmdetection's GFL;
// the short ones need the row in registers to reach their bandwidth (benchmarks/
// cuda_rows_kernel.md, Table 4) -- and 32 + 1.  The odd ones take groups of 4 adjacent rows
// (TileRow's kPhased), so their tiles need a multiple of 4 rows per thread.
constexpr bool rows_compiled_count(int64_t bins, int acc_size) {
  return acc_size == 4 && ((bins >= 2 && bins <= 17) || bins == 33);
}

// Tiles of 256 rows (fewer for long rows, at most kTileBytes) on blocks of 64 threads: four rows
// per thread in a 256-row tile, two in a 128-row one, one in a 64-row one (32 rows: 32 threads).
// Four rows per thread spread the per-warp costs of a tile (the kernel's prologue, the tile loop,
// the barriers: ~70 instructions) over 128 rows, and small tiles keep a large launch at many
// more tiles than the GPU holds at once (even load across SMs at the end).  Blocks stay at two
// warps where the tile allows it, though, because a block's threads are what keeps its loads in
// flight (load_tile: kInFlight 16-byte loads each) and what hides its dependent per-row sums:
// with one warp per 128-row tile, shared memory holds 7-12 tiles per SM at 34-63 float bins,
// i.e. 14-24 KB of loads in flight, near the 13-26 KB an H200 needs by Little's law
// (benchmarks/cuda_rows_kernel.md, "Latency"); two warps double that, for 2-8% more issue slots
// per element.  Rows under 8 bins get longer tiles (up to 1024 rows: at least 2048 elements) and
// so more rows per thread, over which the same per-warp and per-thread costs of a tile spread
// (the 16-bit forward at 2, 3, 5, 7 bins, same kernels: 9-24% fewer issue slots per element).
// The compiled odd counts take 4 rows per thread, or 12 for rows under 8 bins: a multiple of 4,
// and an odd number of 4-row groups, so consecutive threads' rows stay an odd number of 16-byte
// units apart (TileRow's kPhased).
inline RowsGeometry rows_geometry(int64_t bins, int acc_size) {
  RowsGeometry g{false, 0, 1, kBlock, 1};
  const int64_t row_bytes = rows_pitch(bins, acc_size) * acc_size;
  if (32 * row_bytes > kTileBytes) return g;
  g.tiled = true;
  g.pitch = static_cast<int>(rows_pitch(bins, acc_size));
  g.vec = rows_vec(bins, acc_size);
  int tile_rows = 256;
  while (tile_rows < 1024 && tile_rows * bins < 2048) tile_rows *= 2;
  while (tile_rows > 32 && tile_rows * row_bytes > kTileBytes) tile_rows /= 2;
  const bool phased = rows_compiled_count(bins, acc_size) && g.vec == 1;  // TileRow::kPhased
  if (phased && tile_rows > 256) {
    g.rows_per_thread = 12;
    g.block = 64;
  } else if (phased) {
    g.rows_per_thread = 4;
    g.block = tile_rows / 4;
  } else {
    g.rows_per_thread = tile_rows >= 64 ? static_cast<int>(tile_rows / 64) : 1;
    g.block = tile_rows / g.rows_per_thread;
  }
  return g;
}

// Dynamic shared memory of a tile kernel launched with `block` threads.
inline size_t rows_shared_bytes(const RowsGeometry& g, int acc_size, int block) {
  return static_cast<size_t>(block) * g.rows_per_thread * g.pitch * acc_size;
}

// ---------------------------------------------------------------------------------------------
// Device helpers.

// e_j = exp(z_j - max) of the rows kernels.  float and double data: gfl_math.h's accurate exp
// (expf: 8 instructions), as the CPU kernel.  16-bit data: common.cuh's fast_expf (2), whose
// error is 2 + floor(1.173 |x|) ulp of float for x = z_j - max <= 0: e_j carries at most
// (2 + 1.173 |x|) ulp(e^x) <= e^x (2 + 1.173 |x|) 2^-23 <= 2^-22 absolute (the product is
// largest at x = 0, where e_j ~ 1 has ulp 2^-24: 2^-23 there), so sum_j e_j, y_hat - p and
// the softmax S_j move by a few float ulp -- eight bits below bf16's rounding of the integral and
// the gradient (fp16: five), and log(sum) of DFL's float loss by < 2e-7 absolute against the 2e-5
// of the loss tolerance (tests/gfl_testing.py).  Flushed results (x < -87.3) are terms below
// 1.2e-38 of a sum >= 1.  It takes 6 of the ~17 issue slots per element of the forward's math,
// which is what the 16-bit forward needs to reach its bandwidth bound on an H200
// (benchmarks/cuda_rows_kernel.md).
template <typename scalar_t>
__device__ __forceinline__ opmath_t<scalar_t> rows_exp(opmath_t<scalar_t> x) {
  if constexpr (sizeof(scalar_t) == 2) {
    return fast_expf(x);
  } else {
    return Ops<opmath_t<scalar_t>>::exp(x);
  }
}

// N values moved as one access (LDG/STG/LDS/STS.64 or .128 when N * sizeof(T) is 8 or 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The warp emulator (tests/cuda_emulation) checks the alignment of every vector access, which a
// host does not need but a GPU does.
#ifndef GFL_CUDA_EMU_CHECK_ALIGNED_TO
#define GFL_CUDA_EMU_CHECK_ALIGNED_TO(ptr, bytes) ((void)0)
#endif

template <typename P>
__device__ __forceinline__ P load_pack(const P* p) {
#ifdef __CUDA_ARCH__
  return *p;
#else
  // on the host, by memcpy: a misaligned access is reported, not a fault of an aligned SSE move
  if constexpr (sizeof(P) > 4) GFL_CUDA_EMU_CHECK_ALIGNED_TO(p, sizeof(P));
  P v;
  std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p), sizeof(P));
  return v;
#endif
}

template <typename P>
__device__ __forceinline__ void store_pack(P* p, const P& v) {
#ifdef __CUDA_ARCH__
  *p = v;
#else
  if constexpr (sizeof(P) > 4) GFL_CUDA_EMU_CHECK_ALIGNED_TO(p, sizeof(P));
  std::memcpy(static_cast<void*>(p), static_cast<const void*>(&v), sizeof(P));
#endif
}

__device__ __forceinline__ uint32_t mulhi_u32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__device__ __forceinline__ float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// max(a, b) where a NaN b gives a (fmaxf / fmax: one FMNMX for float).
template <typename T>
__device__ __forceinline__ T fmax_skip_nan(T a, T b) {
  if constexpr (sizeof(T) == 4) {
    return ::fmaxf(a, b);
  } else {
    return ::fmax(a, b);
  }
}

// 1 / sum for a row's sum of exps, which lies in [1, bins] (the max's own term is exp(0) = 1) or
// is NaN.  In that range the reciprocal's fast path -- MUFU.RCP and one Newton step, what the
// compiler emits for 1.0f / x after checking that x is far from the ends of the exponent range --
// is the correctly rounded quotient, so this is bitwise 1.0f / sum, without the check and the
// call of the slow path.
template <typename T>
__device__ __forceinline__ T reciprocal_of_sum(T sum) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(T) == 4) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(sum));
    return ::fmaf(r, ::fmaf(-sum, r, 1.0f), r);
  }
#endif
  return T(1) / sum;
}

// The row of element f of a tile, f / bins.  For a runtime bin count, one multiply-high by
// floor(2^32 / bins) + 1, which is exact while f * bins < 2^32 (a tile has f < kTileBytes / 4 =
// 2^13 and bins < 2^8).
template <int kBins>
struct RowOf {
  uint32_t mul;
  __device__ __forceinline__ explicit RowOf(int bins)
      : mul(kBins > 0 ? 0u : 0xffffffffu / static_cast<uint32_t>(bins) + 1u) {}
  __device__ __forceinline__ int operator()(int f) const {
    if constexpr (kBins > 0) {
      return static_cast<int>(static_cast<uint32_t>(f) / kBins);
    } else {
      return static_cast<int>(mulhi_u32(static_cast<uint32_t>(f), mul));
    }
  }
};

// 16 bytes of logits -> opmath.  bf16 by hand: a 32-bit word holds two, and each is the high half
// of its float (one shift or one mask each; the compiler's conversion spends two instructions on
// the high one).
template <typename scalar_t, int kG>
__device__ __forceinline__ void unpack16(const Pack<scalar_t, kG>& x,
                                         opmath_t<scalar_t> (&y)[kG]) {
  if constexpr (std::is_same<scalar_t, __nv_bfloat16>::value) {
    Pack<uint32_t, kG / 2> w;  // the same 16 bytes (memcpy: no aliasing; registers on a GPU)
    std::memcpy(static_cast<void*>(&w), static_cast<const void*>(&x), sizeof(w));
#pragma unroll
    for (int k = 0; k < kG / 2; ++k) {
      y[2 * k] = bits_to_float(w.v[k] << 16);
      y[2 * k + 1] = bits_to_float(w.v[k] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kG; ++k) y[k] = to_opmath(x.v[k]);
  }
}

// Copies a tile's `count` logits (row-major from src) into shared memory as opmath values, element
// f at f + row(f) * pad.  Where src is 16-byte aligned: 16-byte loads, consecutive threads on
// consecutive 16 bytes, kInFlight of them issued before the first is stored; a 16-byte group
// never straddles two rows when pad > 0 (bins is then a multiple of the group), so it is stored
// as whole 16-byte chunks.
template <typename scalar_t, typename acc_t, int kBins>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ src, int count, int pad,
                                          RowOf<kBins> row_of, acc_t* tile) {
  constexpr int kG = 16 / sizeof(scalar_t);  // logits per 16-byte load
  constexpr int kA = 16 / sizeof(acc_t);     // opmath values per 16-byte store
  constexpr int kInFlight = 4;
  int vectors = 0;
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    vectors = count / kG;
    const auto* in = reinterpret_cast<const Pack<scalar_t, kG>*>(src);
    const int step = blockDim.x;
    const auto put = [&](int v, const Pack<scalar_t, kG>& x) {
      acc_t y[kG];
      unpack16(x, y);
      const int f = v * kG;
      auto* dst = reinterpret_cast<Pack<acc_t, kA>*>(tile + f + row_of(f) * pad);
#pragma unroll
      for (int h = 0; h < kG / kA; ++h) {
        Pack<acc_t, kA> chunk;
#pragma unroll
        for (int k = 0; k < kA; ++k) chunk.v[k] = y[h * kA + k];
        store_pack(dst + h, chunk);
      }
    };
    int v = threadIdx.x;
    // whole rounds (every thread has kInFlight vectors), then a last, partial one
    for (; v + (kInFlight - 1) * step < vectors; v += kInFlight * step) {
      Pack<scalar_t, kG> x[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) x[u] = load_pack(in + v + u * step);
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) put(v + u * step, x[u]);
    }
    if (v < vectors) {
      Pack<scalar_t, kG> x[kInFlight - 1];
#pragma unroll
      for (int u = 0; u < kInFlight - 1; ++u)
        if (v + u * step < vectors) x[u] = load_pack(in + v + u * step);
#pragma unroll
      for (int u = 0; u < kInFlight - 1; ++u)
        if (v + u * step < vectors) put(v + u * step, x[u]);
    }
  }
  // the misaligned case, and the tail after the last whole 16 bytes
  for (int f = vectors * kG + threadIdx.x; f < count; f += blockDim.x)
    tile[f + row_of(f) * pad] = to_opmath(src[f]);
}

// The reverse of load_tile: the tile's gradient (opmath, padded rows) to dst in storage dtype.
template <typename scalar_t, typename acc_t, int kBins>
__device__ __forceinline__ void store_tile(const acc_t* tile, int count, int pad,
                                           RowOf<kBins> row_of, scalar_t* __restrict__ dst) {
  constexpr int kG = 16 / sizeof(scalar_t);
  constexpr int kA = 16 / sizeof(acc_t);
  int vectors = 0;
  if (reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    vectors = count / kG;
    auto* out = reinterpret_cast<Pack<scalar_t, kG>*>(dst);
    for (int v = threadIdx.x; v < vectors; v += blockDim.x) {
      const int f = v * kG;
      const auto* src = reinterpret_cast<const Pack<acc_t, kA>*>(tile + f + row_of(f) * pad);
      Pack<scalar_t, kG> x;
#pragma unroll
      for (int h = 0; h < kG / kA; ++h) {
        const Pack<acc_t, kA> y = load_pack(src + h);
#pragma unroll
        for (int k = 0; k < kA; ++k) x.v[h * kA + k] = from_opmath<scalar_t>(y.v[k]);
      }
      store_pack(out + v, x);
    }
  }
  for (int f = vectors * kG + threadIdx.x; f < count; f += blockDim.x)
    dst[f] = from_opmath<scalar_t>(tile[f + row_of(f) * pad]);
}

// A thread's row of the tile, accessed kVec bins at a time.  With a compile-time bin count (kBins
// > 0) the row is copied into registers once (every index is a constant after unrolling) and
// written back by flush(); with a runtime one (kBins 0) every pass reads and writes shared memory
// directly.
//
// kPhased: an odd compile-time bin count (kVec = 1).  The copies then go by 16-byte accesses
// from the row's first 16-byte boundary on, with single elements before it and after the last
// one (17 float bins: 5 to 8 accesses instead of 17).  kPhase is where the row starts, in
// elements past a 16-byte boundary: a constant of the instantiation, so that every access is
// fixed at compile time.  The kernel gives thread t the rows rows_per_thread * t + k with
// rows_per_thread = 4 g (g = 1 or 3, rows_geometry), so row k of every thread starts at phase
// (k * bins) % kA, and consecutive threads' rows are g * bins 16-byte units apart, an odd
// number: the 16-byte accesses are conflict-free (the single ones 4-way).
template <typename acc_t, int kBins, int kVec, int kPhase = 0>
struct TileRow {
  using Vec = Pack<acc_t, kVec>;
  static_assert(kBins >= 0 && kBins % kVec == 0, "kVec divides the bin count");
  static constexpr int kA = 16 / sizeof(acc_t);  // elements per 16 bytes
  // Even counts go by their own access width (kVec >= 2), rows t + k * block of a tile: they are
  // conflict-free that way (rows_vec), where 4 adjacent rows of 2 (mod 4) bins would be 2-way
  // conflicted at any multiple of 4 rows per thread.
  static constexpr bool kPhased = kBins > 0 && kVec == 1;
  static constexpr int kRegs = kBins > 0 ? kBins : 1;
  acc_t* row;
  acc_t* cur;  // a runtime count: the bins for_each_vec's pass is at (get / put of row + j)
  acc_t reg[kRegs];

  // kPhase: the row's start, in elements past a 16-byte boundary (the tile is 16-byte aligned)
  __device__ __forceinline__ void attach(acc_t* r) {
    row = r;
    cur = r;
    if constexpr (kPhased) {
      copy<true>();
    } else if constexpr (kBins > 0) {
#pragma unroll
      for (int j = 0; j < kBins; j += kVec)
        put_regs(j, load_pack(reinterpret_cast<const Vec*>(row + j)));
    }
  }
  __device__ __forceinline__ Vec get(int j) const {
    if constexpr (kBins > 0) {
      Vec v;
#pragma unroll
      for (int e = 0; e < kVec; ++e) v.v[e] = reg[j + e];
      return v;
    } else {
      return load_pack(reinterpret_cast<const Vec*>(cur));  // cur is row + j
    }
  }
  __device__ __forceinline__ void put(int j, const Vec& v) {
    if constexpr (kBins > 0) {
      put_regs(j, v);
    } else {
      store_pack(reinterpret_cast<Vec*>(cur), v);
    }
  }
  // A runtime count: for_each_vec's step to the next kVec bins, and back to bin 0 after a pass.
  // (A pointer that walks the row: with row + j, nvcc recomputed both addresses from the index
  // on every trip, 3-4 instructions per trip and row.)
  __device__ __forceinline__ void advance() { cur += kVec; }
  __device__ __forceinline__ void rewind() { cur = row; }
  // registers -> shared memory (there already for a runtime bin count)
  __device__ __forceinline__ void flush() {
    if constexpr (kPhased) {
      copy<false>();
    } else if constexpr (kBins > 0) {
#pragma unroll
      for (int j = 0; j < kBins; j += kVec) store_pack(reinterpret_cast<Vec*>(row + j), get(j));
    }
  }

 private:
  __device__ __forceinline__ void put_regs(int j, const Vec& v) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) reg[j + e] = v.v[e];
  }
  // shared memory <-> registers (kLoad: into registers)
  template <bool kLoad>
  __device__ __forceinline__ void copy() {
    constexpr int kHead = (kA - kPhase) % kA < kBins ? (kA - kPhase) % kA : kBins;
    constexpr int kChunks = (kBins - kHead) / kA;
    using Chunk = Pack<acc_t, kA>;
#pragma unroll
    for (int j = 0; j < kBins; ++j) {
      if (j >= kHead && j < kHead + kChunks * kA) {
        if ((j - kHead) % kA == 0) {
          auto* c = reinterpret_cast<Chunk*>(row + j);
          if constexpr (kLoad) {
            const Chunk v = load_pack(c);
#pragma unroll
            for (int e = 0; e < kA; ++e) reg[j + e] = v.v[e];
          } else {
            Chunk v;
#pragma unroll
            for (int e = 0; e < kA; ++e) v.v[e] = reg[j + e];
            store_pack(c, v);
          }
        }
      } else if constexpr (kLoad) {
        reg[j] = row[j];
      } else {
        row[j] = reg[j];
      }
    }
  }
};

// f(std::integral_constant<int, 0>{}), ..., f(std::integral_constant<int, N - 1>{}).
template <int N, int I = 0, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>{});
    static_for<N, I + 1>(f);
  }
}

// Calls f(j) for j = 0, kVec, 2 kVec, ... < bins: fully unrolled for a compile-time bin count;
// otherwise unrolled to 4 kRows elements per trip (f takes kVec bins of kRows rows), which
// spreads the trip's counter, compare, branch and pointer steps over them, with each row's
// pointer advanced after each call (and rewound after the pass).
template <int kBins, int kVec, int kRows, typename Row, typename F>
__device__ __forceinline__ void for_each_vec(int bins, Row (&rows)[kRows], F&& f) {
  if constexpr (kBins > 0) {
#pragma unroll
    for (int j = 0; j < kBins; j += kVec) f(j);
  } else {
#pragma unroll(kVec >= 4 ? 1 : 4 / kVec)
    for (int j = 0; j < bins; j += kVec) {
      f(j);
#pragma unroll
      for (int k = 0; k < kRows; ++k) rows[k].advance();
    }
#pragma unroll
    for (int k = 0; k < kRows; ++k) rows[k].rewind();
  }
}

// f(k, j, v) with v the kVec bins from bin j of row k, for every j and each of the kRows rows
// (bin by bin, the rows in turn within a bin); kPut: v is written back to the row after f.
template <bool kPut, int kBins, int kVec, int kRows, typename Row, typename F>
__device__ __forceinline__ void for_each_row_vec(int bins, Row (&z)[kRows], F&& f) {
  for_each_vec<kBins, kVec, kRows>(bins, z, [&](int j) {
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      auto v = z[k].get(j);
      f(k, j, v);
      if constexpr (kPut) z[k].put(j, v);
    }
  });
}

// Where a tile's rows read and write their per-row values: pointers advanced to the tile's first
// row (null where absent), and what the launch asks for.
template <typename acc_t, typename out_t>
struct TileIo {
  const acc_t* target;     // DFL targets
  const acc_t* row_scale;  // row i's scale at row_scale[i * row_scale_stride]
  int64_t row_scale_stride;
  out_t* out;
  bool with_out;
  bool with_grad;
  bool with_scale;
};

// kRows rows of the tile -- row r + k * r_step, its logits at srow + k * s_step, k < kRows --
// each one's outputs, and its gradient (scaled by the row's scale) left in place in the tile.
// kPhase as TileRow's.  kRows > 1 (a runtime bin count only) works through the rows side by
// side, bin by bin: the loop over the bins -- its counter, compare, branch and shared-memory
// addresses, about a quarter of the issue slots of the 16-bit forward with one row -- is paid
// once for kRows elements, and there is one remainder per kRows rows instead of one per row.
// Each row's arithmetic and its order are those of the row alone, so the results are bitwise
// those of kRows = 1.
template <typename scalar_t, bool kDfl, int kBins, int kVec, int kPhase = 0, int kRows = 1>
__device__ __forceinline__ void tile_row(
    opmath_t<scalar_t>* srow, int s_step, int bins, int r, int r_step,
    const TileIo<opmath_t<scalar_t>,
                 typename std::conditional<kDfl, opmath_t<scalar_t>, scalar_t>::type>& io) {
  using acc_t = opmath_t<scalar_t>;
  using O = Ops<acc_t>;  // logf for float, log for double (the exp is rows_exp)
  using Vec = Pack<acc_t, kVec>;
  static_assert(kRows == 1 || kBins == 0, "rows side by side: a runtime bin count only");
  const bool with_grad = io.with_grad;
  TileRow<acc_t, kBins, kVec, kPhase> z[kRows];
#pragma unroll
  for (int k = 0; k < kRows; ++k) z[k].attach(srow + k * s_step);

  // Pass 1: the max; the integral's pivot is its lowest bin (strict >: ties keep the lower bin;
  // NaNs fail the comparison and are skipped here, they reach the outputs through exp(NaN - max)).
  acc_t zmax[kRows];
  int pivot[kRows];
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    zmax[k] = -INFINITY;
    pivot[k] = 0;
  }
  for_each_row_vec<false, kBins, kVec>(bins, z, [&](int k, int j, const Vec& v) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if constexpr (kDfl) {
        // no pivot: one max instruction, which also skips NaNs; it may pick +0 over -0 where the
        // comparison keeps the first, which changes no result (z - max and max + log(sum) are
        // the same for either zero)
        zmax[k] = fmax_skip_nan(zmax[k], v.v[e]);
      } else if (v.v[e] > zmax[k]) {
        zmax[k] = v.v[e];
        pivot[k] = j + e;
      }
    }
  });
  acc_t p[kRows];
#pragma unroll
  for (int k = 0; k < kRows; ++k) p[k] = static_cast<acc_t>(pivot[k]);

  // DFL: the target's two bins, read before pass 2 overwrites the logits with their exps.
  int64_t l[kRows];
  acc_t w_l[kRows], w_r[kRows], z_l[kRows], z_r[kRows];
  if constexpr (kDfl) {
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      dfl_split(io.target[r + k * r_step], static_cast<int64_t>(bins - 1), l[k], w_l[k], w_r[k]);
      z_l[k] = z[k].row[l[k]];
      z_r[k] = z[k].row[l[k] + 1];
    }
  }

  // Pass 2: e_j, their sum and (integral) sum_j e_j (j - p), in bin order; e_j replaces z_j (in
  // shared memory only when a gradient follows, in registers always: it is free there).
  acc_t sum[kRows], stat[kRows];
  const auto pass2 = [&](auto keep) {
    [[maybe_unused]] acc_t j_rel[kRows];  // j - p, exact (the integral)
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      sum[k] = acc_t(0);
      stat[k] = acc_t(0);
      j_rel[k] = -p[k];
    }
    for_each_row_vec<decltype(keep)::value, kBins, kVec>(bins, z, [&](int k, int, Vec& v) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const acc_t e_j = rows_exp<scalar_t>(v.v[e] - zmax[k]);
        sum[k] += e_j;
        if constexpr (!kDfl) {
          stat[k] = O::fma(e_j, j_rel[k], stat[k]);
          j_rel[k] += acc_t(1);
        }
        v.v[e] = e_j;
      }
    });
  };
  if (kBins > 0 || with_grad) {
    pass2(std::true_type{});
  } else {
    pass2(std::false_type{});
  }

  acc_t inv_sum[kRows], scale[kRows];
#pragma unroll
  for (int k = 0; k < kRows; ++k) {
    inv_sum[k] = reciprocal_of_sum(sum[k]);
    scale[k] = (with_grad && io.with_scale)
                   ? io.row_scale[(r + k * r_step) * io.row_scale_stride]
                   : acc_t(1);
  }
  if constexpr (kDfl) {
    if (io.with_out) {
#pragma unroll
      for (int k = 0; k < kRows; ++k)
        io.out[r + k * r_step] =
            dfl_loss(zmax[k] + O::log(sum[k]), z_l[k], z_r[k], w_l[k], w_r[k]);
    }
    if (with_grad) {
      // dfl_grad(S_j, j, l, w_l, w_r) is S_j itself (S_j - 0 - 0) off the target's two bins;
      // those two are rewritten after the bulk, their e_j recomputed (the same exp of the same
      // argument: the same value)
      for_each_row_vec<true, kBins, kVec>(bins, z, [&](int k, int, Vec& v) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) v.v[e] = (v.v[e] * inv_sum[k]) * scale[k];
      });
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        z[k].flush();
        const acc_t fl = static_cast<acc_t>(l[k]);
        const acc_t s_l = rows_exp<scalar_t>(z_l[k] - zmax[k]) * inv_sum[k];
        const acc_t s_r = rows_exp<scalar_t>(z_r[k] - zmax[k]) * inv_sum[k];
        z[k].row[l[k]] = dfl_grad<acc_t>(s_l, fl, fl, w_l[k], w_r[k]) * scale[k];
        z[k].row[l[k] + 1] = dfl_grad<acc_t>(s_r, fl + acc_t(1), fl, w_l[k], w_r[k]) * scale[k];
      }
    }
  } else {
    acc_t y_rel[kRows];  // y_hat - p
#pragma unroll
    for (int k = 0; k < kRows; ++k) y_rel[k] = stat[k] * inv_sum[k];
    if (io.with_out) {
#pragma unroll
      for (int k = 0; k < kRows; ++k)
        io.out[r + k * r_step] = from_opmath<scalar_t>(p[k] + y_rel[k]);
    }
    if (with_grad) {
      // dy_hat/dz_j * scale = e_j (c (j - p) - c (y_hat - p)), c = scale / sum
      acc_t c[kRows], neg_c_y[kRows], j_rel[kRows];
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        c[k] = inv_sum[k] * scale[k];
        neg_c_y[k] = -(c[k] * y_rel[k]);
        j_rel[k] = -p[k];
      }
      for_each_row_vec<true, kBins, kVec>(bins, z, [&](int k, int, Vec& v) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          v.v[e] = integral_grad_scaled<acc_t>(v.v[e], j_rel[k], c[k], neg_c_y[k]);
          j_rel[k] += acc_t(1);
        }
      });
#pragma unroll
      for (int k = 0; k < kRows; ++k) z[k].flush();
    }
  }
}

// kBins: the bin count as a constant (row in registers), 0 for a runtime count (row in shared
// memory); kVec = rows_vec(bins, sizeof(opmath)).  Launched with rows_geometry's block (any
// multiple of 32 works) and rows_shared_bytes; `pitch` and `rows_per_thread` are
// rows_geometry's.  The explicit minimum of 1 block per SM lets ptxas take the registers the
// unrolled rows need (up to 128 for 33 bins); with no minimum it aimed lower and spilled.
template <typename scalar_t, bool kDfl, int kBins, int kVec>
__global__ void __launch_bounds__(kBlock, 1)
    softmax_rows_tile_kernel(const scalar_t* __restrict__ pred,
                             const opmath_t<scalar_t>* __restrict__ target,
                             const opmath_t<scalar_t>* __restrict__ row_scale,
                             int64_t row_scale_stride, void* __restrict__ out_ptr,
                             scalar_t* __restrict__ grad, int64_t m, int bins_arg,
                             int pitch_arg, int rows_per_thread) {
  using acc_t = opmath_t<scalar_t>;
  using out_t = typename std::conditional<kDfl, acc_t, scalar_t>::type;
  using Row = TileRow<acc_t, kBins, kVec>;
  static_assert(kBins <= 0 || kVec == rows_vec(kBins, sizeof(acc_t)), "kVec of kBins");
  out_t* out = static_cast<out_t*>(out_ptr);
  const int bins = kBins > 0 ? kBins : bins_arg;
  const int pitch = kBins > 0 ? static_cast<int>(rows_pitch(kBins, sizeof(acc_t))) : pitch_arg;
  const int pad = pitch - bins;
  const RowOf<kBins> row_of(bins);
  GFL_DYNAMIC_SHARED(shared);
  acc_t* tile = reinterpret_cast<acc_t*>(shared);
  TileIo<acc_t, out_t> io{target, row_scale, row_scale_stride, out,
                          out != nullptr, grad != nullptr, row_scale != nullptr};
  const int64_t tile_rows = static_cast<int64_t>(blockDim.x) * rows_per_thread;
  for (int64_t row0 = blockIdx.x * tile_rows; row0 < m; row0 += gridDim.x * tile_rows) {
    const int rows = static_cast<int>(m - row0 < tile_rows ? m - row0 : tile_rows);
    const int count = rows * bins;
    load_tile(pred + row0 * bins, count, pad, row_of, tile);
    io.target = kDfl ? target + row0 : nullptr;
    io.row_scale = io.with_scale ? row_scale + row0 * row_scale_stride : nullptr;
    io.out = io.with_out ? out + row0 : nullptr;
    __syncthreads();
    if constexpr (Row::kPhased) {
      // thread t: rows rows_per_thread * t + k.  rows_per_thread is a multiple of Row::kA (see
      // with_rows_tile_kernel), so row k0 + k of every thread starts (k * bins) % kA elements past
      // a 16-byte boundary: a constant of the unrolled copy, compiled with its own fixed accesses
      for (int k0 = 0; k0 < rows_per_thread; k0 += Row::kA) {
        static_for<Row::kA>([&](auto k) {
          constexpr int kK = decltype(k)::value;
          const int r = static_cast<int>(threadIdx.x) * rows_per_thread + k0 + kK;
          if (r < rows) {
            tile_row<scalar_t, kDfl, kBins, kVec, kK * kBins % Row::kA>(tile + r * pitch, 0,
                                                                         bins, r, 0, io);
          }
        });
      }
    } else {
      // thread t: rows t + k * block (consecutive threads on consecutive rows: the kVec-wide
      // accesses are conflict-free)
      int r = threadIdx.x;
      if constexpr (kBins == 0) {
        // a runtime count: kRuntimeRows rows side by side (rows r + k * block), then the rest
        const int step = static_cast<int>(blockDim.x);
        for (; r + (kRuntimeRows - 1) * step < rows; r += kRuntimeRows * step)
          tile_row<scalar_t, kDfl, 0, kVec, 0, kRuntimeRows>(tile + r * pitch, step * pitch, bins,
                                                             r, step, io);
      }
      for (; r < rows; r += blockDim.x)
        tile_row<scalar_t, kDfl, kBins, kVec>(tile + r * pitch, 0, bins, r, 0, io);
    }
    if (grad) {
      __syncthreads();
      store_tile(tile, count, pad, row_of, grad + row0 * bins);
    }
    __syncthreads();  // the next tile's load overwrites what this one's threads still read
  }
}

// Calls f(&kernel) with the tile kernel for this dtype, op and geometry: a compile-time bin count
// for 2..17 and 33 bins (rows_compiled_count: every count up to Ultralytics' 16 and mmdetection's
// 17 bins, and reg_max 32) with float opmath, unless generic_only; the rest the runtime-count
// kernel of the row's access width.  The odd counts' kernels take groups of 4 adjacent rows
// (TileRow's kPhased), so they need rows_per_thread a multiple of 4.  The launcher and the
// emulator both go through here (and benchmarks/rows_kernel_bounds.py mirrors the choice: a
// kernel it names that was not compiled fails its lookup).
template <typename scalar_t, bool kDfl, typename F>
void with_rows_tile_kernel(int64_t bins, const RowsGeometry& g, bool generic_only, F&& f) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kAcc = sizeof(acc_t);
  if constexpr (kAcc == 4) {
    if (!generic_only && rows_compiled_count(bins, kAcc) &&
        (rows_vec(bins, kAcc) > 1 || g.rows_per_thread % 4 == 0)) {
#define GFL_FIXED_BINS(B) \
  case B: return f(&softmax_rows_tile_kernel<scalar_t, kDfl, B, rows_vec(B, kAcc)>)
      switch (bins) {
        GFL_FIXED_BINS(2);
        GFL_FIXED_BINS(3);
        GFL_FIXED_BINS(4);
        GFL_FIXED_BINS(5);
        GFL_FIXED_BINS(6);
        GFL_FIXED_BINS(7);
        GFL_FIXED_BINS(8);
        GFL_FIXED_BINS(9);
        GFL_FIXED_BINS(10);
        GFL_FIXED_BINS(11);
        GFL_FIXED_BINS(12);
        GFL_FIXED_BINS(13);
        GFL_FIXED_BINS(14);
        GFL_FIXED_BINS(15);
        GFL_FIXED_BINS(16);
        GFL_FIXED_BINS(17);
        GFL_FIXED_BINS(33);
        default: break;
      }
#undef GFL_FIXED_BINS
    }
  }
  switch (rows_vec(bins, kAcc)) {
    case 1: return f(&softmax_rows_tile_kernel<scalar_t, kDfl, 0, 1>);
    case 2: return f(&softmax_rows_tile_kernel<scalar_t, kDfl, 0, 2>);
    default:
      if constexpr (kAcc == 4) return f(&softmax_rows_tile_kernel<scalar_t, kDfl, 0, 4>);
  }
}

// ---------------------------------------------------------------------------------------------
// Rows too long for a tile (rows_geometry().tiled false: over 1 KB, ~250 float bins): a
// group of TPR lanes per row, reduced with shuffles; three passes over the row (the second and
// third re-read it from L1).  The same math, summed in the shuffle tree's order, with the
// accurate exp for every dtype: this fallback is not tuned, and with the fast exp ptxas gave its
// 16-bit sm_80 build a stack frame around the division's slow-path calls.

// Max over a row group's lanes with the bin that holds it: the lowest bin among equal maxima, so
// every lane of the group ends with the same (max, bin) on every run.  A lane that saw no bin (or
// only NaNs, which the comparisons skip; they still reach the outputs through exp(NaN - max))
// holds (-inf, its lane index), which a real bin beats or ties at a lower index.
template <int TPR, typename T>
__device__ __forceinline__ void group_argmax(T& v, int& bin) {
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset /= 2) {
    const T v_other = __shfl_xor_sync(0xffffffffu, v, offset, TPR);
    const int bin_other = __shfl_xor_sync(0xffffffffu, bin, offset, TPR);
    if (v_other > v || (v_other == v && bin_other < bin)) {
      v = v_other;
      bin = bin_other;
    }
  }
}

//   pass 1: the row max (for the integral also its bin p, the pivot);
//   pass 2: sum_j e_j, and for the integral sum_j e_j (j - p); for DFL the logits of the
//           target's bins;
//   pass 3: the gradient, e_j recomputed from the row (re-read from L1).
template <typename scalar_t, int TPR, bool kDfl>
__global__ void __launch_bounds__(kBlock)
    softmax_rows_warp_kernel(const scalar_t* __restrict__ pred,
                             const opmath_t<scalar_t>* __restrict__ target,
                             const opmath_t<scalar_t>* __restrict__ row_scale,
                             int64_t row_scale_stride, void* __restrict__ out_ptr,
                             scalar_t* __restrict__ grad, int64_t m, int64_t bins) {
  using acc_t = opmath_t<scalar_t>;
  using O = Ops<acc_t>;
  using out_t = typename std::conditional<kDfl, acc_t, scalar_t>::type;
  out_t* out = static_cast<out_t*>(out_ptr);
  const RowGroupLoop loop = row_group_loop<TPR>();
  const int lane = loop.lane;
  const int64_t n = bins - 1;
  for (int64_t base = loop.first; base < m; base += loop.stride) {
    const int64_t row = base + loop.offset;
    const bool active = row < m;
    const scalar_t* z = pred + row * bins;
    // pass 1
    acc_t zmax = -INFINITY;
    int pivot = lane;
    if (active) {
      for (int64_t j = lane; j < bins; j += TPR) {
        const acc_t z_j = to_opmath(z[j]);
        if (z_j > zmax) {
          zmax = z_j;
          pivot = static_cast<int>(j);
        }
      }
    }
    group_argmax<TPR>(zmax, pivot);
    // pass 2
    const acc_t p = static_cast<acc_t>(pivot);
    acc_t sum = acc_t(0), stat = acc_t(0), z_r = acc_t(0);
    int64_t l = 0;
    acc_t w_l = acc_t(0), w_r = acc_t(0);
    if (active) {
      if constexpr (kDfl) dfl_split(target[row], n, l, w_l, w_r);
      for (int64_t j = lane; j < bins; j += TPR) {
        const acc_t z_j = to_opmath(z[j]);
        const acc_t e_j = O::exp(z_j - zmax);
        sum += e_j;
        if constexpr (kDfl) {
          if (j == l) stat = z_j;  // z_l
          if (j == l + 1) z_r = z_j;
        } else {
          stat += e_j * (static_cast<acc_t>(j) - p);
        }
      }
    }
    sum = group_sum<TPR>(sum);
    stat = group_sum<TPR>(stat);
    if constexpr (kDfl) z_r = group_sum<TPR>(z_r);
    if (!active) continue;  // no shuffles below
    const acc_t inv_sum = reciprocal_of_sum(sum);
    const acc_t scale = (grad && row_scale) ? row_scale[row * row_scale_stride] : acc_t(1);
    if constexpr (kDfl) {
      if (out && lane == 0) out[row] = dfl_loss(zmax + O::log(sum), stat, z_r, w_l, w_r);
      if (grad) {
        for (int64_t j = lane; j < bins; j += TPR) {
          const acc_t s_j = O::exp(to_opmath(z[j]) - zmax) * inv_sum;
          const acc_t g = dfl_grad<acc_t>(s_j, static_cast<acc_t>(j), static_cast<acc_t>(l),
                                          w_l, w_r);
          grad[row * bins + j] = from_opmath<scalar_t>(g * scale);
        }
      }
    } else {
      const acc_t y_rel = stat * inv_sum;  // y_hat - p
      if (out && lane == 0) out[row] = from_opmath<scalar_t>(p + y_rel);
      if (grad) {
        const acc_t c = inv_sum * scale;
        const acc_t neg_c_y = -(c * y_rel);
        for (int64_t j = lane; j < bins; j += TPR) {
          const acc_t e_j = O::exp(to_opmath(z[j]) - zmax);
          grad[row * bins + j] = from_opmath<scalar_t>(
              integral_grad_scaled<acc_t>(e_j, static_cast<acc_t>(j) - p, c, neg_c_y));
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// out[i] = grad[i] * scale[row(i) * scale_stride] over a (rows, cols) matrix, flat: each thread
// takes 16 bytes at a time (grid-stride) where grad and out share their alignment (the in-place
// call always does), with the elements before the first 16-byte boundary and after the last one
// done one by one; element by element otherwise.  A thread carries its (row, column) from one
// step to the next (one 64-bit division per thread, none per element).  In place (grad == out,
// hence no __restrict__ on them) is safe: each element is read and written by the same thread.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    scale_rows_kernel(const scalar_t* grad, const opmath_t<scalar_t>* __restrict__ scale,
                      int64_t scale_stride, scalar_t* out, int64_t rows, int64_t cols) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kG = 16 / sizeof(scalar_t);
  const int64_t total = rows * cols;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const uintptr_t grad_mis = reinterpret_cast<uintptr_t>(grad) % 16;
  const uintptr_t out_mis = reinterpret_cast<uintptr_t>(out) % 16;
  int64_t head = total, vectors = 0;  // [0, head) one by one, then `vectors` x kG, then the tail
  if (grad_mis == out_mis) {
    head = static_cast<int64_t>((16 - out_mis) % 16 / sizeof(scalar_t));
    if (head > total) head = total;
    vectors = (total - head) / kG;
  }
  const int64_t body_end = head + vectors * kG;
  if (vectors > 0 && thread < vectors) {
    int64_t i = head + thread * kG;
    int64_t r = i / cols, c = i - r * cols;
    const int64_t step = threads * kG;
    const int64_t step_r = step / cols, step_c = step - step_r * cols;
    const auto* in = reinterpret_cast<const Pack<scalar_t, kG>*>(grad + head);
    auto* dst = reinterpret_cast<Pack<scalar_t, kG>*>(out + head);
    for (int64_t v = thread; v < vectors; v += threads) {
      const Pack<scalar_t, kG> x = load_pack(in + v);
      Pack<scalar_t, kG> y;
      if (cols >= kG) {
        // the kG elements lie in row r, or rows r and r + 1 (split at `left`)
        const int64_t left = cols - c;
        const acc_t s0 = scale[r * scale_stride];
        const acc_t s1 = left < kG ? scale[(r + 1) * scale_stride] : s0;
#pragma unroll
        for (int k = 0; k < kG; ++k)
          y.v[k] = from_opmath<scalar_t>(to_opmath(x.v[k]) * (k < left ? s0 : s1));
      } else {
        int64_t rk = r, ck = c;
#pragma unroll
        for (int k = 0; k < kG; ++k) {
          y.v[k] = from_opmath<scalar_t>(to_opmath(x.v[k]) * scale[rk * scale_stride]);
          if (++ck == cols) {
            ck = 0;
            ++rk;
          }
        }
      }
      store_pack(dst + v, y);
      r += step_r;
      c += step_c;
      if (c >= cols) {
        c -= cols;
        ++r;
      }
    }
  }
  if (vectors == 0) {
    // element by element (misaligned, or fewer than kG elements), carrying (row, column)
    if (thread >= total) return;
    int64_t r = thread / cols, c = thread - r * cols;
    const int64_t step_r = threads / cols, step_c = threads - step_r * cols;
    for (int64_t i = thread; i < total; i += threads) {
      out[i] = from_opmath<scalar_t>(to_opmath(grad[i]) * scale[r * scale_stride]);
      r += step_r;
      c += step_c;
      if (c >= cols) {
        c -= cols;
        ++r;
      }
    }
  } else {
    // the head and the tail: fewer than 2 kG elements in all
    const int64_t singles = total - vectors * kG;
    for (int64_t k = thread; k < singles; k += threads) {
      const int64_t i = k < head ? k : body_end + (k - head);
      out[i] = from_opmath<scalar_t>(to_opmath(grad[i]) * scale[i / cols * scale_stride]);
    }
  }
}

}  // namespace gfl::cuda
