#include "tcpscope/tracker.hpp"

#include <algorithm>
#include <cstring>

namespace tcpscope {

std::string_view open_kind_name(OpenKind kind) {
  switch (kind) {
    case OpenKind::Unknown:
      return "unknown";
    case OpenKind::Active:
      return "active";
    case OpenKind::Passive:
      return "passive";
    case OpenKind::Listen:
      return "listen";
  }
  return "unknown";
}

std::string_view close_kind_name(CloseKind kind) {
  switch (kind) {
    case CloseKind::Open:
      return "open";
    case CloseKind::ActiveClose:
      return "active_close";
    case CloseKind::PassiveClose:
      return "passive_close";
    case CloseKind::Simultaneous:
      return "simultaneous";
    case CloseKind::ResetSent:
      return "reset_sent";
    case CloseKind::ResetReceived:
      return "reset_received";
    case CloseKind::Aborted:
      return "aborted";
    case CloseKind::Vanished:
      return "vanished";
  }
  return "open";
}

namespace {

bool is_local_abort_reason(uint32_t reason) {
  switch (reason) {
    case 11:  // TCP_ABORT_ON_CLOSE: closed with unread data
    case 12:  // TCP_ABORT_ON_LINGER
    case 13:  // TCP_ABORT_ON_MEMORY
    case 14:  // TCP_STATE: tcp_disconnect(), e.g. SO_LINGER 0
    case 15:  // TCP_KEEPALIVE_TIMEOUT
    case 16:  // TCP_DISCONNECT_WITH_DATA
      return true;
    default:
      return false;
  }
}

OpenKind open_kind_of(const Event& ev) {
  if (ev.type != TCPSCOPE_EV_STATE) return OpenKind::Unknown;
  if (ev.new_state == kTcpListen) return OpenKind::Listen;
  if (ev.old_state == kTcpClose && ev.new_state == kTcpSynSent) return OpenKind::Active;
  if (ev.new_state == kTcpSynRecv &&
      (ev.old_state == kTcpClose || ev.old_state == kTcpListen || ev.old_state == kTcpNewSynRecv))
    return OpenKind::Passive;
  return OpenKind::Unknown;
}

}  // namespace

CloseKind Tracker::classify_close(const Connection& c) {
  if (!c.is_closed()) return CloseKind::Open;
  if (c.vanished) return CloseKind::Vanished;
  // A RST we sent that ends the connection: either the local side aborted
  // (SO_LINGER 0, unread data...) or it answered the peer's segment
  // (TCP_ABORT_ON_DATA). tcp_reset() also fires tcp_receive_reset on
  // ABORT_ON_DATA, so the reason we sent wins over a received RST.
  if (c.resets_sent > 0 && c.last_reset_sent_ns >= c.closed_ns) {
    if (c.last_reset_reason == 8 /* TCP_ABORT_ON_DATA */) return CloseKind::ResetSent;
    if (is_local_abort_reason(c.last_reset_reason)) return CloseKind::Aborted;
  }
  if (c.resets_received > 0 && c.last_reset_received_ns <= c.closed_ns)
    return CloseKind::ResetReceived;
  if (c.resets_sent > 0 && c.last_reset_sent_ns + 1'000'000 >= c.closed_ns &&
      c.close_from != kTcpFinWait2 && c.close_from != kTcpClosing && c.close_from != kTcpLastAck)
    return CloseKind::ResetSent;
  if (c.visited_state(kTcpClosing)) return CloseKind::Simultaneous;
  if (c.visited_state(kTcpFinWait1)) return CloseKind::ActiveClose;
  if (c.visited_state(kTcpCloseWait)) return CloseKind::PassiveClose;
  // First seen late in the close: the state it left tells who closed.
  if (c.close_from == kTcpClosing) return CloseKind::Simultaneous;
  if (c.close_from == kTcpFinWait1 || c.close_from == kTcpFinWait2 || c.close_from == kTcpTimeWait)
    return CloseKind::ActiveClose;
  if (c.close_from == kTcpLastAck) return CloseKind::PassiveClose;
  return CloseKind::Aborted;
}

const Connection* Tracker::find(uint64_t id) const {
  return const_cast<Tracker*>(this)->lookup(id);
}

Connection* Tracker::lookup(uint64_t id) {
  const uint32_t i = slot_of(id);
  return i == kNoSlot ? nullptr : &slot(i);
}

uint32_t Tracker::slot_of(uint64_t id) const {
  static_assert(kNoSlot == HandleIndex::kNone);
  return index_.find(CookieHash{}(id), [&](uint32_t i) { return slot(i).id == id; });
}

// Frees a slot; id 0 marks it free.
void Tracker::forget(uint32_t slot_index) {
  Connection& c = slot(slot_index);
  slab_.release(slot_index);
  ++generations_[slot_index];
  index_.erase(CookieHash{}(c.id), slot_index);
  c.id = 0;
}

uint32_t Tracker::start(const Event& ev, uint32_t existing) {
  uint32_t i = existing;
  if (existing != kNoSlot) {
    // The same socket starts a new connection (connect() again after a
    // failure): the old lifecycle is final now.
    finalize(slot(existing));
  } else {
    i = slab_.acquire();
    // A slot of a chunk given back keeps its generation count.
    if (i == generations_.size()) generations_.push_back(0);
    index_.insert(CookieHash{}(ev.conn), i);
  }
  ++generations_[i];
  Connection& c = slot(i);
  c = Connection{};
  c.id = ev.conn;
  c.netns = ev.netns;
  c.family = ev.family;
  c.lport = ev.lport;
  c.rport = ev.rport;
  std::memcpy(c.laddr.data(), ev.laddr, c.laddr.size());
  std::memcpy(c.raddr.data(), ev.raddr, c.raddr.size());
  c.first_ns = ev.ts_ns;
  c.open_kind = open_kind_of(ev);
  started_.push_back(ref(ev.ts_ns, i));
  return i;
}

void Tracker::record_state(Connection& c, uint8_t state, uint64_t ts) {
  c.state = state;
  c.state_since_ns = ts;
  if (state < 32) c.visited |= 1u << state;
  if (state == kTcpFinWait1 && !c.fin_wait1_ns) c.fin_wait1_ns = ts;
  if (state == kTcpLastAck && !c.last_ack_ns) c.last_ack_ns = ts;
  if (c.history_len < Connection::kHistory) {
    c.history |= static_cast<uint64_t>(state & 0xf) << (4 * c.history_len);
    ++c.history_len;
  } else {
    ++c.history_dropped;
  }
}

namespace {

// How much an owner source says: a system call's caller is the owner; the
// first I/O refines a listener's (an accepted socket's); nothing is less.
int owner_rank(uint8_t src) {
  switch (src) {
    case TCPSCOPE_OWNER_SYSCALL:
      return 3;
    case TCPSCOPE_OWNER_IO:
      return 2;
    case TCPSCOPE_OWNER_LISTENER:
      return 1;
    default:
      return 0;
  }
}

}  // namespace

// The kernel side sends an owner where it learns one (and, with its socket
// table, on every event): the first one from a system call stays, as the
// kernel's table keeps it; a weaker source never replaces a stronger one.
void Tracker::take_owner(Connection& c, const Event& ev) {
  if (ev.pid == 0) return;
  if (c.pid != 0 && owner_rank(ev.owner_src) <= owner_rank(c.owner_src) &&
      (c.owner_src == TCPSCOPE_OWNER_SYSCALL || ev.owner_src != c.owner_src))
    return;
  c.pid = ev.pid;
  std::memcpy(c.comm.data(), ev.comm, c.comm.size());
  c.owner_src = ev.owner_src;
}

Tracked Tracker::apply(const Event& ev) {
  Tracked out;
  out.ev = &ev;
  if (ev.ts_ns > last_ns_) last_ns_ = ev.ts_ns;
  expire(ev.ts_ns);
  slab_.release_empty_top_at(ev.ts_ns);  // chunks a burst left empty go back

  if (ev.type == TCPSCOPE_EV_END) {
    finish(ev.ts_ns);
    return out;
  }
  // A socket that predates the trace: its state is known, not since when.
  // Ignored if its own events came first.
  if (ev.type == TCPSCOPE_EV_SNAPSHOT) {
    if (ev.conn == 0) return out;
    if (const Connection* known = lookup(ev.conn)) {
      out.conn = known;
      return out;
    }
    Connection& c = slot(start(ev, kNoSlot));
    c.open_kind = ev.new_state == kTcpListen ? OpenKind::Listen : OpenKind::Unknown;
    c.snapshot = true;
    c.state = ev.new_state;
    c.state_since_ns = ev.ts_ns;
    if (ev.new_state < 32) c.visited |= 1u << ev.new_state;
    enforce_cap();
    out.conn = &c;
    return out;
  }
  if (ev.type == TCPSCOPE_EV_SNAPSHOT_END) {
    snapshot_end_ns_ = ev.ts_ns;
    return out;
  }
  // An audit found the socket gone, its CLOSE never seen: it ends now.
  if (ev.type == TCPSCOPE_EV_VANISHED) {
    const uint32_t i = slot_of(ev.conn);
    if (i == kNoSlot || slot(i).is_closed()) return out;
    Connection& c = slot(i);
    c.vanished = true;
    mark_closed(i, ev.ts_ns, c.state);
    out.conn = &c;
    return out;
  }
  // A process other than the one known did an accepted socket's first I/O.
  if (ev.type == TCPSCOPE_EV_OWNER) {
    const uint32_t i = slot_of(ev.conn);
    if (ev.conn == 0 || i == kNoSlot || slot(i).is_closed()) return out;
    take_owner(slot(i), ev);
    out.conn = &slot(i);
    return out;
  }
  if (ev.type == TCPSCOPE_EV_TW_START || ev.type == TCPSCOPE_EV_TW_CANCEL ||
      ev.type == TCPSCOPE_EV_TW_EXPIRE || ev.type == TCPSCOPE_EV_TW_SEEN ||
      ev.type == TCPSCOPE_EV_TW_GONE) {
    close_replaced(ev, out);
    return out;
  }
  // Only the socket's own events make its lifecycle; tw timer and sweep
  // records describe the timewait sock that replaced it.
  const bool socket_event = ev.type == TCPSCOPE_EV_STATE || ev.type == TCPSCOPE_EV_RETRANSMIT ||
                            ev.type == TCPSCOPE_EV_RESET_SENT ||
                            ev.type == TCPSCOPE_EV_RESET_RECEIVED;
  if (!socket_event || ev.conn == 0) return out;

  uint32_t slot_index = slot_of(ev.conn);
  Connection* c = slot_index == kNoSlot ? nullptr : &slot(slot_index);
  const bool reopens =
      c && c->is_closed() && ev.type == TCPSCOPE_EV_STATE && ev.old_state == kTcpClose;
  const bool fresh = !c || reopens;
  if (fresh) {
    // A reset for a connection that has ended and been forgotten, on a
    // timewait or request sock: nothing to attach it to.
    if (ev.type == TCPSCOPE_EV_RESET_SENT && (ev.sk_flags & TCPSCOPE_SK_TIMEWAIT)) return out;
    slot_index = start(ev, slot_index);
    c = &slot(slot_index);
    if (ev.type == TCPSCOPE_EV_STATE) {
      // The state left is known only for a connection we saw start.
      if (c->open_kind != OpenKind::Unknown || reopens) record_state(*c, ev.old_state, ev.ts_ns);
      out.gap = lost_opening(ev);
    } else {
      // Its state is known, not when it was entered: no history entry.
      c->state = ev.old_state;
      if (ev.old_state < 32) c->visited |= 1u << ev.old_state;
    }
    enforce_cap();
  }

  // connect() reports SYN_SENT before it picks the local port; any later
  // event of the socket (a RST received in SYN_SENT...) carries it.
  if (c->lport == 0 && ev.lport != 0) {
    c->lport = ev.lport;
    std::memcpy(c->laddr.data(), ev.laddr, c->laddr.size());
  }
  take_owner(*c, ev);

  switch (ev.type) {
    case TCPSCOPE_EV_STATE: {
      // The state left is timed only if we saw it entered.
      if (!fresh && c->history_len > 0 && c->state == ev.old_state)
        out.prev_state_ns = static_cast<int64_t>(ev.ts_ns - c->state_since_ns);
      // The kernel reports every transition, so a connection leaves the
      // state it last entered; if not, transitions in between were lost.
      if (!fresh && c->state != 0 && c->state != ev.old_state) out.gap = true;
      record_state(*c, ev.new_state, ev.ts_ns);
      if (ev.new_state == kTcpClose && !c->is_closed()) {
        c->close_sk_flags = ev.sk_flags;
        mark_closed(slot_index, ev.ts_ns, ev.old_state);
      }
      break;
    }
    case TCPSCOPE_EV_RETRANSMIT: {
      ++c->retransmits;
      // The kernel counts the socket's retransmitted segments, this skb's
      // included: a jump beyond its segments means retransmits we lost.
      // The count starts at 0 for a connection seen from its start.
      const auto total = static_cast<uint32_t>(ev.aux);
      const auto segs = static_cast<uint32_t>(ev.aux >> 32);
      if (total && segs) {
        const bool known = c->retrans_total || (!fresh && c->open_kind != OpenKind::Unknown);
        out.gap = known && total - c->retrans_total > segs;
        c->retrans_total = total;
      }
      break;
    }
    case TCPSCOPE_EV_RESET_SENT:
      if (c->resets_sent != UINT16_MAX) ++c->resets_sent;
      c->last_reset_reason = ev.reason;
      c->last_reset_flags = ev.tcp_flags;
      c->last_reset_sent_ns = ev.ts_ns;
      break;
    case TCPSCOPE_EV_RESET_RECEIVED:
      if (c->resets_received != UINT16_MAX) ++c->resets_received;
      c->last_reset_received_ns = ev.ts_ns;
      break;
    default:
      break;
  }
  out.conn = c;
  return out;
}

void Tracker::close_replaced(const Event& ev, Tracked& out) {
  if (ev.conn == 0) return;
  const uint32_t i = slot_of(ev.conn);
  if (i == kNoSlot) return;
  Connection& c = slot(i);
  if (c.is_closed() || c.open_kind == OpenKind::Listen) return;
  // Its tw timer is armed just before the CLOSE, and a sweep may read the
  // tw sock in between (its sighting then comes before the CLOSE, however
  // long the socket sat in FIN_WAIT2). A kill in between is rarer still:
  // from FIN_WAIT2 or CLOSING only a cancel, expiry or disappearance a
  // second after the state was entered says the CLOSE was lost.
  constexpr uint64_t kCloseFollowsNs = 1'000'000'000;
  if ((c.state == kTcpFinWait2 || c.state == kTcpClosing) &&
      (ev.type == TCPSCOPE_EV_TW_START || ev.type == TCPSCOPE_EV_TW_SEEN ||
       ev.ts_ns < c.state_since_ns + kCloseFollowsNs))
    return;
  // A tw sock took this socket's place and we never saw it leave: the
  // transitions in between were lost (under churn the kernel now and then
  // calls none of our programs for a socket's last transitions and its tw
  // timer, and counts no recursion miss). It closed, by now at the latest.
  out.gap = true;
  mark_closed(i, ev.ts_ns, c.state);
}

void Tracker::mark_closed(uint32_t slot_index, uint64_t ts_ns, uint8_t from) {
  Connection& c = slot(slot_index);
  c.closed_ns = ts_ns;
  c.close_from = from;
  closing_.push_back(ref(ts_ns, slot_index));
}

bool Tracker::lost_opening(const Event& ev) const {
  // Only after the snapshot (an event stamped before its end may have been
  // read after it) and while no open connection was evicted: an evicted
  // one comes back mid-life.
  if (!snapshot_end_ns_ || ev.ts_ns <= snapshot_end_ns_ || evicted_) return false;
  // A socket starts in CLOSE; an accepted child is cloned from its listener
  // (LISTEN -> SYN_RECV, or from the request sock).
  return ev.old_state != kTcpClose && ev.old_state != kTcpListen && ev.old_state != kTcpNewSynRecv;
}

void Tracker::finalize(Connection& c) {
  c.close_kind = classify_close(c);
  if (on_end_) on_end_(c);
}

void Tracker::expire(uint64_t now_ns) {
  // Records closed a grace period ago are out of the caches by now: fetch
  // the ones a few places ahead while this one is finalized.
  constexpr size_t kAhead = 4;
  while (!closing_.empty() && closing_.front().ts_ns + limits_.close_grace_ns < now_ns) {
    // (A stale entry's slot may lie in a chunk given back.)
    if (closing_.size() > kAhead && !stale(closing_[kAhead])) {
      const auto* ahead = reinterpret_cast<const char*>(&slot(closing_[kAhead].slot));
      for (size_t line = 0; line < sizeof(Connection); line += 64) __builtin_prefetch(ahead + line);
    }
    const LifecycleRef closed = closing_.front();
    closing_.pop_front();
    // Skip stale entries: the id was reopened since.
    if (stale(closed)) continue;
    finalize(slot(closed.slot));
    forget(closed.slot);
  }
}

void Tracker::enforce_cap() {
  // An entry is stale once its connection ended or started again.
  if (started_.size() > size() + size() / 4 + 1024)
    started_.erase_if([this](const LifecycleRef& r) { return stale(r); });
  while (size() > limits_.max_connections) {
    if (!closing_.empty()) {
      expire(closing_.front().ts_ns + limits_.close_grace_ns + 1);
      continue;
    }
    if (started_.empty()) break;
    const LifecycleRef entry = started_.front();
    started_.pop_front();
    if (stale(entry)) continue;
    slot(entry.slot).evicted = true;
    finalize(slot(entry.slot));
    forget(entry.slot);
    ++evicted_;
  }
}

void Tracker::finish(uint64_t end_ns) {
  if (end_ns > last_ns_) last_ns_ = end_ns;
  // Final order: by start time, so reports do not depend on hash order.
  std::vector<Connection*> all;
  all.reserve(size());
  for (uint32_t i = 0; i < slab_.used(); ++i)
    if (slot(i).id) all.push_back(&slot(i));
  std::sort(all.begin(), all.end(), [](const Connection* a, const Connection* b) {
    return a->first_ns != b->first_ns ? a->first_ns < b->first_ns : a->id < b->id;
  });
  for (Connection* c : all) finalize(*c);
  index_ = HandleIndex{};
  slab_.clear();
  generations_.clear();
  closing_.clear();
  started_.clear();
}

}  // namespace tcpscope
