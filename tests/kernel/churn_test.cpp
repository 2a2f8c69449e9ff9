// 1,000 connections (connect/accept/close) in a private namespace: exactly
// 1,000 client and 1,000 server lifecycles, none lost.
#include <netinet/in.h>
#include <sys/socket.h>

#include <signal.h>

#include <cerrno>
#include <functional>
#include <set>
#include <thread>

#include "harness.hpp"

namespace ktest {
namespace {

constexpr int kConnections = 1000;

class ChurnTest : public KernelTest {
 protected:
  // Records bench/churn for `seconds` in a fresh namespace (a capture, not
  // live JSON: a million lines are more than this harness should hold),
  // then reads the capture's report. Fatal failures end the test. `during`,
  // if given, runs on a thread of its own while the churn does.
  void record_churn(const std::vector<std::string>& extra, int seconds, Tracer& rec,
                    uint64_t& conns, json& report, const std::function<void()>& during = {}) {
    NetNs ns({"net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"});
    TempDir dir;
    const std::string file = dir.file("churn.cap");
    std::vector<std::string> args = {"record", "-o", file, "--netns", ns.path()};
    args.insert(args.end(), extra.begin(), extra.end());
    ASSERT_TRUE(rec.start_raw(args, 30000ms, false)) << rec.diagnostics();
    ASSERT_TRUE(wait_until(
        [&] { return rec.stderr_text().find("recording to") != std::string::npos; }, 30000ms, 20ms))
        << rec.diagnostics();
    struct Joined {  // joined however this scope ends
      std::thread thread;
      ~Joined() {
        if (thread.joinable()) thread.join();
      }
    } beside;
    if (during) beside.thread = std::thread(during);
    const auto churn = ns.exec(
        {TCPSCOPE_CHURN, "--seconds", std::to_string(seconds), "--clients", "4", "--servers", "2"},
        60000ms);
    if (beside.thread.joinable()) beside.thread.join();  // before the tracer stops
    ASSERT_EQ(churn.status, 0) << churn.err;
    ASSERT_EQ(std::sscanf(churn.out.c_str(), "conns %lu", &conns), 1) << churn.out;
    // A connection the server never answered (churn gave up on it) is the
    // workload's failure, not the tracer's: say so rather than miscount.
    ASSERT_NE(churn.out.find(" unanswered 0"), std::string::npos)
        << "the workload itself stalled: " << churn.out << churn.err;
    ASSERT_EQ(rec.stop(), 0) << rec.diagnostics();
    // The report only: every event of the capture is printed before it.
    const auto rep = run_cmd(
        {"sh", "-c", std::string(tcpscope_binary()) + " report --json " + file + " | tail -n 1"},
        120000ms);
    ASSERT_EQ(rep.status, 0) << rep.err;
    report = json::parse(rep.out);
    ASSERT_EQ(report.value("type", ""), "report") << rep.out.substr(0, 2000);
  }
};

TEST_F(ChurnTest, ThousandConnectionsAllTracedNoneLost) {
  // No connect-side TIME_WAIT reuse: every client gets its own port and
  // every TIME_WAIT stays in place for ss to count.
  NetNs ns({"net.ipv4.tcp_tw_reuse=0"});
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();

  uint16_t sport = 0;
  std::set<uint16_t> client_ports;
  {
    ScopedNetns in(ns);
    Fd lfd(listen_tcp(AF_INET, "127.0.0.1"));
    ASSERT_TRUE(lfd.valid());
    sport = local_port(lfd.get());
    for (int i = 0; i < kConnections; ++i) {
      Fd c(connect_tcp(AF_INET, "127.0.0.1", sport));
      ASSERT_TRUE(c.valid()) << "connection " << i << ": " << std::strerror(errno);
      Fd a(accept_tcp(lfd.get()));
      ASSERT_TRUE(a.valid()) << "connection " << i << ": " << std::strerror(errno);
      client_ports.insert(local_port(c.get()));
      c.reset();
      // The server has the client's FIN (CLOSE_WAIT) before it closes:
      // no crossing FINs, so every lifecycle is the plain one.
      char byte;
      ASSERT_TRUE(wait_readable(a.get())) << "connection " << i;
      ASSERT_EQ(::recv(a.get(), &byte, 1, 0), 0) << "connection " << i;
      a.reset();
    }
    lfd.reset();
  }
  ASSERT_EQ(client_ports.size(), static_cast<size_t>(kConnections));
  // Settled: nothing left but TIME_WAIT.
  size_t tw = 0;
  ASSERT_TRUE(wait_until(
      [&] {
        auto all = ss_sockets(ns);
        tw = 0;
        for (const auto& s : all)
          if (s.state == "TIME-WAIT") ++tw;
        return tw == all.size();
      },
      20000ms, 20ms))
      << ns.exec({"ss", "-tan"}).out.substr(0, 4000);
  const auto counters = nstat(ns);

  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  EXPECT_TRUE(tracer.bad_lines().empty()) << tracer.diagnostics();

  // Lifecycles by conn id.
  std::map<uint64_t, std::vector<std::string>> paths;
  std::map<uint64_t, int> lport_of;
  for (const auto& e : tracer.events("state")) {
    const auto c = e.value("conn", uint64_t{0});
    auto& p = paths[c];
    if (p.empty()) p.push_back(e.value("old", ""));
    p.push_back(e.value("new", ""));
    lport_of[c] = e.value("lport", -1);  // the last one: after connect picked it
  }
  int clients = 0, servers = 0, listeners = 0, other = 0, entered_tw = 0, exact_client = 0,
      exact_server = 0;
  std::set<uint16_t> traced_client_ports;
  for (const auto& [c, p] : paths) {
    const bool closed = p.size() >= 2 && p.back() == "CLOSE";
    if (p.size() >= 2 && p[0] == "CLOSE" && p[1] == "SYN_SENT" && closed) {
      ++clients;
      traced_client_ports.insert(static_cast<uint16_t>(lport_of[c]));
      if (p == kActiveOpenActiveClose) ++exact_client;
    } else if (p.size() >= 2 && p[0] == "LISTEN" && p[1] == "SYN_RECV" && closed) {
      ++servers;
      if (p == kPassiveOpenPassiveClose) ++exact_server;
    } else if (p == kListenerPath) {
      ++listeners;
    } else {
      ++other;
      ADD_FAILURE() << "conn " << c
                    << " has an incomplete lifecycle: " << ::testing::PrintToString(p);
    }
    if (closed && p.size() >= 3 && (p[p.size() - 2] == "FIN_WAIT2" || p[p.size() - 2] == "CLOSING"))
      ++entered_tw;
  }
  EXPECT_EQ(clients, kConnections);
  EXPECT_EQ(servers, kConnections);
  EXPECT_EQ(listeners, 1);
  EXPECT_EQ(other, 0);
  EXPECT_EQ(traced_client_ports, client_ports);
  // Client closes first, the server once it read EOF.
  EXPECT_EQ(exact_client, kConnections);
  EXPECT_EQ(exact_server, kConnections);
  // Kernel: the TIME_WAITs it holds are those the trace saw entered.
  EXPECT_EQ(static_cast<size_t>(entered_tw), tw);

  const json r = tracer.report();
  const auto by_open = counts(r, "by_open");
  const auto by_close = counts(r, "by_close");
  EXPECT_EQ(ring_full_losses(r), 0u) << r.dump();
  EXPECT_EQ(r.at("connections").at("total"), 2 * kConnections) << r.dump();
  EXPECT_EQ(r.at("connections").at("listeners"), 1) << r.dump();
  EXPECT_EQ(by_open.at("active"), static_cast<uint64_t>(kConnections)) << r.dump();
  EXPECT_EQ(by_open.at("passive"), static_cast<uint64_t>(kConnections)) << r.dump();
  EXPECT_EQ(by_open.at("unknown"), 0u) << r.dump();
  EXPECT_EQ(by_close.at("active_close"), static_cast<uint64_t>(kConnections)) << r.dump();
  EXPECT_EQ(by_close.at("passive_close"), static_cast<uint64_t>(kConnections)) << r.dump();
  EXPECT_EQ(by_close.at("open"), 0u) << r.dump();
  EXPECT_EQ(counters.at("TcpActiveOpens"), by_open.at("active"));
  EXPECT_EQ(counters.at("TcpPassiveOpens"), by_open.at("passive"));
}

// Full-rate churn (bench/churn: 4 client and 2 server threads): softirqs
// change sockets' states while set_state runs in a system call on the same
// CPU, or while the kernel enters or leaves it. The kernel skips those runs
// of the main program (tens per second here) and the twin must do each one:
// no transition lost, none reported twice (a doubled one is a gap). The old
// twin, which only knew whether the main program was busy, lost 5-30.
TEST_F(ChurnTest, FullRateChurnLosesNoTransition) {
  Tracer rec;
  uint64_t conns = 0;
  json r;
  ASSERT_NO_FATAL_FAILURE(record_churn({}, 4, rec, conns, r));
  ASSERT_GT(conns, 10000u);
  const auto by_open = counts(r, "by_open");
  const auto by_close = counts(r, "by_close");
  // Every run the kernel skipped was done by a twin, and the ring kept up.
  // (On failure, the tracer's log names the programs whose runs were skipped.)
  // Resets the kernel counted but no program run reported are the uncounted
  // misses below, not skipped runs a twin could do.
  const uint64_t resets_missing = r.at("lost_resets_missing").get<uint64_t>();
  EXPECT_EQ(r.at("lost_kernel_skipped").get<uint64_t>() - resets_missing, 0u)
      << rec.diagnostics() << r.dump();
  // (On failure, the log says how full the ring got and how long it went
  // unread then.)
  EXPECT_EQ(ring_full_losses(r), 0u) << rec.diagnostics() << r.dump();
  EXPECT_EQ(by_open.at("active"), conns) << r.dump();
  EXPECT_EQ(by_open.at("passive"), conns) << r.dump();
  EXPECT_EQ(by_open.at("unknown"), 0u) << r.dump();
  // A transition reported twice shows as a gap. Known and not ours to fix:
  // now and then the kernel runs none of our programs for a socket's later
  // transitions (its tw timer start included) and counts no miss either
  // (README, "How it works"): a gap when its tw sock's next record ends it
  // (a live trace's audit may report it vanished first), or a connection
  // left open if none came before the end; a reset sent, a missing one.
  // About 1 in 50,000 connections.
  EXPECT_LE(r.at("lost_gaps").get<uint64_t>() + by_close.at("open") + resets_missing, conns / 10000)
      << r.dump();
}

// Classic tracepoints have no twin, and a program of that kind is skipped
// whenever another one runs on its CPU: at full churn runs are lost. The
// trace says how many (lost_kernel_skipped) and, at its end, of which
// programs (bpf_prog_info recursion_misses, read again then, so at least
// as many).
TEST_F(ChurnTest, SkippedRunsAreNamedByProgram) {
  Tracer rec;
  uint64_t conns = 0;
  json r;
  ASSERT_NO_FATAL_FAILURE(record_churn({"--attach", "tracepoint"}, 2, rec, conns, r));
  // Not the resets found missing by the kernel's count: no program is known.
  const uint64_t skipped =
      r.at("lost_kernel_skipped").get<uint64_t>() - r.at("lost_resets_missing").get<uint64_t>();

  const std::string log = rec.stderr_text();
  const std::string marker = " runs the kernel skipped were not redone; runs skipped: ";
  const size_t at = log.find(marker);
  if (skipped == 0) {
    EXPECT_EQ(at, std::string::npos) << log;
    return;
  }
  ASSERT_NE(at, std::string::npos) << "lost_kernel_skipped " << skipped << "\n" << log;
  const size_t line_start = log.rfind(' ', at - 1) + 1;
  EXPECT_EQ(std::stoull(log.substr(line_start, at - line_start)), skipped) << log;
  // "set_state_tp 98, tw_cancel_tp 203 (the twin did 0)"
  std::string list = log.substr(at + marker.size());
  list = list.substr(0, list.find('\n'));
  const size_t twin_at = list.find(" (the twin did ");
  ASSERT_NE(twin_at, std::string::npos) << list;
  EXPECT_EQ(list.substr(twin_at), " (the twin did 0)") << list;  // none under tracepoints
  uint64_t named = 0;
  size_t pos = 0;
  while (pos < twin_at) {
    const size_t space = list.find(' ', pos);
    const std::string prog = list.substr(pos, space - pos);
    EXPECT_TRUE(prog.size() > 3 && prog.ends_with("_tp")) << prog << " in " << list;
    size_t used = 0;
    named += std::stoull(list.substr(space + 1), &used);
    pos = space + 1 + used + 2;  // past ", "
  }
  EXPECT_GE(named, skipped) << list;
}

// A ring of 8 KiB (some 60 records) cannot hold a full churn between two
// reads: records are lost, counted, and the log says how full the ring was
// found and after how long unread, and what to raise.
TEST_F(ChurnTest, RingFullLossesAreExplained) {
  Tracer rec;
  uint64_t conns = 0;
  json r;
  ASSERT_NO_FATAL_FAILURE(record_churn({"--ring-size", "8K"}, 1, rec, conns, r));
  const uint64_t lost = ring_full_losses(r);
  ASSERT_GT(lost, 0u) << r.dump();
  const std::string log = rec.stderr_text();
  const std::string line =
      std::to_string(lost) + " records lost with the ring buffer full: it " + "was found up to ";
  const size_t at = log.find(line);
  ASSERT_NE(at, std::string::npos) << log;
  const std::string rest = log.substr(at + line.size(), log.find('\n', at) - at - line.size());
  // "100% full, then after 3 ms without a read; raise --ring-size (now 8 KiB)"
  EXPECT_GE(std::stoi(rest), 90) << rest;
  EXPECT_NE(rest.find("% full, then after "), std::string::npos) << rest;
  EXPECT_NE(rest.find(" ms without a read; raise --ring-size (now 8 KiB)"), std::string::npos)
      << rest;
}

// A consumer that cannot run while the producers force wake-ups (here
// stopped by SIGSTOP for 200 ms, five times, as when the host does not run
// its CPU) is counted in --stats' ring_late_wakeups, and the longest time
// the ring went unread shows in ring_peak_unread_ms. A stop that falls
// outside the wait for a wake-up is not counted: one of five must fall in
// it (the consumer waits most of the time).
TEST_F(ChurnTest, LateWakeupsAreCounted) {
  Tracer rec;
  uint64_t conns = 0;
  json r;
  auto pause = [&rec] {
    for (int i = 0; i < 5; ++i) {
      std::this_thread::sleep_for(300ms);
      ::kill(rec.pid(), SIGSTOP);
      std::this_thread::sleep_for(200ms);
      ::kill(rec.pid(), SIGCONT);
    }
  };
  // A ring big enough that nothing is lost meanwhile.
  ASSERT_NO_FATAL_FAILURE(record_churn({"--stats", "--ring-size", "64M"}, 3, rec, conns, r, pause));
  const std::string log = rec.stderr_text();
  auto figure = [&log](const std::string& key) {
    const size_t at = log.find(" " + key + " ");
    return at == std::string::npos ? -1.0 : std::stod(log.substr(at + key.size() + 2));
  };
  EXPECT_GE(figure("ring_late_wakeups"), 1) << log;
  EXPECT_GE(figure("ring_peak_unread_ms"), 150) << log;
  EXPECT_EQ(ring_full_losses(r), 0u) << r.dump();
}

}  // namespace
}  // namespace ktest
