// Launcher of the QFL CUDA kernel (qfl_kernel.cuh): one launch per call, no host sync.
#include "qfl_kernel.cuh"

namespace gfl::cuda {

void launch_qfl(const QflLaunch& p, cudaStream_t stream) {
  const QflPlan plan = qfl_plan(p);
  qfl_dispatch(p, plan.index64, [&](auto storage, auto target, auto dense, auto activated,
                                    auto beta, auto index, auto grad) {
    using scalar_t = typename decltype(storage)::type;
    using target_t = typename decltype(target)::type;
    qfl_kernel<scalar_t, target_t, decltype(dense)::value, decltype(activated)::value,
               decltype(beta)::value, decltype(grad)::value, typename decltype(index)::type>
        <<<plan.grid, kBlock, 0, stream>>>(qfl_args<scalar_t, target_t>(p, plan));
  });
}

}  // namespace gfl::cuda
