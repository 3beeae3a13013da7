// The CPU operators' buffer cache: see buffer_cache.h for why and the policy.
#include "buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <deque>
#include <mutex>
#include <unordered_map>

#include "../torch_compat.h"

namespace gfl::cpu {
namespace {

constexpr int64_t kDefaultLimitBytes = int64_t{512} << 20;

// A c10::Allocator, so the storages it makes behave as any CPU storage (resize, share, pickle);
// its deleter returns a block to the cache instead of freeing it.
class BufferCache final : public c10::Allocator {
 public:
  static BufferCache& instance() {
    // never destroyed: tensors freed during interpreter shutdown still find it
    static auto* cache = new BufferCache();
    return *cache;
  }

#if GFL_TORCH_AT_LEAST(2, 3)
  c10::DataPtr allocate(size_t bytes) override { return allocate_block(bytes); }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#else
  // before torch 2.3 allocate was const; the cache is one mutable object on the heap
  c10::DataPtr allocate(size_t bytes) const override {
    return const_cast<BufferCache*>(this)->allocate_block(bytes);
  }
#endif

  c10::DeleterFnPtr raw_deleter() const override { return &BufferCache::release; }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {hits_, misses_, cached_bytes_, static_cast<int64_t>(cached_.size()), limit_};
  }

  int64_t set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "gfl_ops: the CPU buffer cache limit must be >= 0 bytes, got ",
                bytes);
    std::vector<void*> evicted;
    int64_t previous;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      previous = limit_;
      limit_ = bytes;
      evict_locked(evicted);
    }
    for (void* p : evicted) c10::free_cpu(p);
    return previous;
  }

  void clear() {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      for (const Block& b : cached_) evicted.push_back(b.ptr);
      cached_.clear();
      cached_bytes_ = 0;
    }
    for (void* p : evicted) c10::free_cpu(p);
  }

 private:
  struct Block {
    void* ptr;
    int64_t bytes;
  };

  c10::DataPtr allocate_block(size_t bytes) {
    void* p = take(static_cast<int64_t>(bytes));
    if (p == nullptr) {
      p = c10::alloc_cpu(bytes);
      std::lock_guard<std::mutex> guard(mutex_);
      live_[p] = static_cast<int64_t>(bytes);
      live_bytes_ += static_cast<int64_t>(bytes);
    }
    report(p, static_cast<int64_t>(bytes));
    return {p, p, &BufferCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  static void release(void* p) { instance().give_back(p); }

  // The smallest cached block of [bytes, bytes + bytes / 8] (now live, keeping its capacity),
  // or nullptr.
  void* take(int64_t bytes) {
    if (bytes < kMinCachedBytes) return nullptr;
    std::lock_guard<std::mutex> guard(mutex_);
    auto best = cached_.end();
    for (auto it = cached_.begin(); it != cached_.end(); ++it) {
      if (it->bytes >= bytes && it->bytes <= bytes + bytes / 8 &&
          (best == cached_.end() || it->bytes < best->bytes))
        best = it;
    }
    if (best == cached_.end()) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    const Block block = *best;
    cached_bytes_ -= block.bytes;
    cached_.erase(best);
    live_[block.ptr] = block.bytes;
    live_bytes_ += block.bytes;
    return block.ptr;
  }

  void give_back(void* p) {
    if (p == nullptr) return;
    std::vector<void*> evicted;
    bool keep = false;
    int64_t released = 0;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto it = live_.find(p);
      const int64_t bytes = it == live_.end() ? 0 : it->second;
      if (it != live_.end()) live_.erase(it);
      live_bytes_ -= bytes;
      released = bytes;
      if (bytes >= kMinCachedBytes && bytes <= limit_) {
        cached_.push_back({p, bytes});
        cached_bytes_ += bytes;
        keep = true;
        evict_locked(evicted);
      }
    }
    report(p, -released);
    if (!keep) c10::free_cpu(p);
    for (void* q : evicted) c10::free_cpu(q);
  }

  // Tells torch.profiler (profile_memory=True) about a block handed out (bytes > 0) or given
  // back (bytes < 0), as c10's own CPU allocator does, so memory profiles still see these
  // tensors; "reserved" counts the cached blocks too.
  void report(void* p, int64_t bytes) {
    if (!c10::memoryProfilingEnabled()) return;
    int64_t live, reserved;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      live = live_bytes_;
      reserved = live_bytes_ + cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(p, bytes, static_cast<size_t>(live),
                                     static_cast<size_t>(reserved),
                                     c10::Device(c10::DeviceType::CPU));
  }

  // Drops the least recently freed blocks until the total fits the limit.
  void evict_locked(std::vector<void*>& evicted) {
    while (cached_bytes_ > limit_ && !cached_.empty()) {
      evicted.push_back(cached_.front().ptr);
      cached_bytes_ -= cached_.front().bytes;
      cached_.pop_front();
    }
  }

  std::mutex mutex_;
  std::unordered_map<void*, int64_t> live_;  // blocks owned by storages -> capacity
  std::deque<Block> cached_;                  // oldest first
  int64_t cached_bytes_ = 0;
  int64_t live_bytes_ = 0;
  int64_t limit_ = kDefaultLimitBytes;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &BufferCache::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), gfl::nullopt);
}

std::vector<int64_t> buffer_cache_stats() { return BufferCache::instance().stats(); }

int64_t set_buffer_cache_limit(int64_t bytes) { return BufferCache::instance().set_limit(bytes); }

void empty_buffer_cache() { BufferCache::instance().clear(); }

}  // namespace gfl::cpu
