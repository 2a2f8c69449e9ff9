// In-kernel filters: --netns, --port/--lport/--rport, -4/-6. Several tracers
// run at once over the same traffic; each must list exactly the connections
// its filter selects (by conn id, which is the kernel socket cookie and so
// the same in every tracer), each with its complete lifecycle.
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <future>
#include <set>
#include <thread>

#include "harness.hpp"

namespace ktest {
namespace {

using ConnSet = std::set<uint64_t>;

ConnSet as_set(const std::vector<uint64_t>& v) { return {v.begin(), v.end()}; }

// Exactly one conn with these ports (lport, rport; rport 0 = a listener).
uint64_t one_conn(const Tracer& t, uint16_t lport, uint16_t rport) {
  const auto v = t.conns_with(lport, rport);
  if (v.size() != 1)
    throw std::runtime_error("expected one conn " + std::to_string(lport) + "->" +
                             std::to_string(rport) + ", found " + std::to_string(v.size()) + "\n" +
                             t.diagnostics());
  return v[0];
}

// The filtered tracer lists exactly `want`, each conn with every event the
// unfiltered tracer saw for it.
void expect_exactly(const Tracer& filtered, const Tracer& all, const ConnSet& want,
                    const std::string& what) {
  EXPECT_EQ(as_set(filtered.conns()), want) << what << "\n" << filtered.diagnostics();
  for (uint64_t c : want) {
    EXPECT_EQ(filtered.state_path(c), all.state_path(c)) << what << ": conn " << c;
    EXPECT_EQ(filtered.events_for(c).size(), all.events_for(c).size()) << what << ": conn " << c;
  }
  EXPECT_TRUE(filtered.bad_lines().empty()) << what;
  EXPECT_EQ(ring_full_losses(filtered.report()), 0u) << what;
}

class FilterTest : public KernelTest {};

// Two namespaces, one tracer on each: neither sees the other's connections.
TEST_F(FilterTest, NetnsFilterSeesOnlyItsNamespace) {
  NetNs a({"net.ipv4.ip_local_port_range=41000 41999"});
  NetNs b({"net.ipv4.ip_local_port_range=42000 42999"});
  Tracer ta, tb;
  ASSERT_TRUE(ta.start(a)) << ta.diagnostics();
  ASSERT_TRUE(tb.start(b)) << tb.diagnostics();

  const auto pa = make_connection(a, {.server_port = 40001});
  const auto pb = make_connection(b, {.server_port = 40002});
  const auto pa6 = make_connection(a, {.server_family = AF_INET6,
                                       .server_addr = "::1",
                                       .server_port = 40003,
                                       .client_family = AF_INET6,
                                       .connect_addr = "::1"});
  ASSERT_EQ(ta.stop(), 0) << ta.diagnostics();
  ASSERT_EQ(tb.stop(), 0) << tb.diagnostics();

  struct Side {
    const NetNs& ns;
    const Tracer& t;
    std::vector<ConnPorts> mine;
    std::vector<ConnPorts> theirs;
  };
  for (const Side& s : {Side{a, ta, {pa, pa6}, {pb}}, Side{b, tb, {pb}, {pa, pa6}}}) {
    EXPECT_EQ(s.t.start_line().at("filters").at("netns").get<uint64_t>(), s.ns.inode());
    ConnSet want;
    for (const auto& p : s.mine) {
      const uint64_t c = one_conn(s.t, p.cport, p.sport), sv = one_conn(s.t, p.sport, p.cport),
                     l = one_conn(s.t, p.sport, 0);
      EXPECT_EQ(s.t.state_path(c), kActiveOpenActiveClose) << s.t.diagnostics();
      EXPECT_EQ(s.t.state_path(sv), kPassiveOpenPassiveClose) << s.t.diagnostics();
      EXPECT_EQ(s.t.state_path(l), kListenerPath) << s.t.diagnostics();
      want.insert({c, sv, l});
    }
    EXPECT_EQ(as_set(s.t.conns()), want) << s.t.diagnostics();
    for (const auto& e : s.t.lines()) {
      if (!has_conn(e)) continue;
      EXPECT_EQ(e.value("netns", uint64_t{0}), s.ns.inode()) << e.dump();
      for (const auto& p : s.theirs) {
        for (const char* k : {"lport", "rport"}) {
          EXPECT_NE(e.value(k, -1), p.sport) << "other namespace's port: " << e.dump();
          EXPECT_NE(e.value(k, -1), p.cport) << "other namespace's port: " << e.dump();
        }
      }
    }
    const json r = s.t.report();
    EXPECT_EQ(r.at("connections").at("total"), 2 * s.mine.size()) << r.dump();
    EXPECT_EQ(ring_full_losses(r), 0u);
  }
  EXPECT_TRUE([&] {
    for (uint64_t c : ta.conns())
      if (as_set(tb.conns()).count(c)) return false;
    return true;
  }());
}

// --port P (either side), --lport P, --rport P against an unfiltered tracer.
TEST_F(FilterTest, PortFiltersSelectByPortAndSide) {
  constexpr uint16_t P = 40010, Q = 40011;
  NetNs ns({"net.ipv4.ip_local_port_range=50000 50999"});
  Tracer all, port, lport, rport;
  ASSERT_TRUE(all.start(ns)) << all.diagnostics();
  ASSERT_TRUE(port.start(ns, {"--port", std::to_string(P)})) << port.diagnostics();
  ASSERT_TRUE(lport.start(ns, {"--lport", std::to_string(P)})) << lport.diagnostics();
  ASSERT_TRUE(rport.start(ns, {"--rport", std::to_string(P)})) << rport.diagnostics();

  // 1: to P. 2: to Q (no P anywhere). 3: to Q from local port P.
  const auto c1 = make_connection(ns, {.server_port = P});
  const auto c2 = make_connection(ns, {.server_port = Q});
  const auto c3 = make_connection(ns, {.server_port = Q, .client_port = P});
  ASSERT_EQ(c3.cport, P);
  for (Tracer* t : {&all, &port, &lport, &rport}) ASSERT_EQ(t->stop(), 0) << t->diagnostics();

  const uint64_t L1 = one_conn(all, P, 0), S1 = one_conn(all, P, c1.cport),
                 C1 = one_conn(all, c1.cport, P);
  const uint64_t S2 = one_conn(all, Q, c2.cport), C2 = one_conn(all, c2.cport, Q);
  const uint64_t S3 = one_conn(all, Q, P), C3 = one_conn(all, P, Q);
  const auto q_listeners = all.conns_with(Q, 0);
  ASSERT_EQ(q_listeners.size(), 2u) << all.diagnostics();
  EXPECT_EQ(all.conns().size(), 9u) << all.diagnostics();
  EXPECT_EQ(all.state_path(C3), kActiveOpenActiveClose) << all.diagnostics();
  (void)S2, (void)C2;

  expect_exactly(port, all, {L1, S1, C1, S3, C3}, "--port");
  expect_exactly(lport, all, {L1, S1, C3}, "--lport");
  expect_exactly(rport, all, {C1, S3}, "--rport");
  for (const auto& e : lport.lines()) {
    if (has_conn(e)) {
      EXPECT_EQ(e.value("lport", -1), P) << "--lport: " << e.dump();
    }
  }
  for (const auto& e : rport.lines()) {
    if (has_conn(e)) {
      EXPECT_EQ(e.value("rport", -1), P) << "--rport: " << e.dump();
    }
  }
}

// -6 drops IPv4 (and v4-mapped IPv6); -4 keeps IPv4 only.
TEST_F(FilterTest, FamilyFiltersSplitIpv4AndIpv6) {
  NetNs ns({"net.ipv4.ip_local_port_range=50000 50999"});
  Tracer all, v4, v6;
  ASSERT_TRUE(all.start(ns)) << all.diagnostics();
  ASSERT_TRUE(v4.start(ns, {"-4"})) << v4.diagnostics();
  ASSERT_TRUE(v6.start(ns, {"-6"})) << v6.diagnostics();
  const auto a = make_connection(ns, {.server_port = 40020});
  const auto b = make_connection(ns, {.server_family = AF_INET6,
                                      .server_addr = "::1",
                                      .server_port = 40021,
                                      .client_family = AF_INET6,
                                      .connect_addr = "::1"});
  for (Tracer* t : {&all, &v4, &v6}) ASSERT_EQ(t->stop(), 0) << t->diagnostics();

  const ConnSet want4 = {one_conn(all, 40020, 0), one_conn(all, 40020, a.cport),
                         one_conn(all, a.cport, 40020)};
  const ConnSet want6 = {one_conn(all, 40021, 0), one_conn(all, 40021, b.cport),
                         one_conn(all, b.cport, 40021)};
  EXPECT_EQ(all.conns().size(), 6u);
  expect_exactly(v4, all, want4, "-4");
  expect_exactly(v6, all, want6, "-6");
  for (const auto& e : v4.lines()) {
    if (has_conn(e)) {
      EXPECT_EQ(e.value("family", 0), 4) << "-4: " << e.dump();
    }
  }
  for (const auto& e : v6.lines()) {
    if (has_conn(e)) {
      EXPECT_EQ(e.value("family", 0), 6) << "-6: " << e.dump();
    }
  }
}

// v4-mapped IPv6 sockets count as IPv4 (README): an AF_INET6 client of an
// IPv4 server, and the socket a dual-stack [::] listener accepts from an
// IPv4 client. The dual-stack listener itself is IPv6.
TEST_F(FilterTest, FamilyFiltersCountV4MappedAsIpv4) {
  NetNs ns({"net.ipv4.ip_local_port_range=50000 50999"});
  Tracer all, v4, v6;
  ASSERT_TRUE(all.start(ns)) << all.diagnostics();
  ASSERT_TRUE(v4.start(ns, {"-4"})) << v4.diagnostics();
  ASSERT_TRUE(v6.start(ns, {"-6"})) << v6.diagnostics();
  const auto mc = make_connection(
      ns, {.server_port = 40030, .client_family = AF_INET6, .connect_addr = "::ffff:127.0.0.1"});
  const auto ms = make_connection(
      ns, {.server_family = AF_INET6, .server_addr = "::", .server_port = 40031, .v6only = false});
  for (Tracer* t : {&all, &v4, &v6}) ASSERT_EQ(t->stop(), 0) << t->diagnostics();

  const uint64_t dual_listener = one_conn(all, 40031, 0);
  const ConnSet want4 = {one_conn(all, 40030, 0), one_conn(all, 40030, mc.cport),
                         one_conn(all, mc.cport, 40030), one_conn(all, 40031, ms.cport),
                         one_conn(all, ms.cport, 40031)};
  EXPECT_EQ(all.conns().size(), 6u) << all.diagnostics();
  expect_exactly(v4, all, want4, "-4");
  expect_exactly(v6, all, {dual_listener}, "-6");
  for (const auto& e : v4.lines()) {
    if (!has_conn(e)) continue;
    EXPECT_EQ(e.value("family", 0), 4) << "-4: " << e.dump();
    if (e.value("rport", 0) != 0) {  // not a listener
      EXPECT_EQ(e.value("raddr", ""), "127.0.0.1") << "-4: " << e.dump();
    }
  }
}

}  // namespace
}  // namespace ktest

namespace ktest {
namespace {

// A filter that names nothing would trace nothing in silence: tcpscope says
// so (and runs on: what it names may yet come).
TEST_F(FilterTest, FiltersThatNameNothingAreSaid) {
  const pid_t gone = fork();
  ASSERT_GE(gone, 0);
  if (gone == 0) _exit(0);
  ASSERT_EQ(waitpid(gone, nullptr, 0), gone);
  const std::string gone_arg = std::to_string(gone);
  CmdResult r = run_cmd({tcpscope_binary(), "--pid", gone_arg, "--duration", "0.2"});
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("--pid " + gone_arg + ": no such process now"), std::string::npos) << r.err;

  // A thread's id is no process's: its connections belong to the process.
  std::promise<pid_t> tid;
  std::promise<void> done;
  std::thread thread([&] {
    tid.set_value(static_cast<pid_t>(syscall(SYS_gettid)));
    done.get_future().wait();
  });
  const std::string tid_arg = std::to_string(tid.get_future().get());
  r = run_cmd({tcpscope_binary(), "--pid", tid_arg, "--duration", "0.2"});
  done.set_value();
  thread.join();
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(
      r.err.find("--pid " + tid_arg + ": a thread of process " + std::to_string(getpid()) +
                 "; connections are owned by processes: give --pid " + std::to_string(getpid())),
      std::string::npos)
      << r.err;

  r = run_cmd({tcpscope_binary(), "--netns", "1", "--duration", "0.2"});
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("--netns 1: no process and no /run/netns name is in that network namespace"),
            std::string::npos)
      << r.err;

  // What exists is not warned of.
  NetNs ns;
  struct stat st {};
  ASSERT_EQ(stat(ns.path().c_str(), &st), 0);
  r = run_cmd({tcpscope_binary(), "--pid", std::to_string(getpid()), "--netns",
               std::to_string(st.st_ino), "--duration", "0.2"});
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.err.find("warning"), std::string::npos) << r.err;
}

// The traced namespace's path removed (ip netns del): sweeps and audits,
// which enter it by that path, stop, said once, instead of failing at each
// turn; the trace goes on and ends with its report.
TEST_F(FilterTest, NetnsPathGoneStopsPassesSaidOnce) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, {"--tw-sweep-interval", "0.1", "--audit-interval", "0.2"}))
      << tracer.diagnostics();
  make_connection(ns, ConnSpec{});
  ASSERT_EQ(run_cmd({"ip", "netns", "del", ns.name()}).status, 0);
  std::this_thread::sleep_for(1500ms);  // some 15 sweeps and 7 audits due
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string err = tracer.stderr_text();
  const std::string gone = "tcpscope: warning: --netns " + ns.path() +
                           ": the path is gone: TIME_WAIT sweeps and connection audits stop\n";
  EXPECT_NE(err.find(gone), std::string::npos) << err;
  EXPECT_EQ(err.find(gone), err.rfind(gone)) << err;
  EXPECT_EQ(err.find("failed"), std::string::npos) << err;
  EXPECT_EQ(tracer.lines().back().value("type", ""), "report");
}

}  // namespace
}  // namespace ktest
