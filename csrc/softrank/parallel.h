// A small persistent thread pool for row-parallel work.
//
// Work is split into tasks that never share output, so the result does not
// depend on how many threads run them. A call made while the pool is busy
// (another Python thread, with the GIL released) runs on its own thread
// instead of waiting, which keeps concurrent callers independent.
#pragma once

#include <cstdint>
#include <functional>

namespace softrank {

// Runs task(t) for t in [0, num_tasks), on up to num_threads() threads, and
// returns when all are done. The calling thread takes part.
void parallel_for(std::int64_t num_tasks, const std::function<void(std::int64_t)>& task);

// The most threads a pool may use: more only multiplies the per-call costs
// (a thread each, and four tasks each for a long row).
constexpr int kMaxThreads = 1024;

// Clamped to [1, kMaxThreads].
void set_num_threads(int num_threads);
int get_num_threads();

}  // namespace softrank
