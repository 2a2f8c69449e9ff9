// --cgroup: only sockets created in that cgroup v2 (or below it) are traced.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "harness.hpp"

namespace ktest {
namespace {

namespace fs = std::filesystem;

constexpr long kCgroup2Magic = 0x63677270;

// The cgroup v2 mount: /sys/fs/cgroup on unified hosts, .../unified on hybrid.
std::string cgroup2_root() {
  for (const char* p : {"/sys/fs/cgroup", "/sys/fs/cgroup/unified"}) {
    struct statfs st {};
    if (statfs(p, &st) == 0 && st.f_type == kCgroup2Magic) return p;
  }
  return "";
}

// A child cgroup of the v2 root, removed at the end (it must be empty then).
class TempCgroup {
 public:
  explicit TempCgroup(const std::string& root)
      : path_(root + "/tcpscope-test-" + std::to_string(getpid())) {
    fs::create_directory(path_);
  }
  ~TempCgroup() { rmdir(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Child: joins cgroup (if any), connects to the listener, closes.
int connect_from(const std::string& cgroup, uint16_t port, Channel& ch) {
  if (!cgroup.empty()) {
    std::ofstream procs(cgroup + "/cgroup.procs");
    procs << getpid() << std::flush;
    if (!procs) return 10;
  }
  Fd c(connect_tcp(AF_INET, "127.0.0.1", port));
  if (!c.valid()) return 11;
  if (!ch.child_send(std::to_string(local_port(c.get())))) return 12;
  return ch.child_expect("close") ? 0 : 13;
}

class CgroupFilter : public KernelTest {};

TEST_F(CgroupFilter, OnlySocketsOfTheCgroupAndBelow) {
  const std::string root = cgroup2_root();
  if (root.empty()) {
    if (in_ci()) FAIL() << "no cgroup v2 mount (CI=true: must run)";
    GTEST_SKIP() << "no cgroup v2 mount";
  }
  TempCgroup cg(root);
  ASSERT_TRUE(fs::is_directory(cg.path())) << cg.path();
  NetNs ns;
  Tracer tracer;
  ASSERT_TRUE(tracer.start(ns, {"--cgroup", cg.path()})) << tracer.diagnostics();

  uint16_t sport = 0, in_port = 0, out_port = 0;
  {
    ScopedNetns in(ns);
    Fd l(listen_tcp(AF_INET, "127.0.0.1"));
    ASSERT_TRUE(l.valid());
    sport = local_port(l.get());
    Channel inside, outside;
    const pid_t a = ns.spawn([&] { return connect_from(cg.path(), sport, inside); });
    const pid_t b = ns.spawn([&] { return connect_from("", sport, outside); });
    auto pa = inside.recv(), pb = outside.recv();
    ASSERT_TRUE(pa && pb);
    in_port = static_cast<uint16_t>(std::stoi(*pa));
    out_port = static_cast<uint16_t>(std::stoi(*pb));
    Fd s1(accept_tcp(l.get())), s2(accept_tcp(l.get()));
    ASSERT_TRUE(s1.valid() && s2.valid());
    inside.send("close");
    outside.send("close");
    EXPECT_EQ(ns.wait(a), 0);
    EXPECT_EQ(ns.wait(b), 0);
  }
  ASSERT_TRUE(tracer.wait_for(
      [&](const std::vector<json>& lines) {
        for (const auto& e : lines)
          if (e.value("type", "") == "state" && e.value("lport", 0) == in_port &&
              e.value("old", "") == "FIN_WAIT2" && e.value("new", "") == "CLOSE")
            return true;
        return false;
      },
      5000ms))
      << tracer.diagnostics();
  ASSERT_EQ(tracer.stop(), 0) << tracer.diagnostics();

  // Exactly the client socket made inside the cgroup: not the one made
  // outside, not the listener's side (the test process is not in it).
  const auto conns = tracer.conns();
  ASSERT_EQ(conns.size(), 1u) << dump(tracer.lines());
  for (const auto& e : tracer.events_for(conns[0])) {
    // connect() reports SYN_SENT before it picks the local port.
    if (e.value("new", "") != "SYN_SENT") {
      EXPECT_EQ(e["lport"], in_port) << e.dump();
    }
    EXPECT_EQ(e["rport"], sport) << e.dump();
  }
  EXPECT_EQ(tracer.state_path(conns[0]),
            (std::vector<std::string>{"CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2",
                                      "CLOSE"}));
  EXPECT_TRUE(tracer.conns_with(out_port).empty());
  struct stat st {};
  ASSERT_EQ(stat(cg.path().c_str(), &st), 0);
  EXPECT_EQ(tracer.start_line()["filters"]["cgroup"].get<uint64_t>(), st.st_ino);
}

}  // namespace
}  // namespace ktest
