// Launchers of the DFL / integral kernels and of the backward's row scaling
// (softmax_rows_kernel.cuh).
#include "softmax_rows_kernel.cuh"

namespace gfl::cuda {
namespace {

// Blocks for `tiles` tiles, one each, capped (the kernel loops grid-stride over tiles).
unsigned int grid_for_tiles(int64_t tiles) {
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned int>(tiles < 1 ? 1 : (tiles > cap ? cap : tiles));
}

template <typename scalar_t, bool kDfl>
void launch_typed(const RowsLaunch& p, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  const auto* pred = static_cast<const scalar_t*>(p.pred);
  const auto* target = static_cast<const acc_t*>(p.target);
  const auto* row_scale = static_cast<const acc_t*>(p.row_scale);
  auto* grad = static_cast<scalar_t*>(p.grad);
  const RowsGeometry g = rows_geometry(p.bins, sizeof(acc_t));
  if (!g.tiled) {
    softmax_rows_warp_kernel<scalar_t, 32, kDfl><<<grid_for(p.m * 32), kBlock, 0, stream>>>(
        pred, target, row_scale, p.row_scale_stride, p.out, grad, p.m, p.bins);
    return;
  }
  // g.block threads (32..128, <= kBlock: the tile kernels are compiled for up to kBlock threads,
  // __launch_bounds__(kBlock, 1), so a smaller block only leaves registers unused)
  const int64_t tile_rows = int64_t(g.block) * g.rows_per_thread;
  const unsigned int grid = grid_for_tiles((p.m + tile_rows - 1) / tile_rows);
  const size_t shared = rows_shared_bytes(g, sizeof(acc_t), g.block);  // <= kTileBytes
  with_rows_tile_kernel<scalar_t, kDfl>(p.bins, g, false, [&](auto kernel) {
    kernel<<<grid, g.block, shared, stream>>>(pred, target, row_scale, p.row_scale_stride, p.out,
                                              grad, p.m, static_cast<int>(p.bins), g.pitch,
                                              g.rows_per_thread);
  });
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
  // about 8 x 16 bytes per thread: the thread's setup (its row and column, two 64-bit divisions)
  // spread over 8 steps, and still ~10 blocks per SM at 640k x 17
  const int64_t per_thread = 8 * 16 / sizeof(scalar_t);
  scale_rows_kernel<scalar_t>
      <<<grid_for((p.rows * p.cols + per_thread - 1) / per_thread), kBlock, 0, stream>>>(
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
