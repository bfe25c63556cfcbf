// Per-row soft rank / soft sort: the sort in front of the host-device row
// routines (soft_row.h), and the second derivative.
// Templates over the value type T (float or double); all arithmetic in
// double. The row routines take raw pointers and caller-owned scratch, never
// allocate, and are the single source of the math (ALGORITHM.md); the
// batched/threaded drivers live in the .cpp files.
#pragma once

#include <cmath>
#include <limits>

#include "common.h"
#include "pav.h"
#include "soft_row.h"
#include "sort.h"
#include "vector_math.h"

namespace softrank {

struct RowScratch {
  SortScratch sort;
  double* xs;     // n sorted values
  double* work;   // n + 1 doubles (kl: the step decays)
  double* work2;  // n + 1 doubles (sort kl: exp(-k / eps))
  BlockStack blocks;
  // Rows of pav_chunk_count(n) > 1 chunks: each chunk's stack slots and end.
  index_t* chunk_first;
  index_t* chunk_last;
  index_t* chunk_end;
  DecayTable* decay;  // what work2 holds (nullptr: nothing known)
};

template <class T>
void soft_forward_row(const T* x, index_t n, const OpSpec& spec, RowScratch& w, T* out,
                      index_t* perm, index_t* block_start) {
  if (n == 0) return;
  if (!sort_row_descending(x, n, negates_input(spec), w.sort, perm, w.xs)) {
    fill_non_finite_row(n, out, perm, block_start);
    return;
  }
  soft_forward_sorted(n, spec, w, out, perm, block_start, SerialRanges{});
}

// Second derivative: the gradient with respect to x of <c, J(x) t> (what
// double backward needs), from the stored forward state, O(n) per row. The
// blocks and perm are locally constant, so:
// - l2: J is locally constant: 0.
// - rank kl: with r the ranks, R_B = sum_B rho, s = sg/eps, cbar = sum_B(r c)/R_B
//   (tbar likewise) and q = (c - cbar)(t - tbar): s^2 r_i (q_i - sum_B(r q)/R_B).
// - sort kl: with p the block softmax of x' and C_B = sum_B c (c at sorted
//   positions, t at columns), tbar = sum_B p t: sgn * C_B * p_k (t_k - tbar),
//   sgn = +1 for a descending sort, -1 for an ascending one.
// `work` is n doubles of scratch (the kl sort's softmax).
template <class T>
void soft_hvp_row(const T* x, const T* out, const index_t* perm, const index_t* block_start,
                  const T* c, const T* t, index_t n, const OpSpec& spec, T* result, double* work) {
  if (n == 0) return;
  if (block_start[0] < 0) {
    for (index_t i = 0; i < n; ++i) result[i] = static_cast<T>(kNaN);
    return;
  }
  const double eps = spec.eps;
  // Zero: l2 (piecewise linear), eps = 0 (piecewise constant Jacobian), and
  // the rank at eps = inf (constant). Not the kl sort at eps = inf: that is
  // the log-mean-exp, whose Jacobian (the softmax) depends on x.
  if (spec.reg == Reg::L2 || eps == 0.0 || (std::isinf(eps) && spec.op == Op::Rank)) {
    for (index_t i = 0; i < n; ++i) result[i] = static_cast<T>(0.0);
    return;
  }
  if (spec.op == Op::Rank) {
    const double scale = (spec.descending ? -1.0 : 1.0) / eps;
    // eps below ~1e-154: 1/eps^2 (times a rank <= n) overflows, and inf * 0
    // would make the (zero) result of every singleton block NaN. Divide.
    const bool divide = std::isinf(scale * scale * static_cast<double>(n));
    for_each_block(block_start, 0, n, [&](index_t s, index_t e) {
      const double inv_r = 1.0 / rho_sum(n, s, e);
      double c_dot = 0.0, t_dot = 0.0;
      for (index_t i = s; i < e; ++i) {
        const double r = static_cast<double>(out[perm[i]]);
        c_dot += r * static_cast<double>(c[perm[i]]);
        t_dot += r * static_cast<double>(t[perm[i]]);
      }
      const double c_bar = c_dot * inv_r, t_bar = t_dot * inv_r;
      double q_dot = 0.0;
      for (index_t i = s; i < e; ++i) {
        const double q = (static_cast<double>(c[perm[i]]) - c_bar) *
                         (static_cast<double>(t[perm[i]]) - t_bar);
        work[i] = q;
        q_dot += static_cast<double>(out[perm[i]]) * q;
      }
      const double q_bar = q_dot * inv_r;
      for (index_t i = s; i < e; ++i) {
        const double r = static_cast<double>(out[perm[i]]);
        result[perm[i]] = static_cast<T>(divide ? r * (work[i] - q_bar) / eps / eps
                                                : scale * scale * r * (work[i] - q_bar));
      }
    });
    return;
  }
  const double sgn = spec.descending ? 1.0 : -1.0;
  // The block softmaxes, their exps in one call (soft_row.h, block_softmax_exponents).
  block_softmax_exponents(x, perm, block_start, 0, n, negates_input(spec), work);
  exp_nonpositive_buffer(work, n);
  for_each_block(block_start, 0, n, [&](index_t s, index_t e) {
    block_softmax_normalise(s, e, work);
    double c_sum = 0.0, t_bar = 0.0;
    for (index_t i = s; i < e; ++i) {
      c_sum += static_cast<double>(c[i]);
      t_bar += work[i] * static_cast<double>(t[perm[i]]);
    }
    for (index_t i = s; i < e; ++i)
      result[perm[i]] =
          static_cast<T>(sgn * c_sum * work[i] * (static_cast<double>(t[perm[i]]) - t_bar));
  });
}

}  // namespace softrank
