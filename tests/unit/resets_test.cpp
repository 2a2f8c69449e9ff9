// ResetAnalyzer on synthetic event sequences: every cause, pairing of a
// reset_sent with the peer's reset_received in both orders, the
// late_fin_resets list and its bound.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tcpscope/pipeline.hpp"
#include "tcpscope/resets.hpp"
#include "tcpscope/timewait.hpp"
#include "test_events.hpp"

namespace tcpscope {
namespace {

using namespace tcpscope::test;
using nlohmann::json;

constexpr uint32_t kClientPid = 100, kServerPid = 200;

// Notices as JSON-like records (strings copied: notices do not outlive the
// call).
struct Collected {
  std::string type;
  uint64_t ts_ns = 0;
  uint64_t conn = 0;
  uint32_t pid = 0;
  json fields = json::object();
};

class Collector : public Sink {
 public:
  void on_notice(const Notice& n) override {
    Collected c;
    c.type = std::string(n.type);
    c.ts_ns = n.ts_ns;
    if (n.conn) {
      c.conn = n.conn->id;
      c.pid = n.conn->pid;
    }
    for (int i = 0; i < n.nfields; ++i) {
      const auto& f = n.fields[i];
      if (f.is_text)
        c.fields[std::string(f.key)] = std::string(f.text);
      else if (f.is_bool)
        c.fields[std::string(f.key)] = f.number != 0;
      else
        c.fields[std::string(f.key)] = f.number;
    }
    all.push_back(c);
  }
  std::vector<Collected> of(const std::string& type) const {
    std::vector<Collected> v;
    for (const auto& c : all)
      if (c.type == type) v.push_back(c);
    return v;
  }
  std::vector<Collected> all;
};

// A pipeline with the TIME_WAIT analysis the reset analysis consults.
struct Rig {
  explicit Rig(bool timers = true, bool sweeps = false) {
    auto tw = std::make_unique<TimeWaitAnalyzer>(10);
    auto rs = std::make_unique<ResetAnalyzer>(tw.get(), 10);
    resets = rs.get();
    time_wait = tw.get();
    p.add_analyzer(std::move(tw));
    p.add_analyzer(std::move(rs));
    p.add_sink(&sink);
    Event cfg = Ev(TCPSCOPE_EV_CONFIG, 1, 0);
    cfg.reason = 32768;
    cfg.seg_len = 60999;
    cfg.aux = (timers ? TCPSCOPE_CONFIG_TW_TIMERS : 0) | (sweeps ? TCPSCOPE_CONFIG_TW_SWEEP : 0);
    p.process(cfg);
  }
  void run(std::initializer_list<Event> evs) {
    for (const Event& e : evs) p.process(e);
  }
  json report() const {
    fmt::memory_buffer buf;
    JsonWriter w(buf);
    TimeFormatter tf(0);
    w.begin_object();
    resets->write_json(w, tf);
    w.end_object();
    return json::parse(fmt::to_string(buf));
  }
  std::string text(int top = 10) const {
    fmt::memory_buffer buf;
    TimeFormatter tf(0);
    TextStyle style;
    style.top = top;
    resets->write_text(buf, tf, style);
    return fmt::to_string(buf);
  }
  json time_wait_report() const {
    fmt::memory_buffer buf;
    JsonWriter w(buf);
    TimeFormatter tf(0);
    w.begin_object();
    time_wait->write_json(w, tf);
    w.end_object();
    return json::parse(fmt::to_string(buf)).at("time_wait");
  }
  Pipeline p;
  Collector sink;
  ResetAnalyzer* resets = nullptr;
  TimeWaitAnalyzer* time_wait = nullptr;
};

// The client 10.0.0.1:40000 -> 10.0.0.2:80 (conn 1, pid 100 "cli") and the
// server side of it (conn 2, pid 200 "srv").
Ev Client(Ev e) { return e.owner(kClientPid, "cli"); }
Ev Server(Ev e) {
  return e.owner(kServerPid, "srv").laddr4(10, 0, 0, 2).raddr4(10, 0, 0, 1).lport(80).rport(40000);
}

// The client opens, closes first at 10 ms (FIN_WAIT1), its FIN acked at 11 ms.
void client_closes(Rig& r) {
  r.run({Client(State(ms(1), 1, kTcpClose, kTcpSynSent)),
         Client(State(ms(2), 1, kTcpSynSent, kTcpEstablished)),
         Client(State(ms(10), 1, kTcpEstablished, kTcpFinWait1)),
         Client(State(ms(11), 1, kTcpFinWait1, kTcpFinWait2))});
}
// Its tw timer armed (substate), then FIN_WAIT2 -> CLOSE.
void client_enters_tw(Rig& r, uint8_t substate, uint64_t expires) {
  Event start = Ev(TCPSCOPE_EV_TW_START, ms(11) + 100, 1).states(0, substate);
  start.aux = expires;
  r.run({start, Client(State(ms(11) + 200, 1, kTcpFinWait2, kTcpClose))});
}
// No tw sock: FIN_WAIT2 -> CLOSE with no timer armed.
void client_skips_tw(Rig& r) { r.run({Client(State(ms(11) + 200, 1, kTcpFinWait2, kTcpClose))}); }

// The server's FIN meeting no socket: the RST tcp_send_reset reports.
Ev LateFinRst(uint64_t ts) {
  return ResetSent(ts, 0, 0, kRstNoSocket)
      .sk_flags(TCPSCOPE_SK_NO_SOCKET)
      .tcp_flags(TCPSCOPE_TCP_FIN | TCPSCOPE_TCP_ACK);
}
Ev ServerGetsRst(uint64_t ts, uint8_t state = kTcpLastAck) {
  return Server(ResetReceived(ts, 2, state));
}

json late_entry(uint64_t ts_ms, const std::string& cause, const std::string& reason,
                const std::string& flags, uint32_t seg_len, int64_t since, json peer) {
  TimeFormatter tf(0);
  return json{{"time", std::string(tf.rfc3339(ms(ts_ms)))},
              {"conn", 1},
              {"family", 4},
              {"laddr", "10.0.0.1"},
              {"lport", 40000},
              {"raddr", "10.0.0.2"},
              {"rport", 80},
              {"pid", kClientPid},
              {"comm", "cli"},
              {"since_close_ms", since},
              {"cause", cause},
              {"reason", reason},
              {"seg_flags", flags},
              {"seg_len", seg_len},
              {"peer", peer}};
}
json server_peer(const std::string& state) {
  return json{{"conn", 2}, {"state", state}, {"pid", kServerPid}, {"comm", "srv"}};
}

json counts(uint64_t sent, json sent_by, uint64_t received, json received_by,
            uint64_t dropped = 0) {
  return json{{"sent", {{"total", sent}, {"by_cause", sent_by}}},
              {"received", {{"total", received}, {"by_cause", received_by}}},
              {"late_fin_dropped", dropped}};
}

// ---- a tw timer start the kernel never reported ---------------------------------

// The sweep's first sighting of the client's tw sock (its tuple included).
Ev TwSeen(uint64_t ts) {
  return Ev(TCPSCOPE_EV_TW_SEEN, ts, 1).states(kTcpTimeWait, kTcpTimeWait).aux(ms(60'011));
}

// The client's CLOSE with no timer armed, then the sweep's sighting at
// seen_ns: the TIME_WAIT is entered at the CLOSE, its timer start counted
// lost, no skip left. Returns the time_wait_enter notices.
std::vector<Collected> tw_seen_after_unarmed_close(Rig& r, uint64_t seen_ns) {
  client_closes(r);
  client_skips_tw(r);
  r.run({TwSeen(seen_ns), End(ms(600))});
  const auto enters = r.sink.of("time_wait_enter");
  EXPECT_EQ(enters.size(), 1u);
  for (const auto& e : enters) {
    EXPECT_EQ(e.conn, 1u);
    EXPECT_EQ(e.ts_ns, ms(11) + 200);
  }
  const json t = r.time_wait_report();
  EXPECT_EQ(t.at("entered"), 1) << t.dump();
  EXPECT_EQ(t.at("skipped"), 0) << t.dump();
  EXPECT_EQ(t.at("timer_starts_lost"), 1) << t.dump();
  EXPECT_EQ(t.at("open"), 1) << t.dump();
  return enters;
}

// The CLOSE found no timer armed and was taken for an overflow; the sweep
// then finds the tw sock: it was a TIME_WAIT whose timer record was lost.
TEST(TimeWaitAnalyzer, SweepFindsTheTwSockOfASkippedTimeWait) {
  Rig r;
  tw_seen_after_unarmed_close(r, ms(500));
  EXPECT_EQ(r.sink.of("time_wait_skipped").size(), 1u);  // said before the sweep
  fmt::memory_buffer buf;
  TimeFormatter tf(0);
  r.time_wait->write_text(buf, tf, TextStyle{});
  const std::string text = fmt::to_string(buf);
  EXPECT_NE(text.find("1 tw timer starts never seen"), std::string::npos) << text;
}

// How TIME_WAIT ends are observed, as the report says it: with neither the
// tw timers nor sweeps they are not, and no error bound is claimed.
TEST(TimeWaitAnalyzer, EndMethodSaysWhenEndsAreNotObserved) {
  const auto text_of = [](const Rig& r) {
    fmt::memory_buffer buf;
    TimeFormatter tf(0);
    r.time_wait->write_text(buf, tf, TextStyle{});
    return fmt::to_string(buf);
  };
  Rig none(false, false);
  json m = none.time_wait_report().at("end_method");
  EXPECT_EQ(m.at("method"), "none") << m.dump();
  EXPECT_TRUE(m.at("max_error_ms").is_null()) << m.dump();
  EXPECT_NE(text_of(none).find("; ends not observed (no tw timers, no sweeps)\n"),
            std::string::npos)
      << text_of(none);

  Rig sweeps(false, true);
  Event sweep = Ev(TCPSCOPE_EV_SWEEP, 2, 0);
  sweep.seg_len = 1000;  // the interval, ms
  sweeps.run({sweep});
  m = sweeps.time_wait_report().at("end_method");
  EXPECT_EQ(m.at("method"), "sweep") << m.dump();
  EXPECT_EQ(m.at("max_error_ms"), 500) << m.dump();
  EXPECT_NE(text_of(sweeps).find("; end times by sweep (every 1000 ms, error <= 500 ms)\n"),
            std::string::npos)
      << text_of(sweeps);

  Rig timers(true, true);
  m = timers.time_wait_report().at("end_method");
  EXPECT_EQ(m.at("method"), "timer") << m.dump();
  EXPECT_EQ(m.at("max_error_ms"), 0) << m.dump();
}

// The sighting comes before the CLOSE without timer is decided: no skip is
// ever said.
TEST(TimeWaitAnalyzer, SweepFindsTheTwSockBeforeTheSkipIsDecided) {
  Rig r;
  const auto enters = tw_seen_after_unarmed_close(r, ms(11) + 200 + 500'000);
  EXPECT_TRUE(r.sink.of("time_wait_skipped").empty());
  ASSERT_EQ(enters.size(), 1u);
  EXPECT_EQ(enters[0].pid, kClientPid);  // from the connection, still at hand
}

// A tw sock of another connection on the tuple, or one seen with no skip to
// undo, is not taken for ours.
TEST(TimeWaitAnalyzer, SweepSightingOfAStrangerUndoesNoSkip) {
  Rig r;
  client_closes(r);
  client_skips_tw(r);
  Event other = TwSeen(ms(500));
  other.conn = 9;
  r.run({other, End(ms(600))});
  EXPECT_TRUE(r.sink.of("time_wait_enter").empty());
  const json t = r.time_wait_report();
  EXPECT_EQ(t.at("skipped"), 1) << t.dump();
  EXPECT_EQ(t.at("timer_starts_lost"), 0) << t.dump();
}

// ---- a sweep that names a tw sock before its CLOSE does (private ids) -------------

// Without BTF-typed arguments the BPF side gives a socket without a cookie an
// id of its own (top bit set), and names its tw sock by tuple from the CLOSE
// on. A sweep reading the tw sock before that CLOSE makes it a cookie.
constexpr uint64_t kPrivateId = (1ull << 63) | 1;
constexpr uint64_t kSweepCookie = 77;

void private_client_closes(Rig& r) {
  r.run({Client(State(ms(1), kPrivateId, kTcpClose, kTcpSynSent)),
         Client(State(ms(2), kPrivateId, kTcpSynSent, kTcpEstablished)),
         Client(State(ms(10), kPrivateId, kTcpEstablished, kTcpFinWait1)),
         Client(State(ms(11), kPrivateId, kTcpFinWait1, kTcpFinWait2))});
}
Ev PrivateClose() { return Client(State(ms(11) + 200, kPrivateId, kTcpFinWait2, kTcpClose)); }
// The tw timer armed in the hash dance, before any cookie was made.
Ev StartWithoutCookie() {
  return Ev(TCPSCOPE_EV_TW_START, ms(11) + 100, 0).states(0, kTcpTimeWait).aux(ms(60'011));
}
Ev CookieSighting(uint64_t ts, bool initial = true) {
  return Ev(TCPSCOPE_EV_TW_SEEN, ts, kSweepCookie)
      .states(kTcpTimeWait, kTcpTimeWait)
      .aux(ms(60'011))
      .sk_flags(TCPSCOPE_SK_TIMEWAIT | (initial ? TCPSCOPE_SK_SNAPSHOT : 0));
}
// The next sweep finds the tw sock by our id, not by the cookie.
Ev CookieGone(uint64_t ts) {
  return Ev(TCPSCOPE_EV_TW_GONE, ts, kSweepCookie)
      .states(kTcpTimeWait, kTcpTimeWait)
      .aux(ms(60'011))
      .seg_len(100'000)
      .sk_flags(TCPSCOPE_SK_TIMEWAIT);
}

// One TIME_WAIT entered at the CLOSE, under our id, still open; nothing
// taken for older than the trace or ended.
void expect_one_tw_of_the_trace(const Rig& r) {
  const auto enters = r.sink.of("time_wait_enter");
  ASSERT_EQ(enters.size(), 1u);
  EXPECT_EQ(enters[0].conn, kPrivateId);
  EXPECT_EQ(enters[0].ts_ns, ms(11) + 200);
  EXPECT_TRUE(r.sink.of("time_wait_end").empty());
  const json t = r.time_wait_report();
  EXPECT_EQ(t.at("entered"), 1) << t.dump();
  EXPECT_EQ(t.at("preexisting"), 0) << t.dump();
  EXPECT_EQ(t.at("open"), 1) << t.dump();
  EXPECT_EQ(t.at("skipped"), 0) << t.dump();
  for (const auto& [cause, n] : t.at("ended").items()) EXPECT_EQ(n, 0) << cause;
}

TEST(TimeWaitAnalyzer, CookieSightingAfterTheTimerStartIsTheArmedTwSock) {
  Rig r;
  private_client_closes(r);
  r.run({StartWithoutCookie(), CookieSighting(ms(11) + 150), PrivateClose(), CookieGone(ms(1000)),
         End(ms(1100))});
  expect_one_tw_of_the_trace(r);
}

// The sighting read before the start: the start is not taken for its re-arm.
TEST(TimeWaitAnalyzer, CookieSightingBeforeTheTimerStartIsRenamedAtTheClose) {
  Rig r;
  private_client_closes(r);
  r.run({CookieSighting(ms(11) + 50), StartWithoutCookie(), PrivateClose(), CookieGone(ms(1000)),
         End(ms(1100))});
  expect_one_tw_of_the_trace(r);
}

TEST(TimeWaitAnalyzer, CookieSightingAfterTheCloseIsTheSameTwSock) {
  Rig r;
  private_client_closes(r);
  r.run({StartWithoutCookie(), PrivateClose(), CookieSighting(ms(11) + 300), CookieGone(ms(1000)),
         End(ms(1100))});
  expect_one_tw_of_the_trace(r);
}

// Without tw timers the next sweep's sighting under our id enters it.
TEST(TimeWaitAnalyzer, CookieSightingBeforeTheCloseIsRenamedBySweeps) {
  Rig r(false, true);
  private_client_closes(r);
  Event ours = CookieSighting(ms(1000), false);
  ours.conn = kPrivateId;
  r.run({CookieSighting(ms(11) + 50), PrivateClose(), ours, CookieGone(ms(1000)), End(ms(1100))});
  expect_one_tw_of_the_trace(r);
}

// A tw sock that predates the trace, on another tuple, stays one.
TEST(TimeWaitAnalyzer, CookieSightingOnAnotherTupleStaysPreexisting) {
  Rig r;
  private_client_closes(r);
  Event older = CookieSighting(ms(11) + 50);
  older.lport = 40001;
  r.run({older, StartWithoutCookie(), PrivateClose(), End(ms(1100))});
  const json t = r.time_wait_report();
  EXPECT_EQ(t.at("entered"), 1) << t.dump();
  EXPECT_EQ(t.at("preexisting"), 1) << t.dump();
  EXPECT_EQ(t.at("open"), 2) << t.dump();
}

// ---- the seed scenario, both pairing orders ---------------------------------------

TEST(ResetAnalyzer, NoTimeWaitLateFinSentThenReceived) {
  Rig r;
  client_closes(r);
  client_skips_tw(r);
  r.run({LateFinRst(ms(510)), ServerGetsRst(ms(510) + 20'000), End(ms(600))});

  EXPECT_EQ(r.sink.of("time_wait_skipped").size(), 1u);
  const auto sent = r.sink.of("reset_sent");
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0].conn, 1u);
  EXPECT_EQ(sent[0].pid, kClientPid);
  EXPECT_EQ(sent[0].fields, (json{{"state", "NONE"},
                                  {"reason", "NO_SOCKET"},
                                  {"cause", "no_time_wait"},
                                  {"seg_flags", "FIN|ACK"},
                                  {"seg_len", 0},
                                  {"no_socket", true},
                                  {"since_close_ms", 500}}));
  const auto received = r.sink.of("reset_received");
  ASSERT_EQ(received.size(), 1u);
  EXPECT_EQ(received[0].conn, 2u);
  EXPECT_EQ(received[0].pid, kServerPid);
  EXPECT_EQ(received[0].ts_ns, ms(510) + 20'000);
  EXPECT_EQ(received[0].fields, (json{{"state", "LAST_ACK"}, {"cause", "no_time_wait"}}));

  const json rep = r.report();
  EXPECT_EQ(rep.at("resets"), counts(1, {{"no_time_wait", 1}}, 1, {{"no_time_wait", 1}}));
  EXPECT_EQ(rep.at("late_fin_resets"),
            json::array({late_entry(510, "no_time_wait", "NO_SOCKET", "FIN|ACK", 0, 500,
                                    server_peer("LAST_ACK"))}));
  const std::string text = r.text();
  EXPECT_NE(text.find("Resets: 1 sent, 1 received"), std::string::npos) << text;
  EXPECT_NE(text.find("sent by cause: no_time_wait 1"), std::string::npos) << text;
  EXPECT_NE(text.find("10.0.0.1:40000 <- 10.0.0.2:80  pid 100 cli  500 ms after close  "
                      "[FIN|ACK]  cause no_time_wait; peer pid 200 srv reset in LAST_ACK"),
            std::string::npos)
      << text;
}

TEST(ResetAnalyzer, NoTimeWaitLateFinReceivedBeforeSent) {
  // Loopback: the RST is delivered inside the sender's call, before its
  // tracepoint fires.
  Rig r;
  client_closes(r);
  client_skips_tw(r);
  r.run({ServerGetsRst(ms(510)), LateFinRst(ms(510) + 15'000), End(ms(600))});

  const auto received = r.sink.of("reset_received");
  ASSERT_EQ(received.size(), 1u);
  EXPECT_EQ(received[0].conn, 2u);
  EXPECT_EQ(received[0].ts_ns, ms(510));
  EXPECT_EQ(received[0].fields, (json{{"state", "LAST_ACK"}, {"cause", "no_time_wait"}}));
  const json rep = r.report();
  EXPECT_EQ(rep.at("resets"), counts(1, {{"no_time_wait", 1}}, 1, {{"no_time_wait", 1}}));
  ASSERT_EQ(rep.at("late_fin_resets").size(), 1u);
  EXPECT_EQ(rep.at("late_fin_resets")[0].at("peer"), server_peer("LAST_ACK"));
}

TEST(ResetAnalyzer, ReceivedWithoutLocalSenderIsPeerResetOrNoListener) {
  Rig r;
  // A RST from a remote peer in ESTABLISHED, and one answering our SYN.
  r.run({Server(ResetReceived(ms(5), 2, kTcpEstablished)),
         Client(ResetReceived(ms(6), 1, kTcpSynSent)).rport(81)});
  EXPECT_TRUE(r.sink.of("reset_received").empty()) << "held while the sender may come";
  r.run({Lost(ms(9), 0)});  // time passes: 2 ms without the sender
  const auto received = r.sink.of("reset_received");
  ASSERT_EQ(received.size(), 2u);
  EXPECT_EQ(received[0].conn, 2u);
  EXPECT_EQ(received[0].fields.at("cause"), "peer_reset");
  EXPECT_EQ(received[1].conn, 1u);
  EXPECT_EQ(received[1].fields.at("cause"), "no_listener");
  // A sender too late to pair is not paired.
  r.run({LateFinRst(ms(2000)), End(ms(2001))});
  EXPECT_EQ(r.sink.of("reset_received").size(), 2u);
  EXPECT_EQ(r.report().at("resets").at("received"),
            (json{{"total", 2}, {"by_cause", {{"no_listener", 1}, {"peer_reset", 1}}}}));
}

TEST(ResetAnalyzer, PendingReceivedIsSettledAtTheEnd) {
  Rig r;
  r.run({Server(ResetReceived(ms(5), 2, kTcpEstablished)), End(ms(5))});
  const auto received = r.sink.of("reset_received");
  ASSERT_EQ(received.size(), 1u);
  EXPECT_EQ(received[0].fields.at("cause"), "peer_reset");
}

TEST(ResetAnalyzer, SynToClosedPortIsNoListener) {
  Rig r;
  // The client's SYN to 10.0.0.2:81; the RST's tuple is the segment's, seen
  // from the side that had no socket.
  r.run({ResetSent(ms(5), 0, 0, kRstNoSocket)
             .sk_flags(TCPSCOPE_SK_NO_SOCKET)
             .tcp_flags(TCPSCOPE_TCP_SYN)
             .laddr4(10, 0, 0, 2)
             .raddr4(10, 0, 0, 1)
             .lport(81)
             .rport(40000),
         Client(ResetReceived(ms(5) + 10'000, 1, kTcpSynSent)).rport(81), End(ms(10))});
  const auto sent = r.sink.of("reset_sent");
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0].conn, 0u);
  EXPECT_EQ(sent[0].fields.at("cause"), "no_listener");
  EXPECT_EQ(sent[0].fields.at("seg_flags"), "SYN");
  EXPECT_FALSE(sent[0].fields.contains("since_close_ms"));
  const auto received = r.sink.of("reset_received");
  ASSERT_EQ(received.size(), 1u);
  EXPECT_EQ(received[0].fields.at("cause"), "no_listener");
  EXPECT_EQ(r.report().at("late_fin_resets"), json::array());
}

// ---- causes without a socket: what became of the TIME_WAIT ---------------------------

// A cancel flagged as the namespace's dismantling ends the TIME_WAIT at
// once, as netns_exit: no reset, no recycling to wait for.
TEST(TimeWaitAnalyzer, CancelInADyingNamespaceIsNetnsExit) {
  Rig r;
  client_closes(r);
  client_enters_tw(r, kTcpTimeWait, ms(60'000));
  r.run({Ev(TCPSCOPE_EV_TW_CANCEL, ms(200), 1).sk_flags(TCPSCOPE_SK_NETNS_EXIT)});
  const auto ends = r.sink.of("time_wait_end");
  ASSERT_EQ(ends.size(), 1u);  // said at once, not a cause window later
  EXPECT_EQ(ends[0].fields.at("cause"), "netns_exit");
  EXPECT_EQ(ends[0].ts_ns, ms(200));
  r.run({End(ms(400))});
  const json ended = r.time_wait_report().at("ended");
  EXPECT_EQ(ended.at("netns_exit"), 1) << ended.dump();
  EXPECT_EQ(ended.at("reset"), 0) << ended.dump();
}

TEST(ResetAnalyzer, LateFinAfterTwKilledIsTwKilledEvenBeforeTheKillIsDecided) {
  Rig r;
  client_closes(r);
  client_enters_tw(r, kTcpFinWait2, ms(60'000));
  EXPECT_EQ(r.sink.of("time_wait_enter").size(), 1u);
  // The tw timer cancelled (ss -K, RFC 1337 RST...), not re-armed; the FIN
  // comes 100 ms later, before the TIME_WAIT analysis would settle on it.
  r.run({Ev(TCPSCOPE_EV_TW_CANCEL, ms(200), 1), LateFinRst(ms(300)),
         ServerGetsRst(ms(300) + 10'000), End(ms(400))});
  const auto ends = r.sink.of("time_wait_end");
  ASSERT_EQ(ends.size(), 1u);
  EXPECT_EQ(ends[0].fields.at("cause"), "reset");
  EXPECT_EQ(ends[0].ts_ns, ms(200));
  const auto sent = r.sink.of("reset_sent");
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0].fields.at("cause"), "tw_killed");
  EXPECT_EQ(sent[0].fields.at("since_close_ms"), 290);
  EXPECT_EQ(r.report().at("resets"), counts(1, {{"tw_killed", 1}}, 1, {{"tw_killed", 1}}));
}

TEST(ResetAnalyzer, LateFinAfterDecidedKillIsTwKilled) {
  Rig r;
  client_closes(r);
  client_enters_tw(r, kTcpFinWait2, ms(60'000));
  r.run({Ev(TCPSCOPE_EV_TW_CANCEL, ms(200), 1), LateFinRst(ms(1500)), End(ms(1600))});
  ASSERT_EQ(r.sink.of("time_wait_end").size(), 1u);
  ASSERT_EQ(r.sink.of("reset_sent").size(), 1u);
  EXPECT_EQ(r.sink.of("reset_sent")[0].fields.at("cause"), "tw_killed");
}

TEST(ResetAnalyzer, LateFinAfterExpiryTellsFinWait2TimeoutFromTimeWait) {
  for (uint8_t substate : {kTcpFinWait2, kTcpTimeWait}) {
    Rig r;
    client_closes(r);
    client_enters_tw(r, substate, ms(1011));
    r.run({Ev(TCPSCOPE_EV_TW_EXPIRE, ms(1011), 1), LateFinRst(ms(2010)), End(ms(2100))});
    const auto sent = r.sink.of("reset_sent");
    ASSERT_EQ(sent.size(), 1u);
    EXPECT_EQ(sent[0].fields.at("cause"),
              substate == kTcpFinWait2 ? "fin_wait2_timeout" : "time_wait_expired");
    EXPECT_EQ(sent[0].fields.at("since_close_ms"), 2000);
    const json late = r.report().at("late_fin_resets");
    ASSERT_EQ(late.size(), 1u);
    EXPECT_EQ(late[0].at("peer"), nullptr);
    EXPECT_EQ(late[0].at("cause"), sent[0].fields.at("cause"));
  }
}

TEST(ResetAnalyzer, ClosedConnectionWithoutTimeWaitDecisionFallsBackToReason) {
  Rig r(/*timers=*/false);  // nothing tells whether a tw sock was made
  client_closes(r);
  r.run(
      {Client(State(ms(11) + 200, 1, kTcpFinWait2, kTcpClose)), LateFinRst(ms(500)), End(ms(600))});
  const auto sent = r.sink.of("reset_sent");
  ASSERT_EQ(sent.size(), 1u);
  // The tw sock is believed open: the kernel's reason is all there is.
  EXPECT_EQ(sent[0].fields.at("cause"), "no_socket");
  EXPECT_EQ(sent[0].conn, 1u);  // still named
}

TEST(ResetAnalyzer, LaterSegmentsOfAnAbortedConnectionKeepItsCause) {
  Rig r;
  client_closes(r);
  // SO_LINGER 0 style abort after the FIN: RST with TCP_STATE from CLOSE.
  r.run({Client(State(ms(20), 1, kTcpFinWait2, kTcpClose)),
         Client(ResetSent(ms(20) + 1000, 1, kTcpClose, kRstTcpState)), LateFinRst(ms(100)),
         End(ms(200))});
  const auto sent = r.sink.of("reset_sent");
  ASSERT_EQ(sent.size(), 2u);
  EXPECT_EQ(sent[0].fields.at("cause"), "linger_abort");
  EXPECT_EQ(sent[1].fields.at("cause"), "linger_abort");
  EXPECT_EQ(sent[1].fields.at("since_close_ms"), 90);
}

// ---- causes with a socket ------------------------------------------------------

struct ReasonCase {
  uint32_t reason;
  uint8_t state;
  uint32_t rx_queue;
  const char* cause;
};

TEST(ResetAnalyzer, FullSocketCauses) {
  const ReasonCase cases[] = {
      {kRstTcpState, kTcpClose, 0, "linger_abort"},
      {kRstTcpState, kTcpFinWait2, 0, "fin_wait2_timeout"},
      {kRstAbortOnClose, kTcpClose, 10, "unread_data"},
      {kRstAbortOnData, kTcpClose, 0, "data_after_close"},
      {0, kTcpClose, 10, "unread_data"},  // kernel < 6.10: no reason
      {0, kTcpClose, 0, "linger_abort"},
      {12, kTcpClose, 0, "tcp_abort_on_linger"},
      {15, kTcpEstablished, 0, "tcp_keepalive_timeout"},
      {99, kTcpEstablished, 0, "other"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.cause);
    Rig r;
    r.run({Client(State(ms(1), 1, kTcpClose, kTcpSynSent)),
           Client(State(ms(2), 1, kTcpSynSent, kTcpEstablished)),
           Client(ResetSent(ms(5), 1, c.state, c.reason)).rx_queue(c.rx_queue),
           ServerGetsRst(ms(5) + 10'000, kTcpEstablished), End(ms(10))});
    const auto sent = r.sink.of("reset_sent");
    ASSERT_EQ(sent.size(), 1u);
    EXPECT_EQ(sent[0].fields.at("cause"), c.cause);
    EXPECT_EQ(sent[0].fields.at("no_socket"), false);
    EXPECT_EQ(sent[0].fields.at("seg_flags"), "");
    const auto received = r.sink.of("reset_received");
    ASSERT_EQ(received.size(), 1u);
    EXPECT_EQ(received[0].fields.at("cause"), c.cause);
    // No provoking segment: not a late FIN.
    EXPECT_EQ(r.report().at("late_fin_resets"), json::array());
  }
}

TEST(ResetAnalyzer, DataAfterCloseOnFullSocketIgnoresItsOwnReceiveResetTracepoint) {
  // FIN_WAIT2 orphan gets data: tcp_reset() (which fires tcp_receive_reset
  // on our own socket) then the RST with TCP_ABORT_ON_DATA.
  Rig r;
  client_closes(r);
  r.run({Client(ResetReceived(ms(300), 1, kTcpFinWait2)),
         Client(State(ms(300) + 1000, 1, kTcpFinWait2, kTcpClose)),
         Client(ResetSent(ms(300) + 2000, 1, kTcpClose, kRstAbortOnData))
             .tcp_flags(TCPSCOPE_TCP_PSH | TCPSCOPE_TCP_ACK)
             .seg_len(5),
         ServerGetsRst(ms(300) + 3000, kTcpCloseWait), End(ms(400))});
  const auto received = r.sink.of("reset_received");
  ASSERT_EQ(received.size(), 1u);
  EXPECT_EQ(received[0].conn, 2u);
  EXPECT_EQ(received[0].fields.at("cause"), "data_after_close");
  const auto sent = r.sink.of("reset_sent");
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0].fields.at("since_close_ms"), 290);
  const json rep = r.report();
  EXPECT_EQ(rep.at("resets"), counts(1, {{"data_after_close", 1}}, 1, {{"data_after_close", 1}}));
  json want = late_entry(300, "data_after_close", "TCP_ABORT_ON_DATA", "PSH|ACK", 5, 290,
                         server_peer("CLOSE_WAIT"));
  TimeFormatter tf(0);
  want["time"] = std::string(tf.rfc3339(ms(300) + 2000));
  EXPECT_EQ(rep.at("late_fin_resets"), json::array({want}));
  // An abort is not a TIME_WAIT overflow.
  EXPECT_TRUE(r.sink.of("time_wait_skipped").empty());
}

TEST(ResetAnalyzer, AbortInFinWait1IsNotTimeWaitOverflow) {
  // FIN_WAIT1 orphan: the data acks our FIN (FIN_WAIT2), tcp_done(), RST.
  Rig r;
  r.run({Client(State(ms(1), 1, kTcpClose, kTcpSynSent)),
         Client(State(ms(2), 1, kTcpSynSent, kTcpEstablished)),
         Client(State(ms(10), 1, kTcpEstablished, kTcpFinWait1)),
         Client(State(ms(60), 1, kTcpFinWait1, kTcpFinWait2)),
         Client(State(ms(60) + 500, 1, kTcpFinWait2, kTcpClose)),
         Client(ResetSent(ms(60) + 900, 1, kTcpClose, kRstAbortOnData))
             .tcp_flags(TCPSCOPE_TCP_PSH | TCPSCOPE_TCP_ACK)
             .seg_len(5),
         End(ms(100))});
  EXPECT_TRUE(r.sink.of("time_wait_skipped").empty());
  ASSERT_EQ(r.sink.of("reset_sent").size(), 1u);
  EXPECT_EQ(r.sink.of("reset_sent")[0].fields.at("cause"), "data_after_close");
  EXPECT_EQ(r.sink.of("reset_sent")[0].fields.at("since_close_ms"), 50);
}

TEST(ResetAnalyzer, TimeWaitSockCauses) {
  for (uint32_t len : {5u, 0u}) {
    Rig r;
    client_closes(r);
    client_enters_tw(r, kTcpFinWait2, ms(60'000));
    r.run({Ev(TCPSCOPE_EV_RESET_SENT, ms(100), 1)
               .in(kTcpTimeWait)
               .reason(kRstTimewaitSocket)
               .sk_flags(TCPSCOPE_SK_TIMEWAIT)
               .tcp_flags(TCPSCOPE_TCP_ACK | (len ? TCPSCOPE_TCP_PSH : TCPSCOPE_TCP_SYN))
               .seg_len(len),
           End(ms(200))});
    const auto sent = r.sink.of("reset_sent");
    ASSERT_EQ(sent.size(), 1u);
    EXPECT_EQ(sent[0].conn, 1u);
    EXPECT_EQ(sent[0].pid, kClientPid);
    EXPECT_EQ(sent[0].fields.at("state"), "TIME_WAIT");
    EXPECT_EQ(sent[0].fields.at("cause"), len ? "data_after_close" : "tcp_timewait_socket");
    EXPECT_EQ(sent[0].fields.at("since_close_ms"), 90);
    EXPECT_EQ(r.report().at("late_fin_resets").size(), len ? 1u : 0u);
  }
}

// ---- bounds ----------------------------------------------------------------

TEST(ResetAnalyzer, LateFinListIsBounded) {
  Rig r;
  client_closes(r);
  client_skips_tw(r);
  constexpr int kN = 1003;
  for (int i = 0; i < kN; ++i) r.run({LateFinRst(ms(100) + static_cast<uint64_t>(i) * 1000)});
  r.run({End(ms(200))});
  const json rep = r.report();
  EXPECT_EQ(rep.at("resets"), counts(kN, {{"no_time_wait", kN}}, 0, json::object(), 3));
  EXPECT_EQ(rep.at("late_fin_resets").size(), 1000u);
  const std::string text = r.text(2);
  EXPECT_NE(text.find("Late FIN/data answered with RST: 1000 (+3 not listed)"), std::string::npos)
      << text;
  // Two rows, then "...".
  EXPECT_NE(text.find("  ...\n"), std::string::npos) << text;
  size_t rows = 0;
  for (size_t at = text.find("ms after close"); at != std::string::npos;
       at = text.find("ms after close", at + 1))
    ++rows;
  EXPECT_EQ(rows, 2u) << text;
}

TEST(ResetAnalyzer, EmptyReport) {
  Rig r;
  r.run({End(ms(1))});
  EXPECT_EQ(r.report(), (json{{"resets", counts(0, json::object(), 0, json::object())},
                              {"late_fin_resets", json::array()}}));
}

}  // namespace
}  // namespace tcpscope
