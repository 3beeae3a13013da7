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

// Rows are processed kW at a time, one row per SIMD lane: bin j of the block's kW rows is one
// gathered vector, so every step (max, exp, sums, the DFL target bins, gradients) is a
// full-width vector operation whatever the bin count (8, 17, 33, ...), instead of short, ragged
// row vectors.  The gradient is computed in that transposed (bins x kW) layout in a per-thread
// buffer and written back as contiguous row-major vectors gathered from it.  (Measured on AVX-512:
// gathers beat both scalar transposes and at::vec::transpose_mxn's 16 x 16 tiles here.)
template <typename scalar_t, bool kDfl>
void rows_typed(const RowTensors& t) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  using index_t = at::vec::int_same_size_t<opmath_t>;
  using IVec = Vectorized<index_t>;
  constexpr int64_t kW = Vec::size();
  constexpr bool kConvert = !std::is_same_v<scalar_t, opmath_t>;
  constexpr int64_t kScale = sizeof(opmath_t);  // gather offsets are in elements
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
    // zt[j * kW + i] = bin j of row i of the block; et holds the exps, then the gradient
    std::vector<opmath_t> zt(bins * kW), et(bins * kW);
    // storage -> opmath copy of the block (fp16 / bf16), and the gradient before conversion
    std::vector<opmath_t> staged(kConvert ? bins * kW : 0), flat(kConvert ? bins * kW : 0);
    // write-back: row-major position f of the block is bin f % bins of row f / bins
    std::vector<index_t> flat_to_lane(bins * kW);
    for (int64_t f = 0; f < bins * kW; ++f)
      flat_to_lane[f] = static_cast<index_t>((f % bins) * kW + f / bins);
    __at_align__ index_t lane_offsets[kW];
    __at_align__ opmath_t lanes_tmp[kW];
    const Vec zero(opmath_t(0)), one(opmath_t(1));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kW;
      const int64_t rows = std::min<int64_t>(kW, m - r0);
      const opmath_t* block;
      if constexpr (kConvert) {
        at::vec::convert(pred + r0 * bins, staged.data(), rows * bins);
        block = staged.data();
      } else {
        block = pred + r0 * bins;
      }
      // padding lanes of the last block re-read its last row; their results are never stored
      for (int64_t i = 0; i < kW; ++i)
        lane_offsets[i] = static_cast<index_t>(std::min<int64_t>(i, rows - 1) * bins);
      const IVec lanes = IVec::loadu(lane_offsets);

      // Row max in two independent chains (the max is latency-bound).  A NaN logit may be
      // skipped by the comparison here but still reaches the output through exp(NaN - max).
      // The integral also keeps the argmax bin as a pivot p: y_hat - p = sum_j S_j (j - p) and
      // j - y_hat = (j - p) - (y_hat - p) avoid the cancellation of j - y_hat when the mass sits
      // on one bin (ties resolve to either bin; any pivot is exact, a near one is accurate).
      Vec zmax_a = at::vec::gather<kScale>(block, lanes);
      Vec zmax_b = at::vec::gather<kScale>(block + (bins - 1), lanes);
      zmax_a.store(zt.data());
      zmax_b.store(&zt[(bins - 1) * kW]);
      Vec arg_a(opmath_t(0)), arg_b(static_cast<opmath_t>(bins - 1));
      for (int64_t j = 1; j + 1 < bins; j += 2) {
        const Vec a = at::vec::gather<kScale>(block + j, lanes);
        a.store(&zt[j * kW]);
        const Vec a_wins = a > zmax_a;
        zmax_a = Vec::blendv(zmax_a, a, a_wins);
        if constexpr (!kDfl) arg_a = Vec::blendv(arg_a, Vec(static_cast<opmath_t>(j)), a_wins);
        if (j + 1 < bins - 1) {
          const Vec b = at::vec::gather<kScale>(block + j + 1, lanes);
          b.store(&zt[(j + 1) * kW]);
          const Vec b_wins = b > zmax_b;
          zmax_b = Vec::blendv(zmax_b, b, b_wins);
          if constexpr (!kDfl)
            arg_b = Vec::blendv(arg_b, Vec(static_cast<opmath_t>(j + 1)), b_wins);
        }
      }
      const Vec b_wins = zmax_b > zmax_a;
      const Vec zmax = Vec::blendv(zmax_a, zmax_b, b_wins);
      const Vec pivot = Vec::blendv(arg_a, arg_b, b_wins);
      Vec sum(opmath_t(0)), weighted(opmath_t(0)), bin(opmath_t(0));
      for (int64_t j = 0; j < bins; ++j, bin = bin + one) {
        // exp_u20 (<= 2 ulp), as torch's own softmax uses: half the cost of exp on a CPU
        const Vec e = (Vec::loadu(&zt[j * kW]) - zmax).exp_u20();
        e.store(&et[j * kW]);
        sum = sum + e;
        if constexpr (!kDfl) weighted = weighted + e * (bin - pivot);
      }
      const Vec inv_sum = one / sum;
      Vec scale = one;
      if (row_scale) {
        if (rs_stride == 1) {
          scale = Vec::loadu(row_scale + r0, rows);
        } else {
          for (int64_t i = 0; i < kW; ++i)
            lanes_tmp[i] = i < rows ? row_scale[(r0 + i) * rs_stride] : opmath_t(0);
          scale = Vec::loadu(lanes_tmp);
        }
      }
      if constexpr (kDfl) {
        // per lane: the target's two bins l, l + 1 and their weights, then the DFL loss
        const Vec y = Vec::loadu(target + r0, rows);
        Vec l, w_l, w_r;
        dfl_split_lanes<Vec>(y, static_cast<opmath_t>(n), l, w_l, w_r);
        if (out) {
          const IVec at_l = lanes + at::vec::convert_to_int_of_same_size(l);
          const Vec z_l = at::vec::gather<kScale>(block, at_l);
          const Vec z_r = at::vec::gather<kScale>(block + 1, at_l);
          dfl_loss<Vec>(zmax + sum.log(), z_l, z_r, w_l, w_r).store(out + r0, rows);
        }
        if (grad) {
          bin = zero;
          for (int64_t j = 0; j < bins; ++j, bin = bin + one) {
            const Vec s_j = Vec::loadu(&et[j * kW]) * inv_sum;
            (dfl_grad<Vec>(s_j, bin, l, w_l, w_r) * scale).store(&et[j * kW]);
          }
        }
      } else {
        const Vec y_hat_rel = weighted * inv_sum;  // y_hat - pivot
        if (out) {
          const Vec y_hat = pivot + y_hat_rel;
          if constexpr (std::is_same_v<out_t, opmath_t>) {
            y_hat.store(out + r0, rows);
          } else {
            y_hat.store(lanes_tmp);
            for (int64_t i = 0; i < rows; ++i) out[r0 + i] = static_cast<out_t>(lanes_tmp[i]);
          }
        }
        if (grad) {
          bin = zero;
          for (int64_t j = 0; j < bins; ++j, bin = bin + one) {
            const Vec s_j = Vec::loadu(&et[j * kW]) * inv_sum;
            (integral_grad<Vec>(s_j, bin - pivot, y_hat_rel) * scale).store(&et[j * kW]);
          }
        }
      }
      if (grad) {
        // back to row-major: contiguous vectors gathered from the lane layout
        const int64_t total = rows * bins;
        opmath_t* dst;
        if constexpr (kConvert) dst = flat.data();
        else dst = grad + r0 * bins;
        for (int64_t f0 = 0; f0 < total; f0 += kW) {
          at::vec::gather<kScale>(et.data(), IVec::loadu(&flat_to_lane[f0]))
              .store(dst + f0, std::min<int64_t>(kW, total - f0));
        }
        if constexpr (kConvert) at::vec::convert(flat.data(), grad + r0 * bins, total);
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
