// TIME_WAIT in a real kernel: every scenario runs twice, with the tw timer
// tracepoints (the default: exact entry and end) and with --no-tw-timers
// (iter/tcp sweeps every 0.2 s). Ground truth: ss and nstat in the test's
// own network namespace. Counts and causes are asserted exactly.
//
//   ServerClosesFirst      N server-side TIME_WAITs, matching ss tuple by tuple
//   BucketsZero            tcp_max_tw_buckets=0: N skipped, none entered
//   Recycled               a SYN on the tw's tuple: cause "recycled"; the new
//                          connection's own TIME_WAIT on that tuple stays open
//   Reused                 connect() takes over a client tw (tcp_tw_reuse=1)
//   ResetInFinWait2        the peer aborts (SO_LINGER 0) a FIN_WAIT2 tw sock
//   ResetInTimeWait        a raw in-window RST: kept with tcp_rfc1337=1,
//                          killed with tcp_rfc1337=0
//   SweepSeesEveryTw       2,000 tw socks: the sweep counts what ss counts
//
// Real expiry (60 s) is in timewait_slow_test.cpp (label "slow").
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <set>
#include <utility>

#include "harness.hpp"

namespace ktest {
namespace {

// TIME_WAIT seen by the tw timer probes or by sweeps; and each again with the
// raw_tp programs forced, whose ids are private where a socket has no
// cookie (the sweep must name a tw sock as its connection all the same).
enum class Mode { Timer, Sweep, TimerRawTp, SweepRawTp };

bool timers(Mode m) { return m == Mode::Timer || m == Mode::TimerRawTp; }
bool raw_tp(Mode m) { return m == Mode::TimerRawTp || m == Mode::SweepRawTp; }

std::vector<std::string> mode_args(Mode m) {
  std::vector<std::string> args;
  if (!timers(m)) args = {"--no-tw-timers", "--tw-sweep-interval", "0.2"};
  if (raw_tp(m)) args.insert(args.end(), {"--attach", "raw_tp"});
  return args;
}

const char* mode_name(Mode m) { return timers(m) ? "timer" : "sweep"; }

constexpr const char* kAddr = "127.0.0.1";

using Tuple = std::pair<uint16_t, uint16_t>;  // (lport, rport)

std::set<Tuple> tuples_of(const std::vector<json>& events) {
  std::set<Tuple> s;
  for (const auto& e : events)
    s.emplace(static_cast<uint16_t>(e.value("lport", 0)),
              static_cast<uint16_t>(e.value("rport", 0)));
  return s;
}

std::set<Tuple> tuples_of(const std::vector<SsSocket>& socks) {
  std::set<Tuple> s;
  for (const auto& k : socks) s.emplace(k.lport, k.rport);
  return s;
}

// A client socket with SO_REUSEADDR, bound to lport if nonzero, connected.
int connect_reuseaddr(uint16_t port, uint16_t lport) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  if (lport) {
    a.sin_port = htons(lport);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      ::close(fd);
      return -1;
    }
  }
  a.sin_port = htons(port);
  ::inet_pton(AF_INET, kAddr, &a.sin_addr);
  int rc;
  do {
    rc = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Waits for EOF (the peer's FIN) on fd.
bool read_eof(int fd) {
  char buf[64];
  if (!wait_readable(fd)) return false;
  return ::recv(fd, buf, sizeof(buf), 0) == 0;
}

// The server closes first; the client reads the FIN, then closes. The server
// side ends in TIME_WAIT (via the FIN_WAIT2 substate: it is orphaned).
// Returns the client port, 0 on failure.
uint16_t server_closes_first(int lfd, uint16_t sport, uint16_t bind_port = 0) {
  Fd c(connect_reuseaddr(sport, bind_port));
  if (!c.valid()) return 0;
  Fd a(accept_tcp(lfd));
  if (!a.valid()) return 0;
  const uint16_t cport = local_port(c.get());
  a.reset();
  if (!read_eof(c.get())) return 0;
  return cport;  // c closes here
}

// The tw socks ss shows, and nothing else but the listener: settled.
bool wait_settled(const NetNs& ns, size_t tw_count, Millis timeout = 10000ms) {
  return wait_until(
      [&] {
        const auto all = ss_sockets(ns);
        size_t tw = 0, other = 0;
        for (const auto& s : all) {
          if (s.state == "TIME-WAIT")
            ++tw;
          else if (s.state != "LISTEN")
            ++other;
        }
        return tw == tw_count && other == 0;
      },
      timeout, 10ms);
}

// Why a namespace did not settle: sockets by state, and the first few that
// are neither TIME-WAIT nor LISTEN.
std::string settle_diagnostics(const NetNs& ns) {
  std::map<std::string, size_t> states;
  std::string odd;
  size_t shown = 0;
  for (const auto& s : ss_sockets(ns)) {
    ++states[s.state];
    if (s.state != "TIME-WAIT" && s.state != "LISTEN" && shown++ < 10) odd += s.line + "\n";
  }
  std::string out = "sockets by state:";
  for (const auto& [state, n] : states) out += " " + state + "=" + std::to_string(n);
  return out + "\n" + odd;
}

class TimeWaitTest : public KernelTest, public ::testing::WithParamInterface<Mode> {
 protected:
  // Starts the tracer in this test's mode and checks the mode took.
  void start(Tracer& tracer, const NetNs& ns, std::vector<std::string> extra = {}) {
    auto args = mode_args(GetParam());
    args.insert(args.end(), extra.begin(), extra.end());
    ASSERT_TRUE(tracer.start(ns, args)) << tracer.diagnostics();
    bool timer_progs = false;
    for (const auto& p : tracer.start_line().at("programs"))
      if (p.get<std::string>().rfind("tw_start", 0) == 0) timer_progs = true;
    ASSERT_EQ(timer_progs, timers(GetParam())) << tracer.start_line().dump();
  }
  // Stops the tracer; checks the report's end method matches the mode.
  json stop(Tracer& tracer) {
    EXPECT_EQ(tracer.stop(), 0) << tracer.diagnostics();
    EXPECT_TRUE(tracer.bad_lines().empty()) << tracer.diagnostics();
    json report = tracer.report();
    EXPECT_EQ(ring_full_losses(report), 0u);
    const json& m = report.at("time_wait").at("end_method");
    EXPECT_EQ(m.at("method"), mode_name(GetParam())) << m.dump();
    EXPECT_EQ(m.at("entry"), mode_name(GetParam())) << m.dump();
    if (!timers(GetParam())) {
      EXPECT_EQ(m.at("sweep_interval_ms"), 200) << m.dump();
      EXPECT_EQ(m.at("max_error_ms"), 100) << m.dump();
    }
    EXPECT_GE(m.at("sweeps").get<uint64_t>(), 1u) << m.dump();
    return report;
  }
  // The method a time_wait_end caused by a new connection carries.
  std::string new_conn_method() const { return timers(GetParam()) ? "timer" : "event"; }
  // ... and one with no new connection (reset, expiry).
  std::string own_method() const { return mode_name(GetParam()); }
};

// Every cause except `except` is zero, and `except` is n.
void expect_ended(const json& tw, const std::string& cause, uint64_t n) {
  for (const auto& [k, v] : tw.at("ended").items())
    EXPECT_EQ(v.get<uint64_t>(), k == cause ? n : 0u) << "ended." << k << ": " << tw.dump();
}

// ---- (a) the server closes first: exactly N TIME_WAITs on the server side ----

TEST_P(TimeWaitTest, ServerClosesFirst) {
  constexpr size_t kN = 20;
  NetNs ns({"net.ipv4.tcp_tw_reuse=0"});
  Tracer tracer;
  start(tracer, ns);
  ASSERT_FALSE(HasFatalFailure());

  uint16_t sport = 0;
  std::set<uint16_t> cports;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(AF_INET, kAddr));
    ASSERT_TRUE(lfd.valid());
    sport = local_port(lfd.get());
    for (size_t i = 0; i < kN; ++i) {
      const uint16_t cport = server_closes_first(lfd.get(), sport);
      ASSERT_NE(cport, 0) << "connection " << i << ": " << std::strerror(errno);
      cports.insert(cport);
    }
    ASSERT_EQ(cports.size(), kN);
    ASSERT_TRUE(wait_settled(ns, kN)) << ns.exec({"ss", "-tan"}).out;
  }
  // (On timeout, go on: the exact counts below tell what is missing.)
  EXPECT_TRUE(tracer.wait_for(
      [&](const std::vector<json>& l) { return count_type(l, "time_wait_enter") >= kN; }, 5000ms));
  const auto tw = ss_time_wait(ns);
  const json report = stop(tracer);
  const std::string diag = tracer.diagnostics();

  // Kernel: N TIME_WAITs, all on the server port, one per client port.
  std::set<Tuple> want;
  for (uint16_t c : cports) want.emplace(sport, c);
  ASSERT_EQ(tw.size(), kN);
  EXPECT_EQ(tuples_of(tw), want);

  // Tracer: exactly one time_wait_enter per server-side connection, the
  // tuples ss shows, and nothing ended, skipped or timed out.
  const auto enters = tracer.events("time_wait_enter");
  ASSERT_EQ(enters.size(), kN) << diag;
  EXPECT_EQ(tuples_of(enters), want) << diag;
  std::set<uint64_t> conns;
  for (const auto& e : enters) {
    conns.insert(e.value("conn", uint64_t{0}));
    EXPECT_EQ(e.value("family", 0), 4) << e.dump();
    EXPECT_EQ(e.value("laddr", ""), kAddr) << e.dump();
    EXPECT_EQ(e.value("raddr", ""), kAddr) << e.dump();
    EXPECT_EQ(e.value("netns", uint64_t{0}), ns.inode()) << e.dump();
    const std::string sub = e.value("substate", "");
    EXPECT_TRUE(sub == "FIN_WAIT2" || sub == "TIME_WAIT") << e.dump();
    // It is the server connection's: the one whose path ends FIN_WAIT2 -> CLOSE.
    const auto path = tracer.state_path(e.value("conn", uint64_t{0}));
    ASSERT_GE(path.size(), 2u) << e.dump();
    EXPECT_EQ(path.front(), "LISTEN") << e.dump();
    EXPECT_EQ(path[path.size() - 2], "FIN_WAIT2") << e.dump();
    EXPECT_EQ(path.back(), "CLOSE") << e.dump();
  }
  EXPECT_EQ(conns.size(), kN);
  EXPECT_TRUE(tracer.events("time_wait_end").empty()) << diag;
  EXPECT_TRUE(tracer.events("time_wait_skipped").empty()) << diag;
  EXPECT_TRUE(tracer.events("fin_wait2_timeout").empty()) << diag;

  const json& t = report.at("time_wait");
  EXPECT_EQ(t.at("entered"), kN) << t.dump();
  EXPECT_EQ(t.at("open"), tw.size()) << t.dump();
  EXPECT_EQ(t.at("peak"), kN) << t.dump();
  EXPECT_EQ(t.at("skipped"), 0) << t.dump();
  EXPECT_EQ(t.at("fin_wait2_timeouts"), 0) << t.dump();
  EXPECT_EQ(t.at("preexisting"), 0) << t.dump();
  expect_ended(t, "expired", 0);
  EXPECT_EQ(t.at("duration_ms").at("count"), 0) << t.dump();
  // The final sweep (at stop) saw every one of them.
  EXPECT_EQ(t.at("end_method").at("sweep_max_sockets"), kN) << t.dump();

  // by_local_endpoint: the server's address and port hold them all.
  ASSERT_EQ(t.at("by_local_endpoint").size(), 1u) << t.dump();
  const json& ep = t.at("by_local_endpoint")[0];
  EXPECT_EQ(ep.at("laddr"), kAddr) << ep.dump();
  EXPECT_EQ(ep.at("lport"), std::to_string(sport)) << ep.dump();
  EXPECT_EQ(ep.at("entered"), kN) << ep.dump();
  EXPECT_EQ(ep.at("open"), kN) << ep.dump();

  // active_closer: the server closed every connection first.
  bool server_seen = false, client_seen = false;
  for (const auto& c : t.at("active_closer")) {
    EXPECT_EQ(c.at("addr"), kAddr) << c.dump();
    EXPECT_EQ(c.at("port"), sport) << c.dump();
    EXPECT_EQ(c.at("connections"), kN) << c.dump();
    EXPECT_EQ(c.at("simultaneous"), 0) << c.dump();
    if (c.at("role") == "server") {
      server_seen = true;
      EXPECT_EQ(c.at("local_first"), kN) << c.dump();
      EXPECT_EQ(c.at("peer_first"), 0) << c.dump();
    } else {
      client_seen = true;
      EXPECT_EQ(c.at("local_first"), 0) << c.dump();
      EXPECT_EQ(c.at("peer_first"), kN) << c.dump();
    }
  }
  EXPECT_TRUE(server_seen && client_seen) << t.dump();
  // No client-side TIME_WAIT: no port pressure towards the server.
  EXPECT_TRUE(t.at("port_exhaustion").at("remotes").empty()) << t.dump();
}

// ---- (b) tcp_max_tw_buckets=0: every TIME_WAIT is skipped ---------------------

TEST_P(TimeWaitTest, BucketsZeroSkipsEvery) {
  constexpr size_t kN = 20;
  NetNs ns({"net.ipv4.tcp_max_tw_buckets=0"});
  Tracer tracer;
  start(tracer, ns);
  ASSERT_FALSE(HasFatalFailure());

  uint16_t sport = 0;
  std::set<uint16_t> cports;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(AF_INET, kAddr));
    ASSERT_TRUE(lfd.valid());
    sport = local_port(lfd.get());
    for (size_t i = 0; i < kN; ++i) {
      Fd c(connect_tcp(AF_INET, kAddr, sport));
      ASSERT_TRUE(c.valid()) << std::strerror(errno);
      Fd a(accept_tcp(lfd.get()));
      ASSERT_TRUE(a.valid());
      const uint16_t cport = local_port(c.get());
      cports.insert(cport);
      // Half-closed first, closed in FIN_WAIT2: close() itself calls
      // tcp_time_wait(), which finds no bucket. (Closed in ESTABLISHED, the
      // FIN's ACK could reach the socket while close() still held its lock;
      // backlogged, it left an orphan in FIN_WAIT2 on a 60 s timer.)
      ASSERT_EQ(::shutdown(a.get(), SHUT_WR), 0) << std::strerror(errno);
      ASSERT_TRUE(read_eof(c.get()));
      ASSERT_TRUE(wait_ss_state(ns, sport, cport, "FIN-WAIT-2")) << ns.exec({"ss", "-tanoe"}).out;
      a.reset();
      // No tw sock: the server socket is gone at once.
      ASSERT_TRUE(wait_until([&] { return ss_find(ss_sockets(ns), sport, cport).empty(); }))
          << ns.exec({"ss", "-tanoe"}).out;
      c.reset();  // its FIN draws a RST (no socket)
    }
    ASSERT_TRUE(wait_settled(ns, 0)) << ns.exec({"ss", "-tan"}).out;
  }
  ASSERT_TRUE(tracer.wait_for(
      [&](const std::vector<json>& l) { return count_type(l, "time_wait_skipped") >= kN; }, 5000ms))
      << tracer.diagnostics();
  const auto tw = ss_time_wait(ns);
  const auto counters = nstat(ns);
  const json report = stop(tracer);
  const std::string diag = tracer.diagnostics();

  EXPECT_TRUE(tw.empty()) << tw.size() << " TIME_WAIT sockets";
  EXPECT_EQ(counters.at("TcpExtTCPTimeWaitOverflow"), kN);

  std::set<Tuple> want;
  for (uint16_t c : cports) want.emplace(sport, c);
  const auto skipped = tracer.events("time_wait_skipped");
  ASSERT_EQ(skipped.size(), kN) << diag;
  EXPECT_EQ(tuples_of(skipped), want) << diag;
  for (const auto& e : skipped) EXPECT_EQ(e.value("reason", ""), "overflow") << e.dump();
  EXPECT_TRUE(tracer.events("time_wait_enter").empty()) << diag;
  EXPECT_TRUE(tracer.events("time_wait_end").empty()) << diag;
  EXPECT_TRUE(tracer.events("fin_wait2_timeout").empty()) << diag;

  const json& t = report.at("time_wait");
  EXPECT_EQ(t.at("skipped"), kN) << t.dump();
  EXPECT_EQ(t.at("entered"), 0) << t.dump();
  EXPECT_EQ(t.at("open"), 0) << t.dump();
  EXPECT_EQ(t.at("peak"), 0) << t.dump();
  EXPECT_EQ(t.at("fin_wait2_timeouts"), 0) << t.dump();
  EXPECT_EQ(t.at("end_method").at("sweep_max_sockets"), 0) << t.dump();
  expect_ended(t, "expired", 0);
}

// ---- (c) recycled: a new SYN on the tw's tuple --------------------------------

TEST_P(TimeWaitTest, RecycledBySynOnSameTuple) {
  NetNs ns;
  Tracer tracer;
  start(tracer, ns);
  ASSERT_FALSE(HasFatalFailure());

  uint16_t sport = 0, cport = 0;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(AF_INET, kAddr));
    ASSERT_TRUE(lfd.valid());
    sport = local_port(lfd.get());
    cport = server_closes_first(lfd.get(), sport);
    ASSERT_NE(cport, 0);
    ASSERT_TRUE(wait_settled(ns, 1)) << ns.exec({"ss", "-tan"}).out;
    // Seen by the tracer (in sweep mode: by a sweep) before it is recycled.
    ASSERT_TRUE(tracer.wait_for(
        [&](const std::vector<json>& l) { return count_type(l, "time_wait_enter") == 1; }, 5000ms))
        << tracer.diagnostics();
    // The same client port again: the SYN hits the server's tw sock, which
    // gives the tuple to the listener (TCP_TW_SYN).
    const uint16_t again = server_closes_first(lfd.get(), sport, cport);
    ASSERT_EQ(again, cport) << std::strerror(errno);
    // The second connection closed the same way: a new tw on the same tuple.
    ASSERT_TRUE(wait_settled(ns, 1)) << ns.exec({"ss", "-tan"}).out;
    ASSERT_TRUE(tracer.wait_for(
        [&](const std::vector<json>& l) {
          return count_type(l, "time_wait_enter") == 2 && count_type(l, "time_wait_end") >= 1;
        },
        5000ms))
        << tracer.diagnostics();
  }
  const auto tw = ss_time_wait(ns);
  const json report = stop(tracer);
  const std::string diag = tracer.diagnostics();

  ASSERT_EQ(tw.size(), 1u);
  EXPECT_EQ(tuples_of(tw), (std::set<Tuple>{{sport, cport}}));

  const auto enters = tracer.events("time_wait_enter");
  ASSERT_EQ(enters.size(), 2u) << diag;
  const uint64_t first = enters[0].value("conn", uint64_t{0});
  const uint64_t second = enters[1].value("conn", uint64_t{0});
  EXPECT_NE(first, second) << diag;
  EXPECT_EQ(tuples_of(enters), (std::set<Tuple>{{sport, cport}})) << diag;

  // Exactly one end: the first tw, recycled. The second is still open.
  const auto ends = tracer.events("time_wait_end");
  ASSERT_EQ(ends.size(), 1u) << diag;
  const json& e = ends[0];
  EXPECT_EQ(e.value("conn", uint64_t{0}), first) << e.dump();
  EXPECT_EQ(e.value("cause", ""), "recycled") << e.dump();
  EXPECT_EQ(e.value("method", ""), new_conn_method()) << e.dump();
  EXPECT_EQ(e.value("substate", ""), "TIME_WAIT") << e.dump();
  EXPECT_EQ(e.value("lport", 0), sport) << e.dump();
  EXPECT_EQ(e.value("rport", 0), cport) << e.dump();
  ASSERT_TRUE(e.contains("duration_ms")) << e.dump();
  EXPECT_LT(e.at("duration_ms").get<int64_t>(), 10000) << e.dump();
  EXPECT_TRUE(tracer.events("time_wait_skipped").empty()) << diag;

  const json& t = report.at("time_wait");
  EXPECT_EQ(t.at("entered"), 2) << t.dump();
  EXPECT_EQ(t.at("open"), 1) << t.dump();
  EXPECT_EQ(t.at("skipped"), 0) << t.dump();
  expect_ended(t, "recycled", 1);
  EXPECT_EQ(t.at("duration_ms").at("count"), 1) << t.dump();
  EXPECT_EQ(t.at("end_method").at("exact_ends"), 1) << t.dump();
  EXPECT_EQ(t.at("end_method").at("sweep_ends"), 0) << t.dump();
}

// ---- (d) reused: connect() takes a client tw over (tcp_tw_reuse=1) -----------

TEST_P(TimeWaitTest, ReusedByConnect) {
  // One ephemeral port: the second connect() must take the first one's
  // TIME_WAIT tuple or fail. tcp_tw_reuse=1 lets it once the tw is older
  // than tcp_tw_reuse_delay (1 s by default, 1 ms here where settable).
  constexpr uint16_t kClientPort = 40000, kServerPort = 7000;
  std::vector<std::string> sysctls = {"net.ipv4.tcp_tw_reuse=1",
                                      "net.ipv4.ip_local_port_range=40000 40000"};
  const bool has_delay = ::access("/proc/sys/net/ipv4/tcp_tw_reuse_delay", F_OK) == 0;
  if (has_delay) sysctls.push_back("net.ipv4.tcp_tw_reuse_delay=1");
  NetNs ns(sysctls);
  Tracer tracer;
  start(tracer, ns);
  ASSERT_FALSE(HasFatalFailure());

  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(AF_INET, kAddr, kServerPort));
    ASSERT_TRUE(lfd.valid()) << std::strerror(errno);
    {
      Fd c(connect_tcp(AF_INET, kAddr, kServerPort));
      ASSERT_TRUE(c.valid()) << std::strerror(errno);
      Fd a(accept_tcp(lfd.get()));
      ASSERT_TRUE(a.valid());
      ASSERT_EQ(local_port(c.get()), kClientPort);
      c.reset();  // the client closes first: its tw holds the only port
      ASSERT_TRUE(read_eof(a.get()));
    }
    ASSERT_TRUE(wait_settled(ns, 1)) << ns.exec({"ss", "-tan"}).out;
    ASSERT_TRUE(tracer.wait_for(
        [&](const std::vector<json>& l) { return count_type(l, "time_wait_enter") == 1; }, 5000ms))
        << tracer.diagnostics();
    std::this_thread::sleep_for(has_delay ? 20ms : 1100ms);
    Fd c(connect_tcp(AF_INET, kAddr, kServerPort));
    ASSERT_TRUE(c.valid()) << "connect() did not reuse the TIME_WAIT: " << std::strerror(errno);
    ASSERT_EQ(local_port(c.get()), kClientPort);
    Fd a(accept_tcp(lfd.get()));
    ASSERT_TRUE(a.valid());
    ASSERT_TRUE(tracer.wait_for(
        [&](const std::vector<json>& l) { return count_type(l, "time_wait_end") >= 1; }, 5000ms))
        << tracer.diagnostics();
    const auto counters = nstat(ns);
    EXPECT_EQ(counters.at("TcpExtTWRecycled"), 1u) << "the kernel reused the tw sock";
    EXPECT_TRUE(ss_time_wait(ns).empty());
    // Leave the connection open until the tracer stopped: nothing else ends.
    const json report = stop(tracer);
    const std::string diag = tracer.diagnostics();

    const auto enters = tracer.events("time_wait_enter");
    ASSERT_EQ(enters.size(), 1u) << diag;
    EXPECT_EQ(enters[0].value("lport", 0), kClientPort) << enters[0].dump();
    EXPECT_EQ(enters[0].value("rport", 0), kServerPort) << enters[0].dump();
    const auto ends = tracer.events("time_wait_end");
    ASSERT_EQ(ends.size(), 1u) << diag;
    const json& e = ends[0];
    EXPECT_EQ(e.value("conn", uint64_t{0}), enters[0].value("conn", uint64_t{0})) << e.dump();
    EXPECT_EQ(e.value("cause", ""), "reused") << e.dump();
    EXPECT_EQ(e.value("method", ""), new_conn_method()) << e.dump();
    EXPECT_EQ(e.value("substate", ""), "TIME_WAIT") << e.dump();
    EXPECT_EQ(e.value("lport", 0), kClientPort) << e.dump();
    EXPECT_EQ(e.value("rport", 0), kServerPort) << e.dump();

    const json& t = report.at("time_wait");
    EXPECT_EQ(t.at("entered"), 1) << t.dump();
    EXPECT_EQ(t.at("open"), 0) << t.dump();
    expect_ended(t, "reused", 1);
    // The client side closed first, towards the one server port.
    ASSERT_EQ(t.at("port_exhaustion").at("port_range"), 1) << t.dump();
    ASSERT_EQ(t.at("port_exhaustion").at("remotes").size(), 1u) << t.dump();
    const json& r = t.at("port_exhaustion").at("remotes")[0];
    EXPECT_EQ(r.at("rport"), kServerPort) << r.dump();
    EXPECT_EQ(r.at("peak"), 1) << r.dump();
    EXPECT_EQ(r.at("open"), 0) << r.dump();
  }
}

// ---- (e) an RST kills a tw sock ----------------------------------------------------

// The peer aborts (SO_LINGER {1, 0}) after our FIN: its RST is in window for
// our orphaned FIN_WAIT2 tw sock, which dies (in any tcp_rfc1337 setting).
TEST_P(TimeWaitTest, ResetInFinWait2Substate) {
  NetNs ns;
  Tracer tracer;
  start(tracer, ns);
  ASSERT_FALSE(HasFatalFailure());

  uint16_t sport = 0, cport = 0;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(AF_INET, kAddr));
    ASSERT_TRUE(lfd.valid());
    sport = local_port(lfd.get());
    Fd c(connect_tcp(AF_INET, kAddr, sport));
    ASSERT_TRUE(c.valid());
    Fd a(accept_tcp(lfd.get()));
    ASSERT_TRUE(a.valid());
    cport = local_port(c.get());
    a.reset();
    ASSERT_TRUE(read_eof(c.get()));
    // The server's tw sock, substate FIN_WAIT2 (ss shows the substate).
    ASSERT_TRUE(wait_ss_state(ns, sport, cport, "FIN-WAIT-2")) << ns.exec({"ss", "-tanoe"}).out;
    ASSERT_TRUE(tracer.wait_for(
        [&](const std::vector<json>& l) { return count_type(l, "time_wait_enter") == 1; }, 5000ms))
        << tracer.diagnostics();
    ASSERT_TRUE(set_linger_zero(c.get()));
    c.reset();
    ASSERT_TRUE(wait_settled(ns, 0)) << ns.exec({"ss", "-tanoe"}).out;
  }
  ASSERT_TRUE(tracer.wait_for(
      [&](const std::vector<json>& l) { return count_type(l, "time_wait_end") >= 1; }, 5000ms))
      << tracer.diagnostics();
  const json report = stop(tracer);
  const std::string diag = tracer.diagnostics();

  const auto enters = tracer.events("time_wait_enter");
  ASSERT_EQ(enters.size(), 1u) << diag;
  EXPECT_EQ(enters[0].value("lport", 0), sport) << enters[0].dump();
  EXPECT_EQ(enters[0].value("rport", 0), cport) << enters[0].dump();
  const auto ends = tracer.events("time_wait_end");
  ASSERT_EQ(ends.size(), 1u) << diag;
  const json& e = ends[0];
  EXPECT_EQ(e.value("conn", uint64_t{0}), enters[0].value("conn", uint64_t{0})) << e.dump();
  EXPECT_EQ(e.value("cause", ""), "reset") << e.dump();
  EXPECT_EQ(e.value("substate", ""), "FIN_WAIT2") << e.dump();
  EXPECT_EQ(e.value("method", ""), own_method()) << e.dump();
  EXPECT_LT(e.value("duration_ms", int64_t{-1}), 10000) << e.dump();
  EXPECT_GE(e.value("duration_ms", int64_t{-1}), 0) << e.dump();

  const json& t = report.at("time_wait");
  EXPECT_EQ(t.at("entered"), 1) << t.dump();
  EXPECT_EQ(t.at("open"), 0) << t.dump();
  expect_ended(t, "reset", 1);
}

// TCP_REPAIR reads a socket's sequence numbers (CAP_NET_ADMIN). 0 on error.
uint32_t write_seq(int fd) {
  int on = 1, q = TCP_SEND_QUEUE, off = 0;
  uint32_t seq = 0;
  socklen_t len = sizeof(seq);
  if (::setsockopt(fd, IPPROTO_TCP, TCP_REPAIR, &on, sizeof(on)) != 0) return 0;
  const bool ok = ::setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, &q, sizeof(q)) == 0 &&
                  ::getsockopt(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, &seq, &len) == 0;
  ::setsockopt(fd, IPPROTO_TCP, TCP_REPAIR, &off, sizeof(off));
  return ok ? seq : 0;
}

uint16_t csum16(const void* data, size_t n, uint32_t sum = 0) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i + 1 < n; i += 2) sum += static_cast<uint32_t>(p[i] << 8 | p[i + 1]);
  if (n & 1) sum += static_cast<uint32_t>(p[n - 1] << 8);
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(~sum & 0xffff);
}

// Sends a bare RST 127.0.0.1:from -> 127.0.0.1:to with this sequence number
// from a raw socket (in the calling thread's namespace).
bool send_rst(uint16_t from, uint16_t to, uint32_t seq) {
  Fd raw(::socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_TCP));
  if (!raw.valid()) return false;
  tcphdr th{};
  th.source = htons(from);
  th.dest = htons(to);
  th.seq = htonl(seq);
  th.doff = sizeof(th) / 4;
  th.rst = 1;
  // Checksum over the pseudo header and the header.
  struct {
    uint32_t src, dst;
    uint8_t zero, proto;
    uint16_t len;
    tcphdr th;
  } __attribute__((packed)) ph{};
  ::inet_pton(AF_INET, kAddr, &ph.src);
  ::inet_pton(AF_INET, kAddr, &ph.dst);
  ph.proto = IPPROTO_TCP;
  ph.len = htons(sizeof(th));
  ph.th = th;
  th.check = htons(csum16(&ph, sizeof(ph)));
  sockaddr_in dst{};
  dst.sin_family = AF_INET;
  ::inet_pton(AF_INET, kAddr, &dst.sin_addr);
  return ::sendto(raw.get(), &th, sizeof(th), 0, reinterpret_cast<sockaddr*>(&dst), sizeof(dst)) ==
         static_cast<ssize_t>(sizeof(th));
}

// A TIME_WAIT (substate) tw sock gets a RST exactly at rcv_nxt: with
// tcp_rfc1337=1 it is ignored (the tw survives: no end is reported), with
// tcp_rfc1337=0 it kills the tw sock ("TIME_WAIT assassination").
TEST_P(TimeWaitTest, ResetInTimeWaitSubstate) {
  NetNs ns({"net.ipv4.tcp_rfc1337=1"});
  Tracer tracer;
  start(tracer, ns);
  ASSERT_FALSE(HasFatalFailure());

  uint16_t sport = 0, cport = 0;
  uint32_t rcv_nxt = 0;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(AF_INET, kAddr));
    ASSERT_TRUE(lfd.valid());
    sport = local_port(lfd.get());
    Fd c(connect_tcp(AF_INET, kAddr, sport));
    ASSERT_TRUE(c.valid());
    Fd a(accept_tcp(lfd.get()));
    ASSERT_TRUE(a.valid());
    cport = local_port(c.get());
    a.reset();
    ASSERT_TRUE(read_eof(c.get()));
    const uint32_t seq = write_seq(c.get());
    ASSERT_NE(seq, 0u) << "TCP_REPAIR: " << std::strerror(errno);
    rcv_nxt = seq + 1;  // past the client's FIN
    c.reset();
    ASSERT_TRUE(wait_settled(ns, 1)) << ns.exec({"ss", "-tanoe"}).out;
    lfd.reset();
    ASSERT_TRUE(tracer.wait_for(
        [&](const std::vector<json>& l) { return count_type(l, "time_wait_enter") == 1; }, 5000ms))
        << tracer.diagnostics();

    // tcp_rfc1337=1: the RST is dropped, the tw sock stays.
    ASSERT_TRUE(send_rst(cport, sport, rcv_nxt)) << std::strerror(errno);
    std::this_thread::sleep_for(300ms);  // more than a sweep interval
    ASSERT_EQ(ss_time_wait(ns).size(), 1u) << "tcp_rfc1337=1 kept the tw sock";
    ASSERT_TRUE(tracer.events("time_wait_end").empty()) << tracer.diagnostics();

    // tcp_rfc1337=0: the same RST kills it.
    ns.sysctl("net.ipv4.tcp_rfc1337=0");
    ASSERT_TRUE(send_rst(cport, sport, rcv_nxt)) << std::strerror(errno);
    ASSERT_TRUE(wait_settled(ns, 0)) << ns.exec({"ss", "-tanoe"}).out;
  }
  ASSERT_TRUE(tracer.wait_for(
      [&](const std::vector<json>& l) { return count_type(l, "time_wait_end") >= 1; }, 5000ms))
      << tracer.diagnostics();
  const json report = stop(tracer);
  const std::string diag = tracer.diagnostics();

  const auto enters = tracer.events("time_wait_enter");
  ASSERT_EQ(enters.size(), 1u) << diag;
  const auto ends = tracer.events("time_wait_end");
  ASSERT_EQ(ends.size(), 1u) << diag;
  const json& e = ends[0];
  EXPECT_EQ(e.value("conn", uint64_t{0}), enters[0].value("conn", uint64_t{0})) << e.dump();
  EXPECT_EQ(e.value("lport", 0), sport) << e.dump();
  EXPECT_EQ(e.value("rport", 0), cport) << e.dump();
  EXPECT_EQ(e.value("cause", ""), "reset") << e.dump();
  EXPECT_EQ(e.value("substate", ""), "TIME_WAIT") << e.dump();
  EXPECT_EQ(e.value("method", ""), own_method()) << e.dump();
  // It lived through the ignored RST: at least the 300 ms above.
  EXPECT_GE(e.value("duration_ms", int64_t{-1}), 300) << e.dump();
  EXPECT_LT(e.value("duration_ms", int64_t{-1}), 10000) << e.dump();

  const json& t = report.at("time_wait");
  EXPECT_EQ(t.at("entered"), 1) << t.dump();
  EXPECT_EQ(t.at("open"), 0) << t.dump();
  expect_ended(t, "reset", 1);
}

// ---- the sweep counts every tw sock ss shows ---------------------------------------

TEST_P(TimeWaitTest, SweepSeesEveryTimeWait) {
  constexpr size_t kN = 2000;
  NetNs ns({"net.ipv4.tcp_tw_reuse=0"});
  Tracer tracer;
  start(tracer, ns);
  ASSERT_FALSE(HasFatalFailure());

  uint16_t sport = 0;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(AF_INET, kAddr));
    ASSERT_TRUE(lfd.valid());
    sport = local_port(lfd.get());
    // A client port of its own for each: an ephemeral port the kernel picks
    // again carries a SYN onto the server's TIME_WAIT of its previous
    // connection and recycles it (a few dozen in 2000 were, here), and the
    // kernel then holds fewer than kN. Below the ephemeral range.
    constexpr uint16_t kFirstClientPort = 20000;
    for (size_t i = 0; i < kN; ++i) {
      const auto cport = static_cast<uint16_t>(kFirstClientPort + i);
      ASSERT_EQ(server_closes_first(lfd.get(), sport, cport), cport) << "connection " << i;
    }
    ASSERT_TRUE(wait_settled(ns, kN, 20000ms)) << settle_diagnostics(ns);
  }
  // A sweep after the last one entered: the tracer has them all.
  ASSERT_TRUE(tracer.wait_for(
      [&](const std::vector<json>& l) { return count_type(l, "time_wait_enter") >= kN; }, 10000ms))
      << tracer.diagnostics();
  const size_t ss_count = ss_time_wait(ns).size();
  const json report = stop(tracer);
  ASSERT_EQ(ss_count, kN);
  const json& t = report.at("time_wait");
  EXPECT_EQ(t.at("entered"), kN) << t.dump();
  EXPECT_EQ(t.at("open"), ss_count) << t.dump();
  EXPECT_EQ(t.at("end_method").at("sweep_max_sockets"), ss_count) << t.dump();
  expect_ended(t, "expired", 0);
  if (HasFailure()) {
    // Which tw socks ended, and what else the trace saw of their tuples.
    std::set<uint16_t> odd_ports;
    for (const auto& e : tracer.events("time_wait_end")) {
      ADD_FAILURE() << "ended: " << e.dump();
      odd_ports.insert(e.at("rport").get<uint16_t>());
    }
    for (const auto& e : tracer.lines())
      if (e.contains("rport") && odd_ports.count(e.at("rport").get<uint16_t>()))
        ADD_FAILURE() << "same tuple: " << e.dump();
    for (const auto& type : {"reset_sent", "reset_received", "lost"})
      for (const auto& e : tracer.events(type)) ADD_FAILURE() << e.dump();
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, TimeWaitTest,
                         ::testing::Values(Mode::Timer, Mode::Sweep, Mode::TimerRawTp,
                                           Mode::SweepRawTp),
                         [](const ::testing::TestParamInfo<Mode>& i) {
                           return std::string(timers(i.param) ? "Timers" : "Sweeps") +
                                  (raw_tp(i.param) ? "RawTp" : "");
                         });

// The namespace dismantled (ip netns del, no process left in it): the
// kernel kills its tw socks with it (inet_twsk_purge, the namespace's count
// at 0). They end with cause netns_exit, not as resets. Exact with the tw
// timers only: sweeps enter the namespace by its path, gone by then.
class NetnsExitTest : public KernelTest, public ::testing::WithParamInterface<Mode> {};

TEST_P(NetnsExitTest, TimeWaitEndsWithItsNamespace) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, mode_args(GetParam()))) << tracer.diagnostics();
  const ConnPorts ports = make_connection(ns, ConnSpec{});  // the client closes first
  ASSERT_TRUE(tracer.wait_for([](const std::vector<json>& l) {
    return count_type(l, "time_wait_enter") >= 1;
  })) << tracer.diagnostics();
  ASSERT_EQ(run_cmd({"ip", "netns", "del", ns.name()}).status, 0);
  ASSERT_TRUE(tracer.wait_for([](const std::vector<json>& l) {
    return count_type(l, "time_wait_end") >= 1;
  })) << tracer.diagnostics();
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const auto ends = tracer.events("time_wait_end");
  ASSERT_EQ(ends.size(), 1u) << tracer.diagnostics();
  EXPECT_EQ(ends[0].value("cause", ""), "netns_exit") << ends[0].dump();
  EXPECT_EQ(ends[0].value("method", ""), "timer") << ends[0].dump();
  EXPECT_EQ(ends[0].value("lport", 0), ports.cport) << ends[0].dump();
  expect_ended(tracer.report().at("time_wait"), "netns_exit", 1);
}

INSTANTIATE_TEST_SUITE_P(Timers, NetnsExitTest, ::testing::Values(Mode::Timer, Mode::TimerRawTp),
                         [](const ::testing::TestParamInfo<Mode>& i) {
                           return std::string(raw_tp(i.param) ? "RawTp" : "TpBtf");
                         });

}  // namespace
}  // namespace ktest
