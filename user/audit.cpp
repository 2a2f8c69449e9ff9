#include "tcpscope/audit.hpp"

#include <algorithm>

#include "tcpscope/timewait.hpp"

namespace tcpscope {

void find_vanished(const Tracker& tracker, std::span<const uint64_t> present, uint32_t netns,
                   uint64_t pass_start_ns, std::vector<Event>& out) {
  tracker.for_each_open([&](const Connection& c) {
    // A request sock (a reset it sent made the entry) never reports its
    // end: it is no full socket, its state never changes.
    if (c.state == kTcpNewSynRecv || c.state == kTcpTimeWait) return;
    if (c.netns != netns || (c.id >> 63) || c.state_since_ns + kAuditSettledNs > pass_start_ns ||
        std::binary_search(present.begin(), present.end(), c.id))
      return;
    Event v{};
    v.type = TCPSCOPE_EV_VANISHED;
    v.ts_ns = pass_start_ns;
    v.conn = c.id;
    TupleKey::of(c).into(v);
    v.old_state = c.state;
    v.aux = c.state_since_ns;
    out.push_back(v);
  });
}

}  // namespace tcpscope
