// Operator schemas of the gfl_ops library, and the Python module that loads them.
//
// Each loss has a forward that returns (per-row loss, gradient) -- the gradient is computed in the
// same pass when with_grad is true (times grad_scale per row when given), else returned as an
// empty (0,) tensor -- and a backward that recomputes the gradient scaled by grad_loss.  Their
// CPU / CUDA kernels are registered by ops_impl.h, their autograd by autograd.cpp (one C++ node
// per operator at the Autograd key), their fake kernels and the gradient operators' own
// derivative by gfl_ops/_cpp_backend.py; the module's Python functions (python_module.cpp) are
// the fast eager way to call them.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/buffer_cache.h"
#include "python_module.h"
#include "torch_compat.h"

namespace gfl::cpu {
std::string cpu_kernel_isa();  // ops_cpu.cpp
}

TORCH_LIBRARY(gfl_ops, m) {
#if GFL_TORCH_AT_LEAST(2, 2) && !GFL_TORCH_AT_LEAST(2, 4)
  // torch 2.2 / 2.3 take a Python fake ("abstract") kernel for a C++ operator only from the module
  // named here, and import it when they need one (gfl_ops/_torch_compat.py's register_fake)
  m.impl_abstract_pystub("gfl_ops._cpp_backend");
#endif
  // grad_scale (N,): the gradient output is multiplied by it per row (callers that reduce the
  // loss themselves fold the reduction's weights in here; the operator's own autograd refuses it)
  m.def("qfl(Tensor pred, Tensor labels, Tensor scores, float beta, bool activated, "
        "bool with_grad, Tensor? grad_scale=None) -> (Tensor, Tensor)");
  m.def("qfl_backward(Tensor grad_loss, Tensor pred, Tensor labels, Tensor scores, float beta, "
        "bool activated) -> Tensor");
  m.def("qfl_dense(Tensor pred, Tensor target, float beta, bool activated, bool with_grad, "
        "Tensor? grad_scale=None) -> (Tensor, Tensor)");
  m.def("qfl_dense_backward(Tensor grad_loss, Tensor pred, Tensor target, float beta, "
        "bool activated) -> Tensor");
  m.def("dfl(Tensor pred, Tensor target, bool with_grad, Tensor? grad_scale=None) "
        "-> (Tensor, Tensor)");
  m.def("dfl_backward(Tensor grad_loss, Tensor pred, Tensor target) -> Tensor");
  m.def("integral(Tensor pred, bool with_grad) -> (Tensor, Tensor)");
  m.def("integral_backward(Tensor grad_out, Tensor pred) -> Tensor");
  m.def("scale_rows(Tensor grad, Tensor row_scale) -> Tensor");
  // in place on a contiguous grad: the eager backward of a fused forward, which owns the buffer
  m.def("scale_rows_(Tensor(a!) grad, Tensor row_scale) -> ()");
  // the CPU buffer cache (cpu/buffer_cache.h): no tensor arguments, so one catch-all kernel each
  m.def("cpu_buffer_cache_stats() -> int[]", &gfl::cpu::buffer_cache_stats);
  m.def("set_cpu_buffer_cache_limit(int bytes) -> int", &gfl::cpu::set_buffer_cache_limit);
  m.def("empty_cpu_buffer_cache() -> ()", &gfl::cpu::empty_buffer_cache);
}

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "gfl_ops compiled operators", -1,
                                          gfl::python::method_table()};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyModule_AddStringConstant(module, "CPU_ISA", gfl::cpu::cpu_kernel_isa().c_str());
#ifdef _OPENMP
  // at::parallel_for only spreads over threads when this file was compiled with OpenMP
  PyModule_AddIntConstant(module, "OPENMP", 1);
#else
  PyModule_AddIntConstant(module, "OPENMP", 0);
#endif
#ifdef GFL_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
}
