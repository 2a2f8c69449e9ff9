// The consumer must not allocate per event (issue 7): once a churn has run
// long enough for every table and queue to reach its working size, replaying
// more of it through the pipeline, with each sink, allocates nothing.
#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <new>
#include <string>

#include "churn_events.hpp"
#include "tcpscope/output.hpp"
#include "tcpscope/pipeline.hpp"

namespace {
// Counted only while a test asks (this thread): operator new is replaced
// for the whole test binary.
thread_local bool counting = false;
thread_local uint64_t allocations = 0;
// Out of line: inlined into a caller of new, a bare free() draws GCC's
// -Wmismatched-new-delete.
[[gnu::noinline]] void release(void* p) noexcept { std::free(p); }
}  // namespace

void* operator new(std::size_t n) {
  if (counting) ++allocations;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { release(p); }
void operator delete(void* p, std::size_t) noexcept { release(p); }

namespace tcpscope {
namespace {

using churn::SinkKind;

std::string sink_name(const testing::TestParamInfo<SinkKind>& info) {
  switch (info.param) {
    case SinkKind::None:
      return "NoSink";
    case SinkKind::Json:
      return "Json";
    case SinkKind::Table:
      return "Table";
  }
  return "Unknown";
}

class SteadyChurn : public testing::TestWithParam<SinkKind> {};

TEST_P(SteadyChurn, AllocatesNothingPerEvent) {
  // Past the fate log's 65,536 records and a full turn of the 64,512 client
  // ports (each recycles its tw sock), then measured over 30,000 more.
  constexpr size_t kWarmConns = 100'000, kMeasuredConns = 30'000;
  const int devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
  ASSERT_GE(devnull, 0);
  uint64_t counted_events = 0, last_ts = 0;
  {
    churn::ChurnPipeline p(devnull, GetParam());
    uint64_t conns = 0;
    churn::for_each_churn_event(kWarmConns + kMeasuredConns, [&](const Event& e) {
      if (e.type == TCPSCOPE_EV_STATE && e.old_state == kTcpClose && e.new_state == kTcpSynSent &&
          ++conns == kWarmConns + 1)
        counting = true;
      if (counting) ++counted_events;
      p.process(e);
      last_ts = e.ts_ns;
    });
    counting = false;
    p.finish(last_ts + 1);
  }
  close(devnull);
  ASSERT_GT(counted_events, kMeasuredConns * 10);
  // A per-event allocation anywhere would count in the hundreds of
  // thousands here; a table that grows once would count a few.
  EXPECT_LE(allocations, 4u) << "allocations over " << counted_events << " events";
  allocations = 0;
}

INSTANTIATE_TEST_SUITE_P(Sinks, SteadyChurn,
                         testing::Values(SinkKind::None, SinkKind::Json, SinkKind::Table),
                         sink_name);

}  // namespace
}  // namespace tcpscope
