// Ops<Vectorized<T>>: lets the templates in gfl_math.h run on SIMD vectors of float or double.
// Included only from the per-ISA kernel translation units (after CPU_CAPABILITY is defined).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../gfl_math.h"

namespace gfl {

template <typename T>
struct Ops<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // all-ones lanes where true, as the vec comparison operators return
  static constexpr bool kSinglePrecision = sizeof(T) == 4;
  static inline V exp(const V& x) { return x.exp(); }
  static inline V log(const V& x) { return x.log(); }
  static inline V log1p(const V& x) { return x.log1p(); }
  static inline V abs(const V& x) { return x.abs(); }
  static inline V floor(const V& x) { return x.floor(); }
  static inline V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static inline V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static inline Mask gt(const V& a, const V& b) { return a > b; }
  static inline Mask ge(const V& a, const V& b) { return a >= b; }
  static inline Mask ne(const V& a, const V& b) { return a != b; }
  static inline Mask eq(const V& a, const V& b) { return a == b; }
  // blendv(a, b, m) takes b where m is set
  static inline V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

}  // namespace gfl
