#include "tcpscope/output.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace tcpscope {

// ---- JsonWriter ------------------------------------------------------------

namespace {

// Hot lines (table rows, JSON state lines) are built by hand: fmt's
// format-spec parsing was a third of the consumer's time under churn.
void put(fmt::memory_buffer& out, std::string_view s) { out.append(s); }

void put_padded(fmt::memory_buffer& out, std::string_view s, size_t width) {
  out.append(s);
  for (size_t n = s.size(); n < width; ++n) out.push_back(' ');
}

void put_uint(fmt::memory_buffer& out, uint64_t v, size_t width = 0) {
  const fmt::format_int f(v);
  put_padded(out, {f.data(), f.size()}, width);
}

// "12.345": ns as milliseconds with 3 decimals, rounded to the microsecond.
void put_ms(fmt::memory_buffer& out, int64_t ns) {
  const uint64_t us = (static_cast<uint64_t>(ns) + 500) / 1000;
  put_uint(out, us / 1000);
  const char frac[4] = {'.', static_cast<char>('0' + us / 100 % 10),
                        static_cast<char>('0' + us / 10 % 10), static_cast<char>('0' + us % 10)};
  out.append(frac, frac + 4);
}

}  // namespace

void json_escape(fmt::memory_buffer& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  out.push_back('"');
  // Fast path: nothing to escape (keys, names, most comms).
  size_t plain = 0;
  while (plain < s.size()) {
    const auto c = static_cast<unsigned char>(s[plain]);
    if (c < 0x20 || c >= 0x7f || c == '"' || c == '\\') break;
    ++plain;
  }
  out.append(s.data(), s.data() + plain);
  for (size_t i = plain; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c >= 0x20 && c < 0x7f) {
      out.push_back(static_cast<char>(c));
    } else if (c == '\n') {
      out.append(std::string_view("\\n"));
    } else if (c == '\t') {
      out.append(std::string_view("\\t"));
    } else {
      // Control bytes and anything non-ASCII: \u00XX keeps output valid
      // whatever bytes a process put in its comm.
      const char esc[] = {'\\', 'u', '0', '0', kHex[c >> 4], kHex[c & 15]};
      out.append(esc, esc + sizeof(esc));
    }
  }
  out.push_back('"');
}

uint64_t stats_sampled_events(const Event& e) {
  uint64_t n = 0;
  std::memcpy(&n, e.laddr, sizeof(n));
  return n;
}

StatsFigures stats_figures(const Event& e) {
  StatsFigures f;
  const uint64_t sampled = stats_sampled_events(e);
  f.bpf = (e.sk_flags & TCPSCOPE_STATS_BPF) != 0;
  f.bpf_ns_per_event = sampled ? static_cast<double>(e.aux) / static_cast<double>(sampled) : 0;
  f.bpf_ns_per_run = e.conn ? static_cast<double>(e.aux) / static_cast<double>(e.conn) : 0;
  f.cpu_ns_per_event =
      e.sk ? (static_cast<double>(e.reason) + e.seg_len) * 1e6 / static_cast<double>(e.sk) : 0;
  return f;
}

void JsonWriter::before_value() {
  if (after_key_) {
    after_key_ = false;
    return;
  }
  if (depth_ > 0) {
    const uint64_t bit = 1ull << (depth_ - 1);
    if (need_comma_ & bit) out_.push_back(',');
    need_comma_ |= bit;
  }
}

void JsonWriter::open(char c) {
  before_value();
  out_.push_back(c);
  ++depth_;
  need_comma_ &= ~(1ull << (depth_ - 1));
}

void JsonWriter::close(char c) {
  --depth_;
  out_.push_back(c);
}

void JsonWriter::key(std::string_view k) {
  before_value();
  json_escape(out_, k);
  out_.push_back(':');
  after_key_ = true;
}

void JsonWriter::value(std::string_view s) {
  before_value();
  json_escape(out_, s);
}

void JsonWriter::value(bool b) {
  before_value();
  out_.append(b ? std::string_view("true") : std::string_view("false"));
}

void JsonWriter::value_signed(int64_t v) {
  before_value();
  const fmt::format_int f(v);
  out_.append(f.data(), f.data() + f.size());
}

void JsonWriter::value_unsigned(uint64_t v) {
  before_value();
  const fmt::format_int f(v);
  out_.append(f.data(), f.data() + f.size());
}

void JsonWriter::value(double v) {
  before_value();
  fmt::format_to(std::back_inserter(out_), "{:.3f}", v);
}

void JsonWriter::null() {
  before_value();
  out_.append(std::string_view("null"));
}

// ---- FdWriter ----------------------------------------------------------------

void FdWriter::flush() {
  size_t done = 0;
  while (error_ == 0 && done < buf_.size()) {
    const ssize_t n = ::write(fd_, buf_.data() + done, buf_.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      error_ = errno;
      break;
    }
    done += static_cast<size_t>(n);
  }
  buf_.clear();
}

// ---- helpers -------------------------------------------------------------------

std::string_view tcp_flags_text(uint8_t flags, std::array<char, 32>& buf) {
  static constexpr std::pair<uint8_t, std::string_view> kFlags[] = {
      {TCPSCOPE_TCP_SYN, "SYN"}, {TCPSCOPE_TCP_FIN, "FIN"}, {TCPSCOPE_TCP_RST, "RST"},
      {TCPSCOPE_TCP_PSH, "PSH"}, {TCPSCOPE_TCP_ACK, "ACK"}};
  size_t n = 0;
  for (auto [bit, name] : kFlags) {
    if (!(flags & bit)) continue;
    if (n) buf[n++] = '|';
    std::memcpy(buf.data() + n, name.data(), name.size());
    n += name.size();
  }
  return {buf.data(), n};
}

namespace {

std::string_view comm_of(const char* comm) { return {comm, strnlen(comm, 16)}; }

std::string_view owner_src_name(uint8_t src) {
  switch (src) {
    case TCPSCOPE_OWNER_SYSCALL: return "syscall";
    case TCPSCOPE_OWNER_LISTENER: return "listener";
    case TCPSCOPE_OWNER_IO: return "io";
    default: return "none";
  }
}

// Identity fields of an event: from the tracked connection when there is one
// (its owner may have been learnt since), else from the event itself.
struct Identity {
  uint64_t conn;
  uint32_t netns;
  uint8_t family;
  const uint8_t* laddr;
  const uint8_t* raddr;
  uint16_t lport, rport;
  uint32_t pid;
  std::string_view comm;
};

Identity identity_of(const Tracked& t) {
  const Event& e = *t.ev;
  if (t.conn) {
    const Connection& c = *t.conn;
    return {c.id, c.netns, c.family, c.laddr.data(), c.raddr.data(), c.lport,
            c.rport, c.pid, comm_of(c.comm.data())};
  }
  return {e.conn, e.netns, e.family, e.laddr, e.raddr, e.lport,
          e.rport, e.pid, comm_of(e.comm)};
}

void write_identity(JsonWriter& w, const Identity& id) {
  if (id.conn) w.member("conn", id.conn);
  else w.key("conn"), w.null();
  w.member("netns", static_cast<unsigned>(id.netns));
  w.member("family", static_cast<unsigned>(id.family));
  w.member("laddr", format_addr(id.family, id.laddr).view());
  w.member("lport", static_cast<unsigned>(id.lport));
  w.member("raddr", format_addr(id.family, id.raddr).view());
  w.member("rport", static_cast<unsigned>(id.rport));
  w.member("pid", static_cast<unsigned>(id.pid));
  w.member("comm", id.comm);
}

Identity identity_of(const Connection& c) {
  return {c.id, c.netns, c.family, c.laddr.data(), c.raddr.data(), c.lport,
          c.rport, c.pid, comm_of(c.comm.data())};
}

}  // namespace

namespace {

// The STATS record's derived figures.
void write_stats(JsonWriter& w, const Event& e) {
  const StatsFigures v = stats_figures(e);
  w.member("events", e.sk);
  w.member("lost", e.cgroup);
  if (v.bpf) {
    w.member("bpf_sampled_events", stats_sampled_events(e));
    w.member("bpf_runs", e.conn);
    w.member("bpf_ns", e.aux);
    w.member("bpf_ns_per_event", v.bpf_ns_per_event);
    w.member("bpf_ns_per_run", v.bpf_ns_per_run);
  } else {
    for (const char* k :
         {"bpf_sampled_events", "bpf_runs", "bpf_ns", "bpf_ns_per_event", "bpf_ns_per_run"}) {
      w.key(k);
      w.null();
    }
  }
  w.member("user_cpu_s", e.reason / 1e3);
  w.member("sys_cpu_s", e.seg_len / 1e3);
  w.member("cpu_ns_per_event", v.cpu_ns_per_event);
  w.member("max_rss_kib", static_cast<unsigned>(e.rx_queue));
  w.member("owners_not_kept", static_cast<unsigned>(e.netns));
}

}  // namespace

// ---- JsonLinesSink ---------------------------------------------------------------

void JsonLinesSink::write_start(uint64_t ts_ns,
                                const std::function<void(JsonWriter&)>& members) {
  JsonWriter w(out_.buf());
  w.begin_object();
  w.member("type", "start");
  w.member("time", time_.rfc3339(ts_ns));
  members(w);
  w.end_object();
  out_.buf().push_back('\n');
  out_.flush();
}

namespace {
// Records shown as event lines; the rest (sweeps, tw timers, config) feed
// the analyzers, which report what they mean as notices.
bool is_public_record(uint8_t type) {
  // Resets come out as reset_sent/reset_received notices of the reset
  // analysis, which adds their cause.
  return type == TCPSCOPE_EV_STATE || type == TCPSCOPE_EV_RETRANSMIT ||
         type == TCPSCOPE_EV_LOST || type == TCPSCOPE_EV_STATS;
}
}  // namespace

void JsonLinesSink::on_event(const Tracked& t) {
  const Event& e = *t.ev;
  if (!is_public_record(e.type)) return;
  JsonWriter w(out_.buf());
  w.begin_object();
  w.member("type", event_type_name(e.type));
  w.member("time", time_.rfc3339(e.ts_ns));
  if (e.type == TCPSCOPE_EV_STATS) {
    write_stats(w, e);
    w.end_object();
    out_.buf().push_back('\n');
    out_.maybe_flush();
    return;
  }
  if (e.type == TCPSCOPE_EV_LOST) {
    w.member("count", e.conn);
    w.end_object();
    out_.buf().push_back('\n');
    out_.maybe_flush();
    return;
  }
  if (e.type == TCPSCOPE_EV_STATE) {
    // The line of nearly every event, by hand; same text as the writer's.
    const Identity id = identity_of(t);
    auto& out = out_.buf();  // after the writer's {"type":...,"time":...
    put(out, ",\"conn\":");
    if (id.conn) put_uint(out, id.conn);
    else put(out, "null");
    put(out, ",\"netns\":");
    put_uint(out, id.netns);
    put(out, ",\"family\":");
    put_uint(out, id.family);
    put(out, ",\"laddr\":\"");
    put(out, format_addr(id.family, id.laddr).view());
    put(out, "\",\"lport\":");
    put_uint(out, id.lport);
    put(out, ",\"raddr\":\"");
    put(out, format_addr(id.family, id.raddr).view());
    put(out, "\",\"rport\":");
    put_uint(out, id.rport);
    put(out, ",\"pid\":");
    put_uint(out, id.pid);
    put(out, ",\"comm\":");
    json_escape(out, id.comm);
    put(out, ",\"old\":\"");
    put(out, state_name(e.old_state));
    put(out, "\",\"new\":\"");
    put(out, state_name(e.new_state));
    put(out, "\",\"ms\":");
    if (t.prev_state_ns >= 0) put_ms(out, t.prev_state_ns);
    else put(out, "null");
    put(out, ",\"owner\":\"");
    put(out, owner_src_name(t.conn ? t.conn->owner_src : e.owner_src));
    put(out, "\",\"rx_queue\":");
    put_uint(out, e.rx_queue);
    put(out, "}\n");
    out_.maybe_flush();
    return;
  }
  write_identity(w, identity_of(t));
  std::array<char, 32> fbuf{};
  switch (e.type) {
    case TCPSCOPE_EV_STATE:
      w.member("old", state_name(e.old_state));
      w.member("new", state_name(e.new_state));
      w.key("ms");
      if (t.prev_state_ns >= 0) w.value(static_cast<double>(t.prev_state_ns) / 1e6);
      else w.null();
      break;
    case TCPSCOPE_EV_RETRANSMIT:
      w.member("state", state_name(e.old_state));
      w.member("flags", tcp_flags_text(e.tcp_flags, fbuf));
      w.member("bytes", static_cast<unsigned>(e.seg_len));
      if (t.conn) w.member("count", static_cast<unsigned>(t.conn->retransmits));
      break;
    case TCPSCOPE_EV_RESET_SENT:
      w.member("state", (e.sk_flags & TCPSCOPE_SK_NO_SOCKET) ? std::string_view("NONE")
                                                              : state_name(e.old_state));
      w.member("reason", reset_reason_name(e.reason));
      w.member("seg_flags", tcp_flags_text(e.tcp_flags, fbuf));
      w.member("seg_len", static_cast<unsigned>(e.seg_len));
      w.member("no_socket", (e.sk_flags & TCPSCOPE_SK_NO_SOCKET) != 0);
      break;
    case TCPSCOPE_EV_RESET_RECEIVED:
      w.member("state", state_name(e.old_state));
      break;
    default:
      break;
  }
  if (e.type != TCPSCOPE_EV_RESET_SENT || !(e.sk_flags & TCPSCOPE_SK_NO_SOCKET)) {
    w.member("owner", owner_src_name(t.conn ? t.conn->owner_src : e.owner_src));
    w.member("rx_queue", static_cast<unsigned>(e.rx_queue));
  }
  w.end_object();
  out_.buf().push_back('\n');
  out_.maybe_flush();
}

void JsonLinesSink::on_notice(const Notice& n) {
  JsonWriter w(out_.buf());
  w.begin_object();
  w.member("type", n.type);
  w.member("time", time_.rfc3339(n.ts_ns));
  if (n.conn) write_identity(w, identity_of(*n.conn));
  for (int i = 0; i < n.nfields; ++i) {
    const auto& f = n.fields[i];
    if (f.is_text) w.member(f.key, f.text);
    else if (f.is_bool) w.member(f.key, f.number != 0);
    else w.member(f.key, f.number);
  }
  w.end_object();
  out_.buf().push_back('\n');
  out_.maybe_flush();
}

void JsonLinesSink::on_report(const Pipeline& p, uint64_t end_ns) {
  JsonWriter w(out_.buf());
  w.begin_object();
  w.member("type", "report");
  w.member("time", time_.rfc3339(end_ns));
  w.member("events", p.events());
  p.write_report_json(w, time_);
  w.end_object();
  out_.buf().push_back('\n');
  out_.flush();
}

// ---- TableSink ---------------------------------------------------------------------

namespace {
// "addr:port" (IPv6 in brackets), padded to the column width (at least one
// space after it).
void put_endpoint(fmt::memory_buffer& out, uint8_t family, const uint8_t* addr, uint16_t port,
                  size_t column) {
  const size_t before = out.size();
  const auto a = format_addr(family, addr);
  if (family == 6) out.push_back('[');
  put(out, a.view());
  if (family == 6) out.push_back(']');
  out.push_back(':');
  put_uint(out, port, 5);
  const size_t width = out.size() - before;
  for (size_t n = width; n < column; ++n) out.push_back(' ');
  if (width >= column) out.push_back(' ');
}

void table_prefix(fmt::memory_buffer& out, TimeFormatter& time, uint64_t ts,
                  const Identity& id) {
  put(out, time.clock(ts));
  out.push_back(' ');
  put_uint(out, id.pid, 7);
  out.push_back(' ');
  put_padded(out, id.comm, 15);
  out.push_back(' ');
  put_endpoint(out, id.family, id.laddr, id.lport, 22);
  put_endpoint(out, id.family, id.raddr, id.rport, 22);
}
}  // namespace

void TableSink::write_header() {
  fmt::format_to(std::back_inserter(out_.buf()),
                 "{:<12} {:<7} {:<15} {:<21} {:<21} {:<11} -> {:<11} {}\n", "TIME",
                 "PID", "COMM", "LADDR:LPORT", "RADDR:RPORT", "OLDSTATE", "NEWSTATE",
                 "MS");
  out_.flush();
}

void TableSink::on_event(const Tracked& t) {
  const Event& e = *t.ev;
  auto& out = out_.buf();
  auto o = std::back_inserter(out);
  std::array<char, 32> fbuf{};
  switch (e.type) {
    case TCPSCOPE_EV_STATE:
      table_prefix(out, time_, e.ts_ns, identity_of(t));
      put_padded(out, state_name(e.old_state), 11);
      put(out, " -> ");
      put_padded(out, state_name(e.new_state), 11);
      out.push_back(' ');
      if (t.prev_state_ns >= 0) put_ms(out, t.prev_state_ns);
      else out.push_back('-');
      out.push_back('\n');
      break;
    case TCPSCOPE_EV_RETRANSMIT:
      table_prefix(out, time_, e.ts_ns, identity_of(t));
      fmt::format_to(o, "RETRANSMIT in {} [{}] {} bytes\n", state_name(e.old_state),
                     tcp_flags_text(e.tcp_flags, fbuf), e.seg_len);
      break;
    case TCPSCOPE_EV_RESET_SENT:
      table_prefix(out, time_, e.ts_ns, identity_of(t));
      fmt::format_to(o, "RST SENT in {} reason {} answering [{}]\n",
                     (e.sk_flags & TCPSCOPE_SK_NO_SOCKET) ? std::string_view("no socket")
                                                          : state_name(e.old_state),
                     reset_reason_name(e.reason), tcp_flags_text(e.tcp_flags, fbuf));
      break;
    case TCPSCOPE_EV_RESET_RECEIVED:
      table_prefix(out, time_, e.ts_ns, identity_of(t));
      fmt::format_to(o, "RST RECEIVED in {}\n", state_name(e.old_state));
      break;
    case TCPSCOPE_EV_LOST:
      fmt::format_to(o, "{} LOST {} events (ring buffer full)\n", time_.clock(e.ts_ns),
                     e.conn);
      break;
    case TCPSCOPE_EV_STATS: {
      const StatsFigures v = stats_figures(e);
      fmt::format_to(o, "{} tcpscope overhead: {} events, {} lost", time_.clock(e.ts_ns),
                     e.sk, e.cgroup);
      if (v.bpf) fmt::format_to(o, ", BPF {:.1f} ns/event ({} runs, {:.1f} ns/run)",
                                v.bpf_ns_per_event, e.conn, v.bpf_ns_per_run);
      fmt::format_to(o, ", CPU user {:.3f} s sys {:.3f} s ({:.0f} ns/event), peak RSS {:.1f} MiB",
                     e.reason / 1e3, e.seg_len / 1e3, v.cpu_ns_per_event, e.rx_queue / 1024.0);
      if (e.netns)
        fmt::format_to(o, ", {} sockets traced without owner (socket table full: raise "
                          "--max-sockets)",
                       e.netns);
      out.push_back('\n');
      break;
    }
    default:
      return;
  }
  out_.maybe_flush();
}

void TableSink::on_notice(const Notice& n) {
  auto& out = out_.buf();
  auto o = std::back_inserter(out);
  if (n.conn) {
    table_prefix(out, time_, n.ts_ns, identity_of(*n.conn));
  } else {
    fmt::format_to(o, "{} ", time_.clock(n.ts_ns));
  }
  for (char c : n.type) out.push_back(static_cast<char>(c >= 'a' && c <= 'z' ? c - 32 : c));
  for (int i = 0; i < n.nfields; ++i) {
    const auto& f = n.fields[i];
    if (f.is_text) fmt::format_to(o, " {}={}", f.key, f.text);
    else if (f.is_bool) fmt::format_to(o, " {}={}", f.key, f.number ? "yes" : "no");
    else fmt::format_to(o, " {}={}", f.key, f.number);
  }
  out.push_back('\n');
  out_.maybe_flush();
}

void TableSink::on_report(const Pipeline& p, uint64_t) {
  p.write_report_text(out_.buf(), time_, style_);
  out_.flush();
}

}  // namespace tcpscope
