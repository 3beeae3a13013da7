// The QFL CUDA kernel (device code, and the host-side launch plan it shares with its launcher
// qfl.cu and with tests/cuda_emulation, which compiles this header for the host and runs it on
// the warp emulator).
//
// A group of 2^lanes_log2 lanes per anchor row walks the C classes, sums the per-class losses in
// registers and reduces them with warp shuffles in a fixed order (no atomics, bitwise
// deterministic).  The per-element math is gfl_math.h's, as on the CPU.  What makes it cheap
// (issue #18; the instruction counts are in benchmarks/cuda_qfl_kernel.md):
//  * one kernel per (dtype, target form, activated, beta mode, gradient or not, index width): the
//    per-element code has no branch on any of them;
//  * 32-bit row / element indices unless the tensor is too large (QflPlan::index64);
//  * 16-byte loads and stores: each row is split into a scalar part (the elements before pred's
//    first 16-byte boundary in the row, and those after its last whole 16-byte word) and whole
//    16-byte words, provided every stream is congruent with pred modulo 16 bytes (else all of the
//    row is scalar);
//  * logits: e = exp(-|x|) with the fast exp and the two quotients of e with one fast reciprocal
//    (gfl_math.h's logit_quotients); the accuracy argument is in QflOps below.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../gfl_math.h"
#include "common.cuh"

// tests/cuda_emulation defines this to check on the host that each 16-byte access is aligned
// (on a GPU a misaligned one faults).
#ifndef GFL_CUDA_EMU_CHECK_ALIGNED
#define GFL_CUDA_EMU_CHECK_ALIGNED(ptr) ((void)0)
#endif

namespace gfl::cuda {

// =============================================================================================
// Host side: the launch plan.  Everything here depends on the launch description only (shapes,
// dtypes, pointer alignment), never on the grid: the order of each row's sum follows from
// lanes_log2 and the 16-byte split, so results do not depend on the launch geometry.

constexpr int kQflVecBytes = 16;

inline int64_t qfl_dtype_bytes(DType dt) {
  switch (dt) {
    case DType::kDouble: return 8;
    case DType::kHalf:
    case DType::kBFloat16: return 2;
    default: return 4;
  }
}

// Lanes per row (log2).  A simple issue-slot model per row: lanes x (the lane's words x their
// elements x ~30 instructions + its scalars x ~50 + ~40 per row + a shuffle step per halving),
// counting the lanes left idle past the row's last word or scalar (scalars: the c % width
// elements outside whole 16-byte words when the row starts on a boundary).  Among choices
// within 3% of the cheapest the widest wins: more lanes cost nothing there and keep wide rows
// with few anchors parallel.  Rows over 48 bytes get at least 2 lanes, so that each access
// reads 32 contiguous bytes of a row (whole sectors); up to 48 bytes one lane is allowed: a
// warp's 32 rows are then one contiguous span of at most 1.5 KB, each 32-byte sector of it
// fetched from L2 once and re-read from L1 by the lanes' next access.  At 20 classes in 16 bits
// (VOC: 2 words and 4 scalars per row) one lane saves the second lane's row work and idle
// scalar rounds, ~5 issue slots per element (benchmarks/cuda_qfl_kernel.md).
inline int qfl_lanes_log2(int64_t c, int64_t elem_bytes) {
  const int64_t width = kQflVecBytes / elem_bytes;
  const int64_t words = c / width;
  const int64_t scalars = c % width;
  const int lowest = c * elem_bytes <= 3 * kQflVecBytes ? 0 : 1;
  int64_t cost[6] = {};
  int64_t cheapest = INT64_MAX;
  for (int s = lowest; s <= 5; ++s) {
    const int64_t lanes = int64_t(1) << s;
    cost[s] = lanes * (((words + lanes - 1) / lanes) * width * 30 +
                       ((scalars + lanes - 1) / lanes) * 50 + 40 + 2 * s);
    if (cost[s] < cheapest) cheapest = cost[s];
  }
  int best = lowest;
  for (int s = lowest; s <= 5; ++s)
    if (cost[s] * 100 <= cheapest * 103) best = s;
  return best;
}

// Can the kernel use 16-byte accesses: does `other` reach a 16-byte boundary at the same
// elements as pred?  (Then each row's scalar head is the same for every stream.)  A stream of
// twice pred's element size (a float target of 16-bit pred) must sit at twice pred's phase.
inline bool qfl_congruent(const void* pred, int64_t pred_bytes, const void* other,
                          int64_t other_bytes) {
  const auto p = reinterpret_cast<uintptr_t>(pred);
  const auto o = reinterpret_cast<uintptr_t>(other);
  const auto ratio = static_cast<uintptr_t>(other_bytes / pred_bytes);
  return p % pred_bytes == 0 && o % other_bytes == 0 && (o - ratio * p) % kQflVecBytes == 0;
}

// 32-bit indices hold every row index the loop forms (< n + the grid's row stride) and every
// element offset (< n c, plus at most one stride of 32 lanes x 16 bytes past a row's end); else
// the 64-bit kernel runs.
inline bool qfl_needs_index64(int64_t n, int64_t c, int lanes_log2, int64_t grid) {
  const int64_t limit = INT32_MAX - 1024;
  const int64_t row_stride = (grid * kBlock) >> lanes_log2;
  return n > limit - row_stride || c > limit || n * c > limit;
}

struct QflPlan {
  int lanes_log2;   // lanes per row = 2^lanes_log2
  bool vectorised;  // 16-byte accesses (every stream congruent with pred)
  bool index64;     // 64-bit indices
  unsigned grid;    // blocks of kBlock threads
};

inline QflPlan qfl_plan(const QflLaunch& p) {
  QflPlan plan{};
  const int64_t bytes = qfl_dtype_bytes(p.dtype);
  plan.lanes_log2 = qfl_lanes_log2(p.c, bytes);
  plan.vectorised = true;
  if (p.grad) plan.vectorised = plan.vectorised && qfl_congruent(p.pred, bytes, p.grad, bytes);
  if (p.target) {
    const int64_t target_bytes =
        p.target_opmath ? (p.dtype == DType::kDouble ? 8 : 4) : bytes;
    plan.vectorised = plan.vectorised && qfl_congruent(p.pred, bytes, p.target, target_bytes);
  }
  plan.grid = grid_for(p.n << plan.lanes_log2);
  plan.index64 = qfl_needs_index64(p.n, p.c, plan.lanes_log2, plan.grid);
  return plan;
}

// =============================================================================================
// Device side.

template <typename scalar_t, typename target_t>
struct QflArgs {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* pred;
  const int64_t* labels;
  const acc_t* scores;
  const target_t* target;
  const acc_t* row_scale;
  int64_t row_scale_stride;
  acc_t* loss;
  scalar_t* grad;
  int64_t n;
  int64_t c;
  acc_t beta;
  int mode;  // beta_mode(beta), for the kernels that take it at run time (kBetaRuntime)
  int lanes_log2;
  bool vectorised;
};

// Operations table of the float kernels: gfl_math.h's accurate functions, plus a fast exp, a
// fast reciprocal and a fast quotient.  Accuracy against the tolerance tables
// (tests/gfl_testing.py: float32 loss 2e-5 relative + 2e-5 absolute, gradient 2e-5 relative +
// 2e-6 absolute; 16-bit gradients are rounded to 16 bits anyway), from the documented bounds
// (CUDA C Programming Guide, Intrinsic Functions; PTX ISA):
//  * rcp (rcp.approx.ftz.f32, 1 ulp; the same as __fdividef(1, q), 2 ulp, for the q in
//    [2^-126, 2^126] it gets): 1 / q, q = (1 + e)(2 + e) in [2, 6] (gfl_math.h's
//    logit_quotients).  inv = 1 / (1 + e) and t = e / (2 + e) then carry <= 3 ulp (the roundings
//    of q and of the products added), ~4e-7 relative, against 0.5 ulp for a division: errors
//    that scale the loss and gradient terms, never cancel, so stay ~1e-6 relative on both.
//  * div (__fdividef, 2 ulp for 2^-126 <= |b| <= 2^126): activated's
//    (p - y) / max(p (1 - p), 1e-12), b in [1e-12, 0.25].
//  * fast_exp (__expf's ex2.approx, .ftz): 2 + floor(|1.173 x|) ulp, used for e = exp(-|x|) of
//    beta 0, 1, 2.  Its absolute error e (2 + 1.173|x|) 2^-24 is largest at x = 0 (2.4e-7):
//    sigmoid(x) and d = s - y move by less than that, and the error that d takes from it near
//    d = 0 is at most ~ds (2 + 1.173|x|) 2^-23 <= 6e-8 (ds = e / (1 + e)^2), a gradient error
//    below 2e-8 absolute for beta 2.  Relative to e it is (2 + 1.173|x|) ulp: a negative's loss
//    ~ e^3 keeps 3 (2 + 1.173|x|) ulp, 2.4e-6 at |x| = 4, and reaches 2e-5 at |x| ~ 46, where the
//    term is ~1e-60, far below the 2e-5 absolute tolerance.  The ftz flush changes the result
//    only where e (and every term made of it) is below 1.2e-38.
//  * prob_logs / log1m_prob: log p and log(1 - p) of the activated form.  The fast log2 alone
//    would not do (its bound is 2^-22 ABSOLUTE on [0.5, 2]: relative 2e-4 for log p at p =
//    0.999, beyond the 2e-5 loss tolerance), so each log goes by the smaller of p and 1 - p,
//    which is exact (1 - p is, for p >= 1/2: Sterbenz): log(small) by fast_log2f, 2 ulp there
//    (small <= 1/2, |log2| >= 1), and log(1 - small) = log1p(-small) by gfl_math.h's
//    log1p_series at t = -small / (2 - small) in [-1/3, 0] (2 atanh(t) = log((1 + t) / (1 - t))),
//    t from the fast reciprocal: ~3 ulp + the series' 2.8.  Measured with the log2 at its
//    documented worst (tests/test_cuda_emulated.py, test_emulated_qfl_activated_logs_to_a_few_ulp):
//    either log within 3.7e-7 relative of the exact log of the float p, against 1 ulp (6e-8)
//    for logf / log1pf and the loss tolerance's 2e-5.  14 instructions (2 MUFU) for log(1 - p) of
//    a negative against log1pf's ~24, ~17 for both logs against ~45.  Subnormal p keeps log p
//    exact (the non-.ftz log2; log(1 - p) = -p by the series); 1 - p is 0 or >= 2^-24, so the
//    .ftz log2 loses nothing there.
//  * pow_pos: the general mode's |d|^beta = 2^E, E = beta log2|d|, by fast_log2f (non-.ftz:
//    subnormal d keeps its log) and CUDA's exp2f (2 ulp, subnormal results kept).  Relative
//    error of |d|^beta: the log2's 2 ulp of |E| (2^-22 absolute for |d| in [1/2, 1], times beta)
//    and E's rounding through 2^E (ln 2 |dE|), plus exp2f's 2 ulp: at most
//    2^-23 (1.8 |E| + 2 + 1.4 beta), 4.7e-6 at |E| = 20 (|d|^beta ~ 1e-6), reaching the 2e-5
//    loss tolerance only at |E| ~ 90, terms under 1e-27.  dm = beta m / d keeps the division.
//  * pow_of_neg_log: a negative's s^beta in the general mode, 2^(-beta log2(e) nl) by fast_exp2f
//    (ex2.approx.ftz: exp2f's 2 ulp without its scaling of subnormal results, which it flushes:
//    s^beta < 2^-126, a loss term below 2^-126), nl = -log s = max(-x, 0) + lp from the BCE's
//    terms (gfl_math.h): nl carries lp's few ulp (for x >= 0; for x < 0 its error relative to
//    nl is smaller still), so s^beta is within 2^-23 (c |E| + 2) relative, E = beta log2 s, like
//    pow_pos, with no log instruction; its e takes the fast exp (s = inv or e inv, never a
//    difference near 0).
//  * kept accurate (gfl_math.h's Ops<float>): exp(-|x|) of a soft target's element in the
//    general beta mode (there |d|^(beta - 1), beta < 1, amplifies d's error near d = 0, and
//    relative to d that error is up to 2 + 1.173|x| times that of an accurate exp;
//    tests/test_qfl.py allows 2 ulp of y).
// The warp emulator (tests/cuda_emulation) runs fast_expf, fast_log2f, exp2f_2ulp and fast_exp2f
// off by their documented worst cases (and rcp / div correctly rounded), so its tests check these
// arguments, not only the formulas.
template <typename T>
struct QflOps : Ops<T> {
  static C10_HOST_DEVICE inline T rcp(T x) { return T(1) / x; }
  static C10_HOST_DEVICE inline T fast_exp(T x) { return Ops<T>::exp(x); }
};

template <>
struct QflOps<float> : Ops<float> {
  // rcp.approx.ftz.f32 (1 ulp; PTX ISA): what __fdividef(1, x) computes for the x in
  // [2^-126, 2^126] it is used for, without the subnormal scaling that __fdividef adds when the
  // build does not flush subnormals
  static C10_HOST_DEVICE inline float rcp(float x) {
#ifdef __CUDA_ARCH__
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return 1.0f / x;
#endif
  }
  static C10_HOST_DEVICE inline float div(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdividef(a, b);
#else
    return a / b;
#endif
  }
  // common.cuh's fast_expf (__expf's ex2.approx, .ftz)
  static C10_HOST_DEVICE inline float fast_exp(float x) { return fast_expf(x); }
  // [0, 1] with NaN kept: PTX's NaN-propagating min / max (sm_80+), 2 instructions where the
  // compare-and-select form takes 4 (+4 issue slots per element of every activated kernel)
  static C10_HOST_DEVICE inline float clamp01(float p) {
#ifdef __CUDA_ARCH__
    float lo, r;
    asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(lo) : "f"(p));
    asm("min.NaN.f32 %0, %1, 0f3F800000;" : "=f"(r) : "f"(lo));
    return r;
#else
    return Ops<float>::clamp01(p);
#endif
  }

  // log p and log(1 - p) for p in [0, 1] (the accuracy argument is above): the smaller of p and
  // 1 - p by the fast log2, the other by the series.  NaN gives NaN for both; p = 0 or 1 gives
  // -inf for one log (clamped at -100 by the caller, as torch's BCE) and 0 for the other.
  static C10_HOST_DEVICE inline void prob_logs(float p, float& log_p, float& log_q) {
    const float small = ::fminf(p, 1.0f - p);  // exact: p below 1/2, 1 - p from 1/2 on
    const float log_small = log_by_log2<false>(small);
    const float log_big = log1m_by_series(small);
    const bool p_small = p < 0.5f;
    log_p = p_small ? log_small : log_big;
    log_q = p_small ? log_big : log_small;
  }
  // |d|^beta of the general mode: 2^(beta log2 a) with the fast log2 (accuracy argument above)
  static C10_HOST_DEVICE inline float pow_pos(float a, float b) {
    return exp2f_2ulp(b * fast_log2f<false>(a));
  }
  // a^b from nl = -log a >= 0 (a negative's s^beta, gfl_math.h): 2^(nl (-b log2 e)) by the
  // fast exp2 (the factor is the kernel's constant, hoisted out of the loop: 1 FMUL + 1 MUFU)
  static C10_HOST_DEVICE inline float pow_of_neg_log(float nl, float b) {
    return fast_exp2f(nl * (b * -1.44269504088896341f));
  }
  // prob_logs' log_q alone, bit for bit (a negative's BCE): the same two forms, chosen alike;
  // 1 - p is 0 or normal from 1/2 on, where the .ftz log2 gives the non-.ftz one's bits
  static C10_HOST_DEVICE inline float log1m_prob(float p) {
    // both computed, then selected: a conditional of the two calls compiled to a branch (~+4
    // issue slots per element on the common path, sm_90)
    const float by_log2 = log_by_log2<true>(1.0f - p);
    const float by_series = log1m_by_series(p);
    return p < 0.5f ? by_series : by_log2;
  }

 private:
  // log x by the fast log2, for x <= 1/2 (2 ulp there)
  template <bool kFtz>
  static C10_HOST_DEVICE inline float log_by_log2(float x) {
    return fast_log2f<kFtz>(x) * 0.693147180559945309f;
  }
  // log(1 - s) = log1p(-s) = 2 atanh(t), t = -s / (2 - s) in [-1/3, 0] for s in [0, 1/2]
  static C10_HOST_DEVICE inline float log1m_by_series(float s) {
    return log1p_series<float>(s * rcp(s - 2.0f));
  }
};

// e = exp(-|x|), inv = 1 / (1 + e), lp = log1p(e) of a logit: for float one rcp for both
// quotients, and the fast exp unless a soft target's element takes the general pow (beta < 1
// amplifies the error of d = s - y near 0, QflOps; a negative's general form never forms s - y,
// so its e takes the fast exp: kNegative); gfl_math.h's accurate functions for double.
template <int kBeta, bool kNegative, typename A>
__device__ __forceinline__ void qfl_logit_terms(A x, int mode, A& e, A& inv, A& lp) {
  using O = QflOps<A>;
  const bool general =
      !kNegative && (kBeta == kBetaRuntime ? mode == kBetaGeneral : kBeta == kBetaGeneral);
  e = general ? O::exp(-O::abs(x)) : O::fast_exp(-O::abs(x));
  if constexpr (O::kSinglePrecision) {
    logit_quotients<A, O>(e, inv, lp);
  } else {
    inv = A(1) / (A(1) + e);
    lp = log1p_unit<A, O>(e);
  }
}

// QFL of one element: the loss, and dL/dx in g (dead code unless the caller stores it).
template <bool kActivated, int kBeta, typename A>
__device__ __forceinline__ A qfl_element(A x, A y, A beta, int mode, A& g) {
  if constexpr (kActivated) {
    return qfl_prob_of<kBeta, A, QflOps<A>>(x, y, beta, mode, g);
  } else {
    A e, inv, lp;
    qfl_logit_terms<kBeta, false>(x, mode, e, inv, lp);
    return qfl_logit_given<kBeta, A, QflOps<A>>(x, y, beta, mode, e, inv, [&] { return lp; },
                                                 g);
  }
}

// The same for y = 0, cheaper (bit for bit for beta 0, 1, 2; general beta to a few ulp by its
// own form: gfl_math.h's qfl_logit_negative_given / qfl_prob_negative_of).
template <bool kActivated, int kBeta, typename A>
__device__ __forceinline__ A qfl_element_negative(A x, A beta, int mode, A& g) {
  if constexpr (kActivated) {
    return qfl_prob_negative_of<kBeta, A, QflOps<A>>(x, beta, mode, g);
  } else {
    A e, inv, lp;
    qfl_logit_terms<kBeta, true>(x, mode, e, inv, lp);
    return qfl_logit_negative_given<kBeta, A, QflOps<A>>(x, beta, mode, e, inv, lp, g);
  }
}

// 16 bytes at p (16-byte aligned) into / from N elements.
template <typename T, int N>
__device__ __forceinline__ void qfl_load16(const T* __restrict__ p, T (&el)[N]) {
  static_assert(sizeof(T) * N == kQflVecBytes, "one 16-byte word");
  GFL_CUDA_EMU_CHECK_ALIGNED(p);
#ifdef __CUDA_ARCH__
  const uint4 word = *reinterpret_cast<const uint4*>(p);
  memcpy(el, &word, kQflVecBytes);
#else
  memcpy(el, p, kQflVecBytes);
#endif
}

template <typename T, int N>
__device__ __forceinline__ void qfl_store16(T* __restrict__ p, const T (&el)[N]) {
  static_assert(sizeof(T) * N == kQflVecBytes, "one 16-byte word");
  GFL_CUDA_EMU_CHECK_ALIGNED(p);
#ifdef __CUDA_ARCH__
  uint4 word;
  memcpy(&word, el, kQflVecBytes);
  *reinterpret_cast<uint4*>(p) = word;
#else
  memcpy(p, el, kQflVecBytes);
#endif
}

// K consecutive elements at p as opmath values: one scalar (K = 1) or whole 16-byte words.
template <int K, typename T, typename A>
__device__ __forceinline__ void qfl_load_chunk(const T* __restrict__ p, A (&out)[K]) {
  if constexpr (K == 1) {
    out[0] = static_cast<A>(to_opmath(p[0]));
  } else {
    constexpr int kPer = kQflVecBytes / sizeof(T);
    static_assert(K % kPer == 0, "whole 16-byte words");
#pragma unroll
    for (int w = 0; w < K / kPer; ++w) {
      T el[kPer];
      qfl_load16(p + w * kPer, el);
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[w * kPer + i] = static_cast<A>(to_opmath(el[i]));
    }
  }
}

template <int K, typename T, typename A>
__device__ __forceinline__ void qfl_store_chunk(T* __restrict__ p, const A (&in)[K]) {
  if constexpr (K == 1) {
    p[0] = from_opmath<T>(in[0]);
  } else {
    static_assert(K * sizeof(T) == kQflVecBytes, "one 16-byte word");
    T el[K];
#pragma unroll
    for (int i = 0; i < K; ++i) el[i] = from_opmath<T>(in[i]);
    qfl_store16(p, el);
  }
}

// What a chunk's targets are: all 0 (kNegative: every class of a negative anchor, and all but
// one of a positive's), score at the label and 0 elsewhere (kLabels), or loaded (kDense).
enum QflChunkForm : int { kNegative, kLabels, kDenseTarget };

// One row's elements [0, K) at x (K = 1, or one 16-byte word of pred): their losses added to
// sum in column order, their gradients (times scale) stored at g when kGrad.  rel: the label's
// place in the chunk (kLabels; any value outside [0, K): not in this chunk).  kNegative gives
// the same bits as kLabels with the label outside the chunk, in fewer instructions (gfl_math.h's
// *_negative forms).
//
// kLabels takes every element by the negative form and then, only in the chunk that holds the
// label, that one element by the general formula: the one lane holding a positive's label pays
// one general element (and 2K selects) while its warp waits, not K of them.  Every lane runs
// the same loop (qfl_row), so a positive costs its warp nothing else.
template <int K, int kForm, bool kActivated, int kBeta, bool kGrad, typename scalar_t,
          typename target_t, typename index_t>
__device__ __forceinline__ void qfl_chunk(const scalar_t* __restrict__ x,
                                          const target_t* __restrict__ t,
                                          scalar_t* __restrict__ g, index_t rel,
                                          opmath_t<scalar_t> score, opmath_t<scalar_t> scale,
                                          opmath_t<scalar_t> beta, int mode,
                                          opmath_t<scalar_t>& sum) {
  using acc_t = opmath_t<scalar_t>;
  acc_t xv[K], gv[K];
  qfl_load_chunk<K>(x, xv);
  if constexpr (kForm == kNegative) {
#pragma unroll
    for (int i = 0; i < K; ++i)
      sum += qfl_element_negative<kActivated, kBeta>(xv[i], beta, mode, gv[i]);
  } else if constexpr (kForm == kLabels && K == 1) {
    sum += rel == 0 ? qfl_element<kActivated, kBeta>(xv[0], score, beta, mode, gv[0])
                    : qfl_element_negative<kActivated, kBeta>(xv[0], beta, mode, gv[0]);
  } else if constexpr (kForm == kLabels) {
    acc_t lv[K];
#pragma unroll
    for (int i = 0; i < K; ++i)
      lv[i] = qfl_element_negative<kActivated, kBeta>(xv[i], beta, mode, gv[i]);
    if (rel >= 0 && rel < index_t(K)) {
      // the label's logit read again (an L1 hit) rather than selected from xv by K - 1 selects:
      // nvcc 13.0 gives the same register count either way and a 3-instruction shorter patch
      const acc_t xl = static_cast<acc_t>(to_opmath(x[rel]));
      acc_t gl;
      const acc_t ll = qfl_element<kActivated, kBeta>(xl, score, beta, mode, gl);
#pragma unroll
      for (int i = 0; i < K; ++i) {
        lv[i] = rel == i ? ll : lv[i];
        gv[i] = rel == i ? gl : gv[i];
      }
    }
#pragma unroll
    for (int i = 0; i < K; ++i) sum += lv[i];
  } else {
    acc_t yv[K];
    qfl_load_chunk<K>(t, yv);
#pragma unroll
    for (int i = 0; i < K; ++i)
      sum += qfl_element<kActivated, kBeta>(xv[i], yv[i], beta, mode, gv[i]);
  }
  if constexpr (kGrad) {
#pragma unroll
    for (int i = 0; i < K; ++i) gv[i] *= scale;
    qfl_store_chunk<K>(g, gv);
  }
}

// One row's loss; its gradient stored when kGrad.  The lane takes the 16-byte words lane,
// lane + lanes, ... of the row and then its scalar elements (head, then tail) the same way,
// each in column order, so the row's sum has one order for a given shape and alignment.
template <bool kDense, bool kActivated, int kBeta, bool kGrad, typename scalar_t,
          typename target_t, typename index_t>
__device__ __forceinline__ opmath_t<scalar_t> qfl_row(const QflArgs<scalar_t, target_t>& a,
                                                      index_t row) {
  using acc_t = opmath_t<scalar_t>;
  // Double takes one element per "word" and no unrolling: its exp, log1p and divisions are
  // long anyway, and with more copies of them ptxas spilled a register around the divisions'
  // slow-path calls.  Two words per iteration elsewhere halve the loop's own instructions per
  // element (from ~4 to ~2 in float).
  constexpr bool kDouble = sizeof(scalar_t) == 8;
  constexpr index_t kWidth = kDouble ? 1 : kQflVecBytes / sizeof(scalar_t);
  constexpr int kUnroll = kDouble ? 1 : 2;
  const index_t c = static_cast<index_t>(a.c);
  const index_t lanes = index_t(1) << a.lanes_log2;
  // read again rather than passed in: cheap, and a value ptxas need not keep across the double
  // kernels' division slow-path calls (it spilled it there)
  const index_t lane = static_cast<index_t>(threadIdx.x) & (lanes - 1);
  const index_t off = row * c;
  const scalar_t* x = a.pred + off;
  const target_t* t = kDense ? a.target + off : nullptr;
  scalar_t* g = kGrad ? a.grad + off : nullptr;
  index_t label = -1;  // background: no column matches
  acc_t score(0);
  if constexpr (!kDense) {
    const int64_t l = a.labels[row];
    if (l >= 0 && l < a.c) label = static_cast<index_t>(l);
    score = a.scores[row];
  }
  acc_t scale(1);
  if (kGrad && a.row_scale) scale = a.row_scale[static_cast<int64_t>(row) * a.row_scale_stride];
  // head: the elements before pred's first 16-byte boundary in this row (all of them when the
  // streams are not congruent); then whole words; the tail: what is left after the last word
  index_t head = kWidth > 1 ? c : 0;
  if (kWidth > 1 && a.vectorised) {
    const auto misalign = static_cast<unsigned>(reinterpret_cast<uintptr_t>(x) % kQflVecBytes);
    head = static_cast<index_t>((kQflVecBytes - misalign) % kQflVecBytes / sizeof(scalar_t));
    head = head < c ? head : c;
  }
  const index_t words = static_cast<index_t>(static_cast<uint64_t>(c - head) / kWidth);
  const index_t body_end = head + words * kWidth;
  acc_t sum(0);

  // The words, by element index e in the whole tensor (index_t: 32 bits unless the tensor needs
  // 64, then each access is one IMAD.WIDE from its stream's base).  Every lane of a row runs the
  // same loop; in the labels form each word is told where the label is relative to it
  // (label_e - e: in [0, kWidth) in one word of one lane, never in any word when label_e = end,
  // i.e. for background and for a label among the scalars).
  const index_t step = lanes * kWidth;
  const index_t end = off + body_end;
  const index_t label_e = !kDense && label >= head && label < body_end ? off + label : end;
#pragma unroll(kUnroll)
  for (index_t e = off + head + lane * kWidth; e < end; e += step)
    qfl_chunk<kWidth, kDense ? kDenseTarget : kLabels, kActivated, kBeta, kGrad>(
        a.pred + e, kDense ? a.target + e : nullptr, kGrad ? a.grad + e : nullptr, label_e - e,
        score, scale, a.beta, a.mode, sum);

  // The scalars, head then tail.
  const index_t scalars = head + (c - body_end);
  for (index_t s = lane; s < scalars; s += lanes) {
    const index_t j = s < head ? s : s - head + body_end;
    const target_t* tj = kDense ? t + j : nullptr;
    scalar_t* gj = kGrad ? g + j : nullptr;
    if (kDense || j == label) {
      qfl_chunk<1, kDense ? kDenseTarget : kLabels, kActivated, kBeta, kGrad>(
          x + j, tj, gj, label - j, score, scale, a.beta, a.mode, sum);
    } else {
      qfl_chunk<1, kNegative, kActivated, kBeta, kGrad>(x + j, tj, gj, index_t(0), score, scale,
                                                        a.beta, a.mode, sum);
    }
  }
  return sum;
}

// The kernel.  Rows are handed out by warp (every lane of a warp runs the same number of
// iterations, as the shuffles need); a thread's row is past n for some lanes of the last one.
template <typename scalar_t, typename target_t, bool kDense, bool kActivated, int kBeta,
          bool kGrad, typename index_t>
__global__ void __launch_bounds__(kBlock) qfl_kernel(const QflArgs<scalar_t, target_t> a) {
  using acc_t = opmath_t<scalar_t>;
  const int shift = a.lanes_log2;
  const index_t lane = static_cast<index_t>(threadIdx.x) & ((index_t(1) << shift) - 1);
  const index_t n = static_cast<index_t>(a.n);
  const index_t warp =
      static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x / 32) + threadIdx.x / 32;
  const index_t first = warp << (5 - shift);
  const index_t offset = static_cast<index_t>(threadIdx.x % 32) >> shift;
  const index_t stride = (static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x)) >>
                         shift;
  for (index_t base = first; base < n; base += stride) {
    const index_t row = base + offset;
    acc_t sum(0);
    if (row < n) sum = qfl_row<kDense, kActivated, kBeta, kGrad>(a, row);
    // the group's sum, in the same order on every lane and every run
    for (int o = (1 << shift) >> 1; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (row < n && lane == 0 && a.loss) a.loss[row] = sum;
  }
}

// Calls f(QflType<scalar_t>, QflType<target_t>, dense, activated, beta mode, index, grad) with
// the compile-time constants (std::integral_constant, QflType<index_t>) of the kernel that `p`
// needs: the one choice shared by the launcher and the emulator.  The 64-bit-index kernels
// (tensors of 2^31 elements or more, rare) take beta's mode at run time (kBetaRuntime): a
// branch per element there, and 120 fewer kernels to compile (200 in all, sm_90 and sm_80 each).
template <typename T>
struct QflType {
  using type = T;
};

template <typename F>
void qfl_dispatch(const QflLaunch& p, bool index64, F&& f) {
  using std::integral_constant;
  const auto with_grad = [&](auto... cs) {
    if (p.grad) {
      f(cs..., integral_constant<bool, true>{});
    } else {
      f(cs..., integral_constant<bool, false>{});
    }
  };
  const auto with_beta = [&](auto... cs) {
    if (index64) {
      with_grad(cs..., integral_constant<int, kBetaRuntime>{}, QflType<int64_t>{});
      return;
    }
    switch (beta_mode(p.beta)) {
      case kBeta0: with_grad(cs..., integral_constant<int, kBeta0>{}, QflType<int32_t>{}); break;
      case kBeta1: with_grad(cs..., integral_constant<int, kBeta1>{}, QflType<int32_t>{}); break;
      case kBeta2: with_grad(cs..., integral_constant<int, kBeta2>{}, QflType<int32_t>{}); break;
      default:
        with_grad(cs..., integral_constant<int, kBetaGeneral>{}, QflType<int32_t>{});
        break;
    }
  };
  const auto with_activated = [&](auto... cs) {
    if (p.activated) {
      with_beta(cs..., integral_constant<bool, true>{});
    } else {
      with_beta(cs..., integral_constant<bool, false>{});
    }
  };
  const auto with_form = [&](auto storage) {
    using scalar_t = typename decltype(storage)::type;
    if (p.target == nullptr) {
      with_activated(storage, QflType<scalar_t>{}, integral_constant<bool, false>{});
    } else if (p.target_opmath) {
      with_activated(storage, QflType<opmath_t<scalar_t>>{}, integral_constant<bool, true>{});
    } else {
      with_activated(storage, QflType<scalar_t>{}, integral_constant<bool, true>{});
    }
  };
  switch (p.dtype) {
    case DType::kFloat: with_form(QflType<float>{}); break;
    case DType::kDouble: with_form(QflType<double>{}); break;
    case DType::kHalf: with_form(QflType<__half>{}); break;
    case DType::kBFloat16: with_form(QflType<__nv_bfloat16>{}); break;
  }
}

// The kernel's arguments for a launch description and its plan.
template <typename scalar_t, typename target_t>
QflArgs<scalar_t, target_t> qfl_args(const QflLaunch& p, const QflPlan& plan) {
  using acc_t = opmath_t<scalar_t>;
  QflArgs<scalar_t, target_t> a{};
  a.pred = static_cast<const scalar_t*>(p.pred);
  a.labels = p.labels;
  a.scores = static_cast<const acc_t*>(p.scores);
  a.target = static_cast<const target_t*>(p.target);
  a.row_scale = static_cast<const acc_t*>(p.row_scale);
  a.row_scale_stride = p.row_scale_stride;
  a.loss = static_cast<acc_t*>(p.loss);
  a.grad = static_cast<scalar_t*>(p.grad);
  a.n = p.n;
  a.c = p.c;
  a.beta = static_cast<acc_t>(p.beta);
  a.mode = beta_mode(p.beta);
  a.lanes_log2 = plan.lanes_log2;
  a.vectorised = plan.vectorised;
  return a;
}

}  // namespace gfl::cuda
