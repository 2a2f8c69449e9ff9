// Resets: every RST sent or received gets a cause, and every RST that
// answered a FIN or data arriving after the local close (the seed problem:
// the closer kept no TIME_WAIT to absorb a late FIN) is listed with the
// connection it belonged to, its owner and how long after the close it came.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <map>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tcpscope/pipeline.hpp"
#include "tcpscope/timewait.hpp"

namespace tcpscope {

class ResetAnalyzer final : public Analyzer {
 public:
  // tw: the TIME_WAIT analyzer of the same pipeline (registered before this
  // one), asked what became of a closed connection's TIME_WAIT.
  ResetAnalyzer(const TimeWaitAnalyzer* tw, int top_n) : tw_(tw), top_n_(top_n) {}

  void on_event(const Tracked& t, NoticeOut& out) override;
  // RSTs that answered a late FIN or data so far (listed or not).
  size_t late_fin_count() const { return late_fins_.size() + late_fins_dropped_; }
  void write_json(JsonWriter& w, TimeFormatter& time) const override;
  void write_text(fmt::memory_buffer& out, TimeFormatter& time,
                  const TextStyle& style) const override;

  // A closed connection, remembered to explain resets for its tuple.
  struct Closed {
    uint64_t conn = 0;
    uint64_t closed_ns = 0;       // CLOSE transition
    uint64_t local_close_ns = 0;  // the application's close: FIN_WAIT1 or
                                  // LAST_ACK entry, else closed_ns
    uint32_t pid = 0;
    std::array<char, 16> comm{};
    std::string_view own_rst_cause;  // cause of the RST it sent itself
  };
  struct LateFin {
    uint64_t ts_ns = 0;
    uint64_t conn = 0;
    TupleKey tuple;
    uint32_t pid = 0;
    std::array<char, 16> comm{};
    int64_t since_close_ms = -1;
    std::string_view cause;
    uint32_t reason = 0;
    uint8_t seg_flags = 0;
    uint32_t seg_len = 0;
    // The peer's reset_received, when both ends are traced (loopback).
    uint64_t peer_conn = 0;
    uint8_t peer_state = 0;
    uint32_t peer_pid = 0;
    std::array<char, 16> peer_comm{};
  };

 private:
  void on_close(const Connection& c, uint64_t ts);
  void on_reset_sent(const Tracked& t, NoticeOut& out);
  void on_reset_received(const Tracked& t, NoticeOut& out);
  std::string_view cause_without_socket(const Event& e, const Closed* closed) const;
  void count(std::map<std::string_view, uint64_t>& by, std::string_view cause);

  const TimeWaitAnalyzer* tw_;
  int top_n_;
  std::unordered_map<TupleKey, Closed, TupleKeyHash> closed_;
  Fifo<std::pair<uint64_t, TupleKey>> closed_order_;
  // Resets sent recently, by the tuple of the socket that will receive them
  // (our tuple reversed), to pair with the peer's reset_received.
  struct Sent {
    uint64_t ts_ns = 0;
    std::string_view cause;
    size_t late_fin = SIZE_MAX;  // index in late_fins_
  };
  std::unordered_map<TupleKey, Sent, TupleKeyHash> sent_;
  Fifo<std::pair<uint64_t, TupleKey>> sent_order_;

  // A reset_received whose reset_sent may still come: on loopback the RST
  // is delivered inside the sender's call, before its tracepoint fires.
  struct PendingReceived {
    uint64_t ts_ns = 0;
    uint8_t state = 0;
    Connection conn;  // copy: the tracker may finish it meanwhile
  };
  std::deque<PendingReceived> pending_received_;
  void settle_received(const PendingReceived& p, std::string_view cause, NoticeOut& out);
  void flush_received(uint64_t now_ns, NoticeOut& out);

 public:
  void finish(uint64_t end_ns, NoticeOut& out) override;

 private:
  uint64_t sent_total_ = 0, received_total_ = 0;
  std::map<std::string_view, uint64_t> sent_by_cause_, received_by_cause_;
  std::vector<LateFin> late_fins_;
  uint64_t late_fins_dropped_ = 0;
};

}  // namespace tcpscope
