// Tracker: lifecycles rebuilt from synthetic kernel event sequences.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tcpscope/audit.hpp"
#include "tcpscope/tracker.hpp"
#include "test_events.hpp"

namespace tcpscope {
namespace {

using namespace tcpscope::test;
using V8 = std::vector<uint8_t>;
using V64 = std::vector<uint64_t>;
using VI = std::vector<int64_t>;

std::string comm_of(const Connection& c) {
  return std::string(c.comm.data(), strnlen(c.comm.data(), c.comm.size()));
}

// ---- names -----------------------------------------------------------------

TEST(TrackerNames, OpenAndCloseKinds) {
  EXPECT_EQ(open_kind_name(OpenKind::Unknown), "unknown");
  EXPECT_EQ(open_kind_name(OpenKind::Active), "active");
  EXPECT_EQ(open_kind_name(OpenKind::Passive), "passive");
  EXPECT_EQ(open_kind_name(OpenKind::Listen), "listen");
  EXPECT_EQ(close_kind_name(CloseKind::Open), "open");
  EXPECT_EQ(close_kind_name(CloseKind::ActiveClose), "active_close");
  EXPECT_EQ(close_kind_name(CloseKind::PassiveClose), "passive_close");
  EXPECT_EQ(close_kind_name(CloseKind::Simultaneous), "simultaneous");
  EXPECT_EQ(close_kind_name(CloseKind::ResetSent), "reset_sent");
  EXPECT_EQ(close_kind_name(CloseKind::ResetReceived), "reset_received");
  EXPECT_EQ(close_kind_name(CloseKind::Aborted), "aborted");
  EXPECT_EQ(close_kind_name(CloseKind::Vanished), "vanished");
}

// ---- opens and closes ------------------------------------------------------

TEST(Tracker, ActiveOpenActiveClose) {
  Recorder r;
  const Event syn = State(ms(100), 101, kTcpClose, kTcpSynSent).lport(0).owner(42, "curl");
  const Tracked t0 = r.apply(syn);
  EXPECT_EQ(t0.ev, &syn);
  ASSERT_NE(t0.conn, nullptr);
  EXPECT_EQ(t0.conn, r.tracker.find(101));
  EXPECT_EQ(t0.prev_state_ns, -1);

  const VI prev = r.run({
      State(ms(110), 101, kTcpSynSent, kTcpEstablished),
      State(ms(1110), 101, kTcpEstablished, kTcpFinWait1).owner(42, "curl"),
      State(ms(1111), 101, kTcpFinWait1, kTcpFinWait2),
      State(ms(1113), 101, kTcpFinWait2, kTcpClose),
  });
  EXPECT_EQ(prev, (VI{int64_t(ms(10)), int64_t(ms(1000)), int64_t(ms(1)), int64_t(ms(2))}));

  // Closed, but within the grace: not final yet.
  EXPECT_TRUE(r.ended.empty());
  const Connection* live = r.tracker.find(101);
  ASSERT_NE(live, nullptr);
  EXPECT_TRUE(live->is_closed());
  EXPECT_EQ(live->closed_ns, ms(1113));
  EXPECT_EQ(live->close_kind, CloseKind::Open);
  EXPECT_EQ(Tracker::classify_close(*live), CloseKind::ActiveClose);
  EXPECT_EQ(r.tracker.size(), 1u);

  r.tracker.finish(ms(1200));
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.tracker.size(), 0u);
  EXPECT_EQ(r.tracker.find(101), nullptr);
  EXPECT_EQ(r.tracker.last_ns(), ms(1200));

  const Connection& c = r.ended[0];
  EXPECT_EQ(c.id, 101u);
  EXPECT_EQ(c.open_kind, OpenKind::Active);
  EXPECT_EQ(c.close_kind, CloseKind::ActiveClose);
  EXPECT_EQ(history_states(c),
            (V8{kTcpClose, kTcpSynSent, kTcpEstablished, kTcpFinWait1, kTcpFinWait2, kTcpClose}));
  EXPECT_EQ(c.fin_wait1_ns, ms(1110));
  EXPECT_EQ(c.last_ack_ns, 0u);
  EXPECT_EQ(c.history_dropped, 0);
  EXPECT_EQ(c.visited, bits({kTcpClose, kTcpSynSent, kTcpEstablished, kTcpFinWait1, kTcpFinWait2}));
  EXPECT_EQ(c.state, kTcpClose);
  EXPECT_EQ(c.state_since_ns, ms(1113));
  EXPECT_EQ(c.first_ns, ms(100));
  EXPECT_EQ(c.closed_ns, ms(1113));
  EXPECT_EQ(c.close_from, kTcpFinWait2);
  EXPECT_EQ(c.close_sk_flags, 0);
  EXPECT_EQ(c.pid, 42u);
  EXPECT_EQ(comm_of(c), "curl");
  EXPECT_EQ(c.owner_src, TCPSCOPE_OWNER_SYSCALL);
  EXPECT_EQ(c.netns, kNetns);
  EXPECT_EQ(c.family, 4);
  EXPECT_EQ(c.lport, 40000);
  EXPECT_EQ(c.rport, 80);
  EXPECT_EQ(c.laddr[0], 10);
  EXPECT_EQ(c.laddr[3], 1);
  EXPECT_EQ(c.raddr[3], 2);
  EXPECT_EQ(c.retransmits, 0u);
  EXPECT_EQ(c.resets_sent, 0u);
  EXPECT_EQ(c.resets_received, 0u);
}

TEST(Tracker, PassiveOpenPassiveClose) {
  Recorder r;
  const VI prev = r.run({
      State(ms(5), 202, kTcpListen, kTcpSynRecv)
          .lport(80)
          .rport(51000)
          .owner(7, "nginx", TCPSCOPE_OWNER_LISTENER),
      State(ms(6), 202, kTcpSynRecv, kTcpEstablished).lport(80).rport(51000),
      State(ms(2006), 202, kTcpEstablished, kTcpCloseWait).lport(80).rport(51000),
      State(ms(2010), 202, kTcpCloseWait, kTcpLastAck).lport(80).rport(51000).owner(8, "worker"),
      State(ms(2011), 202, kTcpLastAck, kTcpClose).lport(80).rport(51000),
  });
  EXPECT_EQ(prev, (VI{-1, int64_t(ms(1)), int64_t(ms(2000)), int64_t(ms(4)), int64_t(ms(1))}));
  r.tracker.finish(ms(2012));
  ASSERT_EQ(r.ended.size(), 1u);
  const Connection& c = r.ended[0];
  EXPECT_EQ(c.open_kind, OpenKind::Passive);
  EXPECT_EQ(c.close_kind, CloseKind::PassiveClose);
  EXPECT_EQ(history_states(c),
            (V8{kTcpListen, kTcpSynRecv, kTcpEstablished, kTcpCloseWait, kTcpLastAck, kTcpClose}));
  EXPECT_EQ(c.fin_wait1_ns, 0u);
  EXPECT_EQ(c.last_ack_ns, ms(2010));
  EXPECT_EQ(c.close_from, kTcpLastAck);
  EXPECT_EQ(c.lport, 80);
  EXPECT_EQ(c.rport, 51000);
  EXPECT_EQ(c.pid, 8u);
  EXPECT_EQ(comm_of(c), "worker");
  EXPECT_EQ(c.owner_src, TCPSCOPE_OWNER_SYSCALL);
}

TEST(Tracker, PassiveOpenFromEveryPredecessorOfSynRecv) {
  for (uint8_t old_state : {kTcpClose, kTcpListen, kTcpNewSynRecv}) {
    Recorder r;
    r.apply(State(ms(1), 7, old_state, kTcpSynRecv));
    r.tracker.finish(ms(2));
    ASSERT_EQ(r.ended.size(), 1u);
    EXPECT_EQ(r.ended[0].open_kind, OpenKind::Passive) << int(old_state);
    EXPECT_EQ(r.ended[0].close_kind, CloseKind::Open);
    EXPECT_EQ(history_states(r.ended[0]), (V8{old_state, kTcpSynRecv}));
  }
}

TEST(Tracker, SimultaneousClose) {
  Recorder r;
  const VI prev = r.run({
      State(ms(1), 303, kTcpClose, kTcpSynSent),
      State(ms(2), 303, kTcpSynSent, kTcpEstablished),
      State(ms(3), 303, kTcpEstablished, kTcpFinWait1),
      State(ms(5), 303, kTcpFinWait1, kTcpClosing),
      State(ms(8), 303, kTcpClosing, kTcpClose),
  });
  EXPECT_EQ(prev, (VI{-1, int64_t(ms(1)), int64_t(ms(1)), int64_t(ms(2)), int64_t(ms(3))}));
  r.tracker.finish(ms(9));
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].open_kind, OpenKind::Active);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::Simultaneous);
  EXPECT_EQ(r.ended[0].close_from, kTcpClosing);
}

TEST(Tracker, ResetReceived) {
  Recorder r;
  r.run(
      {State(ms(1), 404, kTcpClose, kTcpSynSent), State(ms(2), 404, kTcpSynSent, kTcpEstablished)});
  const Event rst = ResetReceived(ms(50), 404, kTcpEstablished);
  const Tracked t = r.apply(rst);
  ASSERT_NE(t.conn, nullptr);
  EXPECT_EQ(t.conn->id, 404u);
  EXPECT_EQ(t.prev_state_ns, -1);
  EXPECT_EQ(r.apply(State(ms(50), 404, kTcpEstablished, kTcpClose)).prev_state_ns, int64_t(ms(48)));
  r.tracker.finish(ms(60));
  ASSERT_EQ(r.ended.size(), 1u);
  const Connection& c = r.ended[0];
  EXPECT_EQ(c.close_kind, CloseKind::ResetReceived);
  EXPECT_EQ(c.resets_received, 1u);
  EXPECT_EQ(c.last_reset_received_ns, ms(50));
  EXPECT_EQ(c.resets_sent, 0u);
  EXPECT_EQ(c.close_from, kTcpEstablished);
}

TEST(Tracker, ConnectionRefusedIsResetReceived) {
  Recorder r;
  r.run({State(ms(1), 405, kTcpClose, kTcpSynSent), ResetReceived(ms(2), 405, kTcpSynSent),
         State(ms(2), 405, kTcpSynSent, kTcpClose)});
  r.tracker.finish(ms(3));
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].open_kind, OpenKind::Active);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::ResetReceived);
}

TEST(Tracker, DataAfterCloseIsResetSent) {
  Recorder r;
  r.run({
      State(ms(1), 505, kTcpClose, kTcpSynSent),
      State(ms(2), 505, kTcpSynSent, kTcpEstablished),
      State(ms(10), 505, kTcpEstablished, kTcpFinWait1),
      State(ms(11), 505, kTcpFinWait1, kTcpFinWait2),
      // tcp_reset() on ABORT_ON_DATA fires tcp_receive_reset, then tcp_done.
      ResetReceived(ms(20), 505, kTcpFinWait2),
      State(ms(20), 505, kTcpFinWait2, kTcpClose),
  });
  // Before the RST we send arrives, it looks like the peer's RST.
  ASSERT_NE(r.tracker.find(505), nullptr);
  EXPECT_EQ(Tracker::classify_close(*r.tracker.find(505)), CloseKind::ResetReceived);
  r.apply(ResetSent(ms(20), 505, kTcpClose, kRstAbortOnData)
              .tcp_flags(TCPSCOPE_TCP_PSH | TCPSCOPE_TCP_ACK)
              .seg_len(5));
  EXPECT_EQ(Tracker::classify_close(*r.tracker.find(505)), CloseKind::ResetSent);
  r.tracker.finish(ms(30));
  ASSERT_EQ(r.ended.size(), 1u);
  const Connection& c = r.ended[0];
  EXPECT_EQ(c.close_kind, CloseKind::ResetSent);
  EXPECT_EQ(c.resets_sent, 1u);
  EXPECT_EQ(c.resets_received, 1u);
  EXPECT_EQ(c.last_reset_reason, kRstAbortOnData);
  EXPECT_EQ(c.last_reset_flags, TCPSCOPE_TCP_PSH | TCPSCOPE_TCP_ACK);
  EXPECT_EQ(c.last_reset_sent_ns, ms(20));
}

TEST(Tracker, LingerZeroIsAborted) {
  Recorder r;
  r.run({
      State(ms(1), 606, kTcpClose, kTcpSynSent),
      State(ms(2), 606, kTcpSynSent, kTcpEstablished),
      // tcp_disconnect(): CLOSE first, then the RST (reason TCP_STATE).
      State(ms(30), 606, kTcpEstablished, kTcpClose).owner(42, "app"),
      ResetSent(ms(30), 606, kTcpClose, kRstTcpState).owner(42, "app"),
  });
  r.tracker.finish(ms(31));
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::Aborted);
  EXPECT_EQ(r.ended[0].last_reset_reason, kRstTcpState);
  EXPECT_EQ(r.ended[0].resets_sent, 1u);
}

// An audit found the socket gone in FIN_WAIT1, its FIN_WAIT2 and CLOSE
// never seen: the connection ends as vanished, after the close grace like
// any other, and is no longer open.
TEST(Tracker, VanishedEndsTheConnection) {
  Recorder r;
  r.run({
      State(ms(1), 610, kTcpListen, kTcpSynRecv),
      State(ms(2), 610, kTcpSynRecv, kTcpEstablished),
      State(ms(3), 610, kTcpEstablished, kTcpFinWait1),
      State(ms(4), 611, kTcpClose, kTcpSynSent),
  });
  V64 open;
  r.tracker.for_each_open([&](const Connection& c) { open.push_back(c.id); });
  EXPECT_EQ(open, (V64{610, 611}));

  const Tracked t = r.apply(Vanished(ms(900), 610, kTcpFinWait1, ms(3)));
  ASSERT_NE(t.conn, nullptr);
  EXPECT_TRUE(t.conn->vanished);
  EXPECT_EQ(t.conn->closed_ns, ms(900));
  EXPECT_EQ(t.conn->close_from, kTcpFinWait1);
  open.clear();
  r.tracker.for_each_open([&](const Connection& c) { open.push_back(c.id); });
  EXPECT_EQ(open, (V64{611}));
  // Unknown or already ended: nothing to end.
  EXPECT_EQ(r.apply(Vanished(ms(901), 612, kTcpEstablished, ms(1))).conn, nullptr);
  EXPECT_EQ(r.apply(Vanished(ms(902), 610, kTcpFinWait1, ms(3))).conn, nullptr);
  EXPECT_TRUE(r.ended.empty());

  r.apply(State(ms(2000), 611, kTcpSynSent, kTcpEstablished));  // past the grace
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].id, 610u);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::Vanished);
  EXPECT_EQ(history_states(r.ended[0]),
            (V8{kTcpListen, kTcpSynRecv, kTcpEstablished, kTcpFinWait1}));
}

// A tw sock record naming a connection that still looks open: the kernel ran
// none of our programs for its last transitions (seen under churn: FIN_WAIT1,
// then only its tw sock's cancel). It ends at that record, with a gap.
TEST(Tracker, TimewaitRecordOfAnOpenConnectionEndsItWithAGap) {
  Recorder r;
  r.run({State(ms(1), 630, kTcpListen, kTcpSynRecv),
         State(ms(2), 630, kTcpSynRecv, kTcpEstablished),
         State(ms(3), 630, kTcpEstablished, kTcpFinWait1)});
  const Tracked t =
      r.apply(Ev(TCPSCOPE_EV_TW_CANCEL, ms(300), 630).states(kTcpTimeWait, kTcpTimeWait));
  EXPECT_TRUE(t.gap);
  const Connection* c = r.tracker.find(630);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->closed_ns, ms(300));
  EXPECT_EQ(c->close_from, kTcpFinWait1);
  // Closed already: the next record changes nothing.
  EXPECT_FALSE(r.apply(Ev(TCPSCOPE_EV_TW_GONE, ms(400), 630)).gap);
  r.apply(State(ms(2000), 631, kTcpClose, kTcpSynSent));  // past the grace
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::ActiveClose);
}

// From FIN_WAIT2 or CLOSING the timer is armed just before the CLOSE, and a
// sweep may find the tw sock in between: only a cancel, expiry or
// disappearance a second later says the CLOSE was lost. Unknown ids and
// listeners are left alone.
TEST(Tracker, TimewaitRecordJustBeforeTheCloseIsNoGap) {
  Recorder r;
  r.run({State(ms(1), 640, kTcpClose, kTcpSynSent), State(ms(2), 640, kTcpSynSent, kTcpEstablished),
         State(ms(3), 640, kTcpEstablished, kTcpFinWait1),
         State(ms(4), 640, kTcpFinWait1, kTcpFinWait2), State(ms(5), 641, kTcpClose, kTcpListen)});
  auto gap = [&](uint8_t type, uint64_t ts, uint64_t conn) {
    return r.apply(Ev(type, ts, conn).states(kTcpTimeWait, kTcpTimeWait)).gap;
  };
  EXPECT_FALSE(gap(TCPSCOPE_EV_TW_START, ms(5), 640));
  EXPECT_FALSE(gap(TCPSCOPE_EV_TW_SEEN, ms(6), 640));
  EXPECT_FALSE(gap(TCPSCOPE_EV_TW_SEEN, ms(7), 641));      // a listener
  EXPECT_FALSE(gap(TCPSCOPE_EV_TW_SEEN, ms(8), 642));      // unknown
  EXPECT_FALSE(gap(TCPSCOPE_EV_TW_START, ms(2000), 640));  // a start is armed before
  EXPECT_FALSE(gap(TCPSCOPE_EV_TW_SEEN, ms(3000), 640));   // a sweep may read it before
  EXPECT_FALSE(r.tracker.find(640)->is_closed());
  EXPECT_TRUE(gap(TCPSCOPE_EV_TW_EXPIRE, ms(60'004), 640));
  EXPECT_EQ(r.tracker.find(640)->close_from, kTcpFinWait2);
  EXPECT_FALSE(r.tracker.find(641)->is_closed());
}

// The audit judges only settled, open connections of the namespace walked,
// with cookie ids, and finds those the pass did not see.
TEST(Audit, FindsOnlySettledOpenConnectionsMissingFromThePass) {
  Recorder r;
  const uint64_t kPrivate = (1ull << 63) | 5;
  r.run({
      State(ms(1), 701, kTcpClose, kTcpSynSent),   // present
      State(ms(2), 702, kTcpListen, kTcpSynRecv),  // gone
      State(ms(3), 702, kTcpSynRecv, kTcpEstablished),
      State(ms(4), 703, kTcpClose, kTcpSynSent).netns(kNetns + 1),  // other netns
      State(ms(5), kPrivate, kTcpClose, kTcpSynSent),               // not a cookie
      State(ms(6), 704, kTcpClose, kTcpSynSent),                    // closed
      State(ms(7), 704, kTcpSynSent, kTcpClose),
      State(ms(8), 705, kTcpEstablished, kTcpCloseWait),    // gone
      State(ms(900), 706, kTcpClose, kTcpSynSent),          // too recent
      ResetSent(ms(9), 707, kTcpNewSynRecv, kRstNoSocket),  // request sock
  });
  const V64 present{701};
  std::vector<Event> out;
  find_vanished(r.tracker, present, kNetns, ms(8) + kAuditSettledNs, out);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(audit_settle_ns(kTcpEstablished), kAuditSettledHashedNs);
  EXPECT_EQ(audit_settle_ns(kTcpSynRecv), kAuditSettledNs);
  EXPECT_EQ(out[0].type, TCPSCOPE_EV_VANISHED);
  EXPECT_EQ(out[0].conn, 702u);
  EXPECT_EQ(out[0].old_state, kTcpEstablished);
  EXPECT_EQ(out[0].aux, ms(3));
  EXPECT_EQ(out[0].ts_ns, ms(8) + kAuditSettledNs);
  EXPECT_EQ(out[0].netns, kNetns);
  EXPECT_EQ(out[0].lport, r.tracker.find(702)->lport);
  EXPECT_EQ(out[1].conn, 705u);
  EXPECT_EQ(out[1].old_state, kTcpCloseWait);
  // One just settled at the pass start is judged; the next nanosecond, not.
  // In a state it is hashed in before it enters it (CLOSE_WAIT), briefly.
  out.clear();
  find_vanished(r.tracker, present, kNetns, ms(8) + kAuditSettledHashedNs - 1, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].conn, 702u);
  out.clear();
  find_vanished(r.tracker, present, kNetns, ms(8) + kAuditSettledHashedNs, out);
  EXPECT_EQ(out.size(), 2u);
  // In one it is hashed in only after entering it (SYN_SENT), long.
  r.run({State(ms(1000), 708, kTcpClose, kTcpSynSent)});
  out.clear();
  find_vanished(r.tracker, present, kNetns, ms(1000) + kAuditSettledNs - 1, out);
  EXPECT_EQ(out.size(), 3u);  // 706 too: entered at 900 ms
  out.clear();
  find_vanished(r.tracker, present, kNetns, ms(1000) + kAuditSettledNs, out);
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(out[3].conn, 708u);
}

TEST(Audit, ParsesTcpOutRstsFromSnmp) {
  const std::string snmp =
      "Ip: Forwarding DefaultTTL InReceives\n"
      "Ip: 1 64 3000\n"
      "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails "
      "EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n"
      "Tcp: 1 200 120000 -1 51 10 4 0 0 965 704 0 0 1234567 0\n"
      "Udp: InDatagrams NoPorts\n"
      "Udp: 5 6\n";
  EXPECT_EQ(parse_tcp_out_rsts(snmp), std::optional<uint64_t>(1234567));
  EXPECT_EQ(parse_tcp_out_rsts("Tcp: RtoAlgorithm OutRsts\nTcp: 1\n"), std::nullopt);
  EXPECT_EQ(parse_tcp_out_rsts("Tcp: RtoAlgorithm OutRsts\nTcp: 1 x2\n"), std::nullopt);
  EXPECT_EQ(parse_tcp_out_rsts("Tcp: RtoAlgorithm InErrs\nTcp: 1 2\n"), std::nullopt);
  EXPECT_EQ(parse_tcp_out_rsts("Tcp: OutRsts\n"), std::nullopt);
  EXPECT_EQ(parse_tcp_out_rsts(""), std::nullopt);
}

// Resets the kernel counted that were neither seen nor counted lost are
// reported once; a reading is judged only at the next one (the counter runs
// a little ahead of the records), except the final one.
TEST(Audit, ResetCountCheckReportsWhatTheKernelCountedAndNoRecordSaid) {
  ResetCountCheck check(100);
  for (int i = 0; i < 5; ++i) check.seen();
  EXPECT_EQ(check.judge(107, 0), 0u);  // judges the base: nothing sent yet
  EXPECT_EQ(check.judge(110, 1), 1u);  // 7 sent, 5 seen, 1 lost in the ring
  EXPECT_EQ(check.judge(110, 1), 3u);  // 10 sent: 4 unaccounted in all
  EXPECT_EQ(check.judge(110, 1), 0u);  // already said
  for (int i = 0; i < 3; ++i) check.seen();
  EXPECT_EQ(check.judge_final(112, 1), 0u);  // 12 sent, 8 seen, 1 lost: 3 < 4
  EXPECT_EQ(check.judge_final(115, 1), 2u);  // 6 unaccounted
  EXPECT_EQ(check.missing(), 6u);
  // More seen than counted (resets just before the base reading): nothing.
  ResetCountCheck early(50);
  for (int i = 0; i < 3; ++i) early.seen();
  EXPECT_EQ(early.judge_final(51, 0), 0u);
}

// A transition from a state other than the one last seen means those in
// between were lost: flagged. First events and reopenings are not gaps.
TEST(Tracker, TransitionFromAnotherStateIsAGap) {
  Recorder r;
  auto gap = [&](const Event& e) { return r.apply(e).gap; };
  EXPECT_FALSE(gap(State(ms(1), 620, kTcpClose, kTcpSynSent)));
  EXPECT_FALSE(gap(State(ms(2), 620, kTcpSynSent, kTcpEstablished)));
  // ESTABLISHED -> CLOSE_WAIT was lost.
  EXPECT_TRUE(gap(State(ms(3), 620, kTcpCloseWait, kTcpLastAck)));
  EXPECT_FALSE(gap(State(ms(4), 620, kTcpLastAck, kTcpClose)));
  EXPECT_FALSE(gap(State(ms(5), 620, kTcpClose, kTcpSynSent)));         // connect() again
  EXPECT_FALSE(gap(State(ms(6), 621, kTcpEstablished, kTcpFinWait1)));  // seen mid-life
  EXPECT_FALSE(gap(Retransmit(ms(7), 622, kTcpEstablished, 0x18, 100)));
  EXPECT_TRUE(gap(State(ms(8), 622, kTcpFinWait2, kTcpClose)));  // its FIN_WAIT1 lost
}

// Once the start-up snapshot is complete, every socket is either in it or
// born after it: a socket first seen leaving a state other than CLOSE or
// LISTEN lost its opening events. Before the snapshot ends (and for an event
// stamped before its end, read late) such a first sighting is a socket that
// predates the trace.
TEST(Tracker, FirstSeenMidLifeAfterTheSnapshotIsAGap) {
  Recorder r;
  auto gap = [&](const Event& e) { return r.apply(e).gap; };
  EXPECT_FALSE(gap(State(ms(1), 640, kTcpEstablished, kTcpFinWait1)));  // predates us
  EXPECT_FALSE(gap(Ev(TCPSCOPE_EV_SNAPSHOT, ms(2), 641).states(kTcpEstablished, kTcpEstablished)));
  EXPECT_FALSE(gap(Ev(TCPSCOPE_EV_SNAPSHOT_END, ms(3), 0)));
  EXPECT_FALSE(gap(State(ms(2), 642, kTcpSynSent, kTcpEstablished)));    // stamped before the end
  EXPECT_FALSE(gap(State(ms(4), 641, kTcpEstablished, kTcpCloseWait)));  // in the snapshot
  EXPECT_FALSE(gap(State(ms(5), 643, kTcpClose, kTcpSynSent)));
  EXPECT_FALSE(gap(State(ms(6), 644, kTcpListen, kTcpSynRecv)));  // an accepted child
  EXPECT_FALSE(gap(State(ms(7), 645, kTcpNewSynRecv, kTcpSynRecv)));
  EXPECT_FALSE(gap(State(ms(8), 646, kTcpClose, kTcpListen)));
  EXPECT_TRUE(gap(State(ms(9), 647, kTcpSynSent, kTcpEstablished)));  // its CLOSE -> SYN_SENT lost
  EXPECT_TRUE(gap(State(ms(10), 648, kTcpFinWait1, kTcpFinWait2)));
  EXPECT_FALSE(gap(State(ms(11), 647, kTcpEstablished, kTcpFinWait1)));  // known by now
  // Resets and retransmits are not judged: a request sock sends some too.
  EXPECT_FALSE(gap(ResetSent(ms(12), 649, kTcpSynRecv, kRstTcpState)));
  EXPECT_EQ(r.tracker.find(647)->open_kind, OpenKind::Unknown);
}

// An open connection evicted by the cap comes back mid-life: after an
// eviction, first sightings are no longer judged.
TEST(Tracker, FirstSeenMidLifeIsNotJudgedAfterAnEviction) {
  Recorder r(TrackerLimits{.close_grace_ns = ms(1), .max_connections = 2});
  r.run({Ev(TCPSCOPE_EV_SNAPSHOT_END, ms(1), 0), State(ms(2), 650, kTcpClose, kTcpSynSent),
         State(ms(3), 651, kTcpClose, kTcpSynSent), State(ms(4), 652, kTcpClose, kTcpSynSent)});
  ASSERT_EQ(r.tracker.evicted(), 1u);
  EXPECT_FALSE(r.apply(State(ms(5), 650, kTcpSynSent, kTcpEstablished)).gap);
}

// Retransmits carry the kernel's total_retrans (this skb's segments
// included): a jump beyond the skb's segments says some were lost.
TEST(Tracker, RetransmitCountJumpIsAGap) {
  Recorder r;
  auto rtx = [](uint64_t ts, uint64_t conn, uint32_t total, uint32_t segs) {
    return Retransmit(ts, conn, kTcpEstablished, 0x18, 100).aux(uint64_t{segs} << 32 | total);
  };
  r.run(
      {State(ms(1), 630, kTcpClose, kTcpSynSent), State(ms(2), 630, kTcpSynSent, kTcpEstablished)});
  EXPECT_FALSE(r.apply(rtx(ms(3), 630, 1, 1)).gap);
  EXPECT_FALSE(r.apply(rtx(ms(4), 630, 4, 3)).gap);  // a 3-segment skb
  EXPECT_TRUE(r.apply(rtx(ms(5), 630, 6, 1)).gap);   // total 5 was not seen
  EXPECT_FALSE(r.apply(rtx(ms(6), 630, 0, 0)).gap);  // unknown: no judgement
  EXPECT_EQ(r.tracker.find(630)->retransmits, 4u);
  // Seen from its start, its first one must be its first segments.
  r.run({State(ms(7), 631, kTcpListen, kTcpSynRecv)});
  EXPECT_TRUE(r.apply(rtx(ms(8), 631, 2, 1)).gap);
  // Seen mid-life: its count so far is unknown.
  EXPECT_FALSE(r.apply(rtx(ms(9), 632, 7, 1)).gap);
  EXPECT_FALSE(r.apply(rtx(ms(10), 632, 8, 1)).gap);
}

TEST(Tracker, CloseWithUnreadDataIsAborted) {
  Recorder r;
  r.run({
      State(ms(1), 607, kTcpListen, kTcpSynRecv),
      State(ms(2), 607, kTcpSynRecv, kTcpEstablished),
      State(ms(40), 607, kTcpEstablished, kTcpClose).rx_queue(100),
      ResetSent(ms(40), 607, kTcpClose, kRstAbortOnClose),
  });
  r.tracker.finish(ms(41));
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].open_kind, OpenKind::Passive);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::Aborted);
}

TEST(Tracker, FinWait2TimeoutAndTimewaitOverflowAreActiveClose) {
  struct Case {
    uint64_t id;
    uint8_t from;
    uint8_t flags;
    CloseKind kind;
  };
  const Case cases[] = {
      // FIN_WAIT2 timeout: the peer's FIN never came.
      {707, kTcpFinWait2, TCPSCOPE_SK_SEND_SHUTDOWN, CloseKind::ActiveClose},
      // tw bucket overflow after the peer's FIN: the tracepoint looks the
      // same as a TIME_WAIT entry (only the tw timer tells them apart).
      {708, kTcpFinWait2, TCPSCOPE_SK_RCV_SHUTDOWN | TCPSCOPE_SK_SEND_SHUTDOWN,
       CloseKind::ActiveClose},
      // Normal TIME_WAIT.
      {709, kTcpFinWait2, TCPSCOPE_SK_RCV_SHUTDOWN | TCPSCOPE_SK_SEND_SHUTDOWN,
       CloseKind::ActiveClose},
      {710, kTcpClosing, TCPSCOPE_SK_RCV_SHUTDOWN, CloseKind::Simultaneous},
  };
  for (const Case& k : cases) {
    Recorder r;
    r.run({State(ms(1), k.id, kTcpClose, kTcpSynSent),
           State(ms(2), k.id, kTcpSynSent, kTcpEstablished),
           State(ms(3), k.id, kTcpEstablished, kTcpFinWait1),
           State(ms(4), k.id, kTcpFinWait1, k.from),
           State(ms(60004), k.id, k.from, kTcpClose).sk_flags(k.flags)});
    r.tracker.finish(ms(60005));
    ASSERT_EQ(r.ended.size(), 1u);
    EXPECT_EQ(r.ended[0].close_kind, k.kind) << k.id;
    EXPECT_EQ(r.ended[0].close_sk_flags, k.flags) << k.id;
    EXPECT_EQ(r.ended[0].close_from, k.from) << k.id;
  }
}

TEST(Tracker, ConnectTimeoutIsAborted) {
  Recorder r;
  r.run({
      State(ms(1), 808, kTcpClose, kTcpSynSent),
      Retransmit(ms(1001), 808, kTcpSynSent, TCPSCOPE_TCP_SYN, 0),
      Retransmit(ms(3001), 808, kTcpSynSent, TCPSCOPE_TCP_SYN, 0),
      State(ms(7001), 808, kTcpSynSent, kTcpClose),
  });
  r.tracker.finish(ms(7002));
  ASSERT_EQ(r.ended.size(), 1u);
  const Connection& c = r.ended[0];
  EXPECT_EQ(c.open_kind, OpenKind::Active);
  EXPECT_EQ(c.close_kind, CloseKind::Aborted);
  EXPECT_EQ(c.close_from, kTcpSynSent);
  EXPECT_EQ(c.retransmits, 2u);
}

TEST(Tracker, RetransmitsAreCountedNotTransitions) {
  Recorder r;
  r.run({
      State(ms(1), 810, kTcpClose, kTcpSynSent),
      Retransmit(ms(2), 810, kTcpSynSent, TCPSCOPE_TCP_SYN, 0),
      State(ms(3), 810, kTcpSynSent, kTcpEstablished),
      Retransmit(ms(4), 810, kTcpEstablished, TCPSCOPE_TCP_ACK | TCPSCOPE_TCP_PSH, 1000),
      State(ms(5), 810, kTcpEstablished, kTcpFinWait1),
      Retransmit(ms(6), 810, kTcpFinWait1, TCPSCOPE_TCP_FIN | TCPSCOPE_TCP_ACK, 0),
      Retransmit(ms(7), 810, kTcpFinWait1, TCPSCOPE_TCP_FIN | TCPSCOPE_TCP_ACK, 0),
  });
  const Connection* c = r.tracker.find(810);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->retransmits, 4u);
  EXPECT_EQ(history_states(*c), (V8{kTcpClose, kTcpSynSent, kTcpEstablished, kTcpFinWait1}));
}

// ---- reuse, grace, finish --------------------------------------------------

TEST(Tracker, CookieReuseWithinGraceEndsFirstLifecycle) {
  Recorder r(TrackerLimits{.close_grace_ns = ms(1000)});
  r.run({State(ms(10), 909, kTcpClose, kTcpSynSent), State(ms(20), 909, kTcpSynSent, kTcpClose)});
  EXPECT_TRUE(r.ended.empty());
  const Tracked t = r.apply(State(ms(30), 909, kTcpClose, kTcpSynSent).lport(40001));
  ASSERT_EQ(r.ended.size(), 1u);
  const Connection& first = r.ended[0];
  EXPECT_EQ(first.id, 909u);
  EXPECT_EQ(first.close_kind, CloseKind::Aborted);
  EXPECT_EQ(first.closed_ns, ms(20));
  EXPECT_EQ(first.first_ns, ms(10));
  EXPECT_EQ(history_states(first), (V8{kTcpClose, kTcpSynSent, kTcpClose}));

  EXPECT_EQ(t.prev_state_ns, -1);
  ASSERT_NE(t.conn, nullptr);
  EXPECT_EQ(t.conn->open_kind, OpenKind::Active);
  EXPECT_EQ(t.conn->first_ns, ms(30));
  EXPECT_FALSE(t.conn->is_closed());
  EXPECT_EQ(t.conn->lport, 40001);
  EXPECT_EQ(history_states(*t.conn), (V8{kTcpClose, kTcpSynSent}));
  EXPECT_EQ(t.conn->state_since_ns, ms(30));
  EXPECT_EQ(r.tracker.size(), 1u);

  // The second lifecycle closes; the stale grace entry of the first must
  // neither end it early nor twice.
  r.run({State(ms(40), 909, kTcpSynSent, kTcpEstablished),
         State(ms(50), 909, kTcpEstablished, kTcpFinWait1),
         State(ms(51), 909, kTcpFinWait1, kTcpFinWait2),
         State(ms(52), 909, kTcpFinWait2, kTcpClose)});
  r.apply(State(ms(1021), 1, kTcpClose, kTcpSynSent));  // past the first grace
  EXPECT_EQ(r.ended.size(), 1u);
  r.apply(State(ms(1052) + 1, 1, kTcpSynSent, kTcpEstablished));  // past the second
  ASSERT_EQ(r.ended.size(), 2u);
  EXPECT_EQ(r.ended[1].id, 909u);
  EXPECT_EQ(r.ended[1].first_ns, ms(30));
  EXPECT_EQ(r.ended[1].close_kind, CloseKind::ActiveClose);
  EXPECT_EQ(r.tracker.find(909), nullptr);
  r.tracker.finish(ms(2000));
  ASSERT_EQ(r.ended.size(), 3u);
  EXPECT_EQ(r.ended[2].id, 1u);
  EXPECT_EQ(r.ended[2].close_kind, CloseKind::Open);
}

TEST(Tracker, CookieReuseStillOpenAtFinish) {
  Recorder r;
  r.run({State(ms(10), 910, kTcpClose, kTcpSynSent), State(ms(20), 910, kTcpSynSent, kTcpClose),
         State(ms(30), 910, kTcpClose, kTcpSynSent),
         State(ms(40), 910, kTcpSynSent, kTcpEstablished),
         State(ms(5000), 2, kTcpClose, kTcpSynSent)});  // first grace long over
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].closed_ns, ms(20));
  r.tracker.finish(ms(6000));
  ASSERT_EQ(r.ended.size(), 3u);
  EXPECT_EQ(r.ended[1].id, 910u);
  EXPECT_EQ(r.ended[1].first_ns, ms(30));
  EXPECT_EQ(r.ended[1].close_kind, CloseKind::Open);
  EXPECT_EQ(r.ended[1].state, kTcpEstablished);
  EXPECT_EQ(r.ended[2].id, 2u);
}

TEST(Tracker, ReuseAfterGraceIsAFreshConnection) {
  Recorder r;
  r.run({State(ms(10), 911, kTcpClose, kTcpSynSent), State(ms(20), 911, kTcpSynSent, kTcpClose),
         Lost(ms(1100), 3)});  // a LOST record advances event time too
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.tracker.size(), 0u);
  const Tracked t = r.apply(State(ms(1200), 911, kTcpClose, kTcpSynSent));
  ASSERT_NE(t.conn, nullptr);
  EXPECT_EQ(t.conn->open_kind, OpenKind::Active);
  EXPECT_EQ(r.ended.size(), 1u);
  r.tracker.finish(ms(1300));
  ASSERT_EQ(r.ended.size(), 2u);
  EXPECT_EQ(r.ended[1].first_ns, ms(1200));
  EXPECT_EQ(r.ended[1].close_kind, CloseKind::Open);
}

TEST(Tracker, CloseGraceIsExact) {
  TrackerLimits lim;
  lim.close_grace_ns = ms(500);
  Recorder r(lim);
  r.run({State(ms(90), 11, kTcpClose, kTcpSynSent), State(ms(100), 11, kTcpSynSent, kTcpClose),
         State(ms(100), 12, kTcpClose, kTcpSynSent)});
  r.apply(State(ms(600), 12, kTcpSynSent, kTcpEstablished));  // == closed + grace
  EXPECT_TRUE(r.ended.empty());
  ASSERT_NE(r.tracker.find(11), nullptr);
  // A late event of the closed connection, within the grace, still counts.
  r.apply(ResetSent(ms(600), 11, kTcpClose, kRstAbortOnData));
  EXPECT_TRUE(r.ended.empty());
  r.apply(Retransmit(ms(600) + 1, 12, kTcpEstablished, TCPSCOPE_TCP_ACK, 10));
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].id, 11u);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::ResetSent);
  EXPECT_EQ(r.tracker.find(11), nullptr);
  EXPECT_EQ(r.tracker.size(), 1u);

  // Closed within the grace at finish: final with its close kind.
  r.run({State(ms(700), 13, kTcpClose, kTcpSynSent),
         State(ms(701), 13, kTcpSynSent, kTcpEstablished),
         State(ms(702), 13, kTcpEstablished, kTcpFinWait1),
         State(ms(703), 13, kTcpFinWait1, kTcpFinWait2),
         State(ms(704), 13, kTcpFinWait2, kTcpClose)});
  EXPECT_EQ(r.ended.size(), 1u);
  r.tracker.finish(ms(705));
  ASSERT_EQ(r.ended.size(), 3u);
  EXPECT_EQ(r.ended[1].id, 12u);
  EXPECT_EQ(r.ended[1].close_kind, CloseKind::Open);
  EXPECT_EQ(r.ended[2].id, 13u);
  EXPECT_EQ(r.ended[2].close_kind, CloseKind::ActiveClose);
  // Nothing is ended twice, even by a second finish.
  r.tracker.finish(ms(800));
  EXPECT_EQ(r.ended.size(), 3u);
}

TEST(Tracker, FinishOrdersByStartThenId) {
  Recorder r;
  r.run({State(ms(5), 50, kTcpClose, kTcpSynSent), State(ms(5), 10, kTcpClose, kTcpSynSent),
         State(ms(7), 1, kTcpClose, kTcpSynSent), State(ms(6), 30, kTcpListen, kTcpSynRecv)});
  r.tracker.finish(ms(8));
  ASSERT_EQ(r.ended.size(), 4u);
  EXPECT_EQ(r.ended[0].id, 10u);
  EXPECT_EQ(r.ended[1].id, 50u);
  EXPECT_EQ(r.ended[2].id, 30u);
  EXPECT_EQ(r.ended[3].id, 1u);
  for (const Connection& c : r.ended) EXPECT_EQ(c.close_kind, CloseKind::Open);
}

TEST(Tracker, EndRecordFinishes) {
  Recorder r;
  r.apply(State(ms(5), 50, kTcpClose, kTcpSynSent));
  const Event end = End(ms(9));
  const Tracked t = r.apply(end);
  EXPECT_EQ(t.conn, nullptr);
  EXPECT_EQ(t.ev, &end);
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::Open);
  EXPECT_EQ(r.tracker.size(), 0u);
  EXPECT_EQ(r.tracker.last_ns(), ms(9));
}

// ---- partial knowledge ---------------------------------------------------------

TEST(Tracker, FirstSeenMidLife) {
  Recorder r;
  const VI prev = r.run({State(ms(100), 1111, kTcpEstablished, kTcpFinWait1),
                         State(ms(101), 1111, kTcpFinWait1, kTcpFinWait2),
                         State(ms(103), 1111, kTcpFinWait2, kTcpClose)});
  EXPECT_EQ(prev, (VI{-1, int64_t(ms(1)), int64_t(ms(2))}));
  r.tracker.finish(ms(104));
  ASSERT_EQ(r.ended.size(), 1u);
  const Connection& c = r.ended[0];
  EXPECT_EQ(c.open_kind, OpenKind::Unknown);
  EXPECT_EQ(c.close_kind, CloseKind::ActiveClose);
  EXPECT_EQ(history_states(c), (V8{kTcpFinWait1, kTcpFinWait2, kTcpClose}));
  EXPECT_EQ(c.fin_wait1_ns, ms(100));
  EXPECT_EQ(c.first_ns, ms(100));
}

// First event is the last transition: the close kind comes from the state it
// left, as it would had the whole lifecycle been seen.
TEST(Tracker, FirstSeenAtCloseClassifiesByStateLeft) {
  struct Case {
    uint8_t from;
    CloseKind kind;
  };
  const Case cases[] = {
      {kTcpFinWait1, CloseKind::ActiveClose}, {kTcpFinWait2, CloseKind::ActiveClose},
      {kTcpClosing, CloseKind::Simultaneous}, {kTcpLastAck, CloseKind::PassiveClose},
      {kTcpSynSent, CloseKind::Aborted},      {kTcpEstablished, CloseKind::Aborted},
  };
  for (const Case& k : cases) {
    Recorder r;
    EXPECT_EQ(r.apply(State(ms(10), 77, k.from, kTcpClose)).prev_state_ns, -1);
    r.tracker.finish(ms(11));
    ASSERT_EQ(r.ended.size(), 1u);
    EXPECT_EQ(r.ended[0].open_kind, OpenKind::Unknown);
    EXPECT_EQ(r.ended[0].close_kind, k.kind) << int(k.from);
    EXPECT_EQ(history_states(r.ended[0]), (V8{kTcpClose}));
  }
}

// A connection first seen through a non-transition event: its current state is
// known, not when it was entered, so the next transition is not timed.
TEST(Tracker, FirstSeenByRetransmitDoesNotTimeTheStateLeft) {
  Recorder r;
  const Tracked t0 = r.apply(Retransmit(ms(100), 1112, kTcpEstablished, TCPSCOPE_TCP_ACK, 100));
  ASSERT_NE(t0.conn, nullptr);
  EXPECT_EQ(t0.conn->open_kind, OpenKind::Unknown);
  EXPECT_EQ(t0.conn->state, kTcpEstablished);
  EXPECT_EQ(t0.conn->retransmits, 1u);
  const VI prev = r.run({State(ms(300), 1112, kTcpEstablished, kTcpFinWait1),
                         State(ms(301), 1112, kTcpFinWait1, kTcpFinWait2)});
  EXPECT_EQ(prev, (VI{-1, int64_t(ms(1))}));
  r.tracker.finish(ms(400));
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(history_states(r.ended[0]), (V8{kTcpFinWait1, kTcpFinWait2}));
  EXPECT_EQ(r.ended[0].fin_wait1_ns, ms(300));
  EXPECT_TRUE(r.ended[0].visited_state(kTcpEstablished));
}

TEST(Tracker, MissedTransitionIsNotTimed) {
  Recorder r;
  const VI prev = r.run({State(ms(1), 1113, kTcpClose, kTcpSynSent),
                         State(ms(2), 1113, kTcpSynSent, kTcpEstablished),
                         // ESTABLISHED -> FIN_WAIT1 lost
                         State(ms(9), 1113, kTcpFinWait1, kTcpFinWait2)});
  EXPECT_EQ(prev, (VI{-1, int64_t(ms(1)), -1}));
}

TEST(Tracker, SynSentTakesThePortFromTheNextEvent) {
  Recorder r;
  r.apply(State(ms(1), 1200, kTcpClose, kTcpSynSent).lport(0).laddr4(0, 0, 0, 0));
  const Connection* c = r.tracker.find(1200);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->lport, 0);
  EXPECT_EQ(c->laddr, (std::array<uint8_t, 16>{}));
  r.apply(State(ms(2), 1200, kTcpSynSent, kTcpEstablished).lport(40123).laddr4(192, 168, 1, 20));
  EXPECT_EQ(c->lport, 40123);
  EXPECT_EQ(c->laddr, (std::array<uint8_t, 16>{192, 168, 1, 20}));
  // Taken once: a later event does not move it.
  r.apply(State(ms(3), 1200, kTcpEstablished, kTcpFinWait1).lport(9).laddr4(1, 2, 3, 4));
  EXPECT_EQ(c->lport, 40123);
  EXPECT_EQ(c->laddr, (std::array<uint8_t, 16>{192, 168, 1, 20}));
}

TEST(Tracker, OwnerFromEventsWithPid) {
  Recorder r;
  r.apply(State(ms(1), 1300, kTcpListen, kTcpSynRecv));
  const Connection* c = r.tracker.find(1300);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->pid, 0u);
  EXPECT_EQ(comm_of(*c), "");
  EXPECT_EQ(c->owner_src, TCPSCOPE_OWNER_NONE);

  r.apply(
      State(ms(2), 1300, kTcpSynRecv, kTcpEstablished).owner(7, "nginx", TCPSCOPE_OWNER_LISTENER));
  EXPECT_EQ(c->pid, 7u);
  EXPECT_EQ(comm_of(*c), "nginx");
  EXPECT_EQ(c->owner_src, TCPSCOPE_OWNER_LISTENER);

  // A softirq event (pid 0) does not clear the owner.
  r.apply(Retransmit(ms(3), 1300, kTcpEstablished, TCPSCOPE_TCP_ACK, 1));
  EXPECT_EQ(c->pid, 7u);
  EXPECT_EQ(comm_of(*c), "nginx");

  // Refined on the first I/O; a full 16-byte comm has no terminator.
  r.apply(State(ms(4), 1300, kTcpEstablished, kTcpCloseWait)
              .owner(99, "abcdefghijklmnop", TCPSCOPE_OWNER_IO));
  EXPECT_EQ(c->pid, 99u);
  EXPECT_EQ(comm_of(*c), "abcdefghijklmnop");
  EXPECT_EQ(c->owner_src, TCPSCOPE_OWNER_IO);

  r.apply(State(ms(5), 1300, kTcpCloseWait, kTcpLastAck).owner(100, "sh"));
  EXPECT_EQ(c->pid, 100u);
  EXPECT_EQ(comm_of(*c), "sh");
  EXPECT_EQ(c->owner_src, TCPSCOPE_OWNER_SYSCALL);
}

// Without the kernel's socket table only the events that learn the owner
// carry it: the tracker keeps it for the rest, the first system call's
// caller stays (as the table kept it), and I/O refines a listener's owner.
TEST(Tracker, OwnerSentOnlyWhereLearntIsKept) {
  Recorder r;
  r.apply(State(ms(1), 1310, kTcpListen, kTcpSynRecv).owner(7, "master", TCPSCOPE_OWNER_LISTENER));
  r.apply(State(ms(2), 1310, kTcpSynRecv, kTcpEstablished));
  const Connection* c = r.tracker.find(1310);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->pid, 7u);
  EXPECT_EQ(c->owner_src, TCPSCOPE_OWNER_LISTENER);

  // The worker's first recv: no line of its own, the owner changes.
  const Tracked t = r.apply(Owner(ms(3), 1310, kTcpEstablished, 8, "worker"));
  EXPECT_EQ(t.conn, c);
  EXPECT_FALSE(t.gap);
  EXPECT_EQ(c->pid, 8u);
  EXPECT_EQ(comm_of(*c), "worker");
  EXPECT_EQ(c->owner_src, TCPSCOPE_OWNER_IO);
  EXPECT_EQ(c->state, kTcpEstablished) << "an owner record is no transition";

  // A listener's owner never replaces a refined one.
  r.apply(State(ms(4), 1310, kTcpEstablished, kTcpCloseWait)
              .owner(7, "master", TCPSCOPE_OWNER_LISTENER));
  EXPECT_EQ(c->pid, 8u);

  // close() in another process: a system call's caller is the owner...
  r.apply(State(ms(5), 1310, kTcpCloseWait, kTcpLastAck).owner(9, "closer"));
  EXPECT_EQ(c->pid, 9u);
  EXPECT_EQ(c->owner_src, TCPSCOPE_OWNER_SYSCALL);
  // ... and the first one stays: neither a later call nor I/O moves it.
  r.apply(Retransmit(ms(6), 1310, kTcpLastAck, TCPSCOPE_TCP_FIN, 0).owner(10, "other"));
  r.apply(Owner(ms(6), 1310, kTcpLastAck, 11, "late"));
  EXPECT_EQ(c->pid, 9u);
  EXPECT_EQ(comm_of(*c), "closer");

  // An owner record of a connection not tracked starts nothing.
  r.apply(Owner(ms(7), 1311, kTcpEstablished, 12, "stranger"));
  EXPECT_EQ(r.tracker.find(1311), nullptr);
}

TEST(Tracker, HistoryKeepsTheFirstStates) {
  Recorder r;
  r.apply(State(ms(1), 1400, kTcpClose, kTcpSynSent));
  r.apply(State(ms(2), 1400, kTcpSynSent, kTcpEstablished));
  // 14 more synthetic transitions: 17 states in all, 16 kept.
  uint8_t s = kTcpEstablished;
  for (int i = 0; i < 14; ++i) {
    const uint8_t next = s == kTcpEstablished ? kTcpCloseWait : kTcpEstablished;
    EXPECT_EQ(r.apply(State(ms(3 + i), 1400, s, next)).prev_state_ns, int64_t(ms(1)));
    s = next;
  }
  const Connection* c = r.tracker.find(1400);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->history_len, Connection::kHistory);
  EXPECT_EQ(c->history_dropped, 1);
  EXPECT_EQ(c->history_state(0), kTcpClose);
  EXPECT_EQ(c->history_state(14), kTcpEstablished);
  EXPECT_EQ(c->history_state(15), kTcpCloseWait);
  EXPECT_EQ(c->state, kTcpEstablished);  // current state is still exact
  EXPECT_EQ(c->state_since_ns, ms(16));
}

// A burst of connections takes chunks of slots; once they have all ended,
// the chunks go back, and the next connections work as before.
TEST(Tracker, ChunksOfEndedConnectionsGoBack) {
  Recorder r;
  constexpr uint64_t kBurst = 3000;
  for (uint64_t id = 1; id <= kBurst; ++id)
    r.apply(State(ms(1), id, kTcpClose, kTcpSynSent).lport(static_cast<uint16_t>(id)));
  EXPECT_EQ(r.tracker.chunks(), 3u);  // 1024 slots each
  for (uint64_t id = 1; id <= kBurst; ++id)
    r.apply(State(ms(2), id, kTcpSynSent, kTcpClose).lport(static_cast<uint16_t>(id)));
  // Past the close grace the lifecycles end; the chunks go on the next
  // event, a second later.
  r.apply(State(ms(1100), 90001, kTcpClose, kTcpSynSent));
  r.apply(State(ms(2200), 90001, kTcpSynSent, kTcpEstablished));
  EXPECT_EQ(r.ended.size(), kBurst);
  EXPECT_EQ(r.tracker.size(), 1u);
  EXPECT_EQ(r.tracker.chunks(), 1u);
  // Slots are handed out again, above the released ones too.
  for (uint64_t id = 100000; id < 100000 + kBurst; ++id)
    r.apply(State(ms(2300), id, kTcpClose, kTcpSynSent));
  EXPECT_EQ(r.tracker.size(), kBurst + 1);
  EXPECT_EQ(r.tracker.chunks(), 3u);
  const Connection* c = r.tracker.find(100000 + kBurst - 1);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->state, kTcpSynSent);
  ASSERT_NE(r.tracker.find(90001), nullptr);
  EXPECT_EQ(r.tracker.find(90001)->state, kTcpEstablished);
  r.tracker.finish(ms(2400));
  EXPECT_EQ(r.ended.size(), 2 * kBurst + 1);
}

// ---- ignored events ----------------------------------------------------------

TEST(Tracker, EventsWithoutConnection) {
  Recorder r;
  const Event no_sock =
      ResetSent(ms(1), 0, kTcpClose, kRstNoSocket).sk_flags(TCPSCOPE_SK_NO_SOCKET);
  EXPECT_EQ(r.apply(no_sock).conn, nullptr);
  // A LOST record's count lives in conn: it is not a connection id.
  EXPECT_EQ(r.apply(Lost(ms(2), 5)).conn, nullptr);
  // A tw-sock reset for a connection already forgotten.
  EXPECT_EQ(
      r.apply(ResetSent(ms(3), 77, kTcpTimeWait, kRstTimewaitSocket).sk_flags(TCPSCOPE_SK_TIMEWAIT))
          .conn,
      nullptr);
  EXPECT_EQ(r.tracker.size(), 0u);
  EXPECT_EQ(r.tracker.find(5), nullptr);
  EXPECT_EQ(r.tracker.last_ns(), ms(3));
  r.tracker.finish(ms(4));
  EXPECT_TRUE(r.ended.empty());
}

TEST(Tracker, TimewaitResetOfAKnownConnectionKeepsActiveClose) {
  Recorder r;
  r.run({State(ms(1), 1500, kTcpClose, kTcpSynSent),
         State(ms(2), 1500, kTcpSynSent, kTcpEstablished),
         State(ms(3), 1500, kTcpEstablished, kTcpFinWait1),
         State(ms(4), 1500, kTcpFinWait1, kTcpFinWait2),
         State(ms(5), 1500, kTcpFinWait2, kTcpClose)});
  const Tracked t = r.apply(
      ResetSent(ms(6), 1500, kTcpTimeWait, kRstTimewaitSocket).sk_flags(TCPSCOPE_SK_TIMEWAIT));
  ASSERT_NE(t.conn, nullptr);
  EXPECT_EQ(t.conn->resets_sent, 1u);
  r.tracker.finish(ms(7));
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::ActiveClose);
  EXPECT_EQ(r.ended[0].last_reset_reason, kRstTimewaitSocket);
}

TEST(Tracker, ListenerIsNotAConnection) {
  Recorder r;
  r.run({State(ms(1), 1600, kTcpClose, kTcpListen).lport(80).owner(7, "nginx"),
         State(ms(9), 1600, kTcpListen, kTcpClose).lport(80).owner(7, "nginx")});
  r.tracker.finish(ms(10));
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].open_kind, OpenKind::Listen);
  EXPECT_EQ(r.ended[0].lport, 80);
  EXPECT_EQ(history_states(r.ended[0]), (V8{kTcpClose, kTcpListen, kTcpClose}));
}

// ---- the connection cap ----------------------------------------------------------

TEST(Tracker, CapEvictsTheOldestOpenConnection) {
  TrackerLimits lim;
  lim.max_connections = 2;
  Recorder r(lim);
  r.run({State(ms(1), 1, kTcpClose, kTcpSynSent), State(ms(2), 2, kTcpClose, kTcpSynSent),
         State(ms(3), 3, kTcpClose, kTcpSynSent)});
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].id, 1u);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::Open);
  EXPECT_EQ(r.tracker.evicted(), 1u);
  EXPECT_EQ(r.tracker.size(), 2u);
  EXPECT_EQ(r.tracker.find(1), nullptr);
  // Events of known connections do not evict.
  r.apply(State(ms(4), 2, kTcpSynSent, kTcpEstablished));
  EXPECT_EQ(r.tracker.evicted(), 1u);
  r.apply(State(ms(5), 4, kTcpClose, kTcpSynSent));
  EXPECT_EQ(r.tracker.evicted(), 2u);
  ASSERT_EQ(r.ended.size(), 2u);
  EXPECT_EQ(r.ended[1].id, 2u);
  EXPECT_EQ(r.ended[1].state, kTcpEstablished);
}

TEST(Tracker, CapFinalisesClosedConnectionsFirst) {
  TrackerLimits lim;
  lim.max_connections = 2;
  Recorder r(lim);
  r.run({State(ms(1), 1, kTcpClose, kTcpSynSent), State(ms(2), 1, kTcpSynSent, kTcpClose),
         State(ms(3), 2, kTcpClose, kTcpSynSent), State(ms(4), 3, kTcpClose, kTcpSynSent)});
  ASSERT_EQ(r.ended.size(), 1u);
  EXPECT_EQ(r.ended[0].id, 1u);
  EXPECT_EQ(r.ended[0].close_kind, CloseKind::Aborted);
  EXPECT_EQ(r.tracker.evicted(), 0u);
  EXPECT_EQ(r.tracker.size(), 2u);
  EXPECT_NE(r.tracker.find(2), nullptr);
  EXPECT_NE(r.tracker.find(3), nullptr);
}

TEST(Tracker, CapEvictsByStartOfTheCurrentLifecycle) {
  TrackerLimits lim;
  lim.max_connections = 2;
  Recorder r(lim);
  r.run({State(ms(1), 1, kTcpClose, kTcpSynSent), State(ms(2), 1, kTcpSynSent, kTcpClose),
         State(ms(3), 2, kTcpClose, kTcpSynSent),
         State(ms(4), 1, kTcpClose, kTcpSynSent)});  // 1 starts again
  ASSERT_EQ(r.ended.size(), 1u);
  r.apply(State(ms(5), 3, kTcpClose, kTcpSynSent));
  // 2 (started at 3 ms) is the least recently started, not 1 (4 ms).
  ASSERT_EQ(r.ended.size(), 2u);
  EXPECT_EQ(r.ended[1].id, 2u);
  EXPECT_EQ(r.tracker.evicted(), 1u);
  EXPECT_NE(r.tracker.find(1), nullptr);
  EXPECT_NE(r.tracker.find(3), nullptr);
}

TEST(Tracker, CapUnderChurnKeepsEveryLifecycleOnce) {
  TrackerLimits lim;
  lim.max_connections = 8;
  lim.close_grace_ns = ms(1000);
  Recorder r(lim);
  // 3000 short connections, 1 ms apart, each closed after 2 ms: the cap,
  // the grace and the started-list compaction all run.
  for (uint64_t i = 1; i <= 3000; ++i) {
    r.apply(State(ms(i), i, kTcpClose, kTcpSynSent));
    if (i >= 3) r.apply(State(ms(i), i - 2, kTcpSynSent, kTcpClose));
    ASSERT_LE(r.tracker.size(), 8u);
  }
  r.tracker.finish(ms(4000));
  ASSERT_EQ(r.ended.size(), 3000u);
  std::vector<int> seen(3001, 0);
  uint64_t open = 0;
  for (const Connection& c : r.ended) {
    ASSERT_LE(c.id, 3000u);
    ++seen[c.id];
    if (c.close_kind == CloseKind::Open)
      ++open;
    else
      EXPECT_EQ(c.close_kind, CloseKind::Aborted);
  }
  for (uint64_t i = 1; i <= 3000; ++i) EXPECT_EQ(seen[i], 1) << i;
  EXPECT_EQ(open, 2u);  // the last two never closed
  EXPECT_EQ(r.tracker.evicted(), 0u);
}

}  // namespace
}  // namespace tcpscope
