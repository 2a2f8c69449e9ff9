#include "live.hpp"
#include "tcpscope/unique_fd.hpp"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fcntl.h>
#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>
#include <unordered_set>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "tcpscope/audit.hpp"
#include "tcpscope/format.hpp"
#include "tcpscope/holders.hpp"
#include "tcpscope/output.hpp"
#include "tcpscope/timewait.hpp"

namespace tcpscope {

namespace {

// SIGINT/SIGTERM/SIGUSR1 arrive on a signalfd polled with the ring buffer:
// no global flag, no async-signal handler.
class SignalFd {
 public:
  SignalFd() {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGUSR1);
    sigprocmask(SIG_BLOCK, &mask, nullptr);
    fd_ = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  }
  ~SignalFd() {
    if (fd_ >= 0) close(fd_);
  }
  SignalFd(const SignalFd&) = delete;
  SignalFd& operator=(const SignalFd&) = delete;
  int fd() const { return fd_; }
  // The pending signal's number, 0 if none.
  int pending() {
    signalfd_siginfo si{};
    return read(fd_, &si, sizeof(si)) == sizeof(si) ? static_cast<int>(si.ssi_signo) : 0;
  }

 private:
  int fd_ = -1;
};

// The local port range of the traced namespace (a per-netns sysctl).
std::pair<uint16_t, uint16_t> read_port_range(const std::string& netns_path) {
  std::pair<uint16_t, uint16_t> range{0, 0};
  auto read = [&range] {
    FILE* f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "re");
    if (!f) return;
    unsigned lo = 0, hi = 0;
    if (fscanf(f, "%u %u", &lo, &hi) == 2 && lo <= hi && hi < 65536) range = {lo, hi};
    fclose(f);
  };
  run_in_netns(netns_path, read);
  return range;
}

// The namespace's count of resets sent (TcpOutRsts), read inside it.
std::optional<uint64_t> read_out_rsts(const std::string& netns_path) {
  std::optional<uint64_t> count;
  auto read_count = [&count] {
    // thread-self: run_in_netns moves one thread, /proc/self/net would
    // show the main thread's namespace.
    count = parse_tcp_out_rsts(read_file("/proc/thread-self/net/snmp", 8192));
  };
  if (run_in_netns(netns_path, read_count) != 0) return std::nullopt;
  return count;
}

// tcpscope's own cost so far: BPF run time, CPU time, peak RSS.
Event overhead_record(const BpfTracer& tracer, uint64_t now, uint64_t lost) {
  Event e{};
  e.type = TCPSCOPE_EV_STATS;
  e.ts_ns = now;
  const BpfRunStats bpf = tracer.run_stats();
  if (bpf.enabled) {
    e.sk_flags = TCPSCOPE_STATS_BPF;
    e.conn = bpf.runs;
    e.aux = bpf.run_ns;
    std::memcpy(e.laddr, &bpf.sampled_events, sizeof(bpf.sampled_events));
  }
  e.sk = tracer.events();
  e.cgroup = lost;
  // Sockets whose owner the kernel side could not keep (socket table full):
  // traced all the same, but not silently degraded.
  e.netns =
      static_cast<uint32_t>(std::min<uint64_t>(tracer.drops(TCPSCOPE_DROP_SOCKMAP), UINT32_MAX));
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto ms = [](const timeval& tv) {
    return static_cast<uint32_t>(std::min<uint64_t>(
        static_cast<uint64_t>(tv.tv_sec) * 1000 + static_cast<uint64_t>(tv.tv_usec) / 1000,
        UINT32_MAX));
  };
  e.reason = ms(ru.ru_utime);
  e.seg_len = ms(ru.ru_stime);
  e.rx_queue = static_cast<uint32_t>(ru.ru_maxrss);  // KiB
  return e;
}

// --stats: one line on stderr, for scripts (scripts/bench.sh parses it).
// ring_fill: the fullest the ring was found (fraction); read_gap_ns: how
// long it had not been read then; late_wakeups: BpfTracer::late_wakeups().
void print_overhead(const Event& s, double ring_fill, uint64_t read_gap_ns, uint64_t late_wakeups) {
  const StatsFigures f = stats_figures(s);
  const double per_event = f.bpf_ns_per_event, per_run = f.bpf_ns_per_run,
               cpu_per_event = f.cpu_ns_per_event;
  fmt::print(stderr,
             "tcpscope: stats: events {} lost {} bpf_sampled_events {} bpf_runs {} bpf_ns {} "
             "bpf_ns_per_event {:.1f} "
             "bpf_ns_per_run {:.1f} user_cpu_s {:.3f} sys_cpu_s {:.3f} cpu_ns_per_event {:.0f} "
             "max_rss_kib {} owners_not_kept {} ring_peak_fill_pct {:.1f} "
             "ring_peak_unread_ms {:.1f} ring_late_wakeups {}{}\n",
             s.sk, s.cgroup, stats_sampled_events(s), s.conn, s.aux, per_event, per_run,
             s.reason / 1e3, s.seg_len / 1e3, cpu_per_event, s.rx_queue, s.netns, ring_fill * 100,
             read_gap_ns / 1e6, late_wakeups,
             (s.sk_flags & TCPSCOPE_STATS_BPF) ? "" : " (no bpf stats)");
}

using Fd = UniqueFd;

// The thread group of task `pid` (its Tgid line), 0 if there is no such task.
uint32_t tgid_of(uint32_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("Tgid:", 0) == 0) return static_cast<uint32_t>(std::stoul(line.substr(5)));
  return 0;
}

// True if a process, or a name under /run/netns, is in network namespace
// `inode` now.
bool netns_in_use(uint32_t inode) {
  namespace fs = std::filesystem;
  std::error_code ec;
  struct stat st {};
  for (const auto& e : fs::directory_iterator("/run/netns", ec))
    if (stat(e.path().c_str(), &st) == 0 && st.st_ino == inode) return true;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    if (stat((e.path() / "ns/net").c_str(), &st) == 0 && st.st_ino == inode) return true;
  }
  return false;
}

// A filter that names nothing traces nothing, in silence: a typo, a thread
// for a process, a process or namespace gone. Said, not refused: what it
// names may come (a namespace made after the start, say).
void warn_of_empty_filters(const TraceConfig& cfg) {
  const Filters& f = cfg.filters;
  if (f.pid) {
    const uint32_t tgid = tgid_of(f.pid);
    if (tgid == 0)
      spdlog::warn(
          "--pid {}: no such process now: nothing is traced unless one starts with "
          "that pid",
          f.pid);
    else if (tgid != f.pid)
      spdlog::warn(
          "--pid {}: a thread of process {}; connections are owned by processes: give "
          "--pid {}",
          f.pid, tgid, tgid);
  }
  // (A path was checked to be a network namespace.)
  if (f.netns && cfg.netns_path.empty() && !netns_in_use(f.netns))
    spdlog::warn("--netns {}: no process and no /run/netns name is in that network namespace now",
                 f.netns);
}

}  // namespace

void hold_sigusr1() {
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  sigprocmask(SIG_BLOCK, &usr1, nullptr);
}

Result<std::unique_ptr<LiveSession>> LiveSession::start(TraceConfig cfg,
                                                        const std::vector<std::string>& disabled) {
  if (auto err = check_privileges()) return *err;
  std::unique_ptr<LiveSession> s(new LiveSession());
  for (const auto& f : disabled) s->features_.disable(f);
  s->cfg_ = cfg;
  warn_of_empty_filters(cfg);
  auto tracer = BpfTracer::start(cfg, s->features_);
  if (!tracer) return tracer.error();
  s->tracer_ = std::move(tracer.value());
  for (const auto& fb : s->tracer_->fallbacks()) spdlog::info("fell back: {}", fb);
  // The consumer must keep up with the kernel or events are lost; on a host
  // whose CPUs are saturated (the churn benchmark) a nice-0 consumer gets
  // too small a share. A little more weight costs the host nothing it would
  // not pay anyway (the events must be read) and keeps the ring from
  // filling. Best effort: without CAP_SYS_NICE it stays as it is.
  errno = 0;
  if (getpriority(PRIO_PROCESS, 0) == 0 && errno == 0) setpriority(PRIO_PROCESS, 0, -5);
  s->start_ns_ = boottime_now_ns();
  s->boot_offset_ns_ = measure_boot_offset_ns();
  return s;
}

int LiveSession::run(double duration_s, const Consumer& consume,
                     const std::function<void()>& on_batch,
                     const std::function<bool()>& should_stop) {
  // SIGUSR1 without a handler of the caller's: the --stats line so far, on
  // stderr (as dd reports its progress), and tracing goes on.
  SignalFd signals;
  BpfTracer& tracer = *tracer_;
  // CLOSE_WAIT holders: the resolver watches every record (cheap) and
  // resolves, live, only the sockets near the threshold.
  const uint64_t cw_ms = std::max<uint64_t>(1, cfg_.close_wait_threshold_ns / 1'000'000);
  HolderResolverConfig hcfg = HolderResolverConfig::for_threshold(cw_ms * 1'000'000);
  hcfg.resolve = tracer.has_sock_iter();
  HolderResolver holders(hcfg);
  // Sockets with events while the start-up snapshot is taken: their own
  // events describe them (set only during the snapshot).
  std::unordered_set<uint64_t>* seen_at_snapshot = nullptr;
  // Resets sent in the namespace against the kernel's count: only where no
  // filter but the namespace's drops records, and where the count is read.
  const Filters& f = cfg_.filters;
  uint32_t own_netns = f.netns;  // the namespace audited and counted
  if (cfg_.netns_path.empty()) {
    const auto own = resolve_netns("/proc/self/ns/net");
    own_netns = own ? own.value() : 0;
  }
  std::optional<ResetCountCheck> resets;
  if (cfg_.audit_ms > 0 && own_netns && (!f.netns || f.netns == own_netns) && !f.port && !f.lport &&
      !f.rport && !f.family && !f.pid && !f.cgroup_id) {
    if (const auto base = read_out_rsts(cfg_.netns_path)) resets.emplace(*base);
  }
  const Consumer feed = [&holders, &consume, &seen_at_snapshot, &resets,
                         own_netns](const Event& e) {
    if (seen_at_snapshot && e.conn) seen_at_snapshot->insert(e.conn);
    if (e.type == TCPSCOPE_EV_RESET_SENT && resets && e.netns == own_netns) resets->seen();
    holders.observe(e);
    consume(e);
  };
  auto report_missing_resets = [&consume](uint64_t missing, uint64_t now) {
    if (!missing) return;
    Event e{};
    e.type = TCPSCOPE_EV_LOST;
    e.ts_ns = now;
    e.conn = e.aux = missing;
    e.reason = TCPSCOPE_EV_RESET_SENT;
    consume(e);
  };
  tracer.on_event(feed);
  const auto read_close_wait = [&tracer](std::vector<SockRecord>& out) {
    return tracer.read_sockets(TCPSCOPE_ITER_CLOSE_WAIT, out);
  };
  // Decisions that wait on event time (a cancelled tw timer's cause, an
  // unpaired reset, a CLOSE_WAIT crossing) need time to pass without traffic.
  const uint64_t tick_ns =
      std::clamp<uint64_t>(cw_ms * 1'000'000 / 4, 100'000'000ull, 250'000'000ull);
  uint64_t next_tick = 0;

  Fd ep(epoll_create1(EPOLL_CLOEXEC));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = signals.fd();
  epoll_ctl(ep.get(), EPOLL_CTL_ADD, signals.fd(), &ev);
  ev.data.fd = tracer.epoll_fd();
  epoll_ctl(ep.get(), EPOLL_CTL_ADD, tracer.epoll_fd(), &ev);

  const uint64_t deadline =
      duration_s > 0 ? start_ns_ + static_cast<uint64_t>(duration_s * 1e9) : 0;
  uint64_t reported_lost = 0, reported_skipped = 0;
  uint64_t next_lost_check = boottime_now_ns() + 1'000'000'000;
  // BPF statistics: on for 1 s in every 5 (their clock reads slow every
  // program run); per-run and per-event figures are averages over windows.
  constexpr uint64_t kStatsOnNs = 1'000'000'000, kStatsOffNs = 4'000'000'000;
  tracer.sample_stats(true);
  uint64_t next_stats_toggle = boottime_now_ns() + kStatsOnNs;
  auto check_lost = [&](uint64_t now) {
    // Runs the kernel skipped may have carried an event (which socket is
    // unknown): counted as lost, and said apart. The figure is a difference
    // of counters read one after the other: it may lag, never shrink.
    const uint64_t skipped = std::max(tracer.skipped_runs(), reported_skipped);
    const uint64_t lost = tracer.drops(TCPSCOPE_DROP_RINGBUF) + tracer.malformed() + skipped;
    if (lost > reported_lost) {
      Event e{};
      e.type = TCPSCOPE_EV_LOST;
      e.ts_ns = now;
      e.conn = lost - reported_lost;
      e.aux = skipped - reported_skipped;
      reported_lost = lost;
      reported_skipped = skipped;
      consume(e);
    }
  };

  // Owners of socks that predate us are unknown: under a pid or cgroup
  // filter they cannot be attributed, so they are left out.
  const bool report_preexisting = !cfg_.filters.pid && !cfg_.filters.cgroup_id;
  const bool snapshot = tracer.has_sock_iter() && report_preexisting;
  // Facts the analysis needs, as a record so that replays see them too.
  {
    const auto [lo, hi] = read_port_range(cfg_.netns_path);
    Event c{};
    c.type = TCPSCOPE_EV_CONFIG;
    c.ts_ns = start_ns_;
    c.netns = cfg_.filters.netns;
    c.reason = lo;
    c.seg_len = hi;
    c.aux = (tracer.tw_timers_on() ? TCPSCOPE_CONFIG_TW_TIMERS : 0) |
            (cfg_.tw_sweep_ms > 0 && tracer.has_sock_iter() ? TCPSCOPE_CONFIG_TW_SWEEP : 0) |
            (hcfg.resolve ? TCPSCOPE_CONFIG_HOLDERS : 0) |
            (snapshot ? TCPSCOPE_CONFIG_SNAPSHOT : 0);
    c.tx_queue = static_cast<uint32_t>(std::min<uint64_t>(cw_ms, UINT32_MAX));
    consume(c);
  }

  // Every socket that predates us (timewait socks come from the sweep),
  // so that what was already stuck in CLOSE_WAIT is found.
  if (snapshot) {
    std::unordered_set<uint64_t> seen;
    seen_at_snapshot = &seen;
    tracer.consume();
    std::vector<SockRecord> socks;
    // The ring is drained between reads (a pass over a busy host's sockets
    // outlasts it): events from before and during the pass go first; a
    // socket that had some is not pre-existing (it may even have left the
    // state seen).
    auto got = tracer.read_sockets(TCPSCOPE_ITER_ALL, socks, [] {});
    tracer.consume();
    seen_at_snapshot = nullptr;
    if (!got) {
      spdlog::warn("start-up socket snapshot failed: {}", got.error().message);
    } else {
      spdlog::debug("start-up snapshot: {} sockets", socks.size());
      for (const SockRecord& r : socks) {
        if (r.conn == 0 || r.state == kTcpTimeWait || r.state == kTcpNewSynRecv ||
            seen.contains(r.conn))
          continue;
        if (cfg_.filters.family && r.family != cfg_.filters.family) continue;
        Event e{};
        e.type = TCPSCOPE_EV_SNAPSHOT;
        e.ts_ns = r.ts_ns;
        copy_tuple(e, r);
        e.old_state = e.new_state = r.state;
        e.rx_queue = r.rx_queue;
        e.tx_queue = r.tx_queue;
        e.aux = r.ino;
        e.reason = r.uid;
        e.seg_len = r.last_ack_ns && r.last_ack_ns <= r.ts_ns
                        ? static_cast<uint32_t>(std::min<uint64_t>(
                              (r.ts_ns - r.last_ack_ns) / 1'000'000, 0xfffffffeu))
                        : 0xffffffffu;
        e.sk_flags = TCPSCOPE_SK_SNAPSHOT;
        feed(e);
      }
      // From here on every socket is either known or new: one first seen
      // mid-life lost its opening events (the tracker counts a gap).
      Event end{};
      end.type = TCPSCOPE_EV_SNAPSHOT_END;
      end.ts_ns = boottime_now_ns();
      consume(end);
    }
  }

  // TIME_WAIT sweeps: the state tracepoint never shows the tw sock's end.
  TimeWaitSweep sweep;
  bool sweeping = cfg_.tw_sweep_ms > 0 && tracer.has_sock_iter();
  uint64_t next_sweep = 0;
  // Passes over the kernel's socket table (sweeps, audits) run in the traced
  // namespace, entered by its path. The path gone (ip netns del), they stop,
  // said once; the namespace's events are still traced by its inode (it
  // lives on while a process is in it).
  bool auditing = false;
  auto path_gone = [&] {
    if (cfg_.netns_path.empty() || access(cfg_.netns_path.c_str(), F_OK) == 0) return false;
    if (sweeping || auditing)
      spdlog::warn("--netns {}: the path is gone: TIME_WAIT sweeps and connection audits stop",
                   cfg_.netns_path);
    sweeping = auditing = false;
    return true;
  };
  // A pass that fails is said at the first of a run of failures, and when
  // passes work again.
  struct Failures {
    const char* what;
    uint64_t count = 0;
    void failed(const Error& e) {
      if (count++ == 0) spdlog::warn("{} failed: {}", what, e.message);
    }
    void worked() {
      if (count) spdlog::warn("{} work again, after {} failed", what, count);
      count = 0;
    }
  };
  Failures sweep_failures{"TIME_WAIT sweeps"}, audit_failures{"connection audits"};
  auto run_sweep = [&](bool initial) {
    tracer.consume();  // entries first: a tw's CLOSE event precedes its sighting
    const uint64_t t0 = boottime_now_ns();
    sweep.begin(initial, report_preexisting);
    // Events keep flowing during the pass; after each read, what the pass
    // saw a while ago goes out, its CLOSE events read by then (the kernel
    // reports one microseconds after the tw sock shows in the table).
    constexpr uint64_t kSettleNs = 5'000'000;
    auto got = tracer.read_sockets(
        TCPSCOPE_ITER_TIME_WAIT, [&sweep](const SockRecord& r) { sweep.see(r); },
        [&sweep, &consume] { sweep.settle(boottime_now_ns() - kSettleNs, consume); });
    const uint64_t t1 = boottime_now_ns();
    // The next pass comes at its time, whether this one worked or not.
    next_sweep = t0 + static_cast<uint64_t>(cfg_.tw_sweep_ms) * 1'000'000;
    if (!got) {
      // What a failed pass saw stays known; the next pass settles it.
      if (!path_gone()) sweep_failures.failed(got.error());
      return;
    }
    sweep_failures.worked();
    // And the events of the pass itself: a tw sock made while the pass ran
    // may have been seen by it, and its CLOSE event must come first, or the
    // sighting looks like a stranger's (pre-existing, filtered out) and the
    // CLOSE like a TIME_WAIT that never was.
    tracer.consume();
    sweep.finish(t0, t1, cfg_.tw_sweep_ms, consume);
  };
  if (sweeping) run_sweep(true);

  // The audit: a connection held open whose socket is no longer in the
  // kernel's table lost its last events, CLOSE included. iter/tcp sees one
  // namespace: connections of others are not audited. Under --pid a
  // connection handed to another process leaves the trace: not audited.
  auditing = audited_ && cfg_.audit_ms > 0 && tracer.has_sock_iter() && !cfg_.filters.pid;
  // The namespace iter/tcp walks: --netns given as a path, else our own
  // (0 if unknown: no connection matches, none is judged).
  const uint32_t audit_netns = own_netns;
  uint64_t next_audit = start_ns_ + static_cast<uint64_t>(cfg_.audit_ms) * 1'000'000;
  uint64_t next_reset_check = next_audit;
  auto run_audit = [&] {
    tracer.consume();
    const uint64_t t0 = boottime_now_ns();
    // 8 bytes a socket of the namespace, for the pass only: not kept.
    std::vector<uint64_t> present;
    auto got = tracer.read_sockets(
        TCPSCOPE_ITER_AUDIT, [&present](const SockRecord& r) { present.push_back(r.conn); }, [] {});
    if (!got) {
      if (!path_gone()) audit_failures.failed(got.error());
      return;
    }
    audit_failures.worked();
    spdlog::debug("connection audit: {} sockets in {} reads, {} us", present.size(),
                  tracer.last_pass_reads(), (boottime_now_ns() - t0) / 1000);
    tracer.consume();  // a socket gone during the pass: its CLOSE is in by now
    std::sort(present.begin(), present.end());
    std::vector<Event> vanished;
    find_vanished(*audited_, present, audit_netns, t0, vanished);
    for (const Event& v : vanished) feed(v);
  };

  int rc = 0;
  bool stop = false;
  // The ring is drained at least every kIdlePollMs: producers batch their
  // wake-ups. Within kFlowWindowNs of a drain that found records, every
  // kFlowingPollMs: under churn a forced wake-up sometimes comes tens of ms
  // late, with no steal by the host (ring_late_wakeups counts such waits),
  // and the full churn fills the default 4 MiB in about 100 ms. A
  // drain may find nothing right after one that emptied the ring, so one
  // empty drain does not end the flow. Under load the batched wake-ups come
  // every few ms and the shorter timeout seldom fires; a lightly loaded host
  // wakes 50 times a second, an idle one 10.
  constexpr int kIdlePollMs = 100, kFlowingPollMs = 20;
  constexpr uint64_t kFlowWindowNs = 1'000'000'000;
  uint64_t last_records_ns = 0;
  while (!stop) {
    epoll_event evs[2];
    const bool flowing = last_records_ns && boottime_now_ns() - last_records_ns < kFlowWindowNs;
    int timeout = flowing ? kFlowingPollMs : kIdlePollMs;
    if (holders.busy()) timeout = std::min(timeout, 10);  // a holder scan is cut in steps
    if (deadline) {
      const uint64_t now = boottime_now_ns();
      if (now >= deadline) break;
      timeout = static_cast<int>(
          std::min<uint64_t>(static_cast<uint64_t>(timeout), (deadline - now) / 1'000'000 + 1));
    }
    tracer.wait_begins();
    const int n = epoll_wait(ep.get(), evs, 2, timeout);
    tracer.wait_ended();
    if (n < 0 && errno != EINTR) {
      fmt::print(stderr, "tcpscope: epoll_wait: {}\n", std::strerror(errno));
      rc = 1;
      break;
    }
    for (int i = 0; i < n; ++i) {
      if (evs[i].data.fd != signals.fd()) continue;
      while (const int sig = signals.pending()) {
        if (sig == SIGUSR1 && on_usr1_)
          on_usr1_();
        else if (sig == SIGUSR1)
          print_overhead(overhead_record(tracer, boottime_now_ns(), reported_lost),
                         tracer.ring_peak_fill(), tracer.ring_peak_read_gap_ns(),
                         tracer.late_wakeups());
        else
          stop = true;
      }
    }
    const bool found = tracer.consume() > 0;
    const uint64_t now = boottime_now_ns();
    if (found) last_records_ns = now;
    if (sweeping && now >= next_sweep) run_sweep(false);
    if (auditing && now >= next_audit) {
      // The kernel's walk costs about 0.8 us per socket of the namespace,
      // timewait socks included: passes are spaced to stay under 1% of a
      // CPU (160 ms at 200,000 sockets: every 16 s, not 5).
      run_audit();
      const uint64_t done = boottime_now_ns();
      next_audit = done + std::max<uint64_t>(static_cast<uint64_t>(cfg_.audit_ms) * 1'000'000,
                                             (done - now) * 100);
    }
    if (resets && now >= next_reset_check) {
      const auto count = read_out_rsts(cfg_.netns_path);
      tracer.consume();
      if (count) report_missing_resets(resets->judge(*count, tracer.lost_resets_counted()), now);
      next_reset_check = now + static_cast<uint64_t>(cfg_.audit_ms) * 1'000'000;
    }
    if (holders.tracking() || holders.busy()) holders.step(now, read_close_wait, feed);
    if (now >= next_tick) {
      Event tick{};
      tick.type = TCPSCOPE_EV_TICK;
      tick.ts_ns = boottime_now_ns();
      consume(tick);
      next_tick = now + tick_ns;
    }
    if (now >= next_stats_toggle) {
      const bool on = !tracer.stats_on();
      tracer.sample_stats(on);
      next_stats_toggle = now + (on ? kStatsOnNs : kStatsOffNs);
    }
    if (now >= next_lost_check) {
      check_lost(now);
      next_lost_check = now + 1'000'000'000;
    }
    if (on_batch) on_batch();
    if (should_stop && should_stop()) break;
  }
  tracer.consume();
  if (sweeping && rc == 0) run_sweep(false);  // what ended since the last pass
  if (auditing && rc == 0) run_audit();
  if (resets && rc == 0) {
    // A reset is counted a little before its record is made: wait a while.
    const auto count = read_out_rsts(cfg_.netns_path);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    tracer.consume();
    if (count)
      report_missing_resets(resets->judge_final(*count, tracer.lost_resets_counted()),
                            boottime_now_ns());
  }
  const uint64_t end_ns = boottime_now_ns();
  check_lost(end_ns);
  if (resets && resets->missing())
    spdlog::warn("{} resets the kernel counted as sent (OutRsts) came with no record",
                 resets->missing());
  if (reported_skipped)
    spdlog::warn("{} runs the kernel skipped were not redone; runs skipped: {}", reported_skipped,
                 tracer.skipped_runs_by_program());
  // Our own overhead, as a record: a capture's report shows it too.
  const Event stats =
      overhead_record(tracer, end_ns, reported_lost + (resets ? resets->missing() : 0));
  consume(stats);
  if (const uint64_t full = tracer.drops(TCPSCOPE_DROP_RINGBUF))
    spdlog::warn(
        "{} records lost with the ring buffer full: it was found up to {:.0f}% full, "
        "then after {:.0f} ms without a read; raise --ring-size (now {} KiB)",
        full, tracer.ring_peak_fill() * 100, tracer.ring_peak_read_gap_ns() / 1e6,
        cfg_.ring_bytes / 1024);
  if (cfg_.print_stats)
    print_overhead(stats, tracer.ring_peak_fill(), tracer.ring_peak_read_gap_ns(),
                   tracer.late_wakeups());
  Event end{};
  end.type = TCPSCOPE_EV_END;
  end.ts_ns = end_ns;
  consume(end);
  if (on_batch) on_batch();
  return rc;
}

}  // namespace tcpscope
