// Kernel-test harness: private network namespaces, the real tcpscope binary
// run as a child, real sockets, and kernel ground truth (ss, nstat).
//
// Everything here is RAII and bounded in time: namespaces are deleted,
// children are killed by pid (never by name) and every wait has a timeout.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <sys/socket.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace ktest {

using json = nlohmann::json;
using namespace std::chrono_literals;
using Millis = std::chrono::milliseconds;

// ---- prerequisites ----------------------------------------------------------

// True when CI=true: kernel tests must run there, so missing prerequisites
// are failures instead of skips.
bool in_ci();
// Empty when kernel tests can run, else the reason they cannot.
std::string missing_prerequisite();

// Skip (or in CI, fail) the current test when kernel tests cannot run. Use in
// SetUp() or at the top of a test body.
#define KTEST_REQUIRE_KERNEL()                                                    \
  do {                                                                            \
    const std::string ktest_reason_ = ::ktest::missing_prerequisite();            \
    if (!ktest_reason_.empty()) {                                                 \
      if (::ktest::in_ci())                                                       \
        FAIL() << ktest_reason_ << " (CI=true: kernel tests must run, not skip)"; \
      else                                                                        \
        GTEST_SKIP() << ktest_reason_;                                            \
    }                                                                             \
  } while (0)

// Fixture base: every kernel test derives from it.
class KernelTest : public ::testing::Test {
 protected:
  void SetUp() override { KTEST_REQUIRE_KERNEL(); }
};

// Events the tracers of this process reported lost so far ("lost" lines,
// one for each "vanished" line, a connection whose end was lost, and the
// report's lost_gaps, transitions that came from an unseen state).
// A run that lost events cannot match the kernel's view exactly; the kernel
// tests' main runs a failed test again when this is nonzero (main.cpp).
uint64_t counted_losses();

// Polls pred every `every` until it holds or timeout passes; returns pred().
bool wait_until(const std::function<bool()>& pred, Millis timeout = 5000ms, Millis every = 5ms);

// ---- commands ------------------------------------------------------------------

struct CmdResult {
  int status = -1;  // exit code; 128+signal if killed; -1 if it could not run
  bool timed_out = false;
  std::string out;  // stdout
  std::string err;  // stderr
};

// The tcpscope binary under test.
const char* tcpscope_binary();

// A scratch directory, removed with its contents.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Runs argv (PATH lookup) with stdin from /dev/null, killing it by pid after
// timeout.
CmdResult run_cmd(const std::vector<std::string>& argv, Millis timeout = 10000ms);

// Writes "what" to stderr-like test output on failure: argv joined.
std::string join(const std::vector<std::string>& argv, const char* sep = " ");

// ---- parent/child channel ---------------------------------------------------

// A bidirectional line channel (AF_UNIX socketpair, not TCP, so it never shows
// in a trace). Create it before forking: the parent uses the parent side, the
// child the child side. Safe to use in a forked child (plain syscalls).
class Channel {
 public:
  Channel();
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Parent side.
  bool send(const std::string& line) { return send_on(fds_[0], line); }
  std::optional<std::string> recv(Millis timeout = 10000ms) { return recv_on(fds_[0], timeout); }
  // Child side.
  bool child_send(const std::string& line) { return send_on(fds_[1], line); }
  std::optional<std::string> child_recv(Millis timeout = 30000ms) {
    return recv_on(fds_[1], timeout);
  }
  // Child side: waits for exactly this line; false on anything else/timeout.
  bool child_expect(const std::string& line, Millis timeout = 30000ms);

 private:
  static bool send_on(int fd, const std::string& line);
  static std::optional<std::string> recv_on(int fd, Millis timeout);
  int fds_[2] = {-1, -1};
};

// ---- network namespace ---------------------------------------------------------

// A private network namespace "tcpscope-t-<pid>-<n>" with lo up, deleted (and
// every child spawned in it killed by pid) in the destructor. Throws
// std::runtime_error if it cannot be created.
class NetNs {
 public:
  explicit NetNs(const std::vector<std::string>& sysctls = {});
  ~NetNs();
  NetNs(const NetNs&) = delete;
  NetNs& operator=(const NetNs&) = delete;

  const std::string& name() const { return name_; }
  std::string path() const { return "/run/netns/" + name_; }
  uint64_t inode() const { return inode_; }

  // `sysctl -w KEY=VALUE` in the namespace; throws on failure.
  void sysctl(const std::string& key_value);
  // `ip netns exec NAME argv...`.
  CmdResult exec(const std::vector<std::string>& argv, Millis timeout = 10000ms) const;

  // Runs fn in a forked child that joined this namespace; returns its exit
  // status (fn's return value; 128+signal if killed; -1 on timeout, when the
  // child is killed). fn must not use gtest assertions: return nonzero.
  int run(const std::function<int()>& fn, Millis timeout = 30000ms);
  // Starts fn in a forked child in this namespace and returns its pid; the
  // child is killed (SIGKILL, by pid) and reaped in the destructor unless
  // reaped with wait() first.
  pid_t spawn(const std::function<int()>& fn);
  // Reaps a spawned child: its exit status, or -1 (after killing it) on timeout.
  int wait(pid_t pid, Millis timeout = 10000ms);

 private:
  std::string name_;
  uint64_t inode_ = 0;
  std::vector<pid_t> children_;
};

// Moves the calling thread into a namespace until destroyed (sockets created
// meanwhile belong to that namespace for good).
class ScopedNetns {
 public:
  explicit ScopedNetns(const NetNs& ns);
  ~ScopedNetns();
  ScopedNetns(const ScopedNetns&) = delete;
  ScopedNetns& operator=(const ScopedNetns&) = delete;

 private:
  int saved_ = -1;
};

// Exit status of a forked child: code, or 128+signal.
int decode_status(int wstatus);

// ---- sockets (usable in the test thread and in forked children) ------------------

// An owned file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    const int f = fd_;
    fd_ = -1;
    return f;
  }
  void reset(int fd = -1);  // closes the current one

 private:
  int fd_ = -1;
};

// Loopback address of a family: "127.0.0.1" / "::1".
const char* loopback(int family);
// Bound (port 0 = kernel's choice) listening socket, or -1. v6only applies to
// AF_INET6 only. addr: numeric address ("127.0.0.1", "::1", "::").
int listen_tcp(int family, const char* addr, uint16_t port = 0, bool v6only = true);
// Blocking connect to addr:port (optionally binding the local port); -1 on error.
int connect_tcp(int family, const char* addr, uint16_t port, uint16_t local_port = 0);
// accept() with a timeout; -1 on error or timeout.
int accept_tcp(int listen_fd, Millis timeout = 5000ms);
uint16_t local_port(int fd);
uint16_t peer_port(int fd);
// SO_LINGER {1, 0}.
bool set_linger_zero(int fd);
// Waits until fd polls readable/hup/err; false on timeout.
bool wait_readable(int fd, Millis timeout = 5000ms);
int socket_error(int fd);  // SO_ERROR

// One complete connection in a namespace, made from the calling thread:
// listen, connect, accept, the client closes first; returns once the kernel
// (ss) shows the client in TIME_WAIT and the server side gone, then closes
// the listener. Throws std::runtime_error on any failure.
struct ConnSpec {
  int server_family = AF_INET;
  std::string server_addr = "127.0.0.1";
  uint16_t server_port = 0;  // 0: the kernel's choice
  bool v6only = true;
  int client_family = AF_INET;
  std::string connect_addr = "127.0.0.1";
  uint16_t client_port = 0;  // 0: ephemeral
};
struct ConnPorts {
  uint16_t sport = 0, cport = 0;
};
ConnPorts make_connection(const NetNs& ns, const ConnSpec& spec);

// ---- kernel ground truth ---------------------------------------------------------

struct SsSocket {
  std::string state;         // "ESTAB", "TIME-WAIT", "FIN-WAIT-2", ...
  std::string laddr, raddr;  // without brackets
  uint16_t lport = 0, rport = 0;
  struct User {
    std::string comm;
    pid_t pid = 0;
    int fd = -1;
  };
  std::vector<User> users;  // from -p
  std::string line;         // the raw line
};

// `ss -tanpoeH` in the namespace: every TCP socket, with owners.
std::vector<SsSocket> ss_sockets(const NetNs& ns);
// `ss -tanH state time-wait` in the namespace.
std::vector<SsSocket> ss_time_wait(const NetNs& ns);
// Sockets with this local and (0 = any) remote port.
std::vector<SsSocket> ss_find(const std::vector<SsSocket>& all, uint16_t lport, uint16_t rport = 0);
// Waits until ss shows a socket lport->rport in state (e.g. "FIN-WAIT-2").
bool wait_ss_state(const NetNs& ns, uint16_t lport, uint16_t rport, const std::string& state,
                   Millis timeout = 5000ms);
// `nstat -asz` in the namespace: absolute counters (TcpActiveOpens, ...).
std::map<std::string, uint64_t> nstat(const NetNs& ns);

// ---- the tracer ---------------------------------------------------------------

// The real tcpscope binary as a child: stdout/stderr read by a thread, JSON
// lines parsed as they come.
// How many of these JSON lines (a Tracer's) have this "type".
size_t count_type(const std::vector<json>& lines, const std::string& type);

class Tracer {
 public:
  Tracer() = default;
  ~Tracer();
  Tracer(const Tracer&) = delete;
  Tracer& operator=(const Tracer&) = delete;

  // Starts `tcpscope --json --netns NS.path() extra...` and waits for the
  // start line. False (see diagnostics()) if it exits or times out first.
  bool start(const NetNs& ns, const std::vector<std::string>& extra = {}, Millis timeout = 30000ms);
  // Starts the binary with exactly these arguments (no --json added).
  bool start_raw(const std::vector<std::string>& args, Millis timeout = 30000ms,
                 bool wait_start_line = true);

  // Waits until pred(lines so far) holds; false on timeout or if it exited.
  bool wait_for(const std::function<bool(const std::vector<json>&)>& pred,
                Millis timeout = 10000ms);
  // SIGINT, then waits for exit (SIGKILL by pid after timeout) and for all
  // output. Returns the exit status (see decode_status); idempotent.
  int stop(Millis timeout = 20000ms);
  // Waits for a self-terminating run (--duration) to end.
  int wait_exit(Millis timeout = 30000ms);

  pid_t pid() const { return pid_; }
  // stop() fails the test on a "vanished" line or a report with lost_gaps
  // (losses nothing else counted) unless this was called.
  void allow_lost_transitions() { allow_lost_transitions_ = true; }
  int exit_status() const { return exit_status_; }

  // Snapshots (complete after stop()).
  std::vector<json> lines() const;
  std::vector<std::string> bad_lines() const;  // stdout lines that are not JSON objects
  std::string stderr_text() const;
  std::string diagnostics() const;  // args, status, stderr, last lines

  const json& start_line() const;  // throws if none
  // The report object (the last line, type "report"); throws if none.
  json report() const;
  // Event lines of a type ("state", "reset_sent", ...).
  std::vector<json> events(const std::string& type) const;
  // Every line with this conn id, in order.
  std::vector<json> events_for(uint64_t conn) const;
  // State events of a conn as [first old, new, new, ...]: the path.
  std::vector<std::string> state_path(uint64_t conn) const;
  // Distinct conn ids (any event) in first-seen order.
  std::vector<uint64_t> conns() const;
  // Conns with some event lport == lport and (rport == rport or rport < 0).
  std::vector<uint64_t> conns_with(uint16_t lport, int rport = -1) const;

 private:
  void reader();
  void finish_process(int wstatus);

  std::vector<std::string> args_;
  pid_t pid_ = -1;
  int out_fd_ = -1, err_fd_ = -1;
  std::thread thread_;
  mutable std::mutex mu_;
  std::vector<json> lines_;
  std::vector<std::string> bad_;
  std::string err_text_;
  bool eof_ = false;
  int exit_status_ = -1;
  bool reaped_ = false;
  bool allow_lost_transitions_ = false;
};

// Events a report says the ring buffer had no room for. The rest of its
// lost_events are runs of tcpscope's programs the kernel skipped
// (lost_kernel_skipped), on any socket of the host: another namespace's
// traffic causes them too, so a test asserts its own events exactly
// instead, and this is zero.
inline uint64_t ring_full_losses(const json& report) {
  return report.value("lost_events", uint64_t{0}) -
         report.value("lost_kernel_skipped", uint64_t{0});
}

// The identity a connection's events must carry.
struct Identity {
  int family = 4;  // 4 or 6, as in the JSON
  std::string laddr, raddr;
  uint16_t lport = 0, rport = 0;
  uint64_t netns = 0;  // 0: not checked
};
// One gtest failure per mismatching event. lport 0 is accepted on the
// CLOSE -> SYN_SENT event only: connect() enters SYN_SENT before it picks
// the local port.
void expect_identity(const std::vector<json>& events, const Identity& want,
                     const std::string& what);
// This process's comm (/proc/self/comm).
std::string own_comm();
// One gtest failure per event whose pid/comm differ.
void expect_owner(const std::vector<json>& events, pid_t pid, const std::string& comm,
                  const std::string& what);
// The report's connections.by_close as a map, and by_open.
std::map<std::string, uint64_t> counts(const json& report, const char* key);

// True for a line about one connection (a numeric "conn").
inline bool has_conn(const json& e) { return e.contains("conn") && e["conn"].is_number_unsigned(); }

// Helpers over a line list.
std::vector<std::string> state_path_of(const std::vector<json>& lines, uint64_t conn);
std::string dump(const std::vector<json>& lines, size_t max = 200);

// The state paths the kernel gives a simple FIN/FIN close.
inline const std::vector<std::string> kActiveOpenActiveClose = {
    "CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"};
inline const std::vector<std::string> kActiveOpenPassiveClose = {
    "CLOSE", "SYN_SENT", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"};
inline const std::vector<std::string> kPassiveOpenActiveClose = {
    "LISTEN", "SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"};
inline const std::vector<std::string> kPassiveOpenPassiveClose = {
    "LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"};
inline const std::vector<std::string> kListenerPath = {"CLOSE", "LISTEN", "CLOSE"};

}  // namespace ktest
