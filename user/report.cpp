#include <algorithm>
#include <cstring>

#include "tcpscope/analyzers.hpp"
#include "tcpscope/closewait.hpp"
#include "tcpscope/pipeline.hpp"
#include "tcpscope/resets.hpp"
#include "tcpscope/timewait.hpp"

namespace tcpscope {

// ---- Pipeline ------------------------------------------------------------

Pipeline::Pipeline(TrackerLimits limits) : tracker_(limits) {
  tracker_.on_end([this](const Connection& c) {
    for (auto& a : analyzers_) a->on_end(c, *this);
  });
}

void Pipeline::add_default_analyzers(int top_n) {
  add_analyzer(std::make_unique<ConnectionsAnalyzer>());
  add_analyzer(std::make_unique<RetransmitAnalyzer>(top_n));
  auto tw = std::make_unique<TimeWaitAnalyzer>(top_n);
  const TimeWaitAnalyzer* tw_ptr = tw.get();
  add_analyzer(std::move(tw));
  add_analyzer(std::make_unique<ResetAnalyzer>(tw_ptr, top_n));
  add_analyzer(std::make_unique<LostAnalyzer>());
  add_analyzer(std::make_unique<CloseWaitAnalyzer>(top_n, tracker_));
}

void Pipeline::notice(const Notice& n) {
  for (Sink* s : sinks_) s->on_notice(n);
}

void Pipeline::process(const Event& ev) {
  if (finished_) return;
  if (ev.type < TCPSCOPE_EV_LOST) ++events_;
  if (ev.type == TCPSCOPE_EV_END) {
    finish(ev.ts_ns);
    return;
  }
  const Tracked t = tracker_.apply(ev);
  for (auto& a : analyzers_) a->on_event(t, *this);
  for (Sink* s : sinks_) s->on_event(t);
}

void Pipeline::finish(uint64_t end_ns) {
  if (finished_) return;
  finished_ = true;
  if (end_ns < tracker_.last_ns()) end_ns = tracker_.last_ns();
  tracker_.finish(end_ns);
  for (auto& a : analyzers_) a->finish(end_ns, *this);
  for (Sink* s : sinks_) s->on_report(*this, end_ns);
  for (Sink* s : sinks_) s->flush();
}

void Pipeline::write_report_json(JsonWriter& w, TimeFormatter& time) const {
  for (const auto& a : analyzers_) a->write_json(w, time);
}

void Pipeline::write_report_text(fmt::memory_buffer& out, TimeFormatter& time,
                                 const TextStyle& style) const {
  for (const auto& a : analyzers_) a->write_text(out, time, style);
}

// ---- ConnSummary ---------------------------------------------------------

ConnSummary ConnSummary::of(const Connection& c) {
  ConnSummary s;
  s.id = c.id;
  s.family = c.family;
  s.lport = c.lport;
  s.rport = c.rport;
  s.laddr = c.laddr;
  s.raddr = c.raddr;
  s.pid = c.pid;
  s.comm = c.comm;
  return s;
}

namespace {

std::string_view comm_view(const std::array<char, 16>& comm) {
  return {comm.data(), strnlen(comm.data(), comm.size())};
}

void write_conn_members(JsonWriter& w, const ConnSummary& s) {
  w.member("conn", s.id);
  w.member("family", static_cast<unsigned>(s.family));
  w.member("laddr", format_addr(s.family, s.laddr.data()).view());
  w.member("lport", static_cast<unsigned>(s.lport));
  w.member("raddr", format_addr(s.family, s.raddr.data()).view());
  w.member("rport", static_cast<unsigned>(s.rport));
  w.member("pid", static_cast<unsigned>(s.pid));
  w.member("comm", comm_view(s.comm));
}

}  // namespace

// ---- ConnectionsAnalyzer ---------------------------------------------------

void ConnectionsAnalyzer::on_end(const Connection& c, NoticeOut&) {
  if (c.open_kind == OpenKind::Listen) {
    ++listeners_;
    return;
  }
  ++total_;
  ++by_open_[static_cast<int>(c.open_kind)];
  ++by_close_[static_cast<int>(c.close_kind)];
  evicted_ += c.evicted;
}

void ConnectionsAnalyzer::write_json(JsonWriter& w, TimeFormatter&) const {
  w.key("connections");
  w.begin_object();
  w.member("total", total_);
  w.key("by_open");
  w.begin_object();
  for (OpenKind k : {OpenKind::Active, OpenKind::Passive, OpenKind::Unknown})
    w.member(open_kind_name(k), by_open_[static_cast<int>(k)]);
  w.end_object();
  w.key("by_close");
  w.begin_object();
  for (int k = 0; k < kCloseKindCount; ++k)
    w.member(close_kind_name(static_cast<CloseKind>(k)), by_close_[k]);
  w.end_object();
  w.member("listeners", listeners_);
  // Open ones dropped with the tracker full (in by_close "open"): their
  // later events come back as connections seen mid-life.
  w.member("evicted", evicted_);
  w.end_object();
}

void ConnectionsAnalyzer::write_text(fmt::memory_buffer& out, TimeFormatter&,
                                     const TextStyle&) const {
  auto o = std::back_inserter(out);
  fmt::format_to(o,
                 "\nConnections: {} (active open {}, passive open {}, "
                 "seen mid-life {}); listeners: {}\n",
                 total_, by_open_[1], by_open_[2], by_open_[0], listeners_);
  fmt::format_to(o, "  closed by:");
  for (int k = 1; k < kCloseKindCount; ++k)
    fmt::format_to(o, " {} {}{}", close_kind_name(static_cast<CloseKind>(k)), by_close_[k],
                   k + 1 < kCloseKindCount ? "," : "");
  fmt::format_to(o, "; still open {}\n", by_close_[0]);
  if (evicted_)
    fmt::format_to(o,
                   "  {} of them evicted: dropped while open, the tracker full; their later "
                   "events count as connections seen mid-life\n",
                   evicted_);
}

// ---- RetransmitAnalyzer ----------------------------------------------------

namespace {
bool row_less(const RetransmitAnalyzer::Row& a, const RetransmitAnalyzer::Row& b) {
  // "less" = ranks lower: fewer retransmits, then the larger id.
  return a.count != b.count ? a.count < b.count : a.conn.id > b.conn.id;
}
auto row_heap_cmp = [](const RetransmitAnalyzer::Row& a, const RetransmitAnalyzer::Row& b) {
  return row_less(b, a);
};
}  // namespace

void RetransmitAnalyzer::on_event(const Tracked& t, NoticeOut&) {
  const Event& e = *t.ev;
  if (e.type != TCPSCOPE_EV_RETRANSMIT || !t.conn) return;
  auto* slot = details_.find(t.conn->id);
  Detail& d = slot ? slot->second : details_[t.conn->id];
  if (!slot) d.first_ns = e.ts_ns;
  d.last_ns = e.ts_ns;
  d.last_state = e.old_state;
  if (e.old_state < 16) d.states |= static_cast<uint16_t>(1u << e.old_state);
  if (e.tcp_flags & TCPSCOPE_TCP_FIN) ++d.fin;
}

void RetransmitAnalyzer::on_end(const Connection& c, NoticeOut&) {
  Detail d;
  if (auto* slot = details_.find(c.id)) {
    d = slot->second;
    details_.erase(slot);
  }
  if (c.retransmits == 0) return;
  total_ += c.retransmits;
  ++connections_;
  if (top_n_ <= 0) return;
  Row r;
  r.conn = ConnSummary::of(c);
  r.count = c.retransmits;
  r.fin = d.fin;
  r.first_ns = d.first_ns;
  r.last_ns = d.last_ns;
  r.last_state = d.last_state;
  r.states = d.states;
  // Min-heap of the best top_n_: the root is the weakest kept row.
  if (static_cast<int>(rows_.size()) < top_n_) {
    rows_.push_back(r);
    std::push_heap(rows_.begin(), rows_.end(), row_heap_cmp);
  } else if (row_less(rows_.front(), r)) {
    std::pop_heap(rows_.begin(), rows_.end(), row_heap_cmp);
    rows_.back() = r;
    std::push_heap(rows_.begin(), rows_.end(), row_heap_cmp);
  }
}

std::vector<RetransmitAnalyzer::Row> RetransmitAnalyzer::top() const {
  std::vector<Row> sorted = rows_;
  std::sort(sorted.begin(), sorted.end(),
            [](const Row& a, const Row& b) { return row_less(b, a); });
  return sorted;
}

void RetransmitAnalyzer::write_json(JsonWriter& w, TimeFormatter& time) const {
  w.key("retransmits");
  w.begin_object();
  w.member("total", total_);
  w.member("connections", connections_);
  w.key("top");
  w.begin_array();
  for (const Row& r : top()) {
    w.begin_object();
    write_conn_members(w, r.conn);
    w.member("count", static_cast<uint64_t>(r.count));
    w.member("fin", static_cast<uint64_t>(r.fin));
    w.member("first", time.rfc3339(r.first_ns));
    w.member("last", time.rfc3339(r.last_ns));
    w.member("last_state", state_name(r.last_state));
    w.key("states");
    w.begin_array();
    for (uint8_t s = 0; s < 16; ++s)
      if (r.states & (1u << s)) w.value(state_name(s));
    w.end_array();
    w.end_object();
  }
  w.end_array();
  w.end_object();
}

void RetransmitAnalyzer::write_text(fmt::memory_buffer& out, TimeFormatter&,
                                    const TextStyle& style) const {
  auto o = std::back_inserter(out);
  fmt::format_to(o, "\nRetransmits: {} on {} connections\n", total_, connections_);
  int n = 0;
  for (const Row& r : top()) {
    if (n++ >= style.top) break;
    fmt::format_to(o, "  {:>6}  {}:{} -> {}:{}  pid {} {}  last in {}{}\n", r.count,
                   format_addr(r.conn.family, r.conn.laddr.data()).view(), r.conn.lport,
                   format_addr(r.conn.family, r.conn.raddr.data()).view(), r.conn.rport, r.conn.pid,
                   comm_view(r.conn.comm), state_name(r.last_state),
                   r.fin ? fmt::format(" ({} FIN)", r.fin) : "");
  }
}

// ---- LostAnalyzer ----------------------------------------------------------

void LostAnalyzer::on_event(const Tracked& t, NoticeOut&) {
  if (t.ev->type == TCPSCOPE_EV_VANISHED && t.conn) ++vanished_;
  if (t.gap) ++gaps_;
  if (t.ev->type != TCPSCOPE_EV_LOST) return;
  lost_ += t.ev->conn;
  const uint64_t skipped = std::min(t.ev->aux, t.ev->conn);  // a capture may say otherwise
  skipped_ += skipped;
  if (t.ev->reason == TCPSCOPE_EV_RESET_SENT) resets_missing_ += skipped;
}

void LostAnalyzer::write_json(JsonWriter& w, TimeFormatter&) const {
  w.member("lost_events", lost_);
  w.member("lost_kernel_skipped", skipped_);
  w.member("lost_resets_missing", resets_missing_);
  w.member("lost_vanished", vanished_);
  w.member("lost_gaps", gaps_);
}

void LostAnalyzer::write_text(fmt::memory_buffer& out, TimeFormatter&, const TextStyle&) const {
  auto o = std::back_inserter(out);
  fmt::format_to(o, "\nLost events: {}\n", lost_);
  if (lost_ > skipped_)
    fmt::format_to(o, "  {} ring buffer full: raise --ring-size\n", lost_ - skipped_);
  if (skipped_ > resets_missing_)
    fmt::format_to(o,
                   "  {} runs of tcpscope's programs the kernel skipped (an interrupt "
                   "hit the tracepoint again while one ran); their socket is unknown\n",
                   skipped_ - resets_missing_);
  if (resets_missing_)
    fmt::format_to(o,
                   "  {} resets the kernel counted as sent (OutRsts) that no record "
                   "reported\n",
                   resets_missing_);
  if (vanished_)
    fmt::format_to(o,
                   "  {} connections vanished: gone from the kernel's socket table at an audit, "
                   "their last events never seen\n",
                   vanished_);
  if (gaps_)
    fmt::format_to(o,
                   "  {} transitions from another state than the last one seen, or retransmits "
                   "past the kernel's count: those between were lost\n",
                   gaps_);
}

}  // namespace tcpscope
