// Allocation-free formatting helpers shared by the output sinks.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "tcpscope/event.hpp"

namespace tcpscope {

// Text form of an address: dotted quad for family 4, RFC 5952 for 6.
struct AddrText {
  std::array<char, 48> buf{};
  uint8_t len = 0;
  std::string_view view() const { return {buf.data(), len}; }
};
AddrText format_addr(uint8_t family, const uint8_t* addr);
// The same text written at dst (room for kMaxAddrText chars, no NUL);
// returns its length.
inline constexpr size_t kMaxAddrText = 46;
size_t format_addr_to(char* dst, uint8_t family, const uint8_t* addr);

// Event time (CLOCK_BOOTTIME ns) to RFC 3339 UTC with nanoseconds. The
// offset is the wall-clock time of boot, measured once at start and stored in
// captures so that a replay prints the same times.
class TimeFormatter {
 public:
  explicit TimeFormatter(int64_t boot_to_realtime_ns = 0) : offset_ns_(boot_to_realtime_ns) {}
  void set_offset(int64_t boot_to_realtime_ns) {
    offset_ns_ = boot_to_realtime_ns;
    cached_sec_ = kNoSec;
  }
  int64_t offset() const { return offset_ns_; }
  // "2026-11-21T09:28:00.123456789Z"; valid until the next call.
  std::string_view rfc3339(uint64_t ts_ns);
  // "09:28:00.123" for the human table; valid until the next call.
  std::string_view clock(uint64_t ts_ns);

 private:
  // Not a second rfc3339 can meet (-1 can: the last second of 1969).
  static constexpr int64_t kNoSec = INT64_MIN;
  int64_t offset_ns_;
  // Builds the date prefix of sec; returns the wall-clock nanoseconds.
  int64_t nsec_of(uint64_t ts_ns);
  int64_t cached_sec_ = kNoSec;
  std::array<char, 24> date_prefix_{};  // "2026-11-21T09:28:00"
  size_t prefix_len_ = 0;
  std::array<char, 40> out_{};  // the date prefix, then rfc3339's fraction
  std::array<char, 12> clock_out_{};
};

// Measures the boot-to-wall-clock offset now (CLOCK_REALTIME - CLOCK_BOOTTIME).
int64_t measure_boot_offset_ns();
// CLOCK_BOOTTIME now, the clock of Event::ts_ns.
uint64_t boottime_now_ns();

}  // namespace tcpscope
