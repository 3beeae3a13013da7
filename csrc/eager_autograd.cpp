// The eager fast path of the operators: C++ autograd Functions around the registered operators,
// exposed as plain functions of the gfl_ops._C module (``_C.integral_eager(pred, fused)`` and so
// on; gfl_ops/_cpp_backend.py calls them).
//
// Why C++: a training step streams megabytes through the caches, so the Python around a kernel
// runs with its code and objects cold.  At 32,000 x 17 the integral's fwd+bwd spent ~0.07-0.1 ms
// of a ~0.5 ms step in the Python autograd.Function, its backward and the torch.ops calls; one
// C++ call for the forward and a C++ backward node cut the step by 10-15% (in-process A/B,
// benchmarks/README.md "Design measurements").
//
// Same state and formulas as the Python autograd of gfl_ops/_cpp_backend.py, for both gradient
// strategies (`fused`, FUSED_GRAD there).  Fused: the forward kernel writes dL/dpred per unit of
// incoming gradient into a workspace; the first backward scales it in place (scale_rows_) and
// hands it out as the gradient, so a step allocates one pred-sized buffer.  The workspace is
// dropped from the node when handed out: AccumulateGrad then owns the only reference and adopts
// it instead of copying it.  Recompute (not fused), a second backward through a retained graph,
// a backward that builds a graph (create_graph) or an incoming gradient that is not a plain
// tensor (vmap, tensor subclasses): the *_backward operators recompute the gradient.
//
// Only for plain eager calls that need the gradient: traced code (torch.compile, make_fx) calls
// the registered operators, whose fake kernels and autograd live in Python.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/autograd.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cmath>
#include <limits>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "eager_autograd.h"

namespace gfl::eager {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using LossAndGrad = std::tuple<Tensor, Tensor>;

// The registered operators, looked up once per signature and name.
template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A gradient that may be written into the saved workspace: a dense tensor that no vmap
// (functorch's, or the legacy one behind autograd.grad(is_grads_batched=True)), tensor subclass
// or functionalization wraps.
bool is_plain(const Tensor& t) {
  constexpr c10::DispatchKeySet kWrappers({c10::DispatchKey::Python,
                                           c10::DispatchKey::Batched,
                                           c10::DispatchKey::FuncTorchBatched,
                                           c10::DispatchKey::FuncTorchGradWrapper,
                                           c10::DispatchKey::Functionalize});
  return !t.key_set().has_any(kWrappers);
}

// Forward bookkeeping shared by the four Functions: keep the workspace of a fused forward
// outside the saved variables (it is handed out, not read back), save the inputs a recompute
// needs.
Tensor finish_forward(AutogradContext* ctx, LossAndGrad result, bool fused,
                      variable_list to_save) {
  if (fused) ctx->saved_data["workspace"] = std::get<1>(result);
  ctx->save_for_backward(std::move(to_save));
  ctx->set_materialize_grads(false);
  return std::get<0>(std::move(result));
}

// The forward's workspace scaled by grad_loss, in place, handed out once; nullopt when the
// gradient must be recomputed instead (or the forward did not fuse it).
std::optional<Tensor> take_workspace(AutogradContext* ctx, const Tensor& grad_loss) {
  auto it = ctx->saved_data.find("workspace");
  if (it == ctx->saved_data.end() || c10::GradMode::is_enabled() || !is_plain(grad_loss))
    return std::nullopt;
  Tensor workspace = it->second.toTensor();
  ctx->saved_data.erase(it);
  static const auto scale_rows_ = find_op<void(Tensor&, const Tensor&)>("gfl_ops::scale_rows_");
  {
    // fp32 math, one rounding to the buffer's dtype; no autograd of its own is involved
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    scale_rows_.call(workspace, grad_loss);
  }
  return workspace;
}

// The backward of every Function: a gradient for pred only (the other forward arguments get
// none), the handed-out workspace or, failing that, recompute(saved inputs).
template <class Recompute>
variable_list pred_grad(AutogradContext* ctx, const Tensor& grad_loss, size_t n_inputs,
                        Recompute&& recompute) {
  variable_list grads(n_inputs);
  if (!grad_loss.defined()) return grads;  // the output took no part in this backward
  if (auto workspace = take_workspace(ctx, grad_loss))
    grads[0] = std::move(*workspace);
  else
    grads[0] = recompute(ctx->get_saved_variables());
  return grads;
}

struct QflFunction : torch::autograd::Function<QflFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& labels,
                        const Tensor& scores, double beta, bool activated, bool fused) {
    static const auto op =
        find_op<LossAndGrad(const Tensor&, const Tensor&, const Tensor&, double, bool, bool,
                            const std::optional<Tensor>&)>("gfl_ops::qfl");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["activated"] = activated;
    return finish_forward(ctx, op.call(pred, labels, scores, beta, activated, fused, {}),
                          fused, {pred, labels, scores});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, double, bool)>("gfl_ops::qfl_backward");
    const Tensor& g = grads[0];
    return pred_grad(ctx, g, 6, [&](const variable_list& s) {
      return op.call(g, s[0], s[1], s[2], ctx->saved_data["beta"].toDouble(),
                     ctx->saved_data["activated"].toBool());
    });
  }
};

struct QflDenseFunction : torch::autograd::Function<QflDenseFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target,
                        double beta, bool activated, bool fused) {
    static const auto op =
        find_op<LossAndGrad(const Tensor&, const Tensor&, double, bool, bool,
                            const std::optional<Tensor>&)>("gfl_ops::qfl_dense");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["activated"] = activated;
    return finish_forward(ctx, op.call(pred, target, beta, activated, fused, {}), fused,
                          {pred, target});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool)>(
            "gfl_ops::qfl_dense_backward");
    const Tensor& g = grads[0];
    return pred_grad(ctx, g, 5, [&](const variable_list& s) {
      return op.call(g, s[0], s[1], ctx->saved_data["beta"].toDouble(),
                     ctx->saved_data["activated"].toBool());
    });
  }
};

struct DflFunction : torch::autograd::Function<DflFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target,
                        bool fused) {
    static const auto op =
        find_op<LossAndGrad(const Tensor&, const Tensor&, bool, const std::optional<Tensor>&)>(
            "gfl_ops::dfl");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return finish_forward(ctx, op.call(pred, target, fused, {}), fused, {pred, target});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("gfl_ops::dfl_backward");
    const Tensor& g = grads[0];
    return pred_grad(ctx, g, 3, [&](const variable_list& s) { return op.call(g, s[0], s[1]); });
  }
};

struct IntegralFunction : torch::autograd::Function<IntegralFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, bool fused) {
    static const auto op = find_op<LossAndGrad(const Tensor&, bool)>("gfl_ops::integral");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return finish_forward(ctx, op.call(pred, fused), fused, {pred});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&)>("gfl_ops::integral_backward");
    const Tensor& g = grads[0];
    return pred_grad(ctx, g, 2, [&](const variable_list& s) { return op.call(g, s[0]); });
  }
};

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
Tensor reduction_scale(const std::optional<Tensor>& weight, double unit, const Tensor& pred) {
  const auto dtype = at::toOpMathType(pred.scalar_type());
  const int64_t n = pred.size(0);
  if (!weight.has_value()) return at::scalar_tensor(unit, pred.options().dtype(dtype)).expand({n});
  const Tensor w = weight->to(dtype).contiguous();  // no copy for a float32 (float64) weight
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n, "gfl_ops._C.reduced_loss_eager: weight must have "
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
                        const std::optional<Tensor>& scores, const std::optional<Tensor>& weight,
                        double unit, int64_t kind, double beta, bool activated) {
    static const auto qfl = find_op<LossAndGrad(const Tensor&, const Tensor&, const Tensor&,
                                                double, bool, bool, const std::optional<Tensor>&)>(
        "gfl_ops::qfl");
    static const auto qfl_dense =
        find_op<LossAndGrad(const Tensor&, const Tensor&, double, bool, bool,
                            const std::optional<Tensor>&)>("gfl_ops::qfl_dense");
    static const auto dfl =
        find_op<LossAndGrad(const Tensor&, const Tensor&, bool, const std::optional<Tensor>&)>(
            "gfl_ops::dfl");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Tensor scale = reduction_scale(weight, unit, pred);
    LossAndGrad result;
    if (kind == kReducedQfl) {
      TORCH_CHECK(scores.has_value(), "gfl_ops._C.reduced_loss_eager: qfl needs scores");
      result = qfl.call(pred, target, *scores, beta, activated, true, scale);
    } else if (kind == kReducedQflDense) {
      result = qfl_dense.call(pred, target, beta, activated, true, scale);
    } else {
      TORCH_CHECK(kind == kReducedDfl, "gfl_ops._C.reduced_loss_eager: unknown kind ", kind);
      result = dfl.call(pred, target, true, scale);
    }
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["activated"] = activated;
    const Tensor rows = finish_forward(ctx, std::move(result), true,
                                       {pred, target, scores.value_or(Tensor()), scale});
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

// ---------------------------------------------------------------------------------------------
// Python entry points (METH_FASTCALL).  The arguments were validated by gfl_ops.functional; the
// checks here only keep a wrong call from this package's own Python from crashing.

// The positional arguments of one call, read while the GIL is held.  `kinds` has one letter per
// argument: 't' tensor, 'o' tensor or None, 'i' int, 'd' float, 'b' bool; `names` names them
// for the error messages.
class Args {
 public:
  Args(PyObject* const* args, Py_ssize_t nargs, const char* fn, const char* kinds,
       std::initializer_list<const char*> names) {
    const auto expected = static_cast<Py_ssize_t>(std::strlen(kinds));
    TORCH_CHECK_TYPE(nargs == expected, "gfl_ops._C.", fn, " takes ", expected,
                     " arguments, got ", nargs);
    auto name = names.begin();
    for (Py_ssize_t i = 0; i < nargs; ++i, ++name) {
      PyObject* obj = args[i];
      if (kinds[i] == 't') {
        TORCH_CHECK_TYPE(THPVariable_Check(obj), "gfl_ops._C.", fn, ": ", *name,
                         " must be a torch.Tensor");
        tensors_[i] = THPVariable_Unpack(obj);
      } else if (kinds[i] == 'o') {  // a tensor or None
        if (obj != Py_None) {
          TORCH_CHECK_TYPE(THPVariable_Check(obj), "gfl_ops._C.", fn, ": ", *name,
                           " must be a torch.Tensor or None");
          tensors_[i] = THPVariable_Unpack(obj);
        }
      } else if (kinds[i] == 'i') {
        integers_[i] = PyLong_AsLongLong(obj);
        if (integers_[i] == -1 && PyErr_Occurred()) throw python_error();
      } else if (kinds[i] == 'd') {
        numbers_[i] = PyFloat_AsDouble(obj);
        if (numbers_[i] == -1.0 && PyErr_Occurred()) throw python_error();
      } else {
        const int truth = PyObject_IsTrue(obj);
        if (truth < 0) throw python_error();
        flags_[i] = truth != 0;
      }
    }
  }
  const Tensor& tensor(int i) const { return tensors_[i]; }
  std::optional<Tensor> optional_tensor(int i) const {
    return tensors_[i].defined() ? std::optional<Tensor>(tensors_[i]) : std::nullopt;
  }
  int64_t integer(int i) const { return integers_[i]; }
  double number(int i) const { return numbers_[i]; }
  bool flag(int i) const { return flags_[i]; }

 private:
  static constexpr int kMax = 8;
  std::array<Tensor, kMax> tensors_;
  std::array<double, kMax> numbers_{};
  std::array<int64_t, kMax> integers_{};
  std::array<bool, kMax> flags_{};
};

// Runs fn (which builds the autograd node and launches the kernel) without the GIL.
template <class Fn>
PyObject* wrap_result(Fn&& fn) {
  Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = fn();
  }
  return THPVariable_Wrap(std::move(out));
}

PyObject* qfl_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "qfl_eager", "tttdbb",
               {"pred", "labels", "scores", "beta", "activated", "fused"});
  return wrap_result([&] {
    return QflFunction::apply(a.tensor(0), a.tensor(1), a.tensor(2), a.number(3), a.flag(4),
                              a.flag(5));
  });
  END_HANDLE_TH_ERRORS
}

PyObject* qfl_dense_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "qfl_dense_eager", "ttdbb",
               {"pred", "target", "beta", "activated", "fused"});
  return wrap_result([&] {
    return QflDenseFunction::apply(a.tensor(0), a.tensor(1), a.number(2), a.flag(3), a.flag(4));
  });
  END_HANDLE_TH_ERRORS
}

PyObject* dfl_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "dfl_eager", "ttb", {"pred", "target", "fused"});
  return wrap_result([&] { return DflFunction::apply(a.tensor(0), a.tensor(1), a.flag(2)); });
  END_HANDLE_TH_ERRORS
}

PyObject* integral_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "integral_eager", "tb", {"pred", "fused"});
  return wrap_result([&] { return IntegralFunction::apply(a.tensor(0), a.flag(1)); });
  END_HANDLE_TH_ERRORS
}

PyObject* reduced_loss_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "reduced_loss_eager", "ttoodidb",
               {"pred", "target", "scores", "weight", "unit", "kind", "beta", "activated"});
  return wrap_result([&] {
    return ReducedLossFunction::apply(a.tensor(0), a.tensor(1), a.optional_tensor(2),
                                      a.optional_tensor(3), a.number(4), a.integer(5),
                                      a.number(6), a.flag(7));
  });
  END_HANDLE_TH_ERRORS
}

// (min, max) of a floating CPU tensor as two Python floats, NaN in both when it holds a NaN:
// the value checks of gfl_ops/functional.py (DFL targets, QFL scores), with the Python of
// torch.aminmax + two item() calls and their tensors' wrapping left out.
PyObject* value_range(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "value_range", "t", {"tensor"});
  const Tensor& t = a.tensor(0);
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_floating_point() && t.numel() > 0,
                    "gfl_ops._C.value_range: tensor must be a non-empty floating CPU tensor");
  double lo = 0, hi = 0;
  {
    pybind11::gil_scoped_release no_gil;
    // torch's own vectorised, NaN-propagating reduction, read back without Python in between
    const auto [min, max] = at::aminmax(t);
    lo = min.item<double>();
    hi = max.item<double>();
  }
  return Py_BuildValue("(dd)", lo, hi);
  END_HANDLE_TH_ERRORS
}

template <PyObject* (*fn)(PyObject*, PyObject* const*, Py_ssize_t)>
PyCFunction as_cfunction() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(fn));
}

PyMethodDef kMethods[] = {
    {"qfl_eager", as_cfunction<qfl_eager>(), METH_FASTCALL,
     "qfl_eager(pred, labels, scores, beta, activated, fused) -> loss (N,)"},
    {"qfl_dense_eager", as_cfunction<qfl_dense_eager>(), METH_FASTCALL,
     "qfl_dense_eager(pred, target, beta, activated, fused) -> loss (N,)"},
    {"dfl_eager", as_cfunction<dfl_eager>(), METH_FASTCALL,
     "dfl_eager(pred, target, fused) -> loss (M,)"},
    {"integral_eager", as_cfunction<integral_eager>(), METH_FASTCALL,
     "integral_eager(pred, fused) -> y_hat (M,)"},
    {"value_range", as_cfunction<value_range>(), METH_FASTCALL,
     "value_range(tensor) -> (min, max) as floats, NaN in both for a NaN (CPU, floating)"},
    {"reduced_loss_eager", as_cfunction<reduced_loss_eager>(), METH_FASTCALL,
     "reduced_loss_eager(pred, target, scores | None, weight | None, unit, kind, beta, activated)"
     " -> 0-d loss sum_i l_i * weight_i * unit (kind 0 qfl, 1 qfl_dense, 2 dfl)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* method_table() { return kMethods; }

}  // namespace gfl::eager
