// Owner attribution: the server (listen, accept, hold) and the client are
// separate processes. On loopback, the server socket's SYN_RECV and
// ESTABLISHED transitions run in softirq while the CLIENT is current (its
// connect() sends the SYN and the ACK), and the client's late transitions
// run while the server or a timer is current: a tracer that takes
// "current" in softirq names the wrong process. Ground truth: the pids we
// forked, and `ss -tanp` in the namespace.
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.hpp"

namespace ktest {
namespace {

constexpr const char* kServerComm = "tsk-server";
constexpr const char* kClientComm = "tsk-client";

// Server process: [waits for "go"], listens on 127.0.0.1:0, says "port N",
// accepts, sends one byte, says "accepted", waits for "close", closes both
// sockets, says "closed", waits for "exit".
int server_main(Channel& ch, bool wait_go) {
  ::prctl(PR_SET_NAME, kServerComm, 0, 0, 0);
  if (wait_go && !ch.child_expect("go")) return 10;
  Fd lfd(listen_tcp(AF_INET, "127.0.0.1"));
  if (!lfd.valid()) return 11;
  if (!ch.child_send("port " + std::to_string(local_port(lfd.get())))) return 12;
  Fd afd(accept_tcp(lfd.get(), 10000ms));
  if (!afd.valid()) return 13;
  if (::send(afd.get(), "x", 1, MSG_NOSIGNAL) != 1) return 14;
  if (!ch.child_send("accepted")) return 15;
  if (!ch.child_expect("close")) return 16;
  afd.reset();
  lfd.reset();
  if (!ch.child_send("closed")) return 17;
  return ch.child_expect("exit") ? 0 : 18;
}

// Client process: waits for "connect N", connects, reads the byte, says
// "port <local port>", waits for "close", closes, says "closed", waits for
// "exit".
int client_main(Channel& ch) {
  ::prctl(PR_SET_NAME, kClientComm, 0, 0, 0);
  auto cmd = ch.child_recv();
  if (!cmd || cmd->rfind("connect ", 0) != 0) return 20;
  const int port = std::atoi(cmd->c_str() + 8);
  Fd fd(connect_tcp(AF_INET, "127.0.0.1", static_cast<uint16_t>(port)));
  if (!fd.valid()) return 21;
  char c;
  if (!wait_readable(fd.get(), 10000ms) || ::recv(fd.get(), &c, 1, 0) != 1) return 22;
  if (!ch.child_send("port " + std::to_string(local_port(fd.get())))) return 23;
  if (!ch.child_expect("close")) return 24;
  fd.reset();
  if (!ch.child_send("closed")) return 25;
  return ch.child_expect("exit") ? 0 : 26;
}

uint16_t port_from(const std::optional<std::string>& msg) {
  if (!msg || msg->rfind("port ", 0) != 0) return 0;
  return static_cast<uint16_t>(std::atoi(msg->c_str() + 5));
}

// rport 0: the listener.
pid_t ss_owner(const std::vector<SsSocket>& all, uint16_t lport, uint16_t rport,
               std::string* comm) {
  std::vector<SsSocket> v;
  for (const auto& s : ss_find(all, lport, rport))
    if (s.rport == rport) v.push_back(s);
  if (v.size() != 1 || v[0].users.size() != 1) return 0;
  if (comm) *comm = v[0].users[0].comm;
  return v[0].users[0].pid;
}

class OwnerTest : public KernelTest {};

// With and without the kernel's socket table (raw_tp keeps one).
void expect_each_process_owns_its_sockets(const std::vector<std::string>& args) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, args)) << tracer.diagnostics();

  Channel sch, cch;
  const pid_t server_pid = ns.spawn([&] { return server_main(sch, false); });
  const pid_t client_pid = ns.spawn([&] { return client_main(cch); });
  const uint16_t sport = port_from(sch.recv());
  ASSERT_NE(sport, 0);
  ASSERT_TRUE(cch.send("connect " + std::to_string(sport)));
  ASSERT_EQ(sch.recv(), "accepted");
  const uint16_t cport = port_from(cch.recv());
  ASSERT_NE(cport, 0);

  // Kernel ground truth while both hold their sockets.
  const auto est = ss_sockets(ns);
  std::string ss_server_comm, ss_client_comm;
  EXPECT_EQ(ss_owner(est, sport, cport, &ss_server_comm), server_pid)
      << ns.exec({"ss", "-tanp"}).out;
  EXPECT_EQ(ss_owner(est, cport, sport, &ss_client_comm), client_pid)
      << ns.exec({"ss", "-tanp"}).out;
  EXPECT_EQ(ss_owner(est, sport, 0, nullptr), server_pid) << "listener";
  EXPECT_EQ(ss_server_comm, kServerComm);
  EXPECT_EQ(ss_client_comm, kClientComm);

  // Client closes first; the server closes once the client is in FIN_WAIT2.
  ASSERT_TRUE(cch.send("close"));
  ASSERT_EQ(cch.recv(), "closed");
  ASSERT_TRUE(wait_ss_state(ns, cport, sport, "FIN-WAIT-2"));
  ASSERT_TRUE(sch.send("close"));
  ASSERT_EQ(sch.recv(), "closed");
  ASSERT_TRUE(wait_ss_state(ns, cport, sport, "TIME-WAIT"));
  ASSERT_TRUE(wait_until([&] { return ss_find(ss_sockets(ns), sport).empty(); }));
  cch.send("exit");
  sch.send("exit");
  EXPECT_EQ(ns.wait(client_pid), 0);
  EXPECT_EQ(ns.wait(server_pid), 0);

  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  const auto client = tracer.conns_with(cport, sport);
  const auto server = tracer.conns_with(sport, cport);
  const auto listener = tracer.conns_with(sport, 0);
  ASSERT_EQ(client.size(), 1u) << diag;
  ASSERT_EQ(server.size(), 1u) << diag;
  ASSERT_EQ(listener.size(), 1u) << diag;
  EXPECT_EQ(tracer.state_path(client[0]), kActiveOpenActiveClose) << diag;
  EXPECT_EQ(tracer.state_path(server[0]), kPassiveOpenPassiveClose) << diag;

  // Every event, including the softirq transitions (SYN_RECV, ESTABLISHED,
  // CLOSE_WAIT, LAST_ACK -> CLOSE on the server; FIN_WAIT2, CLOSE on the
  // client), names the owning process.
  expect_owner(tracer.events_for(server[0]), server_pid, kServerComm, "accepted socket");
  expect_owner(tracer.events_for(listener[0]), server_pid, kServerComm, "listener");
  expect_owner(tracer.events_for(client[0]), client_pid, kClientComm, "client socket");
  // How each was learnt: the accepted socket keeps its listener's owner
  // (its send came from that process) until its own close().
  for (const auto& e : tracer.events_for(server[0])) {
    if (e.value("type", "") != "state") continue;
    const std::string to = e.value("new", "");
    EXPECT_EQ(e.value("owner", ""), to == "LAST_ACK" || to == "CLOSE" ? "syscall" : "listener")
        << e.dump();
  }
  // The softirq transitions must be there to be checked.
  bool saw_syn_recv = false, saw_server_established = false;
  for (const auto& e : tracer.events_for(server[0])) {
    if (e.value("new", "") == "SYN_RECV") saw_syn_recv = true;
    if (e.value("new", "") == "ESTABLISHED") saw_server_established = true;
  }
  EXPECT_TRUE(saw_syn_recv && saw_server_established) << diag;
}

TEST_F(OwnerTest, SeparateServerAndClientProcessesOwnTheirSockets) {
  expect_each_process_owns_its_sockets({});
}

TEST_F(OwnerTest, SeparateServerAndClientProcessesOwnTheirSocketsWithSocketTable) {
  expect_each_process_owns_its_sockets({"--attach", "raw_tp"});
}

// --pid: only the server process's connections, including the transitions
// that run in softirq while another process is current.
TEST_F(OwnerTest, PidFilterKeepsOnlyThatProcessesConnections) {
  NetNs ns;
  Channel sch, cch;
  const pid_t server_pid = ns.spawn([&] { return server_main(sch, true); });
  const pid_t client_pid = ns.spawn([&] { return client_main(cch); });

  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, {"--pid", std::to_string(server_pid)})) << tracer.diagnostics();
  ASSERT_TRUE(sch.send("go"));
  const uint16_t sport = port_from(sch.recv());
  ASSERT_NE(sport, 0);
  ASSERT_TRUE(cch.send("connect " + std::to_string(sport)));
  ASSERT_EQ(sch.recv(), "accepted");
  const uint16_t cport = port_from(cch.recv());
  ASSERT_NE(cport, 0);
  ASSERT_TRUE(cch.send("close"));
  ASSERT_EQ(cch.recv(), "closed");
  ASSERT_TRUE(wait_ss_state(ns, cport, sport, "FIN-WAIT-2"));
  ASSERT_TRUE(sch.send("close"));
  ASSERT_EQ(sch.recv(), "closed");
  ASSERT_TRUE(wait_until([&] { return ss_find(ss_sockets(ns), sport).empty(); }));
  cch.send("exit");
  sch.send("exit");
  EXPECT_EQ(ns.wait(client_pid), 0);
  EXPECT_EQ(ns.wait(server_pid), 0);

  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  EXPECT_TRUE(tracer.conns_with(cport, sport).empty()) << "client's connection leaked\n" << diag;
  const auto server = tracer.conns_with(sport, cport);
  const auto listener = tracer.conns_with(sport, 0);
  ASSERT_EQ(server.size(), 1u) << diag;
  ASSERT_EQ(listener.size(), 1u) << diag;
  EXPECT_EQ(tracer.conns().size(), 2u) << diag;
  EXPECT_EQ(tracer.state_path(server[0]), kPassiveOpenPassiveClose) << diag;
  EXPECT_EQ(tracer.state_path(listener[0]), kListenerPath) << diag;
  for (const auto& e : tracer.lines()) {
    if (!has_conn(e)) continue;
    EXPECT_EQ(e.value("pid", -1), server_pid) << e.dump();
  }
}

constexpr const char* kWorkerComm = "tsk-worker";

// A pre-forked worker: inherits the test's listener, accepts, reads one byte,
// says "got", waits for "close", closes, says "closed", waits for "exit".
int worker_main(Channel& ch, int listen_fd) {
  ::prctl(PR_SET_NAME, kWorkerComm, 0, 0, 0);
  Fd afd(accept_tcp(listen_fd, 10000ms));
  if (!afd.valid()) return 30;
  char c;
  if (!wait_readable(afd.get(), 10000ms) || ::recv(afd.get(), &c, 1, 0) != 1) return 31;
  if (!ch.child_send("got")) return 32;
  if (!ch.child_expect("close")) return 33;
  afd.reset();
  if (!ch.child_send("closed")) return 34;
  return ch.child_expect("exit") ? 0 : 35;
}

// The listener is this process's, the worker that accepts a child's: the
// accepted socket is the listener owner's until the worker's first recv, the
// worker's after it, softirq transitions included (the client's FIN runs
// while this process is current). The same with and without the kernel's
// socket table (raw_tp keeps one).
void expect_worker_named_after_first_recv(const std::vector<std::string>& args) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, args)) << tracer.diagnostics();
  Fd lfd, client;
  {
    ScopedNetns in(ns);
    lfd = Fd(listen_tcp(AF_INET, "127.0.0.1"));
  }
  ASSERT_TRUE(lfd.valid());
  const uint16_t sport = local_port(lfd.get());
  Channel wch;
  const pid_t worker = ns.spawn([&] { return worker_main(wch, lfd.get()); });
  {
    ScopedNetns in(ns);
    client = Fd(connect_tcp(AF_INET, "127.0.0.1", sport));
  }
  ASSERT_TRUE(client.valid());
  const uint16_t cport = local_port(client.get());
  ASSERT_EQ(::send(client.get(), "x", 1, MSG_NOSIGNAL), 1);
  ASSERT_EQ(wch.recv(), "got");
  // ss agrees: the worker holds the accepted socket.
  EXPECT_EQ(ss_owner(ss_sockets(ns), sport, cport, nullptr), worker)
      << ns.exec({"ss", "-tanp"}).out;
  client.reset();  // the worker's socket goes CLOSE_WAIT in softirq
  ASSERT_TRUE(wait_ss_state(ns, sport, cport, "CLOSE-WAIT"));
  ASSERT_TRUE(wch.send("close"));
  ASSERT_EQ(wch.recv(), "closed");
  ASSERT_TRUE(wait_until([&] { return ss_find(ss_sockets(ns), sport, cport).empty(); }));
  wch.send("exit");
  EXPECT_EQ(ns.wait(worker), 0);

  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const std::string diag = tracer.diagnostics();
  const auto accepted = tracer.conns_with(sport, cport);
  ASSERT_EQ(accepted.size(), 1u) << diag;
  EXPECT_EQ(tracer.state_path(accepted[0]), kPassiveOpenPassiveClose) << diag;
  std::vector<std::pair<std::string, pid_t>> got, want = {{"SYN_RECV", ::getpid()},
                                                          {"ESTABLISHED", ::getpid()},
                                                          {"CLOSE_WAIT", worker},
                                                          {"LAST_ACK", worker},
                                                          {"CLOSE", worker}};
  for (const auto& e : tracer.events_for(accepted[0])) {
    if (e.value("type", "") != "state") continue;
    got.emplace_back(e.value("new", ""), e.value("pid", -1));
    const bool by_worker = e.value("pid", -1) == worker;
    EXPECT_EQ(e.value("comm", ""), by_worker ? kWorkerComm : own_comm()) << e.dump();
    const std::string how = e.value("new", "") == "CLOSE_WAIT" ? "io"
                            : by_worker                        ? "syscall"
                                                               : "listener";
    EXPECT_EQ(e.value("owner", ""), how) << e.dump();
  }
  EXPECT_EQ(got, want) << diag;
}

TEST_F(OwnerTest, PreforkedWorkerIsNamedAfterItsFirstRecv) {
  expect_worker_named_after_first_recv({});
}

TEST_F(OwnerTest, PreforkedWorkerIsNamedAfterItsFirstRecvWithSocketTable) {
  expect_worker_named_after_first_recv({"--attach", "raw_tp"});
}

}  // namespace
}  // namespace ktest
