#include "harness.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#ifndef TCPSCOPE_BINARY
#error "TCPSCOPE_BINARY must name the tcpscope binary"
#endif

namespace ktest {

namespace {

using Clock = std::chrono::steady_clock;

bool exists(const char* path) {
  struct stat st;
  return ::stat(path, &st) == 0;
}

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

// Waits for pid with a deadline; on timeout kills it by pid and reaps it.
// Returns the decoded status, or -1 on timeout.
int wait_pid_bounded(pid_t pid, Millis timeout) {
  const auto deadline = Clock::now() + timeout;
  Millis nap = 1ms;
  for (;;) {
    int ws = 0;
    const pid_t r = ::waitpid(pid, &ws, WNOHANG);
    if (r == pid) return decode_status(ws);
    if (r < 0 && errno != EINTR) return -1;
    if (Clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      while (::waitpid(pid, &ws, 0) < 0 && errno == EINTR) {
      }
      return -1;
    }
    std::this_thread::sleep_for(nap);
    if (nap < 20ms) nap *= 2;
  }
}

bool parse_endpoint(const std::string& s, std::string& addr, uint16_t& port) {
  const auto colon = s.rfind(':');
  if (colon == std::string::npos) return false;
  addr = s.substr(0, colon);
  if (addr.size() >= 2 && addr.front() == '[' && addr.back() == ']')
    addr = addr.substr(1, addr.size() - 2);
  // "%lo" scope suffixes.
  if (auto pct = addr.find('%'); pct != std::string::npos) addr.resize(pct);
  const std::string p = s.substr(colon + 1);
  if (p == "*") {
    port = 0;
    return true;
  }
  char* end = nullptr;
  const unsigned long v = std::strtoul(p.c_str(), &end, 10);
  if (end == p.c_str() || *end != '\0' || v > 65535) return false;
  port = static_cast<uint16_t>(v);
  return true;
}

// users:(("comm",pid=1,fd=3),("comm2",pid=2,fd=4))
void parse_users(const std::string& line, std::vector<SsSocket::User>& users) {
  const auto start = line.find("users:((");
  if (start == std::string::npos) return;
  size_t pos = start + 7;
  while (pos < line.size() && line[pos] == '(') {
    SsSocket::User u;
    const auto q1 = line.find('"', pos);
    const auto q2 = q1 == std::string::npos ? q1 : line.find('"', q1 + 1);
    if (q2 == std::string::npos) return;
    u.comm = line.substr(q1 + 1, q2 - q1 - 1);
    const auto close = line.find(')', q2);
    if (close == std::string::npos) return;
    const std::string fields = line.substr(q2 + 1, close - q2 - 1);
    if (auto p = fields.find("pid="); p != std::string::npos)
      u.pid = static_cast<pid_t>(std::atoi(fields.c_str() + p + 4));
    if (auto p = fields.find("fd="); p != std::string::npos)
      u.fd = std::atoi(fields.c_str() + p + 3);
    users.push_back(u);
    pos = close + 1;
    if (pos < line.size() && line[pos] == ',') ++pos;
  }
}

// has_state: false for `ss state X` output, which drops the State column.
std::vector<SsSocket> parse_ss(const std::string& out, bool has_state) {
  std::vector<SsSocket> v;
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    SsSocket s;
    std::string recvq, sendq, local, peer;
    if (has_state && !(ls >> s.state)) continue;
    if (!(ls >> recvq >> sendq >> local >> peer)) continue;
    if (!parse_endpoint(local, s.laddr, s.lport) || !parse_endpoint(peer, s.raddr, s.rport))
      continue;
    parse_users(line, s.users);
    s.line = line;
    v.push_back(std::move(s));
  }
  return v;
}

std::atomic<int> g_netns_seq{0};
std::atomic<uint64_t> g_counted_losses{0};

}  // namespace

// $TCPSCOPE_BINARY (e.g. an installed copy) or the one this build made.
const char* tcpscope_binary() {
  const char* env = std::getenv("TCPSCOPE_BINARY");
  return env && *env ? env : TCPSCOPE_BINARY;
}

TempDir::TempDir() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "tcpscope-kcap-XXXXXX").string();
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

uint64_t counted_losses() { return g_counted_losses.load(); }

// ---- prerequisites ----------------------------------------------------------

size_t count_type(const std::vector<json>& lines, const std::string& type) {
  return static_cast<size_t>(std::count_if(
      lines.begin(), lines.end(), [&](const json& l) { return l.value("type", "") == type; }));
}

bool in_ci() {
  const char* ci = std::getenv("CI");
  return ci && (std::strcmp(ci, "true") == 0 || std::strcmp(ci, "1") == 0);
}

std::string missing_prerequisite() {
  if (::geteuid() != 0) return "kernel tests need root (CAP_BPF, netns)";
  if (!exists("/sys/kernel/btf/vmlinux"))
    return "kernel tests need kernel BTF: /sys/kernel/btf/vmlinux is missing "
           "(CONFIG_DEBUG_INFO_BTF=y)";
  if (!exists(tcpscope_binary()))
    return std::string("tcpscope binary not built: ") + tcpscope_binary();
  if (::access("/usr/sbin/ip", X_OK) != 0 && ::access("/sbin/ip", X_OK) != 0 &&
      ::access("/usr/bin/ip", X_OK) != 0 && ::access("/bin/ip", X_OK) != 0)
    return "kernel tests need iproute2 (ip, ss)";
  return {};
}

bool wait_until(const std::function<bool()>& pred, Millis timeout, Millis every) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (Clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(every);
  }
}

int decode_status(int ws) {
  if (WIFEXITED(ws)) return WEXITSTATUS(ws);
  if (WIFSIGNALED(ws)) return 128 + WTERMSIG(ws);
  return -1;
}

// ---- commands ------------------------------------------------------------------

std::string join(const std::vector<std::string>& argv, const char* sep) {
  std::string s;
  for (const auto& a : argv) {
    if (!s.empty()) s += sep;
    s += a;
  }
  return s;
}

CmdResult run_cmd(const std::vector<std::string>& argv, Millis timeout) {
  CmdResult r;
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return r;
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(out[0]);
    ::close(out[1]);
    return r;
  }
  std::vector<char*> cargv;
  for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    ::execvp(cargv[0], cargv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  ::close(err[1]);
  if (pid < 0) {
    ::close(out[0]);
    ::close(err[0]);
    return r;
  }
  const auto deadline = Clock::now() + timeout;
  pollfd pfd[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  int open_fds = 2;
  char buf[65536];
  while (open_fds > 0) {
    const auto left = std::chrono::duration_cast<Millis>(deadline - Clock::now()).count();
    if (left <= 0) {
      r.timed_out = true;
      ::kill(pid, SIGKILL);
      break;
    }
    const int n = ::poll(pfd, 2, static_cast<int>(left));
    if (n < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (pfd[i].fd < 0 || !(pfd[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t k = ::read(pfd[i].fd, buf, sizeof(buf));
      if (k > 0) {
        (i == 0 ? r.out : r.err).append(buf, static_cast<size_t>(k));
      } else if (k == 0 || errno != EINTR) {
        pfd[i].fd = -1;
        --open_fds;
      }
    }
  }
  ::close(out[0]);
  ::close(err[0]);
  const int st = wait_pid_bounded(pid, r.timed_out ? 5000ms : timeout);
  r.status = r.timed_out ? -1 : st;
  return r;
}

// ---- channel -----------------------------------------------------------------------

Channel::Channel() {
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds_) != 0)
    throw std::runtime_error(std::string("socketpair: ") + std::strerror(errno));
}

Channel::~Channel() {
  close_fd(fds_[0]);
  close_fd(fds_[1]);
}

bool Channel::send_on(int fd, const std::string& line) {
  std::string s = line + "\n";
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t n = ::send(fd, s.data() + done, s.size() - done, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    done += static_cast<size_t>(n);
  }
  return true;
}

std::optional<std::string> Channel::recv_on(int fd, Millis timeout) {
  const auto deadline = Clock::now() + timeout;
  std::string line;
  for (;;) {
    const auto left = std::chrono::duration_cast<Millis>(deadline - Clock::now()).count();
    if (left <= 0) return std::nullopt;
    pollfd p{fd, POLLIN, 0};
    const int n = ::poll(&p, 1, static_cast<int>(left));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return std::nullopt;
    char c;
    const ssize_t k = ::recv(fd, &c, 1, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return std::nullopt;
    if (c == '\n') return line;
    line.push_back(c);
  }
}

bool Channel::child_expect(const std::string& line, Millis timeout) {
  auto got = child_recv(timeout);
  return got && *got == line;
}

// ---- network namespace ---------------------------------------------------------

NetNs::NetNs(const std::vector<std::string>& sysctls) {
  name_ = "tcpscope-t-" + std::to_string(::getpid()) + "-" + std::to_string(g_netns_seq++);
  auto r = run_cmd({"ip", "netns", "add", name_});
  if (r.status != 0) throw std::runtime_error("ip netns add " + name_ + ": " + r.err);
  r = run_cmd({"ip", "-n", name_, "link", "set", "lo", "up"});
  if (r.status != 0) {
    run_cmd({"ip", "netns", "del", name_});
    throw std::runtime_error("ip -n " + name_ + " link set lo up: " + r.err);
  }
  struct stat st;
  if (::stat(path().c_str(), &st) != 0) {
    run_cmd({"ip", "netns", "del", name_});
    throw std::runtime_error("stat " + path() + ": " + std::strerror(errno));
  }
  inode_ = st.st_ino;
  try {
    for (const auto& kv : sysctls) sysctl(kv);
  } catch (...) {
    run_cmd({"ip", "netns", "del", name_});
    throw;
  }
}

NetNs::~NetNs() {
  for (pid_t pid : children_) {
    ::kill(pid, SIGKILL);
    int ws;
    while (::waitpid(pid, &ws, 0) < 0 && errno == EINTR) {
    }
  }
  children_.clear();
  run_cmd({"ip", "netns", "del", name_});
}

void NetNs::sysctl(const std::string& key_value) {
  auto r = exec({"sysctl", "-w", key_value});
  if (r.status != 0)
    throw std::runtime_error("sysctl -w " + key_value + " in " + name_ + ": " + r.err);
}

CmdResult NetNs::exec(const std::vector<std::string>& argv, Millis timeout) const {
  std::vector<std::string> full = {"ip", "netns", "exec", name_};
  full.insert(full.end(), argv.begin(), argv.end());
  return run_cmd(full, timeout);
}

namespace {
pid_t fork_in_netns(const std::string& path, const std::function<int()>& fn) {
  const int nsfd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (nsfd < 0) throw std::runtime_error("open " + path + ": " + std::strerror(errno));
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (::setns(nsfd, CLONE_NEWNET) != 0) ::_exit(120);
    ::close(nsfd);
    int rc = 121;
    try {
      rc = fn();
    } catch (...) {
      rc = 122;
    }
    ::_exit(rc);
  }
  ::close(nsfd);
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  return pid;
}
}  // namespace

int NetNs::run(const std::function<int()>& fn, Millis timeout) {
  const pid_t pid = fork_in_netns(path(), fn);
  return wait_pid_bounded(pid, timeout);
}

pid_t NetNs::spawn(const std::function<int()>& fn) {
  const pid_t pid = fork_in_netns(path(), fn);
  children_.push_back(pid);
  return pid;
}

int NetNs::wait(pid_t pid, Millis timeout) {
  std::erase(children_, pid);
  return wait_pid_bounded(pid, timeout);
}

ScopedNetns::ScopedNetns(const NetNs& ns) {
  saved_ = ::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
  if (saved_ < 0) throw std::runtime_error(std::string("open own netns: ") + std::strerror(errno));
  const int fd = ::open(ns.path().c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 || ::setns(fd, CLONE_NEWNET) != 0) {
    const std::string why = std::strerror(errno);
    if (fd >= 0) ::close(fd);
    close_fd(saved_);
    throw std::runtime_error("setns " + ns.path() + ": " + why);
  }
  ::close(fd);
}

ScopedNetns::~ScopedNetns() {
  if (saved_ >= 0) {
    if (::setns(saved_, CLONE_NEWNET) != 0) std::abort();  // never run on in a test netns
    ::close(saved_);
  }
}

// ---- sockets -------------------------------------------------------------------

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

const char* loopback(int family) { return family == AF_INET6 ? "::1" : "127.0.0.1"; }

namespace {
bool make_addr(int family, const char* addr, uint16_t port, sockaddr_storage& ss, socklen_t& len) {
  std::memset(&ss, 0, sizeof(ss));
  if (family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    if (::inet_pton(AF_INET, addr, &a->sin_addr) != 1) return false;
    len = sizeof(*a);
  } else {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    if (::inet_pton(AF_INET6, addr, &a->sin6_addr) != 1) return false;
    len = sizeof(*a);
  }
  return true;
}

uint16_t port_of(const sockaddr_storage& ss) {
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_port);
  return 0;
}
}  // namespace

int listen_tcp(int family, const char* addr, uint16_t port, bool v6only) {
  sockaddr_storage ss;
  socklen_t len;
  if (!make_addr(family, addr, port, ss, len)) return -1;
  const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  const int one = 1, v6 = v6only ? 1 : 0;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (family == AF_INET6) ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6, sizeof(v6));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 || ::listen(fd, 4096) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

int connect_tcp(int family, const char* addr, uint16_t port, uint16_t lport) {
  sockaddr_storage ss;
  socklen_t len;
  if (!make_addr(family, addr, port, ss, len)) return -1;
  const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (lport) {
    sockaddr_storage ls;
    socklen_t llen;
    const char* any = family == AF_INET6 ? "::" : "0.0.0.0";
    if (!make_addr(family, any, lport, ls, llen) ||
        ::bind(fd, reinterpret_cast<sockaddr*>(&ls), llen) != 0) {
      ::close(fd);
      return -1;
    }
  }
  int rc;
  do {
    rc = ::connect(fd, reinterpret_cast<sockaddr*>(&ss), len);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

int accept_tcp(int listen_fd, Millis timeout) {
  if (!wait_readable(listen_fd, timeout)) return -1;
  return ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
}

uint16_t local_port(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return 0;
  return port_of(ss);
}

uint16_t peer_port(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return 0;
  return port_of(ss);
}

bool set_linger_zero(int fd) {
  linger l{1, 0};
  return ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l)) == 0;
}

bool wait_readable(int fd, Millis timeout) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<Millis>(deadline - Clock::now()).count();
    pollfd p{fd, POLLIN, 0};
    const int n = ::poll(&p, 1, static_cast<int>(left > 0 ? left : 0));
    if (n > 0) return true;
    if (n == 0 || errno != EINTR) return false;
  }
}

int socket_error(int fd) {
  int e = 0;
  socklen_t len = sizeof(e);
  if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len) != 0) return -1;
  return e;
}

ConnPorts make_connection(const NetNs& ns, const ConnSpec& spec) {
  ConnPorts p;
  auto fail = [&](const std::string& what) {
    throw std::runtime_error("make_connection in " + ns.name() + ": " + what + ": " +
                             std::strerror(errno));
  };
  ScopedNetns in(ns);
  Fd lfd(listen_tcp(spec.server_family, spec.server_addr.c_str(), spec.server_port, spec.v6only));
  if (!lfd.valid()) fail("listen on " + spec.server_addr);
  p.sport = local_port(lfd.get());
  Fd cfd(connect_tcp(spec.client_family, spec.connect_addr.c_str(), p.sport, spec.client_port));
  if (!cfd.valid()) fail("connect to " + spec.connect_addr);
  Fd afd(accept_tcp(lfd.get()));
  if (!afd.valid()) fail("accept");
  p.cport = local_port(cfd.get());
  if (peer_port(afd.get()) != p.cport) fail("accepted socket's peer port");
  cfd.reset();
  if (!wait_ss_state(ns, p.cport, p.sport, "FIN-WAIT-2")) fail("client never in FIN_WAIT2");
  afd.reset();
  const bool done = wait_until([&] {
    auto all = ss_sockets(ns);
    auto c = ss_find(all, p.cport, p.sport);
    return c.size() == 1 && c[0].state == "TIME-WAIT" && ss_find(all, p.sport, p.cport).empty();
  });
  if (!done) fail("client never in TIME_WAIT / server never gone");
  lfd.reset();
  return p;
}

// ---- kernel ground truth ---------------------------------------------------------

std::vector<SsSocket> ss_sockets(const NetNs& ns) {
  auto r = ns.exec({"ss", "-tanpoeH"});
  if (r.status != 0) throw std::runtime_error("ss -tanpoeH in " + ns.name() + ": " + r.err);
  return parse_ss(r.out, true);
}

std::vector<SsSocket> ss_time_wait(const NetNs& ns) {
  auto r = ns.exec({"ss", "-tanH", "state", "time-wait"});
  if (r.status != 0) throw std::runtime_error("ss state time-wait in " + ns.name() + ": " + r.err);
  auto v = parse_ss(r.out, false);
  for (auto& s : v) s.state = "TIME-WAIT";
  return v;
}

std::vector<SsSocket> ss_find(const std::vector<SsSocket>& all, uint16_t lport, uint16_t rport) {
  std::vector<SsSocket> v;
  for (const auto& s : all)
    if (s.lport == lport && (rport == 0 || s.rport == rport)) v.push_back(s);
  return v;
}

bool wait_ss_state(const NetNs& ns, uint16_t lport, uint16_t rport, const std::string& state,
                   Millis timeout) {
  return wait_until(
      [&] {
        for (const auto& s : ss_find(ss_sockets(ns), lport, rport))
          if (s.state == state) return true;
        return false;
      },
      timeout, 2ms);
}

std::map<std::string, uint64_t> nstat(const NetNs& ns) {
  auto r = ns.exec({"nstat", "-asz"});
  if (r.status != 0) throw std::runtime_error("nstat -asz in " + ns.name() + ": " + r.err);
  std::map<std::string, uint64_t> m;
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    std::string key;
    uint64_t v;
    if (ls >> key >> v) m[key] = v;
  }
  return m;
}

// ---- tracer ------------------------------------------------------------------------

Tracer::~Tracer() {
  if (pid_ > 0 && !reaped_) {
    ::kill(pid_, SIGKILL);
    int ws;
    while (::waitpid(pid_, &ws, 0) < 0 && errno == EINTR) {
    }
    reaped_ = true;
  }
  if (thread_.joinable()) thread_.join();
  close_fd(out_fd_);
  close_fd(err_fd_);
}

bool Tracer::start(const NetNs& ns, const std::vector<std::string>& extra, Millis timeout) {
  std::vector<std::string> args = {"--json", "--netns", ns.path()};
  // Audits every second: a connection whose end the kernel did not show us
  // is reported (vanished) while the test still waits, and counted lost.
  if (std::find(extra.begin(), extra.end(), "--audit-interval") == extra.end())
    args.insert(args.end(), {"--audit-interval", "1"});
  args.insert(args.end(), extra.begin(), extra.end());
  return start_raw(args, timeout);
}

bool Tracer::start_raw(const std::vector<std::string>& args, Millis timeout, bool wait_start_line) {
  args_ = {tcpscope_binary()};
  args_.insert(args_.end(), args.begin(), args.end());
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return false;
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(out[0]);
    ::close(out[1]);
    return false;
  }
  std::vector<char*> cargv;
  for (const auto& a : args_) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  pid_ = ::fork();
  if (pid_ == 0) {
    const int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    ::execv(cargv[0], cargv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  ::close(err[1]);
  out_fd_ = out[0];
  err_fd_ = err[0];
  if (pid_ < 0) return false;
  thread_ = std::thread([this] { reader(); });
  if (!wait_start_line) return true;
  return wait_for(
      [](const std::vector<json>& l) {
        return !l.empty() && l.front().is_object() && l.front().value("type", "") == "start";
      },
      timeout);
}

void Tracer::reader() {
  pollfd pfd[2] = {{out_fd_, POLLIN, 0}, {err_fd_, POLLIN, 0}};
  std::string partial;
  char buf[65536];
  int open_fds = 2;
  while (open_fds > 0) {
    const int n = ::poll(pfd, 2, 1000);
    if (n < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (pfd[i].fd < 0 || !(pfd[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t k = ::read(pfd[i].fd, buf, sizeof(buf));
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) {
        pfd[i].fd = -1;
        --open_fds;
        continue;
      }
      std::lock_guard lock(mu_);
      if (i == 1) {
        err_text_.append(buf, static_cast<size_t>(k));
        continue;
      }
      partial.append(buf, static_cast<size_t>(k));
      size_t start = 0;
      for (size_t nl; (nl = partial.find('\n', start)) != std::string::npos; start = nl + 1) {
        std::string line = partial.substr(start, nl - start);
        json j = json::parse(line, nullptr, false);
        if (j.is_discarded() || !j.is_object()) {
          bad_.push_back(std::move(line));
          continue;
        }
        // A vanished connection lost at least one event (its CLOSE).
        const std::string type = j.value("type", "");
        if (type == "lost")
          g_counted_losses += j.value("count", uint64_t{1});
        else if (type == "vanished")
          g_counted_losses += 1;
        else if (type == "report") {
          g_counted_losses += j.value("lost_gaps", uint64_t{0});
          if (j.contains("time_wait"))
            g_counted_losses += j["time_wait"].value("timer_starts_lost", uint64_t{0});
        }
        lines_.push_back(std::move(j));
      }
      partial.erase(0, start);
    }
  }
  std::lock_guard lock(mu_);
  if (!partial.empty()) bad_.push_back(partial);  // an unterminated last line
  eof_ = true;
}

bool Tracer::wait_for(const std::function<bool(const std::vector<json>&)>& pred, Millis timeout) {
  return wait_until(
             [&] {
               std::lock_guard lock(mu_);
               return pred(lines_) || eof_;
             },
             timeout, 2ms) &&
         [&] {
           std::lock_guard lock(mu_);
           return pred(lines_);
         }();
}

void Tracer::finish_process(int status) {
  exit_status_ = status;
  reaped_ = true;
  if (thread_.joinable()) thread_.join();
  close_fd(out_fd_);
  close_fd(err_fd_);
}

int Tracer::stop(Millis timeout) {
  if (pid_ <= 0 || reaped_) return exit_status_;
  ::kill(pid_, SIGINT);
  finish_process(wait_pid_bounded(pid_, timeout));
  // A vanished connection, or a gap in one, is a loss nothing else
  // counted: no test expects one unless it says so (the failure is then
  // retried, as a loss).
  if (!allow_lost_transitions_) {
    const auto gone = events("vanished");
    if (!gone.empty())
      ADD_FAILURE() << gone.size() << " vanished connections, first: " << gone[0].dump();
    const auto reports = events("report");
    if (!reports.empty() && reports.back().value("lost_gaps", uint64_t{0}) > 0)
      ADD_FAILURE() << "transitions from unseen states: " << reports.back().dump();
  }
  return exit_status_;
}

int Tracer::wait_exit(Millis timeout) {
  if (pid_ <= 0 || reaped_) return exit_status_;
  finish_process(wait_pid_bounded(pid_, timeout));
  return exit_status_;
}

std::vector<json> Tracer::lines() const {
  std::lock_guard lock(mu_);
  return lines_;
}

std::vector<std::string> Tracer::bad_lines() const {
  std::lock_guard lock(mu_);
  return bad_;
}

std::string Tracer::stderr_text() const {
  std::lock_guard lock(mu_);
  return err_text_;
}

std::string Tracer::diagnostics() const {
  std::lock_guard lock(mu_);
  std::string s = "tracer: " + join(args_) + "\n  exit status: " + std::to_string(exit_status_) +
                  "\n  stderr: " + err_text_ + "\n  " + std::to_string(lines_.size()) +
                  " JSON lines, " + std::to_string(bad_.size()) + " bad lines\n";
  // TCPSCOPE_KTEST_ALL_LINES=1: every line, not the last 60.
  const bool all = std::getenv("TCPSCOPE_KTEST_ALL_LINES") != nullptr;
  s += dump(lines_, all ? lines_.size() : 60);
  for (const auto& b : bad_) s += "  BAD: " + b.substr(0, 300) + "\n";
  return s;
}

const json& Tracer::start_line() const {
  std::lock_guard lock(mu_);
  if (lines_.empty() || lines_.front().value("type", "") != "start")
    throw std::runtime_error("tracer printed no start line");
  return lines_.front();
}

json Tracer::report() const {
  std::lock_guard lock(mu_);
  if (lines_.empty() || lines_.back().value("type", "") != "report")
    throw std::runtime_error("tracer's last line is not a report");
  return lines_.back();
}

std::vector<json> Tracer::events(const std::string& type) const {
  std::lock_guard lock(mu_);
  std::vector<json> v;
  for (const auto& l : lines_)
    if (l.value("type", "") == type) v.push_back(l);
  return v;
}

std::vector<json> Tracer::events_for(uint64_t conn) const {
  std::lock_guard lock(mu_);
  std::vector<json> v;
  for (const auto& l : lines_)
    if (l.contains("conn") && l["conn"].is_number_unsigned() && l["conn"].get<uint64_t>() == conn)
      v.push_back(l);
  return v;
}

std::vector<std::string> Tracer::state_path(uint64_t conn) const {
  std::lock_guard lock(mu_);
  return state_path_of(lines_, conn);
}

std::vector<uint64_t> Tracer::conns() const {
  std::lock_guard lock(mu_);
  std::vector<uint64_t> v;
  std::set<uint64_t> seen;
  for (const auto& l : lines_) {
    if (!l.contains("conn") || !l["conn"].is_number_unsigned()) continue;
    const auto c = l["conn"].get<uint64_t>();
    if (seen.insert(c).second) v.push_back(c);
  }
  return v;
}

std::vector<uint64_t> Tracer::conns_with(uint16_t lport, int rport) const {
  std::lock_guard lock(mu_);
  std::vector<uint64_t> v;
  std::set<uint64_t> seen;
  for (const auto& l : lines_) {
    if (!l.contains("conn") || !l["conn"].is_number_unsigned()) continue;
    if (l.value("lport", -1) != lport) continue;
    if (rport >= 0 && l.value("rport", -1) != rport) continue;
    const auto c = l["conn"].get<uint64_t>();
    if (seen.insert(c).second) v.push_back(c);
  }
  return v;
}

void expect_identity(const std::vector<json>& events, const Identity& want,
                     const std::string& what) {
  for (const auto& e : events) {
    const bool syn_sent = e.value("type", "") == "state" && e.value("old", "") == "CLOSE" &&
                          e.value("new", "") == "SYN_SENT";
    const int lport = e.value("lport", -1);
    EXPECT_EQ(e.value("family", -1), want.family) << what << ": " << e.dump();
    EXPECT_EQ(e.value("laddr", ""), want.laddr) << what << ": " << e.dump();
    EXPECT_EQ(e.value("raddr", ""), want.raddr) << what << ": " << e.dump();
    EXPECT_EQ(e.value("rport", -1), want.rport) << what << ": " << e.dump();
    if (!(syn_sent && lport == 0)) {
      EXPECT_EQ(lport, want.lport) << what << ": " << e.dump();
    }
    if (want.netns) {
      EXPECT_EQ(e.value("netns", uint64_t{0}), want.netns) << what << ": " << e.dump();
    }
  }
}

std::string own_comm() {
  std::ifstream f("/proc/self/comm");
  std::string s;
  std::getline(f, s);
  return s;
}

void expect_owner(const std::vector<json>& events, pid_t pid, const std::string& comm,
                  const std::string& what) {
  for (const auto& e : events) {
    EXPECT_EQ(e.value("pid", -1), pid) << what << ": " << e.dump();
    EXPECT_EQ(e.value("comm", ""), comm) << what << ": " << e.dump();
  }
}

std::map<std::string, uint64_t> counts(const json& report, const char* key) {
  std::map<std::string, uint64_t> m;
  const auto& c = report.at("connections").at(key);
  for (auto it = c.begin(); it != c.end(); ++it) m[it.key()] = it.value().get<uint64_t>();
  return m;
}

std::vector<std::string> state_path_of(const std::vector<json>& lines, uint64_t conn) {
  std::vector<std::string> path;
  for (const auto& l : lines) {
    if (l.value("type", "") != "state") continue;
    if (!l.contains("conn") || !l["conn"].is_number_unsigned() || l["conn"].get<uint64_t>() != conn)
      continue;
    if (path.empty()) path.push_back(l.value("old", "?"));
    path.push_back(l.value("new", "?"));
  }
  return path;
}

std::string dump(const std::vector<json>& lines, size_t max) {
  std::string s;
  const size_t from = lines.size() > max ? lines.size() - max : 0;
  if (from) s += "  ... (" + std::to_string(from) + " earlier lines)\n";
  for (size_t i = from; i < lines.size(); ++i) s += "  " + lines[i].dump() + "\n";
  return s;
}

}  // namespace ktest
