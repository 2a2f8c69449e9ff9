// The analysis pipeline: events -> Tracker -> Analyzers -> Sinks. It runs on
// event time only, so live and replayed captures give identical reports.
#pragma once

#include <array>
#include <memory>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "tcpscope/event.hpp"
#include "tcpscope/format.hpp"
#include "tcpscope/json.hpp"
#include "tcpscope/tracker.hpp"

namespace tcpscope {

// A derived event (time_wait_end, close_wait_stuck...): a type name, a time,
// the connection it concerns and a few extra fields. Fixed size, no
// allocation; string values must outlive the call.
struct Notice {
  struct Field {
    std::string_view key;
    bool is_text = false;
    int64_t number = 0;
    std::string_view text;
    bool is_bool = false;  // number is 0 or 1
  };
  static constexpr int kMaxFields = 12;

  std::string_view type;
  uint64_t ts_ns = 0;
  const Connection* conn = nullptr;
  std::array<Field, kMaxFields> fields{};
  int nfields = 0;

  Notice& add(std::string_view k, int64_t v) {
    if (nfields < kMaxFields) fields[nfields++] = Field{k, false, v, {}};
    return *this;
  }
  Notice& add(std::string_view k, std::string_view v) {
    if (nfields < kMaxFields) fields[nfields++] = Field{k, true, 0, v};
    return *this;
  }
  Notice& add(std::string_view k, const char* v) { return add(k, std::string_view(v)); }
  Notice& add_bool(std::string_view k, bool v) {
    if (nfields < kMaxFields) fields[nfields++] = Field{k, false, v ? 1 : 0, {}, true};
    return *this;
  }
};

class Sink;

// Where analyzers send derived events.
class NoticeOut {
 public:
  virtual ~NoticeOut() = default;
  virtual void notice(const Notice& n) = 0;
};

struct TextStyle {
  int top = 10;  // rows in "top N" lists
};

class Analyzer {
 public:
  virtual ~Analyzer() = default;
  virtual void on_event(const Tracked&, NoticeOut&) {}
  virtual void on_end(const Connection&, NoticeOut&) {}
  virtual void finish(uint64_t /*end_ns*/, NoticeOut&) {}
  // Writes this analyzer's report members ("key": value) into an open object.
  virtual void write_json(JsonWriter& w, TimeFormatter& time) const = 0;
  // Appends this analyzer's human section of the report.
  virtual void write_text(fmt::memory_buffer& out, TimeFormatter& time,
                          const TextStyle& style) const = 0;
};

class Sink {
 public:
  virtual ~Sink() = default;
  virtual void on_event(const Tracked&) {}
  virtual void on_notice(const Notice&) {}
  virtual void on_report(const class Pipeline&, uint64_t /*end_ns*/) {}
  // Called by the consumer loop after each batch of events.
  virtual void flush() {}
};

class Pipeline : private NoticeOut {
 public:
  explicit Pipeline(TrackerLimits limits = {});

  // The standard analyzers, in report order.
  void add_default_analyzers(int top_n = 10);
  void add_analyzer(std::unique_ptr<Analyzer> a) { analyzers_.push_back(std::move(a)); }
  void add_sink(Sink* s) { sinks_.push_back(s); }

  void process(const Event& ev);
  // Ends the trace (as a TCPSCOPE_EV_END record does) and emits the report
  // to every sink. Idempotent.
  void finish(uint64_t end_ns);
  bool finished() const { return finished_; }

  void write_report_json(JsonWriter& w, TimeFormatter& time) const;  // members
  void write_report_text(fmt::memory_buffer& out, TimeFormatter& time,
                         const TextStyle& style) const;

  const Tracker& tracker() const { return tracker_; }
  // The first analyzer of type T, or null.
  template <typename T>
  const T* find() const {
    for (const auto& a : analyzers_)
      if (const auto* p = dynamic_cast<const T*>(a.get())) return p;
    return nullptr;
  }
  uint64_t events() const { return events_; }

 private:
  void notice(const Notice& n) override;

  Tracker tracker_;
  std::vector<std::unique_ptr<Analyzer>> analyzers_;
  std::vector<Sink*> sinks_;
  uint64_t events_ = 0;
  bool finished_ = false;
};

}  // namespace tcpscope
