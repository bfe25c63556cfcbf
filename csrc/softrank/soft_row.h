// The per-row soft rank / soft sort routines after the sort: PAV, the
// outputs, and the vector-Jacobian and Jacobian-vector products. Templates
// over the value type T (float or double); all arithmetic in double. They
// take raw pointers and caller-owned scratch, never allocate, and are
// host-device code: the CPU core (soft_ops.h, batched.cpp) and the CUDA core
// (csrc/cuda) run these same routines, so the CPU tests test the math the GPU
// runs. Nothing here includes sort.h (host-only: <vector>, SIMD sorts).
#pragma once

#include <cmath>
#include <limits>

#include "common.h"
#include "pav.h"
#include "vector_math.h"

namespace softrank {

// What work2 holds between rows: the kl sort's decay table exp(-k / eps),
// k < length, which depends on eps and k only (rows of a batch share it).
struct DecayTable {
  double eps = 0.0;
  index_t length = 0;
};

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// values[i] = exp(values[i]), values <= 0: vectorised on the CPU; on the GPU
// the same polynomial per element. The GPU (compiled without contraction)
// gives the portable CPU kernel's bits; the AVX2 and AVX-512 kernels use
// FMAs, so their exps may differ from those by an ulp (vector_math.h).
SOFTRANK_HD void exp_nonpositive_buffer(double* values, index_t n) {
#if defined(__CUDA_ARCH__)
  for (index_t i = 0; i < n; ++i) values[i] = exp_nonpositive(values[i]);
#else
  exp_nonpositive_inplace(values, n);
#endif
}

// Iterate the blocks recorded in block_start over sorted positions [lo, hi)
// (lo and hi block boundaries): calls fn(s, e) per block.
template <class Fn>
SOFTRANK_HD void for_each_block(const index_t* block_start, index_t lo, index_t hi, Fn&& fn) {
  index_t s = lo;
  while (s < hi) {
    index_t e = s + 1;
    while (e < hi && block_start[e] == s) ++e;
    fn(s, e);
    s = e;
  }
}

// A block's sum in the backward pass: in order below kLaneSumMin terms,
// else by lane_sum (vector_math.h), whose four chains of adds do not wait on
// each other's latency as one chain does (a kl soft sort's blocks of tens of
// items), while its extra loop exits cost short blocks (a kl soft rank's, of
// 2 to 8) more than they save. The choice depends on the block's length only.
constexpr index_t kLaneSumMin = 16;
template <class Term>
SOFTRANK_HD double block_sum(index_t count, Term&& term) {
  return count >= kLaneSumMin ? lane_sum(count, term) : ordered_sum(count, term);
}

// Sort kl: replaces each block's S by log(S / Q) (Q in stat2 stays). S and Q
// are sums of m terms, each within a few m ulp, so log(S / Q) is within
// ~8m ulp of 1 in absolute terms: below the rounding of the block's outputs
// o_k = ref + log(S / Q) - k / eps where every |o_k| >= m (float64), or
// >= m 2^-20 (float32, whose ulp is 2^29 times coarser): `tolerance` is 1 or
// 2^-20. Elsewhere, where S and Q are close (|log(S / Q)| < 1) and an output
// may be small (|x| << 1, or a block whose outputs cross 0), that would be a
// large relative error: there the ratio is log1p((S - Q) / Q), with S - Q
// summed termwise as exp(b) * expm1(a - b), a = xs_j - ref, b = -(j - s)/eps
// (or exp(a) - exp(b) where |a - b| >= 1/2: no cancellation). The exps of a,
// the terms and their sum are one vectorised pass (sort_kl_diff_sum, with
// `scratch`, positions [s, e) of n doubles, for its portable variant), and
// expm1 is expm1_small: widely spread rows (the benchmarks') pool blocks of
// tens of items that all take this path, where libm's exp and expm1 calls
// were a fifth of the operator's time, and the scalar terms after them a
// quarter of a float64 (1024, 64) soft sort's.
// Blocks are the stack slots [k_begin, k_end), the last ending at end.
SOFTRANK_HD void sort_kl_log_ratios(const double* xs, const double* decay, index_t k_begin,
                               index_t k_end, index_t end, const InverseScale& scale,
                               double tolerance, const BlockStack& b, double* scratch) {
  for (index_t k = k_begin; k < k_end; ++k) {
    const index_t bs = b.start[k];
    const index_t be = k + 1 < k_end ? b.start[k + 1] : end;
    if (be - bs == 1) {
      // A singleton keeps S = Q = 1 exactly (never merged): log(1) = 0,
      // without the log call that dominated short blocks.
      b.stat[k] = 0.0;
      continue;
    }
    double log_ratio = std::log(b.stat[k] / b.stat2[k]);
    // The outputs decrease with k: the smallest |o_k| is at an end, or 0
    // where they cross it.
    const double first_out = b.ref[k] + log_ratio;
    const double last_out = first_out - scale(static_cast<double>(be - bs - 1));
    const double smallest = first_out <= 0.0 ? -first_out : (last_out >= 0.0 ? last_out : 0.0);
    if (std::fabs(log_ratio) < 1.0 && !(smallest >= tolerance * static_cast<double>(be - bs))) {
      const double ref = b.ref[k];
      // a and b only decrease with j: once both are below -750 (both exps
      // 0) every later term is exactly 0, so the terms stop there (a block
      // of 10^4 spread values would otherwise compute them all). Where the
      // block's last term is not such a one, no term is.
      const auto negligible = [&](index_t j) {
        return xs[j] - ref < -750.0 && -scale(static_cast<double>(j - bs)) < -750.0;
      };
      index_t stop = be;
      if (negligible(be - 1)) {
        stop = bs + 1;
        while (!negligible(stop)) ++stop;
      }
      // The terms j = bs + 1 .. stop - 1 (j = bs contributes exp(0) - exp(0)
      // = 0), in sort_kl_diff_sum's order.
#if defined(__CUDA_ARCH__)
      const double diff = lane_sum(stop - bs - 1, [&](index_t i) {
        const index_t j = bs + 1 + i;
        const double a = xs[j] - ref;
        return sort_kl_diff_term(a, exp_nonpositive(a), scale(static_cast<double>(j - bs)),
                                 decay[j - bs]);
      });
#else
      const double diff = sort_kl_diff_sum(xs + bs + 1, ref, decay + 1, scale.inv, scale.eps,
                                           scale.multiply, stop - bs - 1, scratch + bs + 1);
#endif
      log_ratio = std::log1p(diff / b.stat2[k]);
    }
    b.stat[k] = log_ratio;
  }
}

// The kl sort's output base - k / eps at position k of a block, where k / eps
// may pass the largest double (x spread across most of the doubles, at an eps
// below ~n / DBL_MAX): base - inf would be -inf, whereas the output lies in
// [min x, max x]. Formed at half scale there (only at the positions that
// overflow, so that the others keep the bits of the plain expression).
SOFTRANK_HD double sort_kl_output_wide(double base, double k, const InverseScale& scale) {
  const double v = base - scale(k);
  if (v != -std::numeric_limits<double>::infinity()) return v;
  return twice_finite(0.5 * base - scale(0.5 * k));
}

// The output pass of soft_forward_sorted over the blocks in stack slots
// [k_begin, k_end), the last ending at sorted position `end`, writing the
// sorted positions in [clip_lo, clip_hi) only: a long row's output is cut by
// position, so that a block spanning many chunks is written by many threads
// (every output is the same expression of its block's statistics either way).
// Everything arrives by value: captured by reference in a lambda, n and the
// pointers were reloaded after every store through block_start (an index_t
// store may alias them), which cost a quarter of a short kl row.
template <class T>
SOFTRANK_HD void write_outputs(index_t k_begin, index_t k_end, index_t end, index_t n, BlockStack b,
                               OpSpec spec, double eps, InverseScale scale,
                               InverseScale scale_out, double unscale, double sgn, bool rank_kl,
                               double* xs, T* out, const index_t* perm, index_t* block_start,
                               index_t clip_lo, index_t clip_hi) {
  // Sort outputs are sgn * v: a zero is made +0.0 (np.sort's zero for a +0.0
  // input), where an ascending sort's negation gave -0.0.
  // rank kl: the span of sorted positions in blocks of two or more, the
  // only ones whose outputs need an exp.
  index_t exp_lo = end, exp_hi = 0;
  const bool rank_l2 = eps != 0.0 && spec.op == Op::Rank && spec.reg == Reg::L2;
  for (index_t k = k_begin; k < k_end; ++k) {
    const index_t bs = b.start[k];
    const index_t be = k + 1 < k_end ? b.start[k + 1] : end;
    // The block's positions inside the window.
    const index_t s = bs > clip_lo ? bs : clip_lo, e = be < clip_hi ? be : clip_hi;
    if (s >= e) continue;
    if (spec.op == Op::Rank && eps != 0.0 && be - bs == 1) {
      // A singleton's soft rank is its hard rank n - bs, exactly: the
      // general expressions below give (n - bs) + scale(0) (l2) and
      // (n - bs) / 1 * exp(0) (kl). Most blocks are singletons where eps is
      // small relative to the gaps, and this skips their exps.
      block_start[bs] = bs;
      out[perm[bs]] = static_cast<T>(static_cast<double>(n - bs));
      xs[bs] = 0.0;  // (it may lie in the span passed to the kl exp below)
      continue;
    }
    const double ref = b.ref[k];
    // The soft operators write block_start in their output (or, rank kl,
    // exponent) loops: one pass, not two, over blocks that are often short
    // (each loop's exit is a mispredicted branch).
    const bool fused = eps != 0.0 && !(rank_l2 && !scale.multiply);
    if (!fused)
      for (index_t i = s; i < e; ++i) block_start[i] = bs;
    if (eps == 0.0) {
      if (spec.op == Op::Rank) {
        const double r = rho_mean(n, bs, be);
        for (index_t i = s; i < e; ++i) out[perm[i]] = static_cast<T>(r);
      } else {
        for (index_t i = s; i < e; ++i) out[i] = static_cast<T>(sgn * xs[i] + 0.0);
      }
      continue;
    }
    if (spec.op == Op::Rank) {
      if (spec.reg == Reg::L2) {
        const double base = rho_mean(n, bs, be), offset = b.stat[k] / static_cast<double>(be - bs);
        if (scale.multiply) {  // scale(v), its branch hoisted
          const double inv = scale.inv;
          for (index_t i = s; i < e; ++i) {
            block_start[i] = bs;
            out[perm[i]] = static_cast<T>(base + ((xs[i] - ref) - offset) * inv);
          }
        } else {
          // (A subnormal eps, whose inverse overflows.) The offsets' mean
          // after the division: offset / count rounds on the subnormal grid,
          // O(1) relative to such an eps, where (xs - ref) and their sum are
          // exact and their quotients round relatively.
          const double offset_over_eps = b.stat[k] / scale.eps / static_cast<double>(be - bs);
          for (index_t i = s; i < e; ++i)
            out[perm[i]] = static_cast<T>(base + ((xs[i] - ref) / scale.eps - offset_over_eps));
        }
      } else {
        // Exponents first (xs is not needed after this); exp and scatter below.
        for (index_t i = s; i < e; ++i) {
          block_start[i] = bs;
          xs[i] = scale(xs[i] - ref);
        }
        exp_lo = s < exp_lo ? s : exp_lo;
        exp_hi = e;
      }
    } else {
      // The sign is folded into the block's terms (sgn * (a + b) is (sgn * a) +
      // (sgn * b) exactly: a product by +-1 is exact and rounding is
      // symmetric), and "+ 0.0" makes the block's constant term +0.0 where it
      // is zero, so that no output is -0.0, at no cost per element.
      if (spec.reg == Reg::L2) {
        const double mean = sgn * (unscale * (ref + b.stat[k] / static_cast<double>(be - bs))) + 0.0;
        // (double: bs + be overflows index_t for rows longer than 2^30)
        const double centre = 0.5 * (static_cast<double>(bs) + static_cast<double>(be) - 1.0);
        // scale_out(v) with its branch hoisted, so that the loop vectorises.
        if (scale_out.multiply) {
          const double inv = sgn * scale_out.inv;
          for (index_t i = s; i < e; ++i) {
            block_start[i] = bs;
            out[i] = static_cast<T>((centre - static_cast<double>(i)) * inv + mean);
          }
        } else {
          const double e_out = sgn * scale_out.eps;
          for (index_t i = s; i < e; ++i) {
            block_start[i] = bs;
            out[i] = static_cast<T>((centre - static_cast<double>(i)) / e_out + mean);
          }
        }
      } else {
        const double base = sgn * (ref + b.stat[k]) + 0.0;  // log(S/Q), see sort_kl_log_ratios
        if (scale.multiply) {
          const double inv = sgn * scale.inv;
          for (index_t i = s; i < e; ++i) {
            block_start[i] = bs;
            out[i] = static_cast<T>(base - static_cast<double>(i - bs) * inv);
          }
        } else {
          const double step_eps = sgn * scale.eps;
          for (index_t i = s; i < e; ++i) {
            block_start[i] = bs;
            out[i] = static_cast<T>(base - static_cast<double>(i - bs) / step_eps);
          }
        }
      }
    }
  }
  // Where a kl sort block's steps k / eps can pass the largest double (eps
  // below ~n / DBL_MAX), the loop above wrote base - inf there: its blocks are
  // written again by sort_kl_output_wide, which gives the other positions the
  // same bits. A pass apart, so that the common row's loop stays as it was
  // (a test per block in it cost 3 to 8% of a (1024, 64) kl sort's
  // instructions).
  if (eps != 0.0 && spec.op == Op::Sort && spec.reg == Reg::KL && k_begin < k_end &&
      std::isinf(scale(static_cast<double>(end - b.start[k_begin])))) {
    for (index_t k = k_begin; k < k_end; ++k) {
      const index_t bs = b.start[k];
      const index_t be = k + 1 < k_end ? b.start[k + 1] : end;
      const index_t s = bs > clip_lo ? bs : clip_lo, e = be < clip_hi ? be : clip_hi;
      const double base = b.ref[k] + b.stat[k];
      for (index_t i = s; i < e; ++i)
        out[i] = static_cast<T>(sgn * sort_kl_output_wide(base, static_cast<double>(i - bs), scale) + 0.0);
    }
  }
  if (rank_kl && exp_lo < exp_hi) {
    // rank_i = R_B / S_B * exp((xs_i - ref_B) / eps)
    exp_nonpositive_buffer(xs + exp_lo, exp_hi - exp_lo);
    for (index_t k = k_begin; k < k_end; ++k) {
      const index_t bs = b.start[k];
      const index_t be = k + 1 < k_end ? b.start[k + 1] : end;
      if (be - bs == 1) continue;  // written above
      const index_t s = bs > clip_lo ? bs : clip_lo, e = be < clip_hi ? be : clip_hi;
      const double factor = rho_sum(n, bs, be) / b.stat[k];
      for (index_t i = s; i < e; ++i) out[perm[i]] = static_cast<T>(factor * xs[i]);
    }
  }
}

// The PAV chunks of a row run by `ranges`: the CPU core's for its own
// schedules; a team of GPU threads carries its own (team_ranges.h).
template <class Ranges>
SOFTRANK_HD PavChunking pav_chunking_of(const Ranges&) {
  return cpu_pav_chunking();
}

// After sorting (xs, perm filled): PAV and the outputs. `ranges` runs the
// elementwise passes (see SerialRanges).
template <class T, class Scratch, class Ranges>
SOFTRANK_HD void soft_forward_sorted(index_t n, const OpSpec& spec, const Scratch& w, T* out,
                                     const index_t* perm, index_t* block_start,
                                     const Ranges& ranges) {
  double* xs = w.xs;
  double eps = spec.eps;
  // Rows at the ends of the double range run at a power-of-two scale f
  // (exact): ranks depend on x / eps only, and the l2 sort is homogeneous,
  // sort(x, eps) = sort(f x, eps / f) / f. Without it, |x| beyond ~1e300
  // overflows the differences and block sums of x (inf or NaN outputs), and
  // a rank at subnormal eps works on the subnormal grid, whose step 2^-1074
  // is O(1) relative to eps: at the scale its block statistics are normal
  // numbers and 1/eps is finite. (A rank row that cannot be scaled, below,
  // is solved on the grid: its l2 merge test is exact there, and
  // write_outputs takes its block means after the division by eps.) The kl
  // sort needs neither. The check is O(1): xs is sorted.
  double unscale = 1.0;  // sort l2: maps the scaled block means back
  constexpr int kMaxExponent = 960;  // |x| f < 2^960: sums of n differences stay finite
  // (A compare, not std::fmax: that is a libm call per row here. xs is finite.)
  const double first_abs = n > 0 ? std::fabs(xs[0]) : 0.0;
  const double last_abs = n > 0 ? std::fabs(xs[n - 1]) : 0.0;
  const double max_abs = first_abs > last_abs ? first_abs : last_abs;
  // (The common row needs neither scaling: skip frexp, a libm call per row.)
  const bool may_scale = max_abs >= 0x1p960 ||
                         (spec.op == Op::Rank && eps < std::numeric_limits<double>::min());
  if (n > 0 && eps != 0.0 && !(spec.op == Op::Sort && spec.reg == Reg::KL) && may_scale) {
    int exponent;
    std::frexp(max_abs, &exponent);
    int k = 0;
    if (exponent > kMaxExponent) {
      k = kMaxExponent - exponent;
      // A rank whose eps 2^k would leave the normal range pools only values
      // within ~n eps of each other, never across the large ones (their
      // overflowing differences read as "no merge", rightly): no scaling,
      // which would only cost the small values their digits.
      if (spec.op == Op::Rank && !(std::ldexp(eps, k) >= std::numeric_limits<double>::min()))
        k = 0;
    } else if (spec.op == Op::Rank && eps < std::numeric_limits<double>::min()) {
      k = std::min(64, kMaxExponent - exponent);
    }
    if (k != 0) {
      const double f = std::ldexp(1.0, k);
      ranges(n, [&](index_t lo, index_t hi) {
        for (index_t i = lo; i < hi; ++i) xs[i] *= f;
      });
      if (spec.op == Op::Rank) {
        eps *= f;
      } else {
        eps /= f;
        unscale = 1.0 / f;
      }
    }
  }
  const BlockStack& b = w.blocks;
  const InverseScale scale(eps), scale_out(spec.eps);
  const Op op = spec.op;
  const bool l2 = spec.reg == Reg::L2;
  // The kl loops' exp tables (pav.h), one vectorised pass.
  double* step = w.work;
  double* decay = w.work2;
  if (eps != 0.0 && !l2 && op == Op::Rank) {
    ranges(n, [&](index_t lo, index_t hi) {
      // scale(v) with its branch hoisted, so that the loops vectorise.
      if (lo == 0) step[0] = 0.0;
      const index_t first = lo == 0 ? 1 : lo;
      const double inv = scale.inv, e = scale.eps;
      if (scale.multiply) {
        for (index_t i = first; i < hi; ++i) step[i] = (xs[i] - xs[i - 1]) * inv;
      } else {
        for (index_t i = first; i < hi; ++i) step[i] = (xs[i] - xs[i - 1]) / e;
      }
      exp_nonpositive_buffer(step + lo, hi - lo);
    });
  } else if (eps != 0.0 && !l2) {
    const bool have_decay = w.decay && w.decay->eps == eps && w.decay->length >= n;
    ranges(n, [&](index_t lo, index_t hi) {
      // (The first element apart, so that the loop vectorises.)
      if (lo == 0) step[0] = 0.0;
      for (index_t i = lo == 0 ? 1 : lo; i < hi; ++i) step[i] = xs[i] - xs[i - 1];
      exp_nonpositive_buffer(step + lo, hi - lo);
      if (have_decay) return;
      for (index_t i = lo; i < hi; ++i) decay[i] = -scale(static_cast<double>(i));
      // (The kernel is position-invariant: any split gives the same table.)
      exp_nonpositive_buffer(decay + lo, hi - lo);
    });
    if (w.decay && !have_decay) *w.decay = DecayTable{eps, n};
  }
  // PAV, by chunks on long rows (pav.h, "Long rows"): chunk c's blocks end up
  // in stack slots [first[c], last[c]), ending at sorted position end[c].
  const PavChunking chunking = pav_chunking_of(ranges);
  const index_t chunks = chunking.count(n);
  const index_t chunk_size = chunking.size;
  index_t one_first = 0, one_last = 0, one_end = n;
  index_t* first = chunks > 1 ? w.chunk_first : &one_first;
  index_t* last = chunks > 1 ? w.chunk_last : &one_last;
  index_t* end = chunks > 1 ? w.chunk_end : &one_end;
  // Where the block in chunk c's first slot ends (an emptied chunk's, once
  // the merge step below has given it its covering block: its end[c]).
  auto first_block_end = [&](index_t c) {
    return first[c] + 1 < last[c] ? b.start[first[c] + 1] : end[c];
  };
  auto pav_chunk = [&](index_t c) {
    const index_t lo = c * chunk_size, hi = c + 1 < chunks ? lo + chunk_size : n;
    const BlockStack part{b.start + lo, b.ref + lo, b.stat + lo, b.stat2 + lo, b.tail + lo};
    index_t count;
    if (eps == 0.0)
      count = pav_hard(xs, lo, hi, op, part);
    else if (l2)
      count = op == Op::Rank ? pav_rank_l2(xs, lo, hi, eps, part)
                             : pav_sort_l2(xs, lo, hi, eps, part);
    else
      count = op == Op::Rank ? pav_rank_kl(xs, step, lo, hi, n, eps, part)
                             : pav_sort_kl(xs, step, decay, lo, hi, eps, part);
    first[c] = lo;
    last[c] = lo + count;
  };
  if (chunks == 1) {
    ranges.single([&] { pav_chunk(0); });  // (a team runs this row on one member)
  } else {
    ranges.tasks(chunks, pav_chunk);
    // The merge of the chunks' stacks is one serial step.
    ranges.single([&] {
      const bool merge_all = std::isinf(eps);
      if (eps == 0.0) {
        pav_merge_chunks(HardPooling{op}, n, chunks, b, first, last, chunk_size);
      } else if (l2 && op == Op::Rank) {
        pav_merge_chunks(rank_l2_pooling(eps), n, chunks, b, first, last, chunk_size);
      } else if (l2) {
        pav_merge_chunks(sort_l2_pooling(eps), n, chunks, b, first, last, chunk_size);
      } else if (op == Op::Rank) {
        if (rank_kl_exact_sums(n))
          pav_merge_chunks(RankKlPooling<true>{merge_all, n, step}, n, chunks, b, first, last,
                           chunk_size);
        else
          pav_merge_chunks(RankKlPooling<false>{merge_all, n, step}, n, chunks, b, first, last,
                           chunk_size);
      } else {
        pav_merge_chunks(SortKlPooling{merge_all, scale, step, decay}, n, chunks, b, first, last,
                         chunk_size);
      }
      // Where each chunk's blocks end; and an emptied chunk (all of it inside
      // a block pooled on into a later chunk) takes the slot of that block
      // (the first slot of the chunk after it, which the loop has already
      // set) as its empty range, and its end as end[c]. The last chunk
      // always keeps its last block.
      index_t next = n;
      for (index_t c = chunks; c-- > 0;) {
        if (first[c] < last[c]) {
          end[c] = next;
          next = b.start[first[c]];
        } else {
          first[c] = last[c] = first[c + 1];
          end[c] = first_block_end(c + 1);
        }
      }
    });
  }
  const double sgn = spec.descending ? 1.0 : -1.0;  // sort output sign
  const bool rank_kl = eps != 0.0 && op == Op::Rank && !l2;
  auto log_ratios = [&](index_t c) {
    if (eps != 0.0 && op == Op::Sort && !l2)
      sort_kl_log_ratios(xs, decay, first[c], last[c], end[c], scale,
                         sizeof(T) == 4 ? 0x1p-20 : 1.0, b, step);
  };
  auto write_slots = [&](index_t k_begin, index_t k_end, index_t slots_end, index_t lo,
                         index_t hi) {
    write_outputs(k_begin, k_end, slots_end, n, b, spec, eps, scale, scale_out, unscale, sgn,
                  rank_kl, xs, out, perm, block_start, lo, hi);
  };
  if (chunks == 1) {
    ranges.single([&] {
      log_ratios(0);
      write_slots(first[0], last[0], end[0], 0, n);
    });
    return;
  }
  if (eps != 0.0 && op == Op::Sort && !l2) ranges.tasks(chunks, log_ratios);
  // The outputs by chunk of positions: chunk c's own blocks, then the block
  // that runs on past them (stored in the next chunk's first slot), or, in
  // an emptied chunk, the one block that covers it.
  ranges.tasks(chunks, [&](index_t c) {
    const index_t lo = c * chunk_size, hi = c + 1 < chunks ? lo + chunk_size : n;
    if (first[c] == last[c]) {
      write_slots(first[c], first[c] + 1, end[c], lo, hi);
      return;
    }
    write_slots(first[c], last[c], end[c], lo, hi);
    if (end[c] < hi) {
      write_slots(first[c + 1], first[c + 1] + 1, first_block_end(c + 1), end[c], hi);
    }
  });
}

// A row holding NaN or +-inf: NaN output, block_start -1 (the backward pass
// then returns NaN too).
template <class T>
SOFTRANK_HD void fill_non_finite_row(index_t n, T* out, index_t* perm, index_t* block_start) {
  for (index_t i = 0; i < n; ++i) {
    out[i] = static_cast<T>(kNaN);
    perm[i] = i;
    block_start[i] = -1;
  }
}

// The products below read the forward pass's permutation through `Positions`:
// a `const index_t*`, whose entries the CPU bindings have checked to lie in
// [0, n) before any product runs, or ClampedPositions, which the CUDA core
// passes: a device op cannot check its state without synchronising with the
// host, so an entry outside [0, n) (a state forged for torch.ops.softrank.
// soft_vjp) reads as position 0. The products of such a state are then
// unspecified, as those of any forged in-range state, but every read and write
// stays inside the row. For a permutation of [0, n) both give the same bits.
struct ClampedPositions {
  const index_t* perm;
  index_t n;
  SOFTRANK_HD index_t operator[](index_t i) const {
    const index_t p = perm[i];
    // (one unsigned compare: negative entries wrap above any n)
    return static_cast<std::uint32_t>(p) < static_cast<std::uint32_t>(n) ? p : 0;
  }
};

// The block softmax of the kl soft sort's backward pass, recomputed from x and
// perm: p_i = exp(x'_i - top) / sum over the block, top its largest (first)
// x'. A row's exps are one vectorised call, not one per block (a kl sort of
// (1024, 64) pools ~4 blocks of ~13 items a row, and each call's set-up and
// tail cost as much as its exps: the vjp took 1.2x (float32) to 1.4x
// (float64) as long so):
// block_softmax_exponents writes x'_i - top for sorted positions [lo, hi)
// (lo, hi block boundaries), exp_nonpositive_buffer takes their exps (its
// kernel is position-invariant: any split gives the same bits), and
// block_softmax_normalise divides one block's exps by their sum.
// The blocks are for_each_block's (runs of block_start entries equal to the
// run's first position), never block_start[i] read as an index: a forged
// state (block_start anything) must not reach outside the row.
template <class T, class Positions>
SOFTRANK_HD void block_softmax_exponents(const T* x, Positions perm,
                                         const index_t* block_start, index_t lo, index_t hi,
                                         bool negate, double* p) {
  if (hi <= lo) return;
  const double sign = negate ? -1.0 : 1.0;
  index_t s = lo;
  double top = sign * static_cast<double>(x[perm[lo]]);  // the block's largest x'
  p[lo] = top - top;
  for (index_t i = lo + 1; i < hi; ++i) {
    const double v = sign * static_cast<double>(x[perm[i]]);
    const bool starts = block_start[i] != s;
    s = starts ? i : s;
    top = starts ? v : top;
    p[i] = v - top;
  }
}

SOFTRANK_HD void block_softmax_normalise(index_t s, index_t e, double* p) {
  const double sum = block_sum(e - s, [&](index_t j) { return p[s + j]; });
  const double inv = 1.0 / sum;
  for (index_t i = s; i < e; ++i) p[i] *= inv;
}

// Shared by vjp and jvp: `vec` is the cotangent (vjp) or the tangent (jvp);
// `work` is n doubles of scratch (used by the kl soft sort).
// For the rank both products are the same (symmetric Jacobian); for the sort
// the vjp maps sorted positions to columns and the jvp columns to positions.
// soft_product_range computes the sorted positions [lo, hi), lo and hi block
// boundaries (the long-row driver splits a row so); soft_product_row all.
template <class T, class Positions>
SOFTRANK_HD void soft_product_range(const T* x, const T* out, Positions perm,
                                    const index_t* block_start, const T* vec, index_t n,
                                    const OpSpec& spec, bool transpose, T* result, double* work,
                                    index_t lo, index_t hi) {
  if (hi <= lo) return;
  if (block_start[0] < 0) {
    for (index_t i = lo; i < hi; ++i) result[transpose ? perm[i] : i] = static_cast<T>(kNaN);
    return;
  }
  const double eps = spec.eps;
  if (spec.op == Op::Rank) {
    // eps = 0 (hard ranks) and eps = inf (constant ranks) have zero gradient.
    const double sg = spec.descending ? -1.0 : 1.0;
    const double scale = (eps == 0.0 || std::isinf(eps)) ? 0.0 : sg / eps;
    // Subnormal eps: 1/eps (or 1/eps times a kl rank <= n) overflows, and
    // inf * 0 would make the (zero) gradient of every singleton block NaN.
    // Divide instead.
    const bool divide = std::isinf(scale * static_cast<double>(n));
    // The regularization is decided once per row, not per block, and a
    // singleton block (the common one where eps is small against the gaps)
    // is written without loops: the same expressions with m = 1, where
    // rho_sum(n, s, s + 1) = n - s exactly.
    if (spec.reg == Reg::L2) {
      for_each_block(block_start, lo, hi, [&](index_t s, index_t e) {
        if (e - s == 1) {
          const index_t p = perm[s];
          const double v = static_cast<double>(vec[p]);
          double sum = 0.0;
          sum += v;  // (as the loop below: 0.0 + v turns -0.0 into +0.0)
          const double d = v - sum / 1.0;
          result[p] = static_cast<T>(divide ? sg * (d / eps) : scale * d);
          return;
        }
        const double sum =
            block_sum(e - s, [&](index_t j) { return static_cast<double>(vec[perm[s + j]]); });
        const double mean = sum / static_cast<double>(e - s);
        for (index_t i = s; i < e; ++i) {
          const double d = static_cast<double>(vec[perm[i]]) - mean;
          result[perm[i]] = static_cast<T>(divide ? sg * (d / eps) : scale * d);
        }
      });
    } else {
      for_each_block(block_start, lo, hi, [&](index_t s, index_t e) {
        if (e - s == 1) {
          const index_t p = perm[s];
          const double v = static_cast<double>(vec[p]), r = static_cast<double>(out[p]);
          // A singleton's r is R_B = n - s in exact arithmetic, so its
          // product is 0 (NaN for a NaN v). v - v r / (n - s) left r's
          // rounding, which 1/eps then amplified (6.7e284 at eps = 1e-300).
          const double d = v - v;
          result[p] = static_cast<T>(divide ? sg * (r * d / eps) : scale * r * d);
          return;
        }
        const double dot = block_sum(e - s, [&](index_t j) {
          return static_cast<double>(vec[perm[s + j]]) * static_cast<double>(out[perm[s + j]]);
        });
        const double c = dot / rho_sum(n, s, e);
        for (index_t i = s; i < e; ++i) {
          const double r = static_cast<double>(out[perm[i]]);
          const double d = static_cast<double>(vec[perm[i]]) - c;
          result[perm[i]] = static_cast<T>(divide ? sg * (r * d / eps) : scale * r * d);
        }
      });
    }
    return;
  }
  const bool negate = negates_input(spec);
  const bool softmax = !(spec.reg == Reg::L2 || spec.eps == 0.0);
  if (softmax) {
    // The exps of every block at once (singletons' too: exp(0) = 1, unused).
    block_softmax_exponents(x, perm, block_start, lo, hi, negate, work);
    exp_nonpositive_buffer(work + lo, hi - lo);
  }
  for_each_block(block_start, lo, hi, [&](index_t s, index_t e) {
    // vjp reads vec at sorted positions; jvp reads it at columns.
    auto read = [&](index_t i) {
      return static_cast<double>(transpose ? vec[i] : vec[perm[i]]);
    };
    auto write = [&](index_t i, double v) {
      if (transpose)
        result[perm[i]] = static_cast<T>(v);
      else
        result[i] = static_cast<T>(v);
    };
    if (!softmax) {
      const double sum = block_sum(e - s, [&](index_t j) { return read(s + j); });
      const double mean = sum / static_cast<double>(e - s);
      for (index_t i = s; i < e; ++i) write(i, mean);
      return;
    }
    if (e - s == 1) {
      // A singleton's softmax is exp(0) / exp(0) = 1: the loops below with
      // p = 1, without its sum and division (most blocks, where eps is small
      // against the gaps). (0.0 + v, as the sums below: -0.0 -> +0.0.)
      write(s, 1.0 * (0.0 + read(s)));
      return;
    }
    block_softmax_normalise(s, e, work);
    if (transpose) {
      const double sum = block_sum(e - s, [&](index_t j) { return read(s + j); });
      for (index_t i = s; i < e; ++i) write(i, work[i] * sum);
    } else {
      const double dot = block_sum(e - s, [&](index_t j) { return work[s + j] * read(s + j); });
      for (index_t i = s; i < e; ++i) write(i, dot);
    }
  });
}

template <class T, class Positions>
SOFTRANK_HD void soft_product_row(const T* x, const T* out, Positions perm,
                                  const index_t* block_start, const T* vec, index_t n,
                                  const OpSpec& spec, bool transpose, T* result, double* work) {
  soft_product_range(x, out, perm, block_start, vec, n, spec, transpose, result, work, 0, n);
}

// --- Products of one row by a team of threads ----------------------------------
//
// soft_product_range splits a row only at block starts, so one block is one
// thread's work: a row pooled into a few long blocks (the common case where eps
// is large against the gaps) would run serially. A team instead cuts the row
// into `pieces` runs of positions. A block inside a piece is computed as
// soft_product_range computes it; a block that crosses pieces is summed in
// fragments (the piece's leading run, the part of a block begun in an earlier
// piece, and its trailing run, the part of a block that goes on into the
// next), the fragments are joined by one member in O(pieces), and every piece
// then writes its fragments. Only the crossing blocks' sums are added in
// another order than soft_product_range's. The CPU core runs it too, on rows
// of 2^18 items or more (batched.cpp: pieces that depend on n only).

// The sums a block's product needs over sorted positions [i0, i1) of the
// block [s, e): `a` (rank l2: sum v; rank kl: sum v r; sort l2: sum v; sort
// kl: sum v with transpose, else sum exp(x'_i - x'_s) v) and `z` (sort kl:
// sum exp(x'_i - x'_s); otherwise unused). v is the cotangent or tangent as
// soft_product_range reads it.
struct ProductSums {
  double a;
  double z;
};

template <class T, class Positions>
SOFTRANK_HD ProductSums product_fragment_sums(const T* x, const T* out, Positions perm,
                                              const T* vec, const OpSpec& spec, bool transpose,
                                              index_t s, index_t i0, index_t i1, double* work) {
  // In lane_sum's four partial sums: a fragment may be most of a row (a
  // block of 10^6 items), where one chain of adds waited on each add.
  const index_t count = i1 - i0;
  if (spec.op == Op::Rank) {
    if (spec.reg == Reg::L2)
      return ProductSums{
          lane_sum(count, [&](index_t j) { return static_cast<double>(vec[perm[i0 + j]]); }), 0.0};
    return ProductSums{lane_sum(count,
                                [&](index_t j) {
                                  const index_t p = perm[i0 + j];
                                  return static_cast<double>(vec[p]) *
                                         static_cast<double>(out[p]);
                                }),
                       0.0};
  }
  auto read = [&](index_t i) { return static_cast<double>(transpose ? vec[i] : vec[perm[i]]); };
  if (spec.reg == Reg::L2 || spec.eps == 0.0)
    return ProductSums{lane_sum(count, [&](index_t j) { return read(i0 + j); }), 0.0};
  // The softmax weights exp(x'_i - x'_s) into work[i0, i1) (vectorised on
  // the CPU), which product_fragment_write reads again for the vjp.
  const double sign = negates_input(spec) ? -1.0 : 1.0;
  const double top = sign * static_cast<double>(x[perm[s]]);  // the block's largest x'
  for (index_t i = i0; i < i1; ++i) work[i] = sign * static_cast<double>(x[perm[i]]) - top;
  exp_nonpositive_buffer(work + i0, count);
  const double z = lane_sum(count, [&](index_t j) { return work[i0 + j]; });
  const double a = transpose
                       ? lane_sum(count, [&](index_t j) { return read(i0 + j); })
                       : lane_sum(count, [&](index_t j) { return work[i0 + j] * read(i0 + j); });
  return ProductSums{a, z};
}

// Writes the products at sorted positions [i0, i1) of the block [s, e) whose
// whole sums are `sums`; work[i0, i1): the softmax weights that
// product_fragment_sums left there (the kl sort's).
template <class T, class Positions>
SOFTRANK_HD void product_fragment_write(const T* out, Positions perm, const T* vec,
                                        index_t n, const OpSpec& spec, bool transpose, T* result,
                                        index_t s, index_t e, ProductSums sums, index_t i0,
                                        index_t i1, const double* work) {
  const double eps = spec.eps;
  if (spec.op == Op::Rank) {
    const double sg = spec.descending ? -1.0 : 1.0;
    const double scale = (eps == 0.0 || std::isinf(eps)) ? 0.0 : sg / eps;
    const bool divide = std::isinf(scale * static_cast<double>(n));  // (soft_product_range)
    const bool l2 = spec.reg == Reg::L2;
    // (a kl singleton's mean is its own v exactly: see soft_product_range)
    const double c = l2 ? sums.a / static_cast<double>(e - s)
                        : (e - s == 1 ? static_cast<double>(vec[perm[s]])
                                      : sums.a / rho_sum(n, s, e));
    for (index_t i = i0; i < i1; ++i) {
      const double v = static_cast<double>(vec[perm[i]]);
      const double r = l2 ? 1.0 : static_cast<double>(out[perm[i]]);
      const double d = v - c;
      result[perm[i]] = static_cast<T>(divide ? sg * (r * d / eps) : scale * r * d);
    }
    return;
  }
  auto write = [&](index_t i, double v) {
    if (transpose)
      result[perm[i]] = static_cast<T>(v);
    else
      result[i] = static_cast<T>(v);
  };
  if (spec.reg == Reg::L2 || eps == 0.0) {
    const double mean = sums.a / static_cast<double>(e - s);
    for (index_t i = i0; i < i1; ++i) write(i, mean);
    return;
  }
  const double inv = 1.0 / sums.z;
  if (transpose) {
    for (index_t i = i0; i < i1; ++i) write(i, work[i] * inv * sums.a);
  } else {
    for (index_t i = i0; i < i1; ++i) write(i, sums.a * inv);
  }
}

// Scratch of soft_product_team: 2 * pieces doubles for each of `lead` and
// `trail` ({a, z} of piece p at 2p) and 2 * pieces index_t for each of
// `lead_end` and `trail_end` (the fragment's end, then its block's end).
struct ProductPieces {
  double* lead;
  double* trail;
  index_t* lead_end;
  index_t* trail_end;
};

// How many pieces a team of `members` cuts a row of n into: one per member,
// at least `min_piece` positions each, at most `max_pieces` (their join is
// serial).
SOFTRANK_HD index_t product_piece_count(index_t n, std::int64_t members, index_t min_piece,
                                        index_t max_pieces) {
  std::int64_t pieces = (static_cast<std::int64_t>(n) + min_piece - 1) / min_piece;
  if (pieces > members) pieces = members;
  if (pieces > max_pieces) pieces = max_pieces;
  return static_cast<index_t>(pieces < 1 ? 1 : pieces);
}

// The products of one row (soft_product_row's), by the team `ranges`.
template <class T, class Positions, class Ranges>
SOFTRANK_HD void soft_product_team(const T* x, const T* out, Positions perm,
                                   const index_t* block_start, const T* vec, index_t n,
                                   const OpSpec& spec, bool transpose, T* result, double* work,
                                   index_t pieces, ProductPieces scratch, const Ranges& ranges) {
  if (n == 0) return;
  auto piece_lo = [&](index_t p) {
    return static_cast<index_t>(static_cast<std::int64_t>(n) * p / pieces);
  };
  if (block_start[0] < 0) {  // a non-finite row: NaN everywhere
    ranges.tasks(pieces, [&](index_t p) {
      soft_product_range(x, out, perm, block_start, vec, n, spec, transpose, result, work,
                         piece_lo(p), piece_lo(p + 1));
    });
    return;
  }
  // Whether position i starts a block (a block boundary).
  auto starts = [&](index_t i) { return i == n || block_start[i] == i; };
  // The two entries read as positions: the start of the block that runs into
  // a piece at lo (in [0, lo) in a forward pass's state) and of the block that
  // runs out of it at hi (in [inner_lo, hi)). Clamped there, so that a forged
  // state (block_start anything) stays inside the row, as in
  // soft_product_range: the bindings check the state, a device caller cannot.
  auto clamped = [](index_t v, index_t low, index_t high) {
    return v < low ? low : (v > high ? high : v);
  };
  auto lead_start = [&](index_t lo) { return clamped(block_start[lo], 0, lo); };
  // 1. Each piece: its leading and trailing fragments' sums, and its inner blocks.
  ranges.tasks(pieces, [&](index_t p) {
    const index_t lo = piece_lo(p), hi = piece_lo(p + 1);
    index_t inner_lo = lo;
    scratch.lead_end[2 * p] = -1;
    scratch.trail_end[2 * p] = -1;
    if (lo < hi && !starts(lo)) {
      while (inner_lo < hi && !starts(inner_lo)) ++inner_lo;
      const ProductSums sums = product_fragment_sums(x, out, perm, vec, spec, transpose,
                                                     lead_start(lo), lo, inner_lo, work);
      scratch.lead[2 * p] = sums.a;
      scratch.lead[2 * p + 1] = sums.z;
      scratch.lead_end[2 * p] = inner_lo;
    }
    index_t inner_hi = hi;
    if (inner_lo < hi && !starts(hi)) {
      inner_hi = clamped(block_start[hi], inner_lo, hi);  // that block starts in this piece
      const ProductSums sums = product_fragment_sums(x, out, perm, vec, spec, transpose,
                                                     inner_hi, inner_hi, hi, work);
      scratch.trail[2 * p] = sums.a;
      scratch.trail[2 * p + 1] = sums.z;
      scratch.trail_end[2 * p] = inner_hi;  // (the fragment's start, here)
    }
    soft_product_range(x, out, perm, block_start, vec, n, spec, transpose, result, work,
                       inner_lo, inner_hi);
  });
  // 2. One member joins the fragments: a block's sums are its trailing
  // fragment's plus the leading fragments of the pieces it runs through; a
  // second pass, backwards, hands every fragment its block's sums and end.
  ranges.single([&] {
    ProductSums run{0.0, 0.0};
    for (index_t p = 0; p < pieces; ++p) {
      const index_t hi = piece_lo(p + 1);
      if (scratch.lead_end[2 * p] >= 0) {
        run.a += scratch.lead[2 * p];
        run.z += scratch.lead[2 * p + 1];
        const index_t end = scratch.lead_end[2 * p];
        const bool closes = end < hi || starts(hi);
        // The block's sums once it closes here (its end at lead_end[2p + 1]);
        // -1 marks a block that runs on into the next piece.
        scratch.lead[2 * p] = run.a;
        scratch.lead[2 * p + 1] = run.z;
        scratch.lead_end[2 * p + 1] = closes ? end : -1;
      }
      if (scratch.trail_end[2 * p] >= 0) {
        run.a = scratch.trail[2 * p];
        run.z = scratch.trail[2 * p + 1];
      }
    }
    ProductSums block{0.0, 0.0};
    index_t block_end = n;
    for (index_t p = pieces; p-- > 0;) {
      if (scratch.trail_end[2 * p] >= 0) {  // the block the next piece's lead closes or carries
        scratch.trail[2 * p] = block.a;
        scratch.trail[2 * p + 1] = block.z;
        scratch.trail_end[2 * p + 1] = block_end;
      }
      if (scratch.lead_end[2 * p] >= 0) {
        if (scratch.lead_end[2 * p + 1] >= 0) {
          block = ProductSums{scratch.lead[2 * p], scratch.lead[2 * p + 1]};
          block_end = scratch.lead_end[2 * p + 1];
        }
        scratch.lead[2 * p] = block.a;
        scratch.lead[2 * p + 1] = block.z;
        scratch.lead_end[2 * p + 1] = block_end;
      }
    }
  });
  // 3. Each piece writes its fragments.
  ranges.tasks(pieces, [&](index_t p) {
    const index_t lo = piece_lo(p), hi = piece_lo(p + 1);
    if (scratch.lead_end[2 * p] >= 0)
      product_fragment_write(out, perm, vec, n, spec, transpose, result, lead_start(lo),
                             scratch.lead_end[2 * p + 1],
                             ProductSums{scratch.lead[2 * p], scratch.lead[2 * p + 1]}, lo,
                             scratch.lead_end[2 * p], work);
    if (scratch.trail_end[2 * p] >= 0) {
      const index_t s = scratch.trail_end[2 * p];
      product_fragment_write(out, perm, vec, n, spec, transpose, result, s,
                             scratch.trail_end[2 * p + 1],
                             ProductSums{scratch.trail[2 * p], scratch.trail[2 * p + 1]}, s, hi,
                             work);
    }
  });
}

}  // namespace softrank
