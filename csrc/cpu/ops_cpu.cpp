// CPU registrations: the shared operator implementations over the CPU kernels, using the AVX2
// build when the running CPU supports it.
#include <torch/library.h>

#include <string>

#include "../ops_impl.h"
#include "kernels.h"

namespace gfl::cpu {
namespace {

const bool kUseAvx2 = cpu_has_avx2();

struct CpuKernels {
  static void qfl(const QflTensors& t) {
    kUseAvx2 ? AVX2::qfl_kernel(t) : DEFAULT::qfl_kernel(t);
  }
  static void dfl(const RowTensors& t) {
    kUseAvx2 ? AVX2::dfl_kernel(t) : DEFAULT::dfl_kernel(t);
  }
  static void integral(const RowTensors& t) {
    kUseAvx2 ? AVX2::integral_kernel(t) : DEFAULT::integral_kernel(t);
  }
  static void scale_rows(const at::Tensor& g, const at::Tensor& s, const at::Tensor& o) {
    kUseAvx2 ? AVX2::scale_rows_kernel(g, s, o) : DEFAULT::scale_rows_kernel(g, s, o);
  }
};

}  // namespace

// Which build of the CPU kernels runs here (exposed for tests and benchmark reports).
std::string cpu_kernel_isa() { return kUseAvx2 ? "avx2" : "default"; }

}  // namespace gfl::cpu

TORCH_LIBRARY_IMPL(gfl_ops, CPU, m) { gfl::OpImpls<gfl::cpu::CpuKernels>::register_all(m); }
