// The CPU kernels' thread pool: see parallel.h for why and the contract.
#include "parallel.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GFL_CPU_RELAX() _mm_pause()
#else
#define GFL_CPU_RELAX() std::this_thread::yield()
#endif

namespace gfl::cpu {
namespace {

// How long a helper keeps polling for the next job before it sleeps: back-to-back calls (a
// forward, then its backward) find it awake, an idle pool costs no CPU.  Short, because a
// polling helper takes a core from whatever else runs on a contended machine.
constexpr auto kSpin = std::chrono::microseconds(50);
// Chunks per thread: enough that a late helper still finds work, few enough that claiming
// (one atomic add) stays negligible next to a chunk.
constexpr int64_t kChunksPerThread = 4;

thread_local bool t_in_pool_work = false;

// One call's work, on the caller's stack.  Helpers join it only through Pool::current_, under
// Pool::mutex_, and the caller unpublishes it before waiting for `active` to drop to zero, so
// no helper touches it after the caller returns.
struct Job {
  const std::function<void(int64_t, int64_t)>* f;
  int64_t end;
  int64_t chunk;
  int max_helpers;
  std::atomic<int64_t> next;
  std::atomic<int> active{0};
  std::exception_ptr error;
  std::mutex error_mutex;

  void work() {
    const bool outer = t_in_pool_work;
    t_in_pool_work = true;
    for (;;) {
      const int64_t b = next.fetch_add(chunk, std::memory_order_relaxed);
      if (b >= end) break;
      try {
        (*f)(b, std::min(b + chunk, end));
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_mutex);
        if (!error) error = std::current_exception();
        next.store(end, std::memory_order_relaxed);  // stop handing out chunks
      }
    }
    t_in_pool_work = outer;
  }
};

class Pool {
 public:
  void run(Job& job) {
    start_helpers(job.max_helpers);
    {
      std::lock_guard<std::mutex> guard(mutex_);
      current_ = &job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job.work();
    {
      std::lock_guard<std::mutex> guard(mutex_);
      current_ = nullptr;  // from here on no helper can join
    }
    while (job.active.load(std::memory_order_acquire) != 0) GFL_CPU_RELAX();
    if (job.error) std::rethrow_exception(job.error);
  }

  std::mutex& busy() { return busy_; }

 private:
  void start_helpers(int wanted) {
    std::lock_guard<std::mutex> guard(mutex_);
    while (static_cast<int>(threads_.size()) < wanted) {
      const int index = static_cast<int>(threads_.size());
      threads_.emplace_back([this, index] { helper_loop(index); });
      threads_.back().detach();  // the pool lives until the process ends
    }
  }

  void helper_loop(int index) {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      // poll briefly, then sleep until the next job is published
      const auto deadline = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < deadline)
        GFL_CPU_RELAX();
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        seen = generation_.load(std::memory_order_acquire);
        job = current_;
        if (job != nullptr && index < job->max_helpers) {
          job->active.fetch_add(1, std::memory_order_acq_rel);
        } else {
          job = nullptr;
        }
      }
      if (job != nullptr) {
        job->work();
        job->active.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex busy_;  // one caller at a time; others run serially
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  Job* current_ = nullptr;
  std::vector<std::thread> threads_;
};

std::atomic<bool> g_forked{false};
Pool* g_pool = nullptr;
std::once_flag g_once;

// A forked child (a DataLoader worker) has the parent's pool object but none of its threads,
// and its mutexes may be held: it starts a new pool on first use (the old one is leaked).
Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, [] { g_forked.store(true); });
  });
  if (g_forked.exchange(false)) g_pool = new Pool();
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& f) {
  if (begin >= end) return;
  const int64_t n = end - begin;
  const int threads = at::get_num_threads();
  grain = std::max<int64_t>(grain, 1);
  if (n <= grain || threads <= 1 || t_in_pool_work || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  Pool& p = pool();
  std::unique_lock<std::mutex> busy(p.busy(), std::try_to_lock);
  if (!busy.owns_lock()) {  // another Python thread is using the pool right now
    f(begin, end);
    return;
  }
  const int64_t max_chunks = std::max<int64_t>(1, n / grain);
  const int64_t chunks = std::min<int64_t>(max_chunks, int64_t{threads} * kChunksPerThread);
  Job job;
  job.f = &f;
  job.end = end;
  job.chunk = (n + chunks - 1) / chunks;
  job.max_helpers = static_cast<int>(std::min<int64_t>(threads - 1, chunks - 1));
  job.next.store(begin, std::memory_order_relaxed);
  p.run(job);
}

}  // namespace gfl::cpu
