// The CUDA core's schedule for long rows (team_ranges.h: a block of GPU
// threads running soft_forward_sorted together) run here by a team of
// std::threads with a barrier: every output and block start must equal the
// CPU engine's bit for bit. A missing or misplaced barrier shows as wrong or
// unrepeatable results (and, under csrc/tests/run_tsan.sh, as a data race).
#include <climits>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "helpers.h"
#include "softrank/soft_row.h"
#include "softrank/team_ranges.h"

using namespace th;

namespace {

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const int count_;
  int waiting_ = 0;
  long generation_ = 0;
};

struct ThreadTeam {
  int member, members;
  Barrier* barrier;
  std::int64_t rank() const { return member; }
  std::int64_t size() const { return members; }
  void sync() const { barrier->wait(); }
};

// Runs body(team) on `members` std::threads, each with its ThreadTeam.
template <class Body>
void run_team(int members, Body body) {
  Barrier barrier(members);
  std::vector<std::thread> threads;
  for (int m = 0; m < members; ++m)
    threads.emplace_back([&, m] { body(ThreadTeam{m, members, &barrier}); });
  for (auto& t : threads) t.join();
}

// What soft_forward_sorted reads of its scratch, as the CUDA core passes it.
struct TeamScratch {
  double* xs;
  double* work;
  double* work2;
  softrank::BlockStack blocks;
  index_t* chunk_first;
  index_t* chunk_last;
  index_t* chunk_end;
  softrank::DecayTable* decay;
};

template <class T>
std::vector<T> team_row(Rng& rng, int n, int kind) {
  std::vector<T> x(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    if (kind == 0)
      x[i] = static_cast<T>(rng.normal());
    else if (kind == 1)
      x[i] = static_cast<T>(rng.integer(-3, 3));  // ties: long blocks
    else if (kind == 2)
      x[i] = static_cast<T>(-1e-3 * i + rng.normal());  // blocks across many chunks
    else  // beyond 2^960 in float64: the rows soft_forward_sorted rescales first
      x[i] = static_cast<T>(rng.normal() * (sizeof(T) == 8 ? 1e300 : 1e30));
  }
  return x;
}

// soft_forward_sorted of one row by a team of `members` std::threads cutting
// the row into `chunking`'s PAV chunks, from the CPU engine's sort (`perm`).
template <class T>
void team_forward(const std::vector<T>& x, int n, const OpSpec& spec,
                  const std::vector<index_t>& perm,
                  int members, softrank::PavChunking chunking, std::vector<T>& out,
                  std::vector<index_t>& block) {
  const index_t chunks = chunking.count(n);
  // The sorted x' as the CUDA core decodes it from the sort keys.
  const bool negate = softrank::negates_input(spec);
  std::vector<double> xs(n), work(n + 1), work2(n + 1), ref_v(n), stat(n), stat2(n), tail(n);
  std::vector<index_t> start(n), first(chunks), last(chunks), end(chunks);
  for (int i = 0; i < n; ++i) {
    const T v = x[perm[i]];
    xs[i] = static_cast<double>((negate ? -v : v) + T(0));
  }
  const TeamScratch w{xs.data(),
                      work.data(),
                      work2.data(),
                      softrank::BlockStack{start.data(), ref_v.data(), stat.data(), stat2.data(),
                                           tail.data()},
                      first.data(),
                      last.data(),
                      end.data(),
                      nullptr};
  out.assign(n, sentinel<T>());
  block.assign(n, -7);
  run_team(members, [&](ThreadTeam member) {
    softrank::soft_forward_sorted(n, spec, w, out.data(), perm.data(), block.data(),
                                  softrank::TeamRanges<ThreadTeam>{member, chunking});
  });
}

// With the CPU's chunks the team computes the CPU engine's bits.
template <class T>
void check_team_forward(int members) {
  Rng rng(97 + sizeof(T) + members);
  for (int n : {(1 << 18) + 3, 300007}) {
    CHECK(softrank::pav_chunk_count(n) > 1) << "n" << n;
    for (int kind = 0; kind < 4; ++kind) {
      const std::vector<T> x = team_row<T>(rng, n, kind);
      // (1e-310: a subnormal eps, which the rank rescales for too)
      for (double eps : {0.0, 0.3, 1e3, 1e-310}) {
        for (const OpSpec& spec : all_specs(eps)) {
          const Forward<T> ref = forward(x, 1, n, spec);
          std::vector<T> out;
          std::vector<index_t> block;
          team_forward(x, n, spec, ref.perm, members, softrank::cpu_pav_chunking(), out, block);
          bool same = true;
          for (int i = 0; i < n; ++i)
            same = same && check::same_bits(out[i], ref.out[i]) && block[i] == ref.block[i];
          CHECK(same) << describe(spec) << "n" << n << "kind" << kind << "members" << members
                      << (sizeof(T) == 4 ? "f32" : "f64");
        }
      }
    }
  }
}

// team_forward's largest error against the CPU engine's forward `ref`,
// relative to the largest of the row's outputs and, for the sort, of its
// inputs (a block mean of terms of +-1e300 may cancel to a far smaller
// output, whose error is that of the terms); blocks_same: the same blocks.
template <class T>
double team_forward_error(const std::vector<T>& x, int n, const OpSpec& spec,
                          const Forward<T>& ref, int members, softrank::PavChunking chunking,
                          bool& blocks_same) {
  std::vector<T> out;
  std::vector<index_t> block;
  team_forward(x, n, spec, ref.perm, members, chunking, out, block);
  double worst = 0.0, row_scale = 1.0;
  for (int i = 0; i < n; ++i) {
    row_scale = std::max(row_scale, std::fabs(static_cast<double>(ref.out[i])));
    if (spec.op == Op::Sort) row_scale = std::max(row_scale, std::fabs(static_cast<double>(x[i])));
  }
  blocks_same = true;
  for (int i = 0; i < n; ++i) {
    const double a = static_cast<double>(out[i]), b = static_cast<double>(ref.out[i]);
    const double err = std::fabs(a - b) / row_scale;
    worst = std::isnan(err) ? kInf : std::max(worst, err);
    blocks_same = blocks_same && block[i] == ref.block[i];
  }
  return worst;
}

// The CUDA core's cuts: chunks of a few positions to thousands, rows of one
// chunk to hundreds. The blocks are the CPU's; the outputs differ from the
// CPU's only by the roundings of the block sums, summed in other pieces.
template <class T>
void check_fine_chunks(int members) {
  Rng rng(131 + sizeof(T) + members);
  const double tol = sizeof(T) == 8 ? 1e-12 : 2e-6;
  for (softrank::PavChunking chunking :
       {softrank::PavChunking{1, 2}, softrank::PavChunking{3, 4}, softrank::PavChunking{64, 128},
        softrank::PavChunking{1000, 1000}}) {
    for (int n : {1, 2, 7, 130, 999, 4099, 20011}) {
      for (int kind = 0; kind < 6; ++kind) {
        std::vector<T> x = team_row<T>(rng, n, kind < 4 ? kind : 0);
        if (kind == 4) std::fill(x.begin(), x.end(), T(1.5));  // one block
        if (kind == 5) std::sort(x.begin(), x.end());          // presorted
        for (double eps : {0.0, 0.3, 1.0, 1e3, 1e-310}) {
          for (const OpSpec& spec : all_specs(eps)) {
            const Forward<T> ref = forward(x, 1, n, spec);
            bool blocks_same = true;
            const double worst =
                team_forward_error(x, n, spec, ref, members, chunking, blocks_same);
            CHECK(worst <= tol && blocks_same)
                << describe(spec) << "n" << n << "kind" << kind << "chunk" << chunking.size
                << "members" << members << (sizeof(T) == 4 ? "f32" : "f64") << "error" << worst
                << "blocks same" << blocks_same;
          }
        }
      }
    }
  }
}

// soft_product_team of one row in `pieces` by a team of `members`
// std::threads: its largest error against the CPU engine's products, relative
// to their largest magnitude; nan_same: NaN where they are NaN, and every
// entry written.
template <class T>
double team_product_error(const std::vector<T>& x, const Forward<T>& f, const std::vector<T>& v,
                          int n, const OpSpec& spec, bool transpose, index_t pieces, int members,
                          bool& nan_same) {
  const std::vector<T> ref = product(x, f, v, 1, n, spec, transpose);
  std::vector<T> result(n, sentinel<T>());
  std::vector<double> work(n), lead(2 * pieces), trail(2 * pieces);
  std::vector<index_t> lead_end(2 * pieces), trail_end(2 * pieces);
  const softrank::ProductPieces scratch{lead.data(), trail.data(), lead_end.data(),
                                        trail_end.data()};
  run_team(members, [&](ThreadTeam member) {
    softrank::soft_product_team(x.data(), f.out.data(), f.perm.data(), f.block.data(), v.data(), n,
                                spec, transpose, result.data(), work.data(), pieces, scratch,
                                softrank::TeamRanges<ThreadTeam>{member});
  });
  double row_scale = 1.0, worst = 0.0;
  for (int i = 0; i < n; ++i)
    row_scale = std::max(row_scale, std::fabs(static_cast<double>(ref[i])));
  nan_same = true;
  for (int i = 0; i < n; ++i) {
    const double a = static_cast<double>(result[i]), b = static_cast<double>(ref[i]);
    nan_same = nan_same && std::isnan(a) == std::isnan(b) && !is_sentinel(result[i]);
    if (!std::isnan(b)) worst = std::max(worst, std::fabs(a - b) / row_scale);
  }
  return worst;
}

// soft_product_team by a team of std::threads against the CPU engine's
// products (soft_product_batch): pieces of one position to thousands, rows of
// one block, of many, and non-finite ones. Only a block that crosses pieces
// sums in another order; the tolerance is relative to the row's largest
// input and product terms, as above.
template <class T>
void check_team_products(int members) {
  Rng rng(151 + sizeof(T) + members);
  const double tol = sizeof(T) == 8 ? 1e-12 : 2e-6;
  for (index_t min_piece : {1, 3, 64, 1000}) {
    for (int n : {1, 2, 7, 130, 999, 4099, 20011}) {
      for (int kind = 0; kind < 7; ++kind) {
        std::vector<T> x = team_row<T>(rng, n, kind < 4 ? kind : 0);
        if (kind == 4) std::fill(x.begin(), x.end(), T(1.5));  // one block
        if (kind == 5) std::sort(x.begin(), x.end());          // presorted
        if (kind == 6) x[n / 2] = std::numeric_limits<T>::quiet_NaN();
        std::vector<T> v(n);
        for (T& e : v) e = static_cast<T>(rng.normal());
        for (double eps : {0.0, 0.3, 1.0, 1e3, 1e-310}) {
          for (const OpSpec& spec : all_specs(eps)) {
            const Forward<T> f = forward(x, 1, n, spec);
            for (bool transpose : {false, true}) {
              const index_t pieces = softrank::product_piece_count(n, members, min_piece, 1 << 20);
              bool nan_same = true;
              const double worst =
                  team_product_error(x, f, v, n, spec, transpose, pieces, members, nan_same);
              CHECK(nan_same && worst <= tol)
                  << describe(spec) << "n" << n << "kind" << kind << "min piece" << min_piece
                  << "transpose" << transpose << "members" << members
                  << (sizeof(T) == 4 ? "f32" : "f64") << "error" << worst;
            }
          }
        }
      }
    }
  }
}

// The cuts the CUDA core plans (team_pav_chunking, product_piece_count with
// its bounds) for a block of 256 threads and for a cooperative grid of 132
// blocks of 256, run by a few std::threads: the forward against the CPU
// engine (same blocks, outputs to the block sums' rounding) and both
// products.
template <class T>
void check_gpu_cuts(int members) {
  Rng rng(173 + sizeof(T) + members);
  const double tol = sizeof(T) == 8 ? 1e-12 : 2e-6;
  for (int n : {512, 1000, 70001, (1 << 20) + 3}) {
    const bool huge = n > (1 << 20);
    for (std::int64_t planned : {std::int64_t{256}, std::int64_t{132 * 256}}) {
      const softrank::PavChunking chunking = softrank::team_pav_chunking(n, planned);
      const index_t pieces = softrank::product_piece_count(n, planned, softrank::kMinTeamChunk,
                                                           softrank::kMaxTeamJoin);
      CHECK(chunking.count(n) > 1 && chunking.count(n) <= softrank::kMaxTeamJoin &&
            chunking.size >= softrank::kMinTeamChunk && pieces <= softrank::kMaxTeamJoin)
          << "n" << n << "planned" << planned;
      for (int kind : {0, 1, 4}) {
        if (huge && kind != 0) continue;
        std::vector<T> x = team_row<T>(rng, n, kind == 4 ? 0 : kind);
        if (kind == 4) std::fill(x.begin(), x.end(), T(1.5));
        std::vector<T> v(n);
        for (T& e : v) e = static_cast<T>(rng.normal());
        for (double eps : {0.0, 1.0, 1e-3}) {
          if (huge && eps != 1.0) continue;
          for (const OpSpec& spec : all_specs(eps)) {
            if (huge && spec.descending) continue;
            const Forward<T> ref = forward(x, 1, n, spec);
            bool blocks_same = true;
            const double worst =
                team_forward_error(x, n, spec, ref, members, chunking, blocks_same);
            CHECK(worst <= tol && blocks_same) << describe(spec) << "n" << n << "kind" << kind
                                               << "planned" << planned << "error" << worst;
            for (bool transpose : {false, true}) {
              bool nan_same = true;
              const double err =
                  team_product_error(x, ref, v, n, spec, transpose, pieces, members, nan_same);
              CHECK(nan_same && err <= tol) << describe(spec) << "n" << n << "kind" << kind
                                            << "planned" << planned << "transpose" << transpose
                                            << "error" << err;
            }
          }
        }
      }
    }
  }
}

// The products as the CUDA core runs them, reading perm through
// ClampedPositions: with a forward pass's own state the same bits as through
// the raw pointer (soft_product_row, and soft_product_team by a team of
// std::threads); with a forged perm (entries -1, n, INT_MAX, INT_MIN, beyond
// the row) every read and write stays inside the row: each buffer sits
// between guard entries that must be left as they were, and no access
// faults (rows of n items, 2^18 + 5 included, put INT_MAX far past any
// mapping).
template <class T>
void check_clamped_positions(int members) {
  Rng rng(211 + sizeof(T) + members);
  constexpr int kGuard = 64;
  for (int n : {1, 2, 9, 1000, 20011, (1 << 18) + 5}) {
    const bool huge = n > (1 << 18);
    std::vector<T> x = team_row<T>(rng, n, 1);  // (kind 1: ties)
    // Each buffer inside guards: [kGuard sentinels | row | kGuard sentinels].
    auto guarded = [&](const std::vector<T>& row) {
      std::vector<T> g(n + 2 * kGuard, sentinel<T>());
      for (int i = 0; i < n; ++i) g[kGuard + i] = row[i];
      return g;
    };
    std::vector<T> v(n);
    for (T& e : v) e = static_cast<T>(rng.normal());
    for (const OpSpec& spec : all_specs(0.7)) {
      if (huge && spec.descending) continue;
      const Forward<T> f = forward(x, 1, n, spec);
      for (bool transpose : {false, true}) {
        const index_t pieces =
            softrank::product_piece_count(n, members, softrank::kMinTeamChunk, 1 << 20);
        // 1. A valid state: the same bits through either reader.
        {
          std::vector<T> raw(n), clamped(n);
          std::vector<double> work(n);
          softrank::soft_product_row(x.data(), f.out.data(), f.perm.data(), f.block.data(),
                                     v.data(), n, spec, transpose, raw.data(), work.data());
          softrank::soft_product_row(x.data(), f.out.data(),
                                     softrank::ClampedPositions{f.perm.data(), n},
                                     f.block.data(), v.data(), n, spec, transpose,
                                     clamped.data(), work.data());
          bool same = true;
          for (int i = 0; i < n; ++i) same = same && check::same_bits(raw[i], clamped[i]);
          CHECK(same) << describe(spec) << "n" << n << "transpose" << transpose << "row";
        }
        // 2. Forged perms, by one thread (soft_product_row) and by a team.
        const std::vector<index_t> forged_values = {-1, static_cast<index_t>(n), INT_MAX,
                                                    INT_MIN, static_cast<index_t>(n) + 100000};
        for (int forgery = 0; forgery < 3; ++forgery) {
          std::vector<index_t> perm = f.perm;
          for (int i = 0; i < n; ++i) {
            const bool forge = forgery == 0 ? true : (forgery == 1 ? i % 3 == 0 : i == n - 1);
            if (forge) perm[i] = forged_values[(i + forgery) % forged_values.size()];
          }
          for (bool team : {false, true}) {
            if (team && n < 2) continue;
            std::vector<T> gx = guarded(x), gout = guarded(f.out), gv = guarded(v);
            std::vector<T> gresult(n + 2 * kGuard, sentinel<T>());
            std::vector<double> gwork(n + 2 * kGuard, 7.25);
            std::vector<double> lead(2 * pieces), trail(2 * pieces);
            std::vector<index_t> lead_end(2 * pieces), trail_end(2 * pieces);
            const softrank::ClampedPositions positions{perm.data(), n};
            if (!team) {
              softrank::soft_product_row(gx.data() + kGuard, gout.data() + kGuard, positions,
                                         f.block.data(), gv.data() + kGuard, n, spec, transpose,
                                         gresult.data() + kGuard, gwork.data() + kGuard);
            } else {
              const softrank::ProductPieces scratch{lead.data(), trail.data(), lead_end.data(),
                                                    trail_end.data()};
              run_team(members, [&](ThreadTeam member) {
                softrank::soft_product_team(
                    gx.data() + kGuard, gout.data() + kGuard, positions, f.block.data(),
                    gv.data() + kGuard, n, spec, transpose, gresult.data() + kGuard,
                    gwork.data() + kGuard, pieces, scratch,
                    softrank::TeamRanges<ThreadTeam>{member});
              });
            }
            bool guards_kept = true;
            for (int g = 0; g < kGuard; ++g)
              for (std::size_t at : {static_cast<std::size_t>(g),
                                     static_cast<std::size_t>(n + kGuard + g)})
                guards_kept = guards_kept && is_sentinel(gresult[at]) && is_sentinel(gx[at]) &&
                              is_sentinel(gout[at]) && is_sentinel(gv[at]) &&
                              gwork[at] == 7.25;
            CHECK(guards_kept) << describe(spec) << "n" << n << "transpose" << transpose
                               << "forgery" << forgery << "team" << team;
          }
        }
      }
    }
  }
}

}  // namespace

TEST(block_schedule, team_forward_float32) { check_team_forward<float>(5); }
TEST(block_schedule, team_forward_float64) { check_team_forward<double>(3); }
TEST(block_schedule, fine_chunks_float32) { check_fine_chunks<float>(4); }
TEST(block_schedule, fine_chunks_float64) { check_fine_chunks<double>(3); }
TEST(block_schedule, team_products_float32) { check_team_products<float>(4); }
TEST(block_schedule, team_products_float64) { check_team_products<double>(3); }
TEST(block_schedule, gpu_cuts_float32) { check_gpu_cuts<float>(4); }
TEST(block_schedule, gpu_cuts_float64) { check_gpu_cuts<double>(3); }
TEST(block_schedule, clamped_positions_float32) { check_clamped_positions<float>(3); }
TEST(block_schedule, clamped_positions_float64) { check_clamped_positions<double>(2); }
