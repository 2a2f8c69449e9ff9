// churn: the connection-churn workload of scripts/bench.sh. Run it inside a
// private network namespace (ip netns exec): it listens on loopback and its
// client threads connect and close as fast as they can; the server closes
// first (its side goes FIN_WAIT1 -> FIN_WAIT2 -> TIME_WAIT, the client's
// CLOSE_WAIT -> LAST_ACK), so client ports are free again at once.
//
//   churn [--seconds T] [--clients N] [--servers N] [--port P]
//       prints "conns N seconds S conn_per_s R failed F unanswered U" on
//       stdout (F: connects that failed; U: connections given up after 2 s
//       without the server's FIN).
//   churn --hold N [--time-wait M] [--seconds T]
//       opens N connections and keeps them open, and leaves M TIME_WAITs
//       behind (server closes first), then sleeps T seconds before it
//       exits: the memory scenario (N open + M TIME_WAIT to track).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

struct Args {
  double seconds = 10;
  int clients = 4;
  int servers = 1;
  uint16_t port = 5555;
  long hold = 0;
  long time_wait = 0;
};

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "churn: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

int listen_on(uint32_t addr, uint16_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket");
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = htonl(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) die("bind");
  if (listen(fd, 4096) != 0) die("listen");
  return fd;
}

// One connection; -1 on a transient error (the caller retries).
// local_port 0: the kernel picks an ephemeral port; else it is bound on
// addr itself (loopback: each 127.0.0.x its own port space).
int connect_to(uint32_t addr, uint16_t port, uint16_t local_port = 0) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (local_port) {
    sockaddr_in la{};
    la.sin_family = AF_INET;
    la.sin_port = htons(local_port);
    la.sin_addr.s_addr = htonl(addr);
    if (bind(fd, reinterpret_cast<sockaddr*>(&la), sizeof(la)) != 0) {
      close(fd);
      return -1;
    }
  }
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = htonl(addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

int run_churn(const Args& a) {
  const int lfd = listen_on(INADDR_LOOPBACK, a.port);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> done{0}, failed{0}, unanswered{0};
  // How long a client waits for the server's FIN.
  static constexpr timeval kAnswerTimeout{2, 0};
  std::vector<std::thread> threads;
  for (int i = 0; i < a.servers; ++i)
    threads.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        const int c = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c >= 0) close(c);  // the server closes first
      }
    });
  const auto t0 = std::chrono::steady_clock::now();
  const auto end = t0 + std::chrono::duration<double>(a.seconds);
  std::vector<std::thread> clients;
  for (int i = 0; i < a.clients; ++i)
    clients.emplace_back([&] {
      uint64_t n = 0, bad = 0, stuck = 0;
      char buf[64];
      for (uint64_t tries = 0;; ++tries) {
        if ((tries & 63) == 0 && std::chrono::steady_clock::now() >= end) break;
        const int fd = connect_to(INADDR_LOOPBACK, a.port);
        if (fd < 0) {
          ++bad;
          continue;
        }
        // Wait for the server's FIN, then close: CLOSE_WAIT -> LAST_ACK.
        // Not forever: once (6.18, a VM under heavy host steal) three
        // connections sat established in the listener's backlog and accept()
        // never returned them, which hung the whole benchmark.
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &kAnswerTimeout, sizeof(kAnswerTimeout));
        ssize_t got;
        while ((got = recv(fd, buf, sizeof(buf), 0)) > 0) {
        }
        const bool timed_out = got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
        close(fd);
        if (timed_out) {
          ++stuck;
          continue;
        }
        ++n;
      }
      done += n;
      failed += bad;
      unanswered += stuck;
    });
  for (auto& t : clients) t.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stop = true;
  shutdown(lfd, SHUT_RDWR);  // wakes the acceptors
  for (auto& t : threads) t.join();
  close(lfd);
  std::printf("conns %llu seconds %.3f conn_per_s %.0f failed %llu unanswered %llu\n",
              static_cast<unsigned long long>(done.load()), secs, done.load() / secs,
              static_cast<unsigned long long>(failed.load()),
              static_cast<unsigned long long>(unanswered.load()));
  if (unanswered.load())
    std::fprintf(stderr, "churn: %llu connection(s) got no FIN from the server within %ld s\n",
                 static_cast<unsigned long long>(unanswered.load()),
                 static_cast<long>(kAnswerTimeout.tv_sec));
  return 0;
}

// N open connections (client and server side) plus M TIME_WAITs. The fd
// limit may not be raisable (no CAP_SYS_RESOURCE): children hold the open
// connections, each as many as its limit allows.
int run_hold(const Args& a) {
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  const long per_child = std::max<long>(1, (static_cast<long>(rl.rlim_cur) - 64) / 2);
  // One listener per 127.0.0.x: each destination has its own port space.
  // Client ports are chosen here, each used once per destination: a port
  // the kernel picked again would carry a SYN onto the server's TIME_WAIT
  // of its previous connection and recycle it.
  constexpr long kPerAddr = 50000;
  constexpr long kFirstPort = 10000;
  const int naddr = static_cast<int>((a.hold + a.time_wait) / kPerAddr + 1);
  std::vector<int> listeners;
  for (int i = 0; i < naddr; ++i) listeners.push_back(listen_on(INADDR_LOOPBACK + i, a.port));
  auto open_one = [&](long i) -> std::pair<int, int> {
    const int l = static_cast<int>(i / kPerAddr);
    const int c =
        connect_to(INADDR_LOOPBACK + l, a.port, static_cast<uint16_t>(kFirstPort + i % kPerAddr));
    if (c < 0) die("connect");
    const int s = accept4(listeners[l], nullptr, nullptr, SOCK_CLOEXEC);
    if (s < 0) die("accept");
    return {c, s};
  };
  std::vector<pid_t> children;
  int ready[2];
  if (pipe(ready) != 0) die("pipe");
  for (long first = 0; first < a.hold; first += per_child) {
    const long n = std::min(per_child, a.hold - first);
    const pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
      // Die with the parent, however it ends (it may fail after forking).
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() == 1) _exit(1);
      close(ready[0]);
      std::vector<int> fds;
      for (long i = first; i < first + n; ++i) {
        auto [c, s] = open_one(i);
        fds.push_back(c);
        fds.push_back(s);
      }
      const char b = 1;
      if (write(ready[1], &b, 1) != 1) _exit(1);
      pause();  // the parent kills us
      _exit(0);
    }
    children.push_back(pid);
    char b;
    if (read(ready[0], &b, 1) != 1) die("child");
  }
  char buf[16];
  for (long i = 0; i < a.time_wait; ++i) {
    auto [c, s] = open_one(a.hold + i);
    close(s);  // server first: its side ends in TIME_WAIT
    while (recv(c, buf, sizeof(buf), 0) > 0) {
    }
    close(c);
  }
  std::printf("holding %ld connections, %ld time_wait\n", a.hold, a.time_wait);
  std::fflush(stdout);
  std::this_thread::sleep_for(std::chrono::duration<double>(a.seconds));
  for (pid_t pid : children) kill(pid, SIGKILL);
  for (pid_t pid : children) waitpid(pid, nullptr, 0);
  for (int fd : listeners) close(fd);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "churn: %s needs a value\n", k.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (k == "--seconds")
      a.seconds = std::atof(next());
    else if (k == "--clients")
      a.clients = std::atoi(next());
    else if (k == "--servers")
      a.servers = std::atoi(next());
    else if (k == "--port")
      a.port = static_cast<uint16_t>(std::atoi(next()));
    else if (k == "--hold")
      a.hold = std::atol(next());
    else if (k == "--time-wait")
      a.time_wait = std::atol(next());
    else {
      std::fprintf(stderr,
                   "usage: churn [--seconds T] [--clients N] [--servers N] [--port P]\n"
                   "       churn --hold N [--time-wait M] [--seconds T]\n");
      return 2;
    }
  }
  if (a.clients < 1 || a.servers < 1 || a.seconds <= 0) {
    std::fprintf(stderr, "churn: bad arguments\n");
    return 2;
  }
  return a.hold > 0 || a.time_wait > 0 ? run_hold(a) : run_churn(a);
}
