// Resets in a real kernel (private netns, loopback): every RST gets its exact
// cause, late FINs/data answered with a RST name the connection that closed,
// its owner and how long ago it closed, and a retransmitted FIN in LAST_ACK
// absorbed by the peer's TIME_WAIT draws no RST at all. Ground truth: the
// kernel's own counters (nstat) and ss in the namespace.
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "harness.hpp"

namespace ktest {
namespace {

using Clock = std::chrono::steady_clock;

int64_t ms_since(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t).count();
}

// A connected pair in the calling thread's namespace: client and accepted
// server sockets.
struct Pair {
  Fd listener, client, server;
  uint16_t sport = 0, cport = 0;
};

::testing::AssertionResult make_pair(Pair& p) {
  p.listener = Fd(listen_tcp(AF_INET, "127.0.0.1"));
  if (!p.listener.valid())
    return ::testing::AssertionFailure() << "listen: " << std::strerror(errno);
  p.sport = local_port(p.listener.get());
  p.client = Fd(connect_tcp(AF_INET, "127.0.0.1", p.sport));
  if (!p.client.valid())
    return ::testing::AssertionFailure() << "connect: " << std::strerror(errno);
  p.server = Fd(accept_tcp(p.listener.get()));
  if (!p.server.valid()) return ::testing::AssertionFailure() << "accept: " << std::strerror(errno);
  p.cport = local_port(p.client.get());
  return ::testing::AssertionSuccess();
}

// No socket at all for lport -> rport (not even a tw sock).
bool gone(const NetNs& ns, uint16_t lport, uint16_t rport) {
  return ss_find(ss_sockets(ns), lport, rport).empty();
}

// nft in the namespace; false (with the error in *err) on failure.
bool nft(const NetNs& ns, const std::vector<std::string>& args, std::string* err = nullptr) {
  std::vector<std::string> argv{"nft"};
  argv.insert(argv.end(), args.begin(), args.end());
  const CmdResult r = ns.exec(argv);
  if (r.status != 0 && err) *err = join(argv) + ": " + r.err;
  return r.status == 0;
}

// An output-hook filter chain "inet tcpscope_t out" dropping what `match`
// selects (nft rule tokens).
::testing::AssertionResult drop_rule(const NetNs& ns, const std::vector<std::string>& match) {
  std::string err;
  if (!nft(ns, {"add", "table", "inet", "tcpscope_t"}, &err) ||
      !nft(ns,
           {"add", "chain", "inet", "tcpscope_t", "out",
            "{ type filter hook output priority 0 ; policy accept ; }"},
           &err))
    return ::testing::AssertionFailure() << err;
  std::vector<std::string> rule{"add", "rule", "inet", "tcpscope_t", "out"};
  rule.insert(rule.end(), match.begin(), match.end());
  rule.insert(rule.end(), {"counter", "drop"});
  if (!nft(ns, rule, &err)) return ::testing::AssertionFailure() << err;
  return ::testing::AssertionSuccess();
}

// Packets the drop rule matched so far (-1 if it cannot be read).
int64_t dropped_packets(const NetNs& ns) {
  const CmdResult r = ns.exec({"nft", "list", "chain", "inet", "tcpscope_t", "out"});
  const size_t at = r.out.find("packets ");
  if (r.status != 0 || at == std::string::npos) return -1;
  return std::stoll(r.out.substr(at + 8));
}

std::map<std::string, uint64_t> by_cause(const json& side) {
  std::map<std::string, uint64_t> m;
  for (const auto& [k, v] : side.at("by_cause").items()) m[k] = v.get<uint64_t>();
  return m;
}

// The report's "resets" must be exactly these counts.
void expect_reset_counts(const json& report, const std::map<std::string, uint64_t>& sent,
                         const std::map<std::string, uint64_t>& received) {
  const json& r = report.at("resets");
  uint64_t ns = 0, nr = 0;
  for (const auto& [k, v] : sent) ns += v;
  for (const auto& [k, v] : received) nr += v;
  EXPECT_EQ(r.at("sent").at("total").get<uint64_t>(), ns) << r.dump();
  EXPECT_EQ(by_cause(r.at("sent")), sent) << r.dump();
  EXPECT_EQ(r.at("received").at("total").get<uint64_t>(), nr) << r.dump();
  EXPECT_EQ(by_cause(r.at("received")), received) << r.dump();
  EXPECT_EQ(r.at("late_fin_dropped"), 0) << r.dump();
}

// What a reset_sent line must say.
struct SentWant {
  std::optional<uint64_t> conn;  // nullopt: null (no connection known)
  std::string state, reason, cause, seg_flags;
  uint32_t seg_len = 0;
  bool no_socket = false;
  uint16_t lport = 0, rport = 0;
  pid_t pid = 0;
  std::string comm;
  // since_close_ms must lie in [lo, hi]; absent if hi < 0.
  int64_t since_lo = 0, since_hi = -1;
};

void expect_sent(const json& e, const SentWant& w) {
  SCOPED_TRACE(e.dump());
  if (w.conn) {
    ASSERT_TRUE(has_conn(e));
    EXPECT_EQ(e.at("conn").get<uint64_t>(), *w.conn);
  } else {
    EXPECT_TRUE(e.at("conn").is_null());
  }
  EXPECT_EQ(e.at("family"), 4);
  EXPECT_EQ(e.at("laddr"), "127.0.0.1");
  EXPECT_EQ(e.at("raddr"), "127.0.0.1");
  EXPECT_EQ(e.at("lport"), w.lport);
  EXPECT_EQ(e.at("rport"), w.rport);
  EXPECT_EQ(e.at("state"), w.state);
  EXPECT_EQ(e.at("reason"), w.reason);
  EXPECT_EQ(e.at("cause"), w.cause);
  EXPECT_EQ(e.at("seg_flags"), w.seg_flags);
  EXPECT_EQ(e.at("seg_len"), w.seg_len);
  EXPECT_EQ(e.at("no_socket"), w.no_socket);
  EXPECT_EQ(e.at("pid"), w.pid);
  EXPECT_EQ(e.at("comm"), w.comm);
  if (w.since_hi < 0) {
    EXPECT_FALSE(e.contains("since_close_ms"));
  } else {
    ASSERT_TRUE(e.contains("since_close_ms"));
    EXPECT_GE(e.at("since_close_ms").get<int64_t>(), w.since_lo);
    EXPECT_LE(e.at("since_close_ms").get<int64_t>(), w.since_hi);
  }
}

void expect_received(const json& e, uint64_t conn, const std::string& state,
                     const std::string& cause, uint16_t lport, uint16_t rport) {
  SCOPED_TRACE(e.dump());
  ASSERT_TRUE(has_conn(e));
  EXPECT_EQ(e.at("conn").get<uint64_t>(), conn);
  EXPECT_EQ(e.at("state"), state);
  EXPECT_EQ(e.at("cause"), cause);
  EXPECT_EQ(e.at("lport"), lport);
  EXPECT_EQ(e.at("rport"), rport);
  EXPECT_EQ(e.at("pid"), ::getpid());
  EXPECT_EQ(e.at("comm"), own_comm());
}

// The late_fin_resets entry of a reset_sent line: the same facts, plus the
// peer that received it.
void expect_late_fin(const json& lf, const json& sent, uint64_t peer_conn,
                     const std::string& peer_state) {
  SCOPED_TRACE(lf.dump());
  for (const char* k : {"time", "conn", "family", "laddr", "lport", "raddr", "rport", "pid", "comm",
                        "since_close_ms", "cause", "reason", "seg_flags", "seg_len"})
    EXPECT_EQ(lf.at(k), sent.at(k)) << k;
  ASSERT_TRUE(lf.at("peer").is_object());
  EXPECT_EQ(lf.at("peer").at("conn").get<uint64_t>(), peer_conn);
  EXPECT_EQ(lf.at("peer").at("state"), peer_state);
  EXPECT_EQ(lf.at("peer").at("pid"), ::getpid());
  EXPECT_EQ(lf.at("peer").at("comm"), own_comm());
}

class ResetTest : public KernelTest {};

// ---- the seed scenario: no TIME_WAIT (bucket overflow) ------------------------

constexpr const char* kClientComm = "rst-client";

// The client, in its own process: connects, closes on request, and stays
// alive until told to exit (its pid must be the owner the report names).
int overflow_client(Channel& ch, uint16_t sport) {
  ::prctl(PR_SET_NAME, kClientComm, 0, 0, 0);
  Fd fd(connect_tcp(AF_INET, "127.0.0.1", sport));
  if (!fd.valid()) return 20;
  if (!ch.child_send("port " + std::to_string(local_port(fd.get())))) return 21;
  if (!ch.child_expect("close")) return 22;
  fd.reset();
  if (!ch.child_send("closed")) return 23;
  return ch.child_expect("exit") ? 0 : 24;
}

TEST_F(ResetTest, NoTimeWaitLateFinDrawsResetNamingTheClosedClient) {
  NetNs ns({"net.ipv4.tcp_max_tw_buckets=0"});
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();

  uint16_t sport = 0, cport = 0;
  pid_t client_pid = -1;
  int64_t since_lo = 0, since_hi = 0;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(AF_INET, "127.0.0.1"));
    ASSERT_TRUE(lfd.valid());
    sport = local_port(lfd.get());
    Channel ch;
    client_pid = ns.spawn([&] { return overflow_client(ch, sport); });
    const auto port = ch.recv();
    ASSERT_TRUE(port && port->rfind("port ", 0) == 0);
    cport = static_cast<uint16_t>(std::stoi(port->substr(5)));
    Fd afd(accept_tcp(lfd.get()));
    ASSERT_TRUE(afd.valid());
    ASSERT_EQ(peer_port(afd.get()), cport);

    const auto before_close = Clock::now();
    ASSERT_TRUE(ch.send("close"));
    ASSERT_EQ(ch.recv(), "closed");
    const auto after_close = Clock::now();
    // tcp_time_wait() found no bucket: the client socket is gone at once.
    ASSERT_TRUE(wait_ss_state(ns, sport, cport, "CLOSE-WAIT"));
    ASSERT_TRUE(wait_until([&] { return gone(ns, cport, sport); }))
        << ns.exec({"ss", "-tanoe"}).out;
    std::this_thread::sleep_for(300ms);
    since_lo =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - after_close).count();
    afd.reset();  // the server's FIN: no socket answers but with a RST
    ASSERT_TRUE(wait_until([&] { return gone(ns, sport, cport); }))
        << ns.exec({"ss", "-tanoe"}).out;
    since_hi = ms_since(before_close);
    ASSERT_TRUE(ch.send("exit"));
    EXPECT_EQ(ns.wait(client_pid), 0);
  }
  const auto counters = nstat(ns);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  EXPECT_TRUE(tracer.bad_lines().empty()) << diag;

  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;
  EXPECT_EQ(tracer.state_path(client[0]), kActiveOpenActiveClose) << diag;
  EXPECT_EQ(tracer.state_path(server[0]), kPassiveOpenPassiveClose) << diag;

  const auto sent = tracer.events("reset_sent");
  ASSERT_EQ(sent.size(), 1u) << diag;
  expect_sent(sent[0], {client[0], "NONE", "NO_SOCKET", "no_time_wait", "FIN|ACK", 0, true, cport,
                        sport, client_pid, kClientComm, since_lo, since_hi});
  const auto received = tracer.events("reset_received");
  ASSERT_EQ(received.size(), 1u) << diag;
  expect_received(received[0], server[0], "LAST_ACK", "no_time_wait", sport, cport);

  const json report = tracer.report();
  expect_reset_counts(report, {{"no_time_wait", 1}}, {{"no_time_wait", 1}});
  const json& late = report.at("late_fin_resets");
  ASSERT_EQ(late.size(), 1u) << late.dump();
  expect_late_fin(late[0], sent[0], server[0], "LAST_ACK");
  EXPECT_EQ(report.at("time_wait").at("skipped"), 1) << report.at("time_wait").dump();
  const auto skipped = tracer.events("time_wait_skipped");
  ASSERT_EQ(skipped.size(), 1u) << diag;
  EXPECT_EQ(skipped[0].value("conn", uint64_t{0}), client[0]);

  EXPECT_EQ(counters.at("TcpExtTCPTimeWaitOverflow"), 1u);
  EXPECT_EQ(counters.at("TcpOutRsts"), 1u);
  EXPECT_EQ(counters.at("TcpRetransSegs"), 0u);
}

// ---- the final ACK lost: the server retransmits its FIN in LAST_ACK ----------

TEST_F(ResetTest, LostFinalAckRetransmitsFinInLastAckAndTimeWaitAnswers) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();

  uint16_t sport = 0, cport = 0;
  int64_t drops = -1;
  std::vector<SsSocket> tw;
  {
    ScopedNetns in(ns);
    Pair p;
    ASSERT_TRUE(make_pair(p));
    sport = p.sport;
    cport = p.cport;
    p.client.reset();
    ASSERT_TRUE(wait_ss_state(ns, cport, sport, "FIN-WAIT-2"));
    ASSERT_TRUE(wait_ss_state(ns, sport, cport, "CLOSE-WAIT"));
    // From now on the client's only segment is the ACK of the server's FIN:
    // a bare ACK from cport to sport. Drop it.
    ASSERT_TRUE(drop_rule(
        ns, {"ip", "saddr", "127.0.0.1", "tcp", "sport", std::to_string(cport), "tcp", "dport",
             std::to_string(sport), "tcp", "flags", "&", "(fin|syn|rst|psh|ack)", "==", "ack"}));
    p.server.reset();
    // Two retransmitted FINs (RTO 200 ms, then 400 ms), each answered by
    // the client's tw sock with an ACK that is dropped too.
    ASSERT_TRUE(tracer.wait_for(
        [&](const std::vector<json>& l) {
          return std::count_if(l.begin(), l.end(), [](const json& e) {
                   return e.value("type", "") == "retransmit";
                 }) >= 2;
        },
        5000ms))
        << tracer.diagnostics();
    ASSERT_TRUE(wait_ss_state(ns, sport, cport, "LAST-ACK")) << ns.exec({"ss", "-tanoe"}).out;
    drops = dropped_packets(ns);
    ASSERT_TRUE(nft(ns, {"delete", "table", "inet", "tcpscope_t"}));
    // The next retransmission is acked by the tw sock: LAST_ACK ends.
    ASSERT_TRUE(wait_until([&] { return ss_find(ss_sockets(ns), sport, cport).empty(); }, 10000ms))
        << ns.exec({"ss", "-tanoe"}).out;
    tw = ss_time_wait(ns);
  }
  const auto counters = nstat(ns);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();

  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;
  EXPECT_EQ(tracer.state_path(server[0]), kPassiveOpenPassiveClose) << diag;

  // Every retransmission is the server's FIN, in LAST_ACK.
  const auto rtx = tracer.events("retransmit");
  ASSERT_GE(rtx.size(), 3u) << diag;  // two before the rule went, one after
  for (const auto& e : rtx) {
    EXPECT_EQ(e.value("conn", uint64_t{0}), server[0]) << e.dump();
    EXPECT_EQ(e.value("state", ""), "LAST_ACK") << e.dump();
    EXPECT_NE(e.value("flags", "").find("FIN"), std::string::npos) << e.dump();
    EXPECT_EQ(e.value("bytes", -1), 0) << e.dump();
    EXPECT_EQ(e.value("pid", 0), ::getpid()) << e.dump();
  }
  EXPECT_EQ(rtx.back().value("count", 0u), rtx.size()) << rtx.back().dump();
  // Each dropped ACK answered the original FIN or one retransmission.
  EXPECT_EQ(drops, static_cast<int64_t>(rtx.size())) << diag;

  // The client's TIME_WAIT absorbed every FIN: no RST anywhere.
  EXPECT_TRUE(tracer.events("reset_sent").empty()) << diag;
  EXPECT_TRUE(tracer.events("reset_received").empty()) << diag;
  const json report = tracer.report();
  expect_reset_counts(report, {}, {});
  EXPECT_TRUE(report.at("late_fin_resets").empty()) << report.at("late_fin_resets").dump();

  const json& r = report.at("retransmits");
  EXPECT_EQ(r.at("total").get<uint64_t>(), rtx.size()) << r.dump();
  EXPECT_EQ(r.at("connections"), 1) << r.dump();
  ASSERT_EQ(r.at("top").size(), 1u) << r.dump();
  const json& top = r.at("top")[0];
  EXPECT_EQ(top.at("conn").get<uint64_t>(), server[0]) << top.dump();
  EXPECT_EQ(top.at("lport"), sport) << top.dump();
  EXPECT_EQ(top.at("rport"), cport) << top.dump();
  EXPECT_EQ(top.at("count").get<uint64_t>(), rtx.size()) << top.dump();
  EXPECT_EQ(top.at("fin").get<uint64_t>(), rtx.size()) << top.dump();
  EXPECT_EQ(top.at("last_state"), "LAST_ACK") << top.dump();
  EXPECT_EQ(top.at("states"), json::array({"LAST_ACK"})) << top.dump();
  EXPECT_EQ(top.at("first"), rtx.front().at("time")) << top.dump();
  EXPECT_EQ(top.at("last"), rtx.back().at("time")) << top.dump();

  ASSERT_EQ(tw.size(), 1u);
  EXPECT_EQ(tw[0].lport, cport);
  EXPECT_EQ(counters.at("TcpRetransSegs"), rtx.size()) << dump(tracer.events("retransmit"));
  EXPECT_EQ(counters.at("TcpOutRsts"), 0u);
}

// ---- local aborts: SO_LINGER 0, unread data -----------------------------------

TEST_F(ResetTest, LingerZeroIsLingerAbort) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();
  uint16_t sport = 0, cport = 0;
  {
    ScopedNetns in(ns);
    Pair p;
    ASSERT_TRUE(make_pair(p));
    sport = p.sport;
    cport = p.cport;
    ASSERT_TRUE(set_linger_zero(p.client.get()));
    p.client.reset();
    ASSERT_TRUE(wait_readable(p.server.get()));
    EXPECT_EQ(socket_error(p.server.get()), ECONNRESET);
  }
  const auto counters = nstat(ns);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;

  const auto sent = tracer.events("reset_sent");
  ASSERT_EQ(sent.size(), 1u) << diag;
  // tcp_disconnect() moves to CLOSE, then sends the RST with reason
  // TCP_STATE: only tcpscope's analysis tells it is SO_LINGER 0.
  expect_sent(sent[0], {client[0], "CLOSE", "TCP_STATE", "linger_abort", "", 0, false, cport, sport,
                        ::getpid(), own_comm(), 0, -1});
  const auto received = tracer.events("reset_received");
  ASSERT_EQ(received.size(), 1u) << diag;
  expect_received(received[0], server[0], "ESTABLISHED", "linger_abort", sport, cport);

  const json report = tracer.report();
  expect_reset_counts(report, {{"linger_abort", 1}}, {{"linger_abort", 1}});
  EXPECT_TRUE(report.at("late_fin_resets").empty()) << report.dump();
  EXPECT_EQ(counters.at("TcpOutRsts"), 1u);
  EXPECT_EQ(counters.at("TcpExtTCPAbortOnData"), 1u);  // what tcp_close() counts for it
  EXPECT_EQ(counters.at("TcpExtTCPAbortOnClose"), 0u);
  EXPECT_EQ(counters.at("TcpExtTCPAbortOnLinger"), 0u);
}

TEST_F(ResetTest, CloseWithUnreadDataIsUnreadData) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();
  uint16_t sport = 0, cport = 0;
  {
    ScopedNetns in(ns);
    Pair p;
    ASSERT_TRUE(make_pair(p));
    sport = p.sport;
    cport = p.cport;
    ASSERT_EQ(::send(p.server.get(), "0123456789", 10, 0), 10);
    ASSERT_TRUE(wait_readable(p.client.get()));
    p.client.reset();  // 10 bytes never read
    ASSERT_TRUE(wait_readable(p.server.get()));
    EXPECT_EQ(socket_error(p.server.get()), ECONNRESET);
  }
  const auto counters = nstat(ns);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;

  const auto sent = tracer.events("reset_sent");
  ASSERT_EQ(sent.size(), 1u) << diag;
  expect_sent(sent[0], {client[0], "CLOSE", "TCP_ABORT_ON_CLOSE", "unread_data", "", 0, false,
                        cport, sport, ::getpid(), own_comm(), 0, -1});
  const auto received = tracer.events("reset_received");
  ASSERT_EQ(received.size(), 1u) << diag;
  expect_received(received[0], server[0], "ESTABLISHED", "unread_data", sport, cport);

  const json report = tracer.report();
  expect_reset_counts(report, {{"unread_data", 1}}, {{"unread_data", 1}});
  EXPECT_TRUE(report.at("late_fin_resets").empty()) << report.dump();
  EXPECT_EQ(counters.at("TcpOutRsts"), 1u);
  EXPECT_EQ(counters.at("TcpExtTCPAbortOnClose"), 1u);
  EXPECT_EQ(counters.at("TcpExtTCPAbortOnData"), 0u);
}

// ---- data sent to a socket already closed for reading ---------------------------

enum class AfterClose {
  TimeWaitSock,  // default: the orphan FIN_WAIT2 became a tw sock
  FullFinWait2,  // tcp_fin_timeout 120: the orphan stays a full FIN_WAIT2
  FullFinWait1,  // the ACK of its FIN dropped: still FIN_WAIT1
};

std::string after_close_name(const ::testing::TestParamInfo<AfterClose>& i) {
  switch (i.param) {
    case AfterClose::TimeWaitSock:
      return "TimeWaitSock";
    case AfterClose::FullFinWait2:
      return "FullFinWait2";
    case AfterClose::FullFinWait1:
      return "FullFinWait1";
  }
  return "?";
}

class DataAfterCloseTest : public KernelTest, public ::testing::WithParamInterface<AfterClose> {};

TEST_P(DataAfterCloseTest, PeerDataAfterCloseIsDataAfterClose) {
  const AfterClose mode = GetParam();
  std::vector<std::string> sysctls;
  if (mode == AfterClose::FullFinWait2) sysctls.push_back("net.ipv4.tcp_fin_timeout=120");
  NetNs ns(sysctls);
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();

  uint16_t sport = 0, cport = 0;
  int64_t since_lo = 0, since_hi = 0;
  {
    ScopedNetns in(ns);
    Pair p;
    ASSERT_TRUE(make_pair(p));
    sport = p.sport;
    cport = p.cport;
    if (mode == AfterClose::FullFinWait1) {
      ASSERT_TRUE(drop_rule(
          ns, {"ip", "saddr", "127.0.0.1", "tcp", "sport", std::to_string(sport), "tcp", "dport",
               std::to_string(cport), "tcp", "flags", "&", "(fin|syn|rst|psh|ack)", "==", "ack"}));
    }
    const auto before_close = Clock::now();
    p.client.reset();
    const auto after_close = Clock::now();
    ASSERT_TRUE(wait_ss_state(ns, sport, cport, "CLOSE-WAIT"));
    ASSERT_TRUE(wait_ss_state(ns, cport, sport,
                              mode == AfterClose::FullFinWait1 ? "FIN-WAIT-1" : "FIN-WAIT-2"))
        << ns.exec({"ss", "-tanoe"}).out;
    if (mode != AfterClose::FullFinWait1) std::this_thread::sleep_for(100ms);
    since_lo =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - after_close).count();
    ASSERT_EQ(::send(p.server.get(), "hello", 5, 0), 5);
    ASSERT_TRUE(wait_readable(p.server.get()));
    since_hi = ms_since(before_close);
    // tcp_reset() in CLOSE_WAIT reports EPIPE.
    EXPECT_EQ(socket_error(p.server.get()), EPIPE);
    ASSERT_TRUE(wait_until([&] { return gone(ns, cport, sport); }))
        << ns.exec({"ss", "-tanoe"}).out;
    if (mode == AfterClose::FullFinWait1) {
      ASSERT_TRUE(nft(ns, {"delete", "table", "inet", "tcpscope_t"}));
    }
  }
  const auto counters = nstat(ns);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;

  const bool tw_sock = mode == AfterClose::TimeWaitSock;
  const auto sent = tracer.events("reset_sent");
  ASSERT_EQ(sent.size(), 1u) << diag;
  expect_sent(sent[0],
              {client[0], tw_sock ? "TIME_WAIT" : "CLOSE",
               tw_sock ? "TCP_TIMEWAIT_SOCKET" : "TCP_ABORT_ON_DATA", "data_after_close", "PSH|ACK",
               5, false, cport, sport, ::getpid(), own_comm(), since_lo, since_hi});
  // Only the server received a RST (the kernel's tcp_reset() on the closed
  // side is not one).
  const auto received = tracer.events("reset_received");
  ASSERT_EQ(received.size(), 1u) << diag;
  expect_received(received[0], server[0], "CLOSE_WAIT", "data_after_close", sport, cport);

  const json report = tracer.report();
  expect_reset_counts(report, {{"data_after_close", 1}}, {{"data_after_close", 1}});
  const json& late = report.at("late_fin_resets");
  ASSERT_EQ(late.size(), 1u) << late.dump();
  expect_late_fin(late[0], sent[0], server[0], "CLOSE_WAIT");
  // An abort is not a TIME_WAIT overflow.
  EXPECT_TRUE(tracer.events("time_wait_skipped").empty()) << diag;
  EXPECT_EQ(report.at("time_wait").at("skipped"), 0) << report.at("time_wait").dump();

  EXPECT_EQ(counters.at("TcpOutRsts"), 1u);
  EXPECT_EQ(counters.at("TcpExtTCPAbortOnData"), tw_sock ? 0u : 1u);
  EXPECT_EQ(counters.at("TcpExtTCPTimeWaitOverflow"), 0u);
}

INSTANTIATE_TEST_SUITE_P(Loopback, DataAfterCloseTest,
                         ::testing::Values(AfterClose::TimeWaitSock, AfterClose::FullFinWait2,
                                           AfterClose::FullFinWait1),
                         after_close_name);

// ---- no listener ---------------------------------------------------------------

TEST_F(ResetTest, SynToClosedPortIsNoListener) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();
  uint16_t closed_port = 0, cport = 0;
  {
    ScopedNetns in(ns);
    {
      Fd probe(listen_tcp(AF_INET, "127.0.0.1"));
      ASSERT_TRUE(probe.valid());
      closed_port = local_port(probe.get());
    }
    Fd fd(::socket(AF_INET, SOCK_STREAM, 0));
    ASSERT_TRUE(fd.valid());
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(closed_port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_NE(::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    EXPECT_EQ(errno, ECONNREFUSED);
    cport = local_port(fd.get());
  }
  const auto counters = nstat(ns);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();

  const auto sent = tracer.events("reset_sent");
  ASSERT_EQ(sent.size(), 1u) << diag;
  // The SYN found no socket: the tuple is the segment's, no owner.
  expect_sent(sent[0], {std::nullopt, "NONE", "NO_SOCKET", "no_listener", "SYN", 0, true,
                        closed_port, sent[0].value("rport", uint16_t{0}), 0, "", 0, -1});
  const auto received = tracer.events("reset_received");
  ASSERT_EQ(received.size(), 1u) << diag;
  ASSERT_TRUE(has_conn(received[0])) << diag;
  const uint64_t client = received[0].at("conn").get<uint64_t>();
  EXPECT_EQ(tracer.state_path(client), (std::vector<std::string>{"CLOSE", "SYN_SENT", "CLOSE"}))
      << diag;
  const uint16_t cport_seen = sent[0].value("rport", uint16_t{0});
  if (cport != 0) {
    EXPECT_EQ(cport_seen, cport);
  }
  expect_received(received[0], client, "SYN_SENT", "no_listener", cport_seen, closed_port);

  const json report = tracer.report();
  expect_reset_counts(report, {{"no_listener", 1}}, {{"no_listener", 1}});
  EXPECT_TRUE(report.at("late_fin_resets").empty()) << report.dump();
  EXPECT_EQ(counters.at("TcpOutRsts"), 1u);
  EXPECT_EQ(counters.at("TcpAttemptFails"), 1u);
}

// ---- the tw sock was killed, then the late FIN came -----------------------------

// Killed by SOCK_DESTROY (ss -K; tcp_abort() on a tw sock deschedules it),
// a deterministic stand-in for a tw recycled or assassinated by a RST. The
// late FIN comes soon after the kill (before the TIME_WAIT analysis settled
// on "killed": it must not wait for it) or after.
class TwKilledTest : public KernelTest, public ::testing::WithParamInterface<int> {};

TEST_P(TwKilledTest, LateFinAfterTwKilledIsTwKilled) {
  const Millis delay(GetParam());
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();
  uint16_t sport = 0, cport = 0;
  int64_t since_lo = 0, since_hi = 0;
  {
    ScopedNetns in(ns);
    Pair p;
    ASSERT_TRUE(make_pair(p));
    sport = p.sport;
    cport = p.cport;
    const auto before_close = Clock::now();
    p.client.reset();
    const auto after_close = Clock::now();
    ASSERT_TRUE(wait_ss_state(ns, cport, sport, "FIN-WAIT-2"));  // the tw sock, substate FIN_WAIT2
    ASSERT_TRUE(wait_ss_state(ns, sport, cport, "CLOSE-WAIT"));
    std::string sport_arg = ":";  // (not ":" + ...: GCC 12 -O3 warns, -Wrestrict)
    sport_arg += std::to_string(cport);
    const CmdResult k =
        ns.exec({"ss", "-K", "-tan", "state", "fin-wait-2", "sport", "=", sport_arg});
    ASSERT_EQ(k.status, 0) << k.err;
    ASSERT_TRUE(wait_until([&] { return gone(ns, cport, sport); }))
        << "ss -K did not kill the tw sock: " << ns.exec({"ss", "-tanoe"}).out;
    std::this_thread::sleep_for(delay);
    since_lo =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - after_close).count();
    p.server.reset();
    ASSERT_TRUE(wait_until([&] { return gone(ns, sport, cport); }))
        << ns.exec({"ss", "-tanoe"}).out;
    since_hi = ms_since(before_close);
  }
  const auto counters = nstat(ns);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;

  const auto sent = tracer.events("reset_sent");
  ASSERT_EQ(sent.size(), 1u) << diag;
  expect_sent(sent[0], {client[0], "NONE", "NO_SOCKET", "tw_killed", "FIN|ACK", 0, true, cport,
                        sport, ::getpid(), own_comm(), since_lo, since_hi});
  const auto received = tracer.events("reset_received");
  ASSERT_EQ(received.size(), 1u) << diag;
  expect_received(received[0], server[0], "LAST_ACK", "tw_killed", sport, cport);

  const json report = tracer.report();
  expect_reset_counts(report, {{"tw_killed", 1}}, {{"tw_killed", 1}});
  const json& late = report.at("late_fin_resets");
  ASSERT_EQ(late.size(), 1u) << late.dump();
  expect_late_fin(late[0], sent[0], server[0], "LAST_ACK");
  const auto ends = tracer.events("time_wait_end");
  ASSERT_EQ(ends.size(), 1u) << diag;
  EXPECT_EQ(ends[0].value("conn", uint64_t{0}), client[0]);
  EXPECT_EQ(ends[0].value("cause", ""), "reset") << ends[0].dump();
  EXPECT_EQ(counters.at("TcpOutRsts"), 1u);
  EXPECT_EQ(counters.at("TcpExtTCPTimeWaitOverflow"), 0u);
}

INSTANTIATE_TEST_SUITE_P(Loopback, TwKilledTest, ::testing::Values(50, 1500),
                         [](const ::testing::TestParamInfo<int>& i) {
                           return "FinAfter" + std::to_string(i.param) + "ms";
                         });

// ---- the orphan FIN_WAIT2 timed out, then the late FIN came ----------------------

TEST_F(ResetTest, LateFinAfterFinWait2TimeoutIsFinWait2Timeout) {
  // tcp_fin_timeout 1 s: tcp_time_wait(FIN_WAIT2, 1 s) makes a tw sock in
  // substate FIN_WAIT2 whose timer fires after 1 s; the FIN after it meets
  // no socket.
  NetNs ns({"net.ipv4.tcp_fin_timeout=1"});
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();
  uint16_t sport = 0, cport = 0;
  int64_t since_lo = 0, since_hi = 0;
  {
    ScopedNetns in(ns);
    Pair p;
    ASSERT_TRUE(make_pair(p));
    sport = p.sport;
    cport = p.cport;
    const auto before_close = Clock::now();
    p.client.reset();
    const auto after_close = Clock::now();
    ASSERT_TRUE(wait_ss_state(ns, cport, sport, "FIN-WAIT-2"));
    ASSERT_TRUE(wait_until([&] { return gone(ns, cport, sport); }, 5000ms))
        << ns.exec({"ss", "-tanoe"}).out;
    EXPECT_GE(ms_since(before_close), 900);
    std::this_thread::sleep_for(200ms);
    since_lo =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - after_close).count();
    p.server.reset();
    ASSERT_TRUE(wait_until([&] { return gone(ns, sport, cport); }))
        << ns.exec({"ss", "-tanoe"}).out;
    since_hi = ms_since(before_close);
  }
  const auto counters = nstat(ns);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;

  const auto sent = tracer.events("reset_sent");
  ASSERT_EQ(sent.size(), 1u) << diag;
  expect_sent(sent[0], {client[0], "NONE", "NO_SOCKET", "fin_wait2_timeout", "FIN|ACK", 0, true,
                        cport, sport, ::getpid(), own_comm(), since_lo, since_hi});
  const auto received = tracer.events("reset_received");
  ASSERT_EQ(received.size(), 1u) << diag;
  expect_received(received[0], server[0], "LAST_ACK", "fin_wait2_timeout", sport, cport);

  const json report = tracer.report();
  expect_reset_counts(report, {{"fin_wait2_timeout", 1}}, {{"fin_wait2_timeout", 1}});
  const json& late = report.at("late_fin_resets");
  ASSERT_EQ(late.size(), 1u) << late.dump();
  expect_late_fin(late[0], sent[0], server[0], "LAST_ACK");
  const auto ends = tracer.events("time_wait_end");
  ASSERT_EQ(ends.size(), 1u) << diag;
  EXPECT_EQ(ends[0].value("cause", ""), "expired") << ends[0].dump();
  EXPECT_EQ(ends[0].value("substate", ""), "FIN_WAIT2") << ends[0].dump();
  EXPECT_EQ(counters.at("TcpOutRsts"), 1u);
  EXPECT_EQ(counters.at("TcpExtTCPTimeWaitOverflow"), 0u);
}

}  // namespace
}  // namespace ktest
