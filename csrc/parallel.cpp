#include "softrank/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "softrank/fp_env.h"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define SOFTRANK_HAVE_FORK 1
#endif

namespace softrank {
namespace {

// One parallel_for call. Helpers hold it by shared_ptr, so one that wakes
// after the call has returned finds no task left and touches nothing else.
struct Job {
  const std::function<void(std::int64_t)>* task;
  std::int64_t num_tasks;
  int helpers;  // how many pool threads may join
  std::atomic<std::int64_t> next{0};
  std::atomic<std::int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  // Runs tasks until none is left. A task index is only ever taken while
  // tasks remain, so `task` (owned by the caller) is alive whenever it runs.
  void drain() {
    for (;;) {
      const std::int64_t t = next.fetch_add(1);
      if (t >= num_tasks) return;
      (*task)(t);
      if (done.fetch_add(1) + 1 == num_tasks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

class ThreadPool {
 public:
  ThreadPool() {
    const unsigned hw = std::thread::hardware_concurrency();
    limit_ = hw == 0 ? 1 : static_cast<int>(std::min<unsigned>(hw, kMaxThreads));
  }

  void set_limit(int k) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    limit_ = std::min(std::max(1, k), kMaxThreads);
  }
  int limit() const { return limit_; }

  void run(std::int64_t num_tasks, const std::function<void(std::int64_t)>& task) {
    const int threads = static_cast<int>(std::min<std::int64_t>(limit_, num_tasks));
    // Nothing to share: run here without taking the pool, which a task may
    // still use (one row of a batch split into two parallel sorts).
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::defer_lock);
    if (threads <= 1 || !run_lock.try_lock()) {
      // (or busy: another caller holds the pool)
      for (std::int64_t t = 0; t < num_tasks; ++t) task(t);
      return;
    }
    ensure_workers(threads - 1);
    auto job = std::make_shared<Job>();
    job->task = &task;
    job->num_tasks = num_tasks;
    job->helpers = threads - 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = job;
      ++generation_;
    }
    wake_.notify_all();
    job->drain();
    // Wait for the tasks still running on helpers, never for a helper that
    // has not woken up yet: on a loaded machine that can take a time slice.
    std::unique_lock<std::mutex> lock(job->mutex);
    job->finished.wait(lock, [&] { return job->done.load() == num_tasks; });
  }

 private:
  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { worker_loop(id); });
      workers_.back().detach();
    }
  }

  void worker_loop(int id) {
    // (a worker inherits the flush flags of the thread that created it: a
    // framework's, fp_env.h)
    use_standard_subnormals();
    std::uint64_t seen = 0;
    for (;;) {
      // Calls often come back to back (the passes of one long row, the
      // forward then the backward): spin briefly before sleeping, since a
      // futex wake-up costs tens of microseconds.
      for (int spin = 0; spin < kSpins && generation_.load() == seen; ++spin)
        std::this_thread::yield();
      std::shared_ptr<Job> job;
      {
        // A worker that a job does not need (after the thread count was
        // lowered) goes back to sleep without spinning, so idle workers cost
        // the callers nothing.
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] {
          if (generation_.load() == seen) return false;
          seen = generation_.load();
          return current_ && id < current_->helpers;
        });
        job = current_;
      }
      job->drain();
    }
  }

  static constexpr int kSpins = 2000;

  std::mutex run_mutex_;  // one parallel job at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> current_;
  std::atomic<std::uint64_t> generation_{0};
  // Atomic: set_num_threads writes it (under run_mutex_) while callers that
  // did not get run_mutex_, and get_num_threads, read it without the lock.
  std::atomic<int> limit_{1};
};

// The pool in use. A forked child inherits the parent's pool object but none
// of its threads, and possibly a mutex that one of them held at the fork, so
// the child starts a pool of its own (keeping the thread count). The
// parent's is leaked in the child: destroying it would join threads that do
// not exist there.
std::atomic<ThreadPool*> current_pool{nullptr};

#ifdef SOFTRANK_HAVE_FORK
void fresh_pool_after_fork() {
  ThreadPool* inherited = current_pool.load();
  if (inherited == nullptr) return;
  auto* fresh = new ThreadPool();
  fresh->set_limit(inherited->limit());
  current_pool.store(fresh);
}
#endif

ThreadPool& pool() {
  // Leaked on purpose, with detached workers: joining threads during
  // interpreter shutdown can deadlock, and the OS reclaims them at exit.
  static ThreadPool* const first = [] {
    auto* created = new ThreadPool();
    current_pool.store(created);
#ifdef SOFTRANK_HAVE_FORK
    pthread_atfork(nullptr, nullptr, fresh_pool_after_fork);
#endif
    return created;
  }();
  (void)first;
  return *current_pool.load();
}

}  // namespace

void parallel_for(std::int64_t num_tasks, const std::function<void(std::int64_t)>& task) {
  pool().run(num_tasks, task);
}

void set_num_threads(int num_threads) { pool().set_limit(num_threads); }
int get_num_threads() { return pool().limit(); }

}  // namespace softrank
