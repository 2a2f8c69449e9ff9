// Report sections for the core tracer: connections, retransmits, lost events.
#pragma once

#include <cstdint>
#include <vector>

#include "tcpscope/flat_hash_map.hpp"
#include "tcpscope/pipeline.hpp"

namespace tcpscope {

// Identity of a connection as reports print it (copied: the connection itself
// is gone by report time).
struct ConnSummary {
  uint64_t id = 0;
  uint8_t family = 0;
  uint16_t lport = 0, rport = 0;
  std::array<uint8_t, 16> laddr{}, raddr{};
  uint32_t pid = 0;
  std::array<char, 16> comm{};

  static ConnSummary of(const Connection& c);
};

// "connections": totals by open and close kind.
class ConnectionsAnalyzer final : public Analyzer {
 public:
  void on_end(const Connection& c, NoticeOut&) override;
  void write_json(JsonWriter& w, TimeFormatter& time) const override;
  void write_text(fmt::memory_buffer& out, TimeFormatter& time,
                  const TextStyle& style) const override;

  uint64_t total() const { return total_; }

 private:
  uint64_t total_ = 0;
  uint64_t listeners_ = 0;
  uint64_t evicted_ = 0;
  std::array<uint64_t, 4> by_open_{};
  std::array<uint64_t, kCloseKindCount> by_close_{};
};

// "retransmits": total and the connections that retransmitted most.
class RetransmitAnalyzer final : public Analyzer {
 public:
  explicit RetransmitAnalyzer(int top_n) : top_n_(top_n) {}
  void on_event(const Tracked& t, NoticeOut&) override;
  void on_end(const Connection& c, NoticeOut&) override;
  void write_json(JsonWriter& w, TimeFormatter& time) const override;
  void write_text(fmt::memory_buffer& out, TimeFormatter& time,
                  const TextStyle& style) const override;

  struct Row {
    ConnSummary conn;
    uint32_t count = 0;
    uint32_t fin = 0;
    uint64_t first_ns = 0, last_ns = 0;
    uint8_t last_state = 0;
    uint16_t states = 0;
  };
  // Sorted: most retransmits first, then by connection id.
  std::vector<Row> top() const;

 private:
  // Of a connection's retransmits, what only this report shows (the count
  // is the tracker's), kept here until it ends: a Connection is what
  // 100,000 open connections cost, and few of them retransmit.
  struct Detail {
    uint64_t first_ns = 0, last_ns = 0;
    uint32_t fin = 0;
    uint16_t states = 0;  // bit per state retransmitted in
    uint8_t last_state = 0;
  };
  int top_n_;
  uint64_t total_ = 0;
  uint64_t connections_ = 0;
  std::vector<Row> rows_;                  // at most top_n_, a min-heap on count
  FlatHashMap<uint64_t, Detail> details_;  // by connection id, while it lasts
};

// "lost_events": events the kernel could not queue (ring buffer full) plus
// runs of our programs the kernel skipped ("lost_kernel_skipped" of them).
class LostAnalyzer final : public Analyzer {
 public:
  void on_event(const Tracked& t, NoticeOut&) override;
  void write_json(JsonWriter& w, TimeFormatter& time) const override;
  void write_text(fmt::memory_buffer& out, TimeFormatter& time,
                  const TextStyle& style) const override;
  uint64_t lost() const { return lost_; }

 private:
  uint64_t lost_ = 0;
  uint64_t skipped_ = 0;  // part of lost_
  // Part of skipped_: resets the kernel counted as sent (OutRsts) in the
  // traced namespace that no record came for.
  uint64_t resets_missing_ = 0;
  // Connections an audit found gone with their end unseen; their lost
  // events are not in lost_ (how many, and whether a skipped run was one
  // of them, is unknown).
  uint64_t vanished_ = 0;
  // Transitions that came from another state than the last one seen: the
  // ones between were lost (at least one each; not in lost_ either).
  uint64_t gaps_ = 0;
};

}  // namespace tcpscope
