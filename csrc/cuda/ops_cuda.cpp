// CUDA registrations: the shared operator implementations over the CUDA launchers.  Tensors are
// turned into plain launch descriptions here so that the .cu files stay free of ATen headers.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops_impl.h"
#include "launchers.h"

namespace gfl::cuda {
namespace {

DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "gfl_ops: unsupported dtype ", t.scalar_type());
  }
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mut_or_null(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

struct CudaKernels {
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }
  static void qfl(const QflTensors& t) {
    const c10::cuda::CUDAGuard guard(t.pred.device());
    QflLaunch p{};
    p.dtype = to_dtype(t.pred);
    p.pred = t.pred.const_data_ptr();
    p.labels = t.dense ? nullptr : t.labels.const_data_ptr<int64_t>();
    p.scores = t.dense ? nullptr : t.scores.const_data_ptr();
    p.target = t.dense ? t.target.const_data_ptr() : nullptr;
    p.target_opmath = t.dense && t.target.scalar_type() != t.pred.scalar_type();
    p.row_scale = ptr_or_null(t.row_scale);
    p.row_scale_stride = t.row_scale.defined() ? t.row_scale.stride(0) : 0;
    p.loss = mut_or_null(t.loss);
    p.grad = mut_or_null(t.grad);
    p.n = t.pred.size(0);
    p.c = t.pred.size(1);
    p.beta = t.beta;
    p.activated = t.activated;
    launch_qfl(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void rows(const RowTensors& t, bool dfl) {
    const c10::cuda::CUDAGuard guard(t.pred.device());
    RowsLaunch p{};
    p.dtype = to_dtype(t.pred);
    p.dfl = dfl;
    p.pred = t.pred.const_data_ptr();
    p.target = ptr_or_null(t.target);
    p.row_scale = ptr_or_null(t.row_scale);
    p.row_scale_stride = t.row_scale.defined() ? t.row_scale.stride(0) : 0;
    p.out = mut_or_null(t.out);
    p.grad = mut_or_null(t.grad);
    p.m = t.pred.size(0);
    p.bins = t.pred.size(1);
    launch_rows(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void dfl(const RowTensors& t) { rows(t, true); }
  static void integral(const RowTensors& t) { rows(t, false); }

  static void scale_rows(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& out) {
    const c10::cuda::CUDAGuard guard(grad.device());
    ScaleRowsLaunch p{};
    p.dtype = to_dtype(grad);
    p.grad = grad.const_data_ptr();
    p.scale = scale.const_data_ptr();
    p.scale_stride = scale.stride(0);
    p.out = out.mutable_data_ptr();
    p.rows = grad.size(0);
    p.cols = grad.numel() / grad.size(0);
    launch_scale_rows(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace gfl::cuda

TORCH_LIBRARY_IMPL(gfl_ops, CUDA, m) { gfl::OpImpls<gfl::cuda::CudaKernels>::register_all(m); }
