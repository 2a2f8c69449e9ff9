// Builders of synthetic kernel events for the unit tests.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "tcpscope/analyzers.hpp"
#include "tcpscope/event.hpp"
#include "tcpscope/pipeline.hpp"
#include "tcpscope/tracker.hpp"

namespace tcpscope {
// Readable enum values in test failures.
inline void PrintTo(CloseKind k, std::ostream* os) { *os << close_kind_name(k); }
inline void PrintTo(OpenKind k, std::ostream* os) { *os << open_kind_name(k); }
}  // namespace tcpscope

namespace tcpscope::test {

constexpr uint64_t ms(uint64_t v) { return v * 1'000'000ull; }

inline constexpr uint32_t kNetns = 4026531840u;

// One event with sensible defaults: IPv4 10.0.0.1:40000 -> 10.0.0.2:80 in
// netns kNetns, no owner.
class Ev {
 public:
  explicit Ev(uint8_t type, uint64_t ts_ns, uint64_t conn) {
    std::memset(&e_, 0, sizeof e_);
    e_.type = type;
    e_.ts_ns = ts_ns;
    e_.conn = conn;
    e_.sk = 0xffff888000000000ull + conn * 64;
    e_.netns = kNetns;
    e_.family = 4;
    v4(e_.laddr, 10, 0, 0, 1);
    v4(e_.raddr, 10, 0, 0, 2);
    e_.lport = 40000;
    e_.rport = 80;
  }

  Ev& states(uint8_t old_state, uint8_t new_state) {
    e_.old_state = old_state;
    e_.new_state = new_state;
    return *this;
  }
  Ev& in(uint8_t state) {  // state at a non-STATE event
    e_.old_state = state;
    return *this;
  }
  Ev& owner(uint32_t pid, std::string_view comm, uint8_t src = TCPSCOPE_OWNER_SYSCALL) {
    e_.pid = pid;
    std::memset(e_.comm, 0, sizeof e_.comm);
    std::memcpy(e_.comm, comm.data(), std::min(comm.size(), sizeof e_.comm));
    e_.owner_src = src;
    return *this;
  }
  Ev& lport(uint16_t p) {
    e_.lport = p;
    return *this;
  }
  Ev& rport(uint16_t p) {
    e_.rport = p;
    return *this;
  }
  Ev& laddr4(uint8_t a, uint8_t b, uint8_t c, uint8_t d) {
    std::memset(e_.laddr, 0, sizeof e_.laddr);
    v4(e_.laddr, a, b, c, d);
    return *this;
  }
  Ev& raddr4(uint8_t a, uint8_t b, uint8_t c, uint8_t d) {
    std::memset(e_.raddr, 0, sizeof e_.raddr);
    v4(e_.raddr, a, b, c, d);
    return *this;
  }
  Ev& v6(std::initializer_list<uint8_t> l, std::initializer_list<uint8_t> r) {
    e_.family = 6;
    std::memset(e_.laddr, 0, sizeof e_.laddr);
    std::memset(e_.raddr, 0, sizeof e_.raddr);
    size_t i = 0;
    for (uint8_t b : l) e_.laddr[i++] = b;
    i = 0;
    for (uint8_t b : r) e_.raddr[i++] = b;
    return *this;
  }
  Ev& sk_flags(uint8_t f) {
    e_.sk_flags = f;
    return *this;
  }
  Ev& tcp_flags(uint8_t f) {
    e_.tcp_flags = f;
    return *this;
  }
  Ev& reason(uint32_t r) {
    e_.reason = r;
    return *this;
  }
  Ev& aux(uint64_t v) {
    e_.aux = v;
    return *this;
  }
  Ev& seg_len(uint32_t n) {
    e_.seg_len = n;
    return *this;
  }
  Ev& rx_queue(uint32_t n) {
    e_.rx_queue = n;
    return *this;
  }
  Ev& netns(uint32_t n) {
    e_.netns = n;
    return *this;
  }

  operator Event() const { return e_; }
  const Event& get() const { return e_; }

 private:
  static void v4(uint8_t* a, uint8_t x, uint8_t y, uint8_t z, uint8_t w) {
    a[0] = x;
    a[1] = y;
    a[2] = z;
    a[3] = w;
  }
  Event e_;
};

inline Ev State(uint64_t ts, uint64_t conn, uint8_t old_state, uint8_t new_state) {
  return Ev(TCPSCOPE_EV_STATE, ts, conn).states(old_state, new_state);
}
inline Ev Retransmit(uint64_t ts, uint64_t conn, uint8_t state, uint8_t flags, uint32_t bytes) {
  return Ev(TCPSCOPE_EV_RETRANSMIT, ts, conn).in(state).tcp_flags(flags).seg_len(bytes);
}
inline Ev ResetSent(uint64_t ts, uint64_t conn, uint8_t state, uint32_t reason) {
  return Ev(TCPSCOPE_EV_RESET_SENT, ts, conn).in(state).reason(reason);
}
inline Ev ResetReceived(uint64_t ts, uint64_t conn, uint8_t state) {
  return Ev(TCPSCOPE_EV_RESET_RECEIVED, ts, conn).in(state);
}
// An accepted socket's first I/O, by another process than its owner.
inline Ev Owner(uint64_t ts, uint64_t conn, uint8_t state, uint32_t pid, std::string_view comm) {
  return Ev(TCPSCOPE_EV_OWNER, ts, conn).in(state).owner(pid, comm, TCPSCOPE_OWNER_IO);
}
// count lost, `skipped` of them runs the kernel skipped.
inline Ev Lost(uint64_t ts, uint64_t count, uint64_t skipped = 0) {
  return Ev(TCPSCOPE_EV_LOST, ts, count).aux(skipped);
}
// An audit found conn gone, last seen in `state` since `since`.
inline Ev Vanished(uint64_t ts, uint64_t conn, uint8_t state, uint64_t since) {
  return Ev(TCPSCOPE_EV_VANISHED, ts, conn).in(state).aux(since);
}
inline Event End(uint64_t ts) {
  Event e;
  std::memset(&e, 0, sizeof e);
  e.type = TCPSCOPE_EV_END;
  e.ts_ns = ts;
  return e;
}

// enum sk_rst_reason values used by the tests.
inline constexpr uint32_t kRstNoSocket = 1;
inline constexpr uint32_t kRstAbortOnData = 8;
inline constexpr uint32_t kRstTimewaitSocket = 9;
inline constexpr uint32_t kRstAbortOnClose = 11;
inline constexpr uint32_t kRstTcpState = 14;

// A tracker that records every lifecycle it ends (copies: the originals are
// gone after the callback).
struct Recorder {
  explicit Recorder(TrackerLimits limits = {}) : tracker(limits) {
    tracker.on_end([this](const Connection& c) { ended.push_back(c); });
  }
  Tracked apply(const Event& ev) { return tracker.apply(ev); }
  // Applies all events, returns the prev_state_ns of each.
  std::vector<int64_t> run(std::initializer_list<Event> evs) {
    std::vector<int64_t> prev;
    for (const Event& e : evs) prev.push_back(tracker.apply(e).prev_state_ns);
    return prev;
  }

  Tracker tracker;
  std::vector<Connection> ended;
};

inline std::vector<uint8_t> history_states(const Connection& c) {
  std::vector<uint8_t> v;
  for (int i = 0; i < c.history_len; ++i) v.push_back(c.history_state(i));
  return v;
}
inline uint32_t bits(std::initializer_list<uint8_t> states) {
  uint32_t v = 0;
  for (uint8_t s : states) v |= 1u << s;
  return v;
}

// The analyzers of the core report, in report order (the default set may
// grow: exact-output tests pin this one).
inline void add_core_analyzers(Pipeline& p, int top_n = 10) {
  p.add_analyzer(std::make_unique<ConnectionsAnalyzer>());
  p.add_analyzer(std::make_unique<RetransmitAnalyzer>(top_n));
  p.add_analyzer(std::make_unique<LostAnalyzer>());
}

// An anonymous in-memory file for FdWriter; contents() reads it all back.
class MemFile {
 public:
  MemFile() : fd_(memfd_create("tcpscope-test", 0)) {}
  ~MemFile() {
    if (fd_ >= 0) close(fd_);
  }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  int fd() const { return fd_; }
  std::string contents() const {
    std::string s;
    char buf[4096];
    for (off_t off = 0;;) {
      const ssize_t n = pread(fd_, buf, sizeof buf, off);
      if (n <= 0) break;
      s.append(buf, static_cast<size_t>(n));
      off += n;
    }
    return s;
  }

 private:
  int fd_;
};

inline std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < s.size()) {
    const size_t nl = s.find('\n', start);
    if (nl == std::string::npos) {
      out.push_back(s.substr(start));
      break;
    }
    out.push_back(s.substr(start, nl - start));
    start = nl + 1;
  }
  return out;
}

}  // namespace tcpscope::test
