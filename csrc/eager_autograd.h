// The eager fast path's Python functions (eager_autograd.cpp), added to the gfl_ops._C module
// by ops.cpp.
#pragma once

#include <Python.h>

namespace gfl::eager {
PyMethodDef* method_table();
}
