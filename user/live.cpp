#include "live.hpp"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "tcpscope/format.hpp"

namespace tcpscope {

namespace {

// SIGINT/SIGTERM arrive on a signalfd polled with the ring buffer: no global
// flag, no async-signal handler.
class SignalFd {
 public:
  SignalFd() {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigprocmask(SIG_BLOCK, &mask, nullptr);
    fd_ = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  }
  ~SignalFd() {
    if (fd_ >= 0) close(fd_);
  }
  SignalFd(const SignalFd&) = delete;
  SignalFd& operator=(const SignalFd&) = delete;
  int fd() const { return fd_; }
  bool pending() {
    signalfd_siginfo si{};
    return read(fd_, &si, sizeof(si)) == sizeof(si);
  }

 private:
  int fd_ = -1;
};

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

}  // namespace

Result<std::unique_ptr<LiveSession>> LiveSession::start(TraceConfig cfg,
                                                        const std::vector<std::string>& disabled) {
  if (auto err = check_privileges()) return *err;
  std::unique_ptr<LiveSession> s(new LiveSession());
  for (const auto& f : disabled) s->features_.disable(f);
  // Batch wake-ups, but never past an eighth of the ring.
  cfg.wakeup_bytes = std::min<uint64_t>(cfg.wakeup_bytes, cfg.ring_bytes / 8);
  s->cfg_ = cfg;
  auto tracer = BpfTracer::start(cfg, s->features_);
  if (!tracer) return tracer.error();
  s->tracer_ = std::move(tracer.value());
  for (const auto& fb : s->tracer_->fallbacks()) spdlog::info("fell back: {}", fb);
  s->start_ns_ = boottime_now_ns();
  return s;
}

int LiveSession::run(double duration_s, const Consumer& consume,
                     const std::function<void()>& on_batch,
                     const std::function<bool()>& should_stop) {
  SignalFd signals;
  BpfTracer& tracer = *tracer_;
  tracer.on_event(consume);

  Fd ep(epoll_create1(EPOLL_CLOEXEC));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = signals.fd();
  epoll_ctl(ep.get(), EPOLL_CTL_ADD, signals.fd(), &ev);
  ev.data.fd = tracer.epoll_fd();
  epoll_ctl(ep.get(), EPOLL_CTL_ADD, tracer.epoll_fd(), &ev);

  const uint64_t deadline =
      duration_s > 0 ? start_ns_ + static_cast<uint64_t>(duration_s * 1e9) : 0;
  uint64_t reported_lost = 0;
  uint64_t next_lost_check = boottime_now_ns() + 1'000'000'000;
  auto check_lost = [&](uint64_t now) {
    const uint64_t lost = tracer.drops(TCPSCOPE_DROP_RINGBUF) + tracer.malformed();
    if (lost > reported_lost) {
      Event e{};
      e.type = TCPSCOPE_EV_LOST;
      e.ts_ns = now;
      e.conn = lost - reported_lost;
      reported_lost = lost;
      consume(e);
    }
  };

  int rc = 0;
  bool stop = false;
  while (!stop) {
    epoll_event evs[2];
    int timeout = 100;  // drain at least this often: producers batch wake-ups
    if (deadline) {
      const uint64_t now = boottime_now_ns();
      if (now >= deadline) break;
      timeout = static_cast<int>(std::min<uint64_t>(100, (deadline - now) / 1'000'000 + 1));
    }
    const int n = epoll_wait(ep.get(), evs, 2, timeout);
    if (n < 0 && errno != EINTR) {
      fmt::print(stderr, "tcpscope: epoll_wait: {}\n", std::strerror(errno));
      rc = 1;
      break;
    }
    for (int i = 0; i < n; ++i)
      if (evs[i].data.fd == signals.fd() && signals.pending()) stop = true;
    const int consumed = tracer.consume();
    if (consumed < 0 && consumed != -EINTR) {
      fmt::print(stderr, "tcpscope: reading the ring buffer: {}\n", std::strerror(-consumed));
      rc = 1;
      break;
    }
    const uint64_t now = boottime_now_ns();
    if (now >= next_lost_check) {
      check_lost(now);
      next_lost_check = now + 1'000'000'000;
    }
    if (on_batch) on_batch();
    if (should_stop && should_stop()) break;
  }
  tracer.consume();
  const uint64_t end_ns = boottime_now_ns();
  check_lost(end_ns);
  Event end{};
  end.type = TCPSCOPE_EV_END;
  end.ts_ns = end_ns;
  consume(end);
  if (on_batch) on_batch();
  return rc;
}

}  // namespace tcpscope
