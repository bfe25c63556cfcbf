// A tiny test harness for the softrank core tests: no dependencies.
//
//   TEST(group, name) { CHECK(cond) << "context"; CHECK_NEAR(a, b, tol); }
//
// Checks are non-fatal (a failing test keeps running and reports every
// failure with its file, line and context). main() runs every test, or the
// groups named on the command line, and exits non-zero on any failure.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace check {

struct TestCase {
  std::string group, name;
  std::function<void()> fn;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct State {
  long long checks = 0, failures = 0, current_failures = 0;
  std::string current;
};
inline State& state() {
  static State s;
  return s;
}

struct Registrar {
  Registrar(const char* group, const char* name, std::function<void()> fn) {
    registry().push_back({group, name, std::move(fn)});
  }
};

// Collects the streamed context of a failing check and prints it on destruction.
class Failure {
 public:
  Failure(const char* file, int line, const std::string& what) {
    ++state().failures;
    ++state().current_failures;
    os_ << file << ":" << line << ": [" << state().current << "] " << what;
  }
  ~Failure() {
    if (state().current_failures <= 20) std::fprintf(stderr, "FAIL %s\n", os_.str().c_str());
    if (state().current_failures == 20)
      std::fprintf(stderr, "  (further failures of this test not printed)\n");
  }
  template <class V>
  Failure& operator<<(const V& v) {
    os_ << " " << v;
    return *this;
  }

 private:
  std::ostringstream os_;
};

// A sink for passing checks, so that `CHECK(c) << ctx` compiles either way.
struct Pass {
  template <class V>
  Pass& operator<<(const V&) {
    return *this;
  }
};

inline bool near(double a, double b, double tol) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (a == b) return true;  // also equal infinities
  return std::fabs(a - b) <= tol;
}

struct Near {
  double a, b, t;
  bool done = false;
  Near(double a_, double b_, double t_) : a(a_), b(b_), t(t_) {}
  bool ok() const {
    ++state().checks;
    return near(a, b, t);
  }
};

inline std::string fmt(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace check

#define CHECK_CAT2(a, b) a##b
#define CHECK_CAT(a, b) CHECK_CAT2(a, b)

#define TEST(group, name)                                                               \
  static void CHECK_CAT(test_##group##_, name)();                                       \
  static ::check::Registrar CHECK_CAT(registrar_##group##_, name)(#group, #name,        \
                                                                  &CHECK_CAT(test_##group##_, name)); \
  static void CHECK_CAT(test_##group##_, name)()

// Each CHECK is a one-shot for loop whose body reports the failure: no
// if/else, so a CHECK inside an unbraced if cannot capture that if's else.
#define CHECK(cond)                                                                  \
  for (bool check_done_ = false; !check_done_ && (++::check::state().checks, !(cond)); \
       check_done_ = true)                                                           \
  ::check::Failure(__FILE__, __LINE__, "CHECK(" #cond ")")

#define CHECK_NEAR(A_, B_, TOL_)                                                           \
  for (::check::Near check_n_((A_), (B_), (TOL_)); !check_n_.done && !check_n_.ok();       \
       check_n_.done = true)                                                               \
  ::check::Failure(__FILE__, __LINE__,                                                     \
                   std::string("CHECK_NEAR(" #A_ ", " #B_ ") ") + ::check::fmt(check_n_.a) + \
                       " vs " + ::check::fmt(check_n_.b) + " tol " + ::check::fmt(check_n_.t))

// Bitwise equality of two doubles/floats (NaN == NaN of the same payload).
#define CHECK_SAME(A_, B_) CHECK(::check::same_bits((A_), (B_))) << ::check::fmt(A_) << "vs" << ::check::fmt(B_)

namespace check {
template <class T>
inline bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}
}  // namespace check
