// AVX2 + FMA build of the CPU kernels.  The target pragma (instead of a global -mavx2) keeps the
// rest of the extension portable; at::vec's CPU_CAPABILITY inline namespace keeps these vector
// types distinct from the DEFAULT build's.  ops_cpu.cpp only calls into here when the running
// CPU reports AVX2 and FMA.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif
#include "avx_feature_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif

namespace gfl::cpu {
bool cpu_has_avx2() {
  // may run from a static initialiser, before libgcc has probed the CPU
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
}  // namespace gfl::cpu

#else  // not x86-64: no AVX2 build; the DEFAULT kernels run everywhere
#include "kernels.h"
namespace gfl::cpu {
bool cpu_has_avx2() { return false; }
GFL_FORWARD_CPU_KERNELS_TO_DEFAULT(AVX2)
}  // namespace gfl::cpu
#endif
