// Real TIME_WAIT expiry (label "slow": about 65 s). Two namespaces, two
// tracers run side by side: one with the tw timer tracepoints (exact end),
// one with --no-tw-timers (sweeps every 0.2 s: the end is known to within
// half an interval). In each, one server-side TIME_WAIT is left to expire.
//
// The kernel's numbers: the server closes first, so its tw sock is born in
// the FIN_WAIT2 substate (tcp_fin_timeout = 60 s) and re-armed for
// TCP_TIMEWAIT_LEN = 60 s when the client's FIN arrives a few ms later. The
// timer wheel fires late, never early: at HZ 1000 a 60 s timer lands in the
// level with a 4.096 s granularity, so expiry is within [60 s, 64.1 s] plus
// the few ms between the two FINs.
#include <sys/socket.h>

#include <algorithm>
#include <cstdio>

#include "harness.hpp"

namespace ktest {
namespace {

constexpr int64_t kTimeWaitMs = 60000;
constexpr int64_t kWheelSlackMs = 5000;
constexpr int64_t kSweepIntervalMs = 200;

struct Side {
  std::unique_ptr<NetNs> ns;
  Tracer tracer;
  uint16_t sport = 0, cport = 0;
};

class TimeWaitSlowTest : public KernelTest {};

TEST_F(TimeWaitSlowTest, RealExpiryAfterSixtySecondsBothModes) {
  Side timer, sweep;
  for (Side* s : {&timer, &sweep}) {
    // Nothing shortens TIME_WAIT: default fin timeout, no reuse.
    s->ns = std::make_unique<NetNs>(
        std::vector<std::string>{"net.ipv4.tcp_fin_timeout=60", "net.ipv4.tcp_tw_reuse=0"});
  }
  ASSERT_TRUE(timer.tracer.start(*timer.ns)) << timer.tracer.diagnostics();
  ASSERT_TRUE(sweep.tracer.start(*sweep.ns, {"--no-tw-timers", "--tw-sweep-interval", "0.2"}))
      << sweep.tracer.diagnostics();

  for (Side* s : {&timer, &sweep}) {
    ScopedNetns in(*s->ns);
    Fd lfd(listen_tcp(AF_INET, "127.0.0.1"));
    ASSERT_TRUE(lfd.valid());
    s->sport = local_port(lfd.get());
    Fd c(connect_tcp(AF_INET, "127.0.0.1", s->sport));
    ASSERT_TRUE(c.valid());
    Fd a(accept_tcp(lfd.get()));
    ASSERT_TRUE(a.valid());
    s->cport = local_port(c.get());
    a.reset();  // the server closes first
    ASSERT_TRUE(wait_readable(c.get()));
    char byte;
    ASSERT_EQ(::recv(c.get(), &byte, 1, 0), 0);
    c.reset();
    ASSERT_TRUE(wait_until([&] {
      const auto all = ss_sockets(*s->ns);
      const auto tw = ss_find(all, s->sport, s->cport);
      return all.size() == 2 && tw.size() == 1 && tw[0].state == "TIME-WAIT";
    })) << s->ns->exec({"ss", "-tanoe"}).out;
    ASSERT_TRUE(s->tracer.wait_for(
        [&](const std::vector<json>& l) { return count_type(l, "time_wait_enter") == 1; }, 5000ms))
        << s->tracer.diagnostics();
  }

  // Both expire about 60 s from now; wait for both (bounded).
  for (Side* s : {&timer, &sweep}) {
    ASSERT_TRUE(s->tracer.wait_for(
        [&](const std::vector<json>& l) { return count_type(l, "time_wait_end") >= 1; },
        std::chrono::milliseconds(kTimeWaitMs + kWheelSlackMs + 10000)))
        << s->tracer.diagnostics();
    EXPECT_TRUE(ss_time_wait(*s->ns).empty()) << "the kernel's tw sock is gone";
  }

  struct Want {
    Side* side;
    const char* method;
    int64_t lo, hi;
  };
  for (const Want& w : {Want{&timer, "timer", kTimeWaitMs, kTimeWaitMs + kWheelSlackMs},
                        Want{&sweep, "sweep", kTimeWaitMs - kSweepIntervalMs / 2,
                             kTimeWaitMs + kWheelSlackMs + kSweepIntervalMs / 2}}) {
    SCOPED_TRACE(w.method);
    Side& s = *w.side;
    ASSERT_EQ(s.tracer.stop(), 0) << s.tracer.diagnostics();
    const std::string diag = s.tracer.diagnostics();
    const auto enters = s.tracer.events("time_wait_enter");
    const auto ends = s.tracer.events("time_wait_end");
    ASSERT_EQ(enters.size(), 1u) << diag;
    ASSERT_EQ(ends.size(), 1u) << diag;
    const json& e = ends[0];
    EXPECT_EQ(e.value("conn", uint64_t{0}), enters[0].value("conn", uint64_t{0})) << e.dump();
    EXPECT_EQ(e.value("lport", 0), s.sport) << e.dump();
    EXPECT_EQ(e.value("rport", 0), s.cport) << e.dump();
    EXPECT_EQ(e.value("cause", ""), "expired") << e.dump();
    EXPECT_EQ(e.value("substate", ""), "TIME_WAIT") << e.dump();
    EXPECT_EQ(e.value("method", ""), w.method) << e.dump();
    const int64_t ms = e.value("duration_ms", int64_t{-1});
    std::printf("%s mode: TIME_WAIT of %d->%d ended %s after %lld ms\n", w.method, s.sport, s.cport,
                e.value("cause", "?").c_str(), static_cast<long long>(ms));
    EXPECT_GE(ms, w.lo) << e.dump();
    EXPECT_LE(ms, w.hi) << e.dump();

    const json t = s.tracer.report().at("time_wait");
    EXPECT_EQ(t.at("entered"), 1) << t.dump();
    EXPECT_EQ(t.at("open"), 0) << t.dump();
    EXPECT_EQ(t.at("ended").at("expired"), 1) << t.dump();
    EXPECT_EQ(t.at("ended").at("recycled"), 0) << t.dump();
    EXPECT_EQ(t.at("ended").at("reused"), 0) << t.dump();
    EXPECT_EQ(t.at("ended").at("reset"), 0) << t.dump();
    EXPECT_EQ(t.at("duration_ms").at("count"), 1) << t.dump();
    EXPECT_EQ(t.at("end_method").at("method"), w.method) << t.dump();
    EXPECT_EQ(t.at("end_method").at(std::string(w.method) == "timer" ? "exact_ends" : "sweep_ends"),
              1)
        << t.dump();
  }
}

}  // namespace
}  // namespace ktest
