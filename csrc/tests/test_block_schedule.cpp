// The CUDA core's schedule for long rows (team_ranges.h: a block of GPU
// threads running soft_forward_sorted together) run here by a team of
// std::threads with a barrier: every output and block start must equal the
// CPU engine's bit for bit. A missing or misplaced barrier shows as wrong or
// unrepeatable results (and, under csrc/tests/run_tsan.sh, as a data race).
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

template <class T>
void check_team_forward(int members) {
  Rng rng(97 + sizeof(T) + members);
  for (int n : {(1 << 18) + 3, 300007}) {
    const index_t chunks = softrank::pav_chunk_count(n);
    CHECK(chunks > 1) << "n" << n;
    for (int kind = 0; kind < 4; ++kind) {
      const std::vector<T> x = team_row<T>(rng, n, kind);
      // (1e-310: a subnormal eps, which the rank rescales for too)
      for (double eps : {0.0, 0.3, 1e3, 1e-310}) {
        for (const OpSpec& spec : all_specs(eps)) {
          const Forward<T> ref = forward(x, 1, n, spec);
          // The sorted x' as the CUDA core decodes it from the sort keys.
          const bool negate = softrank::negates_input(spec);
          std::vector<double> xs(n), work(n + 1), work2(n + 1), ref_v(n), stat(n), stat2(n),
              tail(n);
          std::vector<index_t> start(n), first(chunks), last(chunks), end(chunks);
          for (int i = 0; i < n; ++i) {
            const T v = x[ref.perm[i]];
            xs[i] = static_cast<double>((negate ? -v : v) + T(0));
          }
          const TeamScratch w{xs.data(),
                              work.data(),
                              work2.data(),
                              softrank::BlockStack{start.data(), ref_v.data(), stat.data(),
                                                   stat2.data(), tail.data()},
                              first.data(),
                              last.data(),
                              end.data(),
                              nullptr};
          std::vector<T> out(n, sentinel<T>());
          std::vector<index_t> block(n, -7);
          Barrier barrier(members);
          std::vector<std::thread> team;
          for (int m = 0; m < members; ++m)
            team.emplace_back([&, m] {
              softrank::soft_forward_sorted(
                  n, spec, w, out.data(), ref.perm.data(), block.data(),
                  softrank::TeamRanges<ThreadTeam>{ThreadTeam{m, members, &barrier}});
            });
          for (auto& t : team) t.join();
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

}  // namespace

TEST(block_schedule, team_forward_float32) { check_team_forward<float>(5); }
TEST(block_schedule, team_forward_float64) { check_team_forward<double>(3); }
