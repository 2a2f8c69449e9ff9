// Flight recorder parts: a bounded in-memory ring of the last events, and the
// triggers that decide when to write it out. Both work on raw events and
// event time only (no BPF), so they are unit-tested with synthetic events.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tcpscope/event.hpp"

namespace tcpscope {

// The last `capacity` records, preallocated: push() never allocates, so the
// recorder can run for weeks at a fixed memory cost.
class EventRing {
 public:
  explicit EventRing(size_t capacity) : buf_(capacity ? capacity : 1) {}

  void push(const Event& ev) {
    buf_[head_] = ev;
    if (++head_ == buf_.size()) head_ = 0;
    if (size_ < buf_.size())
      ++size_;
    else
      wrapped_ = true;
  }
  // True once the oldest records have been overwritten.
  bool wrapped() const { return wrapped_; }
  size_t size() const { return size_; }
  size_t capacity() const { return buf_.size(); }
  // Oldest first.
  template <typename F>
  void for_each(F&& f) const {
    size_t i = size_ < buf_.size() ? 0 : head_;
    for (size_t n = 0; n < size_; ++n) {
      f(buf_[i]);
      if (++i == buf_.size()) i = 0;
    }
  }

 private:
  std::vector<Event> buf_;
  size_t head_ = 0, size_ = 0;
  bool wrapped_ = false;
};

struct TriggerConfig {
  bool late_fin_rst = false;                          // a late FIN answered with a RST
  uint32_t close_wait_stuck = 0;                      // this many stuck CLOSE_WAITs; 0 = off
  uint64_t close_wait_threshold_ns = 60'000'000'000;  // when one counts as stuck
  uint32_t time_wait_over = 0;                        // more TIME_WAIT socks than this; 0 = off
  uint64_t time_wait_len_ns = 60'000'000'000;         // TCP_TIMEWAIT_LEN
  size_t close_wait_capacity = 1u << 16;              // CLOSE_WAITs tracked at once
};

// Watches raw events for trigger conditions. The count triggers fire on the
// edge (when the count crosses the limit) and re-arm when it drops back, so a
// host that stays bad does not fire on every event.
//
// TIME_WAIT: the tracepoints do not show a timewait sock's end, so the count
// is the timewait socks created in the last TCP_TIMEWAIT_LEN (a FIN_WAIT2 or
// CLOSING -> CLOSE transition of a socket no longer hashed: tcp_time_wait()
// put a timewait sock in its place). CLOSE_WAIT: sockets that entered
// CLOSE_WAIT, have not left it, and entered it at least the threshold ago.
class TriggerMonitor {
 public:
  explicit TriggerMonitor(TriggerConfig cfg);

  // Feeds one record; returns the trigger reason if it fires one.
  std::optional<std::string> observe(const Event& ev);
  // The time-based checks at now_ns (CLOCK_BOOTTIME); call about once a second.
  std::optional<std::string> check(uint64_t now_ns);

  uint32_t time_wait_count(uint64_t now_ns) const;
  uint32_t close_wait_stuck(uint64_t now_ns) const;
  size_t close_wait_tracked() const { return cw_size_; }
  uint64_t close_wait_overflow() const { return cw_overflow_; }

  static bool is_late_fin_rst(const Event& ev);
  static bool is_time_wait_entry(const Event& ev);

 private:
  struct Slot {
    uint64_t key = 0;  // 0 = empty
    uint64_t since_ns = 0;
  };
  void cw_insert(uint64_t key, uint64_t ts);
  void cw_erase(uint64_t key);
  size_t cw_find(uint64_t key) const;  // index or capacity if absent

  TriggerConfig cfg_;
  // TIME_WAIT entries per second of event time, over the last window.
  static constexpr size_t kBuckets = 64;
  std::array<uint32_t, kBuckets> tw_count_{};
  std::array<uint64_t, kBuckets> tw_sec_{};
  bool tw_fired_ = false;
  // Open-addressing table of connections in CLOSE_WAIT (no allocation after
  // construction).
  std::vector<Slot> cw_;
  size_t cw_size_ = 0;
  uint64_t cw_overflow_ = 0;
  bool cw_fired_ = false;
  uint64_t last_ns_ = 0;
};

}  // namespace tcpscope
