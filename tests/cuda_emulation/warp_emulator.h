// Host emulation of the few CUDA built-ins the gfl-ops kernels use, so that their device code
// (csrc/cuda/*_kernel.cuh) can be compiled by the host compiler and run on a machine without a
// GPU.  It is a test tool: it checks the kernels' indexing, their warp reductions and the
// arithmetic they do, against the float64 reference, in CI (which has no GPU).  It does not
// model timing, memory coalescing or the GPU's own exp/log rounding.
//
// Each warp runs as 32 cooperative fibers (ucontext) on the calling thread.  A lane runs until it
// reaches a warp shuffle or returns; when every lane has stopped, the shuffle is carried out for
// all of them at once, as on the GPU.  A shuffle that not all 32 lanes reach (one lane returned,
// or lanes called shuffles of different widths) is the divergence that hangs or corrupts a real
// warp: the emulator records it as an error instead.  Blocks and warps run one after another.
#pragma once

#define __launch_bounds__(...)

#include <ucontext.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

// The built-in variables, as globals: the scheduler sets threadIdx before resuming each lane.
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{32, 1, 1};
inline dim3 gridDim{1, 1, 1};

namespace warp_emu {

constexpr int kWarp = 32;

struct Lane {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
  bool waiting = false;  // stopped at a shuffle
  uint64_t value = 0;    // what it offers to the shuffle (raw bytes)
  uint64_t result = 0;   // what it receives
  int source = 0;        // the lane it reads
  int width = 0;
};

struct Warp {
  ucontext_t scheduler;
  Lane lanes[kWarp];
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::string error;
};

inline Warp*& active_warp() {
  static Warp* warp = nullptr;
  return warp;
}

inline void lane_entry() {
  Warp* w = active_warp();
  (*w->body)();
  w->lanes[w->current].done = true;  // returns to the scheduler through uc_link
}

// Runs `body` (one thread's code) on the 32 lanes of warp `warp_index` of the current block.
// Returns false (and sets `error`) on a divergent shuffle.
inline bool run_warp(const std::function<void()>& body, int warp_index, std::string& error) {
  constexpr size_t kStack = 256 * 1024;
  Warp w;
  w.body = &body;
  active_warp() = &w;
  for (int l = 0; l < kWarp; ++l) {
    Lane& lane = w.lanes[l];
    lane.stack.resize(kStack);
    getcontext(&lane.context);
    lane.context.uc_stack.ss_sp = lane.stack.data();
    lane.context.uc_stack.ss_size = kStack;
    lane.context.uc_link = &w.scheduler;
    makecontext(&lane.context, lane_entry, 0);
  }
  for (;;) {
    int done = 0, waiting = 0;
    for (int l = 0; l < kWarp; ++l) {
      Lane& lane = w.lanes[l];
      if (!lane.done) {
        w.current = l;
        threadIdx = uint3{static_cast<unsigned>(warp_index * kWarp + l), 0, 0};
        swapcontext(&w.scheduler, &lane.context);
      }
      done += lane.done;
      waiting += lane.waiting;
    }
    if (done == kWarp) break;
    if (waiting != kWarp) {
      error = "divergent shuffle: " + std::to_string(waiting) + " lanes at a shuffle, " +
              std::to_string(done) + " returned";
      break;
    }
    bool same_width = true;
    for (const Lane& lane : w.lanes) same_width = same_width && lane.width == w.lanes[0].width;
    if (!same_width) {
      error = "lanes of one warp called shuffles of different widths";
      break;
    }
    for (int l = 0; l < kWarp; ++l) w.lanes[l].result = w.lanes[w.lanes[l].source].value;
    for (int l = 0; l < kWarp; ++l) w.lanes[l].waiting = false;
  }
  active_warp() = nullptr;
  if (error.empty()) error = w.error;
  return error.empty();
}

// Emulated kernel launch: `body` is the kernel call with its arguments bound.
inline bool launch(unsigned grid, unsigned block, const std::function<void()>& body,
                   std::string& error) {
  if (block % kWarp != 0) {
    error = "block size must be a multiple of 32";
    return false;
  }
  gridDim = dim3(grid, 1, 1);
  blockDim = dim3(block, 1, 1);
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = uint3{b, 0, 0};
    for (unsigned w = 0; w < block / kWarp; ++w)
      if (!run_warp(body, static_cast<int>(w), error)) return false;
  }
  return true;
}

}  // namespace warp_emu

// __shfl_xor_sync: the value of lane (lane ^ lane_mask) within the lane's segment of `width`
// lanes (the caller's own value when that lane lies outside it).  Only a full mask is modelled.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warp_emu::kWarp) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
  warp_emu::Warp* w = warp_emu::active_warp();
  const int l = w->current;
  warp_emu::Lane& lane = w->lanes[l];
  if (mask != 0xffffffffu) w->error = "only full-warp shuffle masks are emulated";
  const int segment = l / width * width;
  const int source = l ^ lane_mask;
  lane.source = (source >= segment && source < segment + width) ? source : l;
  lane.width = width;
  lane.value = 0;
  std::memcpy(&lane.value, &v, sizeof(T));
  lane.waiting = true;
  swapcontext(&lane.context, &w->scheduler);
  T out;
  std::memcpy(&out, &w->lanes[l].result, sizeof(T));
  return out;
}
