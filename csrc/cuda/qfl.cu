// Launcher of the QFL CUDA kernel (qfl_kernel.cuh).
#include "qfl_kernel.cuh"

namespace gfl::cuda {
namespace {

template <typename scalar_t, typename target_t, bool kDense>
void launch_typed(const QflLaunch& p, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  const auto* pred = static_cast<const scalar_t*>(p.pred);
  const auto* scores = static_cast<const acc_t*>(p.scores);
  const auto* target = static_cast<const target_t*>(p.target);
  const auto* row_scale = static_cast<const acc_t*>(p.row_scale);
  auto* loss = static_cast<acc_t*>(p.loss);
  auto* grad = static_cast<scalar_t*>(p.grad);
  const int mode = beta_mode(p.beta);
  const acc_t beta = static_cast<acc_t>(p.beta);
#define GFL_QFL_LAUNCH(TPR)                                                                 \
  qfl_kernel<scalar_t, target_t, TPR, kDense><<<grid_for(p.n * TPR), kBlock, 0, stream>>>( \
      pred, p.labels, scores, target, row_scale, p.row_scale_stride, loss, grad, p.n, p.c, beta, \
      mode, p.activated)
  switch (qfl_lanes_per_row(p.c)) {
    case 1: GFL_QFL_LAUNCH(1); break;
    case 8: GFL_QFL_LAUNCH(8); break;
    default: GFL_QFL_LAUNCH(32); break;
  }
#undef GFL_QFL_LAUNCH
}

template <typename scalar_t>
void launch_dtype(const QflLaunch& p, cudaStream_t stream) {
  if (p.target == nullptr) {
    launch_typed<scalar_t, scalar_t, false>(p, stream);
  } else if (p.target_opmath) {
    launch_typed<scalar_t, opmath_t<scalar_t>, true>(p, stream);
  } else {
    launch_typed<scalar_t, scalar_t, true>(p, stream);
  }
}

}  // namespace

void launch_qfl(const QflLaunch& p, cudaStream_t stream) {
#define GFL_CALL(T) launch_dtype<T>(p, stream)
  GFL_DISPATCH_DTYPE(p.dtype, GFL_CALL)
#undef GFL_CALL
}

}  // namespace gfl::cuda
