// TimeWaitSweep: successive streamed iter/tcp passes over timewait socks
// become TW_SEEN / TW_GONE / SWEEP records.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "tcpscope/timewait.hpp"

namespace tcpscope {
namespace {

SockRecord tw_record(uint64_t conn, uint64_t ts_ns, uint8_t substate = kTcpTimeWait) {
  SockRecord r;
  std::memset(&r, 0, sizeof r);
  r.conn = conn;
  r.ts_ns = ts_ns;
  r.expires_ns = ts_ns + 60'000'000'000ull;
  r.netns = 7;
  r.family = 4;
  r.lport = 80;
  r.rport = static_cast<uint16_t>(40000 + conn);
  r.state = kTcpTimeWait;
  r.substate = substate;
  return r;
}

struct Pass {
  std::vector<Event> out;
  void run(TimeWaitSweep& sweep, uint64_t t0, const std::vector<SockRecord>& records,
           bool initial = false, bool report_new_initial = true) {
    out.clear();
    sweep.begin(initial, report_new_initial);
    for (const SockRecord& r : records) sweep.see(r);
    sweep.finish(t0, t0 + 1000, 1000, [this](const Event& e) { out.push_back(e); });
  }
  std::vector<uint64_t> conns(uint8_t type) const {
    std::vector<uint64_t> v;
    for (const Event& e : out)
      if (e.type == type) v.push_back(e.conn);
    return v;
  }
};

TEST(TimeWaitSweep, NewChangedGoneAndTheSweepRecord) {
  TimeWaitSweep sweep;
  Pass p;
  p.run(sweep, 100, {tw_record(1, 110, kTcpFinWait2), tw_record(2, 111)});
  EXPECT_EQ(p.conns(TCPSCOPE_EV_TW_SEEN), (std::vector<uint64_t>{1, 2}));
  EXPECT_TRUE(p.conns(TCPSCOPE_EV_TW_GONE).empty());
  ASSERT_EQ(p.out.back().type, TCPSCOPE_EV_SWEEP);
  EXPECT_EQ(p.out.back().conn, 2u);  // sockets seen
  EXPECT_EQ(p.out[0].new_state, kTcpFinWait2);
  EXPECT_EQ(p.out[0].ts_ns, 110u);
  EXPECT_EQ(p.out[0].rport, 40001);

  // 1 moves to TIME_WAIT, 2 is unchanged (not reported again), 3 is new; a
  // full socket in the pass is no timewait sock.
  SockRecord full = tw_record(9, 205);
  full.state = full.substate = 1;
  p.run(sweep, 200, {tw_record(1, 210), tw_record(2, 211), tw_record(3, 212), full});
  EXPECT_EQ(p.conns(TCPSCOPE_EV_TW_SEEN), (std::vector<uint64_t>{1, 3}));
  EXPECT_EQ(p.out[0].new_state, kTcpTimeWait);
  EXPECT_EQ(p.out.back().conn, 3u);

  // 2 is gone: reported with the time since it was last seen.
  p.run(sweep, 300, {tw_record(1, 310), tw_record(3, 312)});
  EXPECT_TRUE(p.conns(TCPSCOPE_EV_TW_SEEN).empty());
  ASSERT_EQ(p.conns(TCPSCOPE_EV_TW_GONE), (std::vector<uint64_t>{2}));
  EXPECT_EQ(p.out[0].ts_ns, 300u);
  EXPECT_EQ(sweep.known(), 2u);
}

TEST(TimeWaitSweep, InitialPassReportsPreexistingOnlyIfAsked) {
  TimeWaitSweep hidden, shown;
  Pass p;
  p.run(hidden, 100, {tw_record(1, 110)}, true, false);
  EXPECT_TRUE(p.conns(TCPSCOPE_EV_TW_SEEN).empty());
  EXPECT_EQ(hidden.known(), 1u);
  p.run(hidden, 200, {tw_record(1, 210)});
  EXPECT_TRUE(p.conns(TCPSCOPE_EV_TW_SEEN).empty());  // still the same, known
  p.run(shown, 100, {tw_record(1, 110)}, true, true);
  ASSERT_EQ(p.conns(TCPSCOPE_EV_TW_SEEN), (std::vector<uint64_t>{1}));
  EXPECT_TRUE(p.out[0].sk_flags & TCPSCOPE_SK_SNAPSHOT);
}

// A pass that failed midway never finished: what it found new is reported
// by the next one, once.
TEST(TimeWaitSweep, FailedPassLosesNothing) {
  TimeWaitSweep sweep;
  sweep.begin(false, true);
  sweep.see(tw_record(1, 110));
  Pass p;
  p.run(sweep, 200, {tw_record(1, 210), tw_record(2, 211)});
  EXPECT_EQ(p.conns(TCPSCOPE_EV_TW_SEEN), (std::vector<uint64_t>{1, 2}));
  p.run(sweep, 300, {tw_record(1, 310), tw_record(2, 311)});
  EXPECT_TRUE(p.conns(TCPSCOPE_EV_TW_SEEN).empty());
}

// Sightings go out during the pass once the events of their time are read
// (settle), oldest first, each once; finish() sends the rest.
TEST(TimeWaitSweep, SettleSendsWhatIsOldEnough) {
  TimeWaitSweep sweep;
  std::vector<Event> out;
  const auto emit = [&out](const Event& e) { out.push_back(e); };
  sweep.begin(false, true);
  sweep.see(tw_record(1, 100));
  sweep.see(tw_record(2, 200));
  sweep.see(tw_record(3, 300));
  sweep.settle(100, emit);  // nothing made before 100
  EXPECT_TRUE(out.empty());
  sweep.settle(250, emit);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0].conn, 1u);
  EXPECT_EQ(out[1].conn, 2u);
  EXPECT_EQ(out[1].rport, 40002);  // a new one carries its tuple
  sweep.settle(250, emit);
  EXPECT_EQ(out.size(), 2u);
  sweep.see(tw_record(4, 400));
  sweep.finish(50, 500, 1000, emit);
  ASSERT_EQ(out.size(), 5u);  // 3, 4, then the SWEEP record
  EXPECT_EQ(out[2].conn, 3u);
  EXPECT_EQ(out[3].conn, 4u);
  EXPECT_EQ(out[4].type, TCPSCOPE_EV_SWEEP);
  EXPECT_EQ(out[4].conn, 4u);  // tw socks seen
}

}  // namespace
}  // namespace tcpscope
