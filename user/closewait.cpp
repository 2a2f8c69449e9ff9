#include "tcpscope/closewait.hpp"
#include "tcpscope/timewait.hpp"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <map>

#include "tcpscope/format.hpp"

namespace tcpscope {

namespace {
// A stuck socket as its notices show it, named after pid/comm.
Connection shown_of(const CloseWaitAnalyzer::Socket& s, uint32_t pid,
                    const std::array<char, 16>& comm) {
  TupleKey k;
  k.netns = s.netns;
  k.family = s.family;
  k.lport = s.lport;
  k.rport = s.rport;
  k.laddr = s.laddr;
  k.raddr = s.raddr;
  return describe_connection(k, s.conn, pid, comm);
}
}  // namespace

// PROC_TEXT carries its bytes in laddr, raddr and comm: one contiguous run.
static_assert(offsetof(Event, raddr) == offsetof(Event, laddr) + 16);
static_assert(offsetof(Event, comm) == offsetof(Event, raddr) + 16);
static_assert(TCPSCOPE_TEXT_CHUNK == 48);

std::string_view container_id(std::string_view path) {
  auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); };
  std::string_view found;
  size_t i = 0;
  while (i < path.size()) {
    if (!hex(path[i])) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < path.size() && hex(path[j])) ++j;
    if (j - i == 64) found = path.substr(i, 64);
    i = j;
  }
  return found;
}

namespace {

constexpr uint32_t kUnknownAgo = 0xffffffffu;

std::string_view comm_view(const std::array<char, 16>& comm) {
  return {comm.data(), strnlen(comm.data(), comm.size())};
}

std::array<char, 16> comm_of(const char* c) {
  std::array<char, 16> a{};
  std::memcpy(a.data(), c, a.size());
  return a;
}

double seconds(uint64_t ns) { return static_cast<double>(ns) / 1e9; }

// In CLOSE_WAIT the peer's FIN is counted in the receive queue (rcv_nxt -
// copied_seq) until the program reads it as EOF, after all the data: 0
// means it saw EOF, else the data bytes unread are one less (ss shows the
// raw value).
uint32_t unread_bytes(uint32_t rx_queue) { return rx_queue ? rx_queue - 1 : 0; }

}  // namespace

// ---- events ----------------------------------------------------------------

void CloseWaitAnalyzer::on_event(const Tracked& t, NoticeOut& out) {
  const Event& e = *t.ev;
  switch (e.type) {
    case TCPSCOPE_EV_CONFIG:
      on_config(e);
      break;
    case TCPSCOPE_EV_STATE:
      if (e.new_state == kTcpCloseWait && e.old_state != kTcpCloseWait)
        enter(e, t.conn, e.ts_ns, false);
      else if (e.old_state == kTcpCloseWait && e.new_state != kTcpCloseWait)
        leave(e, out);
      break;
    case TCPSCOPE_EV_VANISHED:
      if (e.old_state == kTcpCloseWait) leave(e, out);
      break;
    case TCPSCOPE_EV_SNAPSHOT:
      // Only a socket the tracker took from the snapshot (its own events
      // did not come first).
      if (e.new_state == kTcpCloseWait && t.conn && t.conn->snapshot && !waiting_.find(e.conn) &&
          !stuck_open_.contains(e.conn)) {
        uint64_t entered = e.ts_ns;
        if (e.seg_len != kUnknownAgo)
          entered -= std::min<uint64_t>(entered, static_cast<uint64_t>(e.seg_len) * 1'000'000);
        enter(e, t.conn, entered, true);
      }
      break;
    case TCPSCOPE_EV_PROC:
      on_proc(e);
      break;
    case TCPSCOPE_EV_PROC_TEXT:
      on_proc_text(e);
      break;
    case TCPSCOPE_EV_HOLDER:
      on_holder(e, out);
      break;
    case TCPSCOPE_EV_HOLDER_SCAN:
      on_scan(e);
      break;
    default:
      break;
  }
  check(e.ts_ns, out);
}

void CloseWaitAnalyzer::on_config(const Event& e) {
  threshold_ns_ = e.tx_queue ? static_cast<uint64_t>(e.tx_queue) * 1'000'000 : kDefaultThresholdNs;
  holders_on_ = e.aux & TCPSCOPE_CONFIG_HOLDERS;
}

void CloseWaitAnalyzer::enter(const Event& e, const Connection*, uint64_t entered_ns,
                              bool preexisting) {
  if (e.conn == 0) return;
  waiting_.put(e.conn, Waiting{entered_ns, e.rx_queue, preexisting});
  ++entered_;
  if (preexisting) ++preexisting_;
  next_due_ns_ = std::min(next_due_ns_, entered_ns + threshold_ns_);
}

void CloseWaitAnalyzer::leave(const Event& e, NoticeOut& out) {
  if (waiting_.erase(e.conn)) {
    ++closed_in_time_;
    if (!early_holders_.empty()) early_holders_.erase(e.conn);
    if (!early_recv_q_.empty()) early_recv_q_.erase(e.conn);
    return;
  }
  auto it = stuck_open_.find(e.conn);
  if (it == stuck_open_.end()) return;
  Socket& s = *it->second;
  stuck_open_.erase(it);
  s.closed_ns = e.ts_ns;
  s.closed_to = e.new_state;
  ++closed_stuck_;
  notify(s, out);  // if it was still waiting for its holders
  const Holder* h = s.holders.empty() ? nullptr : &s.holders.front();
  const Connection shown =
      shown_of(s, h ? h->pid : s.owner_pid, h ? (h->proc ? h->proc->comm : h->comm) : s.owner_comm);
  Notice n{"close_wait_end", e.ts_ns, &shown};
  n.add("duration_ms",
        static_cast<int64_t>((e.ts_ns - std::min<uint64_t>(e.ts_ns, s.entered_ns)) / 1'000'000));
  n.add("stuck_ms",
        static_cast<int64_t>((e.ts_ns - std::min<uint64_t>(e.ts_ns, s.crossed_ns)) / 1'000'000));
  n.add("new", state_name(e.new_state));
  n.add_bool("preexisting", s.preexisting);
  out.notice(n);
}

CloseWaitAnalyzer::Socket* CloseWaitAnalyzer::stuck(uint64_t conn) {
  auto it = stuck_open_.find(conn);
  return it == stuck_open_.end() ? nullptr : it->second;
}

void CloseWaitAnalyzer::cross(uint64_t conn, const Waiting& w) {
  auto s = std::make_unique<Socket>();
  s->conn = conn;
  s->entered_ns = w.entered_ns;
  s->preexisting = w.preexisting;
  s->crossed_ns = w.entered_ns + threshold_ns_;
  s->recv_q = w.recv_q;
  if (const Connection* c = tracker_.find(conn)) {
    s->netns = c->netns;
    s->family = c->family;
    s->lport = c->lport;
    s->rport = c->rport;
    s->laddr = c->laddr;
    s->raddr = c->raddr;
    s->owner_pid = c->pid;
    s->owner_comm = c->comm;
    // A pre-existing socket older than the threshold is stuck when found.
    s->crossed_ns = std::max(s->crossed_ns, c->first_ns);
  }
  if (auto h = early_holders_.find(conn); h != early_holders_.end()) {
    s->holders = std::move(h->second);
    s->resolved = true;
    early_holders_.erase(h);
  }
  if (auto q = early_recv_q_.find(conn); q != early_recv_q_.end()) {
    s->recv_q = q->second;
    early_recv_q_.erase(q);
  }
  stuck_open_[conn] = s.get();
  awaiting_holders_.push_back(s.get());
  stuck_list_.push_back(std::move(s));
}

void CloseWaitAnalyzer::check(uint64_t now_ns, NoticeOut& out) {
  if (now_ns >= next_due_ns_) {
    std::vector<std::pair<uint64_t, uint64_t>> due;  // (entered, conn)
    uint64_t next = UINT64_MAX;
    waiting_.for_each([&](uint64_t conn, Waiting& w) {
      const uint64_t at = w.entered_ns + threshold_ns_;
      if (at <= now_ns)
        due.emplace_back(w.entered_ns, conn);
      else
        next = std::min(next, at);
    });
    std::sort(due.begin(), due.end());
    for (const auto& [entered, conn] : due) {
      const Waiting w = *waiting_.find(conn);
      waiting_.erase(conn);
      cross(conn, w);
    }
    next_due_ns_ = next;
  }
  if (awaiting_holders_.empty()) return;
  // Notices wait (in event time) for the holders, which come live from a
  // /proc scan that starts just before the threshold.
  size_t kept = 0;
  for (Socket* s : awaiting_holders_) {
    if (s->resolved || !holders_on_ || s->closed_ns || now_ns >= s->crossed_ns + kHolderWaitNs)
      notify(*s, out);
    else
      awaiting_holders_[kept++] = s;
  }
  awaiting_holders_.resize(kept);
}

void CloseWaitAnalyzer::notify(Socket& s, NoticeOut& out) {
  if (s.noticed) return;
  s.noticed = true;
  Connection shown = shown_of(s, s.owner_pid, s.owner_comm);
  std::string pids;
  int64_t fd = -1;
  std::string_view cmdline, container;
  if (!s.holders.empty()) {
    const Holder& h = s.holders.front();
    shown.pid = h.pid;
    shown.comm = h.proc ? h.proc->comm : h.comm;
    fd = h.fds.empty() ? -1 : h.fds.front();
    if (h.proc) {
      cmdline = h.proc->cmdline;
      container = container_id(h.proc->cgroup);
    }
    for (const Holder& x : s.holders)
      for (int32_t f : x.fds) {
        if (!pids.empty()) pids += ',';
        pids += fmt::format("{}:{}", x.pid, f);
      }
  }
  Notice n{"close_wait_stuck", s.crossed_ns, &shown};
  n.add("age_ms", static_cast<int64_t>((s.crossed_ns - s.entered_ns) / 1'000'000));
  n.add("threshold_ms", static_cast<int64_t>(threshold_ns_ / 1'000'000));
  n.add("recv_q", static_cast<int64_t>(unread_bytes(s.recv_q)));
  n.add_bool("eof_read", s.recv_q == 0);
  n.add_bool("preexisting", s.preexisting);
  n.add("holders", static_cast<int64_t>(s.holders.size()));
  n.add("fd", fd);
  n.add("holder_fds", std::string_view(pids));
  n.add("cmdline", cmdline);
  n.add("container", container);
  n.add("owner_pid", static_cast<int64_t>(s.owner_pid));
  out.notice(n);
}

void CloseWaitAnalyzer::on_proc(const Event& e) {
  if (procs_.size() >= 65536) procs_.clear();  // holders keep their own copies
  auto p = std::make_shared<Proc>();
  p->pid = e.pid;
  p->start_ns = e.aux;
  p->cgroup_id = e.cgroup;
  p->comm = comm_of(e.comm);
  procs_[e.pid] = std::move(p);
}

void CloseWaitAnalyzer::on_proc_text(const Event& e) {
  auto it = procs_.find(e.pid);
  if (it == procs_.end()) return;
  Proc& p = *it->second;
  std::string* text = e.reason == TCPSCOPE_TEXT_CMDLINE  ? &p.cmdline
                      : e.reason == TCPSCOPE_TEXT_CGROUP ? &p.cgroup
                                                         : nullptr;
  if (!text) return;
  const size_t max = e.reason == TCPSCOPE_TEXT_CMDLINE ? TCPSCOPE_CMDLINE_MAX : TCPSCOPE_CGROUP_MAX;
  // Pieces come in order; anything else (a lost piece) is dropped.
  if (e.seg_len != text->size() || e.rx_queue > TCPSCOPE_TEXT_CHUNK ||
      text->size() + e.rx_queue > max)
    return;
  const char* bytes = reinterpret_cast<const char*>(&e) + offsetof(Event, laddr);
  text->append(bytes, e.rx_queue);
  if (e.reason == TCPSCOPE_TEXT_CMDLINE && (e.tcp_flags & 1)) p.cmdline_cut = true;
}

void CloseWaitAnalyzer::on_holder(const Event& e, NoticeOut&) {
  if (e.conn != batch_conn_ || e.seg_len == 0) {
    batch_.clear();
    batch_conn_ = e.conn;
  }
  if (e.pid != 0) {
    auto h =
        std::find_if(batch_.begin(), batch_.end(), [&](const Holder& x) { return x.pid == e.pid; });
    if (h == batch_.end()) {
      Holder nh;
      nh.pid = e.pid;
      nh.comm = comm_of(e.comm);
      if (auto p = procs_.find(e.pid); p != procs_.end()) nh.proc = p->second;
      batch_.push_back(std::move(nh));
      h = batch_.end() - 1;
    }
    h->fds.push_back(static_cast<int32_t>(e.reason));
  }
  if (e.seg_len + 1 < e.tx_queue) return;  // more of this batch follow
  std::sort(batch_.begin(), batch_.end(),
            [](const Holder& a, const Holder& b) { return a.pid < b.pid; });
  for (Holder& h : batch_) std::sort(h.fds.begin(), h.fds.end());
  std::vector<Holder> holders = std::move(batch_);
  batch_.clear();
  batch_conn_ = 0;
  if (Socket* s = stuck(e.conn)) {
    s->holders = std::move(holders);
    s->resolved = true;
    s->recv_q = e.rx_queue;
    if (s->family == 0) {  // the tracker had lost it: the record knows
      s->netns = e.netns;
      s->family = e.family;
      s->lport = e.lport;
      s->rport = e.rport;
      std::memcpy(s->laddr.data(), e.laddr, 16);
      std::memcpy(s->raddr.data(), e.raddr, 16);
    }
  } else if (waiting_.find(e.conn)) {
    early_holders_[e.conn] = std::move(holders);
    early_recv_q_[e.conn] = e.rx_queue;
  }
}

void CloseWaitAnalyzer::on_scan(const Event& e) {
  ++rounds_;
  steps_ += e.tx_queue;
  scan_procs_ += e.seg_len;
  scan_fds_ += e.conn;
  searched_ += e.reason;
  found_ += e.rx_queue;
  scan_ns_ += e.aux;
  scan_max_ns_ = std::max<uint64_t>(scan_max_ns_, e.aux);
  step_max_ns_ = std::max<uint64_t>(step_max_ns_, e.cgroup);
  iter_ns_ += e.sk;
}

void CloseWaitAnalyzer::finish(uint64_t end_ns, NoticeOut& out) {
  end_ns_ = end_ns;
  check(end_ns, out);
  // The trace is over: what is still waiting for holders goes out as is.
  for (Socket* s : awaiting_holders_) notify(*s, out);
  awaiting_holders_.clear();
}

// ---- report ------------------------------------------------------------------

namespace {

struct Row {
  const CloseWaitAnalyzer::Socket* s;
  const CloseWaitAnalyzer::Holder* h;  // null: no holder found
  uint64_t age_ns;
};

std::string_view row_source(const Row& r) {
  if (r.h) return "fd";
  return r.s->owner_pid ? "owner" : "none";
}
uint32_t row_pid(const Row& r) { return r.h ? r.h->pid : r.s->owner_pid; }
std::string_view row_comm(const Row& r) {
  if (!r.h) return comm_view(r.s->owner_comm);
  return comm_view(r.h->proc ? r.h->proc->comm : r.h->comm);
}
std::string_view row_cmdline(const Row& r) {
  return r.h && r.h->proc ? std::string_view(r.h->proc->cmdline) : std::string_view();
}

struct ProcAgg {
  uint32_t pid = 0;
  uint64_t start_ns = 0;
  size_t first = 0;  // index of its first row
  uint64_t count = 0, open = 0, oldest_ns = 0;
  std::map<std::pair<std::string, uint16_t>, uint64_t> remotes;
};

struct Rows {
  std::vector<Row> rows;       // one per stuck socket and holder, oldest first
  std::vector<ProcAgg> procs;  // by count, then the oldest, then pid
};

Rows build_rows(const std::vector<std::unique_ptr<CloseWaitAnalyzer::Socket>>& list,
                uint64_t end_ns) {
  Rows out;
  auto& rows = out.rows;
  for (const auto& sp : list) {
    const CloseWaitAnalyzer::Socket& s = *sp;
    const uint64_t until = s.closed_ns ? s.closed_ns : end_ns;
    const uint64_t age = until > s.entered_ns ? until - s.entered_ns : 0;
    if (s.holders.empty()) rows.push_back(Row{&s, nullptr, age});
    for (const auto& h : s.holders) rows.push_back(Row{&s, &h, age});
  }
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    if (a.age_ns != b.age_ns) return a.age_ns > b.age_ns;
    if (a.s->conn != b.s->conn) return a.s->conn < b.s->conn;
    return row_pid(a) < row_pid(b);
  });
  std::map<std::pair<uint32_t, uint64_t>, size_t> index;
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    const uint64_t start = r.h && r.h->proc ? r.h->proc->start_ns : 0;
    auto [it, fresh] = index.try_emplace({row_pid(r), start}, out.procs.size());
    if (fresh) out.procs.push_back(ProcAgg{row_pid(r), start, i});
    ProcAgg& p = out.procs[it->second];
    ++p.count;
    if (!r.s->closed_ns) ++p.open;
    p.oldest_ns = std::max(p.oldest_ns, r.age_ns);
    ++p.remotes[{std::string(format_addr(r.s->family, r.s->raddr.data()).view()), r.s->rport}];
  }
  std::sort(out.procs.begin(), out.procs.end(), [](const ProcAgg& a, const ProcAgg& b) {
    if (a.count != b.count) return a.count > b.count;
    if (a.oldest_ns != b.oldest_ns) return a.oldest_ns > b.oldest_ns;
    if (a.pid != b.pid) return a.pid < b.pid;
    return a.start_ns < b.start_ns;
  });
  return out;
}

}  // namespace

void CloseWaitAnalyzer::write_json(JsonWriter& w, TimeFormatter& time) const {
  const Rows built = build_rows(stuck_list_, end_ns_);
  const auto& rows = built.rows;
  const auto& procs = built.procs;
  w.key("close_wait");
  w.begin_array();
  size_t n = 0;
  for (const Row& r : rows) {
    if (n++ >= kMaxRows) break;
    const Socket& s = *r.s;
    w.begin_object();
    w.member("pid", static_cast<unsigned>(row_pid(r)));
    w.member("comm", row_comm(r));
    w.key("fd");
    if (r.h && !r.h->fds.empty())
      w.value(static_cast<int64_t>(r.h->fds.front()));
    else
      w.null();
    w.key("fds");
    w.begin_array();
    if (r.h)
      for (int32_t f : r.h->fds) w.value(static_cast<int64_t>(f));
    w.end_array();
    w.member("age_s", seconds(r.age_ns));
    w.member("laddr", format_addr(s.family, s.laddr.data()).view());
    w.member("lport", static_cast<unsigned>(s.lport));
    w.member("raddr", format_addr(s.family, s.raddr.data()).view());
    w.member("rport", static_cast<unsigned>(s.rport));
    w.member("recv_q", static_cast<unsigned>(unread_bytes(s.recv_q)));
    w.member("eof_read", s.recv_q == 0);
    w.member("cmdline", row_cmdline(r));
    w.member("cmdline_cut", r.h && r.h->proc && r.h->proc->cmdline_cut);
    w.member("conn", s.conn);
    w.member("netns", static_cast<unsigned>(s.netns));
    w.member("family", static_cast<unsigned>(s.family));
    w.member("holder", row_source(r));
    w.member("owner_pid", static_cast<unsigned>(s.owner_pid));
    const Proc* p = r.h ? r.h->proc.get() : nullptr;
    w.member("cgroup", p ? std::string_view(p->cgroup) : std::string_view());
    w.member("cgroup_id", p ? p->cgroup_id : 0);
    w.member("container", p ? container_id(p->cgroup) : std::string_view());
    w.member("preexisting", s.preexisting);
    w.member("since", time.rfc3339(s.entered_ns));
    w.member("stuck_at", time.rfc3339(s.crossed_ns));
    w.member("open", s.closed_ns == 0);
    w.key("closed");
    if (s.closed_ns)
      w.value(time.rfc3339(s.closed_ns));
    else
      w.null();
    w.end_object();
  }
  w.end_array();

  w.key("close_wait_by_process");
  w.begin_array();
  n = 0;
  for (const ProcAgg& a : procs) {
    if (n++ >= kMaxRows) break;
    const Row& r = rows[a.first];
    const Proc* p = r.h ? r.h->proc.get() : nullptr;
    w.begin_object();
    w.member("pid", static_cast<unsigned>(a.pid));
    w.member("comm", row_comm(r));
    w.member("cmdline", row_cmdline(r));
    w.member("container", p ? container_id(p->cgroup) : std::string_view());
    w.member("cgroup", p ? std::string_view(p->cgroup) : std::string_view());
    w.member("holder", row_source(r));
    w.member("count", a.count);
    w.member("open", a.open);
    w.member("oldest_s", seconds(a.oldest_ns));
    std::vector<std::pair<uint64_t, const std::pair<std::string, uint16_t>*>> remotes;
    for (const auto& [k, c] : a.remotes) remotes.emplace_back(c, &k);
    std::stable_sort(remotes.begin(), remotes.end(),
                     [](const auto& x, const auto& y) { return x.first > y.first; });
    w.key("remotes");
    w.begin_array();
    size_t m = 0;
    for (const auto& [c, k] : remotes) {
      if (m++ >= 10) break;
      w.begin_object();
      w.member("raddr", std::string_view(k->first));
      w.member("rport", static_cast<unsigned>(k->second));
      w.member("count", c);
      w.end_object();
    }
    w.end_array();
    w.end_object();
  }
  w.end_array();

  w.key("close_wait_summary");
  w.begin_object();
  w.member("threshold_s", seconds(threshold_ns_));
  w.member("entered", entered_);
  w.member("preexisting", preexisting_);
  w.member("stuck", static_cast<uint64_t>(stuck_list_.size()));
  w.member("stuck_open", static_cast<uint64_t>(stuck_open_.size()));
  w.member("closed_after_stuck", closed_stuck_);
  w.member("closed_in_time", closed_in_time_);
  w.member("holders_resolved", holders_on_);
  w.member("rows_omitted",
           static_cast<uint64_t>(rows.size() > kMaxRows ? rows.size() - kMaxRows : 0));
  w.end_object();

  w.key("close_wait_scan");
  w.begin_object();
  w.member("rounds", rounds_);
  w.member("steps", steps_);
  w.member("processes", scan_procs_);
  w.member("fds", scan_fds_);
  w.member("sockets_searched", searched_);
  w.member("sockets_found", found_);
  w.member("proc_us", scan_ns_ / 1000);
  w.member("proc_max_round_us", scan_max_ns_ / 1000);
  w.member("proc_max_step_us", step_max_ns_ / 1000);
  w.member("iter_us", iter_ns_ / 1000);
  w.end_object();
}

void CloseWaitAnalyzer::write_text(fmt::memory_buffer& out, TimeFormatter&,
                                   const TextStyle& style) const {
  const Rows built = build_rows(stuck_list_, end_ns_);
  const auto& rows = built.rows;
  const auto& procs = built.procs;
  auto o = std::back_inserter(out);
  fmt::format_to(o,
                 "\nCLOSE_WAIT: {} stuck (over {:.3f} s), {} still stuck at the end, {} closed "
                 "late, {} closed in time; {} found at start\n",
                 stuck_list_.size(), seconds(threshold_ns_), stuck_open_.size(), closed_stuck_,
                 closed_in_time_, preexisting_);
  int k = 0;
  for (const ProcAgg& a : procs) {
    if (k++ >= style.top) break;
    const Row& r = rows[a.first];
    fmt::format_to(o, "  pid {} {}: {} sockets ({} still open), oldest {:.1f} s", a.pid,
                   row_comm(r), a.count, a.open, seconds(a.oldest_ns));
    if (a.pid == 0) fmt::format_to(o, " (holder not found)");
    const auto cmd = row_cmdline(r);
    if (!cmd.empty()) fmt::format_to(o, "  [{}]", cmd.substr(0, 80));
    out.push_back('\n');
    fmt::format_to(o, "      to");
    for (const auto& [rk, c] : a.remotes) fmt::format_to(o, " {}:{} ({})", rk.first, rk.second, c);
    out.push_back('\n');
  }
  k = 0;
  for (const Row& r : rows) {
    if (k++ >= style.top) break;
    const Socket& s = *r.s;
    fmt::format_to(o, "  pid {:<7} fd {:<4} {:<15} {}:{} -> {}:{}  {:.1f} s{}  recv_q {}{}\n",
                   row_pid(r), r.h && !r.h->fds.empty() ? fmt::format("{}", r.h->fds.front()) : "-",
                   row_comm(r), format_addr(s.family, s.laddr.data()).view(), s.lport,
                   format_addr(s.family, s.raddr.data()).view(), s.rport, seconds(r.age_ns),
                   s.preexisting ? "+" : "", unread_bytes(s.recv_q),
                   s.closed_ns ? " (closed)" : "");
  }
  if (rounds_)
    fmt::format_to(o,
                   "  holder scans: {} rounds, {} fds in {} processes, {:.1f} ms in /proc "
                   "(max {:.1f} ms a round), {:.1f} ms in iter/tcp\n",
                   rounds_, scan_fds_, scan_procs_, static_cast<double>(scan_ns_) / 1e6,
                   static_cast<double>(scan_max_ns_) / 1e6, static_cast<double>(iter_ns_) / 1e6);
}

}  // namespace tcpscope
