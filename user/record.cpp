#include "record.hpp"

#include <fmt/format.h>
#include <signal.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "live.hpp"
#include "tcpscope/capture.hpp"
#include "tcpscope/output.hpp"
#include "tcpscope/recorder.hpp"

namespace tcpscope {

void setup_pipeline(Pipeline& pipeline, const Options& o) { pipeline.add_default_analyzers(o.top); }

namespace {

void fail(const Error& e) { fmt::print(stderr, "tcpscope: {}\n", e.message); }

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return {};
  return buf;
}

std::string kernel_release() {
  utsname u{};
  return uname(&u) == 0 ? u.release : "";
}

// The options a capture was recorded with, for its header.
std::vector<std::pair<std::string, std::string>> recorded_options(const Options& o,
                                                                  LiveSession& s) {
  std::vector<std::pair<std::string, std::string>> v;
  const Filters& f = s.config().filters;
  auto num = [&](const char* k, uint64_t x) {
    if (x) v.emplace_back(k, std::to_string(x));
  };
  num("netns", f.netns);
  num("cgroup", f.cgroup_id);
  num("pid", f.pid);
  num("port", f.port);
  num("lport", f.lport);
  num("rport", f.rport);
  num("family", f.family);
  v.emplace_back("compress", o.record.compress ? "zstd" : "none");
  num("max_size", o.record.max_size);
  num("max_files", o.record.max_files);
  num("ring", o.record.ring_bytes);
  if (o.record.ring_bytes) {
    if (o.record.trigger_late_fin) v.emplace_back("trigger_late_fin", "1");
    num("trigger_close_wait", o.record.trigger_close_wait);
    num("trigger_time_wait", o.record.trigger_time_wait);
  }
  if (o.duration_s > 0) v.emplace_back("duration", fmt::format("{}", o.duration_s));
  v.emplace_back("attach", attach_mode_name(s.tracer().mode()));
  return v;
}

// Optional live JSON Lines while recording (record --json): exactly what
// `trace --json` would print, so it can be compared with `report --json`.
class LiveJson {
 public:
  LiveJson(const Options& o, LiveSession& s)
      : out_(STDOUT_FILENO), time_(s.boot_offset_ns()), sink_(out_, time_) {
    setup_pipeline(pipeline_, o);
    pipeline_.add_sink(&sink_);
    sink_.write_start(s.start_ns(), [&](JsonWriter& w) {
      w.member("version", TCPSCOPE_VERSION);
      w.member("attach", attach_mode_name(s.tracer().mode()));
      w.member("capture", o.record.output);
      w.member("boot_offset_ns", time_.offset());
    });
  }
  void process(const Event& ev) { pipeline_.process(ev); }
  const Tracker& tracker() const { return pipeline_.tracker(); }
  void flush() { sink_.flush(); }
  bool failed() const { return out_.failed(); }

 private:
  FdWriter out_;
  TimeFormatter time_;
  JsonLinesSink sink_;
  Pipeline pipeline_;
};

int record_continuous(const Options& o, LiveSession& session, capture::CaptureInfo info) {
  const RecordOptions& r = o.record;
  capture::WriterOptions wopt;
  wopt.codec = r.compress ? capture::Codec::Zstd : capture::Codec::None;
  wopt.zstd_level = r.zstd_level;
  wopt.max_size = r.max_size;
  wopt.max_files = r.max_files;
  auto created = capture::CaptureWriter::create(r.output, std::move(info), wopt);
  if (!created) {
    fail(created.error());
    return 1;
  }
  capture::CaptureWriter& writer = **created;
  std::unique_ptr<LiveJson> live;
  if (o.json) live = std::make_unique<LiveJson>(o, session);
  if (live) session.audit(&live->tracker());
  session.on_usr1([&writer] { writer.flush(); });  // SIGUSR1: flush now
  fmt::print(stderr, "tcpscope: recording to {}\n", r.output);

  const int rc = session.run(
      o.duration_s,
      [&](const Event& ev) {
        writer.append(ev);
        if (live) live->process(ev);
      },
      [&] {
        writer.tick(boottime_now_ns());
        if (live) live->flush();
      },
      [&] { return writer.failed() || (live && live->failed()); });
  if (auto err = writer.close()) {
    fail(*err);
    return 1;
  }
  fmt::print(stderr, "tcpscope: recorded {} events to {}{} ({} bytes)\n", writer.records(),
             r.output, writer.part() ? fmt::format(" .. {}", writer.current_path()) : "",
             writer.bytes_written());
  return rc;
}

// Flight recorder: the last ring_bytes of events in memory, written to a new
// file on SIGUSR1, on exit, or trigger_delay after a trigger fires.
class FlightRecorder {
 public:
  FlightRecorder(const Options& o, capture::CaptureInfo info)
      : r_(o.record),
        info_(std::move(info)),
        ring_(o.record.ring_bytes / sizeof(Event)),
        monitor_(TriggerConfig{
            .late_fin_rst = o.record.trigger_late_fin,
            .close_wait_stuck = o.record.trigger_close_wait,
            .time_wait_over = o.record.trigger_time_wait,
        }) {}

  void consume(const Event& ev) {
    if (ev.type == TCPSCOPE_EV_END) return;  // each dump gets its own END
    if (ev.type == TCPSCOPE_EV_CONFIG) config_ = ev;
    ring_.push(ev);
    if (auto reason = monitor_.observe(ev)) arm(*reason, boottime_now_ns());
  }

  // Periodic: a due dump.
  void tick(uint64_t now) {
    if (pending_ && now >= due_) {
      dump(*pending_, now);
      pending_.reset();
      cooldown_until_ = now + static_cast<uint64_t>(r_.trigger_cooldown_s * 1e9);
    }
  }

  // Writes the ring to the next dump file. False on error (printed).
  bool dump(const std::string& reason, uint64_t now) {
    const std::string path = capture::part_path(r_.output, dumps_);
    capture::CaptureInfo info = info_;
    info.trigger = reason;
    info.capture_id = 0;  // each dump is a capture of its own
    capture::WriterOptions wopt;
    wopt.codec = r_.compress ? capture::Codec::Zstd : capture::Codec::None;
    wopt.zstd_level = r_.zstd_level;
    auto created = capture::CaptureWriter::create(path, std::move(info), wopt);
    if (!created) {
      fail(created.error());
      return false;
    }
    capture::CaptureWriter& w = **created;
    // The analysis needs the start-up CONFIG record: keep it in every dump.
    if (ring_.wrapped() && config_) w.append(*config_);
    ring_.for_each([&w](const Event& ev) { w.append(ev); });
    Event end{};
    end.type = TCPSCOPE_EV_END;
    end.ts_ns = now;
    w.append(end);
    if (auto err = w.close()) {
      fail(*err);
      return false;
    }
    fmt::print(stderr, "tcpscope: flight recorder: wrote {} events ({}) to {}\n", ring_.size(),
               reason, path);
    if (r_.max_files && dumps_ >= r_.max_files)
      ::unlink(capture::part_path(r_.output, dumps_ - r_.max_files).c_str());
    ++dumps_;
    return true;
  }

 private:
  void arm(const std::string& reason, uint64_t now) {
    if (pending_ || now < cooldown_until_) return;
    pending_ = reason;
    due_ = now + static_cast<uint64_t>(r_.trigger_delay_s * 1e9);
  }

  const RecordOptions& r_;
  capture::CaptureInfo info_;
  EventRing ring_;
  TriggerMonitor monitor_;
  std::optional<Event> config_;
  std::optional<std::string> pending_;
  uint64_t due_ = 0, cooldown_until_ = 0;
  uint32_t dumps_ = 0;
};

int record_ring(const Options& o, LiveSession& session, capture::CaptureInfo info) {
  FlightRecorder fr(o, std::move(info));
  std::unique_ptr<LiveJson> live;
  if (o.json) live = std::make_unique<LiveJson>(o, session);
  if (live) session.audit(&live->tracker());
  bool dump_failed = false;
  session.on_usr1([&] { dump_failed |= !fr.dump("SIGUSR1", boottime_now_ns()); });
  fmt::print(stderr, "tcpscope: flight recorder on ({} bytes), dumps to {}\n", o.record.ring_bytes,
             o.record.output);
  const int rc = session.run(
      o.duration_s,
      [&](const Event& ev) {
        fr.consume(ev);
        if (live) live->process(ev);
      },
      [&] {
        fr.tick(boottime_now_ns());
        if (live) live->flush();
      },
      [&] { return live && live->failed(); });
  if (!fr.dump("exit", boottime_now_ns())) return 1;
  return rc;
}

}  // namespace

int run_record(const Options& o) {
  signal(SIGPIPE, SIG_IGN);
  hold_sigusr1();

  auto started = LiveSession::start(o.trace, o.disabled_features);
  if (!started) {
    fail(started.error());
    return started.error().exit_code;
  }
  LiveSession& session = *started.value();
  capture::CaptureInfo info;
  info.tcpscope_version = TCPSCOPE_VERSION;
  info.host = host_name();
  info.kernel = kernel_release();
  info.boot_offset_ns = session.boot_offset_ns();
  info.start_ns = session.start_ns();
  info.ring_bytes = o.record.ring_bytes;
  info.options = recorded_options(o, session);
  return o.record.ring_bytes ? record_ring(o, session, std::move(info))
                             : record_continuous(o, session, std::move(info));
}

int run_report(const Options& o) {
  signal(SIGPIPE, SIG_IGN);
  auto opened = capture::CaptureReader::open(o.report_file);
  if (!opened) {
    fail(opened.error());
    return 1;
  }
  capture::CaptureReader& reader = **opened;
  const capture::CaptureInfo& info = reader.info();

  TimeFormatter time(info.boot_offset_ns);  // the offset of the live run
  FdWriter out(STDOUT_FILENO);
  Pipeline pipeline;
  setup_pipeline(pipeline, o);
  JsonLinesSink json(out, time);
  TableSink table(out, time, TextStyle{o.top});
  Sink& sink = o.json ? static_cast<Sink&>(json) : static_cast<Sink&>(table);
  pipeline.add_sink(&sink);
  if (o.json) {
    json.write_start(info.start_ns, [&](JsonWriter& w) {
      w.member("version", TCPSCOPE_VERSION);
      w.member("capture", o.report_file);
      w.member("recorded_by", info.tcpscope_version);
      w.member("host", info.host);
      w.member("kernel", info.kernel);
      w.member("mode", info.ring_bytes ? "flight_recorder" : "continuous");
      if (!info.trigger.empty()) w.member("trigger", info.trigger);
      w.key("options");
      w.begin_object();
      for (const auto& [k, v] : info.options) w.member(k, v);
      w.end_object();
      w.member("boot_offset_ns", time.offset());
    });
  } else {
    table.write_header();
  }

  Event ev;
  while (reader.next(ev)) {
    pipeline.process(ev);
    if (out.failed()) break;
  }
  pipeline.finish(0);  // no END record (recorder killed): end at the last event
  sink.flush();
  if (out.failed() && out.error() != EPIPE) {
    fail(Error{std::string("writing output: ") + std::strerror(out.error())});
    return 1;
  }
  const capture::ReadStatus& st = reader.status();
  switch (st.kind) {
    case capture::ReadStatus::Kind::Clean:
      return 0;
    case capture::ReadStatus::Kind::NoEnd:
    case capture::ReadStatus::Kind::Truncated:
      // What a kill -9 or a full disk leaves: the report above is valid.
      fmt::print(stderr, "tcpscope: warning: {}\n", st.message());
      return 0;
    case capture::ReadStatus::Kind::Corrupt:
      fmt::print(stderr, "tcpscope: {}\n", st.message());
      return 1;
  }
  return 0;
}

}  // namespace tcpscope
