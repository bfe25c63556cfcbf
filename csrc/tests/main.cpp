// Runs the registered tests: all of them, or the groups named as arguments.
//   softrank_core_tests [group ...]     groups: pav special backward sort_paths
//                                        threads isotonic regressions
#include <chrono>
#include <cstdio>
#include <set>
#include <string>

#include "check.h"

int main(int argc, char** argv) {
  std::set<std::string> groups(argv + 1, argv + argc);
  long long cases = 0;
  const auto start = std::chrono::steady_clock::now();
  for (const auto& t : check::registry()) {
    if (!groups.empty() && !groups.count(t.group)) continue;
    auto& st = check::state();
    st.current = t.group + "." + t.name;
    st.current_failures = 0;
    const long long checks_before = st.checks;
    const auto t0 = std::chrono::steady_clock::now();
    t.fn();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s %-60s %9lld checks %7.2fs\n", st.current_failures ? "FAIL" : "ok  ",
                st.current.c_str(), st.checks - checks_before, secs);
    std::fflush(stdout);
    ++cases;
  }
  const auto& st = check::state();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%lld test cases, %lld checks, %lld failures, %.1fs\n", cases, st.checks, st.failures,
              secs);
  if (cases == 0) {
    std::fprintf(stderr, "no test matched the groups given\n");
    return 2;
  }
  return st.failures ? 1 : 0;
}
