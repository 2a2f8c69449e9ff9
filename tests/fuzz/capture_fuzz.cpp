// libFuzzer target: the capture reader on arbitrary bytes. Any input must end
// in an error or a clean stop: no crash, no hang, no large allocation
// (-malloc_limit_mb in the CTest run catches one).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "tcpscope/capture.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tcpscope::capture;
  auto r = CaptureReader::from_memory(data, size);
  if (!r) {
    if (r.error().message.empty()) std::abort();  // every error says why
    return 0;
  }
  tcpscope::Event ev;
  uint64_t n = 0;
  while ((*r)->next(ev)) ++n;
  const ReadStatus& st = (*r)->status();
  // Records only come from blocks, each bounded by the block limit.
  if (n > st.blocks * (kMaxBlockRaw / kMinEventSize)) std::abort();
  if (st.records != n) std::abort();
  if (!st.ok() && st.message().empty()) std::abort();
  if (st.offset > size || st.skipped > size) std::abort();
  return 0;
}
