// A live tracing session: the BPF tracer plus the consumer loop. Every record
// (kernel events and the LOST/END records made here) goes to one consumer,
// which is the analysis pipeline for `trace` and the capture writer for
// `record`.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tcpscope/event.hpp"
#include "tcpscope/features.hpp"
#include "tcpscope/result.hpp"
#include "tcpscope/tracer.hpp"
#include "tcpscope/tracker.hpp"

namespace tcpscope {

// Blocks SIGUSR1 from now on: one sent while the tracer starts stays
// pending for the session's signalfd instead of killing the process.
void hold_sigusr1();

class LiveSession {
 public:
  using Consumer = std::function<void(const Event&)>;

  // Checks privileges, probes the kernel, loads and attaches.
  static Result<std::unique_ptr<LiveSession>> start(TraceConfig cfg,
                                                    const std::vector<std::string>& disabled);

  BpfTracer& tracer() { return *tracer_; }
  KernelFeatures& features() { return features_; }
  const TraceConfig& config() const { return cfg_; }
  uint64_t start_ns() const { return start_ns_; }
  // CLOCK_REALTIME - CLOCK_BOOTTIME measured once at start: live output and
  // captures both use it, so `report` prints the same times as live.
  int64_t boot_offset_ns() const { return boot_offset_ns_; }
  // Called on the loop thread for each SIGUSR1 (flight recorder dump); when
  // unset, SIGUSR1 prints the --stats line so far on stderr.
  void on_usr1(std::function<void()> fn) { on_usr1_ = std::move(fn); }
  // The connections the audit checks against the kernel's socket table
  // (--audit-interval): those gone without a CLOSE get a VANISHED record.
  // Unset (a bare recording has no tracker), there is no audit.
  void audit(const Tracker* tracker) { audited_ = tracker; }

  // Runs until SIGINT/SIGTERM, until duration_s (if > 0) or until
  // should_stop() says so. on_batch runs after every drained batch (flush
  // output there). The last record passed to consume is TCPSCOPE_EV_END.
  // Returns 0, or 1 after a runtime error (already printed).
  int run(double duration_s, const Consumer& consume, const std::function<void()>& on_batch,
          const std::function<bool()>& should_stop = {});

 private:
  LiveSession() = default;

  KernelFeatures features_;
  TraceConfig cfg_;
  std::unique_ptr<BpfTracer> tracer_;
  uint64_t start_ns_ = 0;
  int64_t boot_offset_ns_ = 0;
  std::function<void()> on_usr1_;
  const Tracker* audited_ = nullptr;
};

}  // namespace tcpscope
