// The Python functions of the gfl_ops._C module (python_module.cpp), added to it by ops.cpp.
#pragma once

#include <Python.h>

namespace gfl::python {
PyMethodDef* method_table();
}
