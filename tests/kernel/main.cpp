// Kernel tests' main: runs the tests, and runs those that failed again when
// a tracer of theirs counted lost events (lost or vanished lines).
//
// The kernel skips a run of a tracing program when an interrupt hits the same
// tracepoint while the program runs on that CPU (recursion_misses); tcpscope
// counts those runs as lost, but a lifecycle that lost an event cannot match
// ss/nstat exactly. Such a failure is retried, at most kMaxAttempts in all;
// a failure with nothing counted lost fails at once.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "harness.hpp"

namespace {

constexpr int kMaxAttempts = 3;
constexpr const char* kAttemptEnv = "TCPSCOPE_KTEST_ATTEMPT";

std::string failed_tests() {
  std::string filter;
  const testing::UnitTest& unit = *testing::UnitTest::GetInstance();
  for (int i = 0; i < unit.total_test_suite_count(); ++i) {
    const testing::TestSuite& suite = *unit.GetTestSuite(i);
    for (int j = 0; j < suite.total_test_count(); ++j) {
      const testing::TestInfo& test = *suite.GetTestInfo(j);
      if (!test.result()->Failed()) continue;
      if (!filter.empty()) filter += ':';
      filter += std::string(suite.name()) + "." + test.name();
    }
  }
  return filter;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv, argv + argc);
  testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  const uint64_t lost = ktest::counted_losses();
  if (rc == 0 || lost == 0) return rc;

  const char* env = std::getenv(kAttemptEnv);
  const int attempt = env ? std::atoi(env) : 1;
  const std::string filter = failed_tests();
  if (attempt >= kMaxAttempts || filter.empty()) {
    std::fprintf(stderr, "[ktest] failed on attempt %d of %d (tracers counted %llu lost events)\n",
                 attempt, kMaxAttempts, static_cast<unsigned long long>(lost));
    return rc;
  }
  std::fprintf(stderr,
               "[ktest] the tracers counted %llu lost events (see \"lost\" and \"vanished\" "
               "lines): the failure may be theirs; running %s again (attempt %d of %d)\n",
               static_cast<unsigned long long>(lost), filter.c_str(), attempt + 1, kMaxAttempts);
  std::fflush(nullptr);
  setenv(kAttemptEnv, std::to_string(attempt + 1).c_str(), 1);
  std::vector<char*> next;
  for (std::string& a : args)
    if (a.rfind("--gtest_filter=", 0) != 0) next.push_back(a.data());
  std::string filter_arg = "--gtest_filter=" + filter;
  next.push_back(filter_arg.data());
  next.push_back(nullptr);
  ::execv("/proc/self/exe", next.data());
  std::perror("[ktest] re-running the failed tests");
  return rc;
}
