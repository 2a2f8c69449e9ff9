// JSON writer, formatting helpers and the output sinks.
#include <gtest/gtest.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tcpscope/analyzers.hpp"
#include "tcpscope/format.hpp"
#include "tcpscope/json.hpp"
#include "tcpscope/output.hpp"
#include "tcpscope/pipeline.hpp"
#include "tcpscope/resets.hpp"
#include "test_events.hpp"

namespace tcpscope {
namespace {

using namespace tcpscope::test;
using nlohmann::json;
using nlohmann::ordered_json;

std::vector<std::string> keys_of(const ordered_json& j) {
  std::vector<std::string> k;
  for (auto it = j.begin(); it != j.end(); ++it) k.push_back(it.key());
  return k;
}
using Keys = std::vector<std::string>;

// ---- JsonWriter ------------------------------------------------------------------

// What a sink of type Sink writes for these events (no finish(): no report).
template <typename Sink, typename Events>
std::string sink_text(const Events& events) {
  MemFile f;
  {
    FdWriter out(f.fd());
    TimeFormatter time(0);
    Sink sink(out, time);
    Pipeline p;
    p.add_sink(&sink);
    for (const Event& e : events) p.process(e);
    sink.flush();
  }
  return f.contents();
}
template <typename Sink>
std::string sink_text(std::initializer_list<Event> events) {
  return sink_text<Sink, std::initializer_list<Event>>(events);
}

TEST(JsonWriter, CommasAndNesting) {
  fmt::memory_buffer buf;
  JsonWriter w(buf);
  w.begin_object();
  w.member("a", 1);
  w.key("b");
  w.begin_array();
  w.value(1u);
  w.value(uint64_t{2});
  w.begin_object();
  w.key("c");
  w.null();
  w.end_object();
  w.end_array();
  w.key("d");
  w.begin_object();
  w.end_object();
  w.key("e");
  w.begin_array();
  w.end_array();
  w.member("f", true);
  w.member("g", -5);
  w.member("h", 1.5);
  w.member("i", "str");
  w.member("j", std::numeric_limits<uint64_t>::max());
  w.member("k", std::numeric_limits<int64_t>::min());
  w.key("l");
  w.begin_array();
  w.begin_array();
  w.end_array();
  w.begin_array();
  w.value(false);
  w.value(-2.25);
  w.end_array();
  w.end_array();
  w.member("m", uint8_t{200});
  w.member("n", std::string_view("sv"));
  w.end_object();
  const std::string s = fmt::to_string(buf);
  EXPECT_EQ(s, R"({"a":1,"b":[1,2,{"c":null}],"d":{},"e":[],"f":true,"g":-5,"h":1.500,)"
               R"("i":"str","j":18446744073709551615,"k":-9223372036854775808,)"
               R"("l":[[],[false,-2.250]],"m":200,"n":"sv"})");
  const json j = json::parse(s);
  EXPECT_EQ(j["j"].get<uint64_t>(), std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(j["k"].get<int64_t>(), std::numeric_limits<int64_t>::min());
}

TEST(JsonWriter, TopLevelArrayAndDeepNesting) {
  fmt::memory_buffer buf;
  JsonWriter w(buf);
  w.begin_array();
  w.value(1);
  for (int i = 0; i < 40; ++i) {
    w.begin_array();
    w.value(i);
  }
  for (int i = 0; i < 40; ++i) w.end_array();
  w.value(2);
  w.end_array();
  const std::string s = fmt::to_string(buf);
  EXPECT_EQ(s.substr(0, 12), "[1,[0,[1,[2,");
  EXPECT_EQ(s.substr(s.size() - 7), "]]]],2]");
  const json j = json::parse(s);
  ASSERT_EQ(j.size(), 3u);
  EXPECT_EQ(j[2], 2);
  json inner = j[1];
  for (int i = 0; i < 39; ++i) {
    ASSERT_EQ(inner.size(), 2u);
    EXPECT_EQ(inner[0], i);
    inner = json(inner[1]);
  }
  EXPECT_EQ(inner, json::array({39}));
}

TEST(JsonWriter, Escaping) {
  const std::string in =
      std::string("q\"b\\s/\n\t\r\x01\x1f\x7f", 12) + "\xc3\xa9" + std::string("\0z", 2);
  fmt::memory_buffer buf;
  JsonWriter w(buf);
  w.begin_object();
  w.member("k\"\\", std::string_view(in));
  w.end_object();
  const std::string s = fmt::to_string(buf);
  EXPECT_EQ(s, R"({"k\"\\":"q\"b\\s/\n\t\u000d\u0001\u001f\u007f\u00c3\u00a9\u0000z"})");
  const json j = json::parse(s);
  // Each byte that is not printable ASCII comes back as the code point of
  // the same value: the output parses whatever bytes a comm holds.
  const std::string want =
      std::string("q\"b\\s/\n\t\r\x01\x1f\x7f", 12) + "\xc3\x83\xc2\xa9" + std::string("\0z", 2);
  EXPECT_EQ(j["k\"\\"].get<std::string>(), want);
}

TEST(JsonWriter, EscapeEveryByte) {
  std::string all;
  for (int c = 0; c < 256; ++c) all.push_back(static_cast<char>(c));
  fmt::memory_buffer buf;
  json_escape(buf, all);
  const std::string s = fmt::to_string(buf);
  const json j = json::parse(s);
  const std::string back = j.get<std::string>();
  // Decode UTF-8 back to the original byte values.
  std::string bytes;
  for (size_t i = 0; i < back.size(); ++i) {
    const auto b = static_cast<unsigned char>(back[i]);
    if (b < 0x80) {
      bytes.push_back(static_cast<char>(b));
    } else {
      ASSERT_LT(i + 1, back.size());
      bytes.push_back(
          static_cast<char>(((b & 0x1f) << 6) | (static_cast<unsigned char>(back[i + 1]) & 0x3f)));
      ++i;
    }
  }
  EXPECT_EQ(bytes, all);
  // Only printable ASCII is left raw.
  for (char c : s) {
    EXPECT_GE(static_cast<unsigned char>(c), 0x20);
    EXPECT_LT(static_cast<unsigned char>(c), 0x7f);
  }
}

// ---- format helpers --------------------------------------------------------------

TEST(Format, Addresses) {
  const uint8_t v4[16] = {192, 168, 1, 20};
  EXPECT_EQ(format_addr(4, v4).view(), "192.168.1.20");
  const uint8_t zero[16] = {};
  EXPECT_EQ(format_addr(4, zero).view(), "0.0.0.0");
  EXPECT_EQ(format_addr(6, zero).view(), "::");
  const uint8_t lo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  EXPECT_EQ(format_addr(6, lo).view(), "::1");
  const uint8_t doc[16] = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  EXPECT_EQ(format_addr(6, doc).view(), "2001:db8::1");
  const uint8_t two_runs[16] = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1};
  EXPECT_EQ(format_addr(6, two_runs).view(), "2001:db8::1:0:0:1");
  const uint8_t mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1};
  EXPECT_EQ(format_addr(6, mapped).view(), "::ffff:10.0.0.1");
  const uint8_t full[16] = {0xfe, 0x80, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc,
                            0xde, 0xf0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66};
  EXPECT_EQ(format_addr(6, full).view(), "fe80:1234:5678:9abc:def0:1122:3344:5566");
}

TEST(Format, Names) {
  EXPECT_EQ(state_name(0), "UNKNOWN");
  EXPECT_EQ(state_name(kTcpEstablished), "ESTABLISHED");
  EXPECT_EQ(state_name(kTcpFinWait2), "FIN_WAIT2");
  EXPECT_EQ(state_name(kTcpCloseWait), "CLOSE_WAIT");
  EXPECT_EQ(state_name(kTcpClosing), "CLOSING");
  EXPECT_EQ(state_name(kTcpNewSynRecv), "NEW_SYN_RECV");
  EXPECT_EQ(state_name(kTcpBoundInactive), "BOUND_INACTIVE");
  EXPECT_EQ(state_name(14), "UNKNOWN");
  EXPECT_EQ(state_name(255), "UNKNOWN");
  EXPECT_EQ(reset_reason_name(0), "NOT_SPECIFIED");
  EXPECT_EQ(reset_reason_name(kRstNoSocket), "NO_SOCKET");
  EXPECT_EQ(reset_reason_name(kRstAbortOnData), "TCP_ABORT_ON_DATA");
  EXPECT_EQ(reset_reason_name(kRstTimewaitSocket), "TCP_TIMEWAIT_SOCKET");
  EXPECT_EQ(reset_reason_name(kRstAbortOnClose), "TCP_ABORT_ON_CLOSE");
  EXPECT_EQ(reset_reason_name(kRstTcpState), "TCP_STATE");
  EXPECT_EQ(reset_reason_name(16), "TCP_DISCONNECT_WITH_DATA");
  EXPECT_EQ(reset_reason_name(17), "OTHER");
  EXPECT_EQ(event_type_name(TCPSCOPE_EV_STATE), "state");
  EXPECT_EQ(event_type_name(TCPSCOPE_EV_RETRANSMIT), "retransmit");
  EXPECT_EQ(event_type_name(TCPSCOPE_EV_RESET_SENT), "reset_sent");
  EXPECT_EQ(event_type_name(TCPSCOPE_EV_RESET_RECEIVED), "reset_received");
  EXPECT_EQ(event_type_name(TCPSCOPE_EV_LOST), "lost");
  EXPECT_EQ(event_type_name(TCPSCOPE_EV_END), "end");
  EXPECT_EQ(event_type_name(99), "unknown");
}

TEST(Format, TcpFlags) {
  std::array<char, 32> b{};
  EXPECT_EQ(tcp_flags_text(0, b), "");
  EXPECT_EQ(tcp_flags_text(TCPSCOPE_TCP_FIN | TCPSCOPE_TCP_ACK, b), "FIN|ACK");
  EXPECT_EQ(tcp_flags_text(TCPSCOPE_TCP_SYN | TCPSCOPE_TCP_ACK, b), "SYN|ACK");
  EXPECT_EQ(tcp_flags_text(TCPSCOPE_TCP_RST, b), "RST");
  EXPECT_EQ(tcp_flags_text(0x1f, b), "SYN|FIN|RST|PSH|ACK");
  EXPECT_EQ(tcp_flags_text(0xff, b), "SYN|FIN|RST|PSH|ACK");  // ECE, CWR, URG unnamed
}

TEST(TimeFormatter, Rfc3339) {
  TimeFormatter t(0);
  EXPECT_EQ(t.rfc3339(1'500'000'000), "1970-01-01T00:00:01.500000000Z");
  EXPECT_EQ(t.rfc3339(0), "1970-01-01T00:00:00.000000000Z");
  EXPECT_EQ(t.rfc3339(999'999'999), "1970-01-01T00:00:00.999999999Z");
  EXPECT_EQ(t.rfc3339(1'000'000'000), "1970-01-01T00:00:01.000000000Z");
  EXPECT_EQ(t.rfc3339(86'400'000'000'001), "1970-01-02T00:00:00.000000001Z");
  EXPECT_EQ(t.rfc3339(999'999'999), "1970-01-01T00:00:00.999999999Z");  // cache

  TimeFormatter boot(1'700'000'000'000'000'000);  // 2023-11-14T22:13:20Z
  EXPECT_EQ(boot.offset(), 1'700'000'000'000'000'000);
  EXPECT_EQ(boot.rfc3339(123'456'789), "2023-11-14T22:13:20.123456789Z");
  EXPECT_EQ(boot.clock(123'456'789), "22:13:20.123");
  EXPECT_EQ(boot.rfc3339(3'600'000'000'000 + 1), "2023-11-14T23:13:20.000000001Z");
  EXPECT_EQ(boot.clock(3'600'000'000'000 + 999'999'999), "23:13:20.999");

  t.set_offset(1'000'000'000);
  EXPECT_EQ(t.offset(), 1'000'000'000);
  EXPECT_EQ(t.rfc3339(1'500'000'000), "1970-01-01T00:00:02.500000000Z");
}

TEST(TimeFormatter, NegativeWallClock) {
  // Before 1970 the nanoseconds stay positive and the second rounds down.
  TimeFormatter a(-1);
  EXPECT_EQ(a.rfc3339(0), "1969-12-31T23:59:59.999999999Z");
  TimeFormatter b(-1'000'000'000);
  EXPECT_EQ(b.rfc3339(0), "1969-12-31T23:59:59.000000000Z");
  TimeFormatter c(-2'000'000'000);
  EXPECT_EQ(c.rfc3339(500'000'000), "1969-12-31T23:59:58.500000000Z");
  EXPECT_EQ(c.rfc3339(1'500'000'000), "1969-12-31T23:59:59.500000000Z");
  EXPECT_EQ(c.rfc3339(2'000'000'000), "1970-01-01T00:00:00.000000000Z");
  EXPECT_EQ(c.clock(1'999'999'999), "23:59:59.999");
  // After set_offset the cached date is not reused.
  c.set_offset(0);
  EXPECT_EQ(c.rfc3339(1'500'000'000), "1970-01-01T00:00:01.500000000Z");
}

TEST(TimeFormatter, Clocks) {
  const uint64_t b0 = boottime_now_ns();
  const int64_t offset = measure_boot_offset_ns();
  timespec rt{};
  clock_gettime(CLOCK_REALTIME, &rt);
  const uint64_t b1 = boottime_now_ns();
  EXPECT_LE(b0, b1);
  const int64_t real = static_cast<int64_t>(rt.tv_sec) * 1'000'000'000 + rt.tv_nsec;
  // offset + boottime is the wall clock (within scheduling noise).
  EXPECT_LT(std::llabs(static_cast<int64_t>(b1) + offset - real), 100'000'000);
}

// ---- FdWriter ------------------------------------------------------------------------

TEST(FdWriter, ChunksAndErrors) {
  MemFile f;
  ASSERT_GE(f.fd(), 0);
  {
    FdWriter w(f.fd(), 8);
    w.buf().append(std::string_view("12345"));
    w.maybe_flush();
    EXPECT_EQ(f.contents(), "");
    w.buf().append(std::string_view("6789"));
    w.maybe_flush();
    EXPECT_EQ(f.contents(), "123456789");
    EXPECT_EQ(w.buf().size(), 0u);
    w.buf().append(std::string_view("x"));
    EXPECT_FALSE(w.failed());
  }  // the destructor flushes
  EXPECT_EQ(f.contents(), "123456789x");

  FdWriter bad(-1);
  bad.buf().append(std::string_view("lost"));
  bad.flush();
  EXPECT_TRUE(bad.failed());
  EXPECT_EQ(bad.error(), EBADF);
  EXPECT_EQ(bad.buf().size(), 0u);
}

// ---- sinks -------------------------------------------------------------------------------

// Emits one notice with fields for every ended connection.
struct FieldNotice : Analyzer {
  FieldNotice() = default;
  // With a "cmdline" field too, of these bytes.
  explicit FieldNotice(std::string_view cmdline) : cmdline_(cmdline) {}
  void on_end(const Connection& c, NoticeOut& out) override {
    Notice n;
    n.type = "conn_end";
    n.ts_ns = c.closed_ns ? c.closed_ns : c.first_ns;
    n.conn = &c;
    n.add("kind", close_kind_name(c.close_kind)).add("resets", int64_t{c.resets_sent});
    if (!cmdline_.empty()) n.add("cmdline", cmdline_);
    out.notice(n);
  }
  std::string_view cmdline_;
  void write_json(JsonWriter&, TimeFormatter&) const override {}
  void write_text(fmt::memory_buffer&, TimeFormatter&, const TextStyle&) const override {}
};

std::vector<Event> sink_events() {
  return {
      State(ms(100), 77, kTcpClose, kTcpSynSent).lport(0).owner(42, "curl"),
      State(ms(110), 77, kTcpSynSent, kTcpEstablished),
      Retransmit(ms(120), 77, kTcpEstablished, TCPSCOPE_TCP_PSH | TCPSCOPE_TCP_ACK, 1448)
          .rx_queue(7),
      ResetSent(ms(130), 0, kTcpClose, kRstNoSocket)
          .sk_flags(TCPSCOPE_SK_NO_SOCKET)
          .tcp_flags(TCPSCOPE_TCP_FIN | TCPSCOPE_TCP_ACK),
      ResetReceived(ms(140), 77, kTcpEstablished),
      State(ms(140), 77, kTcpEstablished, kTcpClose),
      ResetSent(ms(140), 77, kTcpClose, kRstAbortOnData)
          .tcp_flags(TCPSCOPE_TCP_PSH | TCPSCOPE_TCP_ACK)
          .seg_len(5),
      Lost(ms(150), 4),
      End(ms(200)),
  };
}

TEST(JsonLinesSink, Lines) {
  MemFile f;
  {
    FdWriter out(f.fd());
    TimeFormatter time(0);
    JsonLinesSink sink(out, time);
    Pipeline p;
    add_core_analyzers(p);
    // Resets reach the output as the reset analysis' notices (with a cause).
    p.add_analyzer(std::make_unique<ResetAnalyzer>(nullptr, 10));
    p.add_analyzer(std::make_unique<FieldNotice>());
    p.add_sink(&sink);
    sink.write_start(ms(50), [](JsonWriter& w) { w.member("version", "test"); });
    for (const Event& e : sink_events()) p.process(e);
    EXPECT_TRUE(p.finished());
  }
  const auto lines = split_lines(f.contents());
  ASSERT_EQ(lines.size(), 11u);
  std::vector<ordered_json> j;
  for (const auto& l : lines) j.push_back(ordered_json::parse(l));

  EXPECT_EQ(lines[0],
            R"({"type":"start","time":"1970-01-01T00:00:00.050000000Z","version":"test"})");

  const Keys conn_keys = {"type",  "time",  "conn",  "netns", "family", "laddr",
                          "lport", "raddr", "rport", "pid",   "comm"};
  auto with = [&](Keys extra) {
    Keys k = conn_keys;
    k.insert(k.end(), extra.begin(), extra.end());
    return k;
  };

  EXPECT_EQ(lines[1], R"({"type":"state","time":"1970-01-01T00:00:00.100000000Z","conn":77,)"
                      R"("netns":4026531840,"family":4,"laddr":"10.0.0.1","lport":0,)"
                      R"("raddr":"10.0.0.2","rport":80,"pid":42,"comm":"curl","old":"CLOSE",)"
                      R"("new":"SYN_SENT","ms":null,"owner":"syscall","rx_queue":0})");
  EXPECT_EQ(keys_of(j[2]), with({"old", "new", "ms", "owner", "rx_queue"}));
  EXPECT_EQ(j[2]["lport"], 40000);  // taken once connect() picked it
  EXPECT_EQ(j[2]["old"], "SYN_SENT");
  EXPECT_EQ(j[2]["new"], "ESTABLISHED");
  EXPECT_EQ(j[2]["ms"].get<double>(), 10.0);
  EXPECT_NE(lines[2].find(R"("ms":10.000,)"), std::string::npos);
  EXPECT_EQ(j[2]["pid"], 42);  // the owner stays with the connection
  EXPECT_EQ(j[2]["comm"], "curl");

  EXPECT_EQ(keys_of(j[3]),
            with({"state", "flags", "bytes", "count", "total_retrans", "owner", "rx_queue"}));
  EXPECT_EQ(j[3]["type"], "retransmit");
  EXPECT_EQ(j[3]["time"], "1970-01-01T00:00:00.120000000Z");
  EXPECT_EQ(j[3]["state"], "ESTABLISHED");
  EXPECT_EQ(j[3]["flags"], "PSH|ACK");
  EXPECT_EQ(j[3]["bytes"], 1448);
  EXPECT_EQ(j[3]["count"], 1);
  EXPECT_EQ(j[3]["rx_queue"], 7);

  EXPECT_EQ(lines[4],
            R"({"type":"reset_sent","time":"1970-01-01T00:00:00.130000000Z","conn":null,)"
            R"("netns":4026531840,"family":4,"laddr":"10.0.0.1","lport":40000,)"
            R"("raddr":"10.0.0.2","rport":80,"pid":0,"comm":"","state":"NONE",)"
            R"("reason":"NO_SOCKET","cause":"no_socket","seg_flags":"FIN|ACK","seg_len":0,)"
            R"("no_socket":true})");

  // reset_received waits (2 ms of event time) for a local sender to pair
  // with: it comes out when the LOST record moves time on.
  EXPECT_EQ(j[5]["type"], "state");
  EXPECT_EQ(j[5]["old"], "ESTABLISHED");
  EXPECT_EQ(j[5]["new"], "CLOSE");
  EXPECT_EQ(j[5]["ms"].get<double>(), 30.0);

  EXPECT_EQ(keys_of(j[6]), with({"state", "reason", "cause", "seg_flags", "seg_len", "no_socket"}));
  EXPECT_EQ(j[6]["type"], "reset_sent");
  EXPECT_EQ(j[6]["conn"], 77);
  EXPECT_EQ(j[6]["state"], "CLOSE");
  EXPECT_EQ(j[6]["reason"], "TCP_ABORT_ON_DATA");
  EXPECT_EQ(j[6]["cause"], "data_after_close");
  EXPECT_EQ(j[6]["seg_flags"], "PSH|ACK");
  EXPECT_EQ(j[6]["seg_len"], 5);
  EXPECT_EQ(j[6]["no_socket"], false);

  EXPECT_EQ(keys_of(j[7]), with({"state", "cause"}));
  EXPECT_EQ(j[7]["type"], "reset_received");
  EXPECT_EQ(j[7]["time"], "1970-01-01T00:00:00.140000000Z");
  EXPECT_EQ(j[7]["state"], "ESTABLISHED");
  EXPECT_EQ(j[7]["cause"], "peer_reset");
  EXPECT_EQ(j[7]["conn"], 77);

  EXPECT_EQ(
      lines[8],
      R"({"type":"lost","time":"1970-01-01T00:00:00.150000000Z","count":4,"kernel_skipped":0})");

  // The notice, emitted at finish.
  EXPECT_EQ(keys_of(j[9]), with({"kind", "resets"}));
  EXPECT_EQ(j[9]["type"], "conn_end");
  EXPECT_EQ(j[9]["time"], "1970-01-01T00:00:00.140000000Z");
  EXPECT_EQ(j[9]["kind"], "reset_sent");
  EXPECT_EQ(j[9]["resets"], 1);

  const ordered_json& rep = j[10];
  EXPECT_EQ(keys_of(rep), (Keys{"type", "time", "events", "connections", "retransmits",
                                "lost_events", "lost_kernel_skipped", "lost_resets_missing",
                                "lost_vanished", "lost_gaps", "resets", "late_fin_resets"}));
  EXPECT_EQ(rep["resets"]["sent"]["total"], 2);
  EXPECT_EQ(rep["resets"]["sent"]["by_cause"]["data_after_close"], 1);
  EXPECT_EQ(rep["resets"]["sent"]["by_cause"]["no_socket"], 1);
  EXPECT_EQ(rep["resets"]["received"]["by_cause"]["peer_reset"], 1);
  ASSERT_EQ(rep["late_fin_resets"].size(), 1u);
  EXPECT_EQ(rep["late_fin_resets"][0]["conn"], 77);
  EXPECT_EQ(rep["late_fin_resets"][0]["cause"], "data_after_close");
  EXPECT_EQ(rep["type"], "report");
  EXPECT_EQ(rep["time"], "1970-01-01T00:00:00.200000000Z");
  EXPECT_EQ(rep["events"], 7);
  EXPECT_EQ(keys_of(rep["connections"]),
            (Keys{"total", "by_open", "by_close", "listeners", "evicted"}));
  EXPECT_EQ(rep["connections"]["total"], 1);
  EXPECT_EQ(rep["connections"]["by_open"]["active"], 1);
  EXPECT_EQ(rep["connections"]["by_close"]["reset_sent"], 1);
  EXPECT_EQ(keys_of(rep["retransmits"]), (Keys{"total", "connections", "top"}));
  EXPECT_EQ(rep["retransmits"]["total"], 1);
  EXPECT_EQ(rep["retransmits"]["top"][0]["conn"], 77);
  EXPECT_EQ(rep["retransmits"]["top"][0]["states"], ordered_json::array({"ESTABLISHED"}));
  EXPECT_EQ(rep["lost_events"], 4);
}

// tcpscope's own overhead: the STATS record as a JSON line and a table line.
TEST(StatsRecord, JsonAndTableLines) {
  Event st{};
  st.type = TCPSCOPE_EV_STATS;
  st.ts_ns = ms(500);
  st.sk = 1000;     // records delivered
  st.cgroup = 2;    // lost
  st.conn = 400;    // BPF runs (while sampled)
  st.aux = 80'000;  // BPF ns
  st.sk_flags = TCPSCOPE_STATS_BPF;
  const uint64_t sampled = 250;
  std::memcpy(st.laddr, &sampled, sizeof(sampled));
  st.reason = 1500;    // user CPU ms
  st.seg_len = 500;    // system CPU ms
  st.rx_queue = 2048;  // peak RSS KiB
  st.netns = 3;        // sockets whose owner was not kept
  const auto lines = split_lines(sink_text<JsonLinesSink>({st}));
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0], R"({"type":"stats","time":"1970-01-01T00:00:00.500000000Z","events":1000,)"
                      R"("lost":2,"bpf_sampled_events":250,"bpf_runs":400,"bpf_ns":80000,)"
                      R"("bpf_ns_per_event":320.000,"bpf_ns_per_run":200.000,"user_cpu_s":1.500,)"
                      R"("sys_cpu_s":0.500,"cpu_ns_per_event":2000000.000,"max_rss_kib":2048,)"
                      R"("owners_not_kept":3})");
  const StatsFigures fig = stats_figures(st);
  EXPECT_TRUE(fig.bpf);
  EXPECT_DOUBLE_EQ(fig.bpf_ns_per_event, 320.0);  // over the sampled records only

  st.sk_flags = 0;  // statistics were off: BPF figures are null
  EXPECT_EQ(split_lines(sink_text<TableSink>({st})).at(0),
            "00:00:00.500 tcpscope overhead: 1000 events, 2 lost, CPU user 1.500 s sys 0.500 s "
            "(2000000 ns/event), peak RSS 2.0 MiB, 3 sockets traced without owner (socket table "
            "full: raise --max-sockets)");
}

TEST(JsonLinesSink, ArbitraryCommAndIpv6) {
  MemFile f;
  {
    FdWriter out(f.fd());
    TimeFormatter time(0);
    JsonLinesSink sink(out, time);
    Pipeline p;
    p.add_sink(&sink);
    p.process(State(ms(1), 5, kTcpClose, kTcpSynSent)
                  .v6({0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
                      {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1})
                  .owner(9, "a\"b\\c\n\xff\x01zzzzzzzz"));
    p.finish(ms(2));
  }
  const auto lines = split_lines(f.contents());
  ASSERT_EQ(lines.size(), 2u);
  const json j = json::parse(lines[0]);
  EXPECT_EQ(j["family"], 6);
  EXPECT_EQ(j["laddr"], "2001:db8::1");
  EXPECT_EQ(j["raddr"], "::1");
  EXPECT_EQ(j["comm"], "a\"b\\c\n\xc3\xbf\x01zzzzzzzz");  // 16 bytes, no NUL
  EXPECT_NE(lines[0].find(R"("comm":"a\"b\\c\n\u00ff\u0001zzzzzzzz")"), std::string::npos);
  const json rep = json::parse(lines[1]);
  EXPECT_EQ(rep["type"], "report");
  EXPECT_EQ(rep["events"], 1);
}

TEST(TableSink, HeaderRowsAndReport) {
  MemFile f;
  {
    FdWriter out(f.fd());
    TimeFormatter time(0);
    TextStyle style;
    style.top = 3;
    TableSink sink(out, time, style);
    Pipeline p;
    add_core_analyzers(p);
    p.add_analyzer(std::make_unique<FieldNotice>());
    p.add_sink(&sink);
    sink.write_header();
    EXPECT_EQ(f.contents(),
              "TIME         PID     COMM            LADDR:LPORT           RADDR:RPORT"
              "           OLDSTATE    -> NEWSTATE    MS\n");
    for (const Event& e : sink_events()) p.process(e);
  }
  const auto lines = split_lines(f.contents());
  const std::vector<std::string> want = {
      "TIME         PID     COMM            LADDR:LPORT           RADDR:RPORT"
      "           OLDSTATE    -> NEWSTATE    MS",
      "00:00:00.100 42      curl            10.0.0.1:0            10.0.0.2:80           "
      "CLOSE       -> SYN_SENT    -",
      "00:00:00.110 42      curl            10.0.0.1:40000        10.0.0.2:80           "
      "SYN_SENT    -> ESTABLISHED 10.000",
      "00:00:00.120 42      curl            10.0.0.1:40000        10.0.0.2:80           "
      "RETRANSMIT in ESTABLISHED [PSH|ACK] 1448 bytes",
      "00:00:00.130 0                       10.0.0.1:40000        10.0.0.2:80           "
      "RST SENT in no socket reason NO_SOCKET answering [FIN|ACK]",
      "00:00:00.140 42      curl            10.0.0.1:40000        10.0.0.2:80           "
      "RST RECEIVED in ESTABLISHED",
      "00:00:00.140 42      curl            10.0.0.1:40000        10.0.0.2:80           "
      "ESTABLISHED -> CLOSE       30.000",
      "00:00:00.140 42      curl            10.0.0.1:40000        10.0.0.2:80           "
      "RST SENT in CLOSE reason TCP_ABORT_ON_DATA answering [PSH|ACK]",
      "00:00:00.150 LOST 4 events (4 ring buffer full)",
      "00:00:00.140 42      curl            10.0.0.1:40000        10.0.0.2:80           "
      "CONN_END kind=reset_sent resets=1",
      "",
      "Connections: 1 (active open 1, passive open 0, seen mid-life 0); listeners: 0",
      "  closed by: active_close 0, passive_close 0, simultaneous 0, reset_sent 1, "
      "reset_received 0, aborted 0, vanished 0; still open 0",
      "",
      "Retransmits: 1 on 1 connections",
      "       1  10.0.0.1:40000 -> 10.0.0.2:80  pid 42 curl  last in ESTABLISHED",
      "",
      "Lost events: 4",
      "  4 ring buffer full: raise --ring-size",
  };
  EXPECT_EQ(lines, want);
}

// Escape sequences a process put in its comm (or a command line, or a
// capture's bytes) never reach the terminal raw: rows, notices and the
// report show printable ASCII only, the rest as '?'.
TEST(TableSink, NamesAreShownPrintable) {
  // OSC (set the window title), BEL, an 8-bit CSI, and a byte of UTF-8.
  static constexpr std::string_view kEvil =
      "\x1b]0;x\x07\x9b"
      "2J\xc3";
  MemFile f;
  {
    FdWriter out(f.fd());
    TimeFormatter time(0);
    TableSink sink(out, time, TextStyle{});
    Pipeline p;
    add_core_analyzers(p);
    p.add_analyzer(std::make_unique<FieldNotice>(kEvil));
    p.add_sink(&sink);
    auto events = sink_events();
    std::memset(events[0].comm, 0, sizeof(events[0].comm));
    std::memcpy(events[0].comm, kEvil.data(), kEvil.size());
    for (const Event& e : events) p.process(e);
  }
  const std::string text = f.contents();
  for (const char c : text) ASSERT_TRUE(c == '\n' || (c >= 0x20 && c < 0x7f)) << text;
  EXPECT_NE(text.find(" 42      ?]0;x??2J?      10.0.0.1:0 "), std::string::npos) << text;
  EXPECT_NE(text.find(" cmdline=?]0;x??2J?\n"), std::string::npos) << text;
  EXPECT_NE(text.find("pid 42 ?]0;x??2J?  last in ESTABLISHED"), std::string::npos) << text;
}

TEST(TableSink, Ipv6Row) {
  EXPECT_EQ(
      sink_text<TableSink>({State(ms(1000), 5, kTcpListen, kTcpSynRecv)
                                .v6({0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
                                    {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2})
                                .lport(443)
                                .rport(51234)
                                .owner(1000, "abcdefghijklmnop")}),
      "00:00:01.000 1000    abcdefghijklmnop [2001:db8::1]:443     "
      "[2001:db8:0:1::2]:51234 LISTEN      -> SYN_RECV    -\n");
}

// A lost record says why: a full ring buffer, runs the kernel skipped, or
// both; a capture claiming more skipped than lost is held to what it lost.
TEST(TableSink, LostLineSaysWhy) {
  EXPECT_EQ(sink_text<TableSink>({Lost(ms(1000), 5, 0), Lost(ms(1001), 5, 2), Lost(ms(1002), 5, 5),
                                  Lost(ms(1003), 1, 7)}),
            "00:00:01.000 LOST 5 events (5 ring buffer full)\n"
            "00:00:01.001 LOST 5 events (3 ring buffer full, 2 program runs the kernel skipped)\n"
            "00:00:01.002 LOST 5 events (5 program runs the kernel skipped)\n"
            "00:00:01.003 LOST 1 events (1 program runs the kernel skipped)\n");
}

// A vanished connection's line names it as the tracker knew it, with its
// last state and the time spent there before the audit missed it.
TEST(Sinks, VanishedLine) {
  const Event st = State(ms(1000), 5, kTcpEstablished, kTcpFinWait1).owner(42, "srv");
  const Event gone = Vanished(ms(3500), 5, kTcpFinWait1, ms(1000));
  const auto json = split_lines(sink_text<JsonLinesSink>({st, gone}));
  ASSERT_EQ(json.size(), 2u);
  EXPECT_EQ(json[1], R"({"type":"vanished","time":"1970-01-01T00:00:03.500000000Z","conn":5,)"
                     R"("netns":4026531840,"family":4,"laddr":"10.0.0.1","lport":40000,)"
                     R"("raddr":"10.0.0.2","rport":80,)"
                     R"("pid":42,"comm":"srv","state":"FIN_WAIT1","ms":2500.000,"owner":"syscall",)"
                     R"("rx_queue":0})");
  EXPECT_EQ(split_lines(sink_text<TableSink>({st, gone})).at(1),
            "00:00:03.500 42      srv             10.0.0.1:40000        10.0.0.2:80           "
            "VANISHED in FIN_WAIT1: gone from the socket table, its end was lost");
}

// Lines name a connection as it is now, though a connection's identity is
// mostly the same from line to line (the sinks keep its text): the local
// port set at connect, the owner refined by a worker's first I/O; 3,000
// connections, in groups of up to 700 interleaved, share the sinks' room
// for it.
struct IdentityChurn {
  struct Want {
    uint16_t lport, rport;
    uint32_t pid;
    std::string comm;
  };
  std::vector<Event> events;
  std::vector<Want> want;  // per public line, in order

  IdentityChurn() {
    constexpr uint64_t kConns = 3000, kActive = 1500;
    auto comm_of = [](uint64_t c) { return "c" + std::to_string(c % 7); };
    // The worker: another process of the same name (odd), or the same
    // process under a new name after exec (even).
    auto worker_pid = [](uint64_t c) {
      return static_cast<uint32_t>(c % 2 ? 5000 + c : 100 + c % 11);
    };
    auto worker_of = [&](uint64_t c) { return c % 2 ? comm_of(c) : "w" + std::to_string(c % 5); };
    uint64_t t = ms(1);
    // In groups, each group's three rounds before the next group: lines of
    // one connection in a row, or far apart.
    constexpr uint64_t kGroups[] = {1, 3, 50, 700};
    for (uint64_t first = 1, g = 0; first <= kConns; first += kGroups[g++ % 4]) {
      const uint64_t last = std::min(kConns, first + kGroups[g % 4] - 1);
      for (int round = 0; round < 3; ++round) {
        for (uint64_t c = first; c <= last; ++c) {
          const auto rport = static_cast<uint16_t>(1000 + c);
          const auto pid = static_cast<uint32_t>(100 + c % 11);
          const auto lport = static_cast<uint16_t>(20000 + c);
          if (c <= kActive) {  // connect(): no local port yet, then one
            const uint8_t from[] = {kTcpClose, kTcpSynSent, kTcpEstablished};
            const uint8_t to[] = {kTcpSynSent, kTcpEstablished, kTcpFinWait1};
            const uint16_t port = round == 0 ? 0 : lport;
            add(State(t++, c, from[round], to[round])
                    .lport(port)
                    .rport(rport)
                    .owner(pid, comm_of(c)),
                {port, rport, pid, comm_of(c)});
          } else if (round == 0) {  // accepted: the listener's owner
            add(State(t++, c, kTcpListen, kTcpSynRecv)
                    .lport(80)
                    .rport(rport)
                    .owner(pid, comm_of(c), TCPSCOPE_OWNER_LISTENER),
                {80, rport, pid, comm_of(c)});
          } else if (round == 1) {  // a worker's first I/O (no line of its own)
            events.push_back(Owner(t++, c, kTcpSynRecv, worker_pid(c), worker_of(c))
                                 .lport(80)
                                 .rport(rport)
                                 .get());
            events.back().owner_src = TCPSCOPE_OWNER_IO;
            add(State(t++, c, kTcpSynRecv, kTcpEstablished).lport(80).rport(rport),
                {80, rport, worker_pid(c), worker_of(c)});
          } else {
            add(State(t++, c, kTcpEstablished, kTcpCloseWait).lport(80).rport(rport),
                {80, rport, worker_pid(c), worker_of(c)});
          }
        }
      }
    }
  }
  void add(const Event& e, Want w) {
    events.push_back(e);
    want.push_back(std::move(w));
  }
};

TEST(JsonLinesSink, IdentityFollowsTheConnection) {
  const IdentityChurn churn;
  const auto lines = split_lines(sink_text<JsonLinesSink>(churn.events));
  ASSERT_EQ(lines.size(), churn.want.size());
  for (size_t i = 0; i < lines.size(); ++i) {
    const json j = json::parse(lines[i]);
    const auto& w = churn.want[i];
    ASSERT_EQ(j["lport"], w.lport) << lines[i];
    ASSERT_EQ(j["pid"], w.pid) << lines[i];
    ASSERT_EQ(j["comm"], w.comm) << lines[i];
    ASSERT_EQ(j["rport"], w.rport) << lines[i];
  }
}

TEST(TableSink, IdentityFollowsTheConnection) {
  const IdentityChurn churn;
  const auto lines = split_lines(sink_text<TableSink>(churn.events));
  ASSERT_EQ(lines.size(), churn.want.size());
  for (size_t i = 0; i < lines.size(); ++i) {
    const auto& w = churn.want[i];
    std::istringstream row(lines[i]);
    std::string time, pid, comm, local, remote;
    row >> time >> pid >> comm >> local >> remote;
    ASSERT_EQ(pid, std::to_string(w.pid)) << lines[i];
    ASSERT_EQ(comm, w.comm) << lines[i];
    ASSERT_EQ(local, "10.0.0.1:" + std::to_string(w.lport)) << lines[i];
    ASSERT_EQ(remote, "10.0.0.2:" + std::to_string(w.rport)) << lines[i];
  }
}

TEST(Sinks, EndRecordWritesNoLine) {
  MemFile f;
  {
    FdWriter out(f.fd());
    TimeFormatter time(0);
    JsonLinesSink js(out, time);
    TableSink ts(out, time);
    const Event end = End(ms(5));
    Tracked t;
    t.ev = &end;
    js.on_event(t);
    ts.on_event(t);
    EXPECT_EQ(out.buf().size(), 0u);
  }
  EXPECT_EQ(f.contents(), "");
}

// ---- determinism ------------------------------------------------------------------------

// A few hundred lifecycles of every kind with ids in hash-unfriendly order.
std::vector<Event> churn() {
  std::vector<Event> evs;
  uint64_t x = 12345;
  auto next = [&x] {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    return x >> 33;
  };
  for (uint64_t i = 0; i < 400; ++i) {
    const uint64_t id = next() | 1;
    const uint64_t t = ms(10) * (i / 4);  // four starts share each time
    switch (i % 6) {
      case 0:
        evs.push_back(State(t + 1, id, kTcpClose, kTcpSynSent).lport(0).owner(100 + i, "cli"));
        evs.push_back(State(t + 2, id, kTcpSynSent, kTcpEstablished).lport(1000 + i));
        evs.push_back(Retransmit(t + 3, id, kTcpEstablished, TCPSCOPE_TCP_ACK, 10));
        evs.push_back(State(t + 4, id, kTcpEstablished, kTcpFinWait1));
        evs.push_back(State(t + 5, id, kTcpFinWait1, kTcpFinWait2));
        evs.push_back(State(t + 6, id, kTcpFinWait2, kTcpClose));
        break;
      case 1:
        evs.push_back(State(t + 1, id, kTcpListen, kTcpSynRecv).owner(7, "srv"));
        evs.push_back(State(t + 2, id, kTcpSynRecv, kTcpEstablished));
        evs.push_back(State(t + 3, id, kTcpEstablished, kTcpCloseWait));
        evs.push_back(State(t + 4, id, kTcpCloseWait, kTcpLastAck));
        evs.push_back(State(t + 5, id, kTcpLastAck, kTcpClose));
        break;
      case 2:
        evs.push_back(State(t + 1, id, kTcpClose, kTcpSynSent));
        for (int k = 0; k < int(i % 5); ++k)
          evs.push_back(Retransmit(t + 2 + k, id, kTcpSynSent, TCPSCOPE_TCP_SYN, 0));
        evs.push_back(State(t + 9, id, kTcpSynSent, kTcpClose));
        break;
      case 3:
        evs.push_back(Retransmit(t + 1, id, kTcpEstablished, TCPSCOPE_TCP_ACK, 5));
        evs.push_back(ResetReceived(t + 2, id, kTcpEstablished));
        evs.push_back(State(t + 2, id, kTcpEstablished, kTcpClose));
        break;
      case 4:
        evs.push_back(State(t + 1, id, kTcpEstablished, kTcpFinWait1));
        evs.push_back(Retransmit(t + 2, id, kTcpFinWait1, TCPSCOPE_TCP_FIN, 0));
        break;
      case 5:
        evs.push_back(Lost(t + 1, i));
        evs.push_back(State(t + 1, id, kTcpClose, kTcpListen).owner(7, "srv"));
        break;
    }
  }
  evs.push_back(End(ms(5000)));
  return evs;
}

std::string run_pipeline(const std::vector<Event>& evs, bool json_lines) {
  MemFile f;
  {
    FdWriter out(f.fd(), 4096);
    TimeFormatter time(1'700'000'000'000'000'000);
    JsonLinesSink js(out, time);
    TableSink ts(out, time);
    Pipeline p;
    add_core_analyzers(p, 5);
    p.add_analyzer(std::make_unique<FieldNotice>());
    if (json_lines)
      p.add_sink(&js);
    else
      p.add_sink(&ts);
    for (const Event& e : evs) p.process(e);
  }
  return f.contents();
}

TEST(Pipeline, DeterministicOutput) {
  const auto evs = churn();
  for (bool json_lines : {true, false}) {
    const std::string a = run_pipeline(evs, json_lines);
    const std::string b = run_pipeline(evs, json_lines);
    EXPECT_EQ(a, b);
    // One line per event but END, one notice per socket (listeners too),
    // then the report.
    const auto lines = split_lines(a);
    if (json_lines) {
      // Reset records are not lines of their own without the reset analysis.
      const auto resets = std::count_if(evs.begin(), evs.end(), [](const Event& e) {
        return e.type == TCPSCOPE_EV_RESET_SENT || e.type == TCPSCOPE_EV_RESET_RECEIVED;
      });
      EXPECT_EQ(lines.size(), (evs.size() - 1) - static_cast<size_t>(resets) + 400 + 1);
      const json rep = json::parse(lines.back());
      EXPECT_EQ(rep["connections"]["total"], 334);
      EXPECT_EQ(rep["connections"]["listeners"], 66);
      EXPECT_EQ(rep["connections"]["by_close"]["active_close"], 67);
      EXPECT_EQ(rep["connections"]["by_close"]["passive_close"], 67);
      EXPECT_EQ(rep["connections"]["by_close"]["aborted"], 67);
      EXPECT_EQ(rep["connections"]["by_close"]["reset_received"], 67);
      EXPECT_EQ(rep["connections"]["by_close"]["open"], 66);  // mid-life, never closed
      EXPECT_EQ(rep["connections"]["by_open"]["unknown"], 67 + 66);
      EXPECT_EQ(rep["retransmits"]["top"].size(), 5u);
      EXPECT_EQ(rep["retransmits"]["top"][0]["count"], 4);
    }
  }
}

}  // namespace
}  // namespace tcpscope
