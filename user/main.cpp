// tcpscope: live TCP connection-lifecycle tracer.
#include <malloc.h>
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
#include "live.hpp"
#include "record.hpp"
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
    case LIBBPF_WARN:
      spdlog::debug("libbpf: {}", msg);
      break;  // fallbacks warn by design
    case LIBBPF_INFO:
      spdlog::debug("libbpf: {}", msg);
      break;
    case LIBBPF_DEBUG:
      spdlog::trace("libbpf: {}", msg);
      break;
  }
  return 0;
}

void fail(const Error& e) { fmt::print(stderr, "tcpscope: {}\n", e.message); }

int run_info(const Options& o) {
  KernelFeatures features;
  for (const auto& f : o.disabled_features) features.disable(f);
  fmt::print("kernel {}\n", features.kernel_release());
  for (const auto& [name, ok] : features.table())
    fmt::print("  {:<16} {}\n", name, ok ? "yes" : "no");
  // What a trace would use here: the first method that loads, tried best
  // first; TIME_WAIT ends from the tw timers, else from iter/tcp sweeps.
  std::string attach = "none";
  for (AttachMode m : kAttachOrder)
    if (features.supports(m)) {
      attach = attach_mode_name(m);
      break;
    }
  fmt::print("attach           {}\n", attach);
  fmt::print("time_wait ends   {}\n", features.tw_timers()  ? "tw timers (exact)"
                                      : features.iter_tcp() ? "sweeps (iter/tcp)"
                                                            : "not observed");
  return 0;
}

int run_trace(const Options& o) {
  signal(SIGPIPE, SIG_IGN);
  hold_sigusr1();
  auto started = LiveSession::start(o.trace, o.disabled_features);
  if (!started) {
    fail(started.error());
    return started.error().exit_code;
  }
  LiveSession& session = *started.value();
  BpfTracer& tracer = session.tracer();

  TimeFormatter time(session.boot_offset_ns());  // the value captures store
  FdWriter out(STDOUT_FILENO);
  Pipeline pipeline;
  setup_pipeline(pipeline, o);  // shared with record --json and report
  JsonLinesSink json(out, time);
  TableSink table(out, time, TextStyle{o.top});
  Sink& sink = o.json ? static_cast<Sink&>(json) : static_cast<Sink&>(table);
  pipeline.add_sink(&sink);

  if (o.json) {
    json.write_start(session.start_ns(), [&](JsonWriter& w) {
      w.member("version", TCPSCOPE_VERSION);
      w.member("attach", attach_mode_name(tracer.mode()));
      w.key("programs");
      w.begin_array();
      for (const auto& p : tracer.programs()) w.value(p);
      w.end_array();
      w.key("filters");
      w.begin_object();
      const Filters& f = session.config().filters;
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

  session.audit(&pipeline.tracker());
  const int rc = session.run(
      o.duration_s, [&pipeline](const Event& ev) { pipeline.process(ev); },
      [&sink] { sink.flush(); }, [&out] { return out.failed(); });
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
  // Large buffers (a sweep over a busy host's tw socks is megabytes) come
  // from mmap and go back at free. glibc's default threshold rises after
  // such a free, and the next ones then stay in the heap for good.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
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
      case Options::Command::Help:
        fmt::print("{}", o.help_text);
        return 0;
      case Options::Command::Version:
        fmt::print("tcpscope {}\n", TCPSCOPE_VERSION);
        return 0;
      case Options::Command::Info:
        return run_info(o);
      case Options::Command::Trace:
        return run_trace(o);
      case Options::Command::Record:
        return run_record(o);
      case Options::Command::Report:
        return run_report(o);
    }
  } catch (const std::exception& e) {
    fail(Error{e.what()});
    return 1;
  }
  return 0;
}
