// Autograd of the gfl_ops operators, in one place: a C++ node per operator, registered at the
// dispatcher's Autograd key (TORCH_LIBRARY_IMPL below, as torchvision's csrc/ops/autograd/ do),
// so every way of calling an operator -- torch.ops.gfl_ops.*, the module's fast entry points
// (python_module.cpp), torch.compile (AOTAutograd traces these nodes), make_fx, functorch --
// gets the same backward.  The gradient operators (*_backward) have their own derivative in
// gfl_ops/_second_order.py (double backward); the reduced CPU losses (reduced_loss below) are a
// node over the same operators.
//
// Why C++: a training step streams megabytes through the caches, so the Python around a kernel
// runs with its code and objects cold.  At 32,000 x 17 the integral's fwd+bwd spent ~0.07-0.1 ms
// of a ~0.5 ms step in a Python autograd.Function, its backward and the torch.ops calls; a C++
// node cut the step by 10-15% (benchmarks/README.md, "Design measurements").
//
// Gradient strategy (`with_grad`, chosen per device by gfl_ops/_cpp_backend.py FUSED_GRAD):
// fused, the forward kernel writes dL/dpred per unit of incoming gradient into a workspace (the
// operator's second output); the first backward scales it by grad_loss in place (scale_rows_)
// and hands it out as the gradient, so a step allocates one pred-sized buffer.  The workspace
// is dropped from the node when handed out: AccumulateGrad then owns the only reference (when
// the caller dropped the operator's second output, as the fast entry points do) and adopts it
// instead of copying it.  Traced code (AOTAutograd's functional tensors, fake tensors) or a
// wrapped incoming gradient (vmap, subclasses) scale it out of place (scale_rows).  Recompute
// (with_grad false), a second backward through a retained graph, or a backward that builds a
// graph (create_graph): the *_backward operators recompute the gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "autograd.h"
#include "torch_compat.h"

namespace gfl::autograd {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using LossAndGrad = std::tuple<Tensor, Tensor>;

bool is_plain(const Tensor& t) {
  constexpr c10::DispatchKeySet kWrappers({c10::DispatchKey::Python,
                                           c10::DispatchKey::Batched,
                                           c10::DispatchKey::FuncTorchBatched,
                                           c10::DispatchKey::FuncTorchGradWrapper,
                                           c10::DispatchKey::Functionalize});
  return !t.key_set().has_any(kWrappers);
}

namespace {


// Forward bookkeeping shared by the operator nodes: keep the workspace of a fused forward
// outside the saved variables (it is handed out, not read back), save the inputs a recompute
// needs, and return (loss, workspace) with the workspace marked as receiving no gradient
// (without that, autograd would zero-fill a pred-sized gradient for it on every backward).
variable_list finish_forward(AutogradContext* ctx, LossAndGrad result, bool with_grad,
                             variable_list to_save) {
  auto [loss, grad] = std::move(result);
  if (with_grad) ctx->saved_data["workspace"] = grad;
  ctx->mark_non_differentiable({grad});
  ctx->save_for_backward(std::move(to_save));
  ctx->set_materialize_grads(false);
  return {std::move(loss), std::move(grad)};
}

// The forward's workspace scaled by grad_loss, handed out once; nullopt when the gradient must
// be recomputed instead (no workspace, already handed out, or a backward under create_graph,
// where the saved gradient would be a constant with no second-order term).
gfl::optional<Tensor> take_workspace(AutogradContext* ctx, const Tensor& grad_loss) {
  auto it = ctx->saved_data.find("workspace");
  if (it == ctx->saved_data.end() || c10::GradMode::is_enabled()) return gfl::nullopt;
  Tensor workspace = it->second.toTensor();
  ctx->saved_data.erase(it);
  // fp32 math, one rounding to the buffer's dtype; no autograd of their own is involved
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (is_plain(grad_loss) && is_plain(workspace)) {
    static const auto scale_rows_ =
        find_op<void(Tensor&, const Tensor&)>("gfl_ops::scale_rows_");
    scale_rows_.call(workspace, grad_loss);
    return workspace;
  }
  static const auto scale_rows =
      find_op<Tensor(const Tensor&, const Tensor&)>("gfl_ops::scale_rows");
  return scale_rows.call(workspace, grad_loss);
}

// The backward of every operator node: a gradient for pred only (the other arguments get
// none), the handed-out workspace or, failing that, recompute(saved inputs).
template <class Recompute>
variable_list pred_grad(AutogradContext* ctx, const Tensor& grad_loss, size_t n_inputs,
                        Recompute&& recompute) {
  variable_list grads(n_inputs);
  if (!grad_loss.defined()) return grads;  // the loss output took no part in this backward
  if (auto workspace = take_workspace(ctx, grad_loss))
    grads[0] = std::move(*workspace);
  else
    grads[0] = recompute(ctx->get_saved_variables());
  return grads;
}

// grad_scale is for callers that differentiate the reduced loss themselves (reduced_loss
// below, which calls the operator below autograd): under autograd it would be silently wrong.
void refuse_grad_scale(const gfl::optional<Tensor>& grad_scale, const Tensor& pred) {
  TORCH_CHECK(!(grad_scale.has_value() && grad_scale->defined() &&
                c10::GradMode::is_enabled() && pred.requires_grad()),
              "gfl_ops: grad_scale is for callers that differentiate the reduced loss "
              "themselves (gfl_ops/_reduced_loss.py); call the operator without it, or under "
              "torch.no_grad()");
}

LossAndGrad as_pair(variable_list out) { return {std::move(out[0]), std::move(out[1])}; }

struct QflNode : torch::autograd::Function<QflNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& pred, const Tensor& labels,
                               const Tensor& scores, double beta, bool activated, bool with_grad,
                               const gfl::optional<Tensor>& grad_scale) {
    static const auto op =
        find_op<LossAndGrad(const Tensor&, const Tensor&, const Tensor&, double, bool, bool,
                            const gfl::optional<Tensor>&)>("gfl_ops::qfl");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["activated"] = activated;
    return finish_forward(ctx, op.call(pred, labels, scores, beta, activated, with_grad,
                                       grad_scale),
                          with_grad, {pred, labels, scores});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, double, bool)>("gfl_ops::qfl_backward");
    const Tensor& g = grads[0];
    return pred_grad(ctx, g, 7, [&](const variable_list& s) {
      return op.call(g, s[0], s[1], s[2], ctx->saved_data["beta"].toDouble(),
                     ctx->saved_data["activated"].toBool());
    });
  }
};

struct QflDenseNode : torch::autograd::Function<QflDenseNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target,
                               double beta, bool activated, bool with_grad,
                               const gfl::optional<Tensor>& grad_scale) {
    static const auto op =
        find_op<LossAndGrad(const Tensor&, const Tensor&, double, bool, bool,
                            const gfl::optional<Tensor>&)>("gfl_ops::qfl_dense");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["activated"] = activated;
    return finish_forward(ctx, op.call(pred, target, beta, activated, with_grad, grad_scale),
                          with_grad, {pred, target});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool)>(
            "gfl_ops::qfl_dense_backward");
    const Tensor& g = grads[0];
    return pred_grad(ctx, g, 6, [&](const variable_list& s) {
      return op.call(g, s[0], s[1], ctx->saved_data["beta"].toDouble(),
                     ctx->saved_data["activated"].toBool());
    });
  }
};

struct DflNode : torch::autograd::Function<DflNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target,
                               bool with_grad, const gfl::optional<Tensor>& grad_scale) {
    static const auto op =
        find_op<LossAndGrad(const Tensor&, const Tensor&, bool, const gfl::optional<Tensor>&)>(
            "gfl_ops::dfl");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return finish_forward(ctx, op.call(pred, target, with_grad, grad_scale), with_grad,
                          {pred, target});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("gfl_ops::dfl_backward");
    const Tensor& g = grads[0];
    return pred_grad(ctx, g, 4, [&](const variable_list& s) { return op.call(g, s[0], s[1]); });
  }
};

struct IntegralNode : torch::autograd::Function<IntegralNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& pred, bool with_grad) {
    static const auto op = find_op<LossAndGrad(const Tensor&, bool)>("gfl_ops::integral");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return finish_forward(ctx, op.call(pred, with_grad), with_grad, {pred});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&)>("gfl_ops::integral_backward");
    const Tensor& g = grads[0];
    return pred_grad(ctx, g, 2, [&](const variable_list& s) { return op.call(g, s[0]); });
  }
};

// The Autograd-key kernels: the operators' schemas (csrc/ops.cpp), one node each.
LossAndGrad qfl_autograd(const Tensor& pred, const Tensor& labels, const Tensor& scores,
                         double beta, bool activated, bool with_grad,
                         const gfl::optional<Tensor>& grad_scale) {
  refuse_grad_scale(grad_scale, pred);
  return as_pair(
      QflNode::apply(pred, labels, scores, beta, activated, with_grad, grad_scale));
}

LossAndGrad qfl_dense_autograd(const Tensor& pred, const Tensor& target, double beta,
                               bool activated, bool with_grad,
                               const gfl::optional<Tensor>& grad_scale) {
  refuse_grad_scale(grad_scale, pred);
  return as_pair(QflDenseNode::apply(pred, target, beta, activated, with_grad, grad_scale));
}

LossAndGrad dfl_autograd(const Tensor& pred, const Tensor& target, bool with_grad,
                         const gfl::optional<Tensor>& grad_scale) {
  refuse_grad_scale(grad_scale, pred);
  return as_pair(DflNode::apply(pred, target, with_grad, grad_scale));
}

LossAndGrad integral_autograd(const Tensor& pred, bool with_grad) {
  return as_pair(IntegralNode::apply(pred, with_grad));
}

// The reduced loss L = sum_i scale_i * l_i ('mean' / 'sum' with weights and avg_factor folded
// into scale = dL/dl, computed by gfl_ops/_reduced_loss.py): the kernel gets scale as its
// grad_scale, so its gradient buffer is dL/dpred already, and the backward hands it out untouched
// for the usual incoming gradient of 1 (loss.backward()), or scales it in place by that scalar.
// One node for QFL (target = labels, scores given), dense QFL and DFL (`kind`).  A second
// backward, create_graph or a wrapped incoming gradient recompute with the *_backward operator
// fed scale * g.
enum ReducedKind : int64_t { kReducedQfl = 0, kReducedQflDense = 1, kReducedDfl = 2 };

// dL/dl_i = weight_i * unit (N,) in the loss dtype (opmath of pred), or unit expanded without a
// weight.  A plain loop: a TensorIterator multiply cost ~20 us a step at 32,000 rows with the
// caches cold from the kernels' streams (fresh inputs), the loop a few.  Rounds as torch's
// `weight * unit` does (unit cast to the loss dtype, one product).
Tensor reduction_scale(const gfl::optional<Tensor>& weight, double unit, const Tensor& pred) {
  const auto dtype = at::toOpMathType(pred.scalar_type());
  const int64_t n = pred.size(0);
  if (!weight.has_value()) return at::scalar_tensor(unit, pred.options().dtype(dtype)).expand({n});
  const Tensor w = weight->to(dtype).contiguous();  // no copy for a float32 (float64) weight
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n, "gfl_ops: the reduced loss's weight must have "
              "shape (", n, ",)");
  Tensor scale = at::empty({n}, w.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "gfl_reduction_scale", [&] {
    const scalar_t u = static_cast<scalar_t>(unit);
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    scalar_t* dst = scale.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * u;
  });
  return scale;
}

struct ReducedLossFunction : torch::autograd::Function<ReducedLossFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target,
                        const gfl::optional<Tensor>& scores, const gfl::optional<Tensor>& weight,
                        double unit, int64_t kind, double beta, bool activated) {
    static const auto qfl = find_op<LossAndGrad(const Tensor&, const Tensor&, const Tensor&,
                                                double, bool, bool, const gfl::optional<Tensor>&)>(
        "gfl_ops::qfl");
    static const auto qfl_dense =
        find_op<LossAndGrad(const Tensor&, const Tensor&, double, bool, bool,
                            const gfl::optional<Tensor>&)>("gfl_ops::qfl_dense");
    static const auto dfl =
        find_op<LossAndGrad(const Tensor&, const Tensor&, bool, const gfl::optional<Tensor>&)>(
            "gfl_ops::dfl");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Tensor scale = reduction_scale(weight, unit, pred);
    LossAndGrad result;
    if (kind == kReducedQfl) {
      TORCH_CHECK(scores.has_value(), "gfl_ops: the reduced qfl needs scores");
      result = qfl.call(pred, target, *scores, beta, activated, true, scale);
    } else if (kind == kReducedQflDense) {
      result = qfl_dense.call(pred, target, beta, activated, true, scale);
    } else {
      TORCH_CHECK(kind == kReducedDfl, "gfl_ops: unknown reduced loss kind ", kind);
      result = dfl.call(pred, target, true, scale);
    }
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["activated"] = activated;
    ctx->saved_data["workspace"] = std::get<1>(result);
    ctx->save_for_backward({pred, target, scores.value_or(Tensor()), scale});
    ctx->set_materialize_grads(false);
    const Tensor& rows = std::get<0>(result);
    return rows.numel() > 0 ? rows.dot(scale) : rows.sum();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto qfl_backward =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool)>(
            "gfl_ops::qfl_backward");
    static const auto qfl_dense_backward =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool)>(
            "gfl_ops::qfl_dense_backward");
    static const auto dfl_backward =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("gfl_ops::dfl_backward");
    static const auto scale_rows_ = find_op<void(Tensor&, const Tensor&)>("gfl_ops::scale_rows_");
    const Tensor& g = grads[0];  // 0-d
    variable_list out(8);
    if (!g.defined()) return out;
    auto it = ctx->saved_data.find("workspace");
    if (it != ctx->saved_data.end() && !c10::GradMode::is_enabled() && is_plain(g)) {
      Tensor workspace = it->second.toTensor();
      ctx->saved_data.erase(it);  // handed out once: a second backward recomputes
      if (g.item<double>() != 1.0) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        scale_rows_.call(workspace, g.expand({workspace.size(0)}));
      }
      out[0] = std::move(workspace);
      return out;
    }
    const variable_list s = ctx->get_saved_variables();
    const Tensor scaled = s[3].mul(g);  // differentiable in g under create_graph
    const int64_t kind = ctx->saved_data["kind"].toInt();
    const double beta = ctx->saved_data["beta"].toDouble();
    const bool activated = ctx->saved_data["activated"].toBool();
    if (kind == kReducedQfl)
      out[0] = qfl_backward.call(scaled, s[0], s[1], s[2], beta, activated);
    else if (kind == kReducedQflDense)
      out[0] = qfl_dense_backward.call(scaled, s[0], s[1], beta, activated);
    else
      out[0] = dfl_backward.call(scaled, s[0], s[1]);
    return out;
  }
};

}  // namespace

Tensor reduced_loss(const Tensor& pred, const Tensor& target, const gfl::optional<Tensor>& scores,
                    const gfl::optional<Tensor>& weight, double unit, int64_t kind, double beta,
                    bool activated) {
  return ReducedLossFunction::apply(pred, target, scores, weight, unit, kind, beta, activated);
}

}  // namespace gfl::autograd

TORCH_LIBRARY_IMPL(gfl_ops, Autograd, m) {
  m.impl("qfl", &gfl::autograd::qfl_autograd);
  m.impl("qfl_dense", &gfl::autograd::qfl_dense_autograd);
  m.impl("dfl", &gfl::autograd::dfl_autograd);
  m.impl("integral", &gfl::autograd::integral_autograd);
}
