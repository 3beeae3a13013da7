// The one source of the GFL math, shared by the CPU and CUDA kernels.
//
// Every function is a template over the arithmetic type T and an operations table Ops<T> that
// supplies exp / log / log1p / abs / max / min / compare / select (and QFL's prob_logs /
// log1m_prob / pow_pos, which a GPU table may make faster).  This header specialises Ops
// for float and double (host and device); csrc/cpu/vec_ops.h specialises it for
// at::vec::Vectorized<float|double>, so the vectorised CPU loop runs the very same formulas as
// the scalar tail and the CUDA kernels.  Math is done in the "opmath" type: float for
// fp16 / bf16 / fp32 storage, double for fp64.
//
// Formulas (GFL paper Eq. 5-6, Appendix B; gradients and stable forms in docs/math.md, "Quality
// Focal Loss", "Distribution Focal Loss" and "The integral (box decoding)"):
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
  // a / b (correctly rounded; a GPU table may substitute a faster quotient)
  static C10_HOST_DEVICE inline T div(T a, T b) { return a / b; }
  // log p and log(1 - p) of a probability p (QFL's activated form), and log(1 - p) alone: log
  // and log1p here (Ops<T>'s: logf / log1pf for float); the CUDA QFL kernel's table substitutes
  // faster forms (csrc/cuda/qfl_kernel.cuh, QflOps<float>).
  static C10_HOST_DEVICE inline T log1m_prob(T p) { return Ops<T>::log1p(T(0) - p); }
  static C10_HOST_DEVICE inline void prob_logs(T p, T& log_p, T& log_q) {
    log_p = Ops<T>::log(p);
    log_q = log1m_prob(p);
  }
  // a^b for a > 0, b > 0 (QFL's general-beta modulating factor |d|^beta): exp(b log a) here
  static C10_HOST_DEVICE inline T pow_pos(T a, T b) { return Ops<T>::exp(b * Ops<T>::log(a)); }
  // a^b given -log a = nl >= 0 (a negative's s^beta, whose log the BCE's terms already hold):
  // exp(-b nl)
  static C10_HOST_DEVICE inline T pow_of_neg_log(T nl, T b) {
    return Ops<T>::exp((T(0) - b) * nl);
  }
  // p clamped into [0, 1], NaN kept (QFL's activated input, clamp_prob below); the CUDA QFL
  // kernel's table has a 2-instruction form
  static C10_HOST_DEVICE inline T clamp01(T p) {
    return p > T(1) ? T(1) : (T(0) > p ? T(0) : p);
  }
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
// Single precision: log1p(e) = 2 atanh(t), t = e / (2 + e) in [0, 1/3], as t p(t^2) with p a
// degree-4 polynomial in u = t^2 in [0, 1/9] that approximates 2 atanh(t) / t = 2 + 2u/3 +
// 2u^2/5 + ...: p(u) = 2 + u (c1 + u (c2 + u (c3 + u c4))), its constant the series' exact 2 (so
// log1p(e) ~ e keeps full relative accuracy as e -> 0), c1..c4 fitted for the least maximum
// relative error on [0, 1/9] (Lawson's iteration, then rounded to float): 5.5e-9 with the float
// coefficients, below the 1.4e-8 of the Taylor series to t^12/13 that this replaced (6
// multiply-adds; 4 now, on every logit element of every backend but Triton and double).  In
// float arithmetic the result's error is the rounding of t and of the Horner steps: at most 2.8
// ulp of log1p(e) either way, measured on 3e6 e in [1e-30, 1]; 2% of results changed their last
// bit.  One division (or the CUDA kernel's shared reciprocal) and 6 multiply-adds in all, several
// times less than a vectorised log or log1p, and the same code on the CPU and the GPU.  Double
// precision keeps log1p.
//
// log1p_series is the polynomial alone (single precision only), for a caller that has t already
// (|t| <= 1/3; the CUDA kernel gets it from logit_quotients).
template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T log1p_series(T t) {
  const T u = t * t;
  T p(0.28012162f);
  p = p * u + T(0.28001773f);
  p = p * u + T(0.4002153f);
  p = p * u + T(0.6666642f);
  p = p * u + T(2.0f);
  return t * p;
}

template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T log1p_unit(T e) {
  if constexpr (O::kSinglePrecision) {
    return log1p_series<T, O>(e / (T(2.0f) + e));
  } else {
    return O::log1p(e);
  }
}

// ---------------------------------------------------------------------------------------------
// QFL.
//
// beta is a runtime scalar; the common exponents get exact, cheap forms.  kBetaGeneral uses
// exp(beta * log|d|), with the value 0 and the subgradient 0 at d = 0 (the naive form gives
// 0 * inf = NaN there when beta < 1).  The functions below take the mode as a template argument
// kMode: one of these (the CUDA kernels instantiate one kernel per mode, so the per-element code
// has no branch on it) or kBetaRuntime, which switches on the runtime `mode` (the CPU kernels).
enum BetaMode : int { kBetaRuntime = -1, kBeta0 = 0, kBeta1 = 1, kBeta2 = 2, kBetaGeneral = 3 };

C10_HOST_DEVICE inline int beta_mode(double beta) {
  if (beta == 0.0) return kBeta0;
  if (beta == 1.0) return kBeta1;
  if (beta == 2.0) return kBeta2;
  return kBetaGeneral;
}

// Modulating factor m(d) = |d|^beta and its derivative dm/dd, for d = s - y.
template <int kMode, typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline void modulating_factor_of(T d, T beta, int mode, T& m, T& dm) {
  const T zero(0), one(1);
  if constexpr (kMode == kBetaRuntime) {
    switch (mode) {
      case kBeta0: modulating_factor_of<kBeta0, T, O>(d, beta, mode, m, dm); break;
      case kBeta1: modulating_factor_of<kBeta1, T, O>(d, beta, mode, m, dm); break;
      case kBeta2: modulating_factor_of<kBeta2, T, O>(d, beta, mode, m, dm); break;
      default: modulating_factor_of<kBetaGeneral, T, O>(d, beta, mode, m, dm);
    }
  } else if constexpr (kMode == kBeta0) {
    m = one;
    dm = zero;
  } else if constexpr (kMode == kBeta1) {
    m = O::abs(d);
    dm = O::select(O::gt(d, zero), one, O::select(O::gt(zero, d), zero - one, zero));
  } else if constexpr (kMode == kBeta2) {
    m = d * d;
    dm = (one + one) * d;
  } else {
    const T ad = O::abs(d);
    const auto nonzero = O::gt(ad, zero);
    // for d = 0 the log is -inf and exp gives 0 (= 0^beta); the select keeps it exact.
    m = O::select(nonzero, O::pow_pos(ad, beta), zero);
    // beta |d|^(beta-1) sign(d) = beta m / d
    dm = O::select(nonzero, beta * m / d, zero);
  }
}

template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline void modulating_factor(T d, T beta, int mode, T& m, T& dm) {
  modulating_factor_of<kBetaRuntime, T, O>(d, beta, mode, m, dm);
}

// QFL on a logit x with soft target y, given the three transcendental terms of x:
// e = exp(-|x|), inv = 1 / (1 + e) and log1p(e), the last as a callable `lp` that the BCE calls
// where the inline formula had it (a host compiler that contracts a * b + c into FMAs does so by
// the order of evaluation: this keeps the CPU build's results bit for bit those of the single
// expression).  Returns the loss; writes dL/dx to grad.
// Stable forms: BCE = max(x,0) - x y + log1p(exp(-|x|)); sigmoid(1 - sigmoid) = e / (1 + e)^2
// with e = exp(-|x|), which stays accurate where 1 - sigmoid(x) would round to 0.
// d = sigmoid(x) - y is formed as (a - y - y e) / (1 + e), a = 1 (x >= 0) or e (x < 0): where
// sigmoid(x) is close to y, a - y is exact (Sterbenz) and the FMA rounds once, so d keeps its
// relative accuracy instead of inheriting the rounding of sigmoid(x) (which |d|^(beta-1)
// amplifies for beta < 1).
template <int kMode, typename T, typename O = Ops<T>, typename LogTerm>
C10_HOST_DEVICE inline T qfl_logit_given(T x, T y, T beta, int mode, T e, T inv,
                                         const LogTerm& lp, T& grad) {
  const T zero(0), one(1);
  const T bce = O::max(x, zero) - x * y + lp();
  const T d = O::fma(zero - y, e, O::select(O::ge(x, zero), one, e) - y) * inv;
  T m, dm;
  modulating_factor_of<kMode, T, O>(d, beta, mode, m, dm);
  const T ds = e * inv * inv;
  grad = dm * ds * bce + m * d;
  return m * bce;
}

// qfl_logit_given for y = 0 (every class of a negative anchor, and all but one of a positive's,
// in the (labels, scores) form; used by the CUDA kernels).  Beta 0, 1, 2: the same value and
// gradient, bit for bit, for finite x (the terms x y and y e are signed zeros that drop out
// exactly), in fewer operations: no terms of y, and sigmoid(x) = (1 or e) / (1 + e) taken as
// inv or e inv, the product that ds reuses.
//
// General beta: the same value and gradient to a few ulp (not bit for bit), without the log of d
// and without a division.  Here d = s = sigmoid(x) > 0, so
//   s^beta = exp(-beta nl),  nl = -log s = max(-x, 0) + log1p(e)   (the BCE's own terms), and
//   dm/dd ds/dx = (beta s^beta / s) s (1 - s) = beta s^beta (1 - s),  1 - s = e inv or inv,
// where the general formula takes |d|^beta through a log of d and beta |d|^beta / d through a
// division.  nl is as accurate as lp (a few ulp; relative to nl better still for x < 0), and
// nothing here cancels, so it keeps its relative accuracy also where s underflows.
template <int kMode, typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T qfl_logit_negative_given(T x, T beta, int mode, T e, T inv, T lp,
                                                  T& grad) {
  const T zero(0);
  const T bce = O::max(x, zero) + lp;
  const T e_inv = e * inv;
  const auto x_nonneg = O::ge(x, zero);
  const T d = O::select(x_nonneg, inv, e_inv);
  const bool general = kMode == kBetaRuntime ? mode == kBetaGeneral : kMode == kBetaGeneral;
  if (general) {
    const T m = O::pow_of_neg_log(O::max(zero - x, zero) + lp, beta);
    const T one_minus_s = O::select(x_nonneg, e_inv, inv);
    grad = beta * m * one_minus_s * bce + m * d;
    return m * bce;
  }
  T m, dm;
  modulating_factor_of<kMode, T, O>(d, beta, mode, m, dm);
  const T ds = e_inv * inv;
  grad = dm * ds * bce + m * d;
  return m * bce;
}

// QFL on a logit x with soft target y.  Returns the loss; writes dL/dx to grad.
template <typename T, typename O = Ops<T>, int kMode = kBetaRuntime>
C10_HOST_DEVICE inline T qfl_logit(T x, T y, T beta, int mode, T& grad) {
  const T zero(0), one(1);
  const T e = O::exp(zero - O::abs(x));
  const T u = one + e;
  const T inv = one / u;
  return qfl_logit_given<kMode, T, O>(
      x, y, beta, mode, e, inv, [&] { return log1p_unit<T, O>(e); }, grad);
}

// qfl_logit's two quotients of e = exp(-|x|) in [0, 1], inv = 1 / (1 + e) and
// lp = log1p(e) = series(e / (2 + e)), from ONE reciprocal O::rcp(q), q = (1 + e)(2 + e) in
// [2, 6] (no overflow or underflow): 1 / (1 + e) = (2 + e) / q and e / (2 + e) = e (1 + e) / q.
// For a GPU, where a correctly rounded division is a reciprocal plus a refinement and a
// reciprocal is a quarter-rate instruction: 1 reciprocal instead of 2 divisions.  Each quotient
// gets two or three roundings more than a correctly rounded division (<= 3 ulp with a 1-ulp
// rcp); the CPU keeps the two divisions (qfl_logit).
template <typename T, typename O>
C10_HOST_DEVICE inline void logit_quotients(T e, T& inv, T& lp) {
  const T one(1), two(2);
  const T u = one + e;
  const T v = two + e;
  const T r = O::rcp(u * v);
  inv = v * r;
  lp = log1p_series<T, O>(e * r * u);
}

// An activated input outside [0, 1] can only arrive with the value checks off (they reject it;
// torch's BCE raises or asserts).  Every backend then takes it as the nearer of 0 and 1, loss
// and gradient alike (the gradient at the clamped value, not the clamp's 0: zeroing it would
// keep the raw input live beside the clamped one, and with 16 elements in flight that spilled
// the bfloat16 CUDA kernels).  A NaN stays NaN, so its loss and gradient are NaN.
template <typename T, typename O>
C10_HOST_DEVICE inline T clamp_prob(T p) {
  return O::clamp01(p);
}

// QFL on a probability p (activated=True).  As torch.nn.functional.binary_cross_entropy: each
// log is clamped at -100 and dBCE/dp = (p - y) / max(p (1 - p), 1e-12).  p outside [0, 1]:
// clamp_prob above.
template <int kMode, typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T qfl_prob_of(T p_in, T y, T beta, int mode, T& grad) {
  // eps is the float 1e-12 (as in ATen's BCE), also for double, to match torch exactly
  const T zero(0), one(1), floor_log(-100), eps(1e-12f);
  const T p = clamp_prob<T, O>(p_in);
  T log_p, log_q;
  O::prob_logs(p, log_p, log_q);
  log_p = O::max(log_p, floor_log);
  log_q = O::max(log_q, floor_log);
  const T bce = zero - (y * log_p + (one - y) * log_q);
  const T d = p - y;
  T m, dm;
  modulating_factor_of<kMode, T, O>(d, beta, mode, m, dm);
  const T dbce = O::div(d, O::max(p * (one - p), eps));
  grad = dm * bce + m * dbce;
  return m * bce;
}

// qfl_prob_of for y = 0: the same value and gradient, bit for bit, for any p (y log p is a
// signed zero that drops out exactly, and 1 - y = 1), without log p.
template <int kMode, typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T qfl_prob_negative_of(T p_in, T beta, int mode, T& grad) {
  const T zero(0), one(1), floor_log(-100), eps(1e-12f);
  const T p = clamp_prob<T, O>(p_in);
  const T bce = zero - O::max(O::log1m_prob(p), floor_log);
  T m, dm;
  modulating_factor_of<kMode, T, O>(p, beta, mode, m, dm);
  const T dbce = O::div(p, O::max(p * (one - p), eps));
  grad = dm * bce + m * dbce;
  return m * bce;
}

template <typename T, typename O = Ops<T>>
C10_HOST_DEVICE inline T qfl_prob(T p, T y, T beta, int mode, T& grad) {
  return qfl_prob_of<kBetaRuntime, T, O>(p, y, beta, mode, grad);
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
