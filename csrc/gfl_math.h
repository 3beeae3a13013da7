// The one source of the GFL math, shared by the CPU and CUDA kernels.
//
// Every function is a template over the arithmetic type T and an operations table Ops<T> that
// supplies exp / log / log1p / abs / max / min / compare / select.  This header specialises Ops
// for float and double (host and device); csrc/cpu/vec_ops.h specialises it for
// at::vec::Vectorized<float|double>, so the vectorised CPU loop runs the very same formulas as
// the scalar tail and the CUDA kernels.  Math is done in the "opmath" type: float for
// fp16 / bf16 / fp32 storage, double for fp64.
//
// Formulas (GFL paper Eq. 5-6, Appendix B; derivation in shared/DESIGN.md section 2):
//   QFL   L = |y - s|^beta * BCE,  s = sigmoid(x) (logits) or s = p (probabilities)
//   DFL   L = w_l (lse - z_l) + w_r (lse - z_r),   dL/dz_j = S_j - w_l [j=l] - w_r [j=r]
//   Integral  y_hat = sum_j S_j j,                  dy_hat/dz_j = S_j (j - y_hat)
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/macros/Macros.h>

namespace gfl {

// ---------------------------------------------------------------------------------------------
// Operations tables.
template <typename T>
struct Ops;

template <typename T>
struct ScalarOps {
  using Mask = bool;
  static constexpr bool kSinglePrecision = sizeof(T) == 4;
  static C10_HOST_DEVICE inline T exp(T x) { return ::exp(x); }
  static C10_HOST_DEVICE inline T log(T x) { return ::log(x); }
  static C10_HOST_DEVICE inline T log1p(T x) { return ::log1p(x); }
  static C10_HOST_DEVICE inline T abs(T x) { return ::fabs(x); }
  static C10_HOST_DEVICE inline T floor(T x) { return ::floor(x); }
  // a * b + c with one rounding (a hardware FMA where the target has one)
  static C10_HOST_DEVICE inline T fma(T a, T b, T c) { return ::fma(a, b, c); }
  static C10_HOST_DEVICE inline T max(T a, T b) { return a > b ? a : b; }
  static C10_HOST_DEVICE inline T min(T a, T b) { return a < b ? a : b; }
  static C10_HOST_DEVICE inline Mask gt(T a, T b) { return a > b; }
  static C10_HOST_DEVICE inline Mask ge(T a, T b) { return a >= b; }
  static C10_HOST_DEVICE inline Mask ne(T a, T b) { return a != b; }
  static C10_HOST_DEVICE inline Mask eq(T a, T b) { return a == b; }
  // select(m, a, b) = m ? a : b
  static C10_HOST_DEVICE inline T select(Mask m, T a, T b) { return m ? a : b; }
};

template <>
struct Ops<double> : ScalarOps<double> {};

template <>
struct Ops<float> : ScalarOps<float> {
  // float overloads so device code calls the single-precision intrinsics
  static C10_HOST_DEVICE inline float exp(float x) { return ::expf(x); }
  static C10_HOST_DEVICE inline float log(float x) { return ::logf(x); }
  static C10_HOST_DEVICE inline float log1p(float x) { return ::log1pf(x); }
  static C10_HOST_DEVICE inline float abs(float x) { return ::fabsf(x); }
  static C10_HOST_DEVICE inline float floor(float x) { return ::floorf(x); }
  static C10_HOST_DEVICE inline float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
};

// ---------------------------------------------------------------------------------------------
// log1p(e) for e in [0, 1], the softplus term of every BCE.
//
// Single precision: log1p(e) = 2 atanh(t), t = e / (2 + e) in [0, 1/3], as the odd series
// 2 t (1 + t^2/3 + ... + t^12/13); the truncation error is below t^14 / 15 < 1.4e-8 relative,
// under float rounding.  It costs one division and 7 FMAs, several times less than a vectorised
// log or log1p, and it is the same code on the CPU and the GPU.  Double precision keeps log1p.
template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T log1p_unit(T e) {
  if constexpr (O::kSinglePrecision) {
    const T t = e / (T(2.0f) + e);
    const T t2 = t * t;
    T p(1.0f / 13.0f);
    p = p * t2 + T(1.0f / 11.0f);
    p = p * t2 + T(1.0f / 9.0f);
    p = p * t2 + T(1.0f / 7.0f);
    p = p * t2 + T(1.0f / 5.0f);
    p = p * t2 + T(1.0f / 3.0f);
    p = p * t2 + T(1.0f);
    return T(2.0f) * t * p;
  } else {
    return O::log1p(e);
  }
}

// ---------------------------------------------------------------------------------------------
// QFL.
//
// beta is a runtime scalar; the common exponents get exact, cheap forms.  kBetaGeneral uses
// exp(beta * log|d|), with the value 0 and the subgradient 0 at d = 0 (the naive form gives
// 0 * inf = NaN there when beta < 1).
enum BetaMode : int { kBeta0 = 0, kBeta1 = 1, kBeta2 = 2, kBetaGeneral = 3 };

C10_HOST_DEVICE inline int beta_mode(double beta) {
  if (beta == 0.0) return kBeta0;
  if (beta == 1.0) return kBeta1;
  if (beta == 2.0) return kBeta2;
  return kBetaGeneral;
}

// Modulating factor m(d) = |d|^beta and its derivative dm/dd, for d = s - y.
template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline void modulating_factor(T d, T beta, int mode, T& m, T& dm) {
  const T zero(0), one(1);
  switch (mode) {
    case kBeta0:
      m = one;
      dm = zero;
      break;
    case kBeta1:
      m = O::abs(d);
      dm = O::select(O::gt(d, zero), one, O::select(O::gt(zero, d), zero - one, zero));
      break;
    case kBeta2:
      m = d * d;
      dm = (one + one) * d;
      break;
    default: {
      const T ad = O::abs(d);
      const auto nonzero = O::gt(ad, zero);
      // for d = 0 the log is -inf and exp gives 0 (= 0^beta); the select keeps it exact.
      m = O::select(nonzero, O::exp(beta * O::log(ad)), zero);
      // beta |d|^(beta-1) sign(d) = beta m / d
      dm = O::select(nonzero, beta * m / d, zero);
    }
  }
}

// QFL on a logit x with soft target y.  Returns the loss; writes dL/dx to grad.
// Stable forms: BCE = max(x,0) - x y + log1p(exp(-|x|)); sigmoid(1 - sigmoid) = e / (1 + e)^2
// with e = exp(-|x|), which stays accurate where 1 - sigmoid(x) would round to 0.
// d = sigmoid(x) - y is formed as (a - y - y e) / (1 + e), a = 1 (x >= 0) or e (x < 0): where
// sigmoid(x) is close to y, a - y is exact (Sterbenz) and the FMA rounds once, so d keeps its
// relative accuracy instead of inheriting the rounding of sigmoid(x) (which |d|^(beta-1)
// amplifies for beta < 1).
template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T qfl_logit(T x, T y, T beta, int mode, T& grad) {
  const T zero(0), one(1);
  const T e = O::exp(zero - O::abs(x));
  const T u = one + e;
  const T inv = one / u;
  const T bce = O::max(x, zero) - x * y + log1p_unit<T, O>(e);
  const T d = O::fma(zero - y, e, O::select(O::ge(x, zero), one, e) - y) * inv;
  T m, dm;
  modulating_factor<T, O>(d, beta, mode, m, dm);
  const T ds = e * inv * inv;
  grad = dm * ds * bce + m * d;
  return m * bce;
}

// QFL on a probability p (activated=True).  As torch.nn.functional.binary_cross_entropy: each
// log is clamped at -100 and dBCE/dp = (p - y) / max(p (1 - p), 1e-12).
template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T qfl_prob(T p, T y, T beta, int mode, T& grad) {
  // eps is the float 1e-12 (as in ATen's BCE), also for double, to match torch exactly
  const T zero(0), one(1), floor_log(-100), eps(1e-12f);
  const T log_p = O::max(O::log(p), floor_log);
  const T log_q = O::max(O::log1p(zero - p), floor_log);
  const T bce = zero - (y * log_p + (one - y) * log_q);
  const T d = p - y;
  T m, dm;
  modulating_factor<T, O>(d, beta, mode, m, dm);
  const T dbce = d / O::max(p * (one - p), eps);
  grad = dm * bce + m * dbce;
  return m * bce;
}

// ---------------------------------------------------------------------------------------------
// DFL and the integral (per row of n+1 logits; the kernels do the row reductions).

// Split a target distance y into its two bins.  y is clamped into [0, n]; y = n uses bins
// (n-1, n) with weights (0, 1), so no bin n+1 is ever touched.  A NaN y yields l = 0 and NaN
// weights, so that row's loss and gradient are NaN (documented behaviour) and nothing is read
// out of range.
template <typename T>
C10_HOST_DEVICE inline void dfl_split(T y, int64_t n, int64_t& l, T& w_l, T& w_r) {
  if (y != y) {  // NaN
    l = 0;
    w_l = y;
    w_r = y;
    return;
  }
  const T hi = static_cast<T>(n);
  y = y < T(0) ? T(0) : (y > hi ? hi : y);
  int64_t left = static_cast<int64_t>(::floor(y));
  if (left > n - 1) left = n - 1;
  l = left;
  w_l = static_cast<T>(left + 1) - y;
  w_r = y - static_cast<T>(left);
}

// dfl_split for SIMD lanes, one row per lane: the same arithmetic (so the same values), with
// the left bin l carried in T and n given as a T.
template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline void dfl_split_lanes(T y, T n, T& l, T& w_l, T& w_r) {
  const T zero(0), one(1);
  const auto is_nan = O::ne(y, y);
  // NaN fails both comparisons and lands on bin 0 (in range); its weights become NaN below
  const T yc = O::select(O::gt(y, zero), O::select(O::gt(y, n), n, y), zero);
  l = O::min(O::floor(yc), n - one);
  w_l = O::select(is_nan, y, l + one - yc);
  w_r = O::select(is_nan, y, yc - l);
}

// DFL loss from the row's log-sum-exp and the two logits at bins l and l+1.
template <typename T>
C10_HOST_DEVICE inline T dfl_loss(T lse, T z_l, T z_r, T w_l, T w_r) {
  return w_l * (lse - z_l) + w_r * (lse - z_r);
}

// dDFL/dz_j given the softmax probability S_j of bin j (bin indices carried in T so that the
// same code runs on SIMD lanes, each lane a different row).
template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T dfl_grad(T s_j, T j, T l, T w_l, T w_r) {
  const T zero(0), one(1);
  return s_j - O::select(O::eq(j, l), w_l, zero) - O::select(O::eq(j, l + one), w_r, zero);
}

// d(integral)/dz_j given S_j and the row's expected value y_hat.
template <typename T>
C10_HOST_DEVICE inline T integral_grad(T s_j, T j, T y_hat) {
  return s_j * (j - y_hat);
}

// The same from the unnormalised e_j = exp(z_j - max), relative to a pivot bin p, with the row's
// factors hoisted: c = grad_scale / sum_k e_k and neg_c_y = -c (y_hat - p).  Per bin one FMA and
// one product: c (j - p) - c (y_hat - p) rounds once, and at j = p it is neg_c_y exactly.
template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T integral_grad_scaled(T e_j, T j_rel, T c, T neg_c_y) {
  return e_j * O::fma(c, j_rel, neg_c_y);
}

}  // namespace gfl
