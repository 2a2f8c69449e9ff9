// tcpscope: live TCP connection-lifecycle tracer.
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <bpf/libbpf.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "cli.hpp"
#include "tcpscope/analyzers.hpp"
#include "tcpscope/output.hpp"
#include "tcpscope/pipeline.hpp"
#include "tcpscope/tracer.hpp"

namespace tcpscope {
namespace {

int libbpf_to_spdlog(enum libbpf_print_level level, const char* fmt, va_list args) {
  char buf[1024];
  const int n = vsnprintf(buf, sizeof(buf), fmt, args);
  std::string_view msg(buf, n < 0 ? 0 : std::min<size_t>(static_cast<size_t>(n), sizeof(buf) - 1));
  while (!msg.empty() && msg.back() == '\n') msg.remove_suffix(1);
  switch (level) {
    case LIBBPF_WARN: spdlog::debug("libbpf: {}", msg); break;  // fallbacks warn by design
    case LIBBPF_INFO: spdlog::debug("libbpf: {}", msg); break;
    case LIBBPF_DEBUG: spdlog::trace("libbpf: {}", msg); break;
  }
  return 0;
}

void fail(const Error& e) { fmt::print(stderr, "tcpscope: {}\n", e.message); }

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

int run_info(const Options& o) {
  KernelFeatures features;
  for (const auto& f : o.disabled_features) features.disable(f);
  fmt::print("kernel {}\n", features.kernel_release());
  for (const auto& [name, ok] : features.table())
    fmt::print("  {:<16} {}\n", name, ok ? "yes" : "no");
  return 0;
}

int run_trace(const Options& o) {
  if (auto err = check_privileges()) {
    fail(*err);
    return 1;
  }
  KernelFeatures features;
  for (const auto& f : o.disabled_features) features.disable(f);
  TraceConfig cfg = o.trace;
  cfg.wakeup_bytes = std::min<uint64_t>(cfg.wakeup_bytes, cfg.ring_bytes / 8);

  SignalFd signals;
  signal(SIGPIPE, SIG_IGN);
  auto started = BpfTracer::start(cfg, features);
  if (!started) {
    fail(started.error());
    return started.error().exit_code;
  }
  BpfTracer& tracer = *started.value();
  for (const auto& fb : tracer.fallbacks()) spdlog::info("fell back: {}", fb);

  TimeFormatter time(measure_boot_offset_ns());
  FdWriter out(STDOUT_FILENO);
  Pipeline pipeline;
  pipeline.add_default_analyzers(o.top);
  JsonLinesSink json(out, time);
  TableSink table(out, time, TextStyle{o.top});
  Sink& sink = o.json ? static_cast<Sink&>(json) : static_cast<Sink&>(table);
  pipeline.add_sink(&sink);
  tracer.on_event([&pipeline](const Event& ev) { pipeline.process(ev); });

  const uint64_t start_ns = boottime_now_ns();
  if (o.json) {
    json.write_start(start_ns, [&](JsonWriter& w) {
      w.member("version", TCPSCOPE_VERSION);
      w.member("attach", attach_mode_name(tracer.mode()));
      w.key("programs");
      w.begin_array();
      for (const auto& p : tracer.programs()) w.value(p);
      w.end_array();
      w.key("filters");
      w.begin_object();
      const Filters& f = cfg.filters;
      w.member("netns", static_cast<unsigned>(f.netns));
      w.member("cgroup", f.cgroup_id);
      w.member("pid", static_cast<unsigned>(f.pid));
      w.member("port", static_cast<unsigned>(f.port));
      w.member("lport", static_cast<unsigned>(f.lport));
      w.member("rport", static_cast<unsigned>(f.rport));
      w.member("family", static_cast<unsigned>(f.family));
      w.end_object();
      w.member("boot_offset_ns", time.offset());
    });
  } else {
    table.write_header();
  }

  Fd ep(epoll_create1(EPOLL_CLOEXEC));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = signals.fd();
  epoll_ctl(ep.get(), EPOLL_CTL_ADD, signals.fd(), &ev);
  ev.data.fd = tracer.epoll_fd();
  epoll_ctl(ep.get(), EPOLL_CTL_ADD, tracer.epoll_fd(), &ev);

  const uint64_t deadline =
      o.duration_s > 0 ? start_ns + static_cast<uint64_t>(o.duration_s * 1e9) : 0;
  uint64_t reported_lost = 0;
  uint64_t next_lost_check = start_ns + 1'000'000'000;
  auto check_lost = [&](uint64_t now) {
    const uint64_t lost = tracer.drops(TCPSCOPE_DROP_RINGBUF) + tracer.malformed();
    if (lost > reported_lost) {
      Event e{};
      e.type = TCPSCOPE_EV_LOST;
      e.ts_ns = now;
      e.conn = lost - reported_lost;
      reported_lost = lost;
      pipeline.process(e);
    }
  };

  int rc = 0;
  bool stop = false;
  while (!stop) {
    epoll_event evs[2];
    int timeout = 100;
    if (deadline) {
      const uint64_t now = boottime_now_ns();
      if (now >= deadline) break;
      timeout = static_cast<int>(std::min<uint64_t>(100, (deadline - now) / 1'000'000 + 1));
    }
    const int n = epoll_wait(ep.get(), evs, 2, timeout);
    if (n < 0 && errno != EINTR) {
      fail(Error{std::string("epoll_wait: ") + std::strerror(errno)});
      rc = 1;
      break;
    }
    for (int i = 0; i < n; ++i)
      if (evs[i].data.fd == signals.fd() && signals.pending()) stop = true;
    const int consumed = tracer.consume();
    if (consumed < 0 && consumed != -EINTR) {
      fail(Error{std::string("reading the ring buffer: ") + std::strerror(-consumed)});
      rc = 1;
      break;
    }
    const uint64_t now = boottime_now_ns();
    if (now >= next_lost_check) {
      check_lost(now);
      next_lost_check = now + 1'000'000'000;
    }
    sink.flush();
    if (out.failed()) break;
  }
  tracer.consume();
  const uint64_t end_ns = boottime_now_ns();
  check_lost(end_ns);
  Event end{};
  end.type = TCPSCOPE_EV_END;
  end.ts_ns = end_ns;
  pipeline.process(end);
  sink.flush();
  if (out.failed() && out.error() != EPIPE) {
    fail(Error{std::string("writing output: ") + std::strerror(out.error())});
    return 1;
  }
  return rc;
}

}  // namespace
}  // namespace tcpscope

int main(int argc, char** argv) {
  using namespace tcpscope;
  auto parsed = parse_command_line(argc, argv);
  if (!parsed) {
    fail(parsed.error());
    return parsed.error().exit_code;
  }
  Options& o = parsed.value();
  auto logger = spdlog::stderr_color_mt("tcpscope");
  logger->set_pattern("tcpscope: %l: %v");
  spdlog::set_default_logger(logger);
  spdlog::set_level(o.verbose ? spdlog::level::debug : spdlog::level::warn);
  libbpf_set_print(libbpf_to_spdlog);
  try {
    switch (o.command) {
      case Options::Command::Help: fmt::print("{}", o.help_text); return 0;
      case Options::Command::Version: fmt::print("tcpscope {}\n", TCPSCOPE_VERSION); return 0;
      case Options::Command::Info: return run_info(o);
      case Options::Command::Trace: return run_trace(o);
    }
  } catch (const std::exception& e) {
    fail(Error{e.what()});
    return 1;
  }
  return 0;
}
