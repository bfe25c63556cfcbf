// Long rows (n >= 2^18): the bucket sort (sort.h, bucket_sort_row) against
// std::stable_sort, on value-sliced and skewed (key-bit bucket) data; the
// chunked PAV (pav.h, pav_merge_chunks) against one PAV pass over the whole
// row, block for block; the soft outputs against the optimality certificate;
// and the parallel vjp against the serial row routine.
#include <algorithm>
#include <numeric>

#include "helpers.h"
#include "softrank/parallel.h"
#include "softrank/soft_ops.h"

using namespace th;

namespace {

// Rows of kind: 0 normal, 1 uniform on [0, n) (the benchmarks' data), 2
// log-normal over many decades (one value slice would hold nearly all: the
// key-bit buckets), 3 few distinct values, 4 all equal, 5 signed zeros and
// extremes, 6 sorted, 7 a long decreasing trend with noise (blocks across
// many chunks).
template <class T>
std::vector<T> long_row(Rng& rng, int n, int kind) {
  std::vector<T> x(static_cast<std::size_t>(n));
  const T big = std::numeric_limits<T>::max();
  for (int i = 0; i < n; ++i) {
    switch (kind) {
      case 0: x[i] = static_cast<T>(rng.normal()); break;
      case 1: x[i] = static_cast<T>(rng.uniform(0.0, n)); break;
      case 2: x[i] = static_cast<T>(std::exp(6.0 * rng.normal())); break;
      case 3: x[i] = static_cast<T>(rng.integer(-3, 3)); break;
      case 4: x[i] = T(0.5); break;
      case 5: {
        const T pool[] = {big, -big, T(0), T(-0.0), T(1e-30), T(-1), T(3)};
        x[i] = pool[rng.integer(0, 6)];
        break;
      }
      case 6: x[i] = static_cast<T>(i) * T(0.25); break;
      default: x[i] = static_cast<T>(-1e-3 * i + rng.normal()); break;
    }
  }
  return x;
}

const int kLongLengths[] = {1 << 18, (1 << 18) + 1, 300007};

template <class T>
void check_long_sort() {
  Rng rng(41 + sizeof(T));
  const int saved = softrank::get_num_threads();
  for (int n : kLongLengths)
    for (int kind = 0; kind < 8; ++kind)
      for (bool negate : {false, true})
        for (int threads : {1, 2}) {
          softrank::set_num_threads(threads);
          const std::vector<T> x = long_row<T>(rng, n, kind);
          // The hard sort: its perm is the order, its output the sorted row.
          const OpSpec s{Op::Sort, Reg::L2, /*descending=*/!negate, 0.0};
          const Forward<T> f = forward(x, 1, n, s);
          const std::vector<index_t> ref = reference_perm(x, negate);
          bool perm_ok = true, values_ok = true;
          for (int i = 0; i < n; ++i) {
            perm_ok = perm_ok && f.perm[i] == ref[i];
            values_ok = values_ok && f.out[i] == x[ref[i]];
          }
          CHECK(perm_ok && values_ok) << "n" << n << "kind" << kind << "negate" << negate
                                      << "threads" << threads << (sizeof(T) == 4 ? "f32" : "f64");
        }
  softrank::set_num_threads(saved);
}

// Block starts of one PAV pass over the whole sorted row, for comparison.
std::vector<index_t> whole_row_blocks(const std::vector<double>& xs, const OpSpec& s) {
  const index_t n = static_cast<index_t>(xs.size());
  std::vector<index_t> start(n);
  std::vector<double> ref(n), stat(n), stat2(n), tail(n), step(n), decay(n);
  softrank::BlockStack b{start.data(), ref.data(), stat.data(), stat2.data(), tail.data()};
  const softrank::InverseScale scale(s.eps);
  // The tables as soft_forward_sorted builds them (the same exp kernel).
  for (index_t i = 0; i < n; ++i) {
    step[i] = i == 0 ? 0.0 : (s.op == Op::Rank ? scale(xs[i] - xs[i - 1]) : xs[i] - xs[i - 1]);
    decay[i] = -scale(static_cast<double>(i));
  }
  softrank::exp_nonpositive_buffer(step.data(), n);
  softrank::exp_nonpositive_buffer(decay.data(), n);
  index_t count;
  if (s.reg == Reg::L2)
    count = s.op == Op::Rank ? softrank::pav_rank_l2(xs.data(), 0, n, s.eps, b)
                             : softrank::pav_sort_l2(xs.data(), 0, n, s.eps, b);
  else
    count = s.op == Op::Rank ? softrank::pav_rank_kl(xs.data(), step.data(), 0, n, n, s.eps, b)
                             : softrank::pav_sort_kl(xs.data(), step.data(), decay.data(), 0, n,
                                                     s.eps, b);
  std::vector<index_t> blocks(n);
  for (index_t k = 0; k < count; ++k)
    for (index_t i = start[k]; i < (k + 1 < count ? start[k + 1] : n); ++i) blocks[i] = start[k];
  return blocks;
}

}  // namespace

TEST(long_rows, float32_bucket_sort_matches_stable_sort) { check_long_sort<float>(); }
TEST(long_rows, float64_bucket_sort_matches_stable_sort) { check_long_sort<double>(); }

TEST(long_rows, chunked_pav_finds_the_blocks_of_one_pass) {
  // Kind 1 at eps 1 pools across most chunk boundaries; kind 7 at eps 1e4
  // (and any row at 1e7) makes blocks that swallow whole chunks, so the
  // merges cascade back through several of them.
  Rng rng(43);
  const int n = 300007;
  long long differing = 0, blocks_seen = 0, spanning = 0;
  for (int kind : {0, 1, 7})
    for (double eps : {0.01, 1.0, 1e4, 1e7})
      for (const OpSpec& s : all_specs(eps)) {
        const std::vector<double> x = long_row<double>(rng, n, kind);
        const Forward<double> f = forward(x, 1, n, s);
        const bool negate = softrank::negates_input(s);
        std::vector<double> xs(n);
        for (int i = 0; i < n; ++i) xs[i] = negate ? -x[f.perm[i]] : x[f.perm[i]];
        const std::vector<index_t> ref = whole_row_blocks(xs, s);
        int diff = 0;
        for (int i = 0; i < n; ++i) diff += f.block[i] != ref[i];
        differing += diff;
        for (int i = 0; i < n; ++i) {
          blocks_seen += f.block[i] == i;
          // A block reaching across a chunk boundary.
          spanning += i % softrank::kPavChunk == 0 && i > 0 && f.block[i] != i;
        }
        CHECK(diff == 0) << describe(s) << "kind" << kind << diff << "positions differ";
      }
  CHECK(spanning > 50) << "too few blocks across chunks to test the merges:" << spanning;
  CHECK(blocks_seen > 1000);
}

TEST(long_rows, soft_outputs_are_optimal) {
  Rng rng(44);
  const int n = (1 << 18) + 3;
  for (int kind : {0, 1, 3})
    for (double eps : {0.1, 10.0})
      for (const OpSpec& s : all_specs(eps)) {
        // (The certificate of the kl sort takes exp(x), past long double's
        // range for x up to 2.6e5: that cell checks the other kinds only.)
        if (kind == 1 && s.op == Op::Sort && s.reg == Reg::KL) continue;
        const std::vector<double> x = long_row<double>(rng, n, kind);
        const Forward<double> f = forward(x, 1, n, s);
        const Certificate c = certify(x, f.out, s);
        const double tol = 1e-13 * (n / 1000.0);  // as sort_paths: n roundings in the prefix sums
        CHECK(c.majorization <= tol && c.total <= tol && c.inequality <= 10 * tol)
            << describe(s) << "kind" << kind << check::fmt(static_cast<double>(c.majorization))
            << check::fmt(static_cast<double>(c.total))
            << check::fmt(static_cast<double>(c.inequality));
      }
}

// Rows of kLongRow (2^18) items or more: their products are soft_product_team's
// pieces of 2^14 positions, a block crossing pieces summed in fragments. The
// same bits on two threads and one, and alone or in a batch (whose rows run
// their pieces in order on one thread); against the row routine, which sums
// each block whole, within rounding.
TEST(long_rows, parallel_products_match_the_row_routine) {
  Rng rng(45);
  const int saved = softrank::get_num_threads();
  const int n = 300007;
  int crossing_rows = 0;  // rows with a block across a piece boundary
  for (int kind : {0, 1, 7})
    for (double eps : {0.0, 1.0, 1e4})
      for (const OpSpec& s : all_specs(eps)) {
        const std::vector<double> x = long_row<double>(rng, n, kind);
        std::vector<double> g(n);
        for (double& v : g) v = rng.normal();
        const Forward<double> f = forward(x, 1, n, s);
        bool crossing = false;
        const std::int64_t pieces = (n + (1 << 14) - 1) >> 14;  // (batched.cpp's cut)
        for (std::int64_t p = 1; p < pieces; ++p) {
          const std::int64_t b = std::int64_t{n} * p / pieces;
          crossing = crossing || f.block[b] != b;
        }
        crossing_rows += crossing;
        // The batch: this row between two others (a copy of it and a reversed one).
        std::vector<double> x3(3 * static_cast<std::size_t>(n)), g3(x3.size());
        for (int i = 0; i < n; ++i) {
          x3[i] = x[i];
          x3[n + i] = x[i];
          x3[2 * n + i] = x[n - 1 - i];
          g3[i] = g3[n + i] = g[i];
          g3[2 * n + i] = g[n - 1 - i];
        }
        const Forward<double> f3 = forward(x3, 3, n, s);
        for (bool transpose : {true, false}) {
          std::vector<double> threaded(n), one_thread(n), serial(n), work(n + 1);
          std::vector<double> batch(x3.size());
          softrank::set_num_threads(2);
          softrank::soft_product_batch(x.data(), f.out.data(), f.perm.data(), f.block.data(),
                                       g.data(), 1, n, s, transpose, threaded.data());
          softrank::soft_product_batch(x3.data(), f3.out.data(), f3.perm.data(), f3.block.data(),
                                       g3.data(), 3, n, s, transpose, batch.data());
          softrank::set_num_threads(1);
          softrank::soft_product_batch(x.data(), f.out.data(), f.perm.data(), f.block.data(),
                                       g.data(), 1, n, s, transpose, one_thread.data());
          softrank::soft_product_row(x.data(), f.out.data(), f.perm.data(), f.block.data(),
                                     g.data(), n, s, transpose, serial.data(), work.data());
          bool same = true, same_in_batch = true, near = true;
          double scale = 1.0;
          for (int i = 0; i < n; ++i) scale = std::max(scale, std::fabs(serial[i]));
          for (int i = 0; i < n; ++i) {
            same = same && check::same_bits(threaded[i], one_thread[i]);
            same_in_batch = same_in_batch && check::same_bits(batch[n + i], one_thread[i]);
            near = near && check::near(threaded[i], serial[i], 1e-12 * scale);
          }
          CHECK(same) << describe(s) << "kind" << kind << (transpose ? "vjp" : "jvp");
          CHECK(same_in_batch) << describe(s) << "kind" << kind << (transpose ? "vjp" : "jvp");
          CHECK(near) << describe(s) << "kind" << kind << (transpose ? "vjp" : "jvp");
        }
      }
  // The fragments are exercised: eps = 1e4 pools most of each row.
  CHECK(crossing_rows >= 10) << crossing_rows;
  softrank::set_num_threads(saved);
}
