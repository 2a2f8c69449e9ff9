#include "tcpscope/recorder.hpp"

#include <fmt/format.h>

#include <bit>

namespace tcpscope {

TriggerMonitor::TriggerMonitor(TriggerConfig cfg) : cfg_(cfg) {
  if (cfg_.close_wait_stuck)
    cw_.resize(std::bit_ceil(std::max<size_t>(cfg_.close_wait_capacity, 16) * 2));
}

bool TriggerMonitor::is_late_fin_rst(const Event& ev) {
  return ev.type == TCPSCOPE_EV_RESET_SENT && (ev.sk_flags & TCPSCOPE_SK_NO_SOCKET) &&
         (ev.tcp_flags & TCPSCOPE_TCP_FIN);
}

bool TriggerMonitor::is_time_wait_entry(const Event& ev) {
  return ev.type == TCPSCOPE_EV_STATE && ev.new_state == kTcpClose &&
         (ev.old_state == kTcpFinWait2 || ev.old_state == kTcpClosing) &&
         !(ev.sk_flags & TCPSCOPE_SK_HASHED);
}

namespace {
// Fibonacci hashing: cookies are sequential, spread them.
size_t slot_of(uint64_t key, size_t mask) {
  return static_cast<size_t>((key * 0x9e3779b97f4a7c15ull) >> 20) & mask;
}
}  // namespace

size_t TriggerMonitor::cw_find(uint64_t key) const {
  const size_t mask = cw_.size() - 1;
  for (size_t i = slot_of(key, mask), n = 0; n < cw_.size(); i = (i + 1) & mask, ++n) {
    if (cw_[i].key == key) return i;
    if (cw_[i].key == 0) break;
  }
  return cw_.size();
}

void TriggerMonitor::cw_insert(uint64_t key, uint64_t ts) {
  if (cw_find(key) != cw_.size()) return;
  // Half full at most, so probes stay short.
  if (cw_size_ >= cw_.size() / 2) {
    ++cw_overflow_;
    return;
  }
  const size_t mask = cw_.size() - 1;
  size_t i = slot_of(key, mask);
  while (cw_[i].key != 0) i = (i + 1) & mask;
  cw_[i] = Slot{key, ts};
  ++cw_size_;
}

void TriggerMonitor::cw_erase(uint64_t key) {
  size_t i = cw_find(key);
  if (i == cw_.size()) return;
  const size_t mask = cw_.size() - 1;
  // Backward-shift deletion: no tombstones, lookups stay exact.
  size_t j = i;
  for (;;) {
    cw_[i].key = 0;
    for (;;) {
      j = (j + 1) & mask;
      if (cw_[j].key == 0) {
        --cw_size_;
        return;
      }
      const size_t home = slot_of(cw_[j].key, mask);
      // Move j back to i unless its home lies cyclically in (i, j].
      const bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
      if (!stays) break;
    }
    cw_[i] = cw_[j];
    i = j;
  }
}

std::optional<std::string> TriggerMonitor::observe(const Event& ev) {
  if (ev.ts_ns > last_ns_) last_ns_ = ev.ts_ns;
  if (cfg_.late_fin_rst && is_late_fin_rst(ev)) return std::string("late-FIN RST");

  if (ev.type != TCPSCOPE_EV_STATE) return std::nullopt;
  if (cfg_.close_wait_stuck && !cw_.empty()) {
    const uint64_t key = ev.conn ? ev.conn : ev.sk;
    if (key != 0) {
      if (ev.new_state == kTcpCloseWait)
        cw_insert(key, ev.ts_ns);
      else if (ev.old_state == kTcpCloseWait)
        cw_erase(key);
    }
  }
  if (cfg_.time_wait_over && is_time_wait_entry(ev)) {
    const uint64_t sec = ev.ts_ns / 1'000'000'000;
    const size_t b = sec % kBuckets;
    if (tw_sec_[b] != sec) {
      tw_sec_[b] = sec;
      tw_count_[b] = 0;
    }
    ++tw_count_[b];
    const uint32_t n = time_wait_count(ev.ts_ns);
    if (n > cfg_.time_wait_over && !tw_fired_) {
      tw_fired_ = true;
      return fmt::format("TIME_WAIT count {} over {}", n, cfg_.time_wait_over);
    }
  }
  return std::nullopt;
}

uint32_t TriggerMonitor::time_wait_count(uint64_t now_ns) const {
  const uint64_t now_sec = now_ns / 1'000'000'000;
  const uint64_t window = std::min<uint64_t>(cfg_.time_wait_len_ns / 1'000'000'000, kBuckets - 1);
  uint32_t n = 0;
  for (size_t b = 0; b < kBuckets; ++b)
    if (tw_count_[b] && tw_sec_[b] <= now_sec && tw_sec_[b] + window > now_sec) n += tw_count_[b];
  return n;
}

uint32_t TriggerMonitor::close_wait_stuck(uint64_t now_ns) const {
  uint32_t n = 0;
  for (const Slot& s : cw_)
    if (s.key && now_ns >= s.since_ns && now_ns - s.since_ns >= cfg_.close_wait_threshold_ns) ++n;
  return n;
}

std::optional<std::string> TriggerMonitor::check(uint64_t now_ns) {
  if (cfg_.time_wait_over && tw_fired_ && time_wait_count(now_ns) <= cfg_.time_wait_over)
    tw_fired_ = false;  // re-arm
  if (cfg_.close_wait_stuck) {
    const uint32_t n = close_wait_stuck(now_ns);
    if (n < cfg_.close_wait_stuck) {
      cw_fired_ = false;
    } else if (!cw_fired_) {
      cw_fired_ = true;
      return fmt::format("{} CLOSE_WAIT stuck over {} s", n,
                         cfg_.close_wait_threshold_ns / 1'000'000'000);
    }
  }
  return std::nullopt;
}

}  // namespace tcpscope
