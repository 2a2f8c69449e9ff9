// Stuck CLOSE_WAIT: real sockets whose peer closed and whose program never
// calls close(), in a private netns, with --close-wait-threshold 1 (or 2).
// Ground truth: the pids and fds our own processes report, `ss -tanp` in
// the namespace, and a real redis-server closing idle clients.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "harness.hpp"

namespace ktest {
namespace {

constexpr const char* kHolderComm = "cw-holder";

struct Sock {
  int fd = -1;
  uint16_t lport = 0;
};

// "fds 4:40000 5:40001" -> sockets.
std::vector<Sock> parse_socks(const std::optional<std::string>& msg) {
  std::vector<Sock> v;
  if (!msg || msg->rfind("fds ", 0) != 0) return v;
  std::istringstream in(msg->substr(4));
  std::string item;
  while (in >> item) {
    const auto colon = item.find(':');
    if (colon == std::string::npos) return {};
    v.push_back(
        Sock{std::atoi(item.c_str()), static_cast<uint16_t>(std::atoi(item.c_str() + colon + 1))});
  }
  return v;
}

std::string describe(const std::vector<Sock>& v) {
  std::string s = "fds";
  for (const Sock& x : v) {
    s += ' ';
    s += std::to_string(x.fd);
    s += ':';
    s += std::to_string(x.lport);
  }
  return s;
}

// Holder process: connects n sockets to 127.0.0.1:port, optionally sends
// `payload` on each, says "fds FD:LPORT...", then never reads nor closes
// them until "close" (closes, says "closed"); "exit" ends it.
int holder_main(Channel& ch, const char* comm, uint16_t port, int n, const std::string& payload) {
  ::prctl(PR_SET_NAME, comm, 0, 0, 0);
  std::vector<Fd> fds;
  std::vector<Sock> socks;
  for (int i = 0; i < n; ++i) {
    Fd fd(connect_tcp(AF_INET, "127.0.0.1", port));
    if (!fd.valid()) return 10;
    if (!payload.empty() && ::send(fd.get(), payload.data(), payload.size(), MSG_NOSIGNAL) !=
                                static_cast<ssize_t>(payload.size()))
      return 11;
    socks.push_back(Sock{fd.get(), local_port(fd.get())});
    fds.push_back(std::move(fd));
  }
  if (!ch.child_send(describe(socks))) return 12;
  while (true) {
    auto cmd = ch.child_recv(60000ms);
    if (!cmd) return 13;
    if (*cmd == "exit") return 0;
    if (cmd->rfind("close ", 0) == 0) {  // "close LPORT"
      const int lport = std::atoi(cmd->c_str() + 6);
      for (size_t i = 0; i < socks.size(); ++i)
        if (socks[i].lport == lport) fds[i].reset();
      if (!ch.child_send("closed")) return 14;
    } else if (*cmd == "close") {
      fds.clear();
      if (!ch.child_send("closed")) return 15;
    }
  }
}

// /proc/PID/cmdline as tcpscope shows it: NULs as spaces, no trailing one.
std::string cmdline_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::replace(s.begin(), s.end(), '\0', ' ');
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

// ss's Recv-Q column (the second field of `ss -tanpoeH`).
int ss_recv_q(const SsSocket& s) {
  std::istringstream in(s.line);
  std::string state, recvq;
  in >> state >> recvq;
  return std::atoi(recvq.c_str());
}

std::vector<SsSocket> ss_close_wait(const NetNs& ns) {
  std::vector<SsSocket> v;
  for (auto& s : ss_sockets(ns))
    if (s.state == "CLOSE-WAIT") v.push_back(std::move(s));
  return v;
}

json notice_for(const Tracer& t, const std::string& type, uint16_t lport) {
  for (const auto& e : t.events(type))
    if (e.value("lport", 0) == lport) return e;
  return json();
}

// Waits until the tracer has reported n stuck CLOSE_WAITs.
bool reported_stuck(Tracer& tracer, size_t n, Millis timeout = 15000ms) {
  return tracer.wait_for(
      [n](const std::vector<json>& lines) { return count_type(lines, "close_wait_stuck") >= n; },
      timeout);
}

std::vector<json> rows_for(const json& report, uint16_t lport) {
  std::vector<json> v;
  for (const auto& r : report["close_wait"])
    if (r.value("lport", 0) == lport) v.push_back(r);
  return v;
}

// A loopback listener in the namespace (created from this thread, which
// leaves the namespace again) that accepts and closes on request.
struct Server {
  explicit Server(const NetNs& ns) {
    ScopedNetns in(ns);
    lfd = Fd(listen_tcp(AF_INET, "127.0.0.1"));
    port = lfd.valid() ? local_port(lfd.get()) : 0;
  }
  // Accepts n connections.
  bool accept_n(int n) {
    for (int i = 0; i < n; ++i) {
      Fd a(accept_tcp(lfd.get(), 10000ms));
      if (!a.valid()) return false;
      accepted.push_back(std::move(a));
    }
    return true;
  }
  // Closes our side of every accepted connection: the peers go CLOSE_WAIT.
  void close_all() { accepted.clear(); }
  Fd lfd;
  uint16_t port = 0;
  std::vector<Fd> accepted;
};

class CloseWaitTest : public KernelTest {};

TEST_F(CloseWaitTest, StuckSocketsNamePidAndFdsAsSsDoes) {
  constexpr int kN = 3;
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, {"--close-wait-threshold", "1"})) << tracer.diagnostics();
  Server srv(ns);
  ASSERT_NE(srv.port, 0);
  Channel ch;
  const pid_t holder = ns.spawn([&] { return holder_main(ch, kHolderComm, srv.port, kN, ""); });
  ASSERT_TRUE(srv.accept_n(kN));
  const auto socks = parse_socks(ch.recv());
  ASSERT_EQ(socks.size(), static_cast<size_t>(kN));
  srv.close_all();
  ASSERT_TRUE(wait_until([&] { return ss_close_wait(ns).size() == kN; }))
      << ns.exec({"ss", "-tanp"}).out;

  // Kernel ground truth: ss names the holder and its fds.
  const auto ss = ss_close_wait(ns);
  for (const Sock& s : socks) {
    auto it =
        std::find_if(ss.begin(), ss.end(), [&](const SsSocket& x) { return x.lport == s.lport; });
    ASSERT_NE(it, ss.end());
    ASSERT_EQ(it->users.size(), 1u) << it->line;
    EXPECT_EQ(it->users[0].pid, holder);
    EXPECT_EQ(it->users[0].fd, s.fd);
    EXPECT_EQ(ss_recv_q(*it), 1) << "ss counts the unread FIN";
  }

  ASSERT_TRUE(reported_stuck(tracer, kN)) << tracer.diagnostics();
  const std::string cmdline = cmdline_of(holder);
  ASSERT_FALSE(cmdline.empty());
  for (const Sock& s : socks) {
    const json n = notice_for(tracer, "close_wait_stuck", s.lport);
    ASSERT_TRUE(n.is_object()) << s.lport << "\n" << tracer.diagnostics();
    EXPECT_EQ(n["pid"], holder) << n.dump();
    EXPECT_EQ(n["comm"], kHolderComm) << n.dump();
    EXPECT_EQ(n["fd"], s.fd) << n.dump();
    EXPECT_EQ(n["holders"], 1) << n.dump();
    EXPECT_EQ(n["holder_fds"], std::to_string(holder) + ":" + std::to_string(s.fd));
    EXPECT_EQ(n["laddr"], "127.0.0.1");
    EXPECT_EQ(n["raddr"], "127.0.0.1");
    EXPECT_EQ(n["rport"], srv.port);
    EXPECT_EQ(n["recv_q"], 0);
    EXPECT_EQ(n["eof_read"], false);
    EXPECT_EQ(n["age_ms"], 1000);
    EXPECT_EQ(n["threshold_ms"], 1000);
    EXPECT_EQ(n["preexisting"], false);
    EXPECT_EQ(n["owner_pid"], holder) << "connect() named it too";
    EXPECT_EQ(n["cmdline"], cmdline);
  }

  // The holder finally closes them: how long they were stuck.
  ASSERT_TRUE(ch.send("close"));
  ASSERT_EQ(ch.recv(), "closed");
  ASSERT_TRUE(tracer.wait_for([](const std::vector<json>& lines) {
    return count_type(lines, "close_wait_end") >= kN;
  })) << tracer.diagnostics();
  for (const Sock& s : socks) {
    const json e = notice_for(tracer, "close_wait_end", s.lport);
    ASSERT_TRUE(e.is_object());
    EXPECT_GE(e["duration_ms"].get<int64_t>(), 1000) << e.dump();
    EXPECT_EQ(e["duration_ms"].get<int64_t>() - 1000, e["stuck_ms"].get<int64_t>()) << e.dump();
    EXPECT_EQ(e["new"], "LAST_ACK");
    EXPECT_EQ(e["pid"], holder);
  }
  ch.send("exit");
  EXPECT_EQ(ns.wait(holder), 0);

  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const json rep = tracer.report();
  ASSERT_EQ(rep["close_wait"].size(), static_cast<size_t>(kN)) << rep.dump();
  for (const Sock& s : socks) {
    const auto rows = rows_for(rep, s.lport);
    ASSERT_EQ(rows.size(), 1u);
    EXPECT_EQ(rows[0]["pid"], holder);
    EXPECT_EQ(rows[0]["fd"], s.fd);
    EXPECT_EQ(rows[0]["comm"], kHolderComm);
    EXPECT_EQ(rows[0]["cmdline"], cmdline);
    EXPECT_EQ(rows[0]["rport"], srv.port);
    EXPECT_EQ(rows[0]["recv_q"], 0);
    EXPECT_EQ(rows[0]["open"], false);
    EXPECT_GE(rows[0]["age_s"].get<double>(), 1.0);
  }
  ASSERT_EQ(rep["close_wait_by_process"].size(), 1u);
  const json& bp = rep["close_wait_by_process"][0];
  EXPECT_EQ(bp["pid"], holder);
  EXPECT_EQ(bp["count"], kN);
  EXPECT_EQ(bp["open"], 0);
  ASSERT_EQ(bp["remotes"].size(), 1u);
  EXPECT_EQ(bp["remotes"][0]["rport"], srv.port);
  EXPECT_EQ(bp["remotes"][0]["count"], kN);
  EXPECT_EQ(rep["close_wait_summary"]["stuck"], kN);
  EXPECT_EQ(rep["close_wait_summary"]["closed_after_stuck"], kN);
  const json& scan = rep["close_wait_scan"];
  EXPECT_GE(scan["rounds"].get<int>(), 1);
  EXPECT_GE(scan["sockets_found"].get<int>(), kN);
  EXPECT_GT(scan["fds"].get<int>(), 0);
  EXPECT_GT(scan["processes"].get<int>(), 0);
}

TEST_F(CloseWaitTest, CloseWaitFromBeforeTheStartIsFound) {
  NetNs ns;
  Server srv(ns);
  Channel ch;
  const pid_t holder = ns.spawn([&] { return holder_main(ch, kHolderComm, srv.port, 1, ""); });
  ASSERT_TRUE(srv.accept_n(1));
  const auto socks = parse_socks(ch.recv());
  ASSERT_EQ(socks.size(), 1u);
  const auto closed_at = std::chrono::steady_clock::now();
  srv.close_all();
  ASSERT_TRUE(wait_until([&] { return ss_close_wait(ns).size() == 1; }));
  std::this_thread::sleep_for(1500ms);

  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, {"--close-wait-threshold", "1"})) << tracer.diagnostics();
  ASSERT_TRUE(reported_stuck(tracer, 1, 10000ms)) << tracer.diagnostics();
  const auto upper_ms =
      std::chrono::duration_cast<Millis>(std::chrono::steady_clock::now() - closed_at).count();
  const json n = notice_for(tracer, "close_wait_stuck", socks[0].lport);
  ASSERT_TRUE(n.is_object()) << tracer.diagnostics();
  EXPECT_EQ(n["preexisting"], true);
  EXPECT_EQ(n["pid"], holder);
  EXPECT_EQ(n["fd"], socks[0].fd);
  EXPECT_EQ(n["owner_pid"], 0) << "no owner is known for a socket that predates the trace";
  // Its age is bounded below by the peer's FIN (the last ACK received).
  EXPECT_GE(n["age_ms"].get<int64_t>(), 1450) << n.dump();
  EXPECT_LE(n["age_ms"].get<int64_t>(), upper_ms) << n.dump();
  ch.send("exit");
  EXPECT_EQ(ns.wait(holder), 0);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const json rep = tracer.report();
  const auto rows = rows_for(rep, socks[0].lport);
  ASSERT_EQ(rows.size(), 1u) << rep.dump();
  EXPECT_EQ(rows[0]["preexisting"], true);
  EXPECT_EQ(rows[0]["pid"], holder);
  EXPECT_EQ(rows[0]["fd"], socks[0].fd);
  EXPECT_EQ(rep["close_wait_summary"]["preexisting"], 1);
  EXPECT_GE(rep["connections"]["by_open"]["unknown"].get<int>(), 1);
}

// Parent connects A, B, forks; the child keeps both; the parent closes A;
// then the parent passes a third socket C to the child over SCM_RIGHTS and
// closes it. Holders: A child, B both, C child (at the fd it received).
int parent_main(Channel& ch, uint16_t port) {
  ::prctl(PR_SET_NAME, "cw-parent", 0, 0, 0);
  Fd a(connect_tcp(AF_INET, "127.0.0.1", port));
  Fd b(connect_tcp(AF_INET, "127.0.0.1", port));
  if (!a.valid() || !b.valid()) return 10;
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0) return 11;
  const pid_t parent = ::getpid();
  const pid_t child = ::fork();
  if (child < 0) return 12;
  if (child == 0) {
    ::prctl(PR_SET_NAME, "cw-child", 0, 0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (::getppid() != parent) _exit(0);
    ::close(sp[0]);
    char byte;
    char cbuf[CMSG_SPACE(sizeof(int))] = {};
    iovec iov{&byte, 1};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf;
    msg.msg_controllen = sizeof(cbuf);
    if (::recvmsg(sp[1], &msg, 0) != 1) _exit(1);
    const cmsghdr* c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_type != SCM_RIGHTS) _exit(2);
    int got;
    std::memcpy(&got, CMSG_DATA(c), sizeof(int));
    const std::string line = std::to_string(got) + "\n";
    if (::write(sp[1], line.data(), line.size()) < 0) _exit(3);
    ::pause();  // until the parent kills us
    _exit(0);
  }
  ::close(sp[1]);
  Fd cfd(connect_tcp(AF_INET, "127.0.0.1", port));
  if (!cfd.valid()) return 13;
  char byte = 'x';
  char cbuf[CMSG_SPACE(sizeof(int))] = {};
  iovec iov{&byte, 1};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = cbuf;
  msg.msg_controllen = sizeof(cbuf);
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  const int passed = cfd.get();
  std::memcpy(CMSG_DATA(c), &passed, sizeof(int));
  if (::sendmsg(sp[0], &msg, 0) != 1) return 14;
  char rbuf[32] = {};
  if (!wait_readable(sp[0], 10000ms) || ::read(sp[0], rbuf, sizeof(rbuf) - 1) <= 0) return 15;
  const int child_c_fd = std::atoi(rbuf);
  const uint16_t pa = local_port(a.get()), pb = local_port(b.get()), pc = local_port(cfd.get());
  const int fa = a.get(), fb = b.get();
  a.reset();
  cfd.reset();
  int rc = 0;
  if (!ch.child_send("socks " + std::to_string(child) + " " + std::to_string(pa) + ":" +
                     std::to_string(fa) + " " + std::to_string(pb) + ":" + std::to_string(fb) +
                     " " + std::to_string(pc) + ":" + std::to_string(child_c_fd)))
    rc = 16;
  if (rc == 0 && !ch.child_expect("exit", 60000ms)) rc = 17;
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ::close(sp[0]);
  return rc;
}

TEST_F(CloseWaitTest, ForkedChildAndFdPassingHoldersAreListed) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, {"--close-wait-threshold", "1"})) << tracer.diagnostics();
  Server srv(ns);
  Channel ch;
  const pid_t parent = ns.spawn([&] { return parent_main(ch, srv.port); });
  ASSERT_TRUE(srv.accept_n(3));
  const auto msg = ch.recv();
  ASSERT_TRUE(msg && msg->rfind("socks ", 0) == 0) << (msg ? *msg : "no message");
  std::istringstream in(msg->substr(6));
  pid_t child = 0;
  std::string sa, sb, sc;
  in >> child >> sa >> sb >> sc;
  ASSERT_GT(child, 0);
  auto split = [](const std::string& s) {
    return std::pair<uint16_t, int>{static_cast<uint16_t>(std::atoi(s.c_str())),
                                    std::atoi(s.c_str() + s.find(':') + 1)};
  };
  const auto [pa, fa] = split(sa);
  const auto [pb, fb] = split(sb);
  const auto [pc, fc] = split(sc);
  srv.close_all();
  ASSERT_TRUE(wait_until([&] { return ss_close_wait(ns).size() == 3; }))
      << ns.exec({"ss", "-tanp"}).out;
  // ss agrees on who holds what.
  for (const auto& s : ss_close_wait(ns)) {
    std::vector<std::pair<pid_t, int>> users;
    for (const auto& u : s.users) users.emplace_back(u.pid, u.fd);
    std::sort(users.begin(), users.end());
    if (s.lport == pa) {
      EXPECT_EQ(users, (std::vector<std::pair<pid_t, int>>{{child, fa}})) << s.line;
    }
    if (s.lport == pb) {
      std::vector<std::pair<pid_t, int>> want{{parent, fb}, {child, fb}};
      std::sort(want.begin(), want.end());
      EXPECT_EQ(users, want) << s.line;
    }
    if (s.lport == pc) {
      EXPECT_EQ(users, (std::vector<std::pair<pid_t, int>>{{child, fc}})) << s.line;
    }
  }
  ASSERT_TRUE(reported_stuck(tracer, 3)) << tracer.diagnostics();

  const json na = notice_for(tracer, "close_wait_stuck", pa);
  EXPECT_EQ(na["pid"], child) << na.dump();
  EXPECT_EQ(na["comm"], "cw-child") << na.dump();
  EXPECT_EQ(na["fd"], fa);
  EXPECT_EQ(na["owner_pid"], parent) << "the owner seen at connect() is stale";
  const json nb = notice_for(tracer, "close_wait_stuck", pb);
  EXPECT_EQ(nb["holders"], 2) << nb.dump();
  const pid_t lo = std::min(parent, child), hi = std::max(parent, child);
  EXPECT_EQ(nb["holder_fds"], std::to_string(lo) + ":" + std::to_string(fb) + "," +
                                  std::to_string(hi) + ":" + std::to_string(fb));
  const json nc = notice_for(tracer, "close_wait_stuck", pc);
  EXPECT_EQ(nc["pid"], child) << nc.dump();
  EXPECT_EQ(nc["fd"], fc) << nc.dump();
  EXPECT_EQ(nc["holders"], 1);

  ch.send("exit");
  EXPECT_EQ(ns.wait(parent), 0);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const json rep = tracer.report();
  EXPECT_EQ(rep["close_wait"].size(), 4u) << rep.dump();  // A, B twice, C
  const auto rb = rows_for(rep, pb);
  ASSERT_EQ(rb.size(), 2u);
  EXPECT_EQ(rb[0]["pid"], lo);
  EXPECT_EQ(rb[1]["pid"], hi);
  ASSERT_EQ(rep["close_wait_by_process"].size(), 2u);
  EXPECT_EQ(rep["close_wait_by_process"][0]["pid"], child);
  EXPECT_EQ(rep["close_wait_by_process"][0]["count"], 3);
  EXPECT_EQ(rep["close_wait_by_process"][1]["pid"], parent);
  EXPECT_EQ(rep["close_wait_by_process"][1]["count"], 1);
}

TEST_F(CloseWaitTest, ClosedBeforeTheThresholdIsNotStuck) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, {"--close-wait-threshold", "2"})) << tracer.diagnostics();
  Server srv(ns);
  Channel ch;
  const pid_t holder = ns.spawn([&] { return holder_main(ch, kHolderComm, srv.port, 2, ""); });
  ASSERT_TRUE(srv.accept_n(2));
  const auto socks = parse_socks(ch.recv());
  ASSERT_EQ(socks.size(), 2u);
  srv.close_all();
  ASSERT_TRUE(wait_until([&] { return ss_close_wait(ns).size() == 2; }));
  std::this_thread::sleep_for(300ms);
  ASSERT_TRUE(ch.send("close " + std::to_string(socks[0].lport)));  // in time
  ASSERT_EQ(ch.recv(), "closed");
  // The other one (the control) is reported: the detector works.
  ASSERT_TRUE(reported_stuck(tracer, 1)) << tracer.diagnostics();
  std::this_thread::sleep_for(500ms);  // past both crossings for sure
  ch.send("exit");
  EXPECT_EQ(ns.wait(holder), 0);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const auto stuck = tracer.events("close_wait_stuck");
  ASSERT_EQ(stuck.size(), 1u) << tracer.diagnostics();
  EXPECT_EQ(stuck[0]["lport"], socks[1].lport);
  EXPECT_TRUE(notice_for(tracer, "close_wait_end", socks[0].lport).is_null());
  const json rep = tracer.report();
  EXPECT_TRUE(rows_for(rep, socks[0].lport).empty()) << rep.dump();
  EXPECT_EQ(rows_for(rep, socks[1].lport).size(), 1u);
  EXPECT_EQ(rep["close_wait_summary"]["entered"], 2);
  EXPECT_EQ(rep["close_wait_summary"]["stuck"], 1);
  EXPECT_EQ(rep["close_wait_summary"]["closed_in_time"], 1);
  EXPECT_DOUBLE_EQ(rep["close_wait_summary"]["threshold_s"].get<double>(), 2.0);
}

bool have_redis() { return run_cmd({"sh", "-c", "command -v redis-server"}).status == 0; }

// A real server as the peer: redis-server (`timeout 1`) closes idle clients;
// our client sent PING on each connection and never reads nor closes.
TEST_F(CloseWaitTest, RedisIdleTimeoutLeavesTheClientInCloseWait) {
  if (!have_redis()) {
    if (in_ci()) FAIL() << "redis-server missing (scripts/install-deps.sh installs it)";
    GTEST_SKIP() << "redis-server not installed (scripts/install-deps.sh)";
  }
  constexpr int kN = 3;
  constexpr uint16_t kPort = 16379;  // private netns: nothing else listens
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, {"--close-wait-threshold", "1"})) << tracer.diagnostics();
  const pid_t redis = ns.spawn([] {
    const int null = ::open("/dev/null", O_RDWR);
    ::dup2(null, 1);
    ::dup2(null, 2);
    ::chdir("/tmp");
    ::execlp("redis-server", "redis-server", "--port", "16379", "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--timeout", "1", "--daemonize", "no",
             static_cast<char*>(nullptr));
    return 127;
  });
  ASSERT_TRUE(wait_until(
      [&] {
        for (const auto& s : ss_sockets(ns))
          if (s.state == "LISTEN" && s.lport == kPort) return true;
        return false;
      },
      10000ms))
      << "redis-server did not listen";
  Channel ch;
  const pid_t client =
      ns.spawn([&] { return holder_main(ch, "cw-redis-cli", kPort, kN, "PING\r\n"); });
  const auto socks = parse_socks(ch.recv());
  ASSERT_EQ(socks.size(), static_cast<size_t>(kN));
  ASSERT_TRUE(wait_until([&] { return ss_close_wait(ns).size() == kN; }, 15000ms))
      << ns.exec({"ss", "-tanp"}).out;
  for (const auto& s : ss_close_wait(ns)) {
    EXPECT_EQ(s.rport, kPort) << s.line;
    ASSERT_EQ(s.users.size(), 1u) << s.line;
    EXPECT_EQ(s.users[0].pid, client);
    EXPECT_EQ(ss_recv_q(s), 8) << "+PONG\\r\\n and the FIN: " << s.line;
  }
  ASSERT_TRUE(reported_stuck(tracer, kN)) << tracer.diagnostics();
  for (const Sock& s : socks) {
    const json n = notice_for(tracer, "close_wait_stuck", s.lport);
    ASSERT_TRUE(n.is_object()) << tracer.diagnostics();
    EXPECT_EQ(n["pid"], client);
    EXPECT_EQ(n["comm"], "cw-redis-cli");
    EXPECT_EQ(n["fd"], s.fd);
    EXPECT_EQ(n["rport"], kPort);
    EXPECT_EQ(n["recv_q"], 7) << "the unread +PONG";
    EXPECT_EQ(n["eof_read"], false);
  }
  ch.send("exit");
  EXPECT_EQ(ns.wait(client), 0);
  ::kill(redis, SIGTERM);
  EXPECT_EQ(ns.wait(redis), 0);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  const json rep = tracer.report();
  for (const auto& r : rep["close_wait"]) EXPECT_NE(r["pid"], redis) << r.dump();
  ASSERT_GE(rep["close_wait_by_process"].size(), 1u);
  const json& bp = rep["close_wait_by_process"][0];
  EXPECT_EQ(bp["pid"], client);
  EXPECT_EQ(bp["count"], kN);
  ASSERT_EQ(bp["remotes"].size(), 1u);
  EXPECT_EQ(bp["remotes"][0]["raddr"], "127.0.0.1");
  EXPECT_EQ(bp["remotes"][0]["rport"], kPort);
  EXPECT_EQ(bp["remotes"][0]["count"], kN);
}

}  // namespace
}  // namespace ktest
