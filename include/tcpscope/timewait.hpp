// TIME_WAIT reconstruction. The state tracepoint never shows TIME_WAIT: a
// socket entering it shows FIN_WAIT2/CLOSING -> CLOSE while a timewait sock,
// with the same cookie, takes its place in the hash. The tw sock's timer
// (TW_START/CANCEL/EXPIRE records) gives entry, kills and expiry exactly;
// without it, iter/tcp sweeps (TimeWaitSweep turns them into TW_SEEN/TW_GONE
// records) decide entries and bound ends, and a new connection's own event
// dates a recycled or reused tuple.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tcpscope/fifo.hpp"
#include "tcpscope/flat_hash_map.hpp"
#include "tcpscope/histogram.hpp"
#include "tcpscope/pipeline.hpp"
#include "tcpscope/slab.hpp"

namespace tcpscope {

// 4-tuple plus namespace, hashable.
struct TupleKey {
  uint32_t netns = 0;
  uint8_t family = 0;
  uint16_t lport = 0, rport = 0;
  std::array<uint8_t, 16> laddr{}, raddr{};
  bool operator==(const TupleKey&) const = default;
  static TupleKey of(const Connection& c);
  static TupleKey of(const Event& e);
  static TupleKey of(const SockRecord& r);
  // Writes the tuple into an event's fields (the inverse of of(Event)).
  void into(Event& e) const;
};
struct TupleKeyHash {
  size_t operator()(const TupleKey& k) const;
};

// A connection as notices show it, for one the tracker no longer holds.
Connection describe_connection(const TupleKey& k, uint64_t conn, uint32_t pid,
                               const std::array<char, 16>& comm);

// Diffs successive iter/tcp passes over timewait socks into records. A pass
// is streamed (no copy of its records): begin(), see() per record, settle()
// now and then, then finish(). A sighting (TW_SEEN) must come after the tw
// sock's CLOSE event, which the kernel reports just after the tw sock shows
// in the table: it is held until the events of its time have been read.
class TimeWaitSweep {
 public:
  using Emit = std::function<void(const Event&)>;
  // initial: the first pass at start-up (what it finds predates the trace);
  // report_new_initial: whether to report those (not when a pid/cgroup
  // filter hides owners).
  void begin(bool initial, bool report_new_initial);
  // One record of the pass; others than timewait socks are ignored.
  void see(const SockRecord& r);
  // Emits the sightings of records made before seen_before_ns: the caller
  // has read every event reported until then.
  void settle(uint64_t seen_before_ns, const Emit& emit);
  // Emits the rest once the events made during the pass are read: TW_SEEN
  // for the new and changed, TW_GONE for those it no longer saw, then SWEEP.
  void finish(uint64_t start_ns, uint64_t end_ns, uint32_t interval_ms, const Emit& emit);
  size_t known() const { return known_.size(); }

 private:
  // One per tw sock in the namespace: what later passes compare. Not its
  // tuple: that goes out once, with the first sighting; the analyses know a
  // tw sock by its cookie afterwards (24 bytes instead of 72: 100,000 tw
  // socks are a common sight).
  struct Known {
    uint64_t last_seen_ns = 0;
    uint64_t expires_ns = 0;
    uint32_t pass = 0;
    uint8_t substate = 0;
    bool pending = false;  // in to_report_
  };
  // A sighting to report at finish(): new (with its tuple) or changed.
  struct Report {
    uint64_t conn = 0;
    bool is_new = false;
    TupleKey tuple;  // of a new one
  };
  static Event record_of(uint64_t conn, const Known& k);
  std::unordered_map<uint64_t, Known> known_;
  // Held sightings, oldest first from to_report_head_ (settle() keeps it
  // short: a few milliseconds of a pass). Kept over a pass that failed and
  // so never finished.
  std::vector<Report> to_report_;
  size_t to_report_head_ = 0;
  uint32_t pass_ = 0;
  uint64_t seen_ = 0;
  bool initial_ = false;
  bool report_new_initial_ = true;
};

// "time_wait": counts, end causes, durations, active closers, port pressure.
class TimeWaitAnalyzer final : public Analyzer {
 public:
  explicit TimeWaitAnalyzer(int top_n) : top_n_(top_n) {}
  void on_event(const Tracked& t, NoticeOut& out) override;
  void on_end(const Connection& c, NoticeOut& out) override;
  void finish(uint64_t end_ns, NoticeOut& out) override;
  void write_json(JsonWriter& w, TimeFormatter& time) const override;
  void write_text(fmt::memory_buffer& out, TimeFormatter& time,
                  const TextStyle& style) const override;

  // NetnsExit: killed with its namespace (inet_twsk_purge), not by a segment.
  enum class EndCause : uint8_t { Expired, Recycled, Reused, Reset, NetnsExit, kCount };
  static std::string_view cause_name(EndCause c);

  // What became of the TIME_WAIT of a recently closed connection: what the
  // reset analysis needs to explain a late segment answered with a RST.
  enum class Fate : uint8_t { Open, Skipped, FinWait2Timeout, Expired, Killed };
  struct FateInfo {
    Fate fate = Fate::Open;
    uint64_t ts_ns = 0;  // when that happened
    uint64_t conn = 0;
    uint8_t substate = 0;  // of the tw sock (FIN_WAIT2: the peer never sent FIN)
    // Owner and local close of a connection whose tw sock ended (Killed,
    // Expired): it is in no other table by then.
    uint32_t pid = 0;
    std::array<char, 16> comm{};
    uint64_t local_close_ns = 0;
  };
  // Null if the tuple had no TIME_WAIT decision recently (10 minutes).
  const FateInfo* fate(const TupleKey& tuple) const;
  // Timewait socks open now.
  size_t open_count() const { return open_count_; }
  bool is_open(uint64_t conn) const { return open_find(conn) != nullptr; }
  struct Owner {
    uint64_t conn = 0;
    uint32_t pid = 0;
    std::array<char, 16> comm{};
    uint64_t local_close_ns = 0;  // the application's close (FIN_WAIT1)
  };
  // The owner of an open tw sock's connection.
  std::optional<Owner> open_owner(uint64_t conn) const;
  std::optional<Owner> open_owner_at(const TupleKey& tuple) const;

 private:
  struct Tw {
    uint64_t conn = 0;
    uint64_t entered_ns = 0;  // 0: predates the trace
    uint64_t expires_ns = 0;
    uint64_t cancel_ns = 0;   // timer cancelled: killed unless re-armed
    uint64_t tuple_hash = 0;  // TupleIndex::hash_of(tuple); 0: not yet known
    TupleKey tuple;
    uint8_t substate = kTcpTimeWait;
    bool client = false;  // we opened it: the local port is ephemeral
    uint32_t pid = 0;     // owner of the connection
    std::array<char, 16> comm{};
    uint32_t slot = 0;            // its index in the slab (open_add sets it); fills padding
    uint64_t local_close_ns = 0;  // FIN_WAIT1 entry, else entered_ns
  };
  // A tw timer armed for a tuple whose CLOSE event is next.
  struct Armed {
    uint64_t ts_ns = 0, expires_ns = 0;
    uint8_t substate = 0;
  };
  // A FIN_WAIT2/CLOSING -> CLOSE waiting for a sweep to tell whether a tw
  // sock took its place (when tw timers are not traced).
  struct PendingEntry {
    uint64_t close_ns = 0;
    uint64_t conn = 0;
    TupleKey tuple;
    bool client = false;
    bool fin_received = false;
    bool rst_sent = false;
    uint32_t pid = 0;
    std::array<char, 16> comm{};
  };
  struct EndpointStats {
    uint64_t entered = 0, open = 0;
    LogHistogram duration_us;
  };
  struct RemoteStats {
    uint64_t open = 0, peak = 0;
  };
  struct CloserStats {
    bool server = false;
    uint64_t connections = 0, local_first = 0, peer_first = 0, simultaneous = 0;
  };

  void set_fate(const TupleKey& tuple, Fate fate, uint64_t ts, uint64_t conn,
                const Tw* tw = nullptr);
  // The tw sock a connection closed at close_ns leaves (substate and
  // timer not set).
  Tw tw_of(const Connection& c, uint64_t close_ns) const;
  void enter(const Tracked& t, NoticeOut& out);
  void add_tw(const Tw& tw, const Connection* c, NoticeOut& out, bool preexisting);
  void not_entered(const Connection* c, const TupleKey& tuple, uint64_t conn, uint64_t ts,
                   bool fin_received, bool rst_sent, NoticeOut& out);
  void expire_pending(uint64_t now_ns, NoticeOut& out);
  void on_timer(const Event& e, NoticeOut& out);
  Tw* find(const Event& e);
  void end(uint64_t conn, uint64_t end_ns, EndCause cause, std::string_view method, NoticeOut& out);
  void end(Tw& tw, uint64_t end_ns, EndCause cause, std::string_view method, NoticeOut& out);

  // The open tw socks, by cookie and by tuple (the latest one added).
  const Tw* open_find(uint64_t conn) const;
  Tw* open_find(uint64_t conn) { return const_cast<Tw*>(std::as_const(*this).open_find(conn)); }
  const Tw* open_find_tuple(const TupleKey& tuple, uint64_t tuple_hash) const;
  Tw* open_find_tuple(const TupleKey& tuple, uint64_t tuple_hash) {
    return const_cast<Tw*>(std::as_const(*this).open_find_tuple(tuple, tuple_hash));
  }
  Tw& open_add(const Tw& tw);
  Tw& open_slot(uint32_t i) { return open_[i]; }
  const Tw& open_slot(uint32_t i) const { return open_[i]; }
  void open_erase(const Tw& tw);
  void on_tw_seen(const Event& e, NoticeOut& out);
  // A sweep saw the tw sock of a connection whose CLOSE found no tw timer
  // armed: the timer's record was lost. Enters it now; true if it was one.
  bool enter_unarmed(const Event& e, NoticeOut& out);
  // The open tw a sweep saw on tw's tuple by a cookie before tw's CLOSE
  // named it, renamed to tw.conn; null if none.
  Tw* sighting_named_by_cookie(const Tw& tw);
  // An id the BPF side made for a socket without a cookie (top bit set).
  static bool is_private_id(uint64_t conn) { return conn >> 63; }
  void on_tw_gone(const Event& e, NoticeOut& out);
  void on_new_connection(const Tracked& t, NoticeOut& out);
  void on_reset_sent(const Event& e, NoticeOut& out);
  // A FIN_WAIT2/CLOSING -> CLOSE with no tw timer armed (timers traced):
  // no TIME_WAIT, unless the connection sends a RST in the same instant
  // (an abort, not an overflow). Decided once kUnarmedWaitNs passed.
  struct Unarmed {
    Connection conn;  // copy: the tracker may finish it meanwhile
    uint64_t close_ns = 0;
    bool fin_received = false, rst_sent = false;
  };
  static constexpr uint64_t kUnarmedWaitNs = 1'000'000;
  std::deque<Unarmed> unarmed_;
  void settle_unarmed(uint64_t now_ns, NoticeOut& out);
  TupleKey endpoint_key(const TupleKey& t, bool client) const;
  static TupleKey remote_key(const TupleKey& t);
  bool is_ephemeral(uint16_t port) const {
    return port_lo_ && port >= port_lo_ && port <= port_hi_;
  }

  // Tables by tuple share the hasher: a tuple is hashed once for all.
  using TupleIndex = FlatHashMap<TupleKey, uint64_t, TupleKeyHash>;
  struct TupleAt {
    uint64_t ts_ns = 0;
    uint64_t hash = 0;
    TupleKey tuple;
  };

  int top_n_;
  bool timers_ = false, sweeping_ = false;
  // Open tw socks: records in a slab, found through compact indexes (a
  // table holding the records was the consumer's costliest cache misses).
  // Fixed-size chunks: growth never copies live records (a doubling vector
  // peaked at three times the live size), references stay valid, and
  // chunks emptied after a burst go back.
  ChunkedSlab<Tw> open_;
  size_t open_count_ = 0;
  HandleIndex open_by_conn_;
  HandleIndex open_by_tuple_;
  FlatHashMap<TupleKey, Armed, TupleKeyHash> armed_;
  Fifo<TupleAt> armed_order_;
  Fifo<std::pair<uint64_t, uint64_t>> cancels_;         // (cancel_ns, conn)
  std::unordered_map<uint64_t, PendingEntry> pending_;  // by conn
  std::deque<uint64_t> pending_order_;
  // Fates are written for every tw sock that ends but read only to explain
  // a rare reset: they go to a log, indexed by tuple only when asked.
  struct FateRecord {
    TupleKey tuple;
    FateInfo info;
  };
  Fifo<FateRecord> fate_log_;          // oldest first
  uint64_t fate_log_first_ = 0;        // sequence number of fate_log_.front()
  mutable TupleIndex fate_index_;      // tuple -> sequence number of its latest
  mutable uint64_t fate_indexed_ = 0;  // records before this one are indexed
  // Per local endpoint (client sockets: local port 0 = "ephemeral").
  std::unordered_map<TupleKey, EndpointStats, TupleKeyHash> endpoints_;
  std::unordered_map<TupleKey, RemoteStats, TupleKeyHash> remotes_;
  std::unordered_map<TupleKey, CloserStats, TupleKeyHash> closers_;
  static constexpr size_t kMaxKeys = 4096;  // per table; the rest is "other"
  uint64_t other_endpoints_ = 0;

  LogHistogram duration_us_;
  uint64_t entered_ = 0, skipped_ = 0, fin_wait2_timeouts_ = 0, preexisting_ = 0;
  uint64_t timer_starts_lost_ = 0;  // tw socks a sweep found, no TW_START seen
  uint64_t peak_ = 0, open_at_end_ = 0;
  std::array<uint64_t, static_cast<int>(EndCause::kCount)> ended_{};
  uint64_t exact_ends_ = 0, sweep_ends_ = 0;
  uint64_t first_ns_ = 0, end_ns_ = 0;
  uint16_t port_lo_ = 0, port_hi_ = 0;
  // Sweeps.
  uint64_t sweeps_ = 0, sweep_ns_total_ = 0, sweep_ns_max_ = 0, sweep_max_socks_ = 0;
  uint32_t sweep_interval_ms_ = 0;
};

}  // namespace tcpscope
