// The Python functions of the gfl_ops._C module (METH_FASTCALL), the fast way in from
// gfl_ops/_cpp_backend.py for eager calls: one C call per operator call, through the dispatcher
// (so the operators' Autograd kernels of autograd.cpp, tracing modes and tensor subclasses all
// apply as they do to torch.ops.gfl_ops.*), without the Python argument parsing of torch.ops
// (~5 us a call hot, several times that with the cold caches of a training step).  torch.compile
// cannot trace into them: traced code calls torch.ops.gfl_ops.* instead.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/aminmax.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cstring>
#include <initializer_list>
#include <tuple>

#include "autograd.h"
#include "python_module.h"
#include "torch_compat.h"

namespace gfl::python {
namespace {

using at::Tensor;
using LossAndGrad = std::tuple<Tensor, Tensor>;
using autograd::find_op;


// The arguments were validated by gfl_ops.functional; the checks here only keep a wrong call
// from this package's own Python from crashing.

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
  gfl::optional<Tensor> optional_tensor(int i) const {
    return tensors_[i].defined() ? gfl::optional<Tensor>(tensors_[i]) : gfl::nullopt;
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
  static const auto op =
      find_op<LossAndGrad(const Tensor&, const Tensor&, const Tensor&, double, bool, bool,
                          const gfl::optional<Tensor>&)>("gfl_ops::qfl");
  return wrap_result([&] {
    return std::get<0>(op.call(a.tensor(0), a.tensor(1), a.tensor(2), a.number(3), a.flag(4),
                               a.flag(5), gfl::nullopt));
  });
  END_HANDLE_TH_ERRORS
}

PyObject* qfl_dense_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "qfl_dense_eager", "ttdbb",
               {"pred", "target", "beta", "activated", "fused"});
  static const auto op =
      find_op<LossAndGrad(const Tensor&, const Tensor&, double, bool, bool,
                          const gfl::optional<Tensor>&)>("gfl_ops::qfl_dense");
  return wrap_result([&] {
    return std::get<0>(
        op.call(a.tensor(0), a.tensor(1), a.number(2), a.flag(3), a.flag(4), gfl::nullopt));
  });
  END_HANDLE_TH_ERRORS
}

PyObject* dfl_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "dfl_eager", "ttb", {"pred", "target", "fused"});
  static const auto op =
      find_op<LossAndGrad(const Tensor&, const Tensor&, bool, const gfl::optional<Tensor>&)>(
          "gfl_ops::dfl");
  return wrap_result(
      [&] { return std::get<0>(op.call(a.tensor(0), a.tensor(1), a.flag(2), gfl::nullopt)); });
  END_HANDLE_TH_ERRORS
}

PyObject* integral_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "integral_eager", "tb", {"pred", "fused"});
  static const auto op = find_op<LossAndGrad(const Tensor&, bool)>("gfl_ops::integral");
  return wrap_result([&] { return std::get<0>(op.call(a.tensor(0), a.flag(1))); });
  END_HANDLE_TH_ERRORS
}

PyObject* reduced_loss_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a(args, nargs, "reduced_loss_eager", "ttoodidb",
               {"pred", "target", "scores", "weight", "unit", "kind", "beta", "activated"});
  // the node writes its buffer in place and is not an operator: plain tensors only (None tells
  // the caller to take the per-row operator and weight_reduce_loss)
  if (!autograd::is_plain(a.tensor(0))) Py_RETURN_NONE;
  return wrap_result([&] {
    return autograd::reduced_loss(a.tensor(0), a.tensor(1), a.optional_tensor(2),
                                  a.optional_tensor(3), a.number(4), a.integer(5), a.number(6),
                                  a.flag(7));
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
#if GFL_TORCH_AT_LEAST(2, 2)
    const auto [min, max] = at::aminmax(t);
#else  // no CPU aminmax for float16 before torch 2.2: a float32 copy (exact) there
    const auto [min, max] = at::aminmax(t.scalar_type() == at::kHalf ? t.to(at::kFloat) : t);
#endif
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
     " -> 0-d loss sum_i l_i * weight_i * unit (kind 0 qfl, 1 qfl_dense, 2 dfl), or None for a "
     "pred that is not a plain tensor"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* method_table() { return kMethods; }

}  // namespace gfl::python
