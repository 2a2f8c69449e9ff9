// Live side of the CLOSE_WAIT analysis: finds which processes hold the
// sockets that have been in CLOSE_WAIT for (nearly) the threshold, the way
// `ss -p` does (socket inode -> /proc/PID/fd/N -> "socket:[INODE]"), and
// turns the answer into PROC/PROC_TEXT/HOLDER/HOLDER_SCAN records, so the
// pure CloseWaitAnalyzer sees exactly the same in a live run and a replay.
//
// Cost is bounded: nothing runs while no socket needs resolving; a round
// (one iter/tcp pass for the inodes, one walk over /proc/*/fd) only starts
// for sockets due, at most once per min_round_gap; the /proc walk is cut in
// steps of at most step_fds readlinks and step_ns, one step per call.
#pragma once

#include <dirent.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tcpscope/closewait.hpp"
#include "tcpscope/event.hpp"
#include "tcpscope/result.hpp"

namespace tcpscope {

// Reads up to max bytes of a small /proc file; empty on error.
std::string read_file(const std::string& path, size_t max);

struct HolderResolverConfig {
  uint64_t threshold_ns = 60'000'000'000ull;
  // Resolve this long before the threshold, so the notice has its holders.
  uint64_t lead_ns = 1'000'000'000ull;
  // Re-resolve a socket still in CLOSE_WAIT this often (holders change:
  // fork, fd passing, exit).
  uint64_t refresh_ns = 60'000'000'000ull;
  uint64_t min_round_gap_ns = 200'000'000ull;
  uint32_t step_fds = 16384;
  uint64_t step_ns = 20'000'000ull;
  size_t max_tracked = 1u << 20;  // CLOSE_WAIT sockets watched at once
  bool resolve = true;            // false: only track (for TICKs)
  std::string proc_root = "/proc";
  std::string cgroup_root = "/sys/fs/cgroup";

  // The usual settings for a threshold: lead a quarter of it, at most 1 s.
  static HolderResolverConfig for_threshold(uint64_t threshold_ns);
};

struct DirCloser {
  void operator()(DIR* d) const { closedir(d); }
};
using DirPtr = std::unique_ptr<DIR, DirCloser>;

class HolderResolver {
 public:
  using Emit = std::function<void(const Event&)>;
  // One pass of iter/tcp over the CLOSE_WAIT sockets
  // (BpfTracer::read_sockets(TCPSCOPE_ITER_CLOSE_WAIT)); others are skipped.
  using ReadSockets = std::function<Result<size_t>(std::vector<SockRecord>&)>;

  explicit HolderResolver(HolderResolverConfig cfg) : cfg_(std::move(cfg)) {}

  // Every record of the stream, in order. O(1), no allocation in steady state.
  void observe(const Event& e);
  // CLOSE_WAIT sockets are being watched (time must advance: TICKs).
  bool tracking() const { return !cw_.empty(); }
  // A round is under way (call step() again soon).
  bool busy() const { return round_.active; }
  // Does at most one bounded slice of work; emits records when a round ends.
  void step(uint64_t now_ns, const ReadSockets& read, const Emit& emit);
  uint64_t overflow() const { return overflow_; }

 private:
  struct Found {
    uint64_t ino;
    uint32_t pid;
    int32_t fd;
  };
  struct Round {
    bool active = false;
    uint64_t start_ns = 0, iter_ns = 0, proc_ns = 0, max_step_ns = 0;
    uint64_t fds = 0, procs = 0, steps = 0;
    std::vector<SockRecord> socks;  // the sockets searched, by inode
    std::vector<uint64_t> inodes;   // sorted
    std::vector<Found> found;
    DirPtr proc_dir, fd_dir;
    uint32_t pid = 0;  // of fd_dir
  };

  bool start_round(uint64_t now_ns, const ReadSockets& read);
  bool walk(uint64_t deadline_ns);  // true when the walk is complete
  void end_round(const Emit& emit);
  void emit_proc(uint32_t pid, const Emit& emit);

  HolderResolverConfig cfg_;
  FlatMap<uint64_t> cw_;  // conn -> when to resolve it next (boot ns)
  uint64_t overflow_ = 0;
  uint64_t next_round_ns_ = 0;
  Round round_;
  std::vector<SockRecord> records_;  // iter/tcp pass storage, reused
  std::vector<uint64_t> due_;
};

}  // namespace tcpscope
