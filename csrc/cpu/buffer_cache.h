// A small cache of the CPU operators' own large buffers (gradients, per-row outputs).
//
// Why: in a training step every call allocates a fresh pred-sized gradient.  glibc serves such
// blocks (over its mmap threshold, or after it trimmed the heap) from pages the kernel has never
// mapped, so the kernel's first write to each 4 KiB page takes a page fault that zero-fills it:
// 3125 faults and 2.5-3 ms for the 12.8 MB gradient of QFL at 40000 x 80, as much as the kernel
// itself (measured, benchmarks/README.md "Fresh inputs").  Keeping the block when the tensor
// that owned it dies and handing it to the next call of about the same size removes that cost:
// the pages stay mapped and warm.  CUDA needs none of this (its caching allocator does the same).
//
// Policy: blocks of at least kMinCachedBytes only (smaller ones come from the heap without
// faults); a request takes the smallest cached block of at least its size and at most 1/8
// larger; freed blocks are kept while the cached total stays within the limit (least recently
// freed evicted first).  Limit: GFL_OPS_CPU_CACHE_MB (default 512; 0 disables), or
// gfl_ops.set_cpu_buffer_cache_limit().  Memory is 64-byte aligned, from c10::alloc_cpu.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace gfl::cpu {

constexpr int64_t kMinCachedBytes = 256 * 1024;

// at::empty(sizes, options) for a CPU tensor, its storage from the cache above.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// {hits, misses, cached_bytes, cached_blocks, limit_bytes}
std::vector<int64_t> buffer_cache_stats();
// Sets the limit (bytes, >= 0), evicting what no longer fits; returns the previous limit.
int64_t set_buffer_cache_limit(int64_t bytes);
// Frees every cached block (blocks still owned by tensors return to the cache when freed).
void empty_buffer_cache();

}  // namespace gfl::cpu
