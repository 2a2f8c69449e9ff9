// The kernel event as C++ sees it, and the names of its enumerations.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

extern "C" {
#include "tcpscope/events.h"
}

namespace tcpscope {

using Event = tcpscope_event;

// The BPF side writes this struct byte for byte; captures store it as is.
static_assert(sizeof(Event) == TCPSCOPE_EVENT_SIZE, "event size drifted");
static_assert(alignof(Event) == 8);
static_assert(offsetof(Event, ts_ns) == 0);
static_assert(offsetof(Event, cgroup) == 24);
static_assert(offsetof(Event, lport) == 56);
static_assert(offsetof(Event, laddr) == 68);
static_assert(offsetof(Event, comm) == 100);
static_assert(offsetof(Event, aux) == 120);

using SockRecord = tcpscope_sock_record;
static_assert(sizeof(SockRecord) == TCPSCOPE_SOCK_RECORD_SIZE, "sock record size drifted");

// An iter/tcp record's connection id and tuple into an event.
inline void copy_tuple(Event& e, const SockRecord& r) {
  e.conn = r.conn;
  e.netns = r.netns;
  e.family = r.family;
  e.lport = r.lport;
  e.rport = r.rport;
  std::memcpy(e.laddr, r.laddr, sizeof(e.laddr));
  std::memcpy(e.raddr, r.raddr, sizeof(e.raddr));
}

// Kernel TCP states (include/net/tcp_states.h).
enum TcpState : uint8_t {
  kTcpEstablished = 1,
  kTcpSynSent = 2,
  kTcpSynRecv = 3,
  kTcpFinWait1 = 4,
  kTcpFinWait2 = 5,
  kTcpTimeWait = 6,
  kTcpClose = 7,
  kTcpCloseWait = 8,
  kTcpLastAck = 9,
  kTcpListen = 10,
  kTcpClosing = 11,
  kTcpNewSynRecv = 12,
  kTcpBoundInactive = 13,
  kTcpStateCount = 14,
};

// Kernel names ("FIN_WAIT2"), as tcpstates and ss -tan print them.
std::string_view state_name(uint8_t state);
// enum sk_rst_reason names without the prefix ("NO_SOCKET").
std::string_view reset_reason_name(uint32_t reason);
std::string_view event_type_name(uint8_t type);

}  // namespace tcpscope
