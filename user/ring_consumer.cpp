#include "tcpscope/ring_consumer.hpp"

#include <linux/bpf.h>

#include <cstring>

namespace tcpscope {

RingConsumer::RingConsumer(uint64_t* consumer_pos, const uint64_t* producer_pos,
                           const uint8_t* data, uint64_t size)
    : consumer_pos_(consumer_pos), producer_pos_(producer_pos), data_(data), mask_(size - 1) {
  wrapped_.reserve(32);  // tcpscope's records (128 bytes) never grow it
}

const void* RingConsumer::record_at(uint64_t off, uint32_t size) {
  const uint64_t room = mask_ + 1 - off;
  if (size <= room) return data_ + off;
  wrapped_.resize((size + 7) / 8);
  auto* out = reinterpret_cast<uint8_t*>(wrapped_.data());
  std::memcpy(out, data_ + off, room);
  std::memcpy(out + room, data_, size - room);
  return out;
}

uint64_t RingConsumer::drain(Callback cb, void* ctx) {
  // Only this reader moves the consumer position.
  uint64_t cons = __atomic_load_n(consumer_pos_, __ATOMIC_RELAXED);
  uint64_t handed = 0;
  uint32_t unpublished = 0;
  for (bool first = true;; first = false) {
    const uint64_t prod = __atomic_load_n(producer_pos_, __ATOMIC_ACQUIRE);
    if (cons >= prod) break;
    if (first && prod - cons > peak_pending_) peak_pending_ = prod - cons;
    bool busy = false;
    while (cons < prod) {
      // Headers are 8-byte aligned and the size a power of two of at least
      // a page: a header never wraps, its record may.
      const uint64_t off = cons & mask_;
      const auto* hdr = reinterpret_cast<const uint32_t*>(data_ + off);
      const uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
      if (len & BPF_RINGBUF_BUSY_BIT) {
        busy = true;  // reserved, not committed yet: the next drain
        break;
      }
      const uint32_t size = len & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT);
      cons += (static_cast<uint64_t>(size) + BPF_RINGBUF_HDR_SZ + 7) & ~uint64_t{7};
      if (!(len & BPF_RINGBUF_DISCARD_BIT)) {
        cb(ctx, record_at((off + BPF_RINGBUF_HDR_SZ) & mask_, size), size);
        ++handed;
      }
      if (++unpublished == kPublishEvery) {
        __atomic_store_n(consumer_pos_, cons, __ATOMIC_RELEASE);
        unpublished = 0;
      }
    }
    if (busy) break;
  }
  __atomic_store_n(consumer_pos_, cons, __ATOMIC_RELEASE);
  return handed;
}

}  // namespace tcpscope
