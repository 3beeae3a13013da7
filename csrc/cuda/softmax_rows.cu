// Launchers of the DFL / integral kernel and of the backward's row scaling
// (softmax_rows_kernel.cuh).
#include "softmax_rows_kernel.cuh"

namespace gfl::cuda {
namespace {

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
  switch (rows_lanes_per_row(p.bins)) {
    case 8: GFL_ROWS_LAUNCH(8); break;
    case 16: GFL_ROWS_LAUNCH(16); break;
    default: GFL_ROWS_LAUNCH(32); break;
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
