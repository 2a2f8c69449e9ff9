// Tracker: rebuilds one lifecycle per connection from kernel events. Pure:
// its only clock is the events' own time, so live tracing and a replay of a
// capture give the same lifecycles.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <string_view>
#include <unordered_map>

#include "tcpscope/event.hpp"

namespace tcpscope {

enum class OpenKind : uint8_t {
  Unknown,  // first seen mid-life (it existed before tcpscope started)
  Active,   // we called connect(): CLOSE -> SYN_SENT
  Passive,  // accepted from a listener: -> SYN_RECV
  Listen,   // a listening socket, not a connection
};

enum class CloseKind : uint8_t {
  Open,           // still open when the trace ended
  ActiveClose,    // we sent the first FIN (FIN_WAIT1)
  PassiveClose,   // the peer's FIN came first (CLOSE_WAIT -> LAST_ACK)
  Simultaneous,   // both FINs crossed (CLOSING)
  ResetSent,      // we answered the peer with a RST that ended it
  ResetReceived,  // the peer's RST ended it
  Aborted,        // we tore it down without FIN: SO_LINGER 0, close with
                  // unread data, connect timeout, tcp_abort
};
inline constexpr int kCloseKindCount = 7;

std::string_view open_kind_name(OpenKind kind);
std::string_view close_kind_name(CloseKind kind);

struct Connection {
  static constexpr int kHistory = 12;

  uint64_t id = 0;  // socket cookie
  uint32_t netns = 0;
  uint8_t family = 0;
  uint16_t lport = 0, rport = 0;
  std::array<uint8_t, 16> laddr{}, raddr{};

  // Owner, as the kernel side learnt it (never a softirq victim).
  uint32_t pid = 0;
  std::array<char, 16> comm{};
  uint8_t owner_src = TCPSCOPE_OWNER_NONE;

  OpenKind open_kind = OpenKind::Unknown;
  CloseKind close_kind = CloseKind::Open;
  uint8_t state = 0;          // current kernel state (0 = not known yet)
  uint64_t first_ns = 0;      // first event seen
  uint64_t state_since_ns = 0;
  uint64_t closed_ns = 0;     // transition to CLOSE, 0 while open
  uint8_t close_from = 0;     // state left for CLOSE
  uint8_t close_sk_flags = 0; // tcpscope_sk_flags at the CLOSE transition
  uint32_t visited = 0;       // bit (1 << state) for every state entered
  bool snapshot = false;      // found by the start-up snapshot (SNAPSHOT
                              // record): it predates the trace

  // The states in order, with entry times; the first kHistory only.
  std::array<uint64_t, kHistory> history_ns{};
  std::array<uint8_t, kHistory> history_state{};
  uint8_t history_len = 0;
  uint16_t history_dropped = 0;

  uint32_t retransmits = 0;
  uint64_t first_retransmit_ns = 0, last_retransmit_ns = 0;
  uint8_t last_retransmit_state = 0;
  uint16_t retransmit_states = 0;  // bit per state retransmitted in
  uint32_t fin_retransmits = 0;

  uint32_t resets_sent = 0, resets_received = 0;
  uint32_t last_reset_reason = 0;  // of the last reset we sent
  uint8_t last_reset_flags = 0;    // flags of the segment that drew it
  uint64_t last_reset_sent_ns = 0, last_reset_received_ns = 0;

  bool visited_state(uint8_t s) const { return visited & (1u << s); }
  bool is_closed() const { return closed_ns != 0; }
};

// What the tracker made of one event, for the analyzers and sinks.
struct Tracked {
  const Event* ev = nullptr;
  const Connection* conn = nullptr;  // null: no connection (lost, end, or a
                                     // reset for a socket never seen)
  int64_t prev_state_ns = -1;        // time spent in the state just left
                                     // (-1 if its entry was not seen)
};

struct TrackerLimits {
  // How long a closed connection waits for late events (the RST the kernel
  // sends after CLOSE on an abort, say) before its close kind is final.
  uint64_t close_grace_ns = 1'000'000'000;
  // Hard cap on tracked connections: beyond it the oldest closed ones are
  // finalised early and the least recently started open ones evicted.
  size_t max_connections = 1'000'000;
};

class Tracker {
 public:
  using EndFn = std::function<void(const Connection&)>;

  explicit Tracker(TrackerLimits limits = {}) : limits_(limits) {}

  // Called once for every connection when its lifecycle is final: after the
  // close grace, at finish(), or on eviction (close_kind Open).
  void on_end(EndFn fn) { on_end_ = std::move(fn); }

  Tracked apply(const Event& ev);
  // Ends the trace at end_ns: closed connections are final, open ones end
  // with close_kind Open.
  void finish(uint64_t end_ns);

  const Connection* find(uint64_t id) const;
  size_t size() const { return conns_.size(); }
  uint64_t evicted() const { return evicted_; }
  uint64_t last_ns() const { return last_ns_; }

  // The close kind a connection gets from what was seen of it.
  static CloseKind classify_close(const Connection& c);

 private:
  Connection& start(const Event& ev);
  void record_state(Connection& c, uint8_t state, uint64_t ts);
  void expire(uint64_t now_ns);
  void finalize(Connection& c);
  void enforce_cap();

  TrackerLimits limits_;
  EndFn on_end_;
  std::unordered_map<uint64_t, Connection> conns_;
  std::deque<std::pair<uint64_t, uint64_t>> closing_;  // (closed_ns, id)
  std::deque<std::pair<uint64_t, uint64_t>> started_;  // (first_ns, id)
  uint64_t evicted_ = 0;
  uint64_t last_ns_ = 0;
};

}  // namespace tcpscope
