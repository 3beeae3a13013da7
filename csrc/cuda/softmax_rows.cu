// DFL and softmax-integral CUDA kernel (one template, kDfl picks the op): a group of TPR lanes per
// row of n+1 bin logits.  Pass 1 computes the row's (max, sum of exp) online per lane and merges
// them across the group with shuffles; pass 2 re-reads the row (from L1) to write the gradient.
// The per-row math (target split, loss, gradient) is gfl_math.h's, as on the CPU.
#include <cmath>
#include <type_traits>

#include "../gfl_math.h"
#include "common.cuh"

namespace gfl::cuda {
namespace {

// Merge two partial softmax states (max m, sum s of exp(z - m)).  An empty state has m = -inf,
// s = 0 and must not turn the merge into NaN (exp(-inf - -inf)).
template <typename T>
__device__ __forceinline__ void merge_softmax(T& m, T& s, T m_other, T s_other) {
  const T m_new = m > m_other ? m : m_other;
  const T a = (s == T(0) || m == T(-INFINITY)) ? T(0) : s * ::exp(m - m_new);
  const T b = (s_other == T(0) || m_other == T(-INFINITY)) ? T(0)
                                                            : s_other * ::exp(m_other - m_new);
  m = m_new;
  s = a + b;
}

template <typename scalar_t, int TPR, bool kDfl>
__global__ void __launch_bounds__(kBlock)
    softmax_rows_kernel(const scalar_t* __restrict__ pred,
                        const opmath_t<scalar_t>* __restrict__ target,
                        const opmath_t<scalar_t>* __restrict__ row_scale,
                        int64_t row_scale_stride, void* __restrict__ out_ptr, scalar_t* __restrict__ grad, int64_t m,
                        int64_t bins) {
  using acc_t = opmath_t<scalar_t>;
  using out_t = typename std::conditional<kDfl, acc_t, scalar_t>::type;
  out_t* out = static_cast<out_t*>(out_ptr);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % TPR;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.x / TPR;
  const int64_t warp_first_group = (thread / 32) * (32 / TPR);
  const int64_t my_offset = thread / TPR - warp_first_group;
  const int64_t n = bins - 1;
  for (int64_t base = warp_first_group; base < m; base += groups) {
    const int64_t row = base + my_offset;
    const bool active = row < m;
    const int64_t off = row * bins;
    // pass 1: online max / sum of exp per lane
    acc_t zmax = -INFINITY, sum = acc_t(0);
    if (active) {
      for (int64_t j = lane; j < bins; j += TPR) {
        const acc_t z = to_opmath(pred[off + j]);
        merge_softmax(zmax, sum, z, acc_t(1));
      }
    }
#pragma unroll
    for (int offset = TPR / 2; offset > 0; offset /= 2) {
      const acc_t m_other = __shfl_xor_sync(0xffffffffu, zmax, offset, TPR);
      const acc_t s_other = __shfl_xor_sync(0xffffffffu, sum, offset, TPR);
      merge_softmax(zmax, sum, m_other, s_other);
    }
    const acc_t inv_sum = acc_t(1) / sum;
    int64_t l = 0;
    acc_t w_l = acc_t(0), w_r = acc_t(0), stat = acc_t(0), z_r = acc_t(0);
    if constexpr (kDfl) {
      if (active) dfl_split(target[row], n, l, w_l, w_r);
      // z_l (in stat) and z_r, gathered from whichever lanes hold bins l and l+1
      if (active) {
        for (int64_t j = lane; j < bins; j += TPR) {
          if (j == l) stat = to_opmath(pred[off + j]);
          if (j == l + 1) z_r = to_opmath(pred[off + j]);
        }
      }
      z_r = group_sum<TPR>(z_r);
    } else if (active) {
      for (int64_t j = lane; j < bins; j += TPR)
        stat += ::exp(to_opmath(pred[off + j]) - zmax) * static_cast<acc_t>(j);
    }
    stat = group_sum<TPR>(stat);
    if (!active) continue;  // no shuffles below
    acc_t y_hat = acc_t(0);
    if constexpr (kDfl) {
      const acc_t lse = zmax + ::log(sum);
      if (out && lane == 0) out[row] = dfl_loss(lse, stat, z_r, w_l, w_r);
    } else {
      y_hat = stat * inv_sum;
      if (out && lane == 0) out[row] = from_opmath<scalar_t>(y_hat);
    }
    if (grad) {
      const acc_t scale = row_scale ? row_scale[row * row_scale_stride] : acc_t(1);
      for (int64_t j = lane; j < bins; j += TPR) {
        const acc_t s_j = ::exp(to_opmath(pred[off + j]) - zmax) * inv_sum;
        const acc_t jf = static_cast<acc_t>(j);
        const acc_t g = kDfl ? dfl_grad<acc_t>(s_j, jf, static_cast<acc_t>(l), w_l, w_r)
                             : integral_grad<acc_t>(s_j, jf, y_hat);
        grad[off + j] = from_opmath<scalar_t>(g * scale);
      }
    }
  }
}

template <typename scalar_t, bool kDfl>
void launch_typed(const RowsLaunch& p, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  const auto* pred = static_cast<const scalar_t*>(p.pred);
  const auto* target = static_cast<const acc_t*>(p.target);
  const auto* row_scale = static_cast<const acc_t*>(p.row_scale);
  auto* grad = static_cast<scalar_t*>(p.grad);
#define GFL_ROWS_LAUNCH(TPR)                                                          \
  softmax_rows_kernel<scalar_t, TPR, kDfl><<<grid_for(p.m * TPR), kBlock, 0, stream>>>( \
      pred, target, row_scale, p.row_scale_stride, p.out, grad, p.m, p.bins)
  if (p.bins <= 8) {
    GFL_ROWS_LAUNCH(8);
  } else if (p.bins <= 16) {
    GFL_ROWS_LAUNCH(16);
  } else {
    GFL_ROWS_LAUNCH(32);
  }
#undef GFL_ROWS_LAUNCH
}

template <typename scalar_t>
void launch_dtype(const RowsLaunch& p, cudaStream_t stream) {
  if (p.dfl) {
    launch_typed<scalar_t, true>(p, stream);
  } else {
    launch_typed<scalar_t, false>(p, stream);
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

template <typename scalar_t>
void launch_scale_typed(const ScaleRowsLaunch& p, cudaStream_t stream) {
  scale_rows_kernel<scalar_t><<<grid_for(p.rows * p.cols), kBlock, 0, stream>>>(
      static_cast<const scalar_t*>(p.grad), static_cast<const opmath_t<scalar_t>*>(p.scale),
      p.scale_stride, static_cast<scalar_t*>(p.out), p.rows, p.cols);
}

}  // namespace

void launch_rows(const RowsLaunch& p, cudaStream_t stream) {
#define GFL_CALL(T) launch_dtype<T>(p, stream)
  GFL_DISPATCH_DTYPE(p.dtype, GFL_CALL)
#undef GFL_CALL
}

void launch_scale_rows(const ScaleRowsLaunch& p, cudaStream_t stream) {
#define GFL_CALL(T) launch_scale_typed<T>(p, stream)
  GFL_DISPATCH_DTYPE(p.dtype, GFL_CALL)
#undef GFL_CALL
}

}  // namespace gfl::cuda
