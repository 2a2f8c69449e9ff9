// Post-mortem capture with the real binary: record a netns scenario, kill -9
// the recorder, report the file; report --json equals the live JSON of the
// same run; the flight recorder dumps on a late-FIN RST, SIGUSR1 and exit;
// report runs without root.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "harness.hpp"

namespace ktest {
namespace {

namespace fs = std::filesystem;

std::vector<json> parse_lines(const std::string& out, std::vector<std::string>* bad = nullptr) {
  std::vector<json> v;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);) {
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      if (bad) bad->push_back(line);
    } else {
      v.push_back(std::move(j));
    }
  }
  return v;
}

struct Report {
  CmdResult cmd;
  std::vector<json> lines;
  std::vector<std::string> bad;
};
Report report(const std::string& file, const std::vector<std::string>& prefix = {}) {
  std::vector<std::string> argv = prefix;
  argv.insert(argv.end(), {tcpscope_binary(), "report", file, "--json"});
  Report r;
  r.cmd = run_cmd(argv, 30000ms);
  r.lines = parse_lines(r.cmd.out, &r.bad);
  return r;
}

// Lines without the start line (the only one allowed to differ).
std::vector<json> body(const std::vector<json>& lines) {
  if (lines.empty() || lines.front().value("type", "") != "start") return lines;
  return {lines.begin() + 1, lines.end()};
}

class CaptureKernel : public KernelTest {};

TEST_F(CaptureKernel, KillNineThenReport) {
  NetNs ns;
  TempDir dir;
  const std::string file = dir.file("run.cap");
  Tracer rec;
  ASSERT_TRUE(rec.start_raw({"record", "-o", file, "--netns", ns.path(), "--json"}))
      << rec.diagnostics();

  std::vector<ConnPorts> conns;
  for (int i = 0; i < 3; ++i) conns.push_back(make_connection(ns, ConnSpec{}));
  // Every client connection has reached CLOSE in the live output...
  ASSERT_TRUE(rec.wait_for([&](const std::vector<json>& lines) {
    for (const auto& c : conns) {
      bool done = false;
      for (const auto& l : lines)
        done |= l.value("type", "") == "state" && l.value("lport", 0) == c.cport &&
                l.value("new", "") == "CLOSE";
      if (!done) return false;
    }
    return true;
  })) << rec.diagnostics();
  // ...and at least one flush interval has passed: kill -9 must not lose it.
  std::this_thread::sleep_for(1500ms);
  ASSERT_EQ(::kill(rec.pid(), SIGKILL), 0);
  EXPECT_EQ(rec.stop(), 128 + SIGKILL);

  struct stat st {};
  ASSERT_EQ(::stat(file.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);

  const Report r = report(file);
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.err;
  EXPECT_TRUE(r.bad.empty()) << r.bad.front();
  EXPECT_NE(r.cmd.err.find("warning"), std::string::npos) << r.cmd.err;
  EXPECT_NE(r.cmd.err.find("no end marker"), std::string::npos) << r.cmd.err;
  ASSERT_GE(r.lines.size(), 3u);
  EXPECT_EQ(r.lines.front().value("type", ""), "start");
  EXPECT_EQ(r.lines.back().value("type", ""), "report");
  EXPECT_EQ(r.lines.front()["boot_offset_ns"], rec.start_line()["boot_offset_ns"]);

  // Every connection is in the capture with its exact lifecycle.
  for (const auto& c : conns) {
    uint64_t client = 0, server = 0;
    for (const auto& l : r.lines) {
      if (l.value("type", "") != "state") continue;
      if (l.value("lport", 0) == c.cport && l.value("rport", 0) == c.sport)
        client = l["conn"].get<uint64_t>();
      if (l.value("lport", 0) == c.sport && l.value("rport", 0) == c.cport)
        server = l["conn"].get<uint64_t>();
    }
    ASSERT_NE(client, 0u) << dump(r.lines);
    ASSERT_NE(server, 0u) << dump(r.lines);
    EXPECT_EQ(state_path_of(r.lines, client), kActiveOpenActiveClose);
    EXPECT_EQ(state_path_of(r.lines, server), kPassiveOpenPassiveClose);
  }
  // What the file holds is exactly what was printed live, in order (the
  // live output may have run ahead of the last flush).
  const auto live = body(rec.lines());
  auto replay = body(r.lines);
  replay.pop_back();  // the report: the live run never printed one
  ASSERT_LE(replay.size(), live.size());
  for (size_t i = 0; i < replay.size(); ++i) ASSERT_EQ(replay[i], live[i]) << "line " << i;
}

TEST_F(CaptureKernel, ReportJsonEqualsLiveJson) {
  NetNs ns;
  TempDir dir;
  const std::string file = dir.file("eq.cap");
  Tracer rec;
  ASSERT_TRUE(
      rec.start_raw({"record", "-o", file, "--netns", ns.path(), "--json", "--duration", "3"}))
      << rec.diagnostics();
  std::vector<ConnPorts> conns;
  for (int i = 0; i < 3; ++i) conns.push_back(make_connection(ns, ConnSpec{}));
  {  // and one reset: SO_LINGER 0 close of an established connection
    ScopedNetns in(ns);
    Fd l(listen_tcp(AF_INET, "127.0.0.1"));
    ASSERT_TRUE(l.valid());
    Fd c(connect_tcp(AF_INET, "127.0.0.1", local_port(l.get())));
    ASSERT_TRUE(c.valid());
    Fd a(accept_tcp(l.get()));
    ASSERT_TRUE(a.valid());
    ASSERT_TRUE(set_linger_zero(c.get()));
    c.reset();
    ASSERT_TRUE(wait_readable(a.get()));
  }
  ASSERT_EQ(rec.wait_exit(), 0) << rec.diagnostics();
  EXPECT_NE(rec.stderr_text().find("recorded"), std::string::npos) << rec.stderr_text();

  const Report r = report(file);
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.err;
  EXPECT_TRUE(r.cmd.err.empty()) << r.cmd.err;  // a clean capture: no warning
  EXPECT_TRUE(r.bad.empty());
  EXPECT_TRUE(rec.bad_lines().empty());

  const auto live = body(rec.lines());
  const auto replay = body(r.lines);
  ASSERT_GT(live.size(), 20u);
  EXPECT_EQ(live.back().value("type", ""), "report");
  ASSERT_EQ(replay.size(), live.size());
  for (size_t i = 0; i < live.size(); ++i) EXPECT_EQ(replay[i], live[i]) << "line " << i;

  // The start line says where the capture came from.
  const json& start = r.lines.front();
  EXPECT_EQ(start.value("capture", ""), file);
  EXPECT_EQ(start.value("mode", ""), "continuous");
  EXPECT_EQ(start["options"].value("netns", ""), std::to_string(ns.inode()));
  EXPECT_EQ(start["boot_offset_ns"], rec.start_line()["boot_offset_ns"]);
  EXPECT_EQ(start["time"], rec.start_line()["time"]);
}

// report needs neither root nor BPF: run it as nobody with no capabilities.
TEST_F(CaptureKernel, ReportRunsWithoutRoot) {
  NetNs ns;
  TempDir dir;
  ::chmod(dir.path().c_str(), 0755);
  const std::string file = dir.file("nr.cap");
  Tracer rec;
  ASSERT_TRUE(
      rec.start_raw({"record", "-o", file, "--netns", ns.path(), "--json", "--duration", "2"}))
      << rec.diagnostics();
  make_connection(ns, ConnSpec{});
  ASSERT_EQ(rec.wait_exit(), 0) << rec.diagnostics();
  const std::string copy = dir.file("public.cap");
  fs::copy_file(file, copy);
  ::chmod(copy.c_str(), 0644);
  const Report r = report(copy, {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"});
  ASSERT_EQ(r.cmd.status, 0) << r.cmd.err << r.cmd.out;
  EXPECT_EQ(body(r.lines), body(rec.lines()));
  // The original stays private: nobody cannot read it.
  const Report denied = report(
      file, {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs"});
  EXPECT_EQ(denied.cmd.status, 1);
  EXPECT_NE(denied.cmd.err.find("Permission denied"), std::string::npos) << denied.cmd.err;
}

// Flight recorder: a late FIN answered with a RST (no timewait sock: buckets
// 0) triggers a dump; SIGUSR1 writes another; exit a third.
TEST_F(CaptureKernel, FlightRecorderDumps) {
  NetNs ns({"net.ipv4.tcp_max_tw_buckets=0"});
  TempDir dir;
  const std::string file = dir.file("fr.cap");
  Tracer rec;
  ASSERT_TRUE(rec.start_raw({"record", "-o", file, "--netns", ns.path(), "--json", "--ring", "1M",
                             "--trigger-late-fin", "--trigger-delay", "0.2"}))
      << rec.diagnostics();
  uint16_t sport = 0, cport = 0;
  {
    ScopedNetns in(ns);
    Fd l(listen_tcp(AF_INET, "127.0.0.1"));
    ASSERT_TRUE(l.valid());
    sport = local_port(l.get());
    Fd c(connect_tcp(AF_INET, "127.0.0.1", sport));
    ASSERT_TRUE(c.valid());
    Fd a(accept_tcp(l.get()));
    ASSERT_TRUE(a.valid());
    cport = local_port(c.get());
    c.reset();  // client closes; no tw sock can hold its place
    ASSERT_TRUE(wait_ss_state(ns, sport, cport, "CLOSE-WAIT"));
    ASSERT_TRUE(wait_until([&] { return ss_find(ss_sockets(ns), cport, sport).empty(); }));
    a.reset();  // the server's late FIN meets no socket: RST
    ASSERT_TRUE(wait_until([&] { return ss_find(ss_sockets(ns), sport, cport).empty(); }));
  }
  ASSERT_TRUE(wait_until(
      [&] { return rec.stderr_text().find("late-FIN RST") != std::string::npos; }, 10000ms))
      << rec.diagnostics();
  ASSERT_TRUE(fs::exists(file));
  struct stat st {};
  ::stat(file.c_str(), &st);
  EXPECT_EQ(st.st_mode & 07777, 0600u);

  const Report first = report(file);
  ASSERT_EQ(first.cmd.status, 0) << first.cmd.err;
  EXPECT_EQ(first.lines.front().value("mode", ""), "flight_recorder");
  EXPECT_EQ(first.lines.front().value("trigger", ""), "late-FIN RST");
  bool rst = false;
  for (const auto& l : first.lines)
    rst |= l.value("type", "") == "reset_sent" && l.value("no_socket", false);
  EXPECT_TRUE(rst) << dump(first.lines);
  // The dump ends in an END record: the report is complete, open ones open.
  EXPECT_EQ(first.lines.back().value("type", ""), "report");

  ASSERT_EQ(::kill(rec.pid(), SIGUSR1), 0);
  ASSERT_TRUE(wait_until([&] { return rec.stderr_text().find("(SIGUSR1)") != std::string::npos; }))
      << rec.diagnostics();
  const Report second = report(file + ".1");
  ASSERT_EQ(second.cmd.status, 0) << second.cmd.err;
  EXPECT_EQ(second.lines.front().value("trigger", ""), "SIGUSR1");

  EXPECT_EQ(rec.stop(), 0) << rec.diagnostics();
  EXPECT_NE(rec.stderr_text().find("(exit)"), std::string::npos) << rec.stderr_text();
  const Report last = report(file + ".2");
  ASSERT_EQ(last.cmd.status, 0) << last.cmd.err;
  EXPECT_EQ(last.lines.front().value("trigger", ""), "exit");
}

// The count triggers on real sockets: three TIME_WAITs over a limit of 2,
// then one CLOSE_WAIT left open past a 1 s age.
TEST_F(CaptureKernel, FlightRecorderCountTriggers) {
  NetNs ns;
  TempDir dir;
  const std::string file = dir.file("cnt.cap");
  Tracer rec;
  ASSERT_TRUE(rec.start_raw({"record", "-o", file, "--netns", ns.path(), "--json", "--ring", "1M",
                             "--trigger-time-wait", "2", "--trigger-close-wait", "1",
                             "--close-wait-threshold", "1", "--trigger-delay", "0",
                             "--trigger-cooldown", "0"}))
      << rec.diagnostics();
  for (int i = 0; i < 3; ++i) make_connection(ns, ConnSpec{});
  ASSERT_TRUE(wait_until([&] {
    return rec.stderr_text().find("(TIME_WAIT count 3 over 2)") != std::string::npos;
  })) << rec.diagnostics();
  {
    ScopedNetns in(ns);
    Fd l(listen_tcp(AF_INET, "127.0.0.1"));
    ASSERT_TRUE(l.valid());
    Fd c(connect_tcp(AF_INET, "127.0.0.1", local_port(l.get())));
    Fd a(accept_tcp(l.get()));
    ASSERT_TRUE(c.valid() && a.valid());
    const uint16_t cport = local_port(c.get()), sport = local_port(l.get());
    c.reset();  // the server never closes: CLOSE_WAIT
    ASSERT_TRUE(wait_ss_state(ns, sport, cport, "CLOSE-WAIT"));
    ASSERT_TRUE(wait_until(
        [&] {
          return rec.stderr_text().find("(1 CLOSE_WAIT stuck over 1 s)") != std::string::npos;
        },
        10000ms))
        << rec.diagnostics();
  }
  EXPECT_EQ(rec.stop(), 0) << rec.diagnostics();
  const Report tw = report(file);
  ASSERT_EQ(tw.cmd.status, 0) << tw.cmd.err;
  EXPECT_EQ(tw.lines.front().value("trigger", ""), "TIME_WAIT count 3 over 2");
  const Report cw = report(file + ".1");
  ASSERT_EQ(cw.cmd.status, 0) << cw.cmd.err;
  EXPECT_EQ(cw.lines.front().value("trigger", ""), "1 CLOSE_WAIT stuck over 1 s");
  EXPECT_TRUE(fs::exists(file + ".2"));  // the exit dump
}

// A real full disk: a 64 KiB tmpfs. The recorder stops with one clear line
// and exit 1; the file is valid up to the last complete block.
TEST_F(CaptureKernel, DiskFull) {
  NetNs ns;
  TempDir dir;
  const std::string mnt = dir.file("small");
  fs::create_directory(mnt);
  ASSERT_EQ(run_cmd({"mount", "-t", "tmpfs", "-o", "size=64k", "tcpscope-test", mnt}).status, 0);
  struct Unmount {
    std::string path;
    ~Unmount() { run_cmd({"umount", path}); }
  } unmount{mnt};
  const std::string file = mnt + "/full.cap";
  Tracer rec;
  ASSERT_TRUE(
      rec.start_raw({"record", "-o", file, "--netns", ns.path(), "--json", "--compress", "none"}))
      << rec.diagnostics();
  {
    ScopedNetns in(ns);
    Fd l(listen_tcp(AF_INET, "127.0.0.1"));
    ASSERT_TRUE(l.valid());
    // About 12 records of 128 bytes per connection: 200 of them overflow 64K.
    for (int i = 0; i < 200; ++i) {
      Fd c(connect_tcp(AF_INET, "127.0.0.1", local_port(l.get())));
      Fd a(accept_tcp(l.get()));
      if (!c.valid() || !a.valid()) break;
      set_linger_zero(c.get());
    }
  }
  ASSERT_EQ(rec.wait_exit(30000ms), 1) << rec.diagnostics();
  const std::string err = rec.stderr_text();
  EXPECT_NE(err.find("tcpscope: writing " + file +
                     ": No space left on device; the capture is "
                     "valid up to record"),
            std::string::npos)
      << err;
  const Report r = report(file);
  EXPECT_LE(r.cmd.status, 0) << r.cmd.err;  // valid: clean, or no end marker
  ASSERT_GE(r.lines.size(), 2u);
  EXPECT_EQ(r.lines.back().value("type", ""), "report");
  EXPECT_GT(r.lines.size(), 100u);
}

TEST_F(CaptureKernel, UsageAndCorruptCaptureErrors) {
  TempDir dir;
  auto r = run_cmd({tcpscope_binary(), "record"});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("tcpscope: record: -o FILE is required"), std::string::npos) << r.err;
  r = run_cmd({tcpscope_binary(), "record", "-o", dir.file("x"), "--trigger-late-fin"});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("needs --ring"), std::string::npos) << r.err;
  r = run_cmd({tcpscope_binary(), "report", dir.file("x"), "--port", "80"});
  EXPECT_EQ(r.status, 2);
  // "-" is not standard output/input (it once made a file named "-").
  r = run_cmd({tcpscope_binary(), "record", "-o", "-", "--duration", "0.1"});
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err,
            "tcpscope: record: -o -: a capture is written to a file, not standard output: give a "
            "path\n");
  // A flight recorder over half the host's memory is a slip of the unit.
  const uint64_t phys =
      static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  if (phys / 2 < (64ull << 30)) {
    r = run_cmd({tcpscope_binary(), "record", "--ring", "64G", "-o", dir.file("x")});
    EXPECT_EQ(r.status, 2);
    EXPECT_EQ(r.err, "tcpscope: --ring 64G: more than half of this host's memory (" +
                         std::to_string(phys >> 20) + " MiB)\n");
  }
  // A file that is no network namespace (its inode once became the filter).
  for (const char* not_netns : {"/etc/passwd", "/proc/self/ns/mnt"}) {
    r = run_cmd({tcpscope_binary(), "--netns", not_netns, "--duration", "0.1"});
    EXPECT_EQ(r.status, 2) << not_netns;
    EXPECT_EQ(r.err, std::string("tcpscope: --netns ") + not_netns +
                         ": not a network namespace (give /run/netns/NAME, /proc/PID/ns/net or "
                         "an inode number)\n");
  }
  r = run_cmd({tcpscope_binary(), "report", "-"});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("not standard input"), std::string::npos) << r.err;
  r = run_cmd({tcpscope_binary(), "--audit-interval", "0.05"});
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.err, "tcpscope: --audit-interval: use 0 (off) or at least 0.1 s\n");
  // "nan" is a double to strtod: it once made a --duration that never ended.
  for (const char* bad : {"nan", "inf", "-1", "2x", "1e400"}) {
    r = run_cmd({tcpscope_binary(), "--duration", bad});
    EXPECT_EQ(r.status, 2) << bad;
    EXPECT_EQ(r.err,
              std::string("tcpscope: --duration: '") + bad +
                  "' is not a number of seconds from 0 to 1000000000 (see tcpscope --help)\n");
  }
  r = run_cmd(
      {tcpscope_binary(), "record", "-o", dir.file("x"), "--ring", "1M", "--trigger-delay", "nan"});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.err.find("--trigger-delay: 'nan' is not a number of seconds"), std::string::npos)
      << r.err;
  r = run_cmd({tcpscope_binary(), "report", dir.file("missing")});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find("No such file"), std::string::npos) << r.err;
  { std::ofstream(dir.file("junk")) << "this is not a capture\n"; }
  r = run_cmd({tcpscope_binary(), "report", dir.file("junk")});
  EXPECT_EQ(r.status, 1);
  EXPECT_EQ(r.err, "tcpscope: " + dir.file("junk") + ": not a tcpscope capture (bad magic)\n");
}

}  // namespace
}  // namespace ktest
