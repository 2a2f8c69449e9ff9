#include "tcpscope/format.hpp"

#include <arpa/inet.h>

#include <array>
#include <cstring>
#include <ctime>

#include <fmt/format.h>

namespace tcpscope {

std::string_view state_name(uint8_t state) {
  static constexpr std::string_view kNames[] = {
      "UNKNOWN",   "ESTABLISHED", "SYN_SENT",     "SYN_RECV",      "FIN_WAIT1",
      "FIN_WAIT2", "TIME_WAIT",   "CLOSE",        "CLOSE_WAIT",    "LAST_ACK",
      "LISTEN",    "CLOSING",     "NEW_SYN_RECV", "BOUND_INACTIVE"};
  return state < std::size(kNames) ? kNames[state] : "UNKNOWN";
}

std::string_view reset_reason_name(uint32_t reason) {
  // enum sk_rst_reason, include/net/rstreason.h (6.10+).
  static constexpr std::string_view kNames[] = {"NOT_SPECIFIED",
                                                "NO_SOCKET",
                                                "TCP_INVALID_ACK_SEQUENCE",
                                                "TCP_RFC7323_PAWS",
                                                "TCP_TOO_OLD_ACK",
                                                "TCP_ACK_UNSENT_DATA",
                                                "TCP_FLAGS",
                                                "TCP_OLD_ACK",
                                                "TCP_ABORT_ON_DATA",
                                                "TCP_TIMEWAIT_SOCKET",
                                                "INVALID_SYN",
                                                "TCP_ABORT_ON_CLOSE",
                                                "TCP_ABORT_ON_LINGER",
                                                "TCP_ABORT_ON_MEMORY",
                                                "TCP_STATE",
                                                "TCP_KEEPALIVE_TIMEOUT",
                                                "TCP_DISCONNECT_WITH_DATA"};
  return reason < std::size(kNames) ? kNames[reason] : "OTHER";
}

std::string_view event_type_name(uint8_t type) {
  switch (type) {
    case TCPSCOPE_EV_STATE:
      return "state";
    case TCPSCOPE_EV_RETRANSMIT:
      return "retransmit";
    case TCPSCOPE_EV_RESET_SENT:
      return "reset_sent";
    case TCPSCOPE_EV_RESET_RECEIVED:
      return "reset_received";
    case TCPSCOPE_EV_LOST:
      return "lost";
    case TCPSCOPE_EV_VANISHED:
      return "vanished";
    case TCPSCOPE_EV_END:
      return "end";
    case TCPSCOPE_EV_STATS:
      return "stats";
    default:
      return "unknown";
  }
}

size_t format_addr_to(char* dst, uint8_t family, const uint8_t* addr) {
  if (family == 4) {
    // Dotted quad by hand from a table of the 256 numbers: inet_ntop goes
    // through sprintf, a visible cost at several addresses per event.
    static constexpr auto kBytes = [] {
      std::array<std::array<char, 4>, 256> t{};  // digits, then the count
      for (unsigned v = 0; v < 256; ++v) {
        auto& e = t[v];
        char n = 0;
        if (v >= 100) e[n++] = static_cast<char>('0' + v / 100);
        if (v >= 10) e[n++] = static_cast<char>('0' + v / 10 % 10);
        e[n++] = static_cast<char>('0' + v % 10);
        e[3] = n;
      }
      return t;
    }();
    char* p = dst;
    for (int i = 0; i < 4; ++i) {
      const auto& e = kBytes[addr[i]];
      std::memcpy(p, e.data(), 3);
      p += e[3];
      *p++ = '.';
    }
    return static_cast<size_t>(p - dst) - 1;  // no dot after the last
  }
  char text[INET6_ADDRSTRLEN];
  if (!inet_ntop(AF_INET6, addr, text, sizeof(text))) return 0;
  const size_t n = strnlen(text, sizeof(text));
  std::memcpy(dst, text, n);
  return n;
}

AddrText format_addr(uint8_t family, const uint8_t* addr) {
  static_assert(kMaxAddrText < sizeof(AddrText::buf));
  AddrText t;
  t.len = static_cast<uint8_t>(format_addr_to(t.buf.data(), family, addr));
  return t;
}

int64_t TimeFormatter::nsec_of(uint64_t ts_ns) {
  const int64_t wall = static_cast<int64_t>(ts_ns) + offset_ns_;
  int64_t sec = wall / 1'000'000'000;
  int64_t nsec = wall % 1'000'000'000;
  if (nsec < 0) {
    nsec += 1'000'000'000;
    --sec;
  }
  if (sec != cached_sec_) {
    const time_t t = static_cast<time_t>(sec);
    struct tm tm {};
    gmtime_r(&t, &tm);
    strftime(date_prefix_.data(), date_prefix_.size(), "%Y-%m-%dT%H:%M:%S", &tm);
    prefix_len_ = strnlen(date_prefix_.data(), date_prefix_.size());
    std::memcpy(out_.data(), date_prefix_.data(), prefix_len_);
    cached_sec_ = sec;
  }
  return nsec;
}

std::string_view TimeFormatter::rfc3339(uint64_t ts_ns) {
  static constexpr char kPairs[] =
      "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
      "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
      "8081828384858687888990919293949596979899";
  auto nsec = static_cast<uint32_t>(nsec_of(ts_ns));
  // By hand: this runs for every line printed. out_ holds the date prefix
  // of the cached second already; only the fraction changes.
  char* fraction = out_.data() + prefix_len_;
  fraction[0] = '.';
  fraction[9] = static_cast<char>('0' + nsec % 10);
  nsec /= 10;
  for (int i = 7; i >= 1; i -= 2, nsec /= 100) {
    fraction[i] = kPairs[nsec % 100 * 2];
    fraction[i + 1] = kPairs[nsec % 100 * 2 + 1];
  }
  fraction[10] = 'Z';
  return {out_.data(), prefix_len_ + 11};
}

std::string_view TimeFormatter::clock(uint64_t ts_ns) {
  // "YYYY-MM-DDTHH:MM:SS.mmm" -> "HH:MM:SS.mmm"
  constexpr size_t kUsualPrefix = 19;  // four-digit years
  const int64_t nsec = nsec_of(ts_ns);
  if (prefix_len_ != kUsualPrefix) return rfc3339(ts_ns).substr(11, 12);
  // Only the digits shown: one table row per event.
  const auto ms = static_cast<unsigned>(nsec / 1'000'000);
  std::memcpy(clock_out_.data(), date_prefix_.data() + 11, 8);
  clock_out_[8] = '.';
  clock_out_[9] = static_cast<char>('0' + ms / 100);
  clock_out_[10] = static_cast<char>('0' + ms / 10 % 10);
  clock_out_[11] = static_cast<char>('0' + ms % 10);
  return {clock_out_.data(), 12};
}

uint64_t boottime_now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

int64_t measure_boot_offset_ns() {
  // Bracket the realtime read by two boottime reads and keep the tightest.
  int64_t best = 0, best_gap = INT64_MAX;
  for (int i = 0; i < 5; ++i) {
    const uint64_t b0 = boottime_now_ns();
    timespec rt{};
    clock_gettime(CLOCK_REALTIME, &rt);
    const uint64_t b1 = boottime_now_ns();
    const int64_t real = static_cast<int64_t>(rt.tv_sec) * 1'000'000'000 + rt.tv_nsec;
    const int64_t gap = static_cast<int64_t>(b1 - b0);
    if (gap < best_gap) {
      best_gap = gap;
      best = real - static_cast<int64_t>(b0 + (b1 - b0) / 2);
    }
  }
  return best;
}

}  // namespace tcpscope
