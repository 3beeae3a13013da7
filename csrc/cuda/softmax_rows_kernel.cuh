// DFL and softmax-integral CUDA kernel (device code only; the launchers are softmax_rows.cu):
// one template, kDfl picks the op; a group of TPR lanes per row of n+1 bin logits, reduced across
// the group with shuffles.  Three passes over the row (the second and third re-read it from L1):
// max, sums, gradient.  The per-row math (target split, loss, gradient, the integral's pivot) is
// gfl_math.h's and the CPU kernel's.  Also the backward's per-row scaling.  Kept apart from the
// launchers so that tests/cuda_emulation can compile them for the host and run them on an
// emulated warp.
#pragma once

#include <cmath>
#include <type_traits>

#include "../gfl_math.h"
#include "common.cuh"

namespace gfl::cuda {

// Lanes per row for n+1 = bins (a power of two dividing 32).
inline int rows_lanes_per_row(int64_t bins) { return bins <= 8 ? 8 : (bins <= 16 ? 16 : 32); }

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

// The same math as the CPU rows kernel (csrc/cpu/kernels_impl.h), per row:
//   pass 1: the row max (for the integral also its bin p, the pivot);
//   pass 2: sum_j e_j with e_j = exp(z_j - max), and for the integral sum_j e_j (j - p), so that
//           y_hat - p = sum_j S_j (j - p) is formed from exact small integers (no cancellation
//           of j - y_hat when the mass sits on one bin); for DFL the logits of the target's bins;
//   pass 3: the gradient, e_j recomputed from the row (re-read from L1).
template <typename scalar_t, int TPR, bool kDfl>
__global__ void __launch_bounds__(kBlock)
    softmax_rows_kernel(const scalar_t* __restrict__ pred,
                        const opmath_t<scalar_t>* __restrict__ target,
                        const opmath_t<scalar_t>* __restrict__ row_scale,
                        int64_t row_scale_stride, void* __restrict__ out_ptr,
                        scalar_t* __restrict__ grad, int64_t m, int64_t bins) {
  using acc_t = opmath_t<scalar_t>;
  using O = Ops<acc_t>;  // expf / logf for float, exp / log for double
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
    const acc_t inv_sum = acc_t(1) / sum;
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
        // dy_hat/dz_j * scale = e_j (c (j - p) - c (y_hat - p)), c = scale / sum
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

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    scale_rows_kernel(const scalar_t* __restrict__ grad,
                      const opmath_t<scalar_t>* __restrict__ scale, int64_t scale_stride,
                      scalar_t* __restrict__ out, int64_t rows, int64_t cols) {
  const int64_t total = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    out[i] = from_opmath<scalar_t>(to_opmath(grad[i]) * scale[(i / cols) * scale_stride]);
  }
}

}  // namespace gfl::cuda
