#include "tcpscope/ring_reader.hpp"

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
  void* cons = mmap(nullptr, r->page_size_, PROT_READ | PROT_WRITE, MAP_SHARED, map_fd, 0);
  if (cons == MAP_FAILED)
    return Error{std::string("mapping the ring buffer's consumer page: ") + std::strerror(errno)};
  r->consumer_page_ = cons;
  // The kernel lets the data area be mapped twice in a row, after the
  // producer page, so that records read across its end; mapped once, it
  // costs half the RSS, and RingConsumer copies the few that wrap.
  r->producer_map_len_ = r->page_size_ + static_cast<size_t>(max_entries);
  void* prod = mmap(nullptr, r->producer_map_len_, PROT_READ, MAP_SHARED, map_fd,
                    static_cast<off_t>(r->page_size_));
  if (prod == MAP_FAILED)
    return Error{std::string("mapping the ring buffer's data: ") + std::strerror(errno)};
  r->producer_map_ = prod;
  const auto* data = static_cast<const uint8_t*>(prod) + r->page_size_;
  r->consumer_ = std::make_unique<RingConsumer>(
      static_cast<uint64_t*>(cons), static_cast<const uint64_t*>(prod), data, max_entries);
  r->epoll_ = UniqueFd(epoll_create1(EPOLL_CLOEXEC));
  if (!r->epoll_.valid()) return Error{std::string("epoll_create1: ") + std::strerror(errno)};
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

}  // namespace tcpscope
