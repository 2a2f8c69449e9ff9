#include "tcpscope/ring_reader.hpp"

#include <linux/bpf.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace tcpscope {

Result<std::unique_ptr<RingReader>> RingReader::open(int map_fd, uint32_t max_entries) {
  std::unique_ptr<RingReader> r(new RingReader());
  r->page_size_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (max_entries == 0 || (max_entries & (max_entries - 1)) != 0)
    return Error{"ring buffer size " + std::to_string(max_entries) + " is not a power of two"};
  r->mask_ = max_entries - 1;
  void* cons = mmap(nullptr, r->page_size_, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
  if (cons == MAP_FAILED)
    return Error{std::string("mapping the ring buffer's consumer page: ") + std::strerror(errno)};
  r->consumer_page_ = cons;
  // The kernel maps the data area twice in a row, after the producer page.
  r->producer_map_len_ = r->page_size_ + 2 * static_cast<size_t>(max_entries);
  void* prod = mmap(nullptr, r->producer_map_len_, PROT_READ, MAP_SHARED, map_fd,
                    static_cast<off_t>(r->page_size_));
  if (prod == MAP_FAILED)
    return Error{std::string("mapping the ring buffer's data: ") + std::strerror(errno)};
  r->producer_map_ = prod;
  r->epoll_ = UniqueFd(epoll_create1(EPOLL_CLOEXEC));
  if (!r->epoll_.valid())
    return Error{std::string("epoll_create1: ") + std::strerror(errno)};
  epoll_event ev{};
  ev.events = EPOLLIN;
  if (epoll_ctl(r->epoll_.get(), EPOLL_CTL_ADD, map_fd, &ev) != 0)
    return Error{std::string("polling the ring buffer: ") + std::strerror(errno)};
  return r;
}

RingReader::~RingReader() {
  if (producer_map_) munmap(producer_map_, producer_map_len_);
  if (consumer_page_) munmap(consumer_page_, page_size_);
}

uint64_t RingReader::drain(Callback cb, void* ctx) {
  auto* consumer_pos = static_cast<uint64_t*>(consumer_page_);
  const auto* producer_pos = static_cast<const uint64_t*>(producer_map_);
  const auto* data = static_cast<const uint8_t*>(producer_map_) + page_size_;
  // Only this reader moves the consumer position.
  uint64_t cons = __atomic_load_n(consumer_pos, __ATOMIC_RELAXED);
  uint64_t handed = 0;
  uint32_t unpublished = 0;
  for (bool first = true;; first = false) {
    const uint64_t prod = __atomic_load_n(producer_pos, __ATOMIC_ACQUIRE);
    if (cons >= prod) break;
    if (first && prod - cons > peak_pending_) peak_pending_ = prod - cons;
    bool busy = false;
    while (cons < prod) {
      const auto* hdr = reinterpret_cast<const uint32_t*>(data + (cons & mask_));
      const uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
      if (len & BPF_RINGBUF_BUSY_BIT) {
        busy = true;  // reserved, not committed yet: the next drain
        break;
      }
      const uint32_t size = len & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT);
      cons += (static_cast<uint64_t>(size) + BPF_RINGBUF_HDR_SZ + 7) & ~uint64_t{7};
      if (!(len & BPF_RINGBUF_DISCARD_BIT)) {
        cb(ctx, hdr + BPF_RINGBUF_HDR_SZ / sizeof(uint32_t), size);
        ++handed;
      }
      if (++unpublished == kPublishEvery) {
        __atomic_store_n(consumer_pos, cons, __ATOMIC_RELEASE);
        unpublished = 0;
      }
    }
    if (busy) break;
  }
  __atomic_store_n(consumer_pos, cons, __ATOMIC_RELEASE);
  return handed;
}

}  // namespace tcpscope
