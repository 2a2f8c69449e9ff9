#include "tcpscope/output.hpp"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>

namespace tcpscope {

// ---- JsonWriter ------------------------------------------------------------

namespace {

constexpr bool is_printable_ascii(char c) { return c >= 0x20 && c < 0x7f; }

// Hot lines (table rows, JSON state lines, notices) are built by hand: fmt's
// format-spec parsing was a third of the consumer's time under churn. They
// are written with plain stores into room reserved at the end of the buffer,
// without a capacity check or library call per piece.
class LineWriter {
 public:
  // max_size: an upper bound of what the line may take.
  LineWriter(fmt::memory_buffer& out, size_t max_size) : out_(out) {
    const size_t start = out.size();
    out.resize(start + max_size);
    p_ = out.data() + start;
  }
  ~LineWriter() { out_.resize(static_cast<size_t>(p_ - out_.data())); }
  LineWriter(const LineWriter&) = delete;
  LineWriter& operator=(const LineWriter&) = delete;

  template <size_t N>
  void lit(const char (&s)[N]) {
    std::memcpy(p_, s, N - 1);
    p_ += N - 1;
  }
  void text(std::string_view s) {
    std::memcpy(p_, s.data(), s.size());
    p_ += s.size();
  }
  // Bytes a process or a capture chose (a comm, a command line): a
  // terminal would run the escape sequences they may hold, so only
  // printable ASCII passes, anything else as '?' (as ps shows them).
  void printable(std::string_view s) {
    for (const char c : s) *p_++ = is_printable_ascii(c) ? c : '?';
  }
  void ch(char c) { *p_++ = c; }
  char* pos() const { return p_; }
  // Spaces up to `width` chars from `column`, none if it is that wide.
  void pad(const char* column, size_t width) {
    while (p_ < column + width) *p_++ = ' ';
  }
  void padded(std::string_view s, size_t width) {
    char* column = p_;
    text(s);
    pad(column, width);
  }
  void padded_printable(std::string_view s, size_t width) {
    char* column = p_;
    printable(s);
    pad(column, width);
  }

  void uint(uint64_t v) {
    static constexpr char kPairs[] =
        "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
        "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
        "8081828384858687888990919293949596979899";
    const size_t n = digits(v);
    char* d = p_ + n;
    while (v >= 100) {
      const auto pair = static_cast<size_t>(v % 100) * 2;
      v /= 100;
      *--d = kPairs[pair + 1];
      *--d = kPairs[pair];
    }
    if (v >= 10) {
      *--d = kPairs[v * 2 + 1];
      *--d = kPairs[v * 2];
    } else {
      *--d = static_cast<char>('0' + v);
    }
    p_ += n;
  }
  void sint(int64_t v) {
    if (v < 0) {
      ch('-');
      uint(0 - static_cast<uint64_t>(v));
    } else {
      uint(static_cast<uint64_t>(v));
    }
  }
  void uint_padded(uint64_t v, size_t width) {
    char* column = p_;
    uint(v);
    pad(column, width);
  }
  // "12.345": ns as milliseconds with 3 decimals, rounded to the microsecond.
  void ms(int64_t ns) {
    const uint64_t us = (static_cast<uint64_t>(ns) + 500) / 1000;
    uint(us / 1000);
    p_[0] = '.';
    p_[1] = static_cast<char>('0' + us / 100 % 10);
    p_[2] = static_cast<char>('0' + us / 10 % 10);
    p_[3] = static_cast<char>('0' + us % 10);
    p_ += 4;
  }
  void addr(uint8_t family, const uint8_t* a) { p_ += format_addr_to(p_, family, a); }
  // As json_escape: at most 6 chars per byte, plus the quotes.
  void json_string(std::string_view s);

 private:
  static size_t digits(uint64_t v) {
    for (size_t n = 1;; n += 4, v /= 10000) {
      if (v < 10) return n;
      if (v < 100) return n + 1;
      if (v < 1000) return n + 2;
      if (v < 10000) return n + 3;
    }
  }

  fmt::memory_buffer& out_;
  char* p_;
};

// Room for a JSON string of s: every byte escaped, and the quotes.
size_t json_room(std::string_view s) { return s.size() * 6 + 2; }

bool json_plain(unsigned char c) { return c >= 0x20 && c < 0x7f && c != '"' && c != '\\'; }

void LineWriter::json_string(std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  ch('"');
  for (const char byte : s) {
    const auto c = static_cast<unsigned char>(byte);
    if (json_plain(c)) {
      *p_++ = byte;
    } else if (c == '"' || c == '\\') {
      *p_++ = '\\';
      *p_++ = byte;
    } else if (c == '\n') {
      lit("\\n");
    } else if (c == '\t') {
      lit("\\t");
    } else {
      // Control bytes and anything non-ASCII: \u00XX keeps output valid
      // whatever bytes a process put in its comm.
      lit("\\u00");
      *p_++ = kHex[c >> 4];
      *p_++ = kHex[c & 15];
    }
  }
  ch('"');
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
  static constexpr std::pair<uint8_t, std::string_view> kFlags[] = {{TCPSCOPE_TCP_SYN, "SYN"},
                                                                    {TCPSCOPE_TCP_FIN, "FIN"},
                                                                    {TCPSCOPE_TCP_RST, "RST"},
                                                                    {TCPSCOPE_TCP_PSH, "PSH"},
                                                                    {TCPSCOPE_TCP_ACK, "ACK"}};
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
    case TCPSCOPE_OWNER_SYSCALL:
      return "syscall";
    case TCPSCOPE_OWNER_LISTENER:
      return "listener";
    case TCPSCOPE_OWNER_IO:
      return "io";
    default:
      return "none";
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
    return {c.id,    c.netns, c.family, c.laddr.data(),        c.raddr.data(),
            c.lport, c.rport, c.pid,    comm_of(c.comm.data())};
  }
  return {e.conn, e.netns, e.family, e.laddr, e.raddr, e.lport, e.rport, e.pid, comm_of(e.comm)};
}

// Room for the identity members: addresses, numbers and an escaped comm.
constexpr size_t kIdentityRoom = 384;

void put_identity_json(LineWriter& line, const Identity& id);

}  // namespace

// The text of recent identities. A connection's lines repeat one identity
// (its owner may be learnt on the way, its local port set at connect), and
// formatting it each time, numbers, addresses and the escaped comm, was
// some 15% of replaying a churn capture (the replay is 9% faster with
// this, to JSON Lines and to the table alike). Direct-mapped by connection
// id; an entry serves only an identity equal in every field. Allocated once
// with its sink (140 KB).
class IdentityTextCache {
 public:
  IdentityTextCache() : entries_(kEntries) {}
  // Writes id's text; stored for the next time if it fits an entry.
  template <typename Put>
  void put(LineWriter& line, const Identity& id, Put&& format) {
    if (!id.conn || id.comm.size() > sizeof(Key::comm)) return format(line, id);
    const Key key = Key::of(id);
    Entry& e = entries_[CookieHash{}(id.conn) & (kEntries - 1)];
    if (e.len && e.key == key) {
      line.text(std::string_view(e.text, e.len));
      return;
    }
    char* const start = line.pos();
    format(line, id);
    const auto len = static_cast<size_t>(line.pos() - start);
    if (len > sizeof(e.text)) {
      e.len = 0;
      return;
    }
    e.key = key;
    e.len = static_cast<uint16_t>(len);
    std::memcpy(e.text, start, len);
  }

 private:
  static constexpr size_t kEntries = 512;
  // Every field of an Identity, by value: equal keys, equal text.
  struct Key {
    uint64_t conn = 0;
    uint32_t netns = 0, pid = 0;
    uint16_t lport = 0, rport = 0;
    uint8_t family = 0, comm_len = 0;
    std::array<uint8_t, 16> laddr{}, raddr{};
    std::array<char, 16> comm{};
    bool operator==(const Key&) const = default;
    static Key of(const Identity& id) {
      Key k;
      k.conn = id.conn;
      k.netns = id.netns;
      k.pid = id.pid;
      k.lport = id.lport;
      k.rport = id.rport;
      k.family = id.family;
      k.comm_len = static_cast<uint8_t>(id.comm.size());
      std::memcpy(k.laddr.data(), id.laddr, k.laddr.size());
      std::memcpy(k.raddr.data(), id.raddr, k.raddr.size());
      std::memcpy(k.comm.data(), id.comm.data(), id.comm.size());
      return k;
    }
  };
  struct Entry {
    Key key;
    uint16_t len = 0;  // of text; 0: empty
    char text[200];
  };
  std::vector<Entry> entries_;
};

namespace {

// ,"conn":...,"comm":"..." as JsonWriter's members would write them.
void put_identity_json(LineWriter& line, const Identity& id) {
  line.lit(",\"conn\":");
  if (id.conn)
    line.uint(id.conn);
  else
    line.lit("null");
  line.lit(",\"netns\":");
  line.uint(id.netns);
  line.lit(",\"family\":");
  line.uint(id.family);
  line.lit(",\"laddr\":\"");
  line.addr(id.family, id.laddr);
  line.lit("\",\"lport\":");
  line.uint(id.lport);
  line.lit(",\"raddr\":\"");
  line.addr(id.family, id.raddr);
  line.lit("\",\"rport\":");
  line.uint(id.rport);
  line.lit(",\"pid\":");
  line.uint(id.pid);
  line.lit(",\"comm\":");
  line.json_string(id.comm);
}

void write_identity(JsonWriter& w, const Identity& id) {
  if (id.conn)
    w.member("conn", id.conn);
  else
    w.key("conn"), w.null();
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
  return {c.id,    c.netns, c.family, c.laddr.data(),        c.raddr.data(),
          c.lport, c.rport, c.pid,    comm_of(c.comm.data())};
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

void JsonLinesSink::write_start(uint64_t ts_ns, const std::function<void(JsonWriter&)>& members) {
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
  return type == TCPSCOPE_EV_STATE || type == TCPSCOPE_EV_RETRANSMIT || type == TCPSCOPE_EV_LOST ||
         type == TCPSCOPE_EV_STATS || type == TCPSCOPE_EV_VANISHED;
}
}  // namespace

JsonLinesSink::JsonLinesSink(FdWriter& out, TimeFormatter& time)
    : out_(out), time_(time), ids_(std::make_unique<IdentityTextCache>()) {}
JsonLinesSink::~JsonLinesSink() = default;

void JsonLinesSink::on_event(const Tracked& t) {
  const Event& e = *t.ev;
  if (!is_public_record(e.type)) return;
  if (e.type == TCPSCOPE_EV_STATE) {
    // The line of nearly every event, by hand; same text as the writer's.
    const Identity id = identity_of(t);
    {
      LineWriter line(out_.buf(), 256 + kIdentityRoom);
      line.lit("{\"type\":\"state\",\"time\":\"");
      line.text(time_.rfc3339(e.ts_ns));
      line.ch('"');
      ids_->put(line, id, put_identity_json);
      line.lit(",\"old\":\"");
      line.text(state_name(e.old_state));
      line.lit("\",\"new\":\"");
      line.text(state_name(e.new_state));
      line.lit("\",\"ms\":");
      if (t.prev_state_ns >= 0)
        line.ms(t.prev_state_ns);
      else
        line.lit("null");
      line.lit(",\"owner\":\"");
      line.text(owner_src_name(t.conn ? t.conn->owner_src : e.owner_src));
      line.lit("\",\"rx_queue\":");
      line.uint(e.rx_queue);
      line.lit("}\n");
    }
    out_.maybe_flush();
    return;
  }
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
    w.member("kernel_skipped", e.aux);
    // Found by the kernel's own count of resets sent, not by our counters.
    if (e.reason == TCPSCOPE_EV_RESET_SENT) w.member("missing", "reset_sent");
    w.end_object();
    out_.buf().push_back('\n');
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
      if (t.prev_state_ns >= 0)
        w.value(static_cast<double>(t.prev_state_ns) / 1e6);
      else
        w.null();
      break;
    case TCPSCOPE_EV_RETRANSMIT:
      w.member("state", state_name(e.old_state));
      w.member("flags", tcp_flags_text(e.tcp_flags, fbuf));
      w.member("bytes", static_cast<unsigned>(e.seg_len));
      if (t.conn) w.member("count", static_cast<unsigned>(t.conn->retransmits));
      // The kernel's count for the socket, segments (ss: retrans:N/total).
      w.member("total_retrans", static_cast<unsigned>(e.aux & 0xffffffffu));
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
    case TCPSCOPE_EV_VANISHED:
      // The last state seen, and for how long before the audit missed it.
      w.member("state", state_name(e.old_state));
      w.key("ms");
      if (e.aux && e.aux <= e.ts_ns)
        w.value(static_cast<double>(e.ts_ns - e.aux) / 1e6);
      else
        w.null();
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

namespace {
// Room for a notice's fields, in JSON or in the table.
size_t fields_room(const Notice& n) {
  size_t room = 0;
  for (int i = 0; i < n.nfields; ++i)
    room += json_room(n.fields[i].key) + json_room(n.fields[i].text) + 32;
  return room;
}
}  // namespace

void JsonLinesSink::on_notice(const Notice& n) {
  {
    // By hand, as the JsonWriter would write it: notices come with most
    // connections under churn (time_wait_enter, time_wait_end).
    LineWriter line(out_.buf(), 128 + json_room(n.type) + kIdentityRoom + fields_room(n));
    line.lit("{\"type\":");
    line.json_string(n.type);
    line.lit(",\"time\":\"");
    line.text(time_.rfc3339(n.ts_ns));
    line.ch('"');
    if (n.conn) ids_->put(line, identity_of(*n.conn), put_identity_json);
    for (int i = 0; i < n.nfields; ++i) {
      const auto& f = n.fields[i];
      line.ch(',');
      line.json_string(f.key);
      line.ch(':');
      if (f.is_text)
        line.json_string(f.text);
      else if (f.is_bool)
        f.number != 0 ? line.lit("true") : line.lit("false");
      else
        line.sint(f.number);
    }
    line.lit("}\n");
  }
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
// Room for a row's prefix: time, pid, comm and both endpoints.
constexpr size_t kPrefixRoom = 256;

// "addr:port" (IPv6 in brackets), padded to the column width (at least one
// space after it).
void put_endpoint(LineWriter& line, uint8_t family, const uint8_t* addr, uint16_t port,
                  size_t column) {
  char* const start = line.pos();
  if (family == 6) line.ch('[');
  line.addr(family, addr);
  if (family == 6) line.ch(']');
  line.ch(':');
  line.uint_padded(port, 5);
  if (line.pos() >= start + column)
    line.ch(' ');
  else
    line.pad(start, column);
}

// The row's columns after the time: pid, comm and both endpoints.
void put_row_identity(LineWriter& line, const Identity& id) {
  line.ch(' ');
  line.uint_padded(id.pid, 7);
  line.ch(' ');
  line.padded_printable(id.comm, 15);
  line.ch(' ');
  put_endpoint(line, id.family, id.laddr, id.lport, 22);
  put_endpoint(line, id.family, id.raddr, id.rport, 22);
}

void table_prefix(LineWriter& line, TimeFormatter& time, uint64_t ts, const Identity& id,
                  IdentityTextCache& ids) {
  line.text(time.clock(ts));
  ids.put(line, id, put_row_identity);
}

void table_prefix(fmt::memory_buffer& out, TimeFormatter& time, uint64_t ts, const Identity& id,
                  IdentityTextCache& ids) {
  LineWriter line(out, kPrefixRoom);
  table_prefix(line, time, ts, id, ids);
}
}  // namespace

TableSink::TableSink(FdWriter& out, TimeFormatter& time, TextStyle style)
    : out_(out), time_(time), style_(style), ids_(std::make_unique<IdentityTextCache>()) {}
TableSink::~TableSink() = default;

void TableSink::write_header() {
  fmt::format_to(std::back_inserter(out_.buf()),
                 "{:<12} {:<7} {:<15} {:<21} {:<21} {:<11} -> {:<11} {}\n", "TIME", "PID", "COMM",
                 "LADDR:LPORT", "RADDR:RPORT", "OLDSTATE", "NEWSTATE", "MS");
  out_.flush();
}

void TableSink::on_event(const Tracked& t) {
  const Event& e = *t.ev;
  auto& out = out_.buf();
  auto o = std::back_inserter(out);
  std::array<char, 32> fbuf{};
  switch (e.type) {
    case TCPSCOPE_EV_STATE: {
      LineWriter line(out, kPrefixRoom + 64);
      table_prefix(line, time_, e.ts_ns, identity_of(t), *ids_);
      line.padded(state_name(e.old_state), 11);
      line.lit(" -> ");
      line.padded(state_name(e.new_state), 11);
      line.ch(' ');
      if (t.prev_state_ns >= 0)
        line.ms(t.prev_state_ns);
      else
        line.ch('-');
      line.ch('\n');
      break;
    }
    case TCPSCOPE_EV_RETRANSMIT:
      table_prefix(out, time_, e.ts_ns, identity_of(t), *ids_);
      fmt::format_to(o, "RETRANSMIT in {} [{}] {} bytes\n", state_name(e.old_state),
                     tcp_flags_text(e.tcp_flags, fbuf), e.seg_len);
      break;
    case TCPSCOPE_EV_RESET_SENT:
      table_prefix(out, time_, e.ts_ns, identity_of(t), *ids_);
      fmt::format_to(o, "RST SENT in {} reason {} answering [{}]\n",
                     (e.sk_flags & TCPSCOPE_SK_NO_SOCKET) ? std::string_view("no socket")
                                                          : state_name(e.old_state),
                     reset_reason_name(e.reason), tcp_flags_text(e.tcp_flags, fbuf));
      break;
    case TCPSCOPE_EV_RESET_RECEIVED:
      table_prefix(out, time_, e.ts_ns, identity_of(t), *ids_);
      fmt::format_to(o, "RST RECEIVED in {}\n", state_name(e.old_state));
      break;
    case TCPSCOPE_EV_VANISHED:
      table_prefix(out, time_, e.ts_ns, identity_of(t), *ids_);
      fmt::format_to(o, "VANISHED in {}: gone from the socket table, its end was lost\n",
                     state_name(e.old_state));
      break;
    case TCPSCOPE_EV_LOST: {
      const uint64_t skipped = std::min(e.aux, e.conn);
      fmt::format_to(o, "{} LOST {} events (", time_.clock(e.ts_ns), e.conn);
      if (skipped < e.conn) fmt::format_to(o, "{} ring buffer full", e.conn - skipped);
      if (skipped && skipped < e.conn) fmt::format_to(o, ", ");
      if (skipped) fmt::format_to(o, "{} program runs the kernel skipped", skipped);
      if (e.reason == TCPSCOPE_EV_RESET_SENT)
        fmt::format_to(o, ": resets the kernel counted as sent (TcpOutRsts), never traced");
      fmt::format_to(o, ")\n");
    } break;
    case TCPSCOPE_EV_STATS: {
      const StatsFigures v = stats_figures(e);
      fmt::format_to(o, "{} tcpscope overhead: {} events, {} lost", time_.clock(e.ts_ns), e.sk,
                     e.cgroup);
      if (v.bpf)
        fmt::format_to(o, ", BPF {:.1f} ns/event ({} runs, {:.1f} ns/run)", v.bpf_ns_per_event,
                       e.conn, v.bpf_ns_per_run);
      fmt::format_to(o, ", CPU user {:.3f} s sys {:.3f} s ({:.0f} ns/event), peak RSS {:.1f} MiB",
                     e.reason / 1e3, e.seg_len / 1e3, v.cpu_ns_per_event, e.rx_queue / 1024.0);
      if (e.netns)
        fmt::format_to(o,
                       ", {} sockets traced without owner (socket table full: raise "
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
  {
    LineWriter line(out_.buf(), kPrefixRoom + n.type.size() + fields_room(n) + 1);
    if (n.conn) {
      table_prefix(line, time_, n.ts_ns, identity_of(*n.conn), *ids_);
    } else {
      line.text(time_.clock(n.ts_ns));
      line.ch(' ');
    }
    for (char c : n.type) line.ch(static_cast<char>(c >= 'a' && c <= 'z' ? c - 32 : c));
    for (int i = 0; i < n.nfields; ++i) {
      const auto& f = n.fields[i];
      line.ch(' ');
      line.text(f.key);
      line.ch('=');
      if (f.is_text)
        line.printable(f.text);
      else if (f.is_bool)
        line.text(f.number ? "yes" : "no");
      else
        line.sint(f.number);
    }
    line.ch('\n');
  }
  out_.maybe_flush();
}

void TableSink::on_report(const Pipeline& p, uint64_t) {
  auto& out = out_.buf();
  const size_t start = out.size();
  p.write_report_text(out, time_, style_);
  // The report names processes, command lines and containers: the same
  // rule as the rows (written once: a pass over it all is cheap).
  for (size_t i = start; i < out.size(); ++i)
    if (out[i] != '\n' && !is_printable_ascii(out[i])) out[i] = '?';
  out_.flush();
}

}  // namespace tcpscope
