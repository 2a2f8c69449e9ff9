// Tracker: rebuilds one lifecycle per connection from kernel events. Pure:
// its only clock is the events' own time, so live tracing and a replay of a
// capture give the same lifecycles.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <vector>

#include "tcpscope/event.hpp"
#include "tcpscope/fifo.hpp"
#include "tcpscope/flat_hash_map.hpp"
#include "tcpscope/slab.hpp"

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
  Vanished,       // gone from the kernel's socket table, its end unseen
                  // (an audit found it: its last events were lost)
};
inline constexpr int kCloseKindCount = 8;

std::string_view open_kind_name(OpenKind kind);
std::string_view close_kind_name(CloseKind kind);

struct Connection {
  // States entered, 4 bits each (kernel TCP states are below 16).
  static constexpr int kHistory = 16;

  // Laid out by use: the first cache line holds all that every event and
  // classify_close() read; the history and the retransmit figures, written
  // once per state or retransmit, come last.
  uint64_t id = 0;        // socket cookie
  uint64_t first_ns = 0;  // first event seen
  uint64_t state_since_ns = 0;
  uint64_t closed_ns = 0;  // transition to CLOSE, 0 while open
  uint64_t last_reset_sent_ns = 0, last_reset_received_ns = 0;
  uint32_t visited = 0;                           // bit (1 << state) for every state entered
  uint16_t resets_sent = 0, resets_received = 0;  // saturating
  uint32_t retrans_total = 0;  // the kernel's total_retrans at the last retransmit
  uint8_t state = 0;           // current kernel state (0 = not known yet)
  uint8_t close_from = 0;      // state left for CLOSE
  OpenKind open_kind = OpenKind::Unknown;
  CloseKind close_kind = CloseKind::Open;

  uint32_t last_reset_reason = 0;  // of the last reset we sent
  uint32_t netns = 0;
  // Owner, as the kernel side learnt it (never a softirq victim).
  uint32_t pid = 0;
  uint16_t lport = 0, rport = 0;
  uint8_t family = 0;
  uint8_t owner_src = TCPSCOPE_OWNER_NONE;
  uint8_t close_sk_flags = 0;    // tcpscope_sk_flags at the CLOSE transition
  bool vanished = false;         // an audit found it gone (TCPSCOPE_EV_VANISHED)
  bool snapshot = false;         // found by the start-up snapshot (SNAPSHOT
                                 // record): it predates the trace
  bool evicted = false;          // dropped while open, the tracker full
                                 // (TrackerLimits::max_connections)
  uint8_t last_reset_flags = 0;  // flags of the segment that drew it
  uint8_t history_len = 0;
  uint16_t history_dropped = 0;
  std::array<char, 16> comm{};
  std::array<uint8_t, 16> laddr{};
  uint32_t retransmits = 0;  // read by every connection's end; the rest of
                             // what they were is RetransmitAnalyzer's
  std::array<uint8_t, 16> raddr{};

  // The states in order, the first kHistory only (history_state(i)). Of
  // entry times only those the analyses ask for are kept: a Connection is
  // most of what 100,000 open connections cost.
  uint64_t history = 0;
  uint64_t fin_wait1_ns = 0;  // first entry into FIN_WAIT1 (the local close), 0: never
  uint64_t last_ack_ns = 0;   // first entry into LAST_ACK, 0: never

  uint8_t history_state(int i) const { return (history >> (4 * i)) & 0xf; }
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
  bool gap = false;                  // a transition from a state other than the one last
                                     // seen, or the first one seen of a socket born after
                                     // the start-up snapshot leaves neither CLOSE nor
                                     // LISTEN: those before were lost
};

struct TrackerLimits {
  // How long a closed connection waits for late events (the RST the kernel
  // sends after CLOSE on an abort, say) before its close kind is final.
  // Those come within microseconds, in the same call; a longer wait only
  // keeps more closed connections in the table (80,000 at 40k connections/s
  // with 1 s, many megabytes: each lookup a cache miss) and delays their
  // end lines.
  uint64_t close_grace_ns = 200'000'000;
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
  // Every connection still open (no CLOSE seen), in slot order.
  template <typename Fn>
  void for_each_open(Fn&& fn) const {
    for (uint32_t i = 0; i < slab_.used(); ++i) {
      const Connection& c = slot(i);
      if (c.id && !c.is_closed()) fn(c);
    }
  }
  size_t size() const { return index_.size(); }
  // Chunks of connection slots held (memory: kChunk connections each).
  size_t chunks() const { return slab_.chunks(); }
  uint64_t evicted() const { return evicted_; }
  uint64_t last_ns() const { return last_ns_; }

  // The close kind a connection gets from what was seen of it.
  static CloseKind classify_close(const Connection& c);

 private:
  static constexpr uint32_t kNoSlot = UINT32_MAX;
  // Starts ev.conn's lifecycle in slot `existing` (its previous one, now
  // final) or, if kNoSlot, in a new slot, which it returns.
  uint32_t start(const Event& ev, uint32_t existing);
  void record_state(Connection& c, uint8_t state, uint64_t ts);
  // ev, the first event seen of its socket, says its opening ones were lost.
  bool lost_opening(const Event& ev) const;
  void expire(uint64_t now_ns);
  void finalize(Connection& c);
  void enforce_cap();
  // A tw sock record (timer or sweep) of a connection that still looks open
  // and is not about to close: its close was lost; it ends, with a gap.
  void close_replaced(const Event& ev, Tracked& out);
  // The connection in the slot ended at ts_ns, leaving state from: final
  // once the close grace has passed (expire).
  void mark_closed(uint32_t slot_index, uint64_t ts_ns, uint8_t from);

  static void take_owner(Connection& c, const Event& ev);
  Connection* lookup(uint64_t id);
  uint32_t slot_of(uint64_t id) const;  // kNoSlot if not tracked
  void forget(uint32_t slot_index);
  Connection& slot(uint32_t i) { return slab_[i]; }
  const Connection& slot(uint32_t i) const { return slab_[i]; }

  // A lifecycle in a queue: stale once its slot's generation moved on (the
  // connection ended or started again), told without a hash lookup.
  struct LifecycleRef {
    uint64_t ts_ns = 0;
    uint32_t slot = 0;
    uint32_t generation = 0;
  };
  LifecycleRef ref(uint64_t ts_ns, uint32_t slot) const {
    return {ts_ns, slot, generations_[slot]};
  }
  bool stale(const LifecycleRef& r) const { return generations_[r.slot] != r.generation; }

  TrackerLimits limits_;
  EndFn on_end_;
  // Connections live in a slab, found by cookie through a flat index: no
  // allocation per connection, and a Connection's address stays valid while
  // others come and go (a Tracked outlives evictions it causes). Its zero
  // pages are free slots (id 0).
  ChunkedSlab<Connection> slab_;
  HandleIndex index_;                  // cookie -> slot
  std::vector<uint32_t> generations_;  // per slot: lifecycles begun or ended
  Fifo<LifecycleRef> closing_;         // by closed_ns
  Fifo<LifecycleRef> started_;         // by first_ns
  uint64_t evicted_ = 0;
  uint64_t last_ns_ = 0;
  // When the start-up snapshot ended (TCPSCOPE_EV_SNAPSHOT_END), 0 before
  // or without one: a socket first seen by a later event was born after it.
  uint64_t snapshot_end_ns_ = 0;
};

}  // namespace tcpscope
