// Flight recorder parts: a bounded in-memory ring of the last events, and the
// triggers that decide when to write it out. Both work on records and event
// time only (no BPF), so they are unit-tested with synthetic events.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "tcpscope/closewait.hpp"
#include "tcpscope/event.hpp"
#include "tcpscope/pipeline.hpp"
#include "tcpscope/resets.hpp"
#include "tcpscope/timewait.hpp"

namespace tcpscope {

// The last `capacity` records, allocated once: push() never allocates, so
// the recorder can run for weeks at a fixed memory cost. The slots are left
// uninitialised (only those written are read), so the pages come as records
// fill them: a large ring neither takes its whole size at the start nor
// spends seconds zeroing it.
class EventRing {
 public:
  explicit EventRing(size_t capacity) : cap_(capacity ? capacity : 1), buf_(new Event[cap_]) {}

  void push(const Event& ev) {
    buf_[head_] = ev;
    if (++head_ == cap_) head_ = 0;
    if (size_ < cap_)
      ++size_;
    else
      wrapped_ = true;
  }
  // True once the oldest records have been overwritten.
  bool wrapped() const { return wrapped_; }
  size_t size() const { return size_; }
  size_t capacity() const { return cap_; }
  // Oldest first.
  template <typename F>
  void for_each(F&& f) const {
    size_t i = size_ < cap_ ? 0 : head_;
    for (size_t n = 0; n < size_; ++n) {
      f(buf_[i]);
      if (++i == cap_) i = 0;
    }
  }

 private:
  size_t cap_;
  static_assert(std::is_trivially_default_constructible_v<Event>, "new Event[] must not zero");
  std::unique_ptr<Event[]> buf_;  // new Event[]: trivial, so not zeroed
  size_t head_ = 0, size_ = 0;
  bool wrapped_ = false;
};

struct TriggerConfig {
  bool late_fin_rst = false;      // a late FIN or data answered with a RST
  uint32_t close_wait_stuck = 0;  // this many stuck CLOSE_WAITs; 0 = off
  uint32_t time_wait_over = 0;    // more TIME_WAIT socks than this; 0 = off
};

// Decides when the flight recorder writes its ring. It runs the same
// analysis as `trace` on the records it sees, so a trigger means exactly what
// the report would say: a late_fin_resets entry, a CLOSE_WAIT past
// --close-wait-threshold (the CONFIG record's), a TIME_WAIT count from the tw
// timers or sweeps. Count triggers fire on the edge and re-arm when the count
// drops back to the limit, so a host that stays bad does not fire on every
// event.
class TriggerMonitor {
 public:
  explicit TriggerMonitor(TriggerConfig cfg);

  // Feeds one record (not END); returns the trigger reason if one fires.
  std::optional<std::string> observe(const Event& ev);

  size_t time_wait_open() const;
  size_t close_wait_stuck() const;
  size_t late_fin_resets() const;

 private:
  TriggerConfig cfg_;
  Pipeline pipeline_;
  const TimeWaitAnalyzer* tw_ = nullptr;
  const ResetAnalyzer* resets_ = nullptr;
  const CloseWaitAnalyzer* cw_ = nullptr;
  size_t late_seen_ = 0;
  bool tw_fired_ = false, cw_fired_ = false;
};

}  // namespace tcpscope
