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

int gfl_emu_rows(const gfl::cuda::RowsLaunch* p, int tpr, unsigned grid, unsigned block) {
  last_error.clear();
  if (tpr == 0) tpr = gfl::cuda::rows_lanes_per_row(p->bins);
  dispatch(p->dtype, tpr, [&](auto storage, auto lanes) {
    using scalar_t = decltype(storage);
    using acc_t = opmath_t<scalar_t>;
    const auto run = [&](auto dfl) {
      launch(grid, block, [&] {
        gfl::cuda::softmax_rows_kernel<scalar_t, decltype(lanes)::value, decltype(dfl)::value>(
            static_cast<const scalar_t*>(p->pred), static_cast<const acc_t*>(p->target),
            static_cast<const acc_t*>(p->row_scale), p->row_scale_stride, p->out,
            static_cast<scalar_t*>(p->grad), p->m, p->bins);
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

int gfl_emu_qfl(const gfl::cuda::QflLaunch* p, int tpr, unsigned grid, unsigned block) {
  last_error.clear();
  if (tpr == 0) tpr = gfl::cuda::qfl_lanes_per_row(p->c);
  const int mode = gfl::beta_mode(p->beta);
  dispatch(p->dtype, tpr, [&](auto storage, auto lanes) {
    using scalar_t = decltype(storage);
    using acc_t = opmath_t<scalar_t>;
    const auto run = [&](auto target_type, auto dense) {
      using target_t = decltype(target_type);
      launch(grid, block, [&] {
        gfl::cuda::qfl_kernel<scalar_t, target_t, decltype(lanes)::value, decltype(dense)::value>(
            static_cast<const scalar_t*>(p->pred), p->labels,
            static_cast<const acc_t*>(p->scores), static_cast<const target_t*>(p->target),
            static_cast<const acc_t*>(p->row_scale), p->row_scale_stride,
            static_cast<acc_t*>(p->loss), static_cast<scalar_t*>(p->grad), p->n, p->c,
            static_cast<acc_t>(p->beta), mode, p->activated);
      });
    };
    if (p->target == nullptr) {
      run(scalar_t{}, std::false_type{});
    } else if (p->target_opmath) {
      run(acc_t{}, std::true_type{});
    } else {
      run(scalar_t{}, std::true_type{});
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

}  // extern "C"
