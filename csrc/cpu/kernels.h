// CPU kernel entry points, compiled once per instruction set (see kernels_default.cpp and
// kernels_avx2.cpp) and chosen at run time by ops_cpu.cpp.
#pragma once

#include "../op_common.h"

namespace gfl::cpu {

#define GFL_DECLARE_CPU_KERNELS(ISA)                      \
  namespace ISA {                                         \
  void qfl_kernel(const QflTensors& t);                   \
  void dfl_kernel(const RowTensors& t);                   \
  void integral_kernel(const RowTensors& t);              \
  void scale_rows_kernel(const at::Tensor& grad, const at::Tensor& scale, \
                         const at::Tensor& out);          \
  }

GFL_DECLARE_CPU_KERNELS(DEFAULT)
GFL_DECLARE_CPU_KERNELS(AVX2)
GFL_DECLARE_CPU_KERNELS(AVX512)
#undef GFL_DECLARE_CPU_KERNELS

// On CPUs without an instruction set's build (non-x86), its entry points forward to DEFAULT.
#define GFL_FORWARD_CPU_KERNELS_TO_DEFAULT(ISA)                                           \
  namespace ISA {                                                                         \
  void qfl_kernel(const QflTensors& t) { DEFAULT::qfl_kernel(t); }                        \
  void dfl_kernel(const RowTensors& t) { DEFAULT::dfl_kernel(t); }                        \
  void integral_kernel(const RowTensors& t) { DEFAULT::integral_kernel(t); }              \
  void scale_rows_kernel(const at::Tensor& g, const at::Tensor& s, const at::Tensor& o) { \
    DEFAULT::scale_rows_kernel(g, s, o);                                                  \
  }                                                                                       \
  }

// True when this CPU can run the AVX2 + FMA build of the kernels.
bool cpu_has_avx2();
// True when this CPU can run the AVX-512 (F, BW, DQ, VL) build of the kernels.
bool cpu_has_avx512();

}  // namespace gfl::cpu
