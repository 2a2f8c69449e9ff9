// tcpscope leaves the host as it found it: classic tracepoints need tracefs,
// which tcpscope mounts when it is not mounted, in a mount namespace of its
// own. Each case runs in a private mount namespace (unshare -m) standing for
// the host, so the host's own mounts are never touched.
#include "harness.hpp"

namespace ktest {
namespace {

class HostTest : public KernelTest {};

// Runs `script` (sh) in a private mount namespace where tracefs starts
// unmounted; $T is the tcpscope binary, $M counts the tracefs mounts.
CmdResult in_private_mounts(const std::string& script) {
  const std::string prelude =
      "umount -q /sys/kernel/tracing 2>/dev/null; umount -q /sys/kernel/debug/tracing 2>/dev/null;"
      "M() { grep -c ' tracefs ' /proc/self/mounts; }; T='" +
      std::string(tcpscope_binary()) + "'; ";
  return run_cmd({"unshare", "-m", "--propagation", "private", "sh", "-c", prelude + script},
                 30000ms);
}

TEST_F(HostTest, TracefsMountedForClassicTracepointsStaysTcpscopes) {
  // --info probes classic tracepoints: it mounts tracefs to look.
  CmdResult r = in_private_mounts(
      "echo before $(M); \"$T\" --info | grep -E '^ +tracepoint '; echo after $(M)");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("before 0\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tracepoint       yes"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("after 0\n"), std::string::npos) << r.out;

  // A trace through classic tracepoints: the host does not see it mounted
  // while it runs either.
  r = in_private_mounts(
      "o=$(mktemp); \"$T\" --attach tracepoint --json --duration 1.5 >$o & sleep 1; "
      "echo during $(M); wait $! && grep -c '\"attach\":\"tracepoint\"' $o; rm -f $o; "
      "echo after $(M)");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "during 0\n1\nafter 0\n") << r.err;

  // Mounted by someone else: left mounted.
  r = in_private_mounts(
      "mount -t tracefs tracefs /sys/kernel/tracing && "
      "\"$T\" --attach tracepoint --duration 0.3 >/dev/null && echo after $(M)");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out, "after 1\n") << r.err;
}

// A host limit is said with its fix, and no other attach method is tried
// (each would meet the same limit, and the last one's failure would be
// reported instead of the cause).
TEST_F(HostTest, OutOfOpenFilesIsSaidAsSuch) {
  const CmdResult r =
      run_cmd({"sh", "-c", "ulimit -n 8 && exec \"$0\" --duration 0.2", tcpscope_binary()});
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_EQ(r.err,
            "tcpscope: loading tp_btf programs failed: Too many open files (raise the open-files "
            "limit: ulimit -n)\n");
}

// --info ends with what a trace would use, features forced off included.
TEST_F(HostTest, InfoSaysWhatATraceWouldUse) {
  CmdResult r = run_cmd({tcpscope_binary(), "--info"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("\nattach           tp_btf\ntime_wait ends   tw timers (exact)\n"),
            std::string::npos)
      << r.out;
  r = run_cmd({tcpscope_binary(), "--info", "--disable-feature", "tp_btf", "--disable-feature",
               "tw_timers"});
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("\nattach           raw_tp\ntime_wait ends   sweeps (iter/tcp)\n"),
            std::string::npos)
      << r.out;
}

}  // namespace
}  // namespace ktest
