// CPU kernels.  Included once per instruction set by kernels_default.cpp and kernels_avx2.cpp,
// each of which defines CPU_CAPABILITY (the namespace the code lands in) first.
//
// Parallel over rows (anchors for QFL, sides for DFL / integral) with at::parallel_for; a row is
// always processed by one thread in a fixed order, so results are bitwise identical whatever the
// thread count.  Storage types half / bfloat16 are converted to float per row through a
// thread-local buffer; all math runs in the opmath type via the templates of gfl_math.h,
// vectorised with at::vec over the row and finished with the same templates on scalars.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../gfl_math.h"
#include "kernels.h"
#include "vec_ops.h"

namespace gfl::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Rows per parallel task: aim for ~16k elements so small problems stay on one thread.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_len, 1));
}

// Row buffers in opmath type; for float/double storage the caller's rows are used in place.
template <typename scalar_t, typename opmath_t>
struct RowBuffer {
  static constexpr bool kConvert = !std::is_same_v<scalar_t, opmath_t>;
  std::vector<opmath_t> storage;
  explicit RowBuffer(int64_t len) : storage(kConvert ? len : 0) {}
  const opmath_t* load(const scalar_t* row, int64_t len) {
    if constexpr (kConvert) {
      at::vec::convert(row, storage.data(), len);
      return storage.data();
    } else {
      return row;
    }
  }
  opmath_t* out(scalar_t* row) {
    if constexpr (kConvert) {
      return storage.data();
    } else {
      return row;
    }
  }
  void store(scalar_t* row, int64_t len) {
    if constexpr (kConvert) at::vec::convert(storage.data(), row, len);
  }
};

// ---------------------------------------------------------------------------------------------
// QFL: one row = one anchor's C class logits.  Returns the row loss; writes
// grad_scale * dL/dx into g when g is not null.
template <typename opmath_t, bool kActivated>
opmath_t qfl_row(const opmath_t* x, const opmath_t* y_dense, int64_t label, opmath_t score,
                 int64_t num_classes, opmath_t beta, int mode, opmath_t grad_scale, opmath_t* g) {
  using Vec = Vectorized<opmath_t>;
  constexpr int64_t kW = Vec::size();
  const Vec beta_v(beta), scale_v(grad_scale);
  Vec acc(opmath_t(0));
  int64_t c = 0;
  for (; c + kW <= num_classes; c += kW) {
    const Vec xv = Vec::loadu(x + c);
    Vec yv(opmath_t(0));
    if (y_dense) {
      yv = Vec::loadu(y_dense + c);
    } else if (label >= c && label < c + kW) {
      __at_align__ opmath_t lane_targets[kW] = {};
      lane_targets[label - c] = score;
      yv = Vec::loadu(lane_targets);
    }
    Vec gv;
    const Vec lv = kActivated ? qfl_prob<Vec>(xv, yv, beta_v, mode, gv)
                              : qfl_logit<Vec>(xv, yv, beta_v, mode, gv);
    acc = acc + lv;
    if (g) (gv * scale_v).store(g + c);
  }
  opmath_t total = at::vec::vec_reduce_all<opmath_t>(
      [](const Vec& a, const Vec& b) { return a + b; }, acc);
  for (; c < num_classes; ++c) {
    const opmath_t y = y_dense ? y_dense[c] : (c == label ? score : opmath_t(0));
    opmath_t gs;
    total += kActivated ? qfl_prob<opmath_t>(x[c], y, beta, mode, gs)
                        : qfl_logit<opmath_t>(x[c], y, beta, mode, gs);
    if (g) g[c] = gs * grad_scale;
  }
  return total;
}

template <typename scalar_t, typename target_t, bool kActivated>
void qfl_typed(const QflTensors& t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t n = t.pred.size(0), num_classes = t.pred.size(1);
  const scalar_t* pred = t.pred.const_data_ptr<scalar_t>();
  const target_t* target = t.dense ? t.target.const_data_ptr<target_t>() : nullptr;
  const int64_t* labels = t.dense ? nullptr : t.labels.const_data_ptr<int64_t>();
  const opmath_t* scores = t.dense ? nullptr : t.scores.const_data_ptr<opmath_t>();
  const opmath_t* row_scale = t.row_scale.defined() ? t.row_scale.const_data_ptr<opmath_t>()
                                                    : nullptr;
  const int64_t rs_stride = row_scale ? t.row_scale.stride(0) : 0;
  opmath_t* loss = t.loss.defined() ? t.loss.mutable_data_ptr<opmath_t>() : nullptr;
  scalar_t* grad = t.grad.defined() ? t.grad.mutable_data_ptr<scalar_t>() : nullptr;
  const opmath_t beta = static_cast<opmath_t>(t.beta);
  const int mode = beta_mode(t.beta);

  at::parallel_for(0, n, row_grain(num_classes), [&](int64_t begin, int64_t end) {
    RowBuffer<scalar_t, opmath_t> xbuf(num_classes), gbuf(num_classes);
    RowBuffer<target_t, opmath_t> ybuf(num_classes);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t off = i * num_classes;
      const opmath_t* x = xbuf.load(pred + off, num_classes);
      const opmath_t* y = target ? ybuf.load(target + off, num_classes) : nullptr;
      opmath_t* g = grad ? gbuf.out(grad + off) : nullptr;
      const opmath_t row_loss = qfl_row<opmath_t, kActivated>(
          x, y, labels ? labels[i] : -1, scores ? scores[i] : opmath_t(0), num_classes, beta,
          mode, row_scale ? row_scale[i * rs_stride] : opmath_t(1), g);
      if (loss) loss[i] = row_loss;
      if (grad) gbuf.store(grad + off, num_classes);
    }
  });
}

template <typename scalar_t>
void qfl_dispatch_target(const QflTensors& t) {
  using opmath_t = at::opmath_type<scalar_t>;
  const bool target_is_opmath = t.dense && t.target.scalar_type() != t.pred.scalar_type();
  if (t.activated) {
    if (target_is_opmath) qfl_typed<scalar_t, opmath_t, true>(t);
    else qfl_typed<scalar_t, scalar_t, true>(t);
  } else {
    if (target_is_opmath) qfl_typed<scalar_t, opmath_t, false>(t);
    else qfl_typed<scalar_t, scalar_t, false>(t);
  }
}

void qfl_kernel(const QflTensors& t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.pred.scalar_type(), "gfl_qfl_cpu",
                                  [&] { qfl_dispatch_target<scalar_t>(t); });
}

// ---------------------------------------------------------------------------------------------
// DFL and the integral: one row = one box side's n+1 bin logits.

// Rows are processed kW at a time, one row per SIMD lane: the block is transposed into a
// (bins x kW) buffer so that every step (max, exp, sums, gradients) is a full-width vector
// operation whatever the bin count (8, 17, 33, ...), instead of short, ragged row vectors.
template <typename scalar_t, bool kDfl>
void rows_typed(const RowTensors& t) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  constexpr int64_t kW = Vec::size();
  const int64_t m = t.pred.size(0), bins = t.pred.size(1), n = bins - 1;
  const scalar_t* pred = t.pred.const_data_ptr<scalar_t>();
  const opmath_t* target = kDfl ? t.target.const_data_ptr<opmath_t>() : nullptr;
  const opmath_t* row_scale = t.row_scale.defined() ? t.row_scale.const_data_ptr<opmath_t>()
                                                    : nullptr;
  const int64_t rs_stride = row_scale ? t.row_scale.stride(0) : 0;
  scalar_t* grad = t.grad.defined() ? t.grad.mutable_data_ptr<scalar_t>() : nullptr;
  // DFL's loss is stored in opmath type, the integral's value in the storage type
  using out_t = std::conditional_t<kDfl, opmath_t, scalar_t>;
  out_t* out = t.out.defined() ? t.out.mutable_data_ptr<out_t>() : nullptr;
  const int64_t blocks = (m + kW - 1) / kW;

  at::parallel_for(0, blocks, std::max<int64_t>(1, row_grain(bins) / kW),
                   [&](int64_t begin, int64_t end) {
    // lanes[j * kW + i] = bin j of row i of the block; exps / grads reuse the same layout
    std::vector<opmath_t> zt(bins * kW), et(bins * kW);
    __at_align__ opmath_t lane_a[kW], lane_b[kW], lane_c[kW], lane_d[kW];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kW;
      const int64_t rows = std::min<int64_t>(kW, m - r0);
      for (int64_t i = 0; i < kW; ++i) {
        if (i < rows) {
          const scalar_t* row = pred + (r0 + i) * bins;
          for (int64_t j = 0; j < bins; ++j) zt[j * kW + i] = static_cast<opmath_t>(row[j]);
        } else {
          for (int64_t j = 0; j < bins; ++j) zt[j * kW + i] = opmath_t(0);  // padding lanes
        }
      }
      // Row max in two independent chains (the max is latency-bound).  A NaN logit may be
      // skipped by the comparison here but still reaches the output through exp(NaN - max).
      // The integral also keeps the argmax bin as a pivot p: y_hat - p = sum_j S_j (j - p) and
      // j - y_hat = (j - p) - (y_hat - p) avoid the cancellation of j - y_hat when the mass sits
      // on one bin (ties resolve to either bin; any pivot is exact, a near one is accurate).
      Vec zmax_a = Vec::loadu(zt.data()), zmax_b = Vec::loadu(&zt[(bins - 1) * kW]);
      Vec arg_a(opmath_t(0)), arg_b(static_cast<opmath_t>(bins - 1));
      for (int64_t j = 1; j + 1 < bins; j += 2) {
        const Vec a = Vec::loadu(&zt[j * kW]), b = Vec::loadu(&zt[(j + 1) * kW]);
        const Vec a_wins = a > zmax_a, b_wins = b > zmax_b;
        zmax_a = Vec::blendv(zmax_a, a, a_wins);
        zmax_b = Vec::blendv(zmax_b, b, b_wins);
        if constexpr (!kDfl) {
          arg_a = Vec::blendv(arg_a, Vec(static_cast<opmath_t>(j)), a_wins);
          arg_b = Vec::blendv(arg_b, Vec(static_cast<opmath_t>(j + 1)), b_wins);
        }
      }
      const Vec b_wins = zmax_b > zmax_a;
      const Vec zmax = Vec::blendv(zmax_a, zmax_b, b_wins);
      const Vec pivot = Vec::blendv(arg_a, arg_b, b_wins);
      Vec sum(opmath_t(0)), weighted(opmath_t(0));
      for (int64_t j = 0; j < bins; ++j) {
        // exp_u20 (<= 2 ulp), as torch's own softmax uses: half the cost of exp on a CPU
        const Vec e = (Vec::loadu(&zt[j * kW]) - zmax).exp_u20();
        e.store(&et[j * kW]);
        sum = sum + e;
        if constexpr (!kDfl) weighted = weighted + e * (Vec(static_cast<opmath_t>(j)) - pivot);
      }
      const Vec inv_sum = Vec(opmath_t(1)) / sum;
      Vec scale(opmath_t(1));
      if (row_scale) {
        for (int64_t i = 0; i < kW; ++i) lane_a[i] = i < rows ? row_scale[(r0 + i) * rs_stride] : opmath_t(0);
        scale = Vec::loadu(lane_a);
      }
      if constexpr (kDfl) {
        // per lane: the target's two bins and weights, and the DFL loss
        const Vec lse = zmax + sum.log();
        __at_align__ opmath_t lse_lanes[kW];
        lse.store(lse_lanes);
        for (int64_t i = 0; i < kW; ++i) {
          int64_t l = 0;
          opmath_t w_l = opmath_t(0), w_r = opmath_t(0);
          if (i < rows) {
            dfl_split(target[r0 + i], n, l, w_l, w_r);
            if (out) {
              out[r0 + i] = dfl_loss(lse_lanes[i], zt[l * kW + i], zt[(l + 1) * kW + i], w_l,
                                     w_r);
            }
          }
          lane_b[i] = static_cast<opmath_t>(l);
          lane_c[i] = w_l;
          lane_d[i] = w_r;
        }
        if (grad) {
          const Vec l_v = Vec::loadu(lane_b), wl_v = Vec::loadu(lane_c), wr_v = Vec::loadu(lane_d);
          for (int64_t j = 0; j < bins; ++j) {
            const Vec s_j = Vec::loadu(&et[j * kW]) * inv_sum;
            const Vec g = dfl_grad<Vec>(s_j, Vec(static_cast<opmath_t>(j)), l_v, wl_v, wr_v);
            (g * scale).store(&et[j * kW]);
          }
        }
      } else {
        const Vec y_hat_rel = weighted * inv_sum;  // y_hat - pivot
        if (out) {
          (pivot + y_hat_rel).store(lane_a);
          for (int64_t i = 0; i < rows; ++i) out[r0 + i] = static_cast<out_t>(lane_a[i]);
        }
        if (grad) {
          for (int64_t j = 0; j < bins; ++j) {
            const Vec s_j = Vec::loadu(&et[j * kW]) * inv_sum;
            const Vec g = integral_grad<Vec>(s_j, Vec(static_cast<opmath_t>(j)) - pivot,
                                             y_hat_rel);
            (g * scale).store(&et[j * kW]);
          }
        }
      }
      if (grad) {
        for (int64_t i = 0; i < rows; ++i) {
          scalar_t* row = grad + (r0 + i) * bins;
          for (int64_t j = 0; j < bins; ++j) row[j] = static_cast<scalar_t>(et[j * kW + i]);
        }
      }
    }
  });
}

void dfl_kernel(const RowTensors& t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.pred.scalar_type(), "gfl_dfl_cpu",
                                  [&] { rows_typed<scalar_t, true>(t); });
}

void integral_kernel(const RowTensors& t) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.pred.scalar_type(),
                                  "gfl_integral_cpu", [&] { rows_typed<scalar_t, false>(t); });
}

// ---------------------------------------------------------------------------------------------
// out[i, :] = grad[i, :] * scale[i]: the backward of a forward that saved its gradient.
void scale_rows_kernel(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "gfl_scale_rows_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const int64_t rows = grad.size(0), cols = grad.numel() / std::max<int64_t>(rows, 1);
        const scalar_t* src = grad.const_data_ptr<scalar_t>();
        const opmath_t* s = scale.const_data_ptr<opmath_t>();
        const int64_t s_stride = scale.stride(0);
        scalar_t* dst = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, rows, row_grain(cols) * 4, [&](int64_t begin, int64_t end) {
          if constexpr (std::is_same_v<scalar_t, opmath_t>) {
            using Vec = Vectorized<scalar_t>;
            for (int64_t i = begin; i < end; ++i) {
              const Vec sv(s[i * s_stride]);
              at::vec::map([sv](Vec v) { return v * sv; }, dst + i * cols, src + i * cols, cols);
            }
          } else {
            for (int64_t i = begin; i < end; ++i) {
              const opmath_t si = s[i * s_stride];
              for (int64_t j = 0; j < cols; ++j)
                dst[i * cols + j] = static_cast<scalar_t>(
                    static_cast<opmath_t>(src[i * cols + j]) * si);
            }
          }
        });
      });
}

}  // namespace gfl::cpu::CPU_CAPABILITY
