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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
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

// ---------------------------------------------------------------------------------------------
// Python entry points (METH_FASTCALL).  The arguments were validated by gfl_ops.functional; the
// checks here only keep a wrong call from this package's own Python from crashing.

// The positional arguments of one call, read while the GIL is held.  `kinds` has one letter per
// argument: 't' tensor, 'd' float, 'b' bool; `names` names them for the error messages.
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
  double number(int i) const { return numbers_[i]; }
  bool flag(int i) const { return flags_[i]; }

 private:
  static constexpr int kMax = 6;
  std::array<Tensor, kMax> tensors_;
  std::array<double, kMax> numbers_{};
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
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* method_table() { return kMethods; }

}  // namespace gfl::eager
