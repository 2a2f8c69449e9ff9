// Analyzers and the Pipeline that drives them.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tcpscope/analyzers.hpp"
#include "tcpscope/pipeline.hpp"
#include "test_events.hpp"

namespace tcpscope {
namespace {

using namespace tcpscope::test;
using nlohmann::json;

struct NullOut : NoticeOut {
  void notice(const Notice&) override {}
};

Connection conn(uint64_t id, OpenKind open, CloseKind close) {
  Connection c;
  c.id = id;
  c.family = 4;
  c.open_kind = open;
  c.close_kind = close;
  return c;
}

template <typename A>
std::string json_of(const A& a, int64_t offset = 0) {
  fmt::memory_buffer buf;
  JsonWriter w(buf);
  TimeFormatter tf(offset);
  w.begin_object();
  a.write_json(w, tf);
  w.end_object();
  return fmt::to_string(buf);
}

template <typename A>
std::string text_of(const A& a, int top = 10) {
  fmt::memory_buffer buf;
  TimeFormatter tf(0);
  TextStyle style;
  style.top = top;
  a.write_text(buf, tf, style);
  return fmt::to_string(buf);
}

// ---- ConnectionsAnalyzer -------------------------------------------------------

TEST(ConnectionsAnalyzer, CountsByOpenAndCloseKind) {
  ConnectionsAnalyzer a;
  NullOut out;
  a.on_end(conn(1, OpenKind::Active, CloseKind::ActiveClose), out);
  a.on_end(conn(2, OpenKind::Active, CloseKind::ResetSent), out);
  a.on_end(conn(3, OpenKind::Passive, CloseKind::PassiveClose), out);
  a.on_end(conn(4, OpenKind::Passive, CloseKind::Aborted), out);
  a.on_end(conn(5, OpenKind::Unknown, CloseKind::Open), out);
  a.on_end(conn(6, OpenKind::Listen, CloseKind::Aborted), out);  // listener
  a.on_end(conn(7, OpenKind::Listen, CloseKind::Open), out);
  EXPECT_EQ(a.total(), 5u);
  EXPECT_EQ(json_of(a),
            R"({"connections":{"total":5,"by_open":{"active":2,"passive":2,"unknown":1},)"
            R"("by_close":{"open":1,"active_close":1,"passive_close":1,"simultaneous":0,)"
            R"("reset_sent":1,"reset_received":0,"aborted":1,"vanished":0},"listeners":2,)"
            R"("evicted":0}})");
  EXPECT_EQ(text_of(a),
            "\nConnections: 5 (active open 2, passive open 2, seen mid-life 1); "
            "listeners: 2\n"
            "  closed by: active_close 1, passive_close 1, simultaneous 0, reset_sent 1, "
            "reset_received 0, aborted 1, vanished 0; still open 1\n");
}

TEST(ConnectionsAnalyzer, Empty) {
  ConnectionsAnalyzer a;
  EXPECT_EQ(a.total(), 0u);
  EXPECT_EQ(json_of(a),
            R"({"connections":{"total":0,"by_open":{"active":0,"passive":0,"unknown":0},)"
            R"("by_close":{"open":0,"active_close":0,"passive_close":0,"simultaneous":0,)"
            R"("reset_sent":0,"reset_received":0,"aborted":0,"vanished":0},"listeners":0,)"
            R"("evicted":0}})");
}

// Open connections the tracker dropped at its cap are said: their later
// events come back as new connections seen mid-life.
TEST(ConnectionsAnalyzer, SaysWhatTheTrackerEvicted) {
  Pipeline p(TrackerLimits{.close_grace_ns = ms(1), .max_connections = 2});
  auto owned = std::make_unique<ConnectionsAnalyzer>();
  const ConnectionsAnalyzer& a = *owned;
  p.add_analyzer(std::move(owned));
  for (uint64_t i = 1; i <= 3; ++i) p.process(State(ms(i), 700 + i, kTcpClose, kTcpSynSent));
  p.finish(ms(10));
  EXPECT_EQ(a.total(), 3u);
  EXPECT_NE(json_of(a).find(R"("by_close":{"open":3,)"), std::string::npos) << json_of(a);
  EXPECT_NE(json_of(a).find(R"("listeners":0,"evicted":1}})"), std::string::npos) << json_of(a);
  EXPECT_NE(text_of(a).find("; still open 3\n  1 of them evicted: dropped while open, the "
                            "tracker full; their later events count as connections seen "
                            "mid-life\n"),
            std::string::npos)
      << text_of(a);
}

// ---- RetransmitAnalyzer ----------------------------------------------------------

Connection rtx(uint64_t id, uint32_t count) {
  Connection c = conn(id, OpenKind::Active, CloseKind::ActiveClose);
  c.retransmits = count;
  return c;
}

std::vector<uint64_t> top_ids(const RetransmitAnalyzer& a) {
  std::vector<uint64_t> ids;
  for (const auto& r : a.top()) ids.push_back(r.conn.id);
  return ids;
}

TEST(RetransmitAnalyzer, TopIsMostFirstTieByIdCapped) {
  // Every insertion order gives the same top.
  std::vector<std::pair<uint64_t, uint32_t>> in = {{3, 5}, {1, 7}, {2, 5}, {4, 1}, {5, 0}};
  std::sort(in.begin(), in.end());
  int orders = 0;
  do {
    RetransmitAnalyzer two(2), three(3), all(10);
    NullOut out;
    for (auto [id, n] : in) {
      two.on_end(rtx(id, n), out);
      three.on_end(rtx(id, n), out);
      all.on_end(rtx(id, n), out);
    }
    EXPECT_EQ(top_ids(two), (std::vector<uint64_t>{1, 2}));
    EXPECT_EQ(top_ids(three), (std::vector<uint64_t>{1, 2, 3}));
    EXPECT_EQ(top_ids(all), (std::vector<uint64_t>{1, 2, 3, 4}));
    const auto rows = all.top();
    ASSERT_EQ(rows.size(), 4u);
    EXPECT_EQ(rows[0].count, 7u);
    EXPECT_EQ(rows[1].count, 5u);
    EXPECT_EQ(rows[2].count, 5u);
    EXPECT_EQ(rows[3].count, 1u);
    const json j = json::parse(json_of(two));
    EXPECT_EQ(j["retransmits"]["total"], 18);
    EXPECT_EQ(j["retransmits"]["connections"], 4);
    ASSERT_EQ(j["retransmits"]["top"].size(), 2u);
    EXPECT_EQ(j["retransmits"]["top"][0]["conn"], 1);
    EXPECT_EQ(j["retransmits"]["top"][1]["conn"], 2);
    ++orders;
  } while (std::next_permutation(in.begin(), in.end()));
  EXPECT_EQ(orders, 120);
}

// What a connection's retransmits were is kept only until it ends: the next
// lifecycle under the same id starts afresh.
TEST(RetransmitAnalyzer, DetailEndsWithItsConnection) {
  RetransmitAnalyzer a(5);
  NullOut out;
  const Connection first = rtx(3, 1);
  const Event fin = Retransmit(ms(10), 3, kTcpFinWait1, TCPSCOPE_TCP_FIN, 0);
  Tracked t;
  t.ev = &fin;
  t.conn = &first;
  a.on_event(t, out);
  a.on_end(first, out);
  const Connection again = rtx(3, 1);
  const Event syn = Retransmit(ms(20), 3, kTcpSynSent, TCPSCOPE_TCP_SYN, 0);
  t.ev = &syn;
  t.conn = &again;
  a.on_event(t, out);
  a.on_end(again, out);
  const auto rows = a.top();
  ASSERT_EQ(rows.size(), 2u);
  for (const auto& r : rows) {
    EXPECT_EQ(r.first_ns, r.last_ns);
    EXPECT_EQ(r.fin, r.last_state == kTcpFinWait1 ? 1u : 0u);
    EXPECT_EQ(r.states, 1u << r.last_state);
  }
}

TEST(RetransmitAnalyzer, ZeroTopKeepsTotals) {
  RetransmitAnalyzer a(0);
  NullOut out;
  a.on_end(rtx(1, 3), out);
  a.on_end(rtx(2, 4), out);
  EXPECT_TRUE(a.top().empty());
  EXPECT_EQ(json_of(a), R"({"retransmits":{"total":7,"connections":2,"top":[]}})");
  EXPECT_EQ(text_of(a), "\nRetransmits: 7 on 2 connections\n");
}

TEST(RetransmitAnalyzer, RowJsonAndText) {
  Connection c = rtx(9, 7);
  c.lport = 40000;
  c.rport = 80;
  c.laddr = {10, 0, 0, 1};
  c.raddr = {10, 0, 0, 2};
  c.pid = 42;
  std::memcpy(c.comm.data(), "curl", 4);
  Connection other = rtx(10, 1);
  other.family = 6;
  other.laddr[15] = 1;
  other.raddr[15] = 1;
  other.lport = 5;
  other.rport = 6;

  RetransmitAnalyzer a(5);
  NullOut out;
  // What each retransmit was comes from its event (the count, from the
  // tracker's Connection).
  const auto seen = [&](const Connection& of, const Event& e) {
    Tracked t;
    t.ev = &e;
    t.conn = &of;
    a.on_event(t, out);
  };
  seen(c, Retransmit(ms(1000), 9, kTcpEstablished, TCPSCOPE_TCP_ACK, 100));
  for (int i = 0; i < 4; ++i)
    seen(c, Retransmit(ms(2000 + i), 9, kTcpEstablished, TCPSCOPE_TCP_ACK, 100));
  seen(c, Retransmit(ms(2400), 9, kTcpFinWait1, TCPSCOPE_TCP_FIN | TCPSCOPE_TCP_ACK, 0));
  seen(c, Retransmit(ms(2500), 9, kTcpFinWait1, TCPSCOPE_TCP_FIN | TCPSCOPE_TCP_ACK, 0));
  seen(other, Retransmit(0, 10, kTcpSynSent, TCPSCOPE_TCP_SYN, 0));
  a.on_end(other, out);
  a.on_end(c, out);
  EXPECT_EQ(json_of(a),
            R"({"retransmits":{"total":8,"connections":2,"top":[)"
            R"({"conn":9,"family":4,"laddr":"10.0.0.1","lport":40000,"raddr":"10.0.0.2",)"
            R"("rport":80,"pid":42,"comm":"curl","count":7,"fin":2,)"
            R"("first":"1970-01-01T00:00:01.000000000Z","last":"1970-01-01T00:00:02.500000000Z",)"
            R"("last_state":"FIN_WAIT1","states":["ESTABLISHED","FIN_WAIT1"]},)"
            R"({"conn":10,"family":6,"laddr":"::1","lport":5,"raddr":"::1","rport":6,)"
            R"("pid":0,"comm":"","count":1,"fin":0,"first":"1970-01-01T00:00:00.000000000Z",)"
            R"("last":"1970-01-01T00:00:00.000000000Z","last_state":"SYN_SENT",)"
            R"("states":["SYN_SENT"]}]}})");
  EXPECT_EQ(text_of(a),
            "\nRetransmits: 8 on 2 connections\n"
            "       7  10.0.0.1:40000 -> 10.0.0.2:80  pid 42 curl  last in FIN_WAIT1 (2 FIN)\n"
            "       1  ::1:5 -> ::1:6  pid 0   last in SYN_SENT\n");
  // The text style caps the rows shown.
  EXPECT_EQ(text_of(a, 1),
            "\nRetransmits: 8 on 2 connections\n"
            "       7  10.0.0.1:40000 -> 10.0.0.2:80  pid 42 curl  last in FIN_WAIT1 (2 FIN)\n");
}

// ---- LostAnalyzer ----------------------------------------------------------------

// Hands each event to the analyzer, as the tracker reports it for no
// connection it knows.
void feed(LostAnalyzer& a, std::initializer_list<const Event*> events) {
  NullOut out;
  Tracked t;
  for (const Event* e : events) {
    t.ev = e;
    a.on_event(t, out);
  }
}

TEST(LostAnalyzer, SumsLostRecords) {
  LostAnalyzer a;
  const Event lost1 = Lost(ms(1), 3, 1), lost2 = Lost(ms(2), 5);
  const Event st = State(ms(3), 8, kTcpClose, kTcpSynSent);  // conn 8: not a count
  feed(a, {&lost1, &st, &lost2});
  EXPECT_EQ(a.lost(), 8u);
  EXPECT_EQ(json_of(a), R"({"lost_events":8,"lost_kernel_skipped":1,"lost_resets_missing":0,)"
                        R"("lost_vanished":0,"lost_gaps":0})");
  EXPECT_EQ(text_of(a),
            "\nLost events: 8\n  7 ring buffer full: raise --ring-size\n  1 runs of tcpscope's "
            "programs the kernel skipped (an interrupt hit the tracepoint again while one "
            "ran); their socket is unknown\n");
  LostAnalyzer none;
  EXPECT_EQ(text_of(none), "\nLost events: 0\n");
  EXPECT_EQ(json_of(none), R"({"lost_events":0,"lost_kernel_skipped":0,"lost_resets_missing":0,)"
                           R"("lost_vanished":0,"lost_gaps":0})");
}

// Vanished connections are counted apart from lost events: how many events
// each lost is unknown. One the tracker did not know (t.conn null) is none.
TEST(LostAnalyzer, CountsVanishedConnectionsApart) {
  LostAnalyzer a;
  NullOut out;
  const Event gone = Vanished(ms(5), 9, kTcpFinWait1, ms(1));
  const Connection c;
  Tracked t;
  t.ev = &gone;
  t.conn = &c;
  a.on_event(t, out);
  t.conn = nullptr;
  a.on_event(t, out);
  EXPECT_EQ(a.lost(), 0u);
  EXPECT_EQ(json_of(a), R"({"lost_events":0,"lost_kernel_skipped":0,"lost_resets_missing":0,)"
                        R"("lost_vanished":1,"lost_gaps":0})");
  EXPECT_EQ(text_of(a),
            "\nLost events: 0\n  1 connections vanished: gone from the kernel's socket table "
            "at an audit, their last events never seen\n");
}

TEST(LostAnalyzer, CountsGaps) {
  LostAnalyzer a;
  NullOut out;
  const Event st = State(ms(5), 9, kTcpCloseWait, kTcpLastAck);
  Tracked t;
  t.ev = &st;
  a.on_event(t, out);
  t.gap = true;
  a.on_event(t, out);
  EXPECT_EQ(json_of(a), R"({"lost_events":0,"lost_kernel_skipped":0,"lost_resets_missing":0,)"
                        R"("lost_vanished":0,"lost_gaps":1})");
  EXPECT_EQ(text_of(a),
            "\nLost events: 0\n  1 transitions from another state than the last one seen, or "
            "retransmits past the kernel's count: those between were lost\n");
}

// A capture is untrusted: a record claiming more skipped runs than it lost
// counts no more than it lost.
TEST(LostAnalyzer, SkippedNeverExceedsLost) {
  LostAnalyzer a;
  const Event bad = Lost(ms(1), 2, 9);
  feed(a, {&bad});
  EXPECT_EQ(json_of(a), R"({"lost_events":2,"lost_kernel_skipped":2,"lost_resets_missing":0,)"
                        R"("lost_vanished":0,"lost_gaps":0})");
}

// Resets the kernel counted as sent with no record (reason RESET_SENT) are
// counted with the kernel-skipped runs and said apart: no program run is
// known to have missed them.
TEST(LostAnalyzer, SaysMissingResetsApart) {
  LostAnalyzer a;
  Event missing = Lost(ms(1), 2, 2);
  missing.reason = TCPSCOPE_EV_RESET_SENT;
  const Event skipped = Lost(ms(2), 3, 3);
  feed(a, {&missing, &skipped});
  EXPECT_EQ(json_of(a), R"({"lost_events":5,"lost_kernel_skipped":5,"lost_resets_missing":2,)"
                        R"("lost_vanished":0,"lost_gaps":0})");
  EXPECT_EQ(text_of(a),
            "\nLost events: 5\n  3 runs of tcpscope's programs the kernel skipped (an "
            "interrupt hit the tracepoint again while one ran); their socket is unknown\n"
            "  2 resets the kernel counted as sent (OutRsts) that no record "
            "reported\n");
}

// ---- Pipeline --------------------------------------------------------------------

struct CountingSink : Sink {
  void on_event(const Tracked& t) override { types.push_back(t.ev->type); }
  void on_notice(const Notice& n) override { notices.emplace_back(n.type); }
  void on_report(const Pipeline&, uint64_t end_ns) override {
    ++reports;
    report_end = end_ns;
  }
  void flush() override { ++flushes; }
  std::vector<uint8_t> types;
  std::vector<std::string> notices;
  int reports = 0, flushes = 0;
  uint64_t report_end = 0;
};

// Emits a notice for each ended connection.
struct NoticeAnalyzer : Analyzer {
  void on_end(const Connection& c, NoticeOut& out) override {
    Notice n;
    n.type = "ended";
    n.ts_ns = c.closed_ns;
    n.conn = &c;
    out.notice(n);
  }
  void finish(uint64_t, NoticeOut& out) override {
    Notice n;
    n.type = "finished";
    out.notice(n);
  }
  void write_json(JsonWriter&, TimeFormatter&) const override {}
  void write_text(fmt::memory_buffer&, TimeFormatter&, const TextStyle&) const override {}
};

std::string report_json(const Pipeline& p) {
  fmt::memory_buffer buf;
  JsonWriter w(buf);
  TimeFormatter tf(0);
  w.begin_object();
  p.write_report_json(w, tf);
  w.end_object();
  return fmt::to_string(buf);
}

// One lifecycle of every kind, a listener, lost records and an END.
std::vector<Event> every_kind() {
  return {
      // 1: active open, active close
      State(ms(1), 1, kTcpClose, kTcpSynSent).lport(0).owner(42, "curl"),
      State(ms(2), 1, kTcpSynSent, kTcpEstablished),
      Retransmit(ms(3), 1, kTcpEstablished, TCPSCOPE_TCP_ACK | TCPSCOPE_TCP_PSH, 100),
      State(ms(10), 1, kTcpEstablished, kTcpFinWait1).owner(42, "curl"),
      Retransmit(ms(11), 1, kTcpFinWait1, TCPSCOPE_TCP_FIN | TCPSCOPE_TCP_ACK, 0),
      State(ms(12), 1, kTcpFinWait1, kTcpFinWait2),
      State(ms(13), 1, kTcpFinWait2, kTcpClose),
      // 2: passive open, passive close
      State(ms(20), 2, kTcpListen, kTcpSynRecv)
          .lport(80)
          .owner(7, "nginx", TCPSCOPE_OWNER_LISTENER),
      State(ms(21), 2, kTcpSynRecv, kTcpEstablished).lport(80),
      State(ms(22), 2, kTcpEstablished, kTcpCloseWait).lport(80),
      State(ms(23), 2, kTcpCloseWait, kTcpLastAck).lport(80).owner(7, "nginx"),
      State(ms(24), 2, kTcpLastAck, kTcpClose).lport(80),
      // 3: simultaneous
      State(ms(30), 3, kTcpClose, kTcpSynSent),
      State(ms(31), 3, kTcpSynSent, kTcpEstablished),
      State(ms(32), 3, kTcpEstablished, kTcpFinWait1),
      State(ms(33), 3, kTcpFinWait1, kTcpClosing),
      State(ms(34), 3, kTcpClosing, kTcpClose),
      // 4: reset received
      State(ms(40), 4, kTcpClose, kTcpSynSent),
      State(ms(41), 4, kTcpSynSent, kTcpEstablished),
      ResetReceived(ms(42), 4, kTcpEstablished),
      State(ms(42), 4, kTcpEstablished, kTcpClose),
      // 5: data after close: reset sent
      State(ms(50), 5, kTcpClose, kTcpSynSent),
      State(ms(51), 5, kTcpSynSent, kTcpEstablished),
      State(ms(52), 5, kTcpEstablished, kTcpFinWait1),
      State(ms(53), 5, kTcpFinWait1, kTcpFinWait2),
      ResetReceived(ms(54), 5, kTcpFinWait2),
      State(ms(54), 5, kTcpFinWait2, kTcpClose),
      ResetSent(ms(54), 5, kTcpClose, kRstAbortOnData).tcp_flags(TCPSCOPE_TCP_ACK).seg_len(3),
      // 6: SO_LINGER 0
      State(ms(60), 6, kTcpListen, kTcpSynRecv).lport(80),
      State(ms(61), 6, kTcpSynRecv, kTcpEstablished).lport(80),
      State(ms(62), 6, kTcpEstablished, kTcpClose).lport(80),
      ResetSent(ms(62), 6, kTcpClose, kRstTcpState).lport(80),
      Lost(ms(63), 3),
      // 7: mid-life, still open; 8: listener
      Retransmit(ms(70), 7, kTcpEstablished, TCPSCOPE_TCP_ACK, 10),
      Retransmit(ms(71), 7, kTcpEstablished, TCPSCOPE_TCP_ACK, 10),
      Retransmit(ms(72), 7, kTcpEstablished, TCPSCOPE_TCP_ACK, 10),
      State(ms(80), 8, kTcpClose, kTcpListen).lport(80).owner(7, "nginx"),
      // no socket: not a connection
      ResetSent(ms(85), 0, kTcpClose, kRstNoSocket).sk_flags(TCPSCOPE_SK_NO_SOCKET),
      Lost(ms(90), 5),
      End(ms(100)),
  };
}

TEST(Pipeline, EveryKindReport) {
  Pipeline p;
  add_core_analyzers(p, 2);
  CountingSink sink;
  p.add_sink(&sink);
  const auto evs = every_kind();
  for (const Event& e : evs) p.process(e);
  EXPECT_TRUE(p.finished());
  EXPECT_EQ(p.events(), evs.size() - 3);  // not the two LOST and the END
  EXPECT_EQ(p.tracker().size(), 0u);
  EXPECT_EQ(sink.types.size(), evs.size() - 1);  // the END is not an event line
  EXPECT_EQ(sink.reports, 1);
  EXPECT_EQ(sink.flushes, 1);
  EXPECT_EQ(sink.report_end, ms(100));

  const std::string got = report_json(p);
  EXPECT_EQ(got,
            R"({"connections":{"total":7,"by_open":{"active":4,"passive":2,"unknown":1},)"
            R"("by_close":{"open":1,"active_close":1,"passive_close":1,"simultaneous":1,)"
            R"("reset_sent":1,"reset_received":1,"aborted":1,"vanished":0},"listeners":1,)"
            R"("evicted":0},)"
            R"("retransmits":{"total":5,"connections":2,"top":[)"
            R"({"conn":7,"family":4,"laddr":"10.0.0.1","lport":40000,"raddr":"10.0.0.2",)"
            R"("rport":80,"pid":0,"comm":"","count":3,"fin":0,)"
            R"("first":"1970-01-01T00:00:00.070000000Z","last":"1970-01-01T00:00:00.072000000Z",)"
            R"("last_state":"ESTABLISHED","states":["ESTABLISHED"]},)"
            R"({"conn":1,"family":4,"laddr":"10.0.0.1","lport":40000,"raddr":"10.0.0.2",)"
            R"("rport":80,"pid":42,"comm":"curl","count":2,"fin":1,)"
            R"("first":"1970-01-01T00:00:00.003000000Z","last":"1970-01-01T00:00:00.011000000Z",)"
            R"("last_state":"FIN_WAIT1","states":["ESTABLISHED","FIN_WAIT1"]}]},)"
            R"("lost_events":8,"lost_kernel_skipped":0,"lost_resets_missing":0,)"
            R"("lost_vanished":0,"lost_gaps":0})");
  EXPECT_TRUE(json::accept(got));

  // Processing after the end changes nothing.
  p.process(State(ms(200), 99, kTcpClose, kTcpSynSent));
  p.finish(ms(300));
  EXPECT_EQ(p.events(), evs.size() - 3);
  EXPECT_EQ(sink.reports, 1);
  EXPECT_EQ(report_json(p), got);
}

TEST(Pipeline, FinishEndsAtTheLastEventAtLeast) {
  Pipeline p;
  add_core_analyzers(p);
  CountingSink sink;
  p.add_sink(&sink);
  p.process(State(ms(50), 1, kTcpClose, kTcpSynSent));
  EXPECT_FALSE(p.finished());
  p.finish(ms(10));
  EXPECT_TRUE(p.finished());
  EXPECT_EQ(sink.report_end, ms(50));
  EXPECT_EQ(p.events(), 1u);
}

TEST(Pipeline, NoticesReachTheSinks) {
  Pipeline p;
  p.add_analyzer(std::make_unique<NoticeAnalyzer>());
  CountingSink sink;
  p.add_sink(&sink);
  p.process(State(ms(1), 1, kTcpClose, kTcpSynSent));
  p.process(State(ms(2), 1, kTcpSynSent, kTcpClose));
  p.process(State(ms(3), 2, kTcpClose, kTcpSynSent));
  EXPECT_TRUE(sink.notices.empty());
  p.process(State(ms(1003), 2, kTcpSynSent, kTcpEstablished));  // 1 is final
  EXPECT_EQ(sink.notices, (std::vector<std::string>{"ended"}));
  p.finish(ms(2000));
  EXPECT_EQ(sink.notices, (std::vector<std::string>{"ended", "ended", "finished"}));
}

TEST(Pipeline, GraceDecidesWhenAnalyzersSeeTheEnd) {
  TrackerLimits lim;
  lim.close_grace_ns = ms(100);
  Pipeline p(lim);
  auto owned = std::make_unique<ConnectionsAnalyzer>();
  ConnectionsAnalyzer* conns = owned.get();
  p.add_analyzer(std::move(owned));
  p.process(State(ms(1), 1, kTcpClose, kTcpSynSent));
  p.process(State(ms(2), 1, kTcpSynSent, kTcpClose));
  p.process(Lost(ms(102), 1));
  EXPECT_EQ(conns->total(), 0u);
  p.process(Lost(ms(102) + 1, 1));
  EXPECT_EQ(conns->total(), 1u);
}

}  // namespace
}  // namespace tcpscope
