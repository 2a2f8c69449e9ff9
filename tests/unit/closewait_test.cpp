// CloseWaitAnalyzer on synthetic record sequences: threshold crossing on
// event time, holder batches, pre-existing sockets, the report lists.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "tcpscope/closewait.hpp"
#include "test_events.hpp"

namespace tcpscope::test {
namespace {

using nlohmann::json;

constexpr uint64_t s(double v) { return static_cast<uint64_t>(v * 1e9); }
const std::string kHex64 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

Event Config(uint64_t ts, uint32_t threshold_ms, bool holders) {
  Event e{};
  e.type = TCPSCOPE_EV_CONFIG;
  e.ts_ns = ts;
  e.tx_queue = threshold_ms;
  e.aux = holders ? TCPSCOPE_CONFIG_HOLDERS : 0;
  return e;
}
Event Tick(uint64_t ts) {
  Event e{};
  e.type = TCPSCOPE_EV_TICK;
  e.ts_ns = ts;
  return e;
}
Event Holder(uint64_t ts, uint64_t conn, uint32_t pid, uint32_t fd, uint32_t idx, uint32_t total,
             uint32_t rx, std::string_view comm = "worker") {
  Ev b(TCPSCOPE_EV_HOLDER, ts, conn);
  b.owner(pid, comm, 0).rx_queue(rx).reason(fd).seg_len(idx);
  Event e = b;
  e.tx_queue = total;
  e.old_state = e.new_state = kTcpCloseWait;
  return e;
}
Event Proc(uint64_t ts, uint32_t pid, std::string_view comm, uint64_t start, uint64_t cgroup) {
  Event e{};
  e.type = TCPSCOPE_EV_PROC;
  e.ts_ns = ts;
  e.pid = pid;
  std::memcpy(e.comm, comm.data(), std::min<size_t>(comm.size(), 15));
  e.aux = start;
  e.cgroup = cgroup;
  return e;
}
// The PROC_TEXT records of one text, in 48-byte pieces.
std::vector<Event> ProcText(uint64_t ts, uint32_t pid, uint32_t kind, std::string_view text) {
  std::vector<Event> v;
  for (size_t off = 0; off < text.size(); off += TCPSCOPE_TEXT_CHUNK) {
    Event e{};
    e.type = TCPSCOPE_EV_PROC_TEXT;
    e.ts_ns = ts;
    e.pid = pid;
    e.reason = kind;
    e.seg_len = static_cast<uint32_t>(off);
    e.rx_queue = static_cast<uint32_t>(std::min<size_t>(48, text.size() - off));
    e.tx_queue = static_cast<uint32_t>(text.size());
    std::memcpy(reinterpret_cast<char*>(&e) + offsetof(Event, laddr), text.data() + off,
                e.rx_queue);
    v.push_back(e);
  }
  return v;
}
Event Snapshot(uint64_t ts, uint64_t conn, uint8_t state, uint32_t ago_ms, uint32_t rx) {
  Ev b(TCPSCOPE_EV_SNAPSHOT, ts, conn);
  b.states(state, state).seg_len(ago_ms).rx_queue(rx).sk_flags(TCPSCOPE_SK_SNAPSHOT);
  return b;
}
Event EnterCloseWait(uint64_t ts, uint64_t conn, uint32_t rx, uint16_t lport = 40000) {
  return State(ts, conn, kTcpEstablished, kTcpCloseWait)
      .owner(100, "app")
      .rx_queue(rx)
      .lport(lport);
}

// Notices as JSON (identity plus fields), and the report.
struct Capture : Sink {
  void on_notice(const Notice& n) override {
    json j;
    j["type"] = std::string(n.type);
    j["ts"] = n.ts_ns;
    if (n.conn) {
      j["conn"] = n.conn->id;
      j["pid"] = n.conn->pid;
      j["comm"] = std::string(n.conn->comm.data(), strnlen(n.conn->comm.data(), 16));
      j["lport"] = n.conn->lport;
    }
    for (int i = 0; i < n.nfields; ++i) {
      const auto& f = n.fields[i];
      if (f.is_text)
        j[std::string(f.key)] = std::string(f.text);
      else if (f.is_bool)
        j[std::string(f.key)] = f.number != 0;
      else
        j[std::string(f.key)] = f.number;
    }
    notices.push_back(j);
  }
  std::vector<json> of(const std::string& type) const {
    std::vector<json> v;
    for (const auto& n : notices)
      if (n["type"] == type) v.push_back(n);
    return v;
  }
  std::vector<json> notices;
};

struct CwRun {
  CwRun() {
    p.add_default_analyzers(10);
    p.add_sink(&cap);
  }
  void feed(const std::vector<Event>& evs) {
    for (const Event& e : evs) p.process(e);
  }
  void feed(const Event& e) { p.process(e); }
  std::string report_text_json() const {
    fmt::memory_buffer buf;
    JsonWriter w(buf);
    TimeFormatter tf(0);
    w.begin_object();
    p.write_report_json(w, tf);
    w.end_object();
    return fmt::to_string(buf);
  }
  json report() const { return json::parse(report_text_json()); }
  std::string text() const {
    fmt::memory_buffer buf;
    TimeFormatter tf(0);
    p.write_report_text(buf, tf, TextStyle{10});
    return fmt::to_string(buf);
  }
  Pipeline p;
  Capture cap;
};

std::vector<Event> holder_story() {
  std::vector<Event> v = {Config(s(1), 1000, true), EnterCloseWait(s(10), 1, 8), Tick(s(10.5)),
                          Proc(s(10.8), 200, "worker", s(5), 77)};
  const std::string cmd =
      "/usr/bin/worker --serve --listen 0.0.0.0:8080 --config /etc/worker/worker.conf -v";
  for (auto& e : ProcText(s(10.8), 200, TCPSCOPE_TEXT_CMDLINE, cmd)) v.push_back(e);
  for (auto& e :
       ProcText(s(10.8), 200, TCPSCOPE_TEXT_CGROUP, "/system.slice/docker-" + kHex64 + ".scope"))
    v.push_back(e);
  v.push_back(Holder(s(10.8), 1, 200, 9, 0, 2, 8));
  v.push_back(Holder(s(10.8), 1, 200, 7, 1, 2, 8));
  v.push_back(Tick(s(10.9)));
  return v;
}

TEST(CloseWait, StuckNoticeAtThresholdNamesHolders) {
  CwRun r;
  r.feed(holder_story());
  EXPECT_TRUE(r.cap.of("close_wait_stuck").empty()) << "not yet over the threshold";
  r.feed(Tick(s(11.2)));
  auto stuck = r.cap.of("close_wait_stuck");
  ASSERT_EQ(stuck.size(), 1u);
  const json& n = stuck[0];
  EXPECT_EQ(n["ts"], s(11));  // the crossing itself, not the tick that saw it
  EXPECT_EQ(n["conn"], 1u);
  EXPECT_EQ(n["pid"], 200u);
  EXPECT_EQ(n["comm"], "worker");
  EXPECT_EQ(n["fd"], 7);
  EXPECT_EQ(n["holder_fds"], "200:7,200:9");
  EXPECT_EQ(n["holders"], 1);
  EXPECT_EQ(n["cmdline"],
            "/usr/bin/worker --serve --listen 0.0.0.0:8080 --config /etc/worker/worker.conf -v");
  EXPECT_EQ(n["container"], kHex64);
  EXPECT_EQ(n["recv_q"], 7);  // 8 in the queue: 7 bytes and the FIN
  EXPECT_EQ(n["eof_read"], false);
  EXPECT_EQ(n["owner_pid"], 100);
  EXPECT_EQ(n["age_ms"], 1000);
  EXPECT_EQ(n["threshold_ms"], 1000);
  EXPECT_EQ(n["preexisting"], false);

  r.feed(State(s(14.5), 1, kTcpCloseWait, kTcpLastAck).owner(200, "worker").rx_queue(0));
  auto end = r.cap.of("close_wait_end");
  ASSERT_EQ(end.size(), 1u);
  EXPECT_EQ(end[0]["ts"], s(14.5));
  EXPECT_EQ(end[0]["duration_ms"], 4500);
  EXPECT_EQ(end[0]["stuck_ms"], 3500);
  EXPECT_EQ(end[0]["new"], "LAST_ACK");
  EXPECT_EQ(end[0]["pid"], 200u);
  r.feed(End(s(20)));

  const json rep = r.report();
  ASSERT_EQ(rep["close_wait"].size(), 1u);
  const json& row = rep["close_wait"][0];
  EXPECT_EQ(row["pid"], 200);
  EXPECT_EQ(row["comm"], "worker");
  EXPECT_EQ(row["fd"], 7);
  EXPECT_EQ(row["fds"], json::array({7, 9}));
  EXPECT_DOUBLE_EQ(row["age_s"].get<double>(), 4.5);
  EXPECT_EQ(row["laddr"], "10.0.0.1");
  EXPECT_EQ(row["lport"], 40000);
  EXPECT_EQ(row["raddr"], "10.0.0.2");
  EXPECT_EQ(row["rport"], 80);
  EXPECT_EQ(row["recv_q"], 7);
  EXPECT_EQ(row["holder"], "fd");
  EXPECT_EQ(row["cgroup_id"], 77);
  EXPECT_EQ(row["container"], kHex64);
  EXPECT_EQ(row["open"], false);
  EXPECT_EQ(row["preexisting"], false);
  ASSERT_EQ(rep["close_wait_by_process"].size(), 1u);
  const json& bp = rep["close_wait_by_process"][0];
  EXPECT_EQ(bp["pid"], 200);
  EXPECT_EQ(bp["count"], 1);
  EXPECT_EQ(bp["open"], 0);
  EXPECT_DOUBLE_EQ(bp["oldest_s"].get<double>(), 4.5);
  EXPECT_EQ(bp["remotes"], json::parse(R"([{"raddr":"10.0.0.2","rport":80,"count":1}])"));
  const json& sum = rep["close_wait_summary"];
  EXPECT_EQ(sum["entered"], 1);
  EXPECT_EQ(sum["stuck"], 1);
  EXPECT_EQ(sum["stuck_open"], 0);
  EXPECT_EQ(sum["closed_after_stuck"], 1);
  EXPECT_EQ(sum["closed_in_time"], 0);
  EXPECT_NE(r.text().find("pid 200 worker: 1 sockets"), std::string::npos) << r.text();
}

TEST(CloseWait, ClosedBeforeThresholdIsNotStuck) {
  CwRun r;
  r.feed({Config(s(1), 1000, true), EnterCloseWait(s(10), 1, 1),
          Holder(s(10.8), 1, 200, 7, 0, 1, 1), Tick(s(10.85)),
          State(s(10.9), 1, kTcpCloseWait, kTcpLastAck), Tick(s(11.5)), Tick(s(15)), End(s(16))});
  EXPECT_TRUE(r.cap.of("close_wait_stuck").empty());
  EXPECT_TRUE(r.cap.of("close_wait_end").empty());
  const json rep = r.report();
  EXPECT_TRUE(rep["close_wait"].empty());
  EXPECT_TRUE(rep["close_wait_by_process"].empty());
  EXPECT_EQ(rep["close_wait_summary"]["entered"], 1);
  EXPECT_EQ(rep["close_wait_summary"]["stuck"], 0);
  EXPECT_EQ(rep["close_wait_summary"]["closed_in_time"], 1);
}

TEST(CloseWait, ExactlyAtThresholdIsStuckOneNanosecondBeforeIsNot) {
  CwRun r;
  r.feed({Config(s(1), 1000, false), EnterCloseWait(s(10), 1, 1),
          EnterCloseWait(s(10), 2, 1, 40001), Tick(s(11) - 1)});
  EXPECT_TRUE(r.cap.of("close_wait_stuck").empty());
  r.feed(Tick(s(11)));
  EXPECT_EQ(r.cap.of("close_wait_stuck").size(), 2u);
}

TEST(CloseWait, NoticeWaitsForHoldersThenGoesWithTheOwner) {
  CwRun r;
  r.feed({Config(s(1), 1000, true), EnterCloseWait(s(10), 1, 1), Tick(s(11.5)), Tick(s(20.9))});
  EXPECT_TRUE(r.cap.of("close_wait_stuck").empty()) << "holders are being resolved";
  r.feed(Tick(s(21)));  // crossing + 10 s: give up waiting
  auto stuck = r.cap.of("close_wait_stuck");
  ASSERT_EQ(stuck.size(), 1u);
  EXPECT_EQ(stuck[0]["ts"], s(11));
  EXPECT_EQ(stuck[0]["pid"], 100u);  // the owner the kernel side learnt
  EXPECT_EQ(stuck[0]["holders"], 0);
  EXPECT_EQ(stuck[0]["fd"], -1);
  EXPECT_EQ(stuck[0]["eof_read"], false);
  EXPECT_EQ(stuck[0]["recv_q"], 0);
  r.feed(End(s(30)));
  const json rep = r.report();
  ASSERT_EQ(rep["close_wait"].size(), 1u);
  EXPECT_EQ(rep["close_wait"][0]["holder"], "owner");
  EXPECT_EQ(rep["close_wait"][0]["pid"], 100);
  EXPECT_TRUE(rep["close_wait"][0]["fd"].is_null());
  EXPECT_EQ(rep["close_wait"][0]["open"], true);
  EXPECT_DOUBLE_EQ(rep["close_wait"][0]["age_s"].get<double>(), 20.0);
}

TEST(CloseWait, WithoutHolderResolutionNoticeAtFirstRecordPastThreshold) {
  CwRun r;
  r.feed({Config(s(1), 2500, false), EnterCloseWait(s(10), 1, 1), Tick(s(12)), Tick(s(13))});
  auto stuck = r.cap.of("close_wait_stuck");
  ASSERT_EQ(stuck.size(), 1u);
  EXPECT_EQ(stuck[0]["ts"], s(12.5));
  EXPECT_EQ(stuck[0]["threshold_ms"], 2500);
}

TEST(CloseWait, PreexistingSocketFromSnapshotWithAgeBound) {
  CwRun r;
  r.feed({Config(s(1), 1000, false), State(s(99.9), 6, kTcpEstablished, kTcpCloseWait).lport(40006),
          Snapshot(s(100), 5, kTcpCloseWait, 30000, 0),
          Snapshot(s(100), 6, kTcpCloseWait, 5, 1),  // its own event came first
          Snapshot(s(100), 7, kTcpEstablished, 10, 0),
          Snapshot(s(100), 8, kTcpCloseWait, 0xffffffffu, 1)});  // age unknown
  auto stuck = r.cap.of("close_wait_stuck");
  ASSERT_EQ(stuck.size(), 1u) << "found stuck at start";
  EXPECT_EQ(stuck[0]["conn"], 5u);
  EXPECT_EQ(stuck[0]["ts"], s(100));
  EXPECT_EQ(stuck[0]["age_ms"], 30000);
  EXPECT_EQ(stuck[0]["preexisting"], true);
  EXPECT_EQ(stuck[0]["eof_read"], true);
  const Connection* c = r.p.tracker().find(5);
  ASSERT_NE(c, nullptr);
  EXPECT_TRUE(c->snapshot);
  EXPECT_EQ(c->open_kind, OpenKind::Unknown);
  EXPECT_EQ(c->state, kTcpCloseWait);
  EXPECT_FALSE(r.p.tracker().find(6)->snapshot);
  r.feed(Tick(s(101)));  // conn 6 (entered 99.9) and conn 8 (bound: 100)
  stuck = r.cap.of("close_wait_stuck");
  ASSERT_EQ(stuck.size(), 3u);
  EXPECT_EQ(stuck[1]["conn"], 6u);
  EXPECT_EQ(stuck[1]["preexisting"], false);
  EXPECT_EQ(stuck[2]["conn"], 8u);
  EXPECT_EQ(stuck[2]["ts"], s(101));
  r.feed(End(s(110)));
  const json rep = r.report();
  EXPECT_EQ(rep["close_wait_summary"]["entered"], 3);
  EXPECT_EQ(rep["close_wait_summary"]["preexisting"], 2);
  ASSERT_EQ(rep["close_wait"].size(), 3u);
  EXPECT_EQ(rep["close_wait"][0]["conn"], 5u);  // oldest first
  EXPECT_DOUBLE_EQ(rep["close_wait"][0]["age_s"].get<double>(), 40.0);
  EXPECT_EQ(rep["close_wait"][0]["preexisting"], true);
  EXPECT_EQ(rep["connections"]["by_open"]["unknown"], 4);
}

TEST(CloseWait, EverySocketAndHolderIsARowProcessesSortedByCount) {
  CwRun r;
  std::vector<Event> v = {Config(s(1), 1000, true), EnterCloseWait(s(10), 1, 1, 41001),
                          EnterCloseWait(s(10.1), 2, 1, 41002),
                          Proc(s(10.8), 300, "parent", s(2), 0),
                          Proc(s(10.8), 301, "child", s(3), 0)};
  for (auto& e : ProcText(s(10.8), 300, TCPSCOPE_TEXT_CMDLINE, "parent --fork")) v.push_back(e);
  // conn 1: parent and forked child; conn 2: only the child.
  v.push_back(Holder(s(10.8), 1, 300, 5, 0, 2, 1, "parent"));
  v.push_back(Holder(s(10.8), 1, 301, 5, 1, 2, 1, "child"));
  v.push_back(Holder(s(10.8), 2, 301, 6, 0, 1, 1, "child"));
  v.push_back(Tick(s(12)));
  v.push_back(End(s(20)));
  r.feed(v);
  auto stuck = r.cap.of("close_wait_stuck");
  ASSERT_EQ(stuck.size(), 2u);
  EXPECT_EQ(stuck[0]["holder_fds"], "300:5,301:5");
  EXPECT_EQ(stuck[0]["holders"], 2);
  EXPECT_EQ(stuck[1]["pid"], 301u);
  const json rep = r.report();
  ASSERT_EQ(rep["close_wait"].size(), 3u);
  EXPECT_EQ(rep["close_wait"][0]["pid"], 300);
  EXPECT_EQ(rep["close_wait"][0]["cmdline"], "parent --fork");
  EXPECT_EQ(rep["close_wait"][1]["pid"], 301);
  EXPECT_EQ(rep["close_wait"][1]["lport"], 41001);
  EXPECT_EQ(rep["close_wait"][2]["lport"], 41002);
  ASSERT_EQ(rep["close_wait_by_process"].size(), 2u);
  EXPECT_EQ(rep["close_wait_by_process"][0]["pid"], 301);
  EXPECT_EQ(rep["close_wait_by_process"][0]["comm"], "child");
  EXPECT_EQ(rep["close_wait_by_process"][0]["count"], 2);
  EXPECT_EQ(rep["close_wait_by_process"][1]["pid"], 300);
  EXPECT_EQ(rep["close_wait_by_process"][1]["count"], 1);
}

TEST(CloseWait, LaterBatchReplacesHoldersAndScanCostIsReported) {
  CwRun r;
  Event scan{};
  scan.type = TCPSCOPE_EV_HOLDER_SCAN;
  scan.ts_ns = s(10.8);
  scan.aux = 3'000'000;
  scan.sk = 500'000;
  scan.cgroup = 2'000'000;
  scan.conn = 811;
  scan.seg_len = 122;
  scan.reason = 1;
  scan.rx_queue = 1;
  scan.tx_queue = 2;
  r.feed({Config(s(1), 1000, true), EnterCloseWait(s(10), 1, 1),
          Holder(s(10.8), 1, 300, 5, 0, 1, 1), scan, Tick(s(11.1)), Holder(s(40), 1, 0, 0, 0, 0, 3),
          scan, End(s(50))});
  const json rep = r.report();
  ASSERT_EQ(rep["close_wait"].size(), 1u);
  EXPECT_EQ(rep["close_wait"][0]["holder"], "owner");  // the holder went away
  EXPECT_EQ(rep["close_wait"][0]["recv_q"], 2);
  const json& sc = rep["close_wait_scan"];
  EXPECT_EQ(sc["rounds"], 2);
  EXPECT_EQ(sc["steps"], 4);
  EXPECT_EQ(sc["fds"], 1622);
  EXPECT_EQ(sc["processes"], 244);
  EXPECT_EQ(sc["sockets_searched"], 2);
  EXPECT_EQ(sc["sockets_found"], 2);
  EXPECT_EQ(sc["proc_us"], 6000);
  EXPECT_EQ(sc["proc_max_round_us"], 3000);
  EXPECT_EQ(sc["proc_max_step_us"], 2000);
  EXPECT_EQ(sc["iter_us"], 1000);
}

TEST(CloseWait, SameRecordsSameReportAndNotices) {
  std::vector<Event> v = holder_story();
  v.push_back(Tick(s(11.2)));
  v.push_back(EnterCloseWait(s(12), 9, 1, 40009));
  v.push_back(Tick(s(14)));
  v.push_back(End(s(15)));
  CwRun a, b;
  a.feed(v);
  b.feed(v);
  EXPECT_EQ(a.report_text_json(), b.report_text_json());
  EXPECT_EQ(a.cap.notices, b.cap.notices);
  EXPECT_EQ(a.text(), b.text());
  EXPECT_EQ(a.cap.of("close_wait_stuck").size(), 2u);
}

TEST(CloseWait, DefaultThresholdIsSixtySeconds) {
  CwRun r;
  r.feed({EnterCloseWait(s(10), 1, 1), Tick(s(69.9))});
  EXPECT_TRUE(r.cap.of("close_wait_stuck").empty());
  r.feed(Tick(s(70)));
  EXPECT_EQ(r.cap.of("close_wait_stuck").size(), 1u);
}

TEST(CloseWait, ContainerId) {
  EXPECT_EQ(container_id("/system.slice/docker-" + kHex64 + ".scope"), kHex64);
  EXPECT_EQ(container_id("/kubepods/burstable/pod1234/cri-containerd-" + kHex64 + ".scope"),
            kHex64);
  EXPECT_EQ(container_id("/docker/" + kHex64), kHex64);
  EXPECT_EQ(container_id("/user.slice/user-0.slice/session-1.scope"), "");
  EXPECT_EQ(container_id("/" + kHex64 + "0"), "");  // 65 digits: not an id
  EXPECT_EQ(container_id(""), "");
}

TEST(FlatMap, MatchesUnorderedMapUnderRandomInsertErase) {
  FlatMap<uint64_t> m;
  std::unordered_map<uint64_t, uint64_t> ref;
  std::mt19937_64 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const uint64_t k = 1 + rng() % 5000;
    if (rng() % 3 == 0) {
      EXPECT_EQ(m.erase(k), ref.erase(k) == 1);
    } else {
      m.put(k, i);
      ref[k] = i;
    }
    if (i % 997 == 0) {
      ASSERT_EQ(m.size(), ref.size());
      for (const auto& [rk, rv] : ref) {
        const uint64_t* v = m.find(rk);
        ASSERT_NE(v, nullptr);
        ASSERT_EQ(*v, rv);
      }
    }
  }
  size_t n = 0;
  m.for_each([&](uint64_t k, uint64_t& v) {
    ++n;
    EXPECT_EQ(ref.at(k), v);
  });
  EXPECT_EQ(n, ref.size());
}

}  // namespace
}  // namespace tcpscope::test
