// Synthetic loopback connection churn as the kernel reports it for
// bench/churn (client: CLOSE -> SYN_SENT -> ESTABLISHED -> CLOSE_WAIT ->
// LAST_ACK -> CLOSE; server: LISTEN -> SYN_RECV -> ESTABLISHED -> FIN_WAIT1
// -> FIN_WAIT2, tw timer armed, -> CLOSE; the tw sock recycled when the
// client port comes round again): the pipeline benchmark replays it, a unit
// test checks that the pipeline allocates nothing per event in it.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "tcpscope/event.hpp"
#include "tcpscope/output.hpp"
#include "tcpscope/pipeline.hpp"
#include "tcpscope/tracker.hpp"

namespace tcpscope::churn {

constexpr uint32_t kNetns = 4026532000u;
constexpr uint16_t kServerPort = 5555;
constexpr uint64_t kConnGapNs = 25'000;  // 40k connections/s

inline Event base(uint64_t ts, uint64_t conn, uint16_t lport, uint16_t rport) {
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

inline Event state(const Event& b, uint64_t dt, uint8_t from, uint8_t to, uint8_t flags = 0) {
  Event e = b;
  e.type = TCPSCOPE_EV_STATE;
  e.ts_ns += dt;
  e.old_state = from;
  e.new_state = to;
  e.sk_flags = flags;
  return e;
}

// n connections of churn, about 12 records each, handed to emit in order.
template <typename Emit>
void for_each_churn_event(size_t n, Emit&& emit) {
  uint64_t ts = 1'000'000'000'000ull, cookie = 1000;
  Event config{};
  config.type = TCPSCOPE_EV_CONFIG;
  config.ts_ns = ts;
  config.netns = kNetns;
  config.reason = 1024;
  config.seg_len = 65535;
  config.aux = TCPSCOPE_CONFIG_TW_TIMERS | TCPSCOPE_CONFIG_TW_SWEEP;
  emit(config);
  Event listen = base(ts, cookie++, kServerPort, 0);
  listen.pid = 4242;
  std::memcpy(listen.comm, "churn", 6);
  listen.owner_src = TCPSCOPE_OWNER_SYSCALL;
  emit(state(listen, 0, kTcpClose, kTcpListen, TCPSCOPE_SK_NEW));
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
    emit(state(c, 0, kTcpClose, kTcpSynSent, TCPSCOPE_SK_NEW));
    c.lport = cport;
    if (uint64_t old = tw_of_port[cport]) {
      // The SYN finds the server's old tw sock on the tuple: recycled.
      Event k = base(ts + 1000, old, kServerPort, cport);
      k.type = TCPSCOPE_EV_TW_CANCEL;
      k.old_state = kTcpTimeWait;
      k.new_state = kTcpTimeWait;
      k.sk_flags = TCPSCOPE_SK_TIMEWAIT;
      emit(k);
    }
    emit(state(s, 2000, kTcpListen, kTcpSynRecv, TCPSCOPE_SK_NEW));
    emit(state(c, 3000, kTcpSynSent, kTcpEstablished, 0));
    emit(state(s, 4000, kTcpSynRecv, kTcpEstablished, 0));
    emit(state(s, 6000, kTcpEstablished, kTcpFinWait1, TCPSCOPE_SK_SEND_SHUTDOWN));
    emit(state(c, 7000, kTcpEstablished, kTcpCloseWait, TCPSCOPE_SK_RCV_SHUTDOWN));
    emit(state(s, 8000, kTcpFinWait1, kTcpFinWait2, TCPSCOPE_SK_SEND_SHUTDOWN));
    emit(state(c, 9000, kTcpCloseWait, kTcpLastAck,
               TCPSCOPE_SK_RCV_SHUTDOWN | TCPSCOPE_SK_SEND_SHUTDOWN));
    Event arm = base(ts + 10000, scookie, kServerPort, cport);
    arm.type = TCPSCOPE_EV_TW_START;
    arm.old_state = kTcpTimeWait;
    arm.new_state = kTcpTimeWait;
    arm.sk_flags = TCPSCOPE_SK_TIMEWAIT;
    arm.aux = arm.ts_ns + 60'000'000'000ull;
    emit(arm);
    emit(state(s, 10100, kTcpFinWait2, kTcpClose,
               TCPSCOPE_SK_RCV_SHUTDOWN | TCPSCOPE_SK_SEND_SHUTDOWN));
    emit(state(c, 11000, kTcpLastAck, kTcpClose,
               TCPSCOPE_SK_RCV_SHUTDOWN | TCPSCOPE_SK_SEND_SHUTDOWN));
    tw_of_port[cport] = scookie;
  }
}

inline std::vector<Event> make_churn(size_t n) {
  std::vector<Event> v;
  v.reserve(n * 13 + 16);
  for_each_churn_event(n, [&v](const Event& e) { v.push_back(e); });
  return v;
}

enum class SinkKind { None, Json, Table };

// The default analyzers and one sink writing to fd, flushed in chunks as a
// live trace does.
class ChurnPipeline {
 public:
  ChurnPipeline(int fd, SinkKind kind)
      : out_(fd, 1 << 20),
        time_(1'700'000'000'000'000'000ll),
        json_(out_, time_),
        table_(out_, time_) {
    pipeline_.add_default_analyzers(10);
    if (kind == SinkKind::Json) pipeline_.add_sink(&json_);
    if (kind == SinkKind::Table) pipeline_.add_sink(&table_);
  }
  void process(const Event& e) {
    pipeline_.process(e);
    out_.maybe_flush();
  }
  void finish(uint64_t end_ns) { pipeline_.finish(end_ns); }

 private:
  FdWriter out_;
  TimeFormatter time_;
  JsonLinesSink json_;
  TableSink table_;
  Pipeline pipeline_;
};

}  // namespace tcpscope::churn
