// Output sinks: the human table and JSON Lines. Both write into one buffer
// that goes out in large chunks (at 64 KiB or when the consumer loop calls
// flush), so the hot path never does a system call per event.
#pragma once

#include <cstdio>
#include <functional>
#include <memory>

#include <fmt/format.h>

#include "tcpscope/format.hpp"
#include "tcpscope/json.hpp"
#include "tcpscope/pipeline.hpp"

namespace tcpscope {

// Buffered writer to a file descriptor. A write error (EPIPE, disk full) is
// remembered, not thrown: the caller checks failed() and stops cleanly.
class FdWriter {
 public:
  explicit FdWriter(int fd, size_t chunk = 64 * 1024) : fd_(fd), chunk_(chunk) {}
  ~FdWriter() { flush(); }
  FdWriter(const FdWriter&) = delete;
  FdWriter& operator=(const FdWriter&) = delete;

  fmt::memory_buffer& buf() { return buf_; }
  void maybe_flush() {
    if (buf_.size() >= chunk_) flush();
  }
  void flush();
  bool failed() const { return error_ != 0; }
  int error() const { return error_; }

 private:
  int fd_;
  size_t chunk_;
  fmt::memory_buffer buf_;
  int error_ = 0;
};

class IdentityTextCache;

class JsonLinesSink final : public Sink {
 public:
  JsonLinesSink(FdWriter& out, TimeFormatter& time);
  ~JsonLinesSink() override;

  // {"type":"start","time":...,<members>}
  void write_start(uint64_t ts_ns, const std::function<void(JsonWriter&)>& members);

  void on_event(const Tracked& t) override;
  void on_notice(const Notice& n) override;
  void on_report(const Pipeline& p, uint64_t end_ns) override;
  void flush() override { out_.flush(); }

 private:
  FdWriter& out_;
  TimeFormatter& time_;
  std::unique_ptr<IdentityTextCache> ids_;
};

class TableSink final : public Sink {
 public:
  TableSink(FdWriter& out, TimeFormatter& time, TextStyle style = {});
  ~TableSink() override;

  void write_header();
  void on_event(const Tracked& t) override;
  void on_notice(const Notice& n) override;
  void on_report(const Pipeline& p, uint64_t end_ns) override;
  void flush() override { out_.flush(); }

 private:
  FdWriter& out_;
  TimeFormatter& time_;
  TextStyle style_;
  std::unique_ptr<IdentityTextCache> ids_;
};

// The figures of a STATS record (tcpscope's own overhead).
struct StatsFigures {
  bool bpf = false;  // BPF run times were measured
  double bpf_ns_per_event = 0, bpf_ns_per_run = 0, cpu_ns_per_event = 0;
};
StatsFigures stats_figures(const Event& stats);
// Records delivered while the BPF statistics were on (they are sampled).
uint64_t stats_sampled_events(const Event& stats);

// "FIN|ACK" for TCP header flags; empty for none.
std::string_view tcp_flags_text(uint8_t flags, std::array<char, 32>& buf);

}  // namespace tcpscope
