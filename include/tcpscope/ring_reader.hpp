// The consumer side of a BPF ring buffer map (BPF_MAP_TYPE_RINGBUF), read
// directly through its mappings, as libbpf's ring_buffer does, with one
// difference: the consumer position is published every kPublishEvery
// records and at the end of a drain, not after each record. Producers read
// it on every reservation; a store per record made that read a cache miss
// on their CPUs for nearly every event. (The ring only looks up to
// kPublishEvery records fuller to them meanwhile.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "tcpscope/result.hpp"
#include "tcpscope/unique_fd.hpp"

namespace tcpscope {

class RingReader {
 public:
  // Called with each committed record: its data and size.
  using Callback = void (*)(void* ctx, const void* data, size_t size);
  static constexpr uint32_t kPublishEvery = 64;

  // Maps the ring of map_fd (its size: max_entries); Error if it cannot.
  static Result<std::unique_ptr<RingReader>> open(int map_fd, uint32_t max_entries);
  ~RingReader();
  RingReader(const RingReader&) = delete;
  RingReader& operator=(const RingReader&) = delete;

  // Readable (EPOLLIN) when a producer woke the consumer.
  int epoll_fd() const { return epoll_.get(); }
  // Hands every committed record to cb, in ring order, and publishes the
  // new consumer position; stops at the first record still being written.
  // Returns the records handed.
  uint64_t drain(Callback cb, void* ctx);
  // The most bytes of records a drain found waiting, and the ring's size:
  // how close the consumer came to losing records.
  uint64_t peak_pending_bytes() const { return peak_pending_; }
  uint64_t size_bytes() const { return mask_ + 1; }

 private:
  RingReader() = default;

  UniqueFd epoll_;
  void* consumer_page_ = nullptr;  // consumer position (read-write)
  void* producer_map_ = nullptr;   // producer position page, then the data
                                   // twice (records read across the end)
  size_t page_size_ = 0, producer_map_len_ = 0;
  uint64_t mask_ = 0;
  uint64_t peak_pending_ = 0;
};

}  // namespace tcpscope
