#include "tcpscope/recorder.hpp"

#include <fmt/format.h>

namespace tcpscope {

TriggerMonitor::TriggerMonitor(TriggerConfig cfg) : cfg_(cfg) {
  pipeline_.add_default_analyzers();
  tw_ = pipeline_.find<TimeWaitAnalyzer>();
  resets_ = pipeline_.find<ResetAnalyzer>();
  cw_ = pipeline_.find<CloseWaitAnalyzer>();
}

size_t TriggerMonitor::time_wait_open() const { return tw_ ? tw_->open_count() : 0; }
size_t TriggerMonitor::close_wait_stuck() const { return cw_ ? cw_->stuck_open_count() : 0; }
size_t TriggerMonitor::late_fin_resets() const { return resets_ ? resets_->late_fin_count() : 0; }

std::optional<std::string> TriggerMonitor::observe(const Event& ev) {
  if (ev.type == TCPSCOPE_EV_END) return std::nullopt;  // the recorder keeps going
  pipeline_.process(ev);
  if (cfg_.late_fin_rst) {
    const size_t n = late_fin_resets();
    if (n > late_seen_) {
      late_seen_ = n;
      return std::string("late-FIN RST");
    }
  }
  if (cfg_.time_wait_over) {
    const size_t n = time_wait_open();
    if (n <= cfg_.time_wait_over) {
      tw_fired_ = false;  // re-arm
    } else if (!tw_fired_) {
      tw_fired_ = true;
      return fmt::format("TIME_WAIT count {} over {}", n, cfg_.time_wait_over);
    }
  }
  if (cfg_.close_wait_stuck) {
    const size_t n = close_wait_stuck();
    if (n < cfg_.close_wait_stuck) {
      cw_fired_ = false;
    } else if (!cw_fired_) {
      cw_fired_ = true;
      return fmt::format("{} CLOSE_WAIT stuck over {:g} s", n,
                         static_cast<double>(cw_->threshold_ns()) / 1e9);
    }
  }
  return std::nullopt;
}

}  // namespace tcpscope
