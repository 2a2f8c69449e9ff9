#include "tcpscope/format.hpp"

#include <arpa/inet.h>
#include <cstring>
#include <ctime>

#include <fmt/format.h>

namespace tcpscope {

std::string_view state_name(uint8_t state) {
  static constexpr std::string_view kNames[] = {
      "UNKNOWN",   "ESTABLISHED", "SYN_SENT", "SYN_RECV",   "FIN_WAIT1",
      "FIN_WAIT2", "TIME_WAIT",   "CLOSE",    "CLOSE_WAIT", "LAST_ACK",
      "LISTEN",    "CLOSING",     "NEW_SYN_RECV", "BOUND_INACTIVE"};
  return state < std::size(kNames) ? kNames[state] : "UNKNOWN";
}

std::string_view reset_reason_name(uint32_t reason) {
  // enum sk_rst_reason, include/net/rstreason.h (6.10+).
  static constexpr std::string_view kNames[] = {
      "NOT_SPECIFIED",          "NO_SOCKET",
      "TCP_INVALID_ACK_SEQUENCE", "TCP_RFC7323_PAWS",
      "TCP_TOO_OLD_ACK",        "TCP_ACK_UNSENT_DATA",
      "TCP_FLAGS",              "TCP_OLD_ACK",
      "TCP_ABORT_ON_DATA",      "TCP_TIMEWAIT_SOCKET",
      "INVALID_SYN",            "TCP_ABORT_ON_CLOSE",
      "TCP_ABORT_ON_LINGER",    "TCP_ABORT_ON_MEMORY",
      "TCP_STATE",              "TCP_KEEPALIVE_TIMEOUT",
      "TCP_DISCONNECT_WITH_DATA"};
  return reason < std::size(kNames) ? kNames[reason] : "OTHER";
}

std::string_view event_type_name(uint8_t type) {
  switch (type) {
    case TCPSCOPE_EV_STATE: return "state";
    case TCPSCOPE_EV_RETRANSMIT: return "retransmit";
    case TCPSCOPE_EV_RESET_SENT: return "reset_sent";
    case TCPSCOPE_EV_RESET_RECEIVED: return "reset_received";
    case TCPSCOPE_EV_LOST: return "lost";
    case TCPSCOPE_EV_END: return "end";
    case TCPSCOPE_EV_STATS: return "stats";
    default: return "unknown";
  }
}

AddrText format_addr(uint8_t family, const uint8_t* addr) {
  AddrText t;
  if (family == 4) {
    // Dotted quad by hand: inet_ntop goes through sprintf, a visible cost
    // at several addresses per event.
    char* p = t.buf.data();
    for (int i = 0; i < 4; ++i) {
      unsigned v = addr[i];
      if (v >= 100) *p++ = static_cast<char>('0' + v / 100), v %= 100, *p++ = static_cast<char>('0' + v / 10);
      else if (v >= 10) *p++ = static_cast<char>('0' + v / 10);
      *p++ = static_cast<char>('0' + v % 10);
      if (i < 3) *p++ = '.';
    }
    *p = '\0';
    return t;
  }
  const int af = family == 4 ? AF_INET : AF_INET6;
  if (!inet_ntop(af, addr, t.buf.data(), t.buf.size())) t.buf[0] = '\0';
  return t;
}

std::string_view TimeFormatter::rfc3339(uint64_t ts_ns) {
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
    cached_sec_ = sec;
  }
  // By hand: this runs for every line printed.
  const size_t plen = strnlen(date_prefix_.data(), date_prefix_.size());
  std::memcpy(out_.data(), date_prefix_.data(), plen);
  size_t n = plen;
  out_[n++] = '.';
  for (int i = 8; i >= 0; --i) {
    out_[n + static_cast<size_t>(i)] = static_cast<char>('0' + nsec % 10);
    nsec /= 10;
  }
  n += 9;
  out_[n++] = 'Z';
  return {out_.data(), n};
}

std::string_view TimeFormatter::clock(uint64_t ts_ns) {
  std::string_view full = rfc3339(ts_ns);
  // "YYYY-MM-DDTHH:MM:SS.mmm" -> "HH:MM:SS.mmm"
  return full.substr(11, 12);
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
