// The audit of open connections: which of the connections the tracker holds
// open are no longer in the kernel's socket table. Their CLOSE never came:
// the kernel did not run our programs for it (not always counted as a
// recursion miss), or its record was lost. Pure: the iter/tcp pass that
// lists the table is the caller's (user/live.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "tcpscope/event.hpp"
#include "tcpscope/tracker.hpp"

namespace tcpscope {

// A socket is hashed just after its first transition (connect(): SYN_SENT,
// listen(): LISTEN, an accepted child: SYN_RECV), so a connection in one of
// those states must have been in it this long to be judged.
inline constexpr uint64_t kAuditSettledNs = 500'000'000;
// In every other state it is in the table from before the transition until
// it leaves it for CLOSE, whose record the drain after the pass brings in.
// This covers only a transition in flight during the pass (microseconds),
// so that the audit at exit judges a connection whose last events came just
// before it.
inline constexpr uint64_t kAuditSettledHashedNs = 20'000'000;

// How long a connection must have been in `state` to be judged.
constexpr uint64_t audit_settle_ns(uint8_t state) {
  return state == kTcpSynSent || state == kTcpSynRecv || state == kTcpListen
             ? kAuditSettledNs
             : kAuditSettledHashedNs;
}

// Appends a TCPSCOPE_EV_VANISHED record (at pass_start_ns) to `out` for each
// open connection of namespace `netns` whose cookie is not in `present`
// (sorted: the cookies the pass, started at pass_start_ns, found) and that
// has been in its state since audit_settle_ns(state) before the pass. Connections
// of other namespaces, and ids that are not cookies (top bit set), are not
// judged. The ring buffer must have been drained after the pass: a socket
// that left the table during it has its CLOSE in the tracker by then.
void find_vanished(const Tracker& tracker, std::span<const uint64_t> present, uint32_t netns,
                   uint64_t pass_start_ns, std::vector<Event>& out);

// Every reset the kernel sends passes the tcp_send_reset tracepoint and is
// counted in its namespace's TcpOutRsts (/proc/net/snmp): fewer RESET_SENT
// records from the namespace than the counter grew by are resets the trace
// lost without knowing it (the kernel did not run our program). Only
// meaningful when no filter other than the namespace drops records.
class ResetCountCheck {
 public:
  // `base`: the counter read once the programs were attached (resets just
  // before may then be seen, never the other way round).
  explicit ResetCountCheck(uint64_t base) : base_(base), previous_(base) {}
  void seen() { ++seen_; }
  // A later reading of the counter, the ring drained after it; `known_lost`:
  // reset records already counted lost (ring full, skipped runs), read
  // after the drain. Judged is the previous reading: a reset is counted a
  // little before its record is made (tcp_send_active_reset), so the latest
  // may be ahead. Returns the resets newly found missing.
  uint64_t judge(uint64_t count, uint64_t known_lost) {
    const uint64_t judged = previous_;
    previous_ = count;
    return judge_against(judged, known_lost);
  }
  // The last reading, taken a while before the final drain.
  uint64_t judge_final(uint64_t count, uint64_t known_lost) {
    return judge_against(count, known_lost);
  }
  uint64_t missing() const { return reported_; }

 private:
  uint64_t judge_against(uint64_t count, uint64_t known_lost) {
    const uint64_t sent = count > base_ ? count - base_ : 0;
    const uint64_t accounted = seen_ + known_lost;
    const uint64_t missing = sent > accounted ? sent - accounted : 0;
    if (missing <= reported_) return 0;
    const uint64_t fresh = missing - reported_;
    reported_ = missing;
    return fresh;
  }
  uint64_t base_, previous_, seen_ = 0, reported_ = 0;
};

// TcpOutRsts from the text of /proc/net/snmp; nullopt if absent.
std::optional<uint64_t> parse_tcp_out_rsts(std::string_view snmp);

}  // namespace tcpscope
