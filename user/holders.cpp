#include "tcpscope/holders.hpp"
#include "tcpscope/unique_fd.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <ctime>

#include "tcpscope/format.hpp"

namespace tcpscope {

HolderResolverConfig HolderResolverConfig::for_threshold(uint64_t threshold_ns) {
  HolderResolverConfig c;
  c.threshold_ns = threshold_ns;
  c.lead_ns = std::min<uint64_t>(threshold_ns / 4, 1'000'000'000ull);
  return c;
}

std::string read_file(const std::string& path, size_t max) {
  UniqueFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  std::string s;
  if (fd.get() < 0) return s;
  s.resize(max);
  size_t have = 0;
  while (have < max) {
    const ssize_t n = read(fd.get(), s.data() + have, max - have);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    have += static_cast<size_t>(n);
  }
  s.resize(have);
  return s;
}

namespace {

using Fd = UniqueFd;

bool parse_pid(const char* name, uint32_t& pid) {
  const char* end = name + strlen(name);
  auto [p, ec] = std::from_chars(name, end, pid);
  return ec == std::errc() && p == end && pid > 0;
}

// "socket:[12345]" -> 12345.
bool socket_inode(const char* link, size_t len, uint64_t& ino) {
  constexpr std::string_view kPrefix = "socket:[";
  if (len < kPrefix.size() + 2 || std::memcmp(link, kPrefix.data(), kPrefix.size()) != 0 ||
      link[len - 1] != ']')
    return false;
  auto [p, ec] = std::from_chars(link + kPrefix.size(), link + len - 1, ino);
  return ec == std::errc() && p == link + len - 1;
}

}  // namespace

void HolderResolver::observe(const Event& e) {
  if (e.type == TCPSCOPE_EV_STATE) {
    if (e.new_state == kTcpCloseWait) {
      if (e.conn == 0) return;
      if (cw_.size() >= cfg_.max_tracked) {
        ++overflow_;
        return;
      }
      cw_.put(e.conn, e.ts_ns + cfg_.threshold_ns - std::min(cfg_.threshold_ns, cfg_.lead_ns));
    } else if (e.old_state == kTcpCloseWait) {
      cw_.erase(e.conn);
    }
  } else if (e.type == TCPSCOPE_EV_SNAPSHOT && e.new_state == kTcpCloseWait && e.conn) {
    // Same age bound as the analyzer: the last ACK received.
    uint64_t entered = e.ts_ns;
    if (e.seg_len != 0xffffffffu)
      entered -= std::min<uint64_t>(entered, static_cast<uint64_t>(e.seg_len) * 1'000'000);
    const uint64_t due = entered + cfg_.threshold_ns;
    cw_.put(e.conn, due - std::min(due, cfg_.lead_ns));
  }
}

void HolderResolver::step(uint64_t now_ns, const ReadSockets& read, const Emit& emit) {
  if (!cfg_.resolve) return;
  if (!round_.active) {
    if (cw_.empty() || now_ns < next_round_ns_) return;
    if (!start_round(now_ns, read)) return;
  }
  const uint64_t t0 = boottime_now_ns();
  const bool done = walk(t0 + cfg_.step_ns);
  const uint64_t spent = boottime_now_ns() - t0;
  ++round_.steps;
  round_.proc_ns += spent;
  round_.max_step_ns = std::max(round_.max_step_ns, spent);
  if (done) end_round(emit);
}

bool HolderResolver::start_round(uint64_t now_ns, const ReadSockets& read) {
  next_round_ns_ = now_ns + cfg_.min_round_gap_ns;
  due_.clear();
  cw_.for_each([&](uint64_t conn, uint64_t& due) {
    if (due <= now_ns) {
      due_.push_back(conn);
      due = now_ns + cfg_.refresh_ns;  // resolved now; again later if still stuck
    }
  });
  if (due_.empty()) return false;
  std::sort(due_.begin(), due_.end());
  const uint64_t t0 = boottime_now_ns();
  auto got = read(records_);
  const uint64_t t1 = boottime_now_ns();
  if (!got) return false;
  Round& r = round_;
  r = Round{};
  r.start_ns = t0;
  r.iter_ns = t1 - t0;
  for (const SockRecord& s : records_) {
    if (s.state != kTcpCloseWait || s.ino == 0) continue;
    if (!std::binary_search(due_.begin(), due_.end(), s.conn)) continue;
    r.socks.push_back(s);
    r.inodes.push_back(s.ino);
  }
  if (r.socks.empty()) return false;  // all gone meanwhile
  std::sort(r.inodes.begin(), r.inodes.end());
  r.proc_dir.reset(opendir(cfg_.proc_root.c_str()));
  if (!r.proc_dir) return false;
  r.active = true;
  return true;
}

bool HolderResolver::walk(uint64_t deadline_ns) {
  Round& r = round_;
  uint32_t budget = cfg_.step_fds;
  char link[64];
  std::string path;
  while (budget > 0) {
    if (!r.fd_dir) {
      const dirent* d = readdir(r.proc_dir.get());
      if (!d) return true;  // every process seen
      uint32_t pid = 0;
      if (!parse_pid(d->d_name, pid)) continue;
      path.assign(cfg_.proc_root).append("/").append(d->d_name).append("/fd");
      r.fd_dir.reset(opendir(path.c_str()));  // fails for processes gone meanwhile
      if (!r.fd_dir) continue;
      r.pid = pid;
      ++r.procs;
    }
    const dirent* f = readdir(r.fd_dir.get());
    if (!f) {
      r.fd_dir.reset();
      continue;
    }
    if (f->d_name[0] == '.') continue;
    --budget;
    ++r.fds;
    const ssize_t n = readlinkat(dirfd(r.fd_dir.get()), f->d_name, link, sizeof(link));
    uint64_t ino = 0;
    if (n > 0 && socket_inode(link, static_cast<size_t>(n), ino) &&
        std::binary_search(r.inodes.begin(), r.inodes.end(), ino)) {
      int32_t fd = 0;
      std::from_chars(f->d_name, f->d_name + strlen(f->d_name), fd);
      r.found.push_back(Found{ino, r.pid, fd});
    }
    if ((r.fds & 63) == 0 && boottime_now_ns() >= deadline_ns) break;
  }
  return false;
}

void HolderResolver::emit_proc(uint32_t pid, const Emit& emit) {
  const std::string base = cfg_.proc_root + "/" + std::to_string(pid);
  Event p{};
  p.type = TCPSCOPE_EV_PROC;
  p.ts_ns = boottime_now_ns();
  p.pid = pid;
  std::string comm = read_file(base + "/comm", 16);
  while (!comm.empty() && comm.back() == '\n') comm.pop_back();
  std::memcpy(p.comm, comm.data(), std::min(comm.size(), sizeof(p.comm) - 1));
  // starttime (field 22 of stat, after the parenthesised comm): clock
  // ticks since boot; tells a reused pid apart.
  const std::string pstat = read_file(base + "/stat", 1024);
  if (const auto rp = pstat.rfind(')'); rp != std::string::npos) {
    const char* s = pstat.data() + rp + 1;
    const char* end = pstat.data() + pstat.size();
    int field = 2;
    while (s < end && field < 22) {
      while (s < end && *s == ' ') ++s;
      ++field;
      if (field == 22) {
        uint64_t ticks = 0;
        std::from_chars(s, end, ticks);
        const long hz = sysconf(_SC_CLK_TCK);
        if (hz > 0) p.aux = ticks * (1'000'000'000ull / static_cast<uint64_t>(hz));
        break;
      }
      while (s < end && *s != ' ') ++s;
    }
  }
  // cgroup v2 path ("0::/system.slice/x.service") and its id (the inode
  // of its directory, as bpf_get_current_cgroup_id() gives it).
  std::string cgroup;
  const std::string groups = read_file(base + "/cgroup", 4096);
  for (size_t pos = 0; pos < groups.size();) {
    size_t nl = groups.find('\n', pos);
    if (nl == std::string::npos) nl = groups.size();
    if (groups.compare(pos, 3, "0::") == 0) cgroup = groups.substr(pos + 3, nl - pos - 3);
    pos = nl + 1;
  }
  struct stat st {};
  if (!cgroup.empty() && ::stat((cfg_.cgroup_root + cgroup).c_str(), &st) == 0)
    p.cgroup = st.st_ino;
  emit(p);

  auto send_text = [&](uint32_t kind, std::string_view text, bool cut) {
    Event t{};
    t.type = TCPSCOPE_EV_PROC_TEXT;
    t.ts_ns = p.ts_ns;
    t.pid = pid;
    t.reason = kind;
    t.tx_queue = static_cast<uint32_t>(text.size());
    t.tcp_flags = cut ? 1 : 0;
    for (size_t off = 0; off < text.size(); off += TCPSCOPE_TEXT_CHUNK) {
      const size_t n = std::min<size_t>(TCPSCOPE_TEXT_CHUNK, text.size() - off);
      char* bytes = reinterpret_cast<char*>(&t) + offsetof(Event, laddr);
      std::memset(bytes, 0, TCPSCOPE_TEXT_CHUNK);
      std::memcpy(bytes, text.data() + off, n);
      t.seg_len = static_cast<uint32_t>(off);
      t.rx_queue = static_cast<uint32_t>(n);
      emit(t);
    }
  };
  std::string cmd = read_file(base + "/cmdline", TCPSCOPE_CMDLINE_MAX + 1);
  const bool cut = cmd.size() > TCPSCOPE_CMDLINE_MAX;
  if (cut) cmd.resize(TCPSCOPE_CMDLINE_MAX);
  std::replace(cmd.begin(), cmd.end(), '\0', ' ');
  while (!cmd.empty() && cmd.back() == ' ') cmd.pop_back();
  send_text(TCPSCOPE_TEXT_CMDLINE, cmd, cut);
  // The tail names the unit or container: keep that if it is too long.
  std::string_view cg = cgroup;
  if (cg.size() > TCPSCOPE_CGROUP_MAX) cg.remove_prefix(cg.size() - TCPSCOPE_CGROUP_MAX);
  send_text(TCPSCOPE_TEXT_CGROUP, cg, cg.size() < cgroup.size());
}

void HolderResolver::end_round(const Emit& emit) {
  Round& r = round_;
  r.proc_dir.reset();
  r.fd_dir.reset();
  r.active = false;
  std::sort(r.found.begin(), r.found.end(), [](const Found& a, const Found& b) {
    if (a.ino != b.ino) return a.ino < b.ino;
    if (a.pid != b.pid) return a.pid < b.pid;
    return a.fd < b.fd;
  });
  // Each holding process once per round, before the records naming it.
  std::vector<uint32_t> pids;
  for (const Found& f : r.found) pids.push_back(f.pid);
  std::sort(pids.begin(), pids.end());
  pids.erase(std::unique(pids.begin(), pids.end()), pids.end());
  for (uint32_t pid : pids) emit_proc(pid, emit);

  uint32_t found_socks = 0;
  const uint64_t now = boottime_now_ns();
  for (const SockRecord& s : r.socks) {
    auto lo = std::lower_bound(r.found.begin(), r.found.end(), s.ino,
                               [](const Found& f, uint64_t ino) { return f.ino < ino; });
    auto hi = lo;
    while (hi != r.found.end() && hi->ino == s.ino) ++hi;
    const uint32_t total = static_cast<uint32_t>(hi - lo);
    if (total) ++found_socks;
    Event h{};
    h.type = TCPSCOPE_EV_HOLDER;
    h.ts_ns = now;
    copy_tuple(h, s);
    h.aux = s.ino;
    h.rx_queue = s.rx_queue;
    h.old_state = h.new_state = s.state;
    h.tx_queue = total;
    if (total == 0) {
      emit(h);  // searched, no holder found
      continue;
    }
    uint32_t i = 0;
    for (auto it = lo; it != hi; ++it, ++i) {
      h.pid = it->pid;
      h.reason = static_cast<uint32_t>(it->fd);
      h.seg_len = i;
      std::memset(h.comm, 0, sizeof(h.comm));
      const std::string comm =
          read_file(cfg_.proc_root + "/" + std::to_string(it->pid) + "/comm", 16);
      std::memcpy(h.comm, comm.data(), std::min(comm.size(), sizeof(h.comm) - 1));
      for (char& c : h.comm)
        if (c == '\n') c = '\0';
      emit(h);
    }
  }
  Event sc{};
  sc.type = TCPSCOPE_EV_HOLDER_SCAN;
  sc.ts_ns = now;
  sc.aux = r.proc_ns;
  sc.sk = r.iter_ns;
  sc.cgroup = r.max_step_ns;
  sc.conn = r.fds;
  sc.seg_len = static_cast<uint32_t>(r.procs);
  sc.reason = static_cast<uint32_t>(r.socks.size());
  sc.rx_queue = found_socks;
  sc.tx_queue = static_cast<uint32_t>(r.steps);
  emit(sc);
  r = Round{};
}

}  // namespace tcpscope
