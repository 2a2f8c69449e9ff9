#include "tcpscope/resets.hpp"

#include <algorithm>
#include <cstring>

#include "tcpscope/format.hpp"
#include "tcpscope/output.hpp"

namespace tcpscope {

namespace {

constexpr uint64_t kClosedMaxAgeNs = 600'000'000'000ull;  // 10 minutes
constexpr size_t kClosedMax = 65536;
constexpr uint64_t kPairWindowNs = 1'000'000'000ull;
constexpr size_t kLateFinMax = 1000;

// enum sk_rst_reason, lower case: the cause when nothing more specific fits.
std::string_view reason_cause(uint32_t reason) {
  static constexpr std::string_view kNames[] = {"not_specified",
                                                "no_socket",
                                                "tcp_invalid_ack_sequence",
                                                "tcp_rfc7323_paws",
                                                "tcp_too_old_ack",
                                                "tcp_ack_unsent_data",
                                                "tcp_flags",
                                                "tcp_old_ack",
                                                "tcp_abort_on_data",
                                                "tcp_timewait_socket",
                                                "invalid_syn",
                                                "tcp_abort_on_close",
                                                "tcp_abort_on_linger",
                                                "tcp_abort_on_memory",
                                                "tcp_state",
                                                "tcp_keepalive_timeout",
                                                "tcp_disconnect_with_data"};
  return reason < std::size(kNames) ? kNames[reason] : "other";
}

TupleKey reversed(const TupleKey& k) {
  TupleKey r;
  r.family = k.family;
  r.lport = k.rport;
  r.rport = k.lport;
  r.laddr = k.raddr;
  r.raddr = k.laddr;
  return r;  // netns 0: the peer may live in another namespace (veth)
}

TupleKey without_netns(TupleKey k) {
  k.netns = 0;
  return k;
}

}  // namespace

void ResetAnalyzer::count(std::map<std::string_view, uint64_t>& by, std::string_view cause) {
  ++by[cause];
}

void ResetAnalyzer::on_event(const Tracked& t, NoticeOut& out) {
  const Event& e = *t.ev;
  flush_received(e.ts_ns, out);
  switch (e.type) {
    case TCPSCOPE_EV_STATE:
      if (e.new_state == kTcpClose && t.conn && t.conn->open_kind != OpenKind::Listen)
        on_close(*t.conn, e.ts_ns);
      return;
    case TCPSCOPE_EV_RESET_SENT:
      on_reset_sent(t, out);
      return;
    case TCPSCOPE_EV_RESET_RECEIVED:
      on_reset_received(t, out);
      return;
    default:
      return;
  }
}

void ResetAnalyzer::on_close(const Connection& c, uint64_t ts) {
  // Only closes that can leave a late segment unanswered need remembering:
  // a tw sock answers for its connection (the TIME_WAIT analysis keeps its
  // owner, and its fate once it ends), and a passive close ends on the last
  // ACK. Under churn this keeps the table out of the hot path.
  if (c.close_from == kTcpLastAck || (tw_ && tw_->is_open(c.id))) return;
  while (!closed_order_.empty() && (closed_order_.size() >= kClosedMax ||
                                    closed_order_.front().first + kClosedMaxAgeNs < ts)) {
    auto it = closed_.find(closed_order_.front().second);
    if (it != closed_.end() && it->second.closed_ns == closed_order_.front().first)
      closed_.erase(it);
    closed_order_.pop_front();
  }
  Closed info;
  info.conn = c.id;
  info.closed_ns = ts;
  uint64_t local = c.fin_wait1_ns;
  if (!local) local = c.last_ack_ns;
  info.local_close_ns = local ? local : ts;
  info.pid = c.pid;
  info.comm = c.comm;
  const TupleKey k = TupleKey::of(c);
  closed_[k] = info;
  closed_order_.emplace_back(ts, k);
}

std::string_view ResetAnalyzer::cause_without_socket(const Event& e, const Closed* closed) const {
  if (closed) {
    if (!closed->own_rst_cause.empty()) return closed->own_rst_cause;
    if (const auto* f = tw_ ? tw_->fate(TupleKey::of(e)) : nullptr) {
      switch (f->fate) {
        case TimeWaitAnalyzer::Fate::Skipped:
          return "no_time_wait";
        case TimeWaitAnalyzer::Fate::FinWait2Timeout:
          return "fin_wait2_timeout";
        case TimeWaitAnalyzer::Fate::Killed:
          return "tw_killed";
        case TimeWaitAnalyzer::Fate::Expired:
          return f->substate == kTcpFinWait2 ? "fin_wait2_timeout" : "time_wait_expired";
        case TimeWaitAnalyzer::Fate::Open:
          break;
      }
    }
    return reason_cause(e.reason);
  }
  if ((e.tcp_flags & TCPSCOPE_TCP_SYN) && !(e.tcp_flags & TCPSCOPE_TCP_ACK)) return "no_listener";
  return reason_cause(e.reason);
}

void ResetAnalyzer::on_reset_sent(const Tracked& t, NoticeOut& out) {
  const Event& e = *t.ev;
  ++sent_total_;
  const bool no_conn = e.sk_flags & (TCPSCOPE_SK_NO_SOCKET | TCPSCOPE_SK_LISTENER);
  const TupleKey key = TupleKey::of(e);
  const Closed* closed = nullptr;
  std::string_view cause;
  int64_t since_close_ms = -1;
  Connection shown;
  const Connection* identity = nullptr;

  Closed from_tw;  // a connection known only by its ended tw sock
  if (no_conn) {
    // No connection socket took the segment: it belonged to one that closed.
    auto it = closed_.find(key);
    if (it != closed_.end()) {
      closed = &it->second;
    } else if (const auto* f = tw_ ? tw_->fate(key) : nullptr;
               f && (f->fate == TimeWaitAnalyzer::Fate::Killed ||
                     f->fate == TimeWaitAnalyzer::Fate::Expired)) {
      from_tw.conn = f->conn;
      from_tw.closed_ns = f->ts_ns;
      from_tw.local_close_ns = f->local_close_ns ? f->local_close_ns : f->ts_ns;
      from_tw.pid = f->pid;
      from_tw.comm = f->comm;
      closed = &from_tw;
    } else if (auto owner = tw_ ? tw_->open_owner_at(key) : std::nullopt) {
      // Its tw sock is (believed) open: name it; the reason tells the rest.
      from_tw.conn = owner->conn;
      from_tw.local_close_ns = owner->local_close_ns;
      from_tw.pid = owner->pid;
      from_tw.comm = owner->comm;
      closed = &from_tw;
    }
    cause = cause_without_socket(e, closed);
    if (closed) {
      since_close_ms = static_cast<int64_t>((e.ts_ns - closed->local_close_ns) / 1'000'000);
      shown = describe_connection(key, closed->conn, closed->pid, closed->comm);
    } else {
      shown = describe_connection(key, 0, 0, {});
    }
    identity = &shown;
  } else if (e.sk_flags & TCPSCOPE_SK_TIMEWAIT) {
    // A tw sock answering a segment. Data in TIME_WAIT (FIN_WAIT2 substate:
    // we closed, the peer still sends) is data after our close.
    auto it = closed_.find(key);
    if (it != closed_.end()) {
      closed = &it->second;
    } else if (auto owner = tw_ ? tw_->open_owner(e.conn) : std::nullopt) {
      from_tw.conn = owner->conn;
      from_tw.local_close_ns = owner->local_close_ns;
      from_tw.pid = owner->pid;
      from_tw.comm = owner->comm;
      closed = &from_tw;
    }
    cause = e.seg_len > 0 ? std::string_view("data_after_close") : reason_cause(e.reason);
    if (closed) {
      since_close_ms = static_cast<int64_t>((e.ts_ns - closed->local_close_ns) / 1'000'000);
      shown = describe_connection(key, closed->conn, closed->pid, closed->comm);
    } else {
      shown = describe_connection(key, e.conn, 0, {});
    }
    identity = &shown;
  } else {
    switch (e.reason) {
      case 8:
        cause = "data_after_close";
        break;  // TCP_ABORT_ON_DATA
      case 11:
        cause = "unread_data";
        break;  // TCP_ABORT_ON_CLOSE
      case 14:  // TCP_STATE: tcp_disconnect() (SO_LINGER 0) or FIN_WAIT2 timer
        cause = e.old_state == kTcpFinWait2 ? "fin_wait2_timeout" : "linger_abort";
        break;
      case 0:  // kernels before 6.10 give no reason: judge by what we saw
        if (e.old_state == kTcpClose && !e.tcp_flags)
          cause = e.rx_queue ? "unread_data" : "linger_abort";
        else
          cause = reason_cause(e.reason);
        break;
      default:
        cause = reason_cause(e.reason);
        break;
    }
    identity = t.conn;
    if (t.conn && e.reason == 8) {
      // TCP_ABORT_ON_DATA from FIN_WAIT1/2: tcp_reset() on our own socket
      // fired tcp_receive_reset just before; no RST was received.
      std::erase_if(pending_received_, [&](const PendingReceived& p) {
        return p.conn.id == t.conn->id && (p.state == kTcpFinWait1 || p.state == kTcpFinWait2);
      });
    }
    if (t.conn) {
      // Remember it: later segments for this tuple are explained by it.
      auto it = closed_.find(TupleKey::of(*t.conn));
      if (it != closed_.end() && it->second.conn == t.conn->id) it->second.own_rst_cause = cause;
      if (cause == "data_after_close") {
        const uint64_t local = t.conn->fin_wait1_ns;
        if (local) since_close_ms = static_cast<int64_t>((e.ts_ns - local) / 1'000'000);
      }
    }
  }
  count(sent_by_cause_, cause);

  // A FIN or data that arrived after the local close, answered with RST.
  const bool late_segment = (e.tcp_flags & TCPSCOPE_TCP_FIN) || e.seg_len > 0;
  size_t late_index = SIZE_MAX;
  if (late_segment && (closed || cause == "data_after_close")) {
    if (late_fins_.size() < kLateFinMax) {
      LateFin lf;
      lf.ts_ns = e.ts_ns;
      lf.conn = identity ? identity->id : 0;
      lf.tuple = key;
      lf.pid = identity ? identity->pid : 0;
      if (identity) lf.comm = identity->comm;
      lf.since_close_ms = since_close_ms;
      lf.cause = cause;
      lf.reason = e.reason;
      lf.seg_flags = e.tcp_flags;
      lf.seg_len = e.seg_len;
      late_index = late_fins_.size();
      late_fins_.push_back(lf);
    } else {
      ++late_fins_dropped_;
    }
  }

  // For the peer's reset_received, if the peer is traced too.
  while (!sent_order_.empty() && sent_order_.front().first + kPairWindowNs < e.ts_ns) {
    auto it = sent_.find(sent_order_.front().second);
    if (it != sent_.end() && it->second.ts_ns == sent_order_.front().first) sent_.erase(it);
    sent_order_.pop_front();
  }
  const TupleKey peer = reversed(key);
  sent_[peer] = Sent{e.ts_ns, cause, late_index};
  sent_order_.emplace_back(e.ts_ns, peer);
  // The peer's reset_received may have come first (loopback).
  for (auto it = pending_received_.begin(); it != pending_received_.end(); ++it) {
    if (without_netns(TupleKey::of(it->conn)) != peer) continue;
    const PendingReceived p = *it;
    pending_received_.erase(it);
    if (late_index < late_fins_.size()) {
      LateFin& lf = late_fins_[late_index];
      lf.peer_conn = p.conn.id;
      lf.peer_state = p.state;
      lf.peer_pid = p.conn.pid;
      lf.peer_comm = p.conn.comm;
    }
    settle_received(p, cause, out);
    break;
  }

  Notice n{"reset_sent", e.ts_ns, identity};
  std::array<char, 32> fbuf{};
  n.add("state", no_conn && !(e.sk_flags & TCPSCOPE_SK_LISTENER) ? std::string_view("NONE")
                                                                 : state_name(e.old_state));
  n.add("reason", reset_reason_name(e.reason));
  n.add("cause", cause);
  n.add("seg_flags", tcp_flags_text(e.tcp_flags, fbuf));
  n.add("seg_len", static_cast<int64_t>(e.seg_len));
  n.add_bool("no_socket", no_conn);
  if (since_close_ms >= 0) n.add("since_close_ms", since_close_ms);
  out.notice(n);
}

void ResetAnalyzer::on_reset_received(const Tracked& t, NoticeOut& out) {
  const Event& e = *t.ev;
  if (!t.conn) return;
  auto it = sent_.find(without_netns(TupleKey::of(*t.conn)));
  if (it != sent_.end() && it->second.ts_ns + kPairWindowNs >= e.ts_ns) {
    // Our own peer sent it: same cause.
    if (it->second.late_fin < late_fins_.size()) {
      LateFin& lf = late_fins_[it->second.late_fin];
      lf.peer_conn = t.conn->id;
      lf.peer_state = e.old_state;
      lf.peer_pid = t.conn->pid;
      lf.peer_comm = t.conn->comm;
    }
    settle_received(PendingReceived{e.ts_ns, e.old_state, *t.conn}, it->second.cause, out);
    return;
  }
  pending_received_.push_back(PendingReceived{e.ts_ns, e.old_state, *t.conn});
}

void ResetAnalyzer::settle_received(const PendingReceived& p, std::string_view cause,
                                    NoticeOut& out) {
  ++received_total_;
  count(received_by_cause_, cause);
  Notice n{"reset_received", p.ts_ns, &p.conn};
  n.add("state", state_name(p.state));
  n.add("cause", cause);
  out.notice(n);
}

void ResetAnalyzer::flush_received(uint64_t now_ns, NoticeOut& out) {
  // The sender's tracepoint follows within microseconds when it is local.
  constexpr uint64_t kWaitNs = 2'000'000;
  while (!pending_received_.empty() && pending_received_.front().ts_ns + kWaitNs < now_ns) {
    const PendingReceived p = pending_received_.front();
    pending_received_.pop_front();
    settle_received(p, p.state == kTcpSynSent ? "no_listener" : "peer_reset", out);
  }
}

void ResetAnalyzer::finish(uint64_t, NoticeOut& out) { flush_received(UINT64_MAX, out); }

void ResetAnalyzer::write_json(JsonWriter& w, TimeFormatter& time) const {
  w.key("resets");
  w.begin_object();
  w.key("sent");
  w.begin_object();
  w.member("total", sent_total_);
  w.key("by_cause");
  w.begin_object();
  for (const auto& [cause, n] : sent_by_cause_) w.member(cause, n);
  w.end_object();
  w.end_object();
  w.key("received");
  w.begin_object();
  w.member("total", received_total_);
  w.key("by_cause");
  w.begin_object();
  for (const auto& [cause, n] : received_by_cause_) w.member(cause, n);
  w.end_object();
  w.end_object();
  w.member("late_fin_dropped", late_fins_dropped_);
  w.end_object();

  std::array<char, 32> fbuf{};
  w.key("late_fin_resets");
  w.begin_array();
  for (const LateFin& lf : late_fins_) {
    w.begin_object();
    w.member("time", time.rfc3339(lf.ts_ns));
    if (lf.conn)
      w.member("conn", lf.conn);
    else
      w.key("conn"), w.null();
    w.member("family", static_cast<unsigned>(lf.tuple.family));
    w.member("laddr", format_addr(lf.tuple.family, lf.tuple.laddr.data()).view());
    w.member("lport", static_cast<unsigned>(lf.tuple.lport));
    w.member("raddr", format_addr(lf.tuple.family, lf.tuple.raddr.data()).view());
    w.member("rport", static_cast<unsigned>(lf.tuple.rport));
    w.member("pid", static_cast<unsigned>(lf.pid));
    w.member("comm", std::string_view(lf.comm.data(), strnlen(lf.comm.data(), 16)));
    w.key("since_close_ms");
    if (lf.since_close_ms >= 0)
      w.value(lf.since_close_ms);
    else
      w.null();
    w.member("cause", lf.cause);
    w.member("reason", reset_reason_name(lf.reason));
    w.member("seg_flags", tcp_flags_text(lf.seg_flags, fbuf));
    w.member("seg_len", static_cast<unsigned>(lf.seg_len));
    w.key("peer");
    if (lf.peer_conn) {
      w.begin_object();
      w.member("conn", lf.peer_conn);
      w.member("state", state_name(lf.peer_state));
      w.member("pid", static_cast<unsigned>(lf.peer_pid));
      w.member("comm", std::string_view(lf.peer_comm.data(), strnlen(lf.peer_comm.data(), 16)));
      w.end_object();
    } else {
      w.null();
    }
    w.end_object();
  }
  w.end_array();
}

void ResetAnalyzer::write_text(fmt::memory_buffer& out, TimeFormatter& time,
                               const TextStyle& style) const {
  auto o = std::back_inserter(out);
  fmt::format_to(o, "\nResets: {} sent, {} received\n", sent_total_, received_total_);
  if (!sent_by_cause_.empty()) {
    fmt::format_to(o, "  sent by cause:");
    for (const auto& [cause, n] : sent_by_cause_) fmt::format_to(o, " {} {}", cause, n);
    fmt::format_to(o, "\n");
  }
  if (!received_by_cause_.empty()) {
    fmt::format_to(o, "  received by cause:");
    for (const auto& [cause, n] : received_by_cause_) fmt::format_to(o, " {} {}", cause, n);
    fmt::format_to(o, "\n");
  }
  fmt::format_to(o, "\nLate FIN/data answered with RST: {}{}\n", late_fins_.size(),
                 late_fins_dropped_ ? fmt::format(" (+{} not listed)", late_fins_dropped_) : "");
  int shown = 0;
  std::array<char, 32> fbuf{};
  for (const LateFin& lf : late_fins_) {
    if (shown++ >= style.top) {
      fmt::format_to(o, "  ...\n");
      break;
    }
    fmt::format_to(o, "  {} {}:{} <- {}:{}  pid {} {}  {} ms after close  [{}]  cause {}",
                   time.clock(lf.ts_ns), format_addr(lf.tuple.family, lf.tuple.laddr.data()).view(),
                   lf.tuple.lport, format_addr(lf.tuple.family, lf.tuple.raddr.data()).view(),
                   lf.tuple.rport, lf.pid,
                   std::string_view(lf.comm.data(), strnlen(lf.comm.data(), 16)), lf.since_close_ms,
                   tcp_flags_text(lf.seg_flags, fbuf), lf.cause);
    if (lf.peer_conn)
      fmt::format_to(o, "; peer pid {} {} reset in {}", lf.peer_pid,
                     std::string_view(lf.peer_comm.data(), strnlen(lf.peer_comm.data(), 16)),
                     state_name(lf.peer_state));
    fmt::format_to(o, "\n");
  }
}

}  // namespace tcpscope
