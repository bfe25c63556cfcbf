#include "softrank/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace softrank {
namespace {

class ThreadPool {
 public:
  ThreadPool() {
    const unsigned hw = std::thread::hardware_concurrency();
    limit_ = hw == 0 ? 1 : static_cast<int>(hw);
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void set_limit(int k) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    limit_ = std::max(1, k);
  }
  int limit() const { return limit_; }

  void run(std::int64_t num_tasks, const std::function<void(std::int64_t)>& task) {
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::try_to_lock);
    const int threads = static_cast<int>(std::min<std::int64_t>(limit_, num_tasks));
    if (!run_lock.owns_lock() || threads <= 1) {
      for (std::int64_t t = 0; t < num_tasks; ++t) task(t);
      return;
    }
    ensure_workers(threads - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      num_tasks_ = num_tasks;
      next_.store(0);
      active_helpers_ = threads - 1;
      pending_helpers_ = threads - 1;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_helpers_ == 0; });
    task_ = nullptr;
  }

 private:
  void drain() {
    for (;;) {
      const std::int64_t t = next_.fetch_add(1);
      if (t >= num_tasks_) return;
      (*task_)(t);
    }
  }

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { worker_loop(id); });
    }
  }

  void worker_loop(int id) {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || (generation_ != seen && id < active_helpers_); });
        if (stopping_) return;
        seen = generation_;
      }
      drain();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--pending_helpers_ == 0) done_.notify_one();
      }
    }
  }

  std::mutex run_mutex_;  // one parallel job at a time
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(std::int64_t)>* task_ = nullptr;
  std::int64_t num_tasks_ = 0;
  std::atomic<std::int64_t> next_{0};
  std::uint64_t generation_ = 0;
  int active_helpers_ = 0;
  int pending_helpers_ = 0;
  int limit_ = 1;
  bool stopping_ = false;
};

ThreadPool& pool() {
  // Leaked on purpose: joining threads during interpreter shutdown can
  // deadlock, and the OS reclaims them at exit.
  static ThreadPool* instance = new ThreadPool();
  return *instance;
}

}  // namespace

void parallel_for(std::int64_t num_tasks, const std::function<void(std::int64_t)>& task) {
  pool().run(num_tasks, task);
}

void set_num_threads(int num_threads) { pool().set_limit(num_threads); }
int get_num_threads() { return pool().limit(); }

}  // namespace softrank
