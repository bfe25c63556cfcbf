// Threading: results bitwise independent of set_num_threads, and concurrent
// callers (while the thread count changes under them) get the sequential
// results.
#include <atomic>
#include <thread>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "helpers.h"

using namespace th;

namespace {

struct Case {
  std::int64_t rows;
  index_t n;
};

// Batches above the parallel threshold (16384 elements), with rows split into
// tasks of several rows, of one row, and of rows shorter than a task.
const Case kCases[] = {{40, 1000}, {3, 70000}, {2000, 20}, {7, 161}, {1, 100000}, {1, 300007}};

struct Outputs {
  std::vector<double> out, vjp, jvp, iso, iso_vjp;
  std::vector<float> out32, vjp32;
  std::vector<index_t> perm, block;
};

Outputs run_all(const std::vector<double>& x, const std::vector<double>& g,
                const std::vector<double>& w, const Case& c, const OpSpec& s) {
  Outputs o;
  const Forward<double> f = forward(x, c.rows, c.n, s);
  o.out = f.out;
  o.perm = f.perm;
  o.block = f.block;
  o.vjp = product(x, f, g, c.rows, c.n, s, true);
  o.jvp = product(x, f, g, c.rows, c.n, s, false);
  const std::vector<float> x32 = cast<float>(x), g32 = cast<float>(g);
  const Forward<float> f32 = forward(x32, c.rows, c.n, s);
  o.out32 = f32.out;
  o.vjp32 = product(x32, f32, g32, c.rows, c.n, s, true);
  const Iso<double> iso = isotonic(x, &w, c.rows, c.n, s.descending);
  o.iso = iso.sol;
  o.iso_vjp = isotonic_vjp(&w, iso, g, c.rows, c.n);
  return o;
}

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <class T>
std::string first_difference(const char* name, const std::vector<T>& a, const std::vector<T>& b) {
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    if (!check::same_bits(a[i], b[i]))
      return std::string(name) + "[" + std::to_string(i) + "] " + check::fmt(a[i]) + " vs " +
             check::fmt(b[i]);
  return a.size() == b.size() ? "" : std::string(name) + ": sizes differ";
}

// "" when bitwise equal, else the first differing output and position.
std::string difference(const Outputs& a, const Outputs& b) {
  for (const std::string& d :
       {first_difference("out", a.out, b.out), first_difference("vjp", a.vjp, b.vjp),
        first_difference("jvp", a.jvp, b.jvp), first_difference("iso", a.iso, b.iso),
        first_difference("iso_vjp", a.iso_vjp, b.iso_vjp),
        first_difference("out32", a.out32, b.out32), first_difference("vjp32", a.vjp32, b.vjp32),
        first_difference("perm", a.perm, b.perm), first_difference("block", a.block, b.block)})
    if (!d.empty()) return d;
  return "";
}

bool same(const Outputs& a, const Outputs& b) { return difference(a, b).empty(); }

struct Input {
  std::vector<double> x, g, w;
};

Input make_input(Rng& rng, const Case& c) {
  Input in;
  const std::size_t size = static_cast<std::size_t>(c.rows) * static_cast<std::size_t>(c.n);
  in.x.resize(size);
  in.g.resize(size);
  in.w.resize(size);
  for (std::size_t i = 0; i < size; ++i) {
    in.x[i] = (i % 7 == 0) ? std::floor(rng.normal()) : rng.normal();  // some ties
    in.g[i] = rng.normal();
    in.w[i] = rng.uniform(0.1, 3.0);
  }
  if (size > 5) in.x[size / 2] = kNaN;  // one NaN row too
  return in;
}

}  // namespace

TEST(threads, bitwise_identical_for_any_thread_count) {
  Rng rng(31);
  const int saved = softrank::get_num_threads();
  for (const Case& c : kCases) {
    const Input in = make_input(rng, c);
    for (double eps : {0.0, 0.5, kInf})
      for (const OpSpec& s : all_specs(eps)) {
        softrank::set_num_threads(1);
        const Outputs one = run_all(in.x, in.g, in.w, c, s);
        for (int k : {2, 3, 8}) {
          softrank::set_num_threads(k);
          CHECK(softrank::get_num_threads() == k);
          const Outputs many = run_all(in.x, in.g, in.w, c, s);
          const std::string diff = difference(one, many);
          CHECK(diff.empty()) << describe(s) << "rows" << c.rows << "n" << c.n << "threads" << k
                              << diff;
        }
      }
  }
  softrank::set_num_threads(saved);
}

#if defined(__x86_64__) || defined(__i386__)
// The caller's flush-to-zero and denormals-are-zero (XLA's and TensorFlow's
// threads set them) change nothing: each call clears them on the calling
// thread and restores them on return, and pool threads created by such a
// thread clear their own (fp_env.h). Subnormal inputs and intermediates:
// jax ranked [3e-310, 1e-310, 2e-310] as three ties.
TEST(threads, flush_to_zero_of_the_caller_changes_nothing) {
  Rng rng(37);
  const int saved = softrank::get_num_threads();
  const Case c{40, 1000};
  Input in = make_input(rng, c);
  for (double& v : in.x) v *= 1e-309;  // subnormal doubles (0 once cast to float)
  const double eps = 1e-309;
  std::vector<Outputs> want;
  for (const OpSpec& s : all_specs(eps)) want.push_back(run_all(in.x, in.g, in.w, c, s));
  std::thread flushing([&] {
    const unsigned flush = 0x8040u;  // MXCSR: FTZ, DAZ
    _mm_setcsr(_mm_getcsr() | flush);
    // More threads than any test before: workers created from this thread.
    softrank::set_num_threads(24);
    std::size_t k = 0;
    for (const OpSpec& s : all_specs(eps)) {
      const std::string diff = difference(want[k++], run_all(in.x, in.g, in.w, c, s));
      CHECK(diff.empty()) << describe(s) << diff;
    }
    CHECK((_mm_getcsr() & flush) == flush) << "the caller's flags are restored";
    const std::vector<double> row = {3e-310, 1e-310, 2e-310};
    const Forward<double> f = forward(row, 1, 3, OpSpec{Op::Rank, Reg::L2, false, 0.0});
    CHECK(f.out[0] == 3.0 && f.out[1] == 1.0 && f.out[2] == 2.0)
        << f.out[0] << f.out[1] << f.out[2];
  });
  flushing.join();
  softrank::set_num_threads(saved);
}
#endif

TEST(threads, concurrent_callers_get_sequential_results) {
  Rng rng(32);
  const int saved = softrank::get_num_threads();
  softrank::set_num_threads(2);
  struct Job {
    Case c;
    Input in;
    OpSpec s;
    Outputs expected;
  };
  std::vector<Job> jobs;
  int k = 0;
  for (const Case& c : {Case{40, 1000}, Case{2000, 20}, Case{5, 161}, Case{2, 30000}})
    for (const OpSpec& s : all_specs(0.7)) {
      if (++k % 2) continue;  // 16 jobs
      Job j{c, make_input(rng, c), s, {}};
      j.expected = run_all(j.in.x, j.in.g, j.in.w, j.c, j.s);
      jobs.push_back(std::move(j));
    }
  std::atomic<bool> stop{false};
  std::atomic<int> mismatches{0};
  std::atomic<long> calls{0};
  std::vector<std::thread> workers;
  for (std::size_t t = 0; t < jobs.size(); ++t)
    workers.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep) {
        const Job& j = jobs[(t + rep) % jobs.size()];
        if (!same(run_all(j.in.x, j.in.g, j.in.w, j.c, j.s), j.expected)) ++mismatches;
        ++calls;
      }
    });
  // Change the thread count while the calls run.
  std::thread toggler([&] {
    int i = 0;
    while (!stop.load()) {
      softrank::set_num_threads(1 + (i++ % 4));
      std::this_thread::yield();
    }
  });
  for (auto& w : workers) w.join();
  stop = true;
  toggler.join();
  CHECK(mismatches.load() == 0) << mismatches.load() << "of" << calls.load() << "calls differ";
  softrank::set_num_threads(saved);
}

TEST(threads, set_num_threads_bounds) {
  const int saved = softrank::get_num_threads();
  CHECK(saved >= 1);
  softrank::set_num_threads(0);  // clamped to 1 (the bindings refuse < 1)
  CHECK(softrank::get_num_threads() == 1);
  softrank::set_num_threads(-5);
  CHECK(softrank::get_num_threads() == 1);
  softrank::set_num_threads(saved);
  CHECK(softrank::get_num_threads() == saved);
}

// The projection onto P(w): one row, or fewer rows than threads, sorts z and
// w at the same time (batched.cpp); the outputs, permutations and blocks are
// those of one thread, bit for bit. Rows with a w of their own, a w shared by
// every row (the later rows reuse the first one's sort), and both value-only
// (perm_w null) and full forwards.
TEST(threads, projection_bitwise_identical_for_any_thread_count) {
  Rng rng(33);
  const int saved = softrank::get_num_threads();
  struct Result {
    std::vector<double> out;
    std::vector<index_t> perm_z, perm_w, block;
  };
  for (const Case& c : {Case{1, 1000}, Case{1, 20000}, Case{1, 70001}, Case{3, 30000}})
    for (bool shared_w : {false, true})
      for (Reg reg : {Reg::L2, Reg::KL}) {
        const std::size_t size = static_cast<std::size_t>(c.rows) * static_cast<std::size_t>(c.n);
        std::vector<double> z(size), w(size);
        for (std::size_t i = 0; i < size; ++i) {
          z[i] = (i % 5 == 0) ? std::floor(rng.normal() * 10.0) : rng.normal() * 10.0;
          const std::size_t col = shared_w ? i % static_cast<std::size_t>(c.n) : i;
          w[i] = shared_w && i >= static_cast<std::size_t>(c.n) ? w[col] : rng.uniform(1.0, 9.0);
        }
        for (double eps : {0.5, 1.0, kInf})
          for (bool value_only : {false, true}) {
            auto run = [&] {
              Result r{std::vector<double>(size), std::vector<index_t>(size),
                       std::vector<index_t>(size), std::vector<index_t>(size)};
              softrank::projection_forward_batch(z.data(), w.data(), c.rows, c.n, eps, reg,
                                                 r.out.data(), r.perm_z.data(),
                                                 value_only ? nullptr : r.perm_w.data(),
                                                 r.block.data());
              return r;
            };
            softrank::set_num_threads(1);
            const Result one = run();
            CHECK(std::all_of(one.out.begin(), one.out.end(), [](double v) { return std::isfinite(v); }));
            for (int k : {2, 3, 8}) {
              softrank::set_num_threads(k);
              const Result many = run();
              CHECK(bitwise_equal(one.out, many.out) && bitwise_equal(one.perm_z, many.perm_z) &&
                    bitwise_equal(one.perm_w, many.perm_w) && bitwise_equal(one.block, many.block))
                  << "rows" << c.rows << "n" << c.n << "shared_w" << shared_w << "kl"
                  << (reg == Reg::KL) << "eps" << eps << "value_only" << value_only << "threads" << k
                  << first_difference("out", one.out, many.out);
            }
          }
      }
  softrank::set_num_threads(saved);
}
