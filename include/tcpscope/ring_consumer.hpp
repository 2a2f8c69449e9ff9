// The consumer side of a BPF ring buffer (BPF_MAP_TYPE_RINGBUF), on its
// memory: the consumer and producer positions and the data area, mapped
// once. It reads records as libbpf's ring_buffer does, with two
// differences:
// - the consumer position is published every kPublishEvery records and at
//   the end of a drain, not after each record. Producers read it on every
//   reservation; a store per record made that read a cache miss on their
//   CPUs for nearly every event. (The ring only looks up to kPublishEvery
//   records fuller to them meanwhile.)
// - the data area is mapped once, not twice in a row: a record that runs
//   past its end is copied into a buffer of the reader's. Every page of a
//   mapping counts in the process' RSS, so a double mapping costs twice
//   the ring's size.
// It holds no kernel object (RingReader maps one), so it can be tested on
// plain memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace tcpscope {

class RingConsumer {
 public:
  // Called with each committed record: its data (8-byte aligned) and size.
  using Callback = void (*)(void* ctx, const void* data, size_t size);
  static constexpr uint32_t kPublishEvery = 64;

  // size: the data area's, a power of two (the kernel enforces it).
  RingConsumer(uint64_t* consumer_pos, const uint64_t* producer_pos, const uint8_t* data,
               uint64_t size);

  // Hands every committed record to cb, in ring order, and publishes the
  // new consumer position; stops at the first record still being written.
  // Returns the records handed.
  uint64_t drain(Callback cb, void* ctx);
  // The most bytes of records a drain found waiting, and the ring's size:
  // how close the consumer came to losing records.
  uint64_t peak_pending_bytes() const { return peak_pending_; }
  uint64_t size_bytes() const { return mask_ + 1; }
  // Bytes the producers have committed or reserved that this reader has
  // not passed yet.
  uint64_t pending_bytes() const {
    return __atomic_load_n(producer_pos_, __ATOMIC_ACQUIRE) -
           __atomic_load_n(consumer_pos_, __ATOMIC_RELAXED);
  }

 private:
  // The record of size bytes at offset off of the data area, contiguous.
  const void* record_at(uint64_t off, uint32_t size);

  uint64_t* consumer_pos_;
  const uint64_t* producer_pos_;
  const uint8_t* data_;
  uint64_t mask_;
  uint64_t peak_pending_ = 0;
  std::vector<uint64_t> wrapped_;  // a record that wraps, made contiguous
};

}  // namespace tcpscope
