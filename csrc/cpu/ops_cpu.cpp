// CPU registrations: the shared operator implementations over the CPU kernels, using the widest
// build (AVX-512, AVX2 or portable) that both the running CPU and torch's own kernel choice allow.
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "../ops_impl.h"
#include "buffer_cache.h"
#include "kernels.h"

namespace gfl::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

// Follows torch's CPU capability (so ATEN_CPU_CAPABILITY=avx2 / default also narrows ours),
// capped by what this CPU reports.  Decided once, on first use.
Isa isa() {
  static const Isa chosen = [] {
    const std::string torch_isa = at::get_cpu_capability();
    if (torch_isa == "AVX512" && cpu_has_avx512()) return Isa::kAvx512;
    if ((torch_isa == "AVX512" || torch_isa == "AVX2") && cpu_has_avx2()) return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return chosen;
}

#define GFL_CPU_DISPATCH(kernel, ...)                                   \
  switch (isa()) {                                                      \
    case Isa::kAvx512: return AVX512::kernel(__VA_ARGS__);              \
    case Isa::kAvx2: return AVX2::kernel(__VA_ARGS__);                  \
    default: return DEFAULT::kernel(__VA_ARGS__);                       \
  }

struct CpuKernels {
  static void qfl(const QflTensors& t) { GFL_CPU_DISPATCH(qfl_kernel, t); }
  static void dfl(const RowTensors& t) { GFL_CPU_DISPATCH(dfl_kernel, t); }
  static void integral(const RowTensors& t) { GFL_CPU_DISPATCH(integral_kernel, t); }
  static void scale_rows(const at::Tensor& g, const at::Tensor& s, const at::Tensor& o) {
    GFL_CPU_DISPATCH(scale_rows_kernel, g, s, o);
  }
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return empty_cached(sizes, options);
  }
};
#undef GFL_CPU_DISPATCH

}  // namespace

// Which build of the CPU kernels runs here (exposed for tests and benchmark reports).
std::string cpu_kernel_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

}  // namespace gfl::cpu

TORCH_LIBRARY_IMPL(gfl_ops, CPU, m) { gfl::OpImpls<gfl::cpu::CpuKernels>::register_all(m); }
