// The QFL CUDA kernel (device code only; the launcher is qfl.cu): a group of TPR lanes per
// anchor row walks the C classes (coalesced), sums the per-class losses in registers and reduces
// them with warp shuffles in a fixed order (no atomics, bitwise deterministic).  The
// per-element math is gfl_math.h's, as on the CPU.  Kept apart from the launcher so that
// tests/cuda_emulation can compile it for the host and run it on an emulated warp.
#pragma once

#include "../gfl_math.h"
#include "common.cuh"

namespace gfl::cuda {

// Lanes per row for c classes: enough to cover small class counts without idle lanes, a full
// warp beyond.
inline int qfl_lanes_per_row(int64_t c) { return c <= 2 ? 1 : (c <= 16 ? 8 : 32); }

template <typename scalar_t, typename target_t, int TPR, bool kDense>
__global__ void __launch_bounds__(kBlock)
    qfl_kernel(const scalar_t* __restrict__ pred, const int64_t* __restrict__ labels,
               const opmath_t<scalar_t>* __restrict__ scores,
               const target_t* __restrict__ target,
               const opmath_t<scalar_t>* __restrict__ row_scale, int64_t row_scale_stride,
               opmath_t<scalar_t>* __restrict__ loss, scalar_t* __restrict__ grad, int64_t n,
               int64_t c, opmath_t<scalar_t> beta, int mode, bool activated) {
  using acc_t = opmath_t<scalar_t>;
  const RowGroupLoop loop = row_group_loop<TPR>();
  const int lane = loop.lane;
  for (int64_t base = loop.first; base < n; base += loop.stride) {
    const int64_t row = base + loop.offset;  // rows past n contribute nothing
    const bool active = row < n;
    acc_t sum = acc_t(0);
    if (active) {
      int64_t label = -1;
      acc_t score = acc_t(0);
      if (!kDense) {
        label = labels[row];
        score = scores[row];
      }
      const acc_t scale = row_scale ? row_scale[row * row_scale_stride] : acc_t(1);
      const int64_t off = row * c;
      for (int64_t col = lane; col < c; col += TPR) {
        const acc_t x = to_opmath(pred[off + col]);
        acc_t y;
        if (kDense) {
          y = static_cast<acc_t>(to_opmath(target[off + col]));
        } else {
          y = col == label ? score : acc_t(0);
        }
        acc_t g;
        sum += activated ? qfl_prob<acc_t>(x, y, beta, mode, g)
                         : qfl_logit<acc_t>(x, y, beta, mode, g);
        if (grad) grad[off + col] = from_opmath<scalar_t>(g * scale);
      }
    }
    sum = group_sum<TPR>(sum);
    if (active && lane == 0 && loss) loss[row] = sum;
  }
}

}  // namespace gfl::cuda
