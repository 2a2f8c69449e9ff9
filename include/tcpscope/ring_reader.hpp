// A BPF ring buffer map (BPF_MAP_TYPE_RINGBUF) mapped for reading, and its
// wake-ups: the mappings are this object's, the reading RingConsumer's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "tcpscope/result.hpp"
#include "tcpscope/ring_consumer.hpp"
#include "tcpscope/unique_fd.hpp"

namespace tcpscope {

class RingReader {
 public:
  using Callback = RingConsumer::Callback;

  // Maps the ring of map_fd (its size: max_entries); Error if it cannot.
  static Result<std::unique_ptr<RingReader>> open(int map_fd, uint32_t max_entries);
  ~RingReader();
  RingReader(const RingReader&) = delete;
  RingReader& operator=(const RingReader&) = delete;

  // Readable (EPOLLIN) when a producer woke the consumer.
  int epoll_fd() const { return epoll_.get(); }
  // See RingConsumer.
  uint64_t drain(Callback cb, void* ctx) { return consumer_->drain(cb, ctx); }
  uint64_t peak_pending_bytes() const { return consumer_->peak_pending_bytes(); }
  uint64_t size_bytes() const { return consumer_->size_bytes(); }
  uint64_t pending_bytes() const { return consumer_->pending_bytes(); }

 private:
  RingReader() = default;

  UniqueFd epoll_;
  void* consumer_page_ = nullptr;  // consumer position (read-write)
  void* producer_map_ = nullptr;   // producer position page, then the data
  size_t page_size_ = 0, producer_map_len_ = 0;
  std::unique_ptr<RingConsumer> consumer_;
};

}  // namespace tcpscope
