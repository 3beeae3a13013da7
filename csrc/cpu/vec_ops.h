// Ops<Vectorized<T>>: lets the templates in gfl_math.h run on SIMD vectors of float or double.
// Included only from the per-ISA kernel translation units (after CPU_CAPABILITY is defined).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../gfl_math.h"
#include "../torch_compat.h"

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
  // fused on AVX2 / AVX-512 builds; the portable build's fmadd rounds the product first
  static inline V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  static inline V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static inline V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static inline Mask gt(const V& a, const V& b) { return a > b; }
  static inline Mask ge(const V& a, const V& b) { return a >= b; }
  static inline Mask ne(const V& a, const V& b) { return a != b; }
  static inline Mask eq(const V& a, const V& b) { return a == b; }
  // blendv(a, b, m) takes b where m is set
  static inline V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static inline V div(const V& a, const V& b) { return a / b; }
  static inline V log1m_prob(const V& p) { return (V(T(0)) - p).log1p(); }
  static inline void prob_logs(const V& p, V& log_p, V& log_q) {
    log_p = p.log();
    log_q = log1m_prob(p);
  }
  static inline V pow_pos(const V& a, const V& b) { return (b * a.log()).exp(); }
  // [0, 1], NaN kept (the compares are false for it)
  static inline V clamp01(const V& p) {
    const V zero(T(0)), one(T(1));
    return select(gt(p, one), one, select(gt(zero, p), zero, p));
  }
};

// exp(x) for x <= 0 (or NaN), as the softmax's exp(z - max) needs: NaN stays NaN, -inf and
// anything below -104 give 0.  On AVX-512 float: Cody-Waite reduction x = n ln2 + r, Cephes'
// degree-5 minimax polynomial for e^r and a vscalefps for 2^n: 13 instructions, at most
// 1.4 ulp over [-104, 0] (checked against exp in double on every float of the range), where
// torch's exp_u20 takes ~20 instructions and is the fallback elsewhere.
template <typename V>
inline V exp_nonpositive(const V& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    // max(c, x) returns x when x is NaN (vmaxps returns its second operand on NaN)
    const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    const __m512 round_magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: rounds to integer
    const __m512 n = _mm512_sub_ps(
        _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), round_magic), round_magic);
    // r = x - n ln2, ln2 split in a part exact in n * ln2_hi and the rest
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    // e^r = 1 + r + r^2 p(r), then times 2^n
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
  }
#endif
#if GFL_TORCH_AT_LEAST(2, 3)
  return x.exp_u20();
#else
  return x.exp();  // exp_u20 came with torch 2.3; Sleef's 1-ulp exp before
#endif
}

}  // namespace gfl
