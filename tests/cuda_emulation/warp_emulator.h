// Host emulation of the few CUDA built-ins the gfl-ops kernels use, so that their device code
// (csrc/cuda/*_kernel.cuh) can be compiled by the host compiler and run on a machine without a
// GPU.  It is a test tool: it checks the kernels' indexing, their warp reductions, their block
// barriers and shared-memory staging, and the arithmetic they do, against the float64 reference,
// in CI (which has no GPU).  It does not model timing, memory coalescing, bank conflicts or the
// GPU's own exp/log rounding.
//
// Each block runs as blockDim.x cooperative fibers (ucontext) on the calling thread; blocks run
// one after another.  A thread runs until it reaches a warp shuffle, a __syncthreads() or returns.
// When every thread of the block has stopped:
//   * a warp whose 32 lanes all wait at a shuffle has it carried out for all of them at once, as
//     on the GPU;
//   * when every thread of the block waits at __syncthreads(), all are released.
// Anything else is a deadlock or undefined behaviour on a real GPU, and is recorded as an error
// instead: a shuffle that not all 32 lanes of the warp reach (a lane returned, waits at a
// barrier, or called a shuffle of another width), or a __syncthreads() that not every thread of
// the block reaches.  Threads are resumed in ascending order in one round and descending order in
// the next, so a kernel that reads shared memory another thread writes without a barrier in
// between reads it before the write in one of the two orders.
//
// Dynamic shared memory: the kernels declare it with GFL_DYNAMIC_SHARED(name) (common.cuh); here
// that names the running block's buffer, sized by the launch and filled with 0xff bytes (NaN as a
// float or double), so a read of a byte the kernel never wrote shows in its results.
#pragma once

#define __launch_bounds__(...)

#include <ucontext.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

// The built-in variables, as globals: the scheduler sets threadIdx before resuming each thread.
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{32, 1, 1};
inline dim3 gridDim{1, 1, 1};

namespace warp_emu {

constexpr int kWarp = 32;
constexpr size_t kStack = 128 * 1024;  // per thread; the kernels keep at most a few KB there

enum class Stop { kRunning, kShuffle, kSync, kDone };

struct Thread {
  ucontext_t context;
  Stop stop = Stop::kRunning;
  uint64_t value = 0;   // what it offers to the shuffle (raw bytes)
  uint64_t result = 0;  // what it receives
  int source = 0;       // the lane it reads
  int width = 0;
};

struct alignas(16) SharedChunk {
  unsigned char bytes[16];
};

struct Block {
  ucontext_t scheduler;
  std::vector<Thread> threads;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::vector<SharedChunk> shared;  // dynamic shared memory, 16-byte aligned
  std::string error;
};

inline Block*& active_block() {
  static Block* block = nullptr;
  return block;
}

inline unsigned char* dynamic_shared() {
  return active_block()->shared.empty() ? nullptr : active_block()->shared[0].bytes;
}

inline void thread_entry() {
  Block* b = active_block();
  (*b->body)();
  b->threads[b->current].stop = Stop::kDone;  // returns to the scheduler through uc_link
}

// Stops the current thread at `stop` and returns once the scheduler resumes it.
inline void suspend(Stop stop) {
  Block* b = active_block();
  Thread& t = b->threads[b->current];
  t.stop = stop;
  swapcontext(&t.context, &b->scheduler);
}

inline const char* stop_name(Stop s) {
  switch (s) {
    case Stop::kShuffle: return "at a shuffle";
    case Stop::kSync: return "at __syncthreads";
    case Stop::kDone: return "returned";
    default: return "running";
  }
}

// Why the block cannot go on: every thread has stopped and no warp shuffle or barrier is complete.
inline std::string deadlock(const Block& b) {
  const int n = static_cast<int>(b.threads.size());
  for (int w = 0; w < n / kWarp; ++w) {
    int counts[4] = {0, 0, 0, 0};
    for (int l = 0; l < kWarp; ++l) ++counts[static_cast<int>(b.threads[w * kWarp + l].stop)];
    const int shuffling = counts[static_cast<int>(Stop::kShuffle)];
    if (shuffling > 0 && shuffling < kWarp)
      return "divergent shuffle: warp " + std::to_string(w) + " has " + std::to_string(shuffling) +
             " lanes at a shuffle, " + std::to_string(counts[static_cast<int>(Stop::kSync)]) +
             " at __syncthreads, " + std::to_string(counts[static_cast<int>(Stop::kDone)]) +
             " returned";
  }
  int syncing = 0, done = 0;
  for (const Thread& t : b.threads) {
    syncing += t.stop == Stop::kSync;
    done += t.stop == Stop::kDone;
  }
  return "__syncthreads reached by " + std::to_string(syncing) + " of " + std::to_string(n) +
         " threads of the block (" + std::to_string(done) + " returned)";
}

// Runs `body` (one thread's code) on the threads of the current block.  Returns false (and sets
// `error`) on a divergent shuffle or barrier.
inline bool run_block(const std::function<void()>& body, int threads, size_t shared_bytes,
                      std::vector<std::unique_ptr<char[]>>& stacks, std::string& error) {
  Block b;
  b.body = &body;
  b.threads.resize(threads);
  b.shared.resize((shared_bytes + sizeof(SharedChunk) - 1) / sizeof(SharedChunk));
  std::memset(b.shared.data(), 0xff, b.shared.size() * sizeof(SharedChunk));
  active_block() = &b;
  while (static_cast<int>(stacks.size()) < threads) stacks.emplace_back(new char[kStack]);
  for (int i = 0; i < threads; ++i) {
    Thread& t = b.threads[i];
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = stacks[i].get();
    t.context.uc_stack.ss_size = kStack;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, thread_entry, 0);
  }
  for (int round = 0; error.empty() && b.error.empty(); ++round) {
    for (int k = 0; k < threads; ++k) {
      const int i = round % 2 == 0 ? k : threads - 1 - k;
      Thread& t = b.threads[i];
      if (t.stop != Stop::kRunning) continue;
      b.current = i;
      threadIdx = uint3{static_cast<unsigned>(i), 0, 0};
      swapcontext(&b.scheduler, &t.context);
    }
    int done = 0, syncing = 0;
    bool progress = false;
    for (int w = 0; w < threads / kWarp; ++w) {
      Thread* lanes = &b.threads[w * kWarp];
      bool all_shuffle = true, same_width = true;
      for (int l = 0; l < kWarp; ++l) {
        all_shuffle = all_shuffle && lanes[l].stop == Stop::kShuffle;
        same_width = same_width && lanes[l].width == lanes[0].width;
      }
      if (!all_shuffle) continue;
      if (!same_width) {
        error = "lanes of one warp called shuffles of different widths";
        break;
      }
      for (int l = 0; l < kWarp; ++l) lanes[l].result = lanes[lanes[l].source].value;
      for (int l = 0; l < kWarp; ++l) lanes[l].stop = Stop::kRunning;
      progress = true;
    }
    if (!error.empty() || progress) continue;
    for (const Thread& t : b.threads) {
      done += t.stop == Stop::kDone;
      syncing += t.stop == Stop::kSync;
    }
    if (done == threads) break;
    if (syncing == threads) {
      for (Thread& t : b.threads) t.stop = Stop::kRunning;
      continue;
    }
    error = deadlock(b);
  }
  active_block() = nullptr;
  if (error.empty()) error = b.error;
  return error.empty();
}

// Emulated kernel launch: `body` is the kernel call with its arguments bound; `shared_bytes` of
// dynamic shared memory per block.
inline bool launch(unsigned grid, unsigned block, size_t shared_bytes,
                   const std::function<void()>& body, std::string& error) {
  if (block == 0 || block % kWarp != 0) {
    error = "block size must be a positive multiple of 32";
    return false;
  }
  gridDim = dim3(grid, 1, 1);
  blockDim = dim3(block, 1, 1);
  std::vector<std::unique_ptr<char[]>> stacks;  // reused by every block of the launch
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = uint3{b, 0, 0};
    if (!run_block(body, static_cast<int>(block), shared_bytes, stacks, error)) return false;
  }
  return true;
}

inline bool launch(unsigned grid, unsigned block, const std::function<void()>& body,
                   std::string& error) {
  return launch(grid, block, 0, body, error);
}

}  // namespace warp_emu

// The block's dynamic shared memory (common.cuh declares it with `extern __shared__` on a GPU).
#define GFL_DYNAMIC_SHARED(name) unsigned char* const name = warp_emu::dynamic_shared()

namespace warp_emu {
// A vector access (LDG/STG/LDS/STS.64/.128) faults on a GPU unless aligned to its size; the host
// does not care, so the kernels report each one's address here and a misaligned one becomes the
// block's error.
inline void check_aligned(const void* p, size_t bytes) {
  Block* b = active_block();
  if (b != nullptr && b->error.empty() && reinterpret_cast<uintptr_t>(p) % bytes != 0)
    b->error = "misaligned " + std::to_string(bytes) + "-byte access";
}
}  // namespace warp_emu
#define GFL_CUDA_EMU_CHECK_ALIGNED_TO(ptr, bytes) warp_emu::check_aligned(ptr, bytes)

inline void __syncthreads() { warp_emu::suspend(warp_emu::Stop::kSync); }

// __shfl_xor_sync: the value of lane (lane ^ lane_mask) within the lane's segment of `width`
// lanes (the caller's own value when that lane lies outside it).  Only a full mask is modelled.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warp_emu::kWarp) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
  warp_emu::Block* b = warp_emu::active_block();
  const int i = b->current;
  const int l = i % warp_emu::kWarp;
  warp_emu::Thread& t = b->threads[i];
  if (mask != 0xffffffffu) b->error = "only full-warp shuffle masks are emulated";
  const int segment = l / width * width;
  const int source = l ^ lane_mask;
  t.source = (source >= segment && source < segment + width) ? source : l;
  t.width = width;
  t.value = 0;
  std::memcpy(&t.value, &v, sizeof(T));
  warp_emu::suspend(warp_emu::Stop::kShuffle);
  T out;
  std::memcpy(&out, &b->threads[i].result, sizeof(T));
  return out;
}
