// tcpscope reports its own overhead in one `stats` line before the report:
// records delivered, lost, BPF run time (sampled), CPU time, peak RSS.
#include <algorithm>

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>

#include "harness.hpp"

namespace ktest {
namespace {

class StatsTest : public KernelTest {};

// The connections whose state path is not a whole one, with their events:
// what a shortfall of state lines lacks.
std::string incomplete_paths(const Tracer& tracer) {
  std::string out;
  for (uint64_t c : tracer.conns()) {
    const auto path = tracer.state_path(c);
    if (path.empty() || path == kListenerPath || path == kActiveOpenActiveClose ||
        path == kPassiveOpenPassiveClose)
      continue;
    out += "incomplete conn " + std::to_string(c) + ":\n" + dump(tracer.events_for(c));
  }
  return out;
}

TEST_F(StatsTest, OneStatsLineWithOwnOverheadBeforeTheReport) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();
  // Traffic right away: the first BPF statistics window is the first second.
  constexpr int kConnections = 50;
  for (int i = 0; i < kConnections; ++i) make_connection(ns, ConnSpec{});
  // ss shows a tw sock before the kernel reports the CLOSE it replaces:
  // wait for every transition (a shortfall still fails below).
  tracer.wait_for(
      [](const std::vector<json>& l) {
        return std::count_if(l.begin(), l.end(), [](const json& j) {
                 return j.value("type", "") == "state";
               }) >= kConnections * 12;
      },
      5000ms);
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();

  const auto lines = tracer.lines();
  ASSERT_GE(lines.size(), 3u);
  const auto stats = tracer.events("stats");
  ASSERT_EQ(stats.size(), 1u) << dump(lines);
  // The last line is the report; the stats line comes just before it.
  EXPECT_EQ(lines.back().value("type", ""), "report");
  EXPECT_EQ(lines[lines.size() - 2].value("type", ""), "stats");

  const json& s = stats[0];
  const auto state_lines = tracer.events("state").size();
  // make_connection: a listener (2 transitions) and two sockets (5 each).
  EXPECT_EQ(state_lines, static_cast<size_t>(kConnections * 12))
      << incomplete_paths(tracer) << tracer.diagnostics();
  EXPECT_GE(s["events"].get<uint64_t>(), state_lines);  // tw timer records come too
  // The stats line counts what the report counts.
  EXPECT_EQ(s["lost"], tracer.report()["lost_events"]);
  EXPECT_EQ(ring_full_losses(tracer.report()), 0u);
  EXPECT_EQ(s["owners_not_kept"], 0);
  ASSERT_TRUE(s["bpf_runs"].is_number()) << s.dump();
  EXPECT_GT(s["bpf_runs"].get<uint64_t>(), 0u);
  EXPECT_GT(s["bpf_ns"].get<uint64_t>(), 0u);
  EXPECT_GT(s["bpf_sampled_events"].get<uint64_t>(), 0u);
  EXPECT_LE(s["bpf_sampled_events"].get<uint64_t>(), s["events"].get<uint64_t>());
  EXPECT_NEAR(s["bpf_ns_per_event"].get<double>(),
              s["bpf_ns"].get<double>() / s["bpf_sampled_events"].get<double>(), 0.001);
  EXPECT_GT(s["max_rss_kib"].get<uint64_t>(), 1024u);
  EXPECT_GE(s["user_cpu_s"].get<double>() + s["sys_cpu_s"].get<double>(), 0.0);
}

// SIGUSR1 asks a live trace for its --stats line so far, on stderr (as dd
// reports its progress); tracing goes on, and ends with the report.
TEST_F(StatsTest, Sigusr1PrintsTheStatsLineSoFarAndTracingGoesOn) {
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns)) << tracer.diagnostics();
  make_connection(ns, ConnSpec{});
  ASSERT_TRUE(tracer.wait_for([](const std::vector<json>& l) {
    return count_type(l, "state") >= 12;
  })) << tracer.diagnostics();
  ASSERT_EQ(kill(tracer.pid(), SIGUSR1), 0);
  ASSERT_TRUE(wait_until([&] {
    return tracer.stderr_text().find("tcpscope: stats: events ") != std::string::npos;
  })) << tracer.diagnostics();
  make_connection(ns, ConnSpec{});
  EXPECT_TRUE(tracer.wait_for([](const std::vector<json>& l) {
    return count_type(l, "state") >= 22;
  })) << tracer.diagnostics();
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();
  EXPECT_EQ(tracer.lines().back().value("type", ""), "report");
}

}  // namespace
}  // namespace ktest
