// Plain-C++ interface between the CUDA registrations (ops_cuda.cpp, which knows about tensors)
// and the kernels (*.cu, which include no ATen headers so they compile quickly).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gfl::cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

// Per-row scales (row_scale, scale) are read through their stride (0 for an expanded scalar).
// QFL over an (n, c) matrix.  Pointers that are null are skipped (loss, grad, row_scale).
// scores / row_scale / loss are in the opmath type (double for kDouble, else float); labels are
// int64; a dense target has the storage dtype of pred, or the opmath type when target_opmath.
struct QflLaunch {
  DType dtype;
  const void* pred;
  const int64_t* labels;
  const void* scores;
  const void* target;
  bool target_opmath;
  const void* row_scale;
  int64_t row_scale_stride;
  void* loss;
  void* grad;
  int64_t n;
  int64_t c;
  double beta;
  bool activated;
};

// DFL (dfl = true) or the integral over (m, bins) logits.  target / row_scale in opmath type;
// out is the DFL loss (opmath) or the integral value (storage dtype); grad in storage dtype.
struct RowsLaunch {
  DType dtype;
  bool dfl;
  const void* pred;
  const void* target;
  const void* row_scale;
  int64_t row_scale_stride;
  void* out;
  void* grad;
  int64_t m;
  int64_t bins;
};

// out[i, j] = grad[i, j] * scale[i] over a (rows, cols) matrix; scale in opmath type.
struct ScaleRowsLaunch {
  DType dtype;
  const void* grad;
  const void* scale;
  int64_t scale_stride;
  void* out;
  int64_t rows;
  int64_t cols;
};

void launch_qfl(const QflLaunch& p, cudaStream_t stream);
void launch_rows(const RowsLaunch& p, cudaStream_t stream);
void launch_scale_rows(const ScaleRowsLaunch& p, cudaStream_t stream);

}  // namespace gfl::cuda
