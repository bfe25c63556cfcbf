// Threading and scratch management for the batched entry points. The math is
// in the headers (soft_ops.h, pav.h, sort.h); this file only splits rows into
// tasks and hands each task a per-thread scratch area.
#include "softrank/batched.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

#include "softrank/fp_env.h"
#include "softrank/isotonic.h"
#include "softrank/parallel.h"
#include "softrank/pearson.h"
#include "softrank/projection.h"
#include "softrank/soft_ops.h"

namespace softrank {
namespace {

// Per-thread scratch, grown to the longest row seen and then reused, so that
// the per-row routines never allocate.
struct ThreadScratch {
  std::vector<std::uint64_t> packed, packed_tmp;
  std::vector<KeyIndex64> keyed64, keyed64_tmp;
  std::vector<std::uint32_t> counts, keys32;
  std::vector<std::uint64_t> keys64;
  std::vector<double> xs, work, work2, ws, block_ref, block_stat, block_stat2, block_tail;
  std::vector<index_t> block_start, chunk_first, chunk_last, chunk_end;
  std::vector<index_t> state_perm, state_blocks;  // a row's forward state when not returned
  std::vector<double> chunk_ymax, chunk_wmax;
  std::vector<double> piece_lead, piece_trail;  // soft_product_team's fragments
  std::vector<index_t> piece_lead_end, piece_trail_end;
  DecayTable decay;  // what work2 holds

  // soft_product_team's scratch for `pieces` pieces.
  ProductPieces product_pieces(index_t pieces) {
    const std::size_t slots = 2 * static_cast<std::size_t>(pieces);
    grow(piece_lead, slots);
    grow(piece_trail, slots);
    grow(piece_lead_end, slots);
    grow(piece_trail_end, slots);
    return ProductPieces{piece_lead.data(), piece_trail.data(), piece_lead_end.data(),
                         piece_trail_end.data()};
  }

  RowScratch row(index_t n, bool wide) {
    const std::size_t size = static_cast<std::size_t>(n) + 1;
    if (wide) {
      grow(keys64, size);
      if (n >= kSimdSortMin) {  // (kSimdSortMin <= kRankSortMax)
        grow(packed, size);
        grow(packed_tmp, size);
      }
      if (n >= kBucketSortMin) {
        grow(keyed64, size);
        grow(keyed64_tmp, size);
      }
    } else {
      grow(keys32, size);
      grow(packed, size);  // the network sort's items too
      if (n > kRankSortMax) {
        grow(packed_tmp, size);
      }
    }
    grow(counts, kMaxRadixPasses * kMaxRadixBuckets);
    grow(xs, size);
    grow(work, size);
    if (work2.size() < size) decay = DecayTable{};  // (moved: forget it)
    grow(work2, size);
    grow(block_tail, size);
    grow(block_ref, size);
    grow(block_stat, size);
    grow(block_stat2, size);
    grow(block_start, size);
    const std::size_t chunks = static_cast<std::size_t>(pav_chunk_count(n)) + 1;
    grow(chunk_first, chunks);
    grow(chunk_last, chunks);
    grow(chunk_end, chunks);
    RowScratch r;
    r.sort.packed = packed.data();
    r.sort.packed_tmp = packed_tmp.data();
    r.sort.keyed64 = keyed64.data();
    r.sort.keyed64_tmp = keyed64_tmp.data();
    r.sort.keys32 = keys32.data();
    r.sort.keys64 = keys64.data();
    r.sort.counts = counts.data();
    r.xs = xs.data();
    r.work = work.data();
    r.work2 = work2.data();
    r.blocks = BlockStack{block_start.data(), block_ref.data(), block_stat.data(),
                          block_stat2.data(), block_tail.data()};
    r.chunk_first = chunk_first.data();
    r.chunk_last = chunk_last.data();
    r.chunk_end = chunk_end.data();
    r.decay = &decay;
    return r;
  }

  // What isotonic_forward_row needs (none of the sort's buffers).
  IsotonicScratch isotonic(index_t n) {
    const std::size_t size = static_cast<std::size_t>(n) + 1;
    grow(xs, size);
    grow(ws, size);
    grow(work, size);
    grow(block_tail, size);
    grow(block_ref, size);
    grow(block_stat, size);
    grow(block_stat2, size);
    grow(block_start, size);
    const std::size_t chunks = static_cast<std::size_t>(isotonic_chunk_count(n)) + 1;
    grow(chunk_first, chunks);
    grow(chunk_last, chunks);
    grow(chunk_end, chunks);
    grow(chunk_ymax, chunks);
    grow(chunk_wmax, chunks);
    return IsotonicScratch{xs.data(),
                           ws.data(),
                           work.data(),
                           BlockStack{block_start.data(), block_ref.data(), block_stat.data(),
                                      block_stat2.data(), block_tail.data()},
                           chunk_first.data(),
                           chunk_last.data(),
                           chunk_end.data(),
                           chunk_ymax.data(),
                           chunk_wmax.data()};
  }

  template <class V>
  static void grow(std::vector<V>& v, std::size_t size) {
    if (v.size() < size) v.resize(size);
  }
};

ThreadScratch& thread_scratch() {
  thread_local ThreadScratch scratch;
  return scratch;
}

// Below this many elements a call runs on the calling thread: waking the
// pool costs more than it saves.
constexpr std::int64_t kParallelMinElements = 16384;
constexpr std::int64_t kElementsPerTask = 8192;
// A lone row's two sorts (the projection's z and w) run on two threads from
// this length: one more task costs a few microseconds, which sorting 768
// values saves (measured on 2 cores: 256 ran 2x slower, 700 even, 1000 1.2x
// faster).
constexpr index_t kParallelSortPairMin = 768;

// Calls range_fn(begin, end) for consecutive ranges of rows covering
// [0, rows), in parallel tasks. Exceptions (only std::bad_alloc can occur)
// are carried back to the caller.
template <class RangeFn>
void for_each_row_range(std::int64_t rows, index_t n, RangeFn&& range_fn) {
  // n = 0: every row is empty and there is nothing to do. Looping over the
  // rows anyway would take hours for a valid zero-size array such as
  // np.empty((2**40, 0)).
  if (rows <= 0 || n <= 0) return;
  const std::int64_t total = rows * static_cast<std::int64_t>(n);
  // About kElementsPerTask per task, the count rounded up to a multiple of
  // the thread count and the rows spread evenly (tasks of a fixed row count
  // would split (256, 100) into 81, 81, 81 and 13 rows, and one of 2 threads
  // would run 162 of them).
  std::int64_t tasks = 1;
  if (total >= kParallelMinElements) {
    const std::int64_t threads = std::max(1, get_num_threads());
    tasks = (total + kElementsPerTask - 1) / kElementsPerTask;
    tasks = (tasks + threads - 1) / threads * threads;
    tasks = std::min(tasks, rows);
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  parallel_for(tasks, [&](std::int64_t t) {
    try {
      // floor(rows * t / tasks), without forming rows * t: (rows % tasks) * t <
      // tasks^2 <= (total / 8192 + threads)^2, far below 2^63 for any array in memory.
      const std::int64_t begin = rows / tasks * t + rows % tasks * t / tasks;
      const std::int64_t end = rows / tasks * (t + 1) + rows % tasks * (t + 1) / tasks;
      range_fn(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  });
  if (error) std::rethrow_exception(error);
}

// Calls row_fn(r) for every row, in parallel tasks of whole rows.
template <class RowFn>
void for_each_row(std::int64_t rows, index_t n, RowFn&& row_fn) {
  for_each_row_range(rows, n, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) row_fn(r);
  });
}

// One long row (or fewer rows than threads): the sort's passes, the
// elementwise passes, the PAV chunks and the output are split over the
// threads (soft_ops.h, pav.h, sort.h: bucket_sort_row). The result is the
// same bit for bit: the stable sort order is unique, the PAV chunks depend on
// n only, and every output element is computed by the same expression.
// Below this the per-row path is faster: each pass costs a synchronisation,
// which a row of 1e5 elements does not amortise (measured).
constexpr index_t kLongRow = kBucketSortMin;

struct ParallelRanges {
  int threads;
  // More parts than threads: a thread that is descheduled (a loaded machine)
  // then holds up only a small share of the work.
  int parts() const { return 4 * threads; }
  template <class Fn>
  void operator()(index_t n, Fn&& fn) const {
    const int tasks = parts();
    parallel_for(tasks, [&](std::int64_t t) {
      const index_t lo = static_cast<index_t>(static_cast<std::int64_t>(n) * t / tasks);
      const index_t hi = static_cast<index_t>(static_cast<std::int64_t>(n) * (t + 1) / tasks);
      if (lo < hi) fn(lo, hi);
    });
  }
  template <class Fn>
  void tasks(index_t count, Fn&& fn) const {
    parallel_for(count, [&](std::int64_t t) { fn(static_cast<index_t>(t)); });
  }
  template <class Fn>
  void single(Fn&& fn) const {
    fn();
  }
};

// (One thread: the LSD radix sort of sort_row_descending; see kBucketSortMin.)
inline bool sort_long_row(const float* x, index_t n, bool negate, RowScratch& w, index_t* perm,
                          const ParallelRanges& ranges) {
  if (ranges.threads <= 1) return sort_row_descending(x, n, negate, w.sort, perm, w.xs);
  return bucket_sort_row<PackedItems32>(x, n, negate, w.sort.packed, w.sort.packed_tmp, perm,
                                        w.xs, ranges);
}

inline bool sort_long_row(const double* x, index_t n, bool negate, RowScratch& w, index_t* perm,
                          const ParallelRanges& ranges) {
  if (ranges.threads <= 1) return sort_row_descending(x, n, negate, w.sort, perm, w.xs);
  return bucket_sort_row<KeyedItems64>(x, n, negate, w.sort.keyed64, w.sort.keyed64_tmp, perm,
                                       w.xs, ranges);
}

// With one thread too, so that one and two threads run the same code (the
// results are the same either way; this keeps the timings comparable).
bool use_long_row_path(std::int64_t rows, index_t n) {
  return n >= kLongRow && rows < std::max(2, get_num_threads());
}

}  // namespace

template <class T>
void soft_forward_batch(const T* x, std::int64_t rows, index_t n, const OpSpec& spec, T* out,
                        index_t* perm, index_t* block_start) {
  const StandardSubnormals subnormals;  // (fp_env.h)
  // perm = block_start = nullptr: the caller wants the values only. Each
  // row's state then goes to per-thread scratch (in cache) instead of two
  // more (rows, n) arrays that the caller would allocate, fault in and drop.
  const bool keep_state = perm != nullptr;
  if (use_long_row_path(rows, n)) {
    // More tasks than threads: a thread that is descheduled (a loaded machine)
    // then holds up only a small share of the work.
    const ParallelRanges ranges{get_num_threads()};
    ThreadScratch& s = thread_scratch();
    RowScratch scratch = s.row(n, sizeof(T) == 8);
    if (!keep_state) {
      // (Kept between calls: two fresh n-long vectors were 8 MB of page
      // faults a call at n = 1e6, on one thread.)
      ThreadScratch::grow(s.state_perm, static_cast<std::size_t>(n));
      ThreadScratch::grow(s.state_blocks, static_cast<std::size_t>(n));
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t off = r * n;
      index_t* row_perm = keep_state ? perm + off : s.state_perm.data();
      index_t* row_blocks = keep_state ? block_start + off : s.state_blocks.data();
      if (!sort_long_row(x + off, n, negates_input(spec), scratch, row_perm, ranges))
        fill_non_finite_row(n, out + off, row_perm, row_blocks);
      else
        soft_forward_sorted(n, spec, scratch, out + off, row_perm, row_blocks, ranges);
    }
    return;
  }
  for_each_row_range(rows, n, [&](std::int64_t begin, std::int64_t end) {
    // Scratch is set up once per task, not per row (rows of 64 felt it).
    ThreadScratch& s = thread_scratch();
    if (!keep_state) {
      ThreadScratch::grow(s.state_perm, static_cast<std::size_t>(n));
      ThreadScratch::grow(s.state_blocks, static_cast<std::size_t>(n));
    }
    RowScratch scratch = s.row(n, sizeof(T) == 8);
    for (std::int64_t r = begin; r < end; ++r) {
      const std::int64_t off = r * n;
      index_t* row_perm = keep_state ? perm + off : s.state_perm.data();
      index_t* row_blocks = keep_state ? block_start + off : s.state_blocks.data();
      soft_forward_row(x + off, n, spec, scratch, out + off, row_perm, row_blocks);
    }
  });
}

// The products of a row of kLongRow items or more are soft_product_team's
// (soft_row.h): the row cut into pieces of about kProductPiece positions
// whatever its blocks, a block that crosses pieces summed in fragments and
// joined in O(pieces). On the pool the pieces run in parallel, so a row
// pooled into a few long blocks (a soft sort where eps is large against the
// gaps) no longer runs on one thread, as it did when rows were split at
// block starts. The pieces depend on n only and every row of that length
// takes this path, alone on the pool or in a batch (one thread's pieces in
// order, SerialRanges): the same bits for any thread count and batch.
constexpr index_t kProductPiece = index_t{1} << 14;
constexpr index_t kMaxProductPieces = 1024;

index_t cpu_product_pieces(index_t n) {
  return product_piece_count(n, kMaxProductPieces, kProductPiece, kMaxProductPieces);
}

// One such row's products, its pieces run by `ranges` (the pool's, or
// SerialRanges), with the calling thread's scratch (work: the kl sort's
// softmax, each piece writing its own positions).
template <class T, class Ranges>
void soft_product_pieces(const T* x, const T* out, const index_t* perm, const index_t* block_start,
                         const T* vec, index_t n, const OpSpec& spec, bool transpose, T* result,
                         const Ranges& ranges) {
  ThreadScratch& s = thread_scratch();
  ThreadScratch::grow(s.work, static_cast<std::size_t>(n) + 1);
  const index_t pieces = cpu_product_pieces(n);
  soft_product_team(x, out, perm, block_start, vec, n, spec, transpose, result, s.work.data(),
                    pieces, s.product_pieces(pieces), ranges);
}

template <class T>
void soft_product_batch(const T* x, const T* out, const index_t* perm, const index_t* block_start,
                        const T* vec, std::int64_t rows, index_t n, const OpSpec& spec,
                        bool transpose, T* result) {
  const StandardSubnormals subnormals;  // (fp_env.h)
  if (use_long_row_path(rows, n)) {
    const ParallelRanges ranges{get_num_threads()};
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t off = r * n;
      soft_product_pieces(x + off, out + off, perm + off, block_start + off, vec + off, n, spec,
                          transpose, result + off, ranges);
    }
    return;
  }
  for_each_row(rows, n, [&](std::int64_t r) {
    const std::int64_t off = r * n;
    if (n >= kLongRow) {
      soft_product_pieces(x + off, out + off, perm + off, block_start + off, vec + off, n, spec,
                          transpose, result + off, SerialRanges{});
      return;
    }
    double* work = nullptr;
    if (spec.op == Op::Sort && spec.reg == Reg::KL) {
      ThreadScratch& s = thread_scratch();
      ThreadScratch::grow(s.work, static_cast<std::size_t>(n) + 1);
      work = s.work.data();
    }
    soft_product_row(x + off, out + off, perm + off, block_start + off, vec + off, n, spec,
                     transpose, result + off, work);
  });
}

template <class T>
void soft_hvp_batch(const T* x, const T* out, const index_t* perm, const index_t* block_start,
                    const T* c, const T* t, std::int64_t rows, index_t n, const OpSpec& spec,
                    T* result) {
  const StandardSubnormals subnormals;  // (fp_env.h)
  for_each_row(rows, n, [&](std::int64_t r) {
    const std::int64_t off = r * n;
    ThreadScratch& s = thread_scratch();
    ThreadScratch::grow(s.work, static_cast<std::size_t>(n) + 1);
    soft_hvp_row(x + off, out + off, perm + off, block_start + off, c + off, t + off, n, spec,
                 result + off, s.work.data());
  });
}

// Whether an isotonic call splits each row over the pool (ParallelRanges):
// long rows, fewer of them than threads. Otherwise one row per task.
inline bool isotonic_rows_on_pool(std::int64_t rows, index_t n) {
  return n >= kIsotonicChunkedMin && rows < std::max(2, get_num_threads());
}

// Runs row(y, w, scratch, solution, block_start, ranges) over every row of an
// isotonic regression (isotonic_rows_on_pool: each long row's chunks on the
// pool, or one row per task).
template <class T, class RowFn>
void for_each_isotonic_row(const T* y, const T* w, std::int64_t rows, index_t n, T* solution,
                           index_t* block_start, RowFn&& row) {
  auto offsets = [&](std::int64_t r, const IsotonicScratch& scratch, const auto& ranges) {
    const std::int64_t off = r * n;
    row(y + off, w ? w + off : nullptr, scratch, solution + off, block_start + off, ranges);
  };
  if (isotonic_rows_on_pool(rows, n)) {
    const ParallelRanges ranges{get_num_threads()};
    const IsotonicScratch scratch = thread_scratch().isotonic(n);
    for (std::int64_t r = 0; r < rows; ++r) offsets(r, scratch, ranges);
    return;
  }
  for_each_row_range(rows, n, [&](std::int64_t begin, std::int64_t end) {
    const IsotonicScratch scratch = thread_scratch().isotonic(n);
    for (std::int64_t r = begin; r < end; ++r) offsets(r, scratch, SerialRanges{});
  });
}

template <class T>
void isotonic_forward_batch(const T* y, const T* w, std::int64_t rows, index_t n, bool increasing,
                            T* solution, index_t* block_start) {
  const StandardSubnormals subnormals;  // (fp_env.h)
  for_each_isotonic_row(y, w, rows, n, solution, block_start,
                        [&](const T* yr, const T* wr, const IsotonicScratch& scratch, T* sol,
                            index_t* blocks, const auto& ranges) {
                          isotonic_forward_row(yr, wr, n, increasing, scratch, sol, blocks,
                                               ranges);
                        });
}

template <class T>
void isotonic_vjp_batch(const T* w, const index_t* block_start, const T* cotangent,
                        std::int64_t rows, index_t n, T* grad, const T* y, const T* solution,
                        T* grad_weights) {
  const StandardSubnormals subnormals;  // (fp_env.h)
  if (isotonic_rows_on_pool(rows, n)) {  // each row's blocks split over the pool
    const ParallelRanges ranges{get_num_threads()};
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t off = r * n;
      isotonic_vjp_row(w ? w + off : nullptr, block_start + off, cotangent + off, n, grad + off,
                       grad_weights ? y + off : nullptr, grad_weights ? solution + off : nullptr,
                       grad_weights ? grad_weights + off : nullptr, ranges);
    }
    return;
  }
  for_each_row(rows, n, [&](std::int64_t r) {
    const std::int64_t off = r * n;
    isotonic_vjp_row(w ? w + off : nullptr, block_start + off, cotangent + off, n, grad + off,
                     grad_weights ? y + off : nullptr, grad_weights ? solution + off : nullptr,
                     grad_weights ? grad_weights + off : nullptr);
  });
}

// A per-thread block stack of a projection rule's block type.
template <class Block>
Block* block_stack(index_t n) {
  thread_local std::vector<Block> stack;
  if (stack.size() < static_cast<std::size_t>(n)) stack.resize(static_cast<std::size_t>(n));
  return stack.data();
}

// Sorts w decreasingly where it holds -inf (zeros of e^w under kl), which the
// key sorts refuse: finite values first, then the -inf, ties in column order.
// Returns false for NaN, +inf, or a row of -inf only.
template <class T>
bool sort_with_minus_infinity(const T* w, index_t n, index_t* perm, double* ws) {
  for (index_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(w[i]);
    if (std::isnan(v) || v == std::numeric_limits<double>::infinity()) return false;
    perm[i] = i;
  }
  std::stable_sort(perm, perm + n, [w](index_t a, index_t b) { return w[a] > w[b]; });
  for (index_t i = 0; i < n; ++i) ws[i] = static_cast<double>(w[perm[i]]);
  return std::isfinite(ws[0]);
}

// Where w is already non-increasing (rho, the top-k weights, a w the caller
// sorted) its sort is the identity: one pass instead of a sort. Finite
// values only, and -inf where `minus_infinity` allows it (kl). Returns false,
// with perm and ws partly written, otherwise.
template <class T>
bool already_decreasing(const T* w, index_t n, bool minus_infinity, index_t* perm, double* ws) {
  for (index_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(w[i]) + 0.0;  // (-0.0 -> +0.0, as the sort keys)
    if (!(std::isfinite(v) || (minus_infinity && v == -std::numeric_limits<double>::infinity())))
      return false;
    if (i > 0 && v > ws[i - 1]) return false;
    ws[i] = v;
    perm[i] = i;
  }
  return n > 0 && std::isfinite(ws[0]);
}

template <class T>
void projection_forward_batch(const T* z, const T* w, std::int64_t rows, index_t n, double eps,
                              Reg reg, T* out, index_t* perm_z, index_t* perm_w,
                              index_t* block_start, index_t* inv_z, index_t* inv_w) {
  const StandardSubnormals subnormals;  // (fp_env.h)
  const bool pool_all = std::isinf(eps);
  // Fewer rows than threads: a row's two sorts run at the same time.
  const bool sort_pairs_in_parallel = n >= kParallelSortPairMin && get_num_threads() > 1 &&
                                      rows < get_num_threads();
  // kl with 0 < eps < inf: the runs rule's per-position references and exps
  // of s and of ws (projection.h), each made by the task that sorts it.
  const bool kl_runs = reg == Reg::KL && !pool_all && eps != 0.0;
  // A row whose w equals the previous row's (a w shared by every row, as the
  // adapters pass one) reuses that row's sorted w and its permutation: one
  // compare pass instead of a sort.
  auto project_row = [&](std::int64_t r, bool same_w_as_previous) {
    const std::int64_t off = r * n;
    ThreadScratch& scratch_owner = thread_scratch();
    RowScratch scratch = scratch_owner.row(n, sizeof(T) == 8);
    double* s = scratch.xs;
    double* ws = scratch.work;  // (kept from the previous row where w is the same)
    double* sorted_out = scratch.work2;
    scratch_owner.decay = DecayTable{};  // work2 is overwritten here
    // (kl runs: in the block stack's arrays, as this rule keeps its own stack)
    double* refs_s = scratch.blocks.ref;
    double* t_s = scratch.blocks.stat;
    double* refs_w = scratch.blocks.stat2;
    double* t_w = scratch.blocks.tail;
    // kl depends on z / eps alone. Where |s| reaches 2^1022 its differences
    // (s_a - s_b, divided by eps) would overflow although their quotients
    // by eps need not (eps > 1): s and eps are both divided by 4 (exact but
    // for subnormal s, far below such a row's resolution) where eps stays
    // normal. (A smaller eps overflows the quotients anyway: the rule's
    // half-scale paths.)
    double eps_s = eps;
    auto z_references = [&] {
      if (std::fmax(std::fabs(s[0]), std::fabs(s[n - 1])) >= 0x1p1022 && eps >= 0x1p-1000) {
        for (index_t i = 0; i < n; ++i) s[i] *= 0.25;
        eps_s = eps * 0.25;
      }
      kl_references_decreasing(s, n, eps_s, refs_s, t_s);
      exp_nonpositive_buffer(t_s, n);
    };
    auto w_references = [&] {
      index_t finite_w = n;  // ws decreasing: its -inf (zeros of e^w) come last
      while (finite_w > 1 && ws[finite_w - 1] == -ProjectionKlRule::kInf) --finite_w;
      kl_references_decreasing(ws, finite_w, 1.0, refs_w, t_w);
      for (index_t i = finite_w; i < n; ++i) {
        refs_w[i] = refs_w[finite_w - 1];
        t_w[i] = -ProjectionKlRule::kInf;
      }
      exp_nonpositive_buffer(t_w, n);
    };
    bool valid, z_references_made = false, w_references_made = false;
    // perm_w null (a value-only forward): w's order goes to scratch, or is
    // not made at all where its values alone can be sorted.
    index_t* const pw = perm_w ? perm_w + off : scratch.blocks.start;
    if (same_w_as_previous && perm_w)
      std::memcpy(pw, pw - n, sizeof(index_t) * static_cast<std::size_t>(n));
    if (same_w_as_previous || already_decreasing(w + off, n, reg == Reg::KL, pw, ws)) {
      valid = sort_row_descending(z + off, n, false, scratch.sort, perm_z + off, s);
    } else {
      bool valid_z = false, valid_w = false;
      auto sort_one = [&](std::int64_t which) {
        // Each task sorts with the scratch of the thread that runs it (the
        // caller's own when both run here: same n, so no buffer moves).
        SortScratch sort = thread_scratch().row(n, sizeof(T) == 8).sort;
        if (which == 0) {
          valid_z = sort_row_descending(z + off, n, false, sort, perm_z + off, s);
          if (valid_z && kl_runs) z_references(), z_references_made = true;
        } else {
          valid_w = (!perm_w && sort_values_descending(w + off, n, ws)) ||
                    sort_row_descending(w + off, n, false, sort, pw, ws);
          if (valid_w && kl_runs) w_references(), w_references_made = true;
        }
      };
      if (sort_pairs_in_parallel) {
        parallel_for(2, sort_one);
      } else {
        sort_one(0);
        if (valid_z) sort_one(1);
      }
      valid = valid_z && (valid_w || (reg == Reg::KL &&
                                      sort_with_minus_infinity(w + off, n, pw, ws)));
    }
    auto write_inverses = [&] {
      for (index_t i = 0; inv_z && i < n; ++i) inv_z[off + perm_z[off + i]] = i;
      for (index_t i = 0; inv_w && i < n; ++i) inv_w[off + perm_w[off + i]] = i;
    };
    if (!valid) {
      for (index_t i = 0; i < n; ++i) {
        out[off + i] = static_cast<T>(kNaN);
        perm_z[off + i] = pw[i] = block_start[off + i] = i;
      }
      write_inverses();
      return false;
    }
    if (reg == Reg::L2) {
      // (ws is kept for the next row: a scaled copy goes to the free block
      // array.)
      const int k = projection_l2_scale_down(s, ws, n, scratch.blocks.ref);
      const int k_eps = projection_l2_scale_up(s, n, eps);
      const ProjectionL2Rule rule{s, k ? scratch.blocks.ref : ws, std::ldexp(eps, k_eps),
                                  pool_all};
      project_sorted(rule, n, block_stack<ProjectionL2Rule::Block>(n), sorted_out,
                     block_start + off);
      // Scaled back within [min w, max w], where P(w) lies (at max w = DBL_MAX
      // a rounding up would otherwise give inf).
      for (index_t i = 0; k && i < n; ++i) {
        const double v = std::ldexp(sorted_out[i], k);
        sorted_out[i] = v > ws[0] ? ws[0] : v < ws[n - 1] ? ws[n - 1] : v;
      }
    } else if (!kl_runs) {  // eps = 0 or inf
      const ProjectionKlRule rule{s, ws, eps, pool_all};
      project_sorted(rule, n, block_stack<ProjectionKlRule::Block>(n), sorted_out,
                     block_start + off);
    } else {
      // (w's references are made again for a row whose w equals the
      // previous row's: the block stack's arrays are overwritten by its PAV)
      if (!z_references_made) z_references();
      if (!w_references_made) w_references();
      const ProjectionKlRunsRule rule{s, ws, refs_s, t_s, refs_w, t_w, eps_s};
      project_sorted(rule, n, block_stack<ProjectionKlRunsRule::Block>(n), sorted_out,
                     block_start + off);
    }
    for (index_t i = 0; i < n; ++i) out[off + perm_z[off + i]] = static_cast<T>(sorted_out[i]);
    write_inverses();
    return true;
  };
  for_each_row_range(rows, n, [&](std::int64_t begin, std::int64_t end) {
    bool previous_valid = false;  // the previous row's ws and perm_w hold its sorted w
    for (std::int64_t r = begin; r < end; ++r) {
      const bool same_w =
          previous_valid && std::memcmp(w + r * n, w + (r - 1) * n,
                                        sizeof(T) * static_cast<std::size_t>(n)) == 0;
      previous_valid = project_row(r, same_w);
    }
  });
}

template <class T>
void isotonic_kl_forward_batch(const T* y, const T* w, std::int64_t rows, index_t n,
                               bool increasing, T* solution, index_t* block_start) {
  const StandardSubnormals subnormals;  // (fp_env.h)
  for_each_isotonic_row(y, w, rows, n, solution, block_start,
                        [&](const T* yr, const T* wr, const IsotonicScratch& scratch, T* sol,
                            index_t* blocks, const auto& ranges) {
                          isotonic_kl_forward_row(yr, wr, n, increasing, scratch, sol, blocks,
                                                  ranges);
                        });
}

template <class T>
void pearson_batch(const T* a, const T* b, std::int64_t rows, index_t n, T* corr) {
  const StandardSubnormals subnormals;  // (fp_env.h)
  if (n == 0) {  // (for_each_row visits no row of length 0)
    for (std::int64_t r = 0; r < rows; ++r) corr[r] = static_cast<T>(kNaN);
    return;
  }
  for_each_row(rows, n, [&](std::int64_t r) {
    corr[r] = static_cast<T>(pearson_moments(a + r * n, b + r * n, n).corr);
  });
}

template <class T>
void pearson_vjp_batch(const T* a, const T* b, const T* cotangent, std::int64_t rows, index_t n,
                       T* grad) {
  const StandardSubnormals subnormals;  // (fp_env.h)
  for_each_row(rows, n, [&](std::int64_t r) {
    pearson_vjp_row(a + r * n, b + r * n, n, static_cast<double>(cotangent[r]), grad + r * n);
  });
}

#define SOFTRANK_INSTANTIATE(T)                                                                 \
  template void soft_forward_batch<T>(const T*, std::int64_t, index_t, const OpSpec&, T*,       \
                                      index_t*, index_t*);                                      \
  template void soft_product_batch<T>(const T*, const T*, const index_t*, const index_t*,       \
                                      const T*, std::int64_t, index_t, const OpSpec&, bool, T*); \
  template void soft_hvp_batch<T>(const T*, const T*, const index_t*, const index_t*, const T*,  \
                                  const T*, std::int64_t, index_t, const OpSpec&, T*);           \
  template void isotonic_forward_batch<T>(const T*, const T*, std::int64_t, index_t, bool, T*,  \
                                          index_t*);                                            \
  template void isotonic_vjp_batch<T>(const T*, const index_t*, const T*, std::int64_t, index_t, \
                                      T*, const T*, const T*, T*);                              \
  template void pearson_batch<T>(const T*, const T*, std::int64_t, index_t, T*);              \
  template void pearson_vjp_batch<T>(const T*, const T*, const T*, std::int64_t, index_t, T*); \
  template void projection_forward_batch<T>(const T*, const T*, std::int64_t, index_t, double,  \
                                            Reg, T*, index_t*, index_t*, index_t*, index_t*,    \
                                            index_t*);                                          \
  template void isotonic_kl_forward_batch<T>(const T*, const T*, std::int64_t, index_t, bool,   \
                                             T*, index_t*);

SOFTRANK_INSTANTIATE(float)
SOFTRANK_INSTANTIATE(double)

}  // namespace softrank
