// Exact lifecycles of one connection over loopback in a private netns:
// client closes first, server closes first (IPv4 and IPv6), and an abort with
// SO_LINGER {1, 0}. Ground truth: getsockname/getpeername, ss, nstat.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>

#include "harness.hpp"

namespace ktest {
namespace {

struct CloseCase {
  int family;
  bool client_first;
  // --attach: the fallbacks a kernel without tp_btf (or without raw_tp)
  // gets, forced here; nullptr: what the feature probes choose.
  const char* attach = nullptr;
};

void PrintTo(const CloseCase& c, std::ostream* os) {
  *os << (c.family == AF_INET6 ? "IPv6" : "IPv4")
      << (c.client_first ? ", client closes first" : ", server closes first")
      << (c.attach ? std::string(", --attach ") + c.attach : std::string());
}

std::string case_name(const ::testing::TestParamInfo<CloseCase>& info) {
  std::string name = std::string(info.param.family == AF_INET6 ? "IPv6" : "IPv4") +
                     (info.param.client_first ? "_ClientClosesFirst" : "_ServerClosesFirst");
  if (info.param.attach) name += std::string("_") + info.param.attach;
  return name;
}

class CloseTest : public KernelTest, public ::testing::WithParamInterface<CloseCase> {};

TEST_P(CloseTest, ExactLifecycleOnBothSides) {
  const int family = GetParam().family;
  const bool client_first = GetParam().client_first;
  const std::string addr = loopback(family);
  const int jfamily = family == AF_INET6 ? 6 : 4;

  const char* attach = GetParam().attach;
  NetNs ns;
  Tracer tracer;
  std::vector<std::string> args;
  if (attach) args = {"--attach", attach};
  ASSERT_TRUE(tracer.start(ns, args)) << tracer.diagnostics();
  if (attach) {
    ASSERT_EQ(tracer.start_line().value("attach", ""), attach);
  }

  uint16_t sport = 0, cport = 0;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(family, addr.c_str()));
    ASSERT_TRUE(lfd.valid()) << std::strerror(errno);
    sport = local_port(lfd.get());
    Fd cfd(connect_tcp(family, addr.c_str(), sport));
    ASSERT_TRUE(cfd.valid()) << std::strerror(errno);
    Fd afd(accept_tcp(lfd.get()));
    ASSERT_TRUE(afd.valid()) << std::strerror(errno);
    cport = local_port(cfd.get());
    ASSERT_NE(cport, 0);
    ASSERT_EQ(peer_port(afd.get()), cport);
    ASSERT_EQ(local_port(afd.get()), sport);
    ASSERT_EQ(peer_port(cfd.get()), sport);

    // The side that closes first: its FIN is acked (FIN_WAIT2), the peer
    // is in CLOSE_WAIT. Only then the second close, so no FINs cross.
    Fd& first = client_first ? cfd : afd;
    Fd& second = client_first ? afd : cfd;
    const uint16_t first_l = client_first ? cport : sport, first_r = client_first ? sport : cport;
    first.reset();
    ASSERT_TRUE(wait_ss_state(ns, first_l, first_r, "FIN-WAIT-2"));
    ASSERT_TRUE(wait_ss_state(ns, first_r, first_l, "CLOSE-WAIT"));
    second.reset();
    // The first closer ends in TIME_WAIT; the second is gone once its
    // LAST_ACK is acked.
    ASSERT_TRUE(wait_until([&] {
      auto all = ss_sockets(ns);
      auto a = ss_find(all, first_l, first_r);
      return a.size() == 1 && a[0].state == "TIME-WAIT" && ss_find(all, first_r, first_l).empty();
    })) << ns.exec({"ss", "-tanoe"}).out;
    lfd.reset();
  }
  const auto tw = ss_time_wait(ns);
  const auto ns_counters = nstat(ns);

  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  EXPECT_TRUE(tracer.bad_lines().empty()) << diag;
  EXPECT_EQ(tracer.start_line().at("filters").at("netns").get<uint64_t>(), ns.inode());

  // One connection per side and the listener, told apart by their ports.
  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  const auto listener = tracer.conns_with(sport, 0);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;
  ASSERT_EQ(listener.size(), 1u) << diag;
  EXPECT_EQ(tracer.conns().size(), 3u) << diag;

  EXPECT_EQ(tracer.state_path(client[0]),
            client_first ? kActiveOpenActiveClose : kActiveOpenPassiveClose)
      << diag;
  EXPECT_EQ(tracer.state_path(server[0]),
            client_first ? kPassiveOpenPassiveClose : kPassiveOpenActiveClose)
      << diag;
  EXPECT_EQ(tracer.state_path(listener[0]), kListenerPath) << diag;

  expect_identity(tracer.events_for(client[0]), {jfamily, addr, addr, cport, sport, ns.inode()},
                  "client");
  expect_identity(tracer.events_for(server[0]), {jfamily, addr, addr, sport, cport, ns.inode()},
                  "server");
  // Everything ran in this process: the owner is this process, never a
  // softirq victim.
  for (uint64_t c : {client[0], server[0], listener[0]})
    expect_owner(tracer.events_for(c), ::getpid(), own_comm(), "conn " + std::to_string(c));

  EXPECT_TRUE(tracer.events("reset_sent").empty()) << diag;
  EXPECT_TRUE(tracer.events("reset_received").empty()) << diag;
  EXPECT_TRUE(tracer.events("retransmit").empty()) << diag;

  const json report = tracer.report();
  const auto by_open = counts(report, "by_open");
  const auto by_close = counts(report, "by_close");
  EXPECT_EQ(report.at("connections").at("total"), 2) << report.dump();
  EXPECT_EQ(report.at("connections").at("listeners"), 1) << report.dump();
  EXPECT_EQ(by_open.at("active"), 1u) << report.dump();
  EXPECT_EQ(by_open.at("passive"), 1u) << report.dump();
  EXPECT_EQ(by_open.at("unknown"), 0u) << report.dump();
  for (const auto& [kind, n] : by_close)
    EXPECT_EQ(n, (kind == "active_close" || kind == "passive_close") ? 1u : 0u)
        << kind << ": " << report.dump();
  EXPECT_EQ(ring_full_losses(report), 0u) << report.dump();

  // Kernel: one TIME_WAIT, on the side that closed first, and the opens
  // the report counted.
  const uint16_t tw_l = client_first ? cport : sport, tw_r = client_first ? sport : cport;
  ASSERT_EQ(tw.size(), 1u);
  EXPECT_EQ(tw[0].laddr, addr);
  EXPECT_EQ(tw[0].lport, tw_l);
  EXPECT_EQ(tw[0].rport, tw_r);
  const uint64_t tw_conn = client_first ? client[0] : server[0];
  const auto tw_path = tracer.state_path(tw_conn);
  ASSERT_GE(tw_path.size(), 2u);
  EXPECT_EQ(tw_path[tw_path.size() - 2], "FIN_WAIT2") << "the TIME_WAIT side left FIN_WAIT2";
  for (const auto& e : tracer.events("time_wait_enter"))
    EXPECT_EQ(e.value("conn", uint64_t{0}), tw_conn) << e.dump();
  EXPECT_EQ(ns_counters.at("TcpActiveOpens"), by_open.at("active"));
  EXPECT_EQ(ns_counters.at("TcpPassiveOpens"), by_open.at("passive"));
  EXPECT_EQ(ns_counters.at("TcpEstabResets"), 0u);
  EXPECT_EQ(ns_counters.at("TcpOutRsts"), 0u);
}

INSTANTIATE_TEST_SUITE_P(Loopback, CloseTest,
                         ::testing::Values(CloseCase{AF_INET, true}, CloseCase{AF_INET6, true},
                                           CloseCase{AF_INET, false}, CloseCase{AF_INET6, false}),
                         case_name);
// The same lifecycles through the fallback attach flavours, each forced:
// the programs' untyped reads (bpf_probe_read_kernel) and, for classic
// tracepoints, the tracepoint's own record of the state change.
INSTANTIATE_TEST_SUITE_P(Fallback, CloseTest,
                         ::testing::Values(CloseCase{AF_INET, true, "raw_tp"},
                                           CloseCase{AF_INET6, false, "raw_tp"},
                                           CloseCase{AF_INET, true, "tracepoint"},
                                           CloseCase{AF_INET6, false, "tracepoint"}),
                         case_name);

// SO_LINGER {1, 0} then close on an established client: tcp_disconnect
// sends a RST (reason TCP_STATE) instead of a FIN.
class AbortTest : public KernelTest, public ::testing::WithParamInterface<int> {};

TEST_P(AbortTest, LingerZeroCloseSendsResetAndAborts) {
  const int family = GetParam();
  const std::string addr = loopback(family);
  const int jfamily = family == AF_INET6 ? 6 : 4;

  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();

  uint16_t sport = 0, cport = 0;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(family, addr.c_str()));
    ASSERT_TRUE(lfd.valid());
    sport = local_port(lfd.get());
    Fd cfd(connect_tcp(family, addr.c_str(), sport));
    ASSERT_TRUE(cfd.valid());
    Fd afd(accept_tcp(lfd.get()));
    ASSERT_TRUE(afd.valid());
    cport = local_port(cfd.get());
    ASSERT_TRUE(set_linger_zero(cfd.get()));
    cfd.reset();
    // The server learns of it from the RST alone.
    ASSERT_TRUE(wait_readable(afd.get()));
    EXPECT_EQ(socket_error(afd.get()), ECONNRESET);
    afd.reset();
    lfd.reset();
  }
  const auto tw = ss_time_wait(ns);
  const auto ns_counters = nstat(ns);

  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  EXPECT_TRUE(tracer.bad_lines().empty()) << diag;

  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;
  EXPECT_EQ(tracer.state_path(client[0]),
            (std::vector<std::string>{"CLOSE", "SYN_SENT", "ESTABLISHED", "CLOSE"}))
      << diag;
  EXPECT_EQ(tracer.state_path(server[0]),
            (std::vector<std::string>{"LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE"}))
      << diag;
  expect_identity(tracer.events_for(client[0]), {jfamily, addr, addr, cport, sport, ns.inode()},
                  "client");
  expect_identity(tracer.events_for(server[0]), {jfamily, addr, addr, sport, cport, ns.inode()},
                  "server");

  const auto sent = tracer.events("reset_sent");
  ASSERT_EQ(sent.size(), 1u) << diag;
  EXPECT_EQ(sent[0].value("conn", uint64_t{0}), client[0]) << sent[0].dump();
  EXPECT_EQ(sent[0].value("reason", ""), "TCP_STATE") << sent[0].dump();
  EXPECT_EQ(sent[0].value("no_socket", true), false) << sent[0].dump();
  const auto received = tracer.events("reset_received");
  ASSERT_EQ(received.size(), 1u) << diag;
  EXPECT_EQ(received[0].value("conn", uint64_t{0}), server[0]) << received[0].dump();
  EXPECT_EQ(received[0].value("state", ""), "ESTABLISHED") << received[0].dump();

  const json report = tracer.report();
  const auto by_close = counts(report, "by_close");
  EXPECT_EQ(report.at("connections").at("total"), 2) << report.dump();
  for (const auto& [kind, n] : by_close)
    EXPECT_EQ(n, (kind == "aborted" || kind == "reset_received") ? 1u : 0u)
        << kind << ": " << report.dump();
  EXPECT_EQ(ring_full_losses(report), 0u);

  // Kernel: no TIME_WAIT, one RST out, both ends reset from ESTABLISHED.
  EXPECT_TRUE(tw.empty()) << tw.size() << " TIME_WAIT sockets";
  EXPECT_EQ(ns_counters.at("TcpOutRsts"), sent.size());
  EXPECT_EQ(ns_counters.at("TcpExtTCPAbortOnData"), 1u);
  EXPECT_EQ(ns_counters.at("TcpEstabResets"), 2u);
}

INSTANTIATE_TEST_SUITE_P(Loopback, AbortTest, ::testing::Values(AF_INET, AF_INET6),
                         [](const ::testing::TestParamInfo<int>& i) {
                           return std::string(i.param == AF_INET6 ? "IPv6" : "IPv4");
                         });

}  // namespace
}  // namespace ktest
