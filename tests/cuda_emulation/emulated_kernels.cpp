// The gfl-ops CUDA kernels (csrc/cuda/*_kernel.cuh) compiled for the host and run on the warp
// emulator (warp_emulator.h), behind a C interface for tests/test_cuda_emulated.py (ctypes).
//
// Every entry point takes the launch description of csrc/cuda/launchers.h, plus the lanes per
// row (0: the launcher's own choice) and the emulated grid; it returns 0, or 1 with the error in
// gfl_emu_error().
#include "warp_emulator.h"

#include "cuda/qfl_kernel.cuh"
#include "cuda/softmax_rows_kernel.cuh"

namespace {

using gfl::cuda::opmath_t;

std::string last_error;

// Calls f(std::integral_constant<int, TPR>{}) for TPR in {1, 2, 4, 8, 16, 32}.
template <typename F>
bool with_lanes(int tpr, F&& f) {
  switch (tpr) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    case 16: f(std::integral_constant<int, 16>{}); return true;
    case 32: f(std::integral_constant<int, 32>{}); return true;
    default: last_error = "lanes per row must be a power of two up to 32"; return false;
  }
}

template <typename F>
bool with_dtype(gfl::cuda::DType dtype, F&& f) {
  switch (dtype) {
    case gfl::cuda::DType::kFloat: f(float{}); return true;
    case gfl::cuda::DType::kDouble: f(double{}); return true;
    case gfl::cuda::DType::kHalf: f(__half{}); return true;
    case gfl::cuda::DType::kBFloat16: f(__nv_bfloat16{}); return true;
  }
  last_error = "unknown dtype";
  return false;
}

int finish(bool ok) { return ok && last_error.empty() ? 0 : 1; }

}  // namespace

extern "C" {

const char* gfl_emu_error() { return last_error.c_str(); }

int gfl_emu_rows(const gfl::cuda::RowsLaunch* p, int tpr, unsigned grid, unsigned block) {
  last_error.clear();
  if (tpr == 0) tpr = gfl::cuda::rows_lanes_per_row(p->bins);
  bool ok = true;
  ok = ok && with_dtype(p->dtype, [&](auto storage) {
    using scalar_t = decltype(storage);
    using acc_t = opmath_t<scalar_t>;
    with_lanes(tpr, [&](auto lanes) {
      constexpr int TPR = decltype(lanes)::value;
      const auto body = [&] {
        if (p->dfl) {
          gfl::cuda::softmax_rows_kernel<scalar_t, TPR, true>(
              static_cast<const scalar_t*>(p->pred), static_cast<const acc_t*>(p->target),
              static_cast<const acc_t*>(p->row_scale), p->row_scale_stride, p->out,
              static_cast<scalar_t*>(p->grad), p->m, p->bins);
        } else {
          gfl::cuda::softmax_rows_kernel<scalar_t, TPR, false>(
              static_cast<const scalar_t*>(p->pred), static_cast<const acc_t*>(p->target),
              static_cast<const acc_t*>(p->row_scale), p->row_scale_stride, p->out,
              static_cast<scalar_t*>(p->grad), p->m, p->bins);
        }
      };
      ok = warp_emu::launch(grid, block, body, last_error) && ok;
    });
  });
  return finish(ok);
}

int gfl_emu_qfl(const gfl::cuda::QflLaunch* p, int tpr, unsigned grid, unsigned block) {
  last_error.clear();
  if (tpr == 0) tpr = gfl::cuda::qfl_lanes_per_row(p->c);
  const int mode = gfl::beta_mode(p->beta);
  bool ok = true;
  ok = ok && with_dtype(p->dtype, [&](auto storage) {
    using scalar_t = decltype(storage);
    using acc_t = opmath_t<scalar_t>;
    with_lanes(tpr, [&](auto lanes) {
      constexpr int TPR = decltype(lanes)::value;
      const auto run = [&](auto target_type, auto dense) {
        using target_t = decltype(target_type);
        const auto body = [&] {
          gfl::cuda::qfl_kernel<scalar_t, target_t, TPR, decltype(dense)::value>(
              static_cast<const scalar_t*>(p->pred), p->labels,
              static_cast<const acc_t*>(p->scores), static_cast<const target_t*>(p->target),
              static_cast<const acc_t*>(p->row_scale), p->row_scale_stride,
              static_cast<acc_t*>(p->loss), static_cast<scalar_t*>(p->grad), p->n, p->c,
              static_cast<acc_t>(p->beta), mode, p->activated);
        };
        ok = warp_emu::launch(grid, block, body, last_error) && ok;
      };
      if (p->target == nullptr) {
        run(scalar_t{}, std::false_type{});
      } else if (p->target_opmath) {
        run(acc_t{}, std::true_type{});
      } else {
        run(scalar_t{}, std::true_type{});
      }
    });
  });
  return finish(ok);
}

int gfl_emu_scale_rows(const gfl::cuda::ScaleRowsLaunch* p, unsigned grid, unsigned block) {
  last_error.clear();
  bool ok = true;
  ok = ok && with_dtype(p->dtype, [&](auto storage) {
    using scalar_t = decltype(storage);
    using acc_t = opmath_t<scalar_t>;
    const auto body = [&] {
      gfl::cuda::scale_rows_kernel<scalar_t>(
          static_cast<const scalar_t*>(p->grad), static_cast<const acc_t*>(p->scale),
          p->scale_stride, static_cast<scalar_t*>(p->out), p->rows, p->cols);
    };
    ok = warp_emu::launch(grid, block, body, last_error) && ok;
  });
  return finish(ok);
}

}  // extern "C"
