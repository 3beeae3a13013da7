// CPU kernels.  Included once per instruction set by kernels_default.cpp, kernels_avx2.cpp and
// kernels_avx512.cpp,
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
#include <limits>
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

// Software prefetch of the lines of [p, p + bytes), for the kernels that stream through memory
// once: the rows and scale_rows kernels prefetch the block kPrefetchBlocks ahead (~8 KB at
// 17 bins).  Measured on the 2-vCPU Xeon VM with inputs out of cache, as in a training step,
// 32000 x 17: the integral's forward 5-10% faster, the in-place scale_rows_ 25-35% faster; the
// hardware prefetchers alone left those loads stalling.  (A prefetch never faults, so the
// partial last block needs no clamp.)
constexpr int64_t kPrefetchBlocks = 8;
// QFL walks rows of C classes: it prefetches the row this many bytes ahead.  Measured (in-process
// A/B, cold inputs, 40000 x 80, fwd+bwd): 4.4 -> 2.7 ms with (labels, scores) targets, 5.3 ->
// 4.8 ms with dense ones; 4, 8 or 16 rows ahead measured alike.
constexpr int64_t kQflPrefetchBytes = 4096;

inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

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

  // prefetch distance: the row ~4 KB ahead (13 rows at 80 float classes)
  const int64_t ahead = std::max<int64_t>(
      1, kQflPrefetchBytes / std::max<int64_t>(1, num_classes * int64_t(sizeof(scalar_t))));
  at::parallel_for(0, n, row_grain(num_classes), [&](int64_t begin, int64_t end) {
    RowBuffer<scalar_t, opmath_t> xbuf(num_classes), gbuf(num_classes);
    RowBuffer<target_t, opmath_t> ybuf(num_classes);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t off = i * num_classes;
      if (i + ahead < end) {
        prefetch_lines(pred + off + ahead * num_classes, num_classes * sizeof(scalar_t));
        if (target)
          prefetch_lines(target + off + ahead * num_classes, num_classes * sizeof(target_t));
      }
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

#if defined(CPU_CAPABILITY_AVX512)
// In-register transpose of a 16 x 16 float tile, r[i] = row i -> r[j] = column j: the usual
// unpack / unpack / 128-bit shuffle / 128-bit shuffle ladder (64 shuffles for 256 values,
// against 16 gathers).
inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i) {
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0x88);
      t[8 * i + k + 4] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif

// Block (kW rows x bins, row-major) <-> lane layout lanes[j * kW + i] = bin j of row i.
// Full AVX-512 float blocks move 16 bins at a time through transpose16x16 (the leftover bins,
// e.g. the 17th, and everything else: gathers); lanes >= rows are left as they were (their
// results are never stored).  `lanes` holds each lane's row offset; `flat_to_lane` maps a
// row-major position to its lane-layout index.
template <typename T>
inline void to_lanes(const T* block, int64_t rows, int64_t bins,
                     const Vectorized<at::vec::int_same_size_t<T>>& lanes, T* out) {
  constexpr int64_t kW = Vectorized<T>::size();
  int64_t j0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (rows == kW) {
      for (; j0 + kW <= bins; j0 += kW) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(block + i * bins + j0);
        transpose16x16(r);
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(out + (j0 + j) * kW, r[j]);
      }
    }
  }
#endif
  for (int64_t j = j0; j < bins; ++j)
    at::vec::gather<sizeof(T)>(block + j, lanes).store(out + j * kW);
}

template <typename T>
inline void from_lanes(const T* in, int64_t rows, int64_t bins,
                       const at::vec::int_same_size_t<T>* flat_to_lane, T* block) {
  constexpr int64_t kW = Vectorized<T>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (rows == kW && bins >= kW) {
      int64_t j0 = 0;
      for (; j0 + kW <= bins; j0 += kW) {
        __m512 r[16];
        for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(in + (j0 + j) * kW);
        transpose16x16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(block + i * bins + j0, r[i]);
      }
      for (int64_t i = 0; i < kW; ++i)
        for (int64_t j = j0; j < bins; ++j) block[i * bins + j] = in[j * kW + i];
      return;
    }
  }
#endif
  using IVec = Vectorized<at::vec::int_same_size_t<T>>;
  const int64_t total = rows * bins;
  for (int64_t f0 = 0; f0 < total; f0 += kW) {
    at::vec::gather<sizeof(T)>(in, IVec::loadu(flat_to_lane + f0))
        .store(block + f0, std::min<int64_t>(kW, total - f0));
  }
}

// Per lane (= row) of the lane layout: the max over the bins and, with kArgmax, the bin that
// holds it (ties resolve to either), in two independent chains (the max is latency-bound).  A
// NaN logit may be skipped by the comparison here but still reaches the output through
// exp(NaN - max).
template <typename T, bool kArgmax>
inline void lane_max(const T* zt, int64_t bins, Vectorized<T>& zmax, Vectorized<T>& argmax) {
  using Vec = Vectorized<T>;
  constexpr int64_t kW = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    // with mask registers: 1 (max) or 3 (compare, two masked moves) instructions per bin, where
    // at::vec's comparisons and blendv go through all-ones vectors (2 instructions each)
    __m512 max_a = _mm512_loadu_ps(zt), max_b = _mm512_loadu_ps(zt + (bins - 1) * kW);
    __m512 arg_a = _mm512_setzero_ps(), arg_b = _mm512_set1_ps(static_cast<float>(bins - 1));
    for (int64_t j = 1; j + 1 < bins; j += 2) {
      const __m512 a = _mm512_loadu_ps(zt + j * kW), b = _mm512_loadu_ps(zt + (j + 1) * kW);
      if constexpr (kArgmax) {
        const __mmask16 a_wins = _mm512_cmp_ps_mask(a, max_a, _CMP_GT_OQ);
        const __mmask16 b_wins = _mm512_cmp_ps_mask(b, max_b, _CMP_GT_OQ);
        max_a = _mm512_mask_mov_ps(max_a, a_wins, a);
        max_b = _mm512_mask_mov_ps(max_b, b_wins, b);
        arg_a = _mm512_mask_mov_ps(arg_a, a_wins, _mm512_set1_ps(static_cast<float>(j)));
        arg_b = _mm512_mask_mov_ps(arg_b, b_wins, _mm512_set1_ps(static_cast<float>(j + 1)));
      } else {
        // vmaxps returns its second operand when either is NaN: the same as the compare above
        max_a = _mm512_max_ps(a, max_a);
        max_b = _mm512_max_ps(b, max_b);
      }
    }
    const __mmask16 b_wins = _mm512_cmp_ps_mask(max_b, max_a, _CMP_GT_OQ);
    zmax = _mm512_mask_mov_ps(max_a, b_wins, max_b);
    argmax = _mm512_mask_mov_ps(arg_a, b_wins, arg_b);
    return;
  }
#endif
  Vec max_a = Vec::loadu(zt), max_b = Vec::loadu(zt + (bins - 1) * kW);
  Vec arg_a(T(0)), arg_b(static_cast<T>(bins - 1));
  for (int64_t j = 1; j + 1 < bins; j += 2) {
    const Vec a = Vec::loadu(zt + j * kW), b = Vec::loadu(zt + (j + 1) * kW);
    const Vec a_wins = a > max_a, b_wins = b > max_b;
    max_a = Vec::blendv(max_a, a, a_wins);
    max_b = Vec::blendv(max_b, b, b_wins);
    if constexpr (kArgmax) {
      arg_a = Vec::blendv(arg_a, Vec(static_cast<T>(j)), a_wins);
      arg_b = Vec::blendv(arg_b, Vec(static_cast<T>(j + 1)), b_wins);
    }
  }
  const Vec b_wins = max_b > max_a;
  zmax = Vec::blendv(max_a, max_b, b_wins);
  argmax = Vec::blendv(arg_a, arg_b, b_wins);
}

// Rows are processed kW at a time, one row per SIMD lane: bin j of the block's kW rows is one
// vector, so every step (max, exp, sums, the DFL target bins, gradients) is a full-width vector
// operation whatever the bin count (8, 17, 33, ...), instead of short, ragged row vectors.  The
// gradient is computed in that transposed (bins x kW) layout in a per-thread buffer and written
// back as contiguous row-major vectors.  The layout changes (to_lanes / from_lanes) use an
// in-register 16 x 16 transpose for full AVX-512 float blocks and gathers elsewhere (measured:
// gathers beat scalar transposes and at::vec::transpose_mxn's tiles; the in-register transpose
// then took the single-thread integral fwd+grad at 32000 x 17 from 0.44 to 0.33 ms, 75f1d37).
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
    // each lane's row offset; only the last, partial block differs from full_lanes (its
    // padding lanes re-read its last row; their results are never stored)
    __at_align__ index_t lane_offsets[kW];
    for (int64_t i = 0; i < kW; ++i) lane_offsets[i] = static_cast<index_t>(i * bins);
    const IVec full_lanes = IVec::loadu(lane_offsets);
    __at_align__ opmath_t lanes_tmp[kW];
    const Vec zero(opmath_t(0)), one(opmath_t(1));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kW;
      const int64_t rows = std::min<int64_t>(kW, m - r0);
      if (blk + kPrefetchBlocks < end)
        prefetch_lines(pred + (r0 + kPrefetchBlocks * kW) * bins, kW * bins * sizeof(scalar_t));
      const opmath_t* block;
      if constexpr (kConvert) {
        at::vec::convert(pred + r0 * bins, staged.data(), rows * bins);
        block = staged.data();
      } else {
        block = pred + r0 * bins;
      }
      IVec lanes = full_lanes;
      if (rows < kW) {
        for (int64_t i = 0; i < kW; ++i)
          lane_offsets[i] = static_cast<index_t>(std::min<int64_t>(i, rows - 1) * bins);
        lanes = IVec::loadu(lane_offsets);
      }

      // Row max.  The integral also keeps the argmax bin as a pivot p: y_hat - p =
      // sum_j S_j (j - p) and j - y_hat = (j - p) - (y_hat - p) avoid the cancellation of
      // j - y_hat when the mass sits on one bin (ties resolve to either bin; any pivot is exact,
      // a near one is accurate).
      to_lanes<opmath_t>(block, rows, bins, lanes, zt.data());
      Vec zmax, pivot;
      lane_max<opmath_t, !kDfl>(zt.data(), bins, zmax, pivot);
      // j_rel = j - p runs over exact small integers
      Vec sum(opmath_t(0)), weighted(opmath_t(0)), j_rel = zero - pivot;
      for (int64_t j = 0; j < bins; ++j) {
        const Vec e = exp_nonpositive(Vec::loadu(&zt[j * kW]) - zmax);
        e.store(&et[j * kW]);
        sum = sum + e;
        if constexpr (!kDfl) {
          weighted = at::vec::fmadd(e, j_rel, weighted);
          j_rel = j_rel + one;
        }
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
          Vec bin = zero;
          for (int64_t j = 0; j < bins; ++j, bin = bin + one) {
            const Vec s_j = Vec::loadu(&et[j * kW]) * inv_sum;
            Vec g = dfl_grad<Vec>(s_j, bin, l, w_l, w_r);
            if (row_scale) g = g * scale;
            g.store(&et[j * kW]);
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
          const Vec c = row_scale ? inv_sum * scale : inv_sum;
          const Vec neg_c_y = zero - c * y_hat_rel;
          j_rel = zero - pivot;
          for (int64_t j = 0; j < bins; ++j, j_rel = j_rel + one) {
            integral_grad_scaled<Vec>(Vec::loadu(&et[j * kW]), j_rel, c, neg_c_y)
                .store(&et[j * kW]);
          }
        }
      }
      if (grad) {
        if constexpr (kConvert) {
          from_lanes<opmath_t>(et.data(), rows, bins, flat_to_lane.data(), flat.data());
          at::vec::convert(flat.data(), grad + r0 * bins, rows * bins);
        } else {
          from_lanes<opmath_t>(et.data(), rows, bins, flat_to_lane.data(), grad + r0 * bins);
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
// out[i, :] = grad[i, :] * scale[i]: the backward of a forward that saved its gradient (out may
// be grad itself: every element is read and then written by the same thread).  Blocks of kW
// rows are staged as one flat run (converted to opmath for fp16 / bf16).  Row tails are scalar:
// a masked vector store followed by the next row's load of the same line stalls store
// forwarding (measured 4x slower in place at 17 columns than this form).
template <typename scalar_t>
void scale_rows_typed(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  constexpr int64_t kW = Vec::size();
  constexpr bool kConvert = !std::is_same_v<scalar_t, opmath_t>;
  const int64_t rows = grad.size(0), cols = grad.numel() / std::max<int64_t>(rows, 1);
  const scalar_t* src = grad.const_data_ptr<scalar_t>();
  const opmath_t* s = scale.const_data_ptr<opmath_t>();
  const int64_t s_stride = scale.stride(0);
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t blocks = (rows + kW - 1) / kW;
  const int64_t vec_cols = cols - cols % kW;
#if defined(CPU_CAPABILITY_AVX512)
  // AVX-512, short ragged rows (DFL, integral, QFL on 20 classes), unit or zero scale stride:
  // a full block of 16 rows is `cols` full vectors, each taking its per-element scales from the
  // block's 16 with one in-register permute (row_of[f] = f / cols); measured 1.6x faster than
  // torch's broadcasting mul_ at 32000 x 17, where the per-row loop was 1.8x slower.
  constexpr bool kPermute = std::is_same_v<opmath_t, float>;
  const bool permute_rows =
      kPermute && cols % kW != 0 && cols < 8 * kW && (s_stride == 0 || s_stride == 1);
#endif
  at::parallel_for(0, blocks, std::max<int64_t>(1, row_grain(cols) * 4 / kW),
                   [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> staged(kConvert ? kW * cols : 0);
#if defined(CPU_CAPABILITY_AVX512)
    std::vector<int32_t> row_of(permute_rows ? kW * cols : 0);
    for (int64_t f = 0; f < static_cast<int64_t>(row_of.size()); ++f)
      row_of[f] = static_cast<int32_t>(f / cols);
#endif
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * kW, n = std::min<int64_t>(kW, rows - r0);
      if (blk + kPrefetchBlocks < end)
        prefetch_lines(src + (r0 + kPrefetchBlocks * kW) * cols, kW * cols * sizeof(scalar_t));
      const opmath_t* in;
      opmath_t* res;
      if constexpr (kConvert) {
        at::vec::convert(src + r0 * cols, staged.data(), n * cols);
        in = res = staged.data();
      } else {
        in = src + r0 * cols;
        res = dst + r0 * cols;
      }
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (kPermute) {
        if (permute_rows && n == kW) {
          const __m512 block_scales =
              s_stride == 1 ? _mm512_loadu_ps(s + r0) : _mm512_set1_ps(s[0]);
          for (int64_t f0 = 0; f0 < kW * cols; f0 += kW) {
            const __m512 sc = _mm512_permutexvar_ps(
                _mm512_loadu_si512(static_cast<const void*>(&row_of[f0])), block_scales);
            _mm512_storeu_ps(res + f0, _mm512_mul_ps(_mm512_loadu_ps(in + f0), sc));
          }
          if constexpr (kConvert) at::vec::convert(staged.data(), dst + r0 * cols, n * cols);
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < n; ++i) {
        const opmath_t si = s[(r0 + i) * s_stride];
        const Vec sv(si);
        const opmath_t* row_in = in + i * cols;
        opmath_t* row_res = res + i * cols;
        for (int64_t c = 0; c < vec_cols; c += kW) (Vec::loadu(row_in + c) * sv).store(row_res + c);
        for (int64_t c = vec_cols; c < cols; ++c) row_res[c] = row_in[c] * si;
      }
      if constexpr (kConvert) at::vec::convert(staged.data(), dst + r0 * cols, n * cols);
    }
  });
}

void scale_rows_kernel(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "gfl_scale_rows_cpu",
                                  [&] { scale_rows_typed<scalar_t>(grad, scale, out); });
}

}  // namespace gfl::cpu::CPU_CAPABILITY
