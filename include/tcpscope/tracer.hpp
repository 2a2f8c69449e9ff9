// The live kernel side: opens, configures, loads and attaches the BPF
// programs (separate checked steps, falling back tp_btf -> raw_tp ->
// tracepoint), and reads events from the ring buffer. Every kernel object is
// owned by an RAII handle.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tcpscope/event.hpp"
#include "tcpscope/features.hpp"
#include "tcpscope/result.hpp"
#include "tcpscope/ring_reader.hpp"

struct tcpscope_bpf;
struct bpf_link;

namespace tcpscope {

struct Filters {
  uint32_t netns = 0;  // inode
  uint64_t cgroup_id = 0;
  int32_t cgroup_level = 0;
  uint32_t pid = 0;
  uint16_t port = 0, lport = 0, rport = 0;
  uint8_t family = 0;  // 0, 4, 6
};

struct TraceConfig {
  Filters filters;
  std::optional<AttachMode> force_mode;  // else the best the kernel has
  // Mapped once (RingConsumer): counts 4 MiB of RSS. Full loopback churn
  // writes some 45 MB/s of records: about 90 ms of it, against the 10-15
  // ms the consumer usually goes unread there.
  uint32_t ring_bytes = 4u << 20;
  uint32_t max_sockets = 262144;
  uint64_t wakeup_bytes = 256 * 1024;  // batch consumer wake-ups
  bool io_owner = true;                // attach sock_{send,recv}_length
  bool sock_iter = true;               // load iter/tcp (tw sweep, snapshot)
  bool tw_timers = true;               // trace tw socks by their timer
  uint32_t tw_sweep_ms = 1000;         // TIME_WAIT sweep period, 0 = off
  uint32_t audit_ms = 5000;            // open-connection audit period, 0 = off
  std::string netns_path;              // --netns as a path, if given
  bool bpf_stats = true;               // measure our BPF run time (BPF_ENABLE_STATS)
  bool print_stats = false;            // --stats: overhead summary on stderr at exit
  uint64_t close_wait_threshold_ns = 60'000'000'000ull;  // CLOSE_WAIT is stuck past it
};

// Parses --netns (a path such as /run/netns/NAME, or an inode number).
Result<uint32_t> resolve_netns(const std::string& spec);
// Parses --cgroup (a cgroup v2 directory): its id and depth.
Result<std::pair<uint64_t, int32_t>> resolve_cgroup(const std::string& path);
// Runs fn on a thread that joined the network namespace at netns_path (on
// the calling thread if the path is empty): setns() changes only the calling
// thread, and per-namespace things (iter/tcp walks, /proc/sys/net) follow
// the thread. Returns 0, or the errno of joining.
int run_in_netns(const std::string& netns_path, const std::function<void()>& fn);
// Checks for root or CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN).
std::optional<Error> check_privileges();

struct SkelDeleter {
  void operator()(tcpscope_bpf* s) const;
};
struct LinkDeleter {
  void operator()(bpf_link* l) const;
};

// Turns on the kernel's BPF run-time statistics (bpf_prog_info run_cnt and
// run_time_ns) for as long as it lives: BPF_ENABLE_STATS, whose fd the kernel
// drops with the process however it ends, so kernel.bpf_stats_enabled is
// never touched; on kernels without it (< 5.8), the sysctl, restored by the
// destructor (the live loop ends on SIGINT/SIGTERM through a signalfd, so
// destructors run).
class BpfStatsGuard {
 public:
  BpfStatsGuard();
  ~BpfStatsGuard();
  BpfStatsGuard(const BpfStatsGuard&) = delete;
  BpfStatsGuard& operator=(const BpfStatsGuard&) = delete;
  bool on() const { return on_; }

 private:
  int fd_ = -1;
  bool on_ = false;
  bool restore_sysctl_ = false;
};

// Run time of our BPF programs, summed (valid only if enabled).
struct BpfRunStats {
  bool enabled = false;
  uint64_t sampled_events = 0;  // records delivered while counting
  uint64_t runs = 0;            // program invocations (run_cnt)
  uint64_t run_ns = 0;          // time spent in them (run_time_ns)
};

class BpfTracer {
 public:
  using EventFn = std::function<void(const Event&)>;

  static Result<std::unique_ptr<BpfTracer>> start(const TraceConfig& cfg, KernelFeatures& features);

  AttachMode mode() const { return mode_; }
  const std::vector<std::string>& programs() const { return programs_; }
  // Failed attempts before the one that worked: "tp_btf: <reason>".
  const std::vector<std::string>& fallbacks() const { return fallbacks_; }

  // Sets where events go; must be called before consume().
  void on_event(EventFn fn) { on_event_ = std::move(fn); }
  // Readable when producers woke the consumer (they batch wake-ups: drain
  // on a timeout too).
  int epoll_fd() const;
  // Hands every record queued to the on_event function; returns how many.
  int consume();
  // Kernel drop counters summed over CPUs (enum tcpscope_drop_kind).
  uint64_t drops(int kind) const;
  // Runs of our event-making programs the kernel skipped (bpf_prog_info
  // recursion_misses: a program interrupted on its CPU by a softirq that
  // hits the same tracepoint is not re-entered) and no twin did instead.
  // Counted whether or not the BPF statistics are on.
  uint64_t skipped_runs() const;
  // Which programs those skipped runs were of, for the log: "name N, ...",
  // with how many the set_state twin did; empty if none was skipped.
  std::string skipped_runs_by_program() const;
  // Resets sent whose record is known lost (ring buffer full, or a run of
  // the tcp_send_reset program the kernel skipped), in every namespace.
  uint64_t lost_resets_counted() const;
  // Records the ring buffer delivered with a size other than Event's.
  uint64_t malformed() const { return malformed_; }
  // How near the consumer came to losing records: the fullest the ring was
  // found (a fraction of its size), and how long it had not been read then
  // (ns).
  double ring_peak_fill() const;
  uint64_t ring_peak_read_gap_ns() const { return peak_read_gap_ns_; }
  // Call around each wait for a wake-up. A wait in which more than two
  // wake-up batches of records came in is counted late: some CPU forced a
  // wake-up in it that was lost or late, or the consumer's CPU did not run.
  void wait_begins() { wait_pending_ = ring_->pending_bytes(); }
  void wait_ended();
  uint64_t late_wakeups() const { return late_wakeups_; }
  // Records delivered by the ring buffer so far.
  uint64_t events() const { return events_; }
  // Our programs' BPF run time so far (bpf_prog_info), if stats are on.
  BpfRunStats run_stats() const;
  // BPF run-time statistics cost two clock reads per program run (a tenth
  // of the handlers' time in a VM), so they are sampled: the live loop
  // turns them on for a window now and then. No-op with --no-bpf-stats.
  void sample_stats(bool on);
  bool stats_on() const { return stats_ && stats_->on(); }

  // TW_START/CANCEL/EXPIRE records are produced (exact TIME_WAIT).
  bool tw_timers_on() const { return tw_timers_on_; }
  // The iter/tcp program loaded and attached (TIME_WAIT sweep, snapshot).
  bool has_sock_iter() const { return iter_link_ != nullptr; }
  // One pass of iter/tcp over the sockets of a kind (timewait, CLOSE_WAIT or
  // all). The filters apply as for events. Reuses out's storage.
  // between_reads: as below.
  Result<size_t> read_sockets(tcpscope_iter_pass pass, std::vector<SockRecord>& out,
                              const std::function<void()>& between_reads = {});
  // The same, each record handed to visit as it is read (no copy of a
  // large pass). With between_reads: also deliver the queued events after
  // each read, then call it, so that a long pass (100,000 tw socks take
  // about 80 ms) does not fill the ring buffer; only where on_event's
  // consumer may run meanwhile.
  Result<size_t> read_sockets(tcpscope_iter_pass pass,
                              const std::function<void(const SockRecord&)>& visit,
                              const std::function<void()>& between_reads = {});
  // Reads of the last pass that returned records (progress ones included):
  // a pass that keeps few sockets still returns every 64 it passes over.
  size_t last_pass_reads() const { return last_pass_reads_; }

 private:
  BpfTracer() = default;
  static Result<std::unique_ptr<BpfTracer>> try_mode(AttachMode mode, const TraceConfig& cfg,
                                                     KernelFeatures& features, bool with_iter);
  static void handle(void* ctx, const void* data, size_t size);

  std::unique_ptr<tcpscope_bpf, SkelDeleter> skel_;
  std::vector<std::unique_ptr<bpf_link, LinkDeleter>> links_;
  std::unique_ptr<RingReader> ring_;
  std::unique_ptr<bpf_link, LinkDeleter> iter_link_;
  std::vector<char> iter_buf_;
  size_t last_pass_reads_ = 0;
  std::string netns_path_;  // iterators walk this namespace (else ours)
  AttachMode mode_ = AttachMode::TpBtf;
  std::vector<std::string> programs_;
  std::vector<std::string> fallbacks_;
  EventFn on_event_;
  uint64_t malformed_ = 0;
  uint64_t last_read_ns_ = 0, peak_read_gap_ns_ = 0;
  uint64_t wakeup_batch_bytes_ = 0;  // 0: the kernel wakes per record
  uint64_t wait_pending_ = 0, late_wakeups_ = 0;
  uint64_t events_ = 0;
  std::vector<int> prog_fds_;                  // attached programs (owned by skel_)
  std::vector<int> lossy_prog_fds_;            // those whose skipped runs lose events
  std::vector<std::string> lossy_prog_names_;  // and their names
  int send_reset_fd_ = -1;
  std::unique_ptr<BpfStatsGuard> stats_;
  bool stats_wanted_ = false;    // --no-bpf-stats not given
  bool stats_sampled_ = false;   // they were on at some point
  uint64_t sampled_events_ = 0;  // records delivered while they were on
  bool tw_timers_on_ = false;
  int ncpus_ = 1;
};

}  // namespace tcpscope
