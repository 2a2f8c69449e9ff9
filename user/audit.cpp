#include "tcpscope/audit.hpp"

#include <algorithm>
#include <charconv>

#include "tcpscope/timewait.hpp"

namespace tcpscope {

void find_vanished(const Tracker& tracker, std::span<const uint64_t> present, uint32_t netns,
                   uint64_t pass_start_ns, std::vector<Event>& out) {
  tracker.for_each_open([&](const Connection& c) {
    // A request sock (a reset it sent made the entry) never reports its
    // end: it is no full socket, its state never changes.
    if (c.state == kTcpNewSynRecv || c.state == kTcpTimeWait) return;
    if (c.netns != netns || (c.id >> 63) ||
        c.state_since_ns + audit_settle_ns(c.state) > pass_start_ns ||
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

std::optional<uint64_t> parse_tcp_out_rsts(std::string_view snmp) {
  // Two "Tcp:" lines: the field names, then their values.
  auto next_line = [&snmp](std::string_view& line) {
    if (snmp.empty()) return false;
    const size_t nl = snmp.find('\n');
    line = snmp.substr(0, nl);
    snmp = nl == std::string_view::npos ? std::string_view{} : snmp.substr(nl + 1);
    return true;
  };
  auto fields = [](std::string_view line) {
    std::vector<std::string_view> out;
    while (!line.empty()) {
      const size_t start = line.find_first_not_of(' ');
      if (start == std::string_view::npos) break;
      line.remove_prefix(start);
      const size_t end = line.find(' ');
      out.push_back(line.substr(0, end));
      line = end == std::string_view::npos ? std::string_view{} : line.substr(end);
    }
    return out;
  };
  std::string_view line;
  while (next_line(line)) {
    if (!line.starts_with("Tcp: ")) continue;
    const auto names = fields(line);
    std::string_view values_line;
    if (!next_line(values_line) || !values_line.starts_with("Tcp: ")) return std::nullopt;
    const auto values = fields(values_line);
    for (size_t i = 1; i < names.size() && i < values.size(); ++i) {
      if (names[i] != "OutRsts") continue;
      const char* end = values[i].data() + values[i].size();
      uint64_t v = 0;
      const auto [p, ec] = std::from_chars(values[i].data(), end, v);
      if (ec != std::errc() || p != end) return std::nullopt;
      return v;
    }
    return std::nullopt;
  }
  return std::nullopt;
}

}  // namespace tcpscope
