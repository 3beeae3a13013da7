// Operator implementations shared by the CPU and CUDA registrations.  `K` supplies the kernels:
//   static void qfl(const QflTensors&); static void dfl(const RowTensors&);
//   static void integral(const RowTensors&);
//   static void scale_rows(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& out);
//   static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);
// `K::empty` allocates the outputs the kernels fully write (no memset): on CPU from the buffer
// cache of cpu/buffer_cache.h (a fresh gradient per training step would otherwise page-fault),
// on CUDA from torch's caching allocator.
// Kernels are not launched for empty inputs (N = 0 or C = 0), so they never see a zero grid.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "op_common.h"
#include "torch_compat.h"

namespace gfl {

using at::Tensor;

template <class K>
struct OpImpls {
  // grad_scale (N,), optional: multiplies each row of the gradient output
  static void set_grad_scale(Tensor& row_scale, const gfl::optional<Tensor>& grad_scale,
                             const Tensor& pred, bool with_grad) {
    if (!grad_scale.has_value() || !grad_scale->defined()) return;
    TORCH_CHECK(with_grad, "gfl_ops: grad_scale scales the gradient output, so it needs "
                "with_grad=True");
    row_scale = prepare_row_scale(*grad_scale, pred, "grad_scale");
  }

  static std::tuple<Tensor, Tensor> run_qfl(QflTensors t, bool with_grad,
                                            const gfl::optional<Tensor>& grad_scale) {
    set_grad_scale(t.row_scale, grad_scale, t.pred, with_grad);
    const auto n = t.pred.size(0);
    // the kernels write every row's loss (no accumulation: no atomics), so no memset pass; only
    // rows of zero classes (N > 0, C = 0: no launch) need their zero sum filled in
    const auto loss_options = t.pred.options().dtype(opmath_dtype(t.pred));
    Tensor loss =
        t.pred.numel() > 0 ? K::empty({n}, loss_options) : at::zeros({n}, loss_options);
    Tensor grad = with_grad ? K::empty(t.pred.sizes(), t.pred.options())
                            : at::empty({0}, t.pred.options());
    t.loss = loss;
    if (with_grad) t.grad = grad;
    if (t.pred.numel() > 0) K::qfl(t);
    return {loss, grad};
  }

  static Tensor run_qfl_backward(QflTensors t, const Tensor& grad_loss) {
    t.row_scale = prepare_row_scale(grad_loss, t.pred);
    Tensor grad = K::empty(t.pred.sizes(), t.pred.options());
    t.grad = grad;
    if (t.pred.numel() > 0) K::qfl(t);
    return grad;
  }

  static std::tuple<Tensor, Tensor> qfl(const Tensor& pred, const Tensor& labels,
                                        const Tensor& scores, double beta, bool activated,
                                        bool with_grad, const gfl::optional<Tensor>& grad_scale) {
    return run_qfl(prepare_qfl(pred, labels, scores, Tensor(), beta, activated), with_grad,
                   grad_scale);
  }

  static Tensor qfl_backward(const Tensor& grad_loss, const Tensor& pred, const Tensor& labels,
                             const Tensor& scores, double beta, bool activated) {
    return run_qfl_backward(prepare_qfl(pred, labels, scores, Tensor(), beta, activated),
                            grad_loss);
  }

  static std::tuple<Tensor, Tensor> qfl_dense(const Tensor& pred, const Tensor& target,
                                              double beta, bool activated, bool with_grad,
                                              const gfl::optional<Tensor>& grad_scale) {
    TORCH_CHECK(target.defined(), "gfl_ops: target must be a tensor");
    return run_qfl(prepare_qfl(pred, Tensor(), Tensor(), target, beta, activated), with_grad,
                   grad_scale);
  }

  static Tensor qfl_dense_backward(const Tensor& grad_loss, const Tensor& pred,
                                   const Tensor& target, double beta, bool activated) {
    TORCH_CHECK(target.defined(), "gfl_ops: target must be a tensor");
    return run_qfl_backward(prepare_qfl(pred, Tensor(), Tensor(), target, beta, activated),
                            grad_loss);
  }

  template <bool kDfl>
  static std::tuple<Tensor, Tensor> run_rows(RowTensors t, bool with_grad,
                                             const gfl::optional<Tensor>& grad_scale) {
    set_grad_scale(t.row_scale, grad_scale, t.pred, with_grad);
    const auto out_dtype = kDfl ? opmath_dtype(t.pred) : t.pred.scalar_type();
    Tensor out = K::empty({t.pred.size(0)}, t.pred.options().dtype(out_dtype));
    Tensor grad = with_grad ? K::empty(t.pred.sizes(), t.pred.options())
                            : at::empty({0}, t.pred.options());
    t.out = out;
    if (with_grad) t.grad = grad;
    if (t.pred.numel() > 0) kDfl ? K::dfl(t) : K::integral(t);
    return {out, grad};
  }

  template <bool kDfl>
  static Tensor run_rows_backward(RowTensors t, const Tensor& grad_out) {
    t.row_scale = prepare_row_scale(grad_out, t.pred);
    Tensor grad = K::empty(t.pred.sizes(), t.pred.options());
    t.grad = grad;
    if (t.pred.numel() > 0) kDfl ? K::dfl(t) : K::integral(t);
    return grad;
  }

  static std::tuple<Tensor, Tensor> dfl(const Tensor& pred, const Tensor& target,
                                        bool with_grad, const gfl::optional<Tensor>& grad_scale) {
    TORCH_CHECK(target.defined(), "gfl_ops: target must be a tensor");
    return run_rows<true>(prepare_rows(pred, target), with_grad, grad_scale);
  }

  static Tensor dfl_backward(const Tensor& grad_loss, const Tensor& pred, const Tensor& target) {
    TORCH_CHECK(target.defined(), "gfl_ops: target must be a tensor");
    return run_rows_backward<true>(prepare_rows(pred, target), grad_loss);
  }

  static std::tuple<Tensor, Tensor> integral(const Tensor& pred, bool with_grad) {
    return run_rows<false>(prepare_rows(pred, Tensor()), with_grad, gfl::nullopt);
  }

  static Tensor integral_backward(const Tensor& grad_out, const Tensor& pred) {
    return run_rows_backward<false>(prepare_rows(pred, Tensor()), grad_out);
  }

  static Tensor scale_rows(const Tensor& grad, const Tensor& row_scale) {
    TORCH_CHECK(grad.dim() >= 1, "gfl_ops: grad must have at least one dimension");
    Tensor g = grad.contiguous();
    Tensor s = prepare_row_scale(row_scale, g);
    Tensor out = K::empty(g.sizes(), g.options());
    if (g.numel() > 0) K::scale_rows(g, s, out);
    return out;
  }

  static void scale_rows_(at::Tensor& grad, const Tensor& row_scale) {
    TORCH_CHECK(grad.dim() >= 1 && grad.is_contiguous(),
                "gfl_ops: scale_rows_ needs a contiguous grad with at least one dimension");
    Tensor s = prepare_row_scale(row_scale, grad);
    // element i is read and written by the same thread, so the kernel runs in place
    if (grad.numel() > 0) K::scale_rows(grad, s, grad);
  }

  static void register_all(torch::Library& m) {
    m.impl("qfl", &qfl);
    m.impl("qfl_backward", &qfl_backward);
    m.impl("qfl_dense", &qfl_dense);
    m.impl("qfl_dense_backward", &qfl_dense_backward);
    m.impl("dfl", &dfl);
    m.impl("dfl_backward", &dfl_backward);
    m.impl("integral", &integral);
    m.impl("integral_backward", &integral_backward);
    m.impl("scale_rows", &scale_rows);
    m.impl("scale_rows_", &scale_rows_);
  }
};

}  // namespace gfl
