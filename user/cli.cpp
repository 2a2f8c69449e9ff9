#include "cli.hpp"

#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cmath>

#include <unistd.h>

namespace tcpscope {

namespace {

// "16M" / "512K" / "1048576" -> bytes.
std::optional<uint64_t> parse_size(const std::string& s) {
  if (s.empty()) return std::nullopt;
  size_t pos = 0;
  unsigned long long v = 0;
  try {
    v = std::stoull(s, &pos);
  } catch (...) {
    return std::nullopt;
  }
  uint64_t mult = 1;
  if (pos < s.size()) {
    switch (s[pos]) {
      case 'k':
      case 'K':
        mult = 1ull << 10;
        break;
      case 'm':
      case 'M':
        mult = 1ull << 20;
        break;
      case 'g':
      case 'G':
        mult = 1ull << 30;
        break;
      default:
        return std::nullopt;
    }
    if (pos + 1 != s.size() && !(pos + 3 == s.size() && s.substr(pos + 1) == "iB"))
      return std::nullopt;
  }
  return v * mult;
}

// A finite number of seconds from lo to hi. CLI11's own number checks let
// "nan" through (a --duration that never ends) and print their bounds with
// six decimals, up to DBL_MAX.
CLI::Validator seconds_from(double lo, double hi) {
  return CLI::Validator(
      [lo, hi](std::string& s) -> std::string {
        double v = 0;
        size_t used = 0;
        try {
          v = std::stod(s, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used == 0 || used != s.size() || !std::isfinite(v) || v < lo || v > hi)
          return fmt::format("'{}' is not a number of seconds from {} to {}", s, lo, hi);
        return {};
      },
      "SECONDS");
}

// Durations are turned into uint64_t nanoseconds: 1e9 s (31 years) fits.
constexpr double kMaxSeconds = 1e9;

std::string first_line(const std::string& s) {
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

}  // namespace

Result<Options> parse_command_line(int argc, char** argv) {
  Options o;
  CLI::App app{
      "tcpscope: trace TCP connection lifecycles (TIME_WAIT, resets, CLOSE_WAIT) with eBPF",
      "tcpscope"};
  app.set_help_flag("-h,--help", "Print this help and exit");
  app.set_version_flag("--version", std::string(TCPSCOPE_VERSION));

  std::string netns, cgroup, attach = "auto", ring_size = "4M";
  uint32_t pid = 0;
  uint16_t port = 0, lport = 0, rport = 0;
  bool v4 = false, v6 = false, info = false, no_io = false;

  app.add_flag("--json", o.json, "Print JSON Lines instead of the table");
  app.add_option("--duration", o.duration_s, "Stop after SECONDS and print the report")
      ->check(seconds_from(0, kMaxSeconds));
  app.add_option("--netns", netns,
                 "Only this network namespace: /run/netns/NAME, "
                 "/proc/PID/ns/net or an inode number");
  app.add_option("--cgroup", cgroup, "Only sockets of this cgroup v2 (or below it)");
  app.add_option("--pid", pid, "Only connections owned by this process (tgid)")
      ->check(CLI::Range(1u, 4194304u));
  app.add_option("--port", port, "Only connections with this port on either side")
      ->check(CLI::Range(1, 65535));
  app.add_option("--lport", lport, "Only this local port")->check(CLI::Range(1, 65535));
  app.add_option("--rport", rport, "Only this remote port")->check(CLI::Range(1, 65535));
  auto* f4 = app.add_flag("-4,--ipv4", v4, "Only IPv4 (includes v4-mapped IPv6)");
  auto* f6 = app.add_flag("-6,--ipv6", v6, "Only IPv6");
  f4->excludes(f6);
  app.add_option("--top", o.top, "Rows in the report's top lists")->check(CLI::Range(1, 10000));
  app.add_flag("-v,--verbose", o.verbose, "Debug logging, including libbpf's");
  app.add_option("--attach", attach, "Attach method: auto, tp_btf, raw_tp, tracepoint")
      ->check(CLI::IsMember({"auto", "tp_btf", "raw_tp", "tracepoint"}));
  app.add_option("--disable-feature", o.disabled_features,
                 "Treat a kernel feature as missing (see --info), to test fallbacks");
  app.add_option("--ring-size", ring_size, "BPF ring buffer size (power of 2; default 4M)");
  app.add_option("--max-sockets", o.trace.max_sockets,
                 "Sockets the kernel side tracks at once (all live ones with --pid or a "
                 "fallback attach method; else accepted ones awaiting their first send/recv)")
      ->check(CLI::Range(1024u, 16u << 20));
  app.add_flag("--no-io-owner", no_io,
               "Do not refine owners on first send/recv (saves a probe per send/recv)");
  // Sweeps decide TIME_WAIT ends only without the tw timers; with them they
  // are a safety net (and find tw socks that predate the trace), and at
  // 100,000 tw socks a pass costs ~80 ms: every 10 s then.
  double tw_sweep_s = -1;
  app.add_option("--tw-sweep-interval", tw_sweep_s,
                 "Seconds between TIME_WAIT sweeps (iter/tcp); bound the error of TIME_WAIT "
                 "end times without the tw timers; 0 = no sweeps (default 1, or 10 with the "
                 "tw timers)")
      ->check(seconds_from(0, 3600));
  double audit_s = 5;
  app.add_option("--audit-interval", audit_s,
                 "Seconds between audits of the connections held open against the kernel's "
                 "socket table (iter/tcp, the traced namespace only): one gone without its "
                 "CLOSE is reported as vanished, its last events lost. 0 = off (default 5, "
                 "longer if a pass would cost over 1% of a CPU; needs a live report: trace, or "
                 "record --json)")
      ->check(seconds_from(0, 3600));
  bool no_tw_timers = false;
  app.add_flag("--no-tw-timers", no_tw_timers,
               "Do not trace timewait timers (saves a probe per kernel timer start; TIME_WAIT "
               "entries and ends then come from sweeps only)");
  double close_wait_s = 60;
  app.add_option("--close-wait-threshold", close_wait_s,
                 "Seconds in CLOSE_WAIT after which a socket counts as stuck "
                 "(close_wait_stuck, holders resolved); default 60")
      ->check(seconds_from(0.001, 1e6));
  app.add_flag("--stats", o.trace.print_stats,
               "At exit, print tcpscope's own overhead (events, lost, BPF ns per event, CPU "
               "time, peak RSS) as one line on stderr");
  bool no_bpf_stats = false;
  app.add_flag("--no-bpf-stats", no_bpf_stats,
               "Do not turn on the kernel's BPF run-time statistics (the stats record then has "
               "no BPF figures)");
  app.add_flag("--info", info, "Print what the kernel supports and exit");
  auto* trace_cmd = app.add_subcommand("trace", "Live tracing (the default)");
  trace_cmd->fallthrough();

  // record: the trace filters above fall through to it.
  RecordOptions& r = o.record;
  std::string max_size, ring, compress = "zstd";
  auto* record_cmd =
      app.add_subcommand("record",
                         "Record raw events to a capture file for a later `report` "
                         "(--ring: flight recorder, keep only the last SIZE in memory)");
  record_cmd->fallthrough();
  record_cmd->add_option("-o,--output", r.output, "Capture file (created 0600)");
  record_cmd->add_option("--max-size", max_size,
                         "Rotate to FILE.1, FILE.2... when a file reaches SIZE (e.g. 100M)");
  record_cmd
      ->add_option("--max-files", r.max_files,
                   "Keep only the newest N files (parts or flight recorder dumps)")
      ->check(CLI::Range(1u, 1000000u));
  record_cmd->add_option("--compress", compress, "zstd (default) or none")
      ->check(CLI::IsMember({"zstd", "none"}));
  record_cmd->add_option("--zstd-level", r.zstd_level, "zstd level (default 1: fastest)")
      ->check(CLI::Range(1, 19));
  record_cmd->add_option("--ring", ring,
                         "Flight recorder: keep the last SIZE of events in memory (e.g. 64M) and "
                         "write them on SIGUSR1, on exit or when a trigger fires");
  auto* t_fin = record_cmd->add_flag("--trigger-late-fin", r.trigger_late_fin,
                                     "Dump when a late FIN is answered with a RST");
  auto* t_cw = record_cmd
                   ->add_option("--trigger-close-wait", r.trigger_close_wait,
                                "Dump when N connections are stuck in CLOSE_WAIT (past "
                                "--close-wait-threshold)")
                   ->check(CLI::Range(1u, 100000000u));
  auto* t_tw = record_cmd
                   ->add_option("--trigger-time-wait", r.trigger_time_wait,
                                "Dump when more than N TIME_WAIT sockets exist")
                   ->check(CLI::Range(1u, 100000000u));
  auto* t_delay = record_cmd
                      ->add_option("--trigger-delay", r.trigger_delay_s,
                                   "Seconds to keep recording after a trigger (default 1)")
                      ->check(seconds_from(0, kMaxSeconds));
  auto* t_cool = record_cmd
                     ->add_option("--trigger-cooldown", r.trigger_cooldown_s,
                                  "Seconds after a dump during which triggers are "
                                  "ignored (default 60)")
                     ->check(seconds_from(0, kMaxSeconds));

  auto* report_cmd = app.add_subcommand(
      "report", "Print the reports of a capture (no BPF, no root needed); --json, --top apply");
  report_cmd->fallthrough();
  report_cmd->add_option("file", o.report_file, "Capture file written by `tcpscope record`")
      ->required();
  app.require_subcommand(0, 1);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    o.command = Options::Command::Help;
    o.help_text = app.help();
    return o;
  } catch (const CLI::CallForVersion&) {
    o.command = Options::Command::Version;
    return o;
  } catch (const CLI::ParseError& e) {
    return Error{first_line(e.what()) + " (see tcpscope --help)", 2};
  }

  if (info) o.command = Options::Command::Info;
  if (*report_cmd) {
    // Filters act in the kernel at record time; a report cannot apply them.
    for (const char* name :
         {"--netns", "--cgroup", "--pid", "--port", "--lport", "--rport", "--ipv4", "--ipv6",
          "--duration", "--attach", "--ring-size", "--close-wait-threshold"})
      if (app.count(name))
        return Error{std::string("report: ") + name + " applies to trace and record, not report",
                     2};
    // Not standard input: the reader needs a file's size to tell a
    // truncated tail, and follows FILE.1, FILE.2... ("./-" names a file "-").
    if (o.report_file == "-")
      return Error{"report: a capture is read from a file, not standard input: give its path", 2};
    o.command = Options::Command::Report;
    return o;
  }
  if (*record_cmd) {
    o.command = Options::Command::Record;
    if (r.output.empty()) return Error{"record: -o FILE is required", 2};
    // Not standard output: a capture is cut back to its last whole block
    // when a write fails, and rotates into FILE.1... ("./-" names a file).
    if (r.output == "-")
      return Error{"record: -o -: a capture is written to a file, not standard output: give a path",
                   2};
    r.compress = compress == "zstd";
    if (!max_size.empty()) {
      auto b = parse_size(max_size);
      if (!b || *b < (64u << 10))
        return Error{"--max-size " + max_size + ": must be a size of at least 64K", 2};
      r.max_size = *b;
    }
    if (!ring.empty()) {
      auto b = parse_size(ring);
      if (!b || *b < (64u << 10) || *b > (64ull << 30))
        return Error{"--ring " + ring + ": must be a size from 64K to 64G", 2};
      // The recorder's memory grows to this size while it runs: a slip of
      // the unit (G for M) must not take a production host's memory.
      const uint64_t phys = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) *
                            static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
      if (phys && *b > phys / 2)
        return Error{fmt::format("--ring {}: more than half of this host's memory ({} MiB)", ring,
                                 phys >> 20),
                     2};
      r.ring_bytes = *b;
      if (!max_size.empty())
        return Error{"--max-size does not apply to --ring (each dump is one file)", 2};
    } else {
      for (auto* opt : {t_fin, t_cw, t_tw, t_delay, t_cool})
        if (opt->count())
          return Error{opt->get_name() + " needs --ring (triggers drive the flight recorder)", 2};
    }
  }
  for (const auto& name : o.disabled_features) {
    if (KernelFeatures::is_known(name)) continue;
    std::string known;
    for (const auto& n : KernelFeatures::names()) known += (known.empty() ? "" : ", ") + n;
    return Error{"--disable-feature " + name + ": unknown feature (one of: " + known + ")", 2};
  }
  Filters& f = o.trace.filters;
  if (!netns.empty()) {
    auto r = resolve_netns(netns);
    if (!r) return r.error();
    f.netns = *r;
    if (netns.find('/') != std::string::npos) o.trace.netns_path = netns;
  }
  if (!cgroup.empty()) {
    auto r = resolve_cgroup(cgroup);
    if (!r) return r.error();
    f.cgroup_id = r->first;
    f.cgroup_level = r->second;
  }
  f.pid = pid;
  f.port = port;
  f.lport = lport;
  f.rport = rport;
  f.family = v4 ? 4 : v6 ? 6 : 0;
  if (attach == "tp_btf")
    o.trace.force_mode = AttachMode::TpBtf;
  else if (attach == "raw_tp")
    o.trace.force_mode = AttachMode::RawTp;
  else if (attach == "tracepoint")
    o.trace.force_mode = AttachMode::Tracepoint;
  auto bytes = parse_size(ring_size);
  if (!bytes || *bytes < 4096 || *bytes > (1ull << 30) || (*bytes & (*bytes - 1)))
    return Error{"--ring-size " + ring_size + ": must be a power of two from 4K to 1G", 2};
  o.trace.ring_bytes = static_cast<uint32_t>(*bytes);
  o.trace.io_owner = !no_io;
  o.trace.bpf_stats = !no_bpf_stats;
  o.trace.tw_timers = !no_tw_timers;
  if (tw_sweep_s < 0) tw_sweep_s = no_tw_timers ? 1.0 : 10.0;
  if (tw_sweep_s > 0 && tw_sweep_s < 0.01)
    return Error{"--tw-sweep-interval: use 0 (off) or at least 0.01 s", 2};
  o.trace.tw_sweep_ms = static_cast<uint32_t>(tw_sweep_s * 1000);
  if (audit_s > 0 && audit_s < 0.1)
    return Error{"--audit-interval: use 0 (off) or at least 0.1 s", 2};
  o.trace.audit_ms = static_cast<uint32_t>(audit_s * 1000);
  o.trace.close_wait_threshold_ns = static_cast<uint64_t>(close_wait_s * 1e9);
  return o;
}

}  // namespace tcpscope
