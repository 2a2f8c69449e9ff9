#include "tcpscope/tracer.hpp"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <linux/nsfs.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "tcpscope.skel.h"
#include "tcpscope/format.hpp"

namespace tcpscope {

void SkelDeleter::operator()(tcpscope_bpf* s) const { tcpscope_bpf__destroy(s); }
void LinkDeleter::operator()(bpf_link* l) const { bpf_link__destroy(l); }

namespace {

// Bytes one event takes in the ring: the record and its 8-byte header.
constexpr uint64_t kRingRecordBytes = sizeof(tcpscope_event) + 8;

bool all_digits(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

std::string errno_text(int err) { return std::strerror(err < 0 ? -err : err); }

// Out of open files or memory: no attach method would do better.
bool is_host_limit(int err) { return err == EMFILE || err == ENFILE || err == ENOMEM; }

// A failed step of open, load or attach, with the fix for a host limit; the
// errno goes with it (start() tries no other attach method after one that
// would only repeat).
Error step_error(const std::string& what, int err) {
  std::string msg = what + ": " + errno_text(err);
  if (err == EMFILE || err == ENFILE) msg += " (raise the open-files limit: ulimit -n)";
  return Error{std::move(msg), 1, err};
}
}  // namespace

Result<uint32_t> resolve_netns(const std::string& spec) {
  if (all_digits(spec)) {
    const unsigned long v = std::stoul(spec);
    if (v == 0 || v > UINT32_MAX) return Error{"--netns " + spec + ": not a namespace inode", 2};
    return static_cast<uint32_t>(v);
  }
  constexpr const char* kGive = " (give /run/netns/NAME, /proc/PID/ns/net or an inode number)";
  const UniqueFd fd(open(spec.c_str(), O_RDONLY | O_CLOEXEC));
  struct stat st {};
  if (!fd.valid() || fstat(fd.get(), &st) != 0)
    return Error{"--netns " + spec + ": " + errno_text(errno) + kGive, 2};
  // Any file has an inode: only a namespace file's is a namespace's.
  const int type = ioctl(fd.get(), NS_GET_NSTYPE);
  if (type != CLONE_NEWNET)
    return Error{"--netns " + spec + ": not a network namespace" + kGive, 2};
  return static_cast<uint32_t>(st.st_ino);
}

Result<std::pair<uint64_t, int32_t>> resolve_cgroup(const std::string& path) {
  char real[PATH_MAX];
  if (!realpath(path.c_str(), real)) return Error{"--cgroup " + path + ": " + errno_text(errno), 2};
  struct statfs fs {};
  constexpr long kCgroup2Magic = 0x63677270;
  if (statfs(real, &fs) != 0 || fs.f_type != kCgroup2Magic)
    return Error{
        "--cgroup " + path + ": not a cgroup v2 directory (e.g. /sys/fs/cgroup/system.slice)", 2};
  struct stat st {};
  if (stat(real, &st) != 0 || !S_ISDIR(st.st_mode))
    return Error{"--cgroup " + path + ": not a directory", 2};
  // Depth below the cgroup2 root: walk up while the parent is still cgroup2.
  int32_t level = 0;
  std::string p = real;
  while (true) {
    const auto slash = p.find_last_of('/');
    if (slash == std::string::npos || slash == 0) break;
    std::string parent = p.substr(0, slash);
    struct statfs pfs {};
    if (statfs(parent.c_str(), &pfs) != 0 || pfs.f_type != kCgroup2Magic) break;
    ++level;
    p = parent;
  }
  return std::pair<uint64_t, int32_t>{st.st_ino, level};
}

int run_in_netns(const std::string& netns_path, const std::function<void()>& fn) {
  if (netns_path.empty()) {
    fn();
    return 0;
  }
  int err = 0;
  std::thread([&] {
    const int ns = open(netns_path.c_str(), O_RDONLY | O_CLOEXEC);
    if (ns < 0 || setns(ns, CLONE_NEWNET) != 0)
      err = errno;
    else
      fn();
    if (ns >= 0) close(ns);
  }).join();
  return err;
}

std::optional<Error> check_privileges() {
  std::ifstream status("/proc/self/status");
  std::string line;
  uint64_t eff = 0;
  while (std::getline(status, line)) {
    if (line.rfind("CapEff:", 0) == 0) {
      std::istringstream in(line.substr(7));
      in >> std::hex >> eff;
    }
  }
  constexpr int kCapSysAdmin = 21, kCapPerfmon = 38, kCapBpf = 39;
  const bool admin = eff & (1ull << kCapSysAdmin);
  const bool bpf_perfmon = (eff & (1ull << kCapBpf)) && (eff & (1ull << kCapPerfmon));
  if (admin || bpf_perfmon) return std::nullopt;
  return Error{
      "permission denied: tracing needs root or CAP_BPF and CAP_PERFMON "
      "(run with sudo, or setcap cap_bpf,cap_perfmon+ep build/tcpscope)",
      1};
}

namespace {

struct ProgSet {
  bpf_program* set_state;
  bpf_program* retransmit;
  bpf_program* send_reset;
  bpf_program* receive_reset;
  bpf_program* destroy;
  bpf_program* recv;      // optional
  bpf_program* send;      // optional
  bpf_program* tw_start;  // optional, with tw_cancel and tw_expire
  bpf_program* tw_cancel;
  bpf_program* tw_expire;
  // Twins doing the runs the kernel skips of set_state and destroy (see
  // "nest" in the BPF code). None for classic tracepoints: there one
  // program running blocks every other on the CPU.
  bpf_program* set_state_nested;
  bpf_program* destroy_nested;
};

ProgSet progs_for(tcpscope_bpf* s, AttachMode mode) {
  auto& p = s->progs;
  switch (mode) {
    case AttachMode::TpBtf:
      return {p.set_state_btf,     p.retransmit_btf,       p.send_reset_btf,
              p.receive_reset_btf, p.destroy_btf,          p.recv_btf,
              p.send_btf,          p.tw_start_btf,         p.tw_cancel_btf,
              p.tw_expire_btf,     p.set_state_nested_btf, p.destroy_nested_btf};
    case AttachMode::RawTp:
      return {p.set_state_raw,     p.retransmit_raw,       p.send_reset_raw,
              p.receive_reset_raw, p.destroy_raw,          p.recv_raw,
              p.send_raw,          p.tw_start_raw,         p.tw_cancel_raw,
              p.tw_expire_raw,     p.set_state_nested_raw, p.destroy_nested_raw};
    case AttachMode::Tracepoint:
      return {p.set_state_tp, p.retransmit_tp, p.send_reset_tp, p.receive_reset_tp,
              p.destroy_tp,   nullptr,         nullptr,         p.tw_start_tp,
              p.tw_cancel_tp, p.tw_expire_tp,  nullptr,         nullptr};
  }
  return {};
}

}  // namespace

Result<std::unique_ptr<BpfTracer>> BpfTracer::try_mode(AttachMode mode, const TraceConfig& cfg,
                                                       KernelFeatures& features, bool with_iter) {
  std::unique_ptr<BpfTracer> t(new BpfTracer());
  t->mode_ = mode;
  t->ncpus_ = libbpf_num_possible_cpus();
  if (t->ncpus_ <= 0) t->ncpus_ = 1;

  // 1. open
  t->skel_.reset(tcpscope_bpf__open());
  if (!t->skel_) return step_error("cannot open BPF object", errno);
  tcpscope_bpf* s = t->skel_.get();

  // 2. configure: filters into rodata, map sizes, which programs load.
  const Filters& f = cfg.filters;
  s->rodata->cfg_netns = f.netns;
  s->rodata->cfg_cgroup = f.cgroup_id;
  s->rodata->cfg_cgroup_level = f.cgroup_level;
  s->rodata->cfg_pid = f.pid;
  s->rodata->cfg_port = f.port;
  s->rodata->cfg_lport = f.lport;
  s->rodata->cfg_rport = f.rport;
  s->rodata->cfg_family = f.family;
  s->rodata->cfg_private_ids = mode != AttachMode::TpBtf;
  // The socket table keeps private ids, and owners for --pid to match in
  // the kernel; otherwise user space keeps owners (cheaper per event).
  const bool sock_table = mode != AttachMode::TpBtf || f.pid != 0;
  s->rodata->cfg_sock_table = sock_table;
  // (Classic tracepoints have no send/recv programs.)
  const bool io_owner = cfg.io_owner && features.io_tracepoints() && mode != AttachMode::Tracepoint;
  s->rodata->cfg_io_owner = io_owner;
  // tw_ids serves private ids only: otherwise no room is set aside for it.
  if (mode == AttachMode::TpBtf) {
    if (int err = bpf_map__set_max_entries(s->maps.tw_ids, 1))
      return Error{"tw id table size: " + errno_text(err)};
  }
  // A wake-up per wakeup_bytes of records (never past an eighth of the
  // ring), counted per CPU (a shared count would bounce between CPUs): all
  // CPUs together queue at most that much before one of them wakes the
  // consumer.
  if (cfg.wakeup_bytes) {
    const uint64_t batch = std::min<uint64_t>(cfg.wakeup_bytes, cfg.ring_bytes / 8);
    const int cpus = std::max(1, libbpf_num_possible_cpus());
    const uint64_t per_cpu = batch / kRingRecordBytes / static_cast<uint64_t>(cpus);
    s->rodata->cfg_wakeup_every = static_cast<uint32_t>(std::max<uint64_t>(1, per_cpu));
  }
  if (int err = bpf_map__set_max_entries(s->maps.events, cfg.ring_bytes))
    return Error{"ring buffer size " + std::to_string(cfg.ring_bytes) + ": " + errno_text(err)};
  // Unused maps get one entry (preallocated maps take their whole size).
  if (int err = bpf_map__set_max_entries(s->maps.socks, sock_table ? cfg.max_sockets : 1))
    return Error{"socket table size: " + errno_text(err)};
  if (int err = bpf_map__set_max_entries(s->maps.io_wanted,
                                         !sock_table && io_owner ? cfg.max_sockets : 1))
    return Error{"accepted socket table size: " + errno_text(err)};

  bpf_program* prog;
  bpf_object__for_each_program(prog, s->obj) bpf_program__set_autoload(prog, false);
  const ProgSet set = progs_for(s, mode);
  std::vector<bpf_program*> wanted = {set.set_state, set.retransmit, set.send_reset,
                                      set.receive_reset};
  // tcp_destroy_sock only removes sockets from the table.
  if (sock_table) wanted.push_back(set.destroy);
  if (io_owner && set.recv) {
    wanted.push_back(set.recv);
    wanted.push_back(set.send);
  }
  if (cfg.tw_timers && features.tw_timers()) {
    wanted.insert(wanted.end(), {set.tw_start, set.tw_cancel, set.tw_expire});
    s->rodata->cfg_tw_timers = true;
    t->tw_timers_on_ = true;
  }
  // Programs whose skipped runs lose events: not destroy (it makes none)
  // nor the twins (a twin's skipped run is the main one's, or no work).
  std::vector<bpf_program*> lossy(wanted.begin(), wanted.end());
  std::erase(lossy, set.destroy);
  // Twins last: a tracepoint calls its programs in the order they were
  // attached, and a twin must run after its main program.
  if (set.set_state_nested) {
    wanted.push_back(set.set_state_nested);
    if (sock_table) wanted.push_back(set.destroy_nested);
  }
  for (bpf_program* p : wanted) bpf_program__set_autoload(p, true);
  if (with_iter) bpf_program__set_autoload(s->progs.sock_iter, true);

  // 3. load
  if (int err = tcpscope_bpf__load(s)) {
    err = -err;
    if (err == EPERM || err == EACCES)
      return Error{std::string("permission denied loading BPF programs (") +
                       attach_mode_name(mode) + "): run as root or with CAP_BPF and CAP_PERFMON",
                   1, err};
    if (is_host_limit(err))
      return step_error(std::string("loading ") + attach_mode_name(mode) + " programs failed", err);
    return Error{std::string("loading ") + attach_mode_name(mode) +
                     " programs failed: " + errno_text(err) + " (--verbose shows the verifier log)",
                 1, err};
  }

  // 4. attach, each checked
  for (bpf_program* p : wanted) {
    bpf_link* link = bpf_program__attach(p);
    if (!link)
      return step_error(std::string("attaching ") + bpf_program__name(p) + " failed", errno);
    t->links_.emplace_back(link);
    t->programs_.push_back(bpf_program__name(p));
    t->prog_fds_.push_back(bpf_program__fd(p));
  }
  for (bpf_program* p : lossy) {
    t->lossy_prog_fds_.push_back(bpf_program__fd(p));
    t->lossy_prog_names_.push_back(bpf_program__name(p));
  }
  t->send_reset_fd_ = bpf_program__fd(set.send_reset);

  if (with_iter) {
    bpf_link* link = bpf_program__attach_iter(s->progs.sock_iter, nullptr);
    if (!link) return step_error("attaching the iter/tcp program failed", errno);
    t->iter_link_.reset(link);
    t->netns_path_ = cfg.netns_path;
    t->programs_.push_back(bpf_program__name(s->progs.sock_iter));
    t->prog_fds_.push_back(bpf_program__fd(s->progs.sock_iter));
  }

  // 5. ring buffer consumer
  auto ring = RingReader::open(bpf_map__fd(s->maps.events), bpf_map__max_entries(s->maps.events));
  if (!ring) return Error{"cannot set up the ring buffer consumer: " + ring.error().message};
  t->ring_ = std::move(ring.value());
  t->wakeup_batch_bytes_ =
      uint64_t{s->rodata->cfg_wakeup_every} * kRingRecordBytes * static_cast<uint64_t>(t->ncpus_);
  return t;
}

Result<std::unique_ptr<BpfTracer>> BpfTracer::start(const TraceConfig& cfg,
                                                    KernelFeatures& features) {
  if (!features.btf())
    return Error{
        "kernel BTF not found (/sys/kernel/btf/vmlinux): tcpscope needs a kernel "
        "built with CONFIG_DEBUG_INFO_BTF=y"};
  if (!features.ringbuf())
    return Error{"the kernel has no BPF ring buffer (needs Linux 5.8 or later)"};

  std::vector<AttachMode> modes(std::begin(kAttachOrder), std::end(kAttachOrder));
  if (cfg.force_mode) modes = {*cfg.force_mode};

  std::vector<std::string> fallbacks;
  Error last{"no attach method available"};
  for (AttachMode mode : modes) {
    if (!features.supports(mode)) {
      last = Error{std::string(attach_mode_name(mode)) + " is not supported by this kernel"};
      fallbacks.push_back(last.message);
      spdlog::debug("{}", last.message);
      continue;
    }
    const bool with_iter = cfg.sock_iter && features.iter_tcp();
    auto r = try_mode(mode, cfg, features, with_iter);
    if (!r.ok() && with_iter) {
      // The iterator is an extra: keep tracing without it.
      fallbacks.push_back(std::string(attach_mode_name(mode)) +
                          " with iter/tcp: " + r.error().message);
      r = try_mode(mode, cfg, features, false);
    }
    if (r.ok()) {
      r.value()->fallbacks_ = fallbacks;
      r.value()->stats_wanted_ = cfg.bpf_stats;
      return r;
    }
    last = r.error();
    fallbacks.push_back(std::string(attach_mode_name(mode)) + ": " + last.message);
    spdlog::debug("{}", fallbacks.back());
    // A load refused for want of privileges, and the host's limits, would
    // fail another flavour too (an attach refused may not: fentry-like
    // restrictions leave raw_tp alone).
    if (is_host_limit(last.sys_errno) || last.message.rfind("permission denied", 0) == 0) break;
  }
  return last;
}

void BpfTracer::handle(void* ctx, const void* data, size_t size) {
  auto* self = static_cast<BpfTracer*>(ctx);
  if (size != sizeof(Event)) {
    ++self->malformed_;
    return;
  }
  ++self->events_;
  if (self->stats_) ++self->sampled_events_;
  // Ring buffer records are 8-byte aligned: the cast is safe.
  self->on_event_(*static_cast<const Event*>(data));
}

Result<size_t> BpfTracer::read_sockets(tcpscope_iter_pass pass, std::vector<SockRecord>& out,
                                       const std::function<void()>& between_reads) {
  out.clear();
  return read_sockets(
      pass, [&out](const SockRecord& r) { out.push_back(r); }, between_reads);
}

Result<size_t> BpfTracer::read_sockets(tcpscope_iter_pass pass,
                                       const std::function<void(const SockRecord&)>& visit,
                                       const std::function<void()>& between_reads) {
  if (!iter_link_) return Error{"no iter/tcp program"};
  skel_->bss->iter_pass = pass;
  // iter/tcp walks the namespace of the task that creates the iterator:
  // create it from a thread that joined the traced namespace.
  int fd = -1, err = 0;
  if (const int ns_err = run_in_netns(netns_path_, [&] {
        fd = bpf_iter_create(bpf_link__fd(iter_link_.get()));
        err = errno;
      }))
    err = ns_err;
  if (fd < 0) return Error{"bpf_iter_create: " + errno_text(err)};
  if (iter_buf_.size() < 64 * sizeof(SockRecord)) iter_buf_.resize(64 * sizeof(SockRecord));
  size_t have = 0, count = 0;
  last_pass_reads_ = 0;
  while (true) {
    const ssize_t n = read(fd, iter_buf_.data() + have, iter_buf_.size() - have);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      close(fd);
      return Error{"reading iter/tcp: " + errno_text(err)};
    }
    if (n == 0) break;
    ++last_pass_reads_;
    have += static_cast<size_t>(n);
    const size_t whole = have / sizeof(SockRecord);
    for (size_t i = 0; i < whole; ++i) {
      SockRecord r;
      std::memcpy(&r, iter_buf_.data() + i * sizeof(SockRecord), sizeof(r));
      if (r.state == 0) continue;  // progress: it only ends a long read early
      visit(r);
      ++count;
    }
    if (between_reads) {
      consume();
      between_reads();
    }
    const size_t rest = have - whole * sizeof(SockRecord);
    std::memmove(iter_buf_.data(), iter_buf_.data() + whole * sizeof(SockRecord), rest);
    have = rest;
  }
  close(fd);
  return count;
}

namespace {
constexpr const char* kStatsSysctl = "/proc/sys/kernel/bpf_stats_enabled";

bool write_sysctl(const char* path, const char* value) {
  const int fd = open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = write(fd, value, std::strlen(value)) == static_cast<ssize_t>(std::strlen(value));
  close(fd);
  return ok;
}
}  // namespace

BpfStatsGuard::BpfStatsGuard() {
  fd_ = bpf_enable_stats(BPF_STATS_RUN_TIME);
  if (fd_ >= 0) {
    on_ = true;
    return;
  }
  char cur = '0';
  const int fd = open(kStatsSysctl, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  const bool got = read(fd, &cur, 1) == 1;
  close(fd);
  if (!got) return;
  if (cur != '0') {
    on_ = true;  // already on: leave it as it is
    return;
  }
  on_ = restore_sysctl_ = write_sysctl(kStatsSysctl, "1");
  if (!on_) spdlog::debug("BPF run-time statistics unavailable: {}", errno_text(errno));
}

BpfStatsGuard::~BpfStatsGuard() {
  if (fd_ >= 0) close(fd_);
  if (restore_sysctl_) write_sysctl(kStatsSysctl, "0");
}

void BpfTracer::sample_stats(bool on) {
  if (!stats_wanted_ || on == static_cast<bool>(stats_)) return;
  if (on) {
    stats_ = std::make_unique<BpfStatsGuard>();
    stats_sampled_ |= stats_->on();
  } else {
    stats_.reset();
  }
}

namespace {
// The kernel's bpf_prog_info of a program; nullopt if it cannot be read.
std::optional<bpf_prog_info> prog_info(int fd) {
  bpf_prog_info info{};
  uint32_t len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) return std::nullopt;
  return info;
}

// Calls fn with the bpf_prog_info of each program (those whose info cannot
// be read are left out).
template <typename Fn>
void for_each_prog_info(const std::vector<int>& fds, Fn&& fn) {
  for (int fd : fds)
    if (const auto info = prog_info(fd)) fn(*info);
}
}  // namespace

BpfRunStats BpfTracer::run_stats() const {
  BpfRunStats s;
  if (!stats_sampled_) return s;
  // run_cnt/run_time_ns only grow while the statistics are on.
  s.enabled = true;
  s.sampled_events = sampled_events_;
  for_each_prog_info(prog_fds_, [&s](const bpf_prog_info& info) {
    s.runs += info.run_cnt;
    s.run_ns += info.run_time_ns;
  });
  return s;
}

uint64_t BpfTracer::lost_resets_counted() const {
  uint64_t missed = 0;
  for_each_prog_info({send_reset_fd_},
                     [&missed](const bpf_prog_info& info) { missed += info.recursion_misses; });
  return missed + drops(TCPSCOPE_DROP_RESET_RINGBUF);
}

uint64_t BpfTracer::skipped_runs() const {
  uint64_t missed = 0;
  for_each_prog_info(lossy_prog_fds_,
                     [&missed](const bpf_prog_info& info) { missed += info.recursion_misses; });
  // Read after the misses: every run a twin did was a miss first, so this
  // errs low (a twin's run of a later miss), never high.
  const uint64_t done_by_twin = drops(TCPSCOPE_NESTED_STATE);
  return missed > done_by_twin ? missed - done_by_twin : 0;
}

std::string BpfTracer::skipped_runs_by_program() const {
  std::string out;
  for (size_t i = 0; i < lossy_prog_fds_.size(); ++i) {
    const auto info = prog_info(lossy_prog_fds_[i]);
    if (!info || !info->recursion_misses) continue;
    out += fmt::format("{}{} {}", out.empty() ? "" : ", ", lossy_prog_names_[i],
                       static_cast<uint64_t>(info->recursion_misses));
  }
  if (!out.empty()) out += fmt::format(" (the twin did {})", drops(TCPSCOPE_NESTED_STATE));
  return out;
}

int BpfTracer::epoll_fd() const { return ring_->epoll_fd(); }

int BpfTracer::consume() {
  // From one read's start to the next: the records the ring must hold came
  // in meanwhile, while the last batch was processed or the consumer waited.
  const uint64_t now = boottime_now_ns(), peak = ring_->peak_pending_bytes();
  const uint64_t n = ring_->drain(&BpfTracer::handle, this);
  if (ring_->peak_pending_bytes() > peak && last_read_ns_) peak_read_gap_ns_ = now - last_read_ns_;
  last_read_ns_ = now;
  return static_cast<int>(std::min<uint64_t>(n, INT_MAX));
}

void BpfTracer::wait_ended() {
  // Only this reader moves the consumer position: nothing left meanwhile.
  if (wakeup_batch_bytes_ && ring_->pending_bytes() > wait_pending_ + 2 * wakeup_batch_bytes_)
    ++late_wakeups_;
}

double BpfTracer::ring_peak_fill() const {
  return static_cast<double>(ring_->peak_pending_bytes()) /
         static_cast<double>(ring_->size_bytes());
}

uint64_t BpfTracer::drops(int kind) const {
  std::vector<uint64_t> values(static_cast<size_t>(ncpus_), 0);
  uint32_t key = static_cast<uint32_t>(kind);
  if (bpf_map_lookup_elem(bpf_map__fd(skel_->maps.drops), &key, values.data()) != 0) return 0;
  uint64_t sum = 0;
  for (uint64_t v : values) sum += v;
  return sum;
}

}  // namespace tcpscope
