// The audit of open connections: which of the connections the tracker holds
// open are no longer in the kernel's socket table. Their CLOSE never came:
// the kernel did not run our programs for it (not always counted as a
// recursion miss), or its record was lost. Pure: the iter/tcp pass that
// lists the table is the caller's (user/live.cpp).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "tcpscope/event.hpp"
#include "tcpscope/tracker.hpp"

namespace tcpscope {

// A socket is hashed just after its first transition (connect(), listen()),
// so a connection must have been in its state this long to be judged.
inline constexpr uint64_t kAuditSettledNs = 500'000'000;

// Appends a TCPSCOPE_EV_VANISHED record (at pass_start_ns) to `out` for each
// open connection of namespace `netns` whose cookie is not in `present`
// (sorted: the cookies the pass, started at pass_start_ns, found) and that
// has been in its state since kAuditSettledNs before the pass. Connections
// of other namespaces, and ids that are not cookies (top bit set), are not
// judged. The ring buffer must have been drained after the pass: a socket
// that left the table during it has its CLOSE in the tracker by then.
void find_vanished(const Tracker& tracker, std::span<const uint64_t> present, uint32_t netns,
                   uint64_t pass_start_ns, std::vector<Event>& out);

}  // namespace tcpscope
