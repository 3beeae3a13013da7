// The gfl-ops CUDA kernels (csrc/cuda/*_kernel.cuh) compiled for the host and run on the warp
// emulator (warp_emulator.h), behind a C interface for tests/test_cuda_emulated.py (ctypes).
//
// Every entry point takes the launch description of csrc/cuda/launchers.h, plus the kernel
// variant and the emulated grid (QFL: an options struct, see gfl_emu_qfl); it returns 0, or 1
// with the error in gfl_emu_error().
#include <cmath>
#include <cstdint>
#include <cstring>

#include "warp_emulator.h"

// The QFL kernel's 16-byte accesses fault on a GPU unless 16-byte aligned: here a misaligned one
// is recorded as the block's error.
inline void gfl_emu_check_aligned(const void* p) {
  warp_emu::Block* b = warp_emu::active_block();
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0 && b != nullptr && b->error.empty())
    b->error = "misaligned 16-byte access";
}
#define GFL_CUDA_EMU_CHECK_ALIGNED(ptr) gfl_emu_check_aligned(ptr)

// common.cuh's fast_expf (ex2.approx.ftz of x log2 e on a GPU) with its documented error made
// adversarial: exp(x) off by the bound's 2 + floor(1.173 |x|) ulp -- taken as the larger
// 2^-23 relative per ulp -- in a direction that varies with x's bits, and results below 2^-126
// flushed to 0 as .ftz does.  exp(0) stays 1 (the hardware gives 2^0 exactly).  So the emulated
// tests check the tolerance argument of every kernel that uses the fast exp (QflOps, rows_exp)
// against the worst error the Programming Guide allows, not against libm's exact-ish expf.
inline float gfl_emu_fast_expf(float x) {
  const float e = std::exp(x);
  if (x == 0.0f || !std::isfinite(e)) return e;
  if (e < 0x1p-126f) return 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const float ulps = 2.0f + std::floor(1.173f * std::fabs(x));
  const float sign = ((bits * 2654435761u) >> 31) != 0u ? 1.0f : -1.0f;
  return e * (1.0f + sign * ulps * 0x1p-23f);
}
#define GFL_EMULATED_FAST_EXPF(x) gfl_emu_fast_expf(x)

// common.cuh's fast_log2f (lg2.approx) made adversarial the same way: log2(x) off by its bound,
// 2 ulp outside [0.5, 2] and 2^-22 absolute inside, in a direction that varies with x's bits;
// .ftz (kFtz) takes a subnormal x as 0.  Powers of two are perturbed too (the 1/2 where QflOps
// changes method among them).  Normal x gives the same value with and without kFtz, as on the
// GPU.
inline float gfl_emu_fast_log2f(float x, bool ftz) {
  if (ftz && std::fabs(x) < 0x1p-126f) x = 0.0f;
  const float r = std::log2(x);
  if (!std::isfinite(r)) return r;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const float sign = ((bits * 2246822519u) >> 31) != 0u ? 1.0f : -1.0f;
  const bool absolute = x >= 0.5f && x <= 2.0f;
  return absolute ? r + sign * 0x1p-22f : r * (1.0f + sign * 2.0f * 0x1p-23f);
}
#define GFL_EMULATED_FAST_LOG2F(x, ftz) gfl_emu_fast_log2f(x, ftz)

// common.cuh's exp2f_2ulp (CUDA's exp2f, 2 ulp) off by its 2 ulp, direction varying with x.
inline float gfl_emu_exp2f(float x) {
  const float r = std::exp2(x);
  if (!std::isfinite(r) || r == 0.0f) return r;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const float sign = ((bits * 3266489917u) >> 31) != 0u ? 1.0f : -1.0f;
  return r * (1.0f + sign * 2.0f * 0x1p-23f);
}
#define GFL_EMULATED_EXP2F(x) gfl_emu_exp2f(x)

// common.cuh's fast_exp2f (ex2.approx.ftz): exp2f's worst case above, results below 2^-126
// flushed to 0 as .ftz does.
inline float gfl_emu_fast_exp2f(float x) {
  const float r = gfl_emu_exp2f(x);
  return r < 0x1p-126f ? 0.0f : r;
}
#define GFL_EMULATED_FAST_EXP2F(x) gfl_emu_fast_exp2f(x)

#include "cuda/qfl_kernel.cuh"
#include "cuda/softmax_rows_kernel.cuh"

namespace {

using gfl::cuda::opmath_t;

std::string last_error;

// Calls f(storage_t{}, std::integral_constant<int, TPR>{}) for the launch's dtype and a TPR in
// {1, 2, 4, 8, 16, 32}; a bad value is recorded in last_error.
template <typename F>
void dispatch(gfl::cuda::DType dtype, int tpr, F&& f) {
  const auto with_lanes = [&](auto storage) {
    switch (tpr) {
      case 1: return f(storage, std::integral_constant<int, 1>{});
      case 2: return f(storage, std::integral_constant<int, 2>{});
      case 4: return f(storage, std::integral_constant<int, 4>{});
      case 8: return f(storage, std::integral_constant<int, 8>{});
      case 16: return f(storage, std::integral_constant<int, 16>{});
      case 32: return f(storage, std::integral_constant<int, 32>{});
      default: last_error = "lanes per row must be a power of two up to 32";
    }
  };
  switch (dtype) {
    case gfl::cuda::DType::kFloat: return with_lanes(float{});
    case gfl::cuda::DType::kDouble: return with_lanes(double{});
    case gfl::cuda::DType::kHalf: return with_lanes(__half{});
    case gfl::cuda::DType::kBFloat16: return with_lanes(__nv_bfloat16{});
  }
  last_error = "unknown dtype";
}

void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
  warp_emu::launch(grid, block, body, last_error);
}

int status() { return last_error.empty() ? 0 : 1; }

}  // namespace

extern "C" {

const char* gfl_emu_error() { return last_error.c_str(); }

// variant: 0 the launcher's kernel for the bin count, 1 the runtime-bin-count tile kernel, 2 the
// warp-per-row kernel (the launcher's for rows too long for a tile).  block 0: the launcher's
// block; grid 0: the launcher's grid (one block per tile; for variant 2 one warp per row).
int gfl_emu_rows(const gfl::cuda::RowsLaunch* p, int variant, unsigned grid, unsigned block) {
  last_error.clear();
  dispatch(p->dtype, 1, [&](auto storage, auto) {
    using scalar_t = decltype(storage);
    using acc_t = opmath_t<scalar_t>;
    const auto* pred = static_cast<const scalar_t*>(p->pred);
    const auto* target = static_cast<const acc_t*>(p->target);
    const auto* row_scale = static_cast<const acc_t*>(p->row_scale);
    auto* grad = static_cast<scalar_t*>(p->grad);
    const gfl::cuda::RowsGeometry g = gfl::cuda::rows_geometry(p->bins, sizeof(acc_t));
    const auto run = [&](auto dfl) {
      constexpr bool kDfl = decltype(dfl)::value;
      if (variant == 2 || (variant == 0 && !g.tiled)) {
        const unsigned b = block ? block : gfl::cuda::kBlock;
        const unsigned n =
            grid ? grid : static_cast<unsigned>((p->m * 32 + b - 1) / b + (p->m == 0));
        warp_emu::launch(n, b, [&] {
          gfl::cuda::softmax_rows_warp_kernel<scalar_t, 32, kDfl>(
              pred, target, row_scale, p->row_scale_stride, p->out, grad, p->m, p->bins);
        }, last_error);
        return;
      }
      if (!g.tiled) {
        last_error = "rows too long for a tile";
        return;
      }
      const unsigned b = block ? block : static_cast<unsigned>(g.block);
      const int64_t tile_rows = int64_t(b) * g.rows_per_thread;
      const unsigned n = grid ? grid
                              : static_cast<unsigned>((p->m + tile_rows - 1) / tile_rows +
                                                      (p->m == 0));
      const size_t shared = gfl::cuda::rows_shared_bytes(g, sizeof(acc_t), static_cast<int>(b));
      gfl::cuda::with_rows_tile_kernel<scalar_t, kDfl>(p->bins, g, variant == 1, [&](auto kernel) {
        warp_emu::launch(n, b, shared, [&] {
          kernel(pred, target, row_scale, p->row_scale_stride, p->out, grad, p->m,
                 static_cast<int>(p->bins), g.pitch, g.rows_per_thread);
        }, last_error);
      });
    };
    if (p->dfl) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return status();
}

// QFL: the launcher's kernel and plan (qfl_kernel.cuh), with the test's overrides.  `plan`
// (optional) receives the launcher's own plan.  first_block > 0 runs only blocks
// [first_block, grid) of the grid: with pointers moved back by the rows of the blocks left out,
// the kernel then indexes rows beyond 2^31 elements without their memory existing.
struct QflEmuOptions {
  int lanes;             // lanes per row, a power of two up to 32; 0: the plan's
  int index_bits;        // 32 or 64; 0: the plan's
  int vectorised;        // 0 or 1; -1: the plan's
  unsigned grid;         // 0: the plan's
  unsigned block;        // 0: kBlock
  unsigned first_block;  // 0: all blocks
};

// The launcher's plan alone (no launch: any pointers and sizes).
int gfl_emu_qfl_plan(const gfl::cuda::QflLaunch* p, gfl::cuda::QflPlan* plan) {
  *plan = gfl::cuda::qfl_plan(*p);
  return 0;
}

int gfl_emu_qfl(const gfl::cuda::QflLaunch* p, const QflEmuOptions* o, gfl::cuda::QflPlan* plan) {
  last_error.clear();
  gfl::cuda::QflPlan run = gfl::cuda::qfl_plan(*p);
  if (plan != nullptr) *plan = run;
  if (o->lanes != 0) {
    run.lanes_log2 = 0;
    while ((1 << run.lanes_log2) < o->lanes) ++run.lanes_log2;
    if ((1 << run.lanes_log2) != o->lanes || o->lanes > 32) {
      last_error = "lanes per row must be a power of two up to 32";
      return status();
    }
  }
  if (o->index_bits != 0) run.index64 = o->index_bits == 64;
  if (o->vectorised >= 0) run.vectorised = o->vectorised != 0;
  const unsigned grid = o->grid ? o->grid : run.grid;
  const unsigned block = o->block ? o->block : gfl::cuda::kBlock;
  if (block % 32 != 0 || o->first_block >= grid) {
    last_error = "block must be a multiple of 32 and first_block below grid";
    return status();
  }
  gfl::cuda::qfl_dispatch(*p, run.index64, [&](auto storage, auto target, auto dense,
                                               auto activated, auto beta, auto index, auto grad) {
    using scalar_t = typename decltype(storage)::type;
    using target_t = typename decltype(target)::type;
    const auto args = gfl::cuda::qfl_args<scalar_t, target_t>(*p, run);
    const std::function<void()> body = [&] {
      gfl::cuda::qfl_kernel<scalar_t, target_t, decltype(dense)::value,
                            decltype(activated)::value, decltype(beta)::value,
                            decltype(grad)::value, typename decltype(index)::type>(args);
    };
    // warp_emu::launch with the first blocks left out
    gridDim = dim3(grid, 1, 1);
    blockDim = dim3(block, 1, 1);
    std::vector<std::unique_ptr<char[]>> stacks;
    for (unsigned b = o->first_block; b < grid; ++b) {
      blockIdx = uint3{b, 0, 0};
      if (!warp_emu::run_block(body, static_cast<int>(block), 0, stacks, last_error)) return;
    }
  });
  return status();
}

int gfl_emu_scale_rows(const gfl::cuda::ScaleRowsLaunch* p, unsigned grid, unsigned block) {
  last_error.clear();
  dispatch(p->dtype, 1, [&](auto storage, auto) {
    using scalar_t = decltype(storage);
    launch(grid, block, [&] {
      gfl::cuda::scale_rows_kernel<scalar_t>(
          static_cast<const scalar_t*>(p->grad), static_cast<const opmath_t<scalar_t>*>(p->scale),
          p->scale_stride, static_cast<scalar_t*>(p->out), p->rows, p->cols);
    });
  });
  return status();
}

// The launcher's rows geometry (softmax_rows_kernel.cuh): out = {tiled, pitch, vec, block,
// rows_per_thread, compiled count}, for the tests that hold it to its invariants and to the
// bounds script's mirror of it.
void gfl_emu_rows_geometry(int64_t bins, int acc_size, int* out) {
  const gfl::cuda::RowsGeometry g = gfl::cuda::rows_geometry(bins, acc_size);
  out[0] = g.tiled;
  out[1] = g.pitch;
  out[2] = g.vec;
  out[3] = g.block;
  out[4] = g.rows_per_thread;
  out[5] = gfl::cuda::rows_compiled_count(bins, acc_size);
}

}  // extern "C"
