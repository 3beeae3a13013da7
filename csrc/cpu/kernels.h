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

// True when this CPU can run the AVX2 + FMA build of the kernels.
bool cpu_has_avx2();
// True when this CPU can run the AVX-512 (F, BW, DQ, VL) build of the kernels.
bool cpu_has_avx512();

}  // namespace gfl::cpu
