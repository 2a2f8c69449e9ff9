#include "tcpscope/timewait.hpp"

#include <algorithm>
#include <cstring>

#include "tcpscope/format.hpp"

namespace tcpscope {

// ---- TupleKey ----------------------------------------------------------------

TupleKey TupleKey::of(const Connection& c) {
  TupleKey k;
  k.netns = c.netns;
  k.family = c.family;
  k.lport = c.lport;
  k.rport = c.rport;
  k.laddr = c.laddr;
  k.raddr = c.raddr;
  return k;
}

namespace {

// Events and iter/tcp records name the tuple with the same fields.
template <typename Record>
TupleKey tuple_of(const Record& r) {
  TupleKey k;
  k.netns = r.netns;
  k.family = r.family;
  k.lport = r.lport;
  k.rport = r.rport;
  std::memcpy(k.laddr.data(), r.laddr, 16);
  std::memcpy(k.raddr.data(), r.raddr, 16);
  return k;
}

}  // namespace

TupleKey TupleKey::of(const Event& e) { return tuple_of(e); }
TupleKey TupleKey::of(const SockRecord& r) { return tuple_of(r); }

void TupleKey::into(Event& e) const {
  e.netns = netns;
  e.family = family;
  e.lport = lport;
  e.rport = rport;
  std::memcpy(e.laddr, laddr.data(), sizeof e.laddr);
  std::memcpy(e.raddr, raddr.data(), sizeof e.raddr);
}

Connection describe_connection(const TupleKey& k, uint64_t conn, uint32_t pid,
                               const std::array<char, 16>& comm) {
  Connection c;
  c.id = conn;
  c.netns = k.netns;
  c.family = k.family;
  c.lport = k.lport;
  c.rport = k.rport;
  c.laddr = k.laddr;
  c.raddr = k.raddr;
  c.pid = pid;
  c.comm = comm;
  return c;
}

size_t TupleKeyHash::operator()(const TupleKey& k) const {
  // Word at a time (a byte loop was a tenth of the consumer's time), with a
  // multiply-xorshift finaliser so that tuples differing in one port spread
  // over every bucket.
  uint64_t w[4];
  std::memcpy(w, k.laddr.data(), 16);
  std::memcpy(w + 2, k.raddr.data(), 16);
  uint64_t h =
      (static_cast<uint64_t>(k.netns) << 32 | static_cast<uint64_t>(k.lport) << 16 | k.rport) ^
      (static_cast<uint64_t>(k.family) << 56);
  constexpr uint64_t kMul = 0x9e3779b97f4a7c15ull;
  for (uint64_t x : w) h = (h ^ x) * kMul, h ^= h >> 32;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return static_cast<size_t>(h);
}

// ---- TimeWaitSweep ---------------------------------------------------------------

Event TimeWaitSweep::record_of(uint64_t conn, const Known& k) {
  Event e{};
  e.conn = conn;
  e.ts_ns = k.last_seen_ns;
  e.old_state = kTcpTimeWait;
  e.new_state = k.substate;
  e.aux = k.expires_ns;
  e.sk_flags = TCPSCOPE_SK_TIMEWAIT;
  return e;
}

void TimeWaitSweep::begin(bool initial, bool report_new_initial) {
  ++pass_;
  seen_ = 0;
  initial_ = initial;
  report_new_initial_ = report_new_initial;
}

void TimeWaitSweep::see(const SockRecord& r) {
  if (r.state != kTcpTimeWait || r.conn == 0) return;
  ++seen_;
  auto [it, inserted] = known_.try_emplace(r.conn);
  Known& k = it->second;
  const bool changed = !inserted && k.substate != r.substate;
  k.last_seen_ns = r.ts_ns;
  k.expires_ns = r.expires_ns;
  k.substate = r.substate;
  k.pass = pass_;
  if ((inserted || changed) && !k.pending) {
    k.pending = true;
    to_report_.push_back({r.conn, inserted, inserted ? TupleKey::of(r) : TupleKey{}});
  }
}

void TimeWaitSweep::settle(uint64_t seen_before_ns, const Emit& emit) {
  for (; to_report_head_ < to_report_.size(); ++to_report_head_) {
    const Report& r = to_report_[to_report_head_];
    Known& k = known_.at(r.conn);
    if (k.last_seen_ns >= seen_before_ns) break;
    k.pending = false;
    if (r.is_new && initial_ && !report_new_initial_) continue;
    Event e = record_of(r.conn, k);
    e.type = TCPSCOPE_EV_TW_SEEN;
    if (r.is_new) r.tuple.into(e);
    if (initial_) e.sk_flags |= TCPSCOPE_SK_SNAPSHOT;
    emit(e);
  }
  if (to_report_head_ == to_report_.size()) {
    to_report_.clear();
    to_report_head_ = 0;
  } else if (to_report_head_ > 4096 && to_report_head_ * 2 > to_report_.size()) {
    to_report_.erase(to_report_.begin(), to_report_.begin() + to_report_head_);
    to_report_head_ = 0;
  }
}

void TimeWaitSweep::finish(uint64_t start_ns, uint64_t end_ns, uint32_t interval_ms,
                           const Emit& emit) {
  settle(UINT64_MAX, emit);
  // A large list goes back: passes are seconds apart.
  if (to_report_.capacity() > 4096) std::vector<Report>().swap(to_report_);
  for (auto it = known_.begin(); it != known_.end();) {
    if (it->second.pass == pass_) {
      ++it;
      continue;
    }
    const Known& k = it->second;
    Event e = record_of(it->first, k);
    e.type = TCPSCOPE_EV_TW_GONE;
    e.ts_ns = start_ns;
    const uint64_t gap_us = start_ns > k.last_seen_ns ? (start_ns - k.last_seen_ns) / 1000 : 0;
    e.seg_len = static_cast<uint32_t>(std::min<uint64_t>(gap_us, UINT32_MAX));
    emit(e);
    it = known_.erase(it);
  }
  Event s{};
  s.type = TCPSCOPE_EV_SWEEP;
  s.ts_ns = start_ns;
  s.conn = seen_;
  s.aux = end_ns - start_ns;
  s.seg_len = interval_ms;
  emit(s);
}

// ---- TimeWaitAnalyzer ------------------------------------------------------------

std::string_view TimeWaitAnalyzer::cause_name(EndCause c) {
  switch (c) {
    case EndCause::Expired:
      return "expired";
    case EndCause::Recycled:
      return "recycled";
    case EndCause::Reused:
      return "reused";
    case EndCause::Reset:
      return "reset";
    case EndCause::NetnsExit:
      return "netns_exit";
    default:
      return "?";
  }
}

namespace {
constexpr uint64_t kTimeWaitLenNs = 60'000'000'000ull;  // TCP_TIMEWAIT_LEN
// Timer wheel granularity makes tw timers fire late, never early; allow for
// clock skew between the iterator's reads and the timer field.
constexpr uint64_t kEarlySlackNs = 50'000'000ull;

template <typename Map>
typename Map::mapped_type* capped(Map& m, const typename Map::key_type& k, size_t cap,
                                  uint64_t& overflow) {
  auto it = m.find(k);
  if (it != m.end()) return &it->second;
  if (m.size() >= cap) {
    ++overflow;
    return nullptr;
  }
  return &m[k];
}
}  // namespace

// The remote service a client TIME_WAIT holds a local port against.
TupleKey TimeWaitAnalyzer::remote_key(const TupleKey& t) {
  TupleKey k;
  k.netns = t.netns;
  k.family = t.family;
  k.raddr = t.raddr;
  k.rport = t.rport;
  return k;
}

TupleKey TimeWaitAnalyzer::endpoint_key(const TupleKey& t, bool client) const {
  TupleKey k;
  k.family = t.family;
  k.laddr = t.laddr;
  k.lport = client ? 0 : t.lport;
  return k;
}

void TimeWaitAnalyzer::on_event(const Tracked& t, NoticeOut& out) {
  const Event& e = *t.ev;
  if (first_ns_ == 0 && e.type != TCPSCOPE_EV_CONFIG) first_ns_ = e.ts_ns;
  expire_pending(e.ts_ns, out);
  settle_unarmed(e.ts_ns, out);
  open_.release_empty_top_at(e.ts_ns);
  switch (e.type) {
    case TCPSCOPE_EV_CONFIG:
      port_lo_ = static_cast<uint16_t>(e.reason);
      port_hi_ = static_cast<uint16_t>(e.seg_len);
      timers_ = e.aux & TCPSCOPE_CONFIG_TW_TIMERS;
      sweeping_ = e.aux & TCPSCOPE_CONFIG_TW_SWEEP;
      return;
    case TCPSCOPE_EV_SWEEP:
      ++sweeps_;
      sweep_ns_total_ += e.aux;
      sweep_ns_max_ = std::max<uint64_t>(sweep_ns_max_, e.aux);
      sweep_max_socks_ = std::max<uint64_t>(sweep_max_socks_, e.conn);
      sweep_interval_ms_ = e.seg_len;
      // A close that this sweep (started after it) did not find as a tw
      // sock never became one.
      while (!pending_order_.empty()) {
        auto it = pending_.find(pending_order_.front());
        if (it != pending_.end() && it->second.close_ns >= e.ts_ns) break;
        pending_order_.pop_front();
        if (it == pending_.end()) continue;
        const PendingEntry p = it->second;
        pending_.erase(it);
        // The connection is gone from the tracker: describe it here.
        Connection shown;
        shown.id = p.conn;
        shown.netns = p.tuple.netns;
        shown.family = p.tuple.family;
        shown.lport = p.tuple.lport;
        shown.rport = p.tuple.rport;
        shown.laddr = p.tuple.laddr;
        shown.raddr = p.tuple.raddr;
        shown.pid = p.pid;
        shown.comm = p.comm;
        not_entered(&shown, p.tuple, p.conn, p.close_ns, p.fin_received, p.rst_sent, out);
      }
      return;
    case TCPSCOPE_EV_TW_SEEN:
      if (auto it = pending_.find(e.conn); it != pending_.end()) {
        const PendingEntry p = it->second;
        pending_.erase(it);
        Tw tw;
        tw.conn = p.conn;
        tw.entered_ns = p.close_ns;
        tw.tuple = p.tuple;
        tw.client = p.client;
        tw.substate = e.new_state;
        tw.expires_ns = e.aux;
        tw.pid = p.pid;
        tw.comm = p.comm;
        tw.local_close_ns = p.close_ns;
        add_tw(tw, nullptr, out, false);
        return;
      }
      on_tw_seen(e, out);
      return;
    case TCPSCOPE_EV_TW_GONE:
      on_tw_gone(e, out);
      return;
    case TCPSCOPE_EV_TW_START:
    case TCPSCOPE_EV_TW_CANCEL:
    case TCPSCOPE_EV_TW_EXPIRE:
      on_timer(e, out);
      return;
    case TCPSCOPE_EV_RESET_SENT:
      on_reset_sent(e, out);
      return;
    case TCPSCOPE_EV_STATE:
      break;
    default:
      return;
  }
  if (!t.conn) return;
  if (e.new_state == kTcpClose && (e.old_state == kTcpFinWait2 || e.old_state == kTcpClosing)) {
    enter(t, out);
  } else if ((e.new_state == kTcpSynRecv && t.conn->open_kind == OpenKind::Passive) ||
             (e.old_state == kTcpSynSent && e.new_state == kTcpEstablished)) {
    on_new_connection(t, out);
  }
}

const TimeWaitAnalyzer::Tw* TimeWaitAnalyzer::open_find(uint64_t conn) const {
  const uint32_t i =
      open_by_conn_.find(CookieHash{}(conn), [&](uint32_t h) { return open_slot(h).conn == conn; });
  return i == HandleIndex::kNone ? nullptr : &open_slot(i);
}

const TimeWaitAnalyzer::Tw* TimeWaitAnalyzer::open_find_tuple(const TupleKey& tuple,
                                                              uint64_t tuple_hash) const {
  const uint32_t i =
      open_by_tuple_.find(tuple_hash, [&](uint32_t h) { return open_slot(h).tuple == tuple; });
  return i == HandleIndex::kNone ? nullptr : &open_slot(i);
}

TimeWaitAnalyzer::Tw& TimeWaitAnalyzer::open_add(const Tw& tw) {
  static_assert(sizeof(Tw) <= 120, "Tw::slot should fit in padding");
  const uint32_t i = open_.acquire();
  Tw& added = open_slot(i);
  added = tw;
  added.slot = i;
  if (!added.tuple_hash) added.tuple_hash = TupleIndex::hash_of(tw.tuple);
  open_by_conn_.insert(CookieHash{}(tw.conn), i);
  // The tuple names the latest tw sock on it.
  if (const Tw* before = open_find_tuple(added.tuple, added.tuple_hash))
    open_by_tuple_.erase(added.tuple_hash, before->slot);
  open_by_tuple_.insert(added.tuple_hash, i);
  ++open_count_;
  return added;
}

void TimeWaitAnalyzer::open_erase(const Tw& tw) {
  const uint32_t i = tw.slot;
  open_by_conn_.erase(CookieHash{}(tw.conn), i);
  open_by_tuple_.erase(tw.tuple_hash, i);  // if the tuple still names it
  open_.release(i);
  --open_count_;
}

TimeWaitAnalyzer::Tw* TimeWaitAnalyzer::find(const Event& e) {
  // By tuple only for a tw sock without a cookie: another conn's tw sock
  // on the same tuple (the one that recycled or reused it) is not this one.
  if (e.conn) return open_find(e.conn);
  if (!open_count_) return nullptr;
  const TupleKey k = TupleKey::of(e);
  return open_find_tuple(k, TupleIndex::hash_of(k));
}

void TimeWaitAnalyzer::on_timer(const Event& e, NoticeOut& out) {
  Tw* tw = find(e);
  switch (e.type) {
    case TCPSCOPE_EV_TW_START:
      // A start without a cookie matched by tuple to a sighting that has
      // one is not its re-arm: a sweep named a new tw sock by a cookie of
      // its making (see sighting_named_by_cookie) after this start.
      if (tw && !e.conn && tw->conn && !tw->entered_ns && !is_private_id(tw->conn)) tw = nullptr;
      if (tw) {
        // Re-armed: a retransmitted FIN restarted TIME_WAIT.
        tw->cancel_ns = 0;
        tw->expires_ns = e.aux;
        tw->substate = e.new_state;
      } else {
        // A new tw sock: its connection's CLOSE event comes next.
        const TupleKey k = TupleKey::of(e);
        const uint64_t h = TupleIndex::hash_of(k);
        armed_.get_or_insert(k, h) = Armed{e.ts_ns, e.aux, e.new_state};
        armed_order_.push_back(TupleAt{e.ts_ns, h, k});
      }
      return;
    case TCPSCOPE_EV_TW_CANCEL:
      // Its namespace dismantled: nothing re-arms it, nothing else explains it.
      if (tw && (e.sk_flags & TCPSCOPE_SK_NETNS_EXIT)) {
        end(*tw, e.ts_ns, EndCause::NetnsExit, "timer", out);
        return;
      }
      // Killed, unless a TW_START re-arms it at once (mod_timer cancels
      // a pending timer before re-adding it).
      if (tw && !tw->cancel_ns) {
        tw->cancel_ns = e.ts_ns;
        cancels_.emplace_back(e.ts_ns, tw->conn);
      }
      return;
    case TCPSCOPE_EV_TW_EXPIRE:
      if (tw) end(tw->conn, e.ts_ns, EndCause::Expired, "timer", out);
      return;
    default:
      return;
  }
}

void TimeWaitAnalyzer::expire_pending(uint64_t now_ns, NoticeOut& out) {
  constexpr uint64_t kArmedTtlNs = 1'000'000'000;
  while (!armed_order_.empty() && armed_order_.front().ts_ns + kArmedTtlNs < now_ns) {
    const TupleAt& front = armed_order_.front();
    if (!armed_.empty()) {
      auto it = armed_.find(front.tuple, front.hash);
      if (it != armed_.end() && it->second.ts_ns == front.ts_ns) armed_.erase(it);
    }
    armed_order_.pop_front();
  }
  // A cancelled tw sock not re-armed is dead; if no new connection took its
  // tuple within a second (recycled/reused), an RST killed it (RFC 1337).
  constexpr uint64_t kCauseWindowNs = 1'000'000'000;
  while (!cancels_.empty() && cancels_.front().first + kCauseWindowNs < now_ns) {
    const auto [cancel_ns, conn] = cancels_.front();
    cancels_.pop_front();
    Tw* tw = open_find(conn);
    if (!tw || tw->cancel_ns != cancel_ns) continue;
    end(*tw, cancel_ns, EndCause::Reset, "timer", out);
  }
}

const TimeWaitAnalyzer::FateInfo* TimeWaitAnalyzer::fate(const TupleKey& tuple) const {
  const uint64_t end = fate_log_first_ + fate_log_.size();
  if (fate_index_.size() > 2 * fate_log_.size() + 1024) {
    // Mostly tuples whose records left the log: start afresh.
    fate_index_.clear();
    fate_indexed_ = fate_log_first_;
  }
  for (uint64_t seq = std::max(fate_indexed_, fate_log_first_); seq < end; ++seq)
    fate_index_[fate_log_[seq - fate_log_first_].tuple] = seq;
  fate_indexed_ = end;
  auto it = fate_index_.find(tuple);
  if (it == fate_index_.end() || it->second < fate_log_first_) return nullptr;
  return &fate_log_[it->second - fate_log_first_].info;
}

std::optional<TimeWaitAnalyzer::Owner> TimeWaitAnalyzer::open_owner(uint64_t conn) const {
  const Tw* tw = open_find(conn);
  if (!tw) return std::nullopt;
  return Owner{conn, tw->pid, tw->comm, tw->local_close_ns};
}

std::optional<TimeWaitAnalyzer::Owner> TimeWaitAnalyzer::open_owner_at(
    const TupleKey& tuple) const {
  const Tw* tw = open_find_tuple(tuple, TupleIndex::hash_of(tuple));
  if (!tw) return std::nullopt;
  return Owner{tw->conn, tw->pid, tw->comm, tw->local_close_ns};
}

void TimeWaitAnalyzer::set_fate(const TupleKey& tuple, Fate fate, uint64_t ts, uint64_t conn,
                                const Tw* tw) {
  constexpr uint64_t kMaxAgeNs = 600'000'000'000ull;
  constexpr size_t kMaxFates = 65536;
  while (!fate_log_.empty() &&
         (fate_log_.size() >= kMaxFates || fate_log_.front().info.ts_ns + kMaxAgeNs < ts)) {
    fate_log_.pop_front();
    ++fate_log_first_;
  }
  fate_log_.push_back(FateRecord{tuple, FateInfo{fate, ts, conn}});
  FateInfo& f = fate_log_.back().info;
  if (tw) {
    f.substate = tw->substate;
    f.pid = tw->pid;
    f.comm = tw->comm;
    f.local_close_ns = tw->local_close_ns;
  }
}

void TimeWaitAnalyzer::not_entered(const Connection* c, const TupleKey& tuple, uint64_t conn,
                                   uint64_t ts, bool fin_received, bool rst_sent, NoticeOut& out) {
  if (!fin_received && rst_sent) {
    set_fate(tuple, Fate::FinWait2Timeout, ts, conn);
    ++fin_wait2_timeouts_;  // tcp_keepalive_timer: RST, then done
    Notice n{"fin_wait2_timeout", ts, c};
    out.notice(n);
    return;
  }
  set_fate(tuple, Fate::Skipped, ts, conn);
  ++skipped_;  // tcp_time_wait() got no tw sock: tcp_max_tw_buckets reached
  Notice n{"time_wait_skipped", ts, c};
  n.add("reason", "overflow");
  out.notice(n);
}

TimeWaitAnalyzer::Tw TimeWaitAnalyzer::tw_of(const Connection& c, uint64_t close_ns) const {
  Tw tw;
  tw.conn = c.id;
  tw.entered_ns = close_ns;
  tw.tuple = TupleKey::of(c);
  tw.tuple_hash = TupleIndex::hash_of(tw.tuple);
  tw.client = c.open_kind == OpenKind::Active ||
              (c.open_kind == OpenKind::Unknown && is_ephemeral(c.lport));
  tw.pid = c.pid;
  tw.comm = c.comm;
  tw.local_close_ns = c.fin_wait1_ns ? c.fin_wait1_ns : close_ns;
  return tw;
}

void TimeWaitAnalyzer::enter(const Tracked& t, NoticeOut& out) {
  const Event& e = *t.ev;
  const Connection& c = *t.conn;
  // A RST received in FIN_WAIT2/CLOSING ends the socket without TIME_WAIT.
  if (c.resets_received > 0 && c.last_reset_received_ns + 1'000'000 >= e.ts_ns) return;
  const bool fin_received = (e.sk_flags & TCPSCOPE_SK_RCV_SHUTDOWN) || e.old_state == kTcpClosing;
  const bool rst_sent = c.resets_sent > 0 && c.last_reset_sent_ns + 1'000'000 >= e.ts_ns;
  Tw tw = tw_of(c, e.ts_ns);
  tw.substate = fin_received ? kTcpTimeWait : kTcpFinWait2;
  if (open_find(c.id)) {
    // A sweep saw the tw sock before this CLOSE event was read.
    armed_.erase(tw.tuple, tw.tuple_hash);
    add_tw(tw, &c, out, false);
    return;
  }
  if (timers_) {
    // tcp_time_wait() arms the tw timer before tcp_done() reports CLOSE.
    auto it = armed_.find(tw.tuple, tw.tuple_hash);
    if (it == armed_.end()) {
      // Decided once this instant is over: an abort (TCP_ABORT_ON_DATA in
      // FIN_WAIT1/2) calls tcp_done() and sends its RST right after.
      unarmed_.push_back(Unarmed{c, e.ts_ns, fin_received, rst_sent});
      return;
    }
    tw.substate = it->second.substate;
    tw.expires_ns = it->second.expires_ns;
    armed_.erase(it);
    add_tw(tw, &c, out, false);
    return;
  }
  if (sweeping_) {
    // Decided by the next sweep: found as a tw sock, or not.
    PendingEntry p{e.ts_ns, c.id, tw.tuple, tw.client, fin_received, rst_sent, c.pid, c.comm};
    pending_[c.id] = p;
    pending_order_.push_back(c.id);
    return;
  }
  add_tw(tw, &c, out, false);  // nothing can tell: assume the usual case
}

void TimeWaitAnalyzer::add_tw(const Tw& tw, const Connection* c, NoticeOut& out, bool preexisting) {
  EndpointStats* ep = nullptr;
  uint8_t substate = tw.substate;
  Tw* existing = open_find(tw.conn);
  if (!existing && !preexisting) existing = sighting_named_by_cookie(tw);
  if (existing) {
    // Seen by a sweep before its CLOSE event was read (and so counted as
    // pre-existing): it entered during the trace, now we know when.
    Tw& have = *existing;
    if (preexisting || have.entered_ns || !tw.entered_ns) return;
    if (preexisting_ > 0) --preexisting_;
    have.entered_ns = tw.entered_ns;
    have.pid = tw.pid;
    have.comm = tw.comm;
    substate = have.substate;
    ep = capped(endpoints_, endpoint_key(have.tuple, have.client), kMaxKeys, other_endpoints_);
  } else {
    open_add(tw);
    ep = capped(endpoints_, endpoint_key(tw.tuple, tw.client), kMaxKeys, other_endpoints_);
    if (ep) ++ep->open;
    if (tw.client) {
      TupleKey rk;
      rk.netns = tw.tuple.netns;
      rk.family = tw.tuple.family;
      rk.raddr = tw.tuple.raddr;
      rk.rport = tw.tuple.rport;
      if (auto* r = capped(remotes_, rk, kMaxKeys, other_endpoints_)) {
        ++r->open;
        r->peak = std::max(r->peak, r->open);
      }
    }
    peak_ = std::max<uint64_t>(peak_, open_count_);
    if (preexisting) {
      ++preexisting_;
      return;
    }
  }
  ++entered_;
  if (ep) ++ep->entered;
  Notice n{"time_wait_enter", tw.entered_ns, c};
  Connection shown;
  if (!c) {
    shown = describe_connection(tw.tuple, tw.conn, tw.pid, tw.comm);
    n.conn = &shown;
  }
  n.add("substate", state_name(substate));
  out.notice(n);
}

TimeWaitAnalyzer::Tw* TimeWaitAnalyzer::sighting_named_by_cookie(const Tw& tw) {
  // With private ids (the raw_tp and tracepoint flavours) a sweep that reads
  // a tw sock between its hashing and the CLOSE that gives its tuple our id
  // names it by a cookie it makes, and takes it for one older than the
  // trace. A tuple holds one tw sock at a time: that sighting is this one.
  if (!open_count_ || !is_private_id(tw.conn)) return nullptr;
  const uint64_t h = tw.tuple_hash ? tw.tuple_hash : TupleIndex::hash_of(tw.tuple);
  Tw* seen = open_find_tuple(tw.tuple, h);
  if (!seen || seen->entered_ns || is_private_id(seen->conn)) return nullptr;
  open_by_conn_.erase(CookieHash{}(seen->conn), seen->slot);
  seen->conn = tw.conn;
  open_by_conn_.insert(CookieHash{}(seen->conn), seen->slot);
  return seen;
}

void TimeWaitAnalyzer::on_tw_seen(const Event& e, NoticeOut& out) {
  if (Tw* tw = find(e)) {
    tw->substate = e.new_state;
    if (e.aux) tw->expires_ns = e.aux;
    return;
  }
  if (!(e.sk_flags & TCPSCOPE_SK_SNAPSHOT)) {
    if (timers_) enter_unarmed(e, out);
    return;  // else not ours (filtered out)
  }
  const TupleKey k = TupleKey::of(e);
  const uint64_t h = TupleIndex::hash_of(k);
  // A tw sock of the trace, already known by our id or by its timer's
  // start, and named here by a cookie the sweep made (see
  // sighting_named_by_cookie): not one from before the trace.
  if (open_find_tuple(k, h) || armed_.find(k, h) != armed_.end()) return;
  Tw tw;
  tw.conn = e.conn;
  tw.tuple = k;
  tw.tuple_hash = h;
  tw.substate = e.new_state;
  tw.expires_ns = e.aux;
  tw.client = is_ephemeral(e.lport);
  // Predates the trace: counted, not announced.
  struct Quiet : NoticeOut {
    void notice(const Notice&) override {}
  } quiet;
  add_tw(tw, nullptr, quiet, true);
}

bool TimeWaitAnalyzer::enter_unarmed(const Event& e, NoticeOut& out) {
  if (!e.conn) return false;
  Tw tw;
  const Connection* shown = nullptr;
  auto it = std::find_if(unarmed_.begin(), unarmed_.end(),
                         [&e](const Unarmed& u) { return u.conn.id == e.conn; });
  Unarmed u;
  if (it != unarmed_.end()) {
    // Still being decided: it is a TIME_WAIT.
    u = *it;
    unarmed_.erase(it);
    tw = tw_of(u.conn, u.close_ns);
    shown = &u.conn;
  } else {
    // Already reported skipped (time_wait_skipped): that was wrong.
    const TupleKey k = TupleKey::of(e);
    const FateInfo* f = fate(k);
    if (!f || f->fate != Fate::Skipped || f->conn != e.conn) return false;
    if (skipped_) --skipped_;
    tw.conn = e.conn;
    tw.entered_ns = f->ts_ns;
    tw.tuple = k;
    tw.tuple_hash = TupleIndex::hash_of(k);
    tw.client = is_ephemeral(e.lport);
    tw.local_close_ns = f->ts_ns;
    set_fate(k, Fate::Open, e.ts_ns, e.conn);
  }
  tw.substate = e.new_state;
  tw.expires_ns = e.aux;
  ++timer_starts_lost_;
  add_tw(tw, shown, out, false);
  return true;
}

void TimeWaitAnalyzer::on_tw_gone(const Event& e, NoticeOut& out) {
  Tw* tw = find(e);
  if (!tw || tw->cancel_ns) return;  // a cancelled one is being decided
  const uint64_t gone = e.ts_ns;
  const uint64_t gap = static_cast<uint64_t>(e.seg_len) * 1000;
  uint64_t lo = gone > gap ? gone - gap : 0;  // last sighting
  const uint64_t expires = e.aux ? e.aux : tw->expires_ns;
  EndCause cause;
  if (expires) {
    // Timers fire at or after expiry (wheel granularity), never before.
    cause = gone + kEarlySlackNs >= expires ? EndCause::Expired : EndCause::Reset;
    if (cause == EndCause::Expired && expires > lo && expires < gone) lo = expires;
  } else {
    cause = tw->entered_ns && gone >= tw->entered_ns + kTimeWaitLenNs ? EndCause::Expired
                                                                      : EndCause::Reset;
  }
  end(tw->conn, lo + (gone - lo) / 2, cause, "sweep", out);
}

void TimeWaitAnalyzer::on_new_connection(const Tracked& t, NoticeOut& out) {
  if (!open_count_) return;
  const TupleKey k = TupleKey::of(*t.conn);
  Tw* tw = open_find_tuple(k, TupleIndex::hash_of(k));
  if (!tw || tw->conn == t.conn->id) return;
  const bool passive = t.conn->open_kind == OpenKind::Passive;
  // Passive: a SYN on the tuple of our tw sock (tcp_timewait_state_process
  // returned TCP_TW_SYN) and the listener took over the tuple. Active:
  // connect() reused the tuple (tcp_tw_reuse) before it sent its SYN.
  const EndCause cause = passive ? EndCause::Recycled : EndCause::Reused;
  if (tw->cancel_ns) {
    end(*tw, tw->cancel_ns, cause, "timer", out);
  } else {
    end(*tw, passive ? t.ev->ts_ns : t.conn->first_ns, cause, "event", out);
  }
}

void TimeWaitAnalyzer::end(uint64_t conn, uint64_t end_ns, EndCause cause, std::string_view method,
                           NoticeOut& out) {
  if (Tw* tw = open_find(conn)) end(*tw, end_ns, cause, method, out);
}

void TimeWaitAnalyzer::end(Tw& open, uint64_t end_ns, EndCause cause, std::string_view method,
                           NoticeOut& out) {
  const Tw tw = open;
  const uint64_t conn = tw.conn;
  open_erase(open);
  if (tw.cancel_ns) {
    // Its cancel needs no lookup a second from now: a recycling SYN or a
    // reusing connect() follows the cancel at once, so it is among the last.
    const size_t n = cancels_.size();
    for (size_t i = n; i-- > 0 && n - i <= 4;) {
      if (cancels_[i].second != conn || cancels_[i].first != tw.cancel_ns) continue;
      cancels_.erase_at(i);
      break;
    }
  }

  ++ended_[static_cast<int>(cause)];
  set_fate(tw.tuple, cause == EndCause::Expired ? Fate::Expired : Fate::Killed, end_ns, conn, &tw);
  if (method == "sweep")
    ++sweep_ends_;
  else
    ++exact_ends_;
  auto* ep = capped(endpoints_, endpoint_key(tw.tuple, tw.client), kMaxKeys, other_endpoints_);
  if (ep && ep->open) --ep->open;
  if (tw.client) {
    const TupleKey rk = remote_key(tw.tuple);
    auto r = remotes_.find(rk);
    if (r != remotes_.end() && r->second.open) --r->second.open;
  }
  Notice n{"time_wait_end", end_ns, nullptr};
  // The connection itself is gone from the tracker: describe it here.
  const Connection c = describe_connection(tw.tuple, conn, tw.pid, tw.comm);
  n.conn = &c;
  n.add("cause", cause_name(cause));
  n.add("substate", state_name(tw.substate));
  n.add("method", method);
  if (tw.entered_ns && end_ns >= tw.entered_ns) {
    const uint64_t us = (end_ns - tw.entered_ns) / 1000;
    duration_us_.add(us);
    if (ep) ep->duration_us.add(us);
    n.add("duration_ms", static_cast<int64_t>(us / 1000));
  }
  out.notice(n);
}

void TimeWaitAnalyzer::on_end(const Connection& c, NoticeOut&) {
  if (c.open_kind == OpenKind::Listen) return;
  if (c.close_kind != CloseKind::ActiveClose && c.close_kind != CloseKind::PassiveClose &&
      c.close_kind != CloseKind::Simultaneous)
    return;
  const bool server = c.open_kind == OpenKind::Passive ||
                      (c.open_kind == OpenKind::Unknown && !is_ephemeral(c.lport));
  TupleKey k;
  k.family = c.family;
  if (server) {
    k.laddr = c.laddr;
    k.lport = c.lport;
  } else {
    k.raddr = c.raddr;
    k.rport = c.rport;
  }
  auto* s = capped(closers_, k, kMaxKeys, other_endpoints_);
  if (!s) return;
  s->server = server;
  ++s->connections;
  if (c.close_kind == CloseKind::ActiveClose)
    ++s->local_first;
  else if (c.close_kind == CloseKind::PassiveClose)
    ++s->peer_first;
  else
    ++s->simultaneous;
}

void TimeWaitAnalyzer::settle_unarmed(uint64_t now_ns, NoticeOut& out) {
  while (!unarmed_.empty() && unarmed_.front().close_ns + kUnarmedWaitNs < now_ns) {
    const Unarmed u = unarmed_.front();
    unarmed_.pop_front();
    not_entered(&u.conn, TupleKey::of(u.conn), u.conn.id, u.close_ns, u.fin_received, u.rst_sent,
                out);
  }
}

void TimeWaitAnalyzer::on_reset_sent(const Event& e, NoticeOut& out) {
  if (e.sk_flags & TCPSCOPE_SK_NO_SOCKET) {
    // No socket answered a segment of this tuple: a tw sock whose timer was
    // cancelled and not re-armed is dead, and no new connection took the
    // tuple. Decide now: the reset analysis asks what became of it.
    Tw* tw = find(e);
    if (tw && tw->cancel_ns) end(tw->conn, tw->cancel_ns, EndCause::Reset, "timer", out);
    return;
  }
  if (e.sk_flags & TCPSCOPE_SK_TIMEWAIT) return;
  // The connection that just closed with no tw sock sent a RST: it aborted
  // (data after close), no TIME_WAIT was due.
  for (auto it = unarmed_.begin(); it != unarmed_.end(); ++it) {
    if (it->conn.id == e.conn && e.ts_ns <= it->close_ns + kUnarmedWaitNs) {
      unarmed_.erase(it);
      return;
    }
  }
}

void TimeWaitAnalyzer::finish(uint64_t end_ns, NoticeOut& out) {
  settle_unarmed(UINT64_MAX - kUnarmedWaitNs, out);
  // Cancelled timers still being decided: no new connection came.
  while (!cancels_.empty()) {
    const auto [cancel_ns, conn] = cancels_.front();
    cancels_.pop_front();
    Tw* tw = open_find(conn);
    if (tw && tw->cancel_ns == cancel_ns) end(*tw, cancel_ns, EndCause::Reset, "timer", out);
  }
  end_ns_ = end_ns;
  open_at_end_ = open_count_;
}

namespace {

void write_duration(JsonWriter& w, const LogHistogram& h) {
  w.begin_object();
  w.member("count", h.count());
  w.member("p50", h.quantile(0.50) / 1000);
  w.member("p90", h.quantile(0.90) / 1000);
  w.member("p99", h.quantile(0.99) / 1000);
  w.member("max", h.max() / 1000);
  w.end_object();
}

std::string_view port_or_star(uint16_t port, std::array<char, 8>& buf) {
  if (port == 0) return "*";
  auto r = fmt::format_to_n(buf.data(), buf.size(), "{}", port);
  return {buf.data(), r.size};
}

template <typename Map, typename Less>
std::vector<typename Map::const_iterator> sorted_top(const Map& m, size_t n, Less less) {
  std::vector<typename Map::const_iterator> v;
  v.reserve(m.size());
  for (auto it = m.begin(); it != m.end(); ++it) v.push_back(it);
  std::sort(v.begin(), v.end(), less);
  if (v.size() > n) v.resize(n);
  return v;
}

// Deterministic order for ties: by family, address, port.
bool key_less(const TupleKey& a, const TupleKey& b) {
  if (a.family != b.family) return a.family < b.family;
  if (a.laddr != b.laddr) return a.laddr < b.laddr;
  if (a.lport != b.lport) return a.lport < b.lport;
  if (a.raddr != b.raddr) return a.raddr < b.raddr;
  if (a.rport != b.rport) return a.rport < b.rport;
  return a.netns < b.netns;
}

}  // namespace

void TimeWaitAnalyzer::write_json(JsonWriter& w, TimeFormatter&) const {
  w.key("time_wait");
  w.begin_object();
  w.member("entered", entered_);
  w.key("ended");
  w.begin_object();
  for (int i = 0; i < static_cast<int>(EndCause::kCount); ++i)
    w.member(cause_name(static_cast<EndCause>(i)), ended_[i]);
  w.end_object();
  w.member("skipped", skipped_);
  w.member("timer_starts_lost", timer_starts_lost_);
  w.member("fin_wait2_timeouts", fin_wait2_timeouts_);
  w.member("open", open_at_end_);
  w.member("preexisting", preexisting_);
  w.member("peak", peak_);
  const double span_s = end_ns_ > first_ns_ ? static_cast<double>(end_ns_ - first_ns_) / 1e9 : 0;
  w.member("rate_per_s", span_s > 0 ? static_cast<double>(entered_) / span_s : 0.0);
  w.key("duration_ms");
  write_duration(w, duration_us_);

  w.key("end_method");
  w.begin_object();
  // timer: exact (tw timer tracepoints); sweep: iter/tcp passes bound the
  // error of ends to half an interval; none: ends are not observed.
  w.member("method", timers_ ? "timer" : sweeping_ ? "sweep" : "none");
  w.member("entry", timers_ ? "timer" : sweeping_ ? "sweep" : "assumed");
  w.member("sweep_interval_ms", static_cast<uint64_t>(sweep_interval_ms_));
  w.key("max_error_ms");  // null: ends are not observed at all
  if (timers_ || sweeping_)
    w.value(static_cast<uint64_t>(timers_ ? 0 : sweep_interval_ms_ / 2));
  else
    w.null();
  w.member("sweeps", sweeps_);
  w.member("sweep_avg_us", sweeps_ ? sweep_ns_total_ / sweeps_ / 1000 : 0);
  w.member("sweep_max_us", sweep_ns_max_ / 1000);
  w.member("sweep_max_sockets", sweep_max_socks_);
  w.member("exact_ends", exact_ends_);
  w.member("sweep_ends", sweep_ends_);
  w.end_object();

  std::array<char, 8> pbuf{};
  w.key("by_local_endpoint");
  w.begin_array();
  for (auto it : sorted_top(endpoints_, static_cast<size_t>(top_n_), [](auto a, auto b) {
         if (a->second.entered != b->second.entered) return a->second.entered > b->second.entered;
         return key_less(a->first, b->first);
       })) {
    const TupleKey& k = it->first;
    w.begin_object();
    w.member("laddr", format_addr(k.family, k.laddr.data()).view());
    w.member("lport", port_or_star(k.lport, pbuf));
    w.member("entered", it->second.entered);
    w.member("open", it->second.open);
    w.key("duration_ms");
    write_duration(w, it->second.duration_us);
    w.end_object();
  }
  w.end_array();

  w.key("active_closer");
  w.begin_array();
  for (auto it : sorted_top(closers_, static_cast<size_t>(top_n_), [](auto a, auto b) {
         if (a->second.connections != b->second.connections)
           return a->second.connections > b->second.connections;
         return key_less(a->first, b->first);
       })) {
    const TupleKey& k = it->first;
    const CloserStats& s = it->second;
    w.begin_object();
    w.member("role", s.server ? "server" : "client");
    w.member("addr", format_addr(k.family, s.server ? k.laddr.data() : k.raddr.data()).view());
    w.member("port", static_cast<unsigned>(s.server ? k.lport : k.rport));
    w.member("connections", s.connections);
    w.member("local_first", s.local_first);
    w.member("peer_first", s.peer_first);
    w.member("simultaneous", s.simultaneous);
    w.end_object();
  }
  w.end_array();

  const uint64_t range = port_lo_ ? static_cast<uint64_t>(port_hi_ - port_lo_ + 1) : 0;
  w.key("port_exhaustion");
  w.begin_object();
  w.member("port_range", range);
  w.key("remotes");
  w.begin_array();
  for (auto it : sorted_top(remotes_, static_cast<size_t>(top_n_), [](auto a, auto b) {
         if (a->second.peak != b->second.peak) return a->second.peak > b->second.peak;
         return key_less(a->first, b->first);
       })) {
    const TupleKey& k = it->first;
    w.begin_object();
    w.member("raddr", format_addr(k.family, k.raddr.data()).view());
    w.member("rport", static_cast<unsigned>(k.rport));
    w.member("peak", it->second.peak);
    w.member("open", it->second.open);
    w.member("peak_ratio",
             range ? static_cast<double>(it->second.peak) / static_cast<double>(range) : 0.0);
    w.end_object();
  }
  w.end_array();
  w.end_object();
  w.member("untracked_endpoints", other_endpoints_);
  w.end_object();
}

void TimeWaitAnalyzer::write_text(fmt::memory_buffer& out, TimeFormatter&,
                                  const TextStyle& style) const {
  auto o = std::back_inserter(out);
  fmt::format_to(o,
                 "\nTIME_WAIT: {} entered, {} still open, peak {}, {} skipped (tw buckets "
                 "full), {} FIN_WAIT2 timeouts\n",
                 entered_, open_at_end_, peak_, skipped_, fin_wait2_timeouts_);
  if (timer_starts_lost_)
    fmt::format_to(o,
                   "  {} tw timer starts never seen: the sweep found their tw socks (no "
                   "skip)\n",
                   timer_starts_lost_);
  fmt::format_to(o, "  ended:");
  for (int i = 0; i < static_cast<int>(EndCause::kCount); ++i)
    fmt::format_to(o, " {} {}", cause_name(static_cast<EndCause>(i)), ended_[i]);
  if (timers_)
    fmt::format_to(o, "; exact times from the tw timers\n");
  else if (sweeping_)
    fmt::format_to(o, "; end times by sweep (every {} ms, error <= {} ms)\n", sweep_interval_ms_,
                   sweep_interval_ms_ / 2);
  else
    fmt::format_to(o, "; ends not observed (no tw timers, no sweeps)\n");
  if (duration_us_.count())
    fmt::format_to(o, "  duration ms: p50 {} p90 {} p99 {} max {} ({} measured)\n",
                   duration_us_.quantile(0.5) / 1000, duration_us_.quantile(0.9) / 1000,
                   duration_us_.quantile(0.99) / 1000, duration_us_.max() / 1000,
                   duration_us_.count());
  std::array<char, 8> pbuf{};
  for (auto it : sorted_top(endpoints_, static_cast<size_t>(style.top), [](auto a, auto b) {
         if (a->second.entered != b->second.entered) return a->second.entered > b->second.entered;
         return key_less(a->first, b->first);
       }))
    fmt::format_to(o, "  local {}:{}  entered {} open {} p50 {} ms\n",
                   format_addr(it->first.family, it->first.laddr.data()).view(),
                   port_or_star(it->first.lport, pbuf), it->second.entered, it->second.open,
                   it->second.duration_us.quantile(0.5) / 1000);
  for (auto it : sorted_top(closers_, static_cast<size_t>(style.top), [](auto a, auto b) {
         if (a->second.connections != b->second.connections)
           return a->second.connections > b->second.connections;
         return key_less(a->first, b->first);
       })) {
    const CloserStats& s = it->second;
    const TupleKey& k = it->first;
    fmt::format_to(o,
                   "  {} {}:{}  {} connections: closed first by us {}, by peer {}, "
                   "simultaneous {}\n",
                   s.server ? "server" : "client of",
                   format_addr(k.family, s.server ? k.laddr.data() : k.raddr.data()).view(),
                   s.server ? k.lport : k.rport, s.connections, s.local_first, s.peer_first,
                   s.simultaneous);
  }
}

}  // namespace tcpscope
