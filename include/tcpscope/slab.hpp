// Records in fixed chunks, addressed by slot index: the tracker's connections
// and the TIME_WAIT analysis' tw socks. A slot never moves (indexes are the
// handles hash indexes file), freed slots are reused first, and each chunk is
// an anonymous mapping of its own so that chunks at the top that no record
// uses any more go back to the system (release_empty_top): after a burst,
// RSS comes down instead of staying in malloc's heap.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

namespace tcpscope {

// T must be an implicit-lifetime type for which all-zero bytes are a valid
// value: a fresh chunk is zero pages, no constructor runs.
template <typename T, uint32_t kChunk = 1024>
class ChunkedSlab {
  static_assert(std::is_trivially_destructible_v<T>);
  static_assert(kChunk > 0 && kChunk <= UINT16_MAX);

 public:
  // A slot for a new record; its contents are the last record's, or zeros.
  uint32_t acquire() {
    uint32_t i;
    if (!free_.empty()) {
      i = free_.back();
      free_.pop_back();
    } else {
      if (used_ % kChunk == 0) {
        chunks_.push_back(map_chunk());
        live_.push_back(0);
      }
      i = used_++;
    }
    ++live_[i / kChunk];
    return i;
  }
  void release(uint32_t i) {
    free_.push_back(i);
    --live_[i / kChunk];
  }
  T& operator[](uint32_t i) { return chunks_[i / kChunk].get()[i % kChunk]; }
  const T& operator[](uint32_t i) const { return chunks_[i / kChunk].get()[i % kChunk]; }

  // Slots handed out so far lie below this (some may be free).
  uint32_t used() const { return used_; }
  size_t chunks() const { return chunks_.size(); }

  // Unmaps the chunks at the top with no record in use (the first chunk
  // stays); true if any went.
  bool release_empty_top() {
    size_t keep = chunks_.size();
    while (keep > 1 && live_[keep - 1] == 0) --keep;
    if (keep == chunks_.size()) return false;
    chunks_.resize(keep);
    live_.resize(keep);
    const uint32_t end = static_cast<uint32_t>(keep) * kChunk;
    used_ = std::min(used_, end);
    std::erase_if(free_, [end](uint32_t i) { return i >= end; });
    return true;
  }
  // release_empty_top() at most once a second of now_ns: a count that
  // hovers at a chunk boundary then costs little.
  void release_empty_top_at(uint64_t now_ns) {
    if (now_ns < next_release_ns_) return;
    next_release_ns_ = now_ns + 1'000'000'000;
    release_empty_top();
  }
  void clear() {
    chunks_.clear();
    live_.clear();
    free_.clear();
    used_ = 0;
  }

 private:
  struct Unmap {
    void operator()(T* chunk) const { munmap(chunk, kChunk * sizeof(T)); }
  };
  using Chunk = std::unique_ptr<T, Unmap>;
  static Chunk map_chunk() {
    void* p = mmap(nullptr, kChunk * sizeof(T), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    return Chunk(static_cast<T*>(p));
  }

  std::vector<Chunk> chunks_;
  std::vector<uint16_t> live_;  // per chunk: slots in use
  std::vector<uint32_t> free_;
  uint32_t used_ = 0;
  uint64_t next_release_ns_ = 0;
};

}  // namespace tcpscope
