// AVX-512 (F, BW, DQ, VL) build of the CPU kernels: 16 float lanes, twice AVX2's.  Built like
// kernels_avx2.cpp (a target pragma for this translation unit only, the feature macros that
// sleef.h and at::vec test, at::vec's CPU_CAPABILITY namespace); ops_cpu.cpp calls into it only
// when the running CPU has these extensions and torch itself runs its AVX512 kernels.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), apply_to = function)
#endif
#include "avx_feature_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif

namespace gfl::cpu {
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         cpu_has_avx2();
}
}  // namespace gfl::cpu

#else  // not x86-64: no AVX-512 build; the DEFAULT kernels run everywhere
#include "kernels.h"
namespace gfl::cpu {
bool cpu_has_avx512() { return false; }
GFL_FORWARD_CPU_KERNELS_TO_DEFAULT(AVX512)
}  // namespace gfl::cpu
#endif
