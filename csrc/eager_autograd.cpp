// The eager fast path of the fused-gradient operators: C++ autograd Functions around the
// registered operators, exposed as plain functions of the gfl_ops._C module
// (``_C.integral_fused_eager(pred)`` and so on; gfl_ops/_cpp_backend.py calls them).
//
// Why C++: a training step streams megabytes through the caches, so the Python around a kernel
// runs with its code and objects cold.  At 32,000 x 17 the integral's fwd+bwd spent ~0.07-0.1 ms
// of a ~0.5 ms step in the Python autograd.Function, its backward and the torch.ops calls; one
// C++ call for the forward and a C++ backward node cut the step by 10-15% (in-process A/B,
// benchmarks/README.md "Design measurements").
//
// Same state and formulas as the Python autograd of gfl_ops/_cpp_backend.py: the forward kernel
// writes dL/dpred per unit of incoming gradient into a workspace; the first backward scales it
// in place (scale_rows_) and hands it out as the gradient, so a step allocates one pred-sized
// buffer.  The workspace is dropped from the node when handed out: AccumulateGrad then owns the
// only reference and adopts it instead of copying it.  A second backward through a retained
// graph, a backward that builds a graph (create_graph) or an incoming gradient that is not a
// plain tensor (functorch, tensor subclasses) recompute through the *_backward operators.
//
// Only for plain eager calls that need the gradient: traced code (torch.compile, make_fx) calls
// the registered operators, whose fake kernels and autograd live in Python.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

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

// Forward bookkeeping shared by the four Functions: keep the workspace outside the saved
// variables (it is handed out, not read back), save the inputs a recompute needs.
Tensor finish_forward(AutogradContext* ctx, LossAndGrad result, variable_list to_save) {
  ctx->saved_data["workspace"] = std::get<1>(result);
  ctx->save_for_backward(std::move(to_save));
  ctx->set_materialize_grads(false);
  return std::get<0>(std::move(result));
}

// The forward's workspace scaled by grad_loss, in place, handed out once; nullopt when the
// gradient must be recomputed instead.
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

// A gradient for pred only; the other forward arguments get none.
variable_list pred_grad(Tensor grad, size_t n_inputs) {
  variable_list grads(n_inputs);
  grads[0] = std::move(grad);
  return grads;
}

struct QflFunction : torch::autograd::Function<QflFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& labels,
                        const Tensor& scores, double beta, bool activated) {
    static const auto op =
        find_op<LossAndGrad(const Tensor&, const Tensor&, const Tensor&, double, bool, bool)>(
            "gfl_ops::qfl");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["activated"] = activated;
    return finish_forward(ctx, op.call(pred, labels, scores, beta, activated, true),
                          {pred, labels, scores});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& g = grads[0];
    if (!g.defined()) return variable_list(5);
    if (auto ws = take_workspace(ctx, g)) return pred_grad(std::move(*ws), 5);
    static const auto op = find_op<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, double, bool)>("gfl_ops::qfl_backward");
    const auto s = ctx->get_saved_variables();
    return pred_grad(op.call(g, s[0], s[1], s[2], ctx->saved_data["beta"].toDouble(),
                             ctx->saved_data["activated"].toBool()),
                     5);
  }
};

struct QflDenseFunction : torch::autograd::Function<QflDenseFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target,
                        double beta, bool activated) {
    static const auto op =
        find_op<LossAndGrad(const Tensor&, const Tensor&, double, bool, bool)>(
            "gfl_ops::qfl_dense");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["activated"] = activated;
    return finish_forward(ctx, op.call(pred, target, beta, activated, true), {pred, target});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& g = grads[0];
    if (!g.defined()) return variable_list(4);
    if (auto ws = take_workspace(ctx, g)) return pred_grad(std::move(*ws), 4);
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool)>(
            "gfl_ops::qfl_dense_backward");
    const auto s = ctx->get_saved_variables();
    return pred_grad(op.call(g, s[0], s[1], ctx->saved_data["beta"].toDouble(),
                             ctx->saved_data["activated"].toBool()),
                     4);
  }
};

struct DflFunction : torch::autograd::Function<DflFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target) {
    static const auto op =
        find_op<LossAndGrad(const Tensor&, const Tensor&, bool)>("gfl_ops::dfl");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return finish_forward(ctx, op.call(pred, target, true), {pred, target});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& g = grads[0];
    if (!g.defined()) return variable_list(2);
    if (auto ws = take_workspace(ctx, g)) return pred_grad(std::move(*ws), 2);
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("gfl_ops::dfl_backward");
    const auto s = ctx->get_saved_variables();
    return pred_grad(op.call(g, s[0], s[1]), 2);
  }
};

struct IntegralFunction : torch::autograd::Function<IntegralFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred) {
    static const auto op = find_op<LossAndGrad(const Tensor&, bool)>("gfl_ops::integral");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return finish_forward(ctx, op.call(pred, true), {pred});
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& g = grads[0];
    if (!g.defined()) return variable_list(1);
    if (auto ws = take_workspace(ctx, g)) return pred_grad(std::move(*ws), 1);
    static const auto op =
        find_op<Tensor(const Tensor&, const Tensor&)>("gfl_ops::integral_backward");
    const auto s = ctx->get_saved_variables();
    return pred_grad(op.call(g, s[0]), 1);
  }
};

// ---------------------------------------------------------------------------------------------
// Python entry points (METH_FASTCALL).  The arguments were validated by gfl_ops.functional; the
// checks here only keep a wrong call from this package's own Python from crashing.

const Tensor& tensor_arg(PyObject* obj, const char* what) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "gfl_ops._C: ", what, " must be a torch.Tensor");
  return THPVariable_Unpack(obj);
}

void check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char* fn) {
  TORCH_CHECK_TYPE(nargs == expected, "gfl_ops._C.", fn, " takes ", expected,
                   " arguments, got ", nargs);
}

double float_arg(PyObject* obj) {
  const double value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) throw python_error();
  return value;
}

bool bool_arg(PyObject* obj) {
  const int value = PyObject_IsTrue(obj);
  if (value < 0) throw python_error();
  return value != 0;
}

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

PyObject* qfl_fused_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 5, "qfl_fused_eager");
  const Tensor& pred = tensor_arg(args[0], "pred");
  const Tensor& labels = tensor_arg(args[1], "labels");
  const Tensor& scores = tensor_arg(args[2], "scores");
  const double beta = float_arg(args[3]);
  const bool activated = bool_arg(args[4]);
  return wrap_result([&] { return QflFunction::apply(pred, labels, scores, beta, activated); });
  END_HANDLE_TH_ERRORS
}

PyObject* qfl_dense_fused_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 4, "qfl_dense_fused_eager");
  const Tensor& pred = tensor_arg(args[0], "pred");
  const Tensor& target = tensor_arg(args[1], "target");
  const double beta = float_arg(args[2]);
  const bool activated = bool_arg(args[3]);
  return wrap_result([&] { return QflDenseFunction::apply(pred, target, beta, activated); });
  END_HANDLE_TH_ERRORS
}

PyObject* dfl_fused_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 2, "dfl_fused_eager");
  const Tensor& pred = tensor_arg(args[0], "pred");
  const Tensor& target = tensor_arg(args[1], "target");
  return wrap_result([&] { return DflFunction::apply(pred, target); });
  END_HANDLE_TH_ERRORS
}

PyObject* integral_fused_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs(nargs, 1, "integral_fused_eager");
  const Tensor& pred = tensor_arg(args[0], "pred");
  return wrap_result([&] { return IntegralFunction::apply(pred); });
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"qfl_fused_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(qfl_fused_eager)),
     METH_FASTCALL, "qfl_fused_eager(pred, labels, scores, beta, activated) -> loss (N,)"},
    {"qfl_dense_fused_eager",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(qfl_dense_fused_eager)),
     METH_FASTCALL, "qfl_dense_fused_eager(pred, target, beta, activated) -> loss (N,)"},
    {"dfl_fused_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(dfl_fused_eager)),
     METH_FASTCALL, "dfl_fused_eager(pred, target) -> loss (M,)"},
    {"integral_fused_eager",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(integral_fused_eager)), METH_FASTCALL,
     "integral_fused_eager(pred) -> y_hat (M,)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* method_table() { return kMethods; }

}  // namespace gfl::eager
