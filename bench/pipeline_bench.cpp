// Google Benchmark of the user-space pipeline (decode, track, analyse,
// format): a synthetic capture of loopback connection churn, as the kernel
// reports it for bench/churn (client: CLOSE -> SYN_SENT -> ESTABLISHED ->
// CLOSE_WAIT -> LAST_ACK -> CLOSE; server: LISTEN -> SYN_RECV -> ESTABLISHED
// -> FIN_WAIT1 -> FIN_WAIT2, tw timer armed, -> CLOSE; the tw sock recycled
// when the client port comes round again), replayed through Pipeline with the
// default analyzers: with no sink, with the JSON Lines sink and with the
// table sink writing to /dev/null; and the same events written once to a
// zstd capture file as `record` writes it, then read back and decoded
// (CaptureReader) into the pipeline, as `tcpscope report FILE` does.
// Reports events/s (items_per_second).
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

#include "tcpscope/capture.hpp"
#include "tcpscope/output.hpp"
#include "tcpscope/pipeline.hpp"

namespace tcpscope {
namespace {

constexpr uint32_t kNetns = 4026532000u;
constexpr uint16_t kServerPort = 5555;
constexpr uint64_t kConnGapNs = 25'000;  // 40k connections/s

Event base(uint64_t ts, uint64_t conn, uint16_t lport, uint16_t rport) {
  Event e{};
  e.ts_ns = ts;
  e.conn = conn;
  e.netns = kNetns;
  e.family = 4;
  e.lport = lport;
  e.rport = rport;
  const uint8_t lo[4] = {127, 0, 0, 1};
  std::memcpy(e.laddr, lo, 4);
  std::memcpy(e.raddr, lo, 4);
  return e;
}

Event state(const Event& b, uint64_t dt, uint8_t from, uint8_t to, uint8_t flags = 0) {
  Event e = b;
  e.type = TCPSCOPE_EV_STATE;
  e.ts_ns += dt;
  e.old_state = from;
  e.new_state = to;
  e.sk_flags = flags;
  return e;
}

// n connections of churn: about 12 records each.
std::vector<Event> make_churn(size_t n) {
  std::vector<Event> v;
  v.reserve(n * 13 + 16);
  uint64_t ts = 1'000'000'000'000ull, cookie = 1000;
  Event config{};
  config.type = TCPSCOPE_EV_CONFIG;
  config.ts_ns = ts;
  config.netns = kNetns;
  config.reason = 1024;
  config.seg_len = 65535;
  config.aux = TCPSCOPE_CONFIG_TW_TIMERS | TCPSCOPE_CONFIG_TW_SWEEP;
  v.push_back(config);
  Event listen = base(ts, cookie++, kServerPort, 0);
  listen.pid = 4242;
  std::memcpy(listen.comm, "churn", 6);
  listen.owner_src = TCPSCOPE_OWNER_SYSCALL;
  v.push_back(state(listen, 0, kTcpClose, kTcpListen, TCPSCOPE_SK_NEW));
  std::vector<uint64_t> tw_of_port(65536, 0);  // server tw sock per client port
  for (size_t i = 0; i < n; ++i) {
    ts += kConnGapNs;
    const auto cport = static_cast<uint16_t>(1024 + i % (65536 - 1024));
    const uint64_t ccookie = cookie++, scookie = cookie++;
    Event c = base(ts, ccookie, 0, kServerPort);
    c.pid = 4242 + static_cast<uint32_t>(i % 4);
    std::memcpy(c.comm, "churn", 6);
    c.owner_src = TCPSCOPE_OWNER_SYSCALL;
    Event s = base(ts, scookie, kServerPort, cport);
    s.pid = 4242;
    std::memcpy(s.comm, "churn", 6);
    s.owner_src = TCPSCOPE_OWNER_LISTENER;
    v.push_back(state(c, 0, kTcpClose, kTcpSynSent, TCPSCOPE_SK_NEW));
    c.lport = cport;
    if (uint64_t old = tw_of_port[cport]) {
      // The SYN finds the server's old tw sock on the tuple: recycled.
      Event k = base(ts + 1000, old, kServerPort, cport);
      k.type = TCPSCOPE_EV_TW_CANCEL;
      k.old_state = kTcpTimeWait;
      k.new_state = kTcpTimeWait;
      k.sk_flags = TCPSCOPE_SK_TIMEWAIT;
      v.push_back(k);
    }
    v.push_back(state(s, 2000, kTcpListen, kTcpSynRecv, TCPSCOPE_SK_NEW));
    v.push_back(state(c, 3000, kTcpSynSent, kTcpEstablished, 0));
    v.push_back(state(s, 4000, kTcpSynRecv, kTcpEstablished, 0));
    v.push_back(state(s, 6000, kTcpEstablished, kTcpFinWait1,
                      TCPSCOPE_SK_SEND_SHUTDOWN));
    v.push_back(state(c, 7000, kTcpEstablished, kTcpCloseWait,
                      TCPSCOPE_SK_RCV_SHUTDOWN));
    v.push_back(state(s, 8000, kTcpFinWait1, kTcpFinWait2,
                      TCPSCOPE_SK_SEND_SHUTDOWN));
    v.push_back(state(c, 9000, kTcpCloseWait, kTcpLastAck,
                      TCPSCOPE_SK_RCV_SHUTDOWN | TCPSCOPE_SK_SEND_SHUTDOWN));
    Event arm = base(ts + 10000, scookie, kServerPort, cport);
    arm.type = TCPSCOPE_EV_TW_START;
    arm.old_state = kTcpTimeWait;
    arm.new_state = kTcpTimeWait;
    arm.sk_flags = TCPSCOPE_SK_TIMEWAIT;
    arm.aux = arm.ts_ns + 60'000'000'000ull;
    v.push_back(arm);
    v.push_back(state(s, 10100, kTcpFinWait2, kTcpClose,
                      TCPSCOPE_SK_RCV_SHUTDOWN | TCPSCOPE_SK_SEND_SHUTDOWN));
    v.push_back(state(c, 11000, kTcpLastAck, kTcpClose,
                      TCPSCOPE_SK_RCV_SHUTDOWN | TCPSCOPE_SK_SEND_SHUTDOWN));
    tw_of_port[cport] = scookie;
  }
  return v;
}

const std::vector<Event>& churn_events() {
  static const std::vector<Event> events = make_churn(200'000);
  return events;
}

enum class SinkKind { None, Json, Table };

void run(benchmark::State& st, SinkKind kind) {
  const auto& events = churn_events();
  const int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
  uint64_t processed = 0;
  for (auto _ : st) {
    FdWriter out(devnull, 1 << 20);
    TimeFormatter time(1'700'000'000'000'000'000ll);
    JsonLinesSink json(out, time);
    TableSink table(out, time);
    Pipeline p;
    p.add_default_analyzers(10);
    if (kind == SinkKind::Json) p.add_sink(&json);
    if (kind == SinkKind::Table) p.add_sink(&table);
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
