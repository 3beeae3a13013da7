// Argument checking and output allocation shared by the CPU and CUDA operator implementations.
//
// Every operator comes in two flavours that run the same kernel:
//   forward   (loss, grad) = op(inputs, with_grad)      grad is (0,)-shaped when !with_grad
//   backward  grad_input   = op_backward(grad_loss, inputs)   gradient recomputed, scaled per row
// so a kernel takes an optional per-row scale, an optional loss output and an optional gradient
// output (undefined tensors are skipped).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

namespace gfl {

// Inputs and outputs of one QFL launch.  All defined tensors are contiguous.
struct QflTensors {
  at::Tensor pred;       // (N, C) logits or probabilities, float/double/half/bfloat16
  at::Tensor labels;     // (N,) int64, labels form only
  at::Tensor scores;     // (N,) opmath dtype, labels form only
  at::Tensor target;     // (N, C) dense form only; dtype of pred or its opmath dtype
  at::Tensor row_scale;  // (N,) opmath dtype: multiplies the gradient (backward), or undefined
  at::Tensor loss;       // (N,) opmath dtype output, or undefined
  at::Tensor grad;       // (N, C) pred dtype output, or undefined
  double beta = 2.0;
  bool activated = false;
  bool dense = false;
};

// Inputs and outputs of one DFL or integral launch (row-wise over n+1 bins).
struct RowTensors {
  at::Tensor pred;       // (M, n+1)
  at::Tensor target;     // (M,) opmath dtype, DFL only
  at::Tensor row_scale;  // (M,) opmath dtype, or undefined
  at::Tensor out;        // (M,) loss (opmath dtype) or integral (pred dtype), or undefined
  at::Tensor grad;       // (M, n+1) pred dtype, or undefined
};

inline at::ScalarType opmath_dtype(const at::Tensor& t) {
  return at::toOpMathType(t.scalar_type());
}

inline void check_float_pred(const at::Tensor& pred, const char* shape) {
  TORCH_CHECK(pred.defined(), "gfl_ops: pred must be a tensor of shape ", shape);
  const auto st = pred.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "gfl_ops: pred must be float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(pred.dim() == 2, "gfl_ops: pred must have shape ", shape, ", got ", pred.sizes());
}

inline void check_same_device(const at::Tensor& pred, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == pred.device(), "gfl_ops: ", name, " is on ", other.device(),
              " but pred is on ", pred.device());
}

// Rows of the gradient scale for the backward flavour: (N,) in opmath dtype, any stride.  The
// kernels read it through its stride, so the expanded scalar that a mean or sum reduction
// sends back (stride 0) is used as it is, without materialising N copies.
inline at::Tensor prepare_row_scale(const at::Tensor& grad_loss, const at::Tensor& pred,
                                    const char* name = "grad_loss") {
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == pred.size(0), "gfl_ops: ", name,
              " must have shape (", pred.size(0), ",), got ", grad_loss.sizes());
  check_same_device(pred, grad_loss, name);
  return grad_loss.to(opmath_dtype(pred));
}

inline QflTensors prepare_qfl(const at::Tensor& pred, const at::Tensor& labels,
                              const at::Tensor& scores, const at::Tensor& target, double beta,
                              bool activated) {
  check_float_pred(pred, "(N, C)");
  TORCH_CHECK(beta >= 0.0 && beta < INFINITY, "gfl_ops: beta must be finite and >= 0, got ",
              beta);
  QflTensors t;
  t.pred = pred.contiguous();
  t.beta = beta;
  t.activated = activated;
  const auto n = pred.size(0);
  if (target.defined()) {
    t.dense = true;
    TORCH_CHECK(target.sizes() == pred.sizes(), "gfl_ops: target must have the shape of pred ",
                pred.sizes(), ", got ", target.sizes());
    TORCH_CHECK(at::isFloatingType(target.scalar_type()),
                "gfl_ops: target must be a floating tensor, got ", target.scalar_type());
    check_same_device(pred, target, "target");
    // keep the caller's precision: pred's dtype, else its opmath dtype
    const auto tdt = target.scalar_type() == pred.scalar_type() ? pred.scalar_type()
                                                                 : opmath_dtype(pred);
    t.target = target.to(tdt).contiguous();
  } else {
    TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n,
                "gfl_ops: labels must have shape (", n, ",), got ", labels.sizes());
    TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                "gfl_ops: labels must be an integer tensor, got ", labels.scalar_type());
    TORCH_CHECK(scores.dim() == 1 && scores.size(0) == n,
                "gfl_ops: scores must have shape (", n, ",), got ", scores.sizes());
    TORCH_CHECK(at::isFloatingType(scores.scalar_type()),
                "gfl_ops: scores must be a floating tensor, got ", scores.scalar_type());
    check_same_device(pred, labels, "labels");
    check_same_device(pred, scores, "scores");
    t.labels = labels.to(at::kLong).contiguous();
    t.scores = scores.to(opmath_dtype(pred)).contiguous();
  }
  return t;
}

inline RowTensors prepare_rows(const at::Tensor& pred, const at::Tensor& target) {
  check_float_pred(pred, "(M, n+1)");
  TORCH_CHECK(pred.size(1) >= 2, "gfl_ops: pred must have at least 2 bins, got ", pred.size(1));
  RowTensors t;
  t.pred = pred.contiguous();
  if (target.defined()) {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == pred.size(0),
                "gfl_ops: target must have shape (", pred.size(0), ",), got ", target.sizes());
    TORCH_CHECK(at::isFloatingType(target.scalar_type()),
                "gfl_ops: target must be a floating tensor, got ", target.scalar_type());
    check_same_device(pred, target, "target");
    t.target = target.to(opmath_dtype(pred)).contiguous();
  }
  return t;
}

}  // namespace gfl
