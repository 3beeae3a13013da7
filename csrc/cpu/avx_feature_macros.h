// Included by the per-ISA kernel translation units right after their `#pragma GCC target`: the
// pragma enables the instructions but not the feature macros that sleef.h and at::vec test to
// declare their 256-bit functions, so define them for that translation unit only.  (No include
// guard on purpose: it is a preamble, not an interface.)
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
