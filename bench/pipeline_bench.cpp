// Google Benchmark of the user-space pipeline (decode, track, analyse,
// format): the synthetic connection churn of churn_events.hpp replayed
// through Pipeline with the default analyzers: with no sink, with the JSON
// Lines sink and with the table sink writing to /dev/null; and the same
// events written once to a zstd capture file as `record` writes it, then
// read back and decoded (CaptureReader) into the pipeline, as `tcpscope
// report FILE` does. Reports events/s (items_per_second).
//
//   build/bench/pipeline_bench [--benchmark_filter=Capture]
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "churn_events.hpp"
#include "tcpscope/capture.hpp"
#include "tcpscope/output.hpp"
#include "tcpscope/pipeline.hpp"

namespace tcpscope {
namespace {

using churn::make_churn;

const std::vector<Event>& churn_events() {
  static const std::vector<Event> events = make_churn(200'000);
  return events;
}

using churn::SinkKind;

void run(benchmark::State& st, SinkKind kind) {
  const auto& events = churn_events();
  const int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
  uint64_t processed = 0;
  for (auto _ : st) {
    churn::ChurnPipeline p(devnull, kind);
    for (const Event& e : events) p.process(e);
    p.finish(events.back().ts_ns + 1);
    processed += events.size();
  }
  close(devnull);
  st.SetItemsProcessed(static_cast<int64_t>(processed));
}

// The churn as a capture file in a private temporary directory, written
// with record's defaults (zstd level 1, 4096-record blocks); removed at exit.
class ChurnCapture {
 public:
  ChurnCapture() {
    char dir[] = "/tmp/tcpscope-bench-XXXXXX";
    if (!mkdtemp(dir)) return;
    dir_ = dir;
    path_ = dir_ + "/churn.tcap";
    auto created = capture::CaptureWriter::create(path_, capture::CaptureInfo{});
    if (!created) return;
    for (const Event& e : churn_events()) (*created)->append(e);
    if (!(*created)->close()) ok_ = true;
  }
  ~ChurnCapture() {
    if (!path_.empty()) std::remove(path_.c_str());
    if (!dir_.empty()) rmdir(dir_.c_str());
  }
  const std::string* path() const { return ok_ ? &path_ : nullptr; }

 private:
  std::string dir_, path_;
  bool ok_ = false;
};

void BM_CaptureReplayNoSink(benchmark::State& st) {
  static const ChurnCapture capture;
  if (!capture.path()) {
    st.SkipWithError("cannot write the capture file in /tmp");
    return;
  }
  uint64_t processed = 0;
  for (auto _ : st) {
    auto reader = capture::CaptureReader::open(*capture.path());
    if (!reader) {
      st.SkipWithError(reader.error().message.c_str());
      return;
    }
    Pipeline p;
    p.add_default_analyzers(10);
    Event e;
    uint64_t n = 0;
    for (; (*reader)->next(e); ++n) p.process(e);
    if ((*reader)->status().kind != capture::ReadStatus::Kind::Clean ||
        n != churn_events().size()) {
      st.SkipWithError("the capture did not read back whole");
      return;
    }
    p.finish(e.ts_ns + 1);
    processed += n;
  }
  st.SetItemsProcessed(static_cast<int64_t>(processed));
}

void BM_PipelineNoSink(benchmark::State& st) { run(st, SinkKind::None); }
void BM_PipelineJson(benchmark::State& st) { run(st, SinkKind::Json); }
void BM_PipelineTable(benchmark::State& st) { run(st, SinkKind::Table); }

BENCHMARK(BM_PipelineNoSink)->Unit(benchmark::kMillisecond)->MinTime(2);
BENCHMARK(BM_PipelineJson)->Unit(benchmark::kMillisecond)->MinTime(2);
BENCHMARK(BM_PipelineTable)->Unit(benchmark::kMillisecond)->MinTime(2);
BENCHMARK(BM_CaptureReplayNoSink)->Unit(benchmark::kMillisecond)->MinTime(2);

}  // namespace
}  // namespace tcpscope

BENCHMARK_MAIN();
