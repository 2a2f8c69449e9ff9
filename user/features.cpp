#include "tcpscope/features.hpp"

#include <bpf/btf.h>
#include <bpf/libbpf.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <memory>

namespace tcpscope {

const char* attach_mode_name(AttachMode m) {
  switch (m) {
    case AttachMode::TpBtf:
      return "tp_btf";
    case AttachMode::RawTp:
      return "raw_tp";
    case AttachMode::Tracepoint:
      return "tracepoint";
  }
  return "?";
}

namespace {

struct BtfDeleter {
  void operator()(struct btf* b) const { btf__free(b); }
};
using BtfPtr = std::unique_ptr<struct btf, BtfDeleter>;

BtfPtr load_vmlinux_btf() {
  struct btf* b = btf__load_vmlinux_btf();
  if (libbpf_get_error(b)) return nullptr;
  return BtfPtr(b);
}

constexpr const char* kTracefs = "/sys/kernel/tracing";

}  // namespace

const std::vector<std::string>& KernelFeatures::names() {
  static const std::vector<std::string> kNames = {
      "btf",          "ringbuf",   "tp_btf",   "raw_tp",   "tracepoint", "io_tracepoints",
      "reset_reason", "bpf_stats", "iter_tcp", "tw_timers"};
  return kNames;
}

bool KernelFeatures::is_known(const std::string& name) {
  for (const auto& n : names())
    if (n == name) return true;
  return false;
}

bool KernelFeatures::probe(const std::string& name, bool (KernelFeatures::*fn)()) {
  if (disabled_.count(name)) return false;
  auto it = cache_.find(name);
  if (it != cache_.end()) return it->second;
  const bool ok = (this->*fn)();
  cache_[name] = ok;
  return ok;
}

bool KernelFeatures::btf() { return probe("btf", &KernelFeatures::probe_btf); }
bool KernelFeatures::ringbuf() { return probe("ringbuf", &KernelFeatures::probe_ringbuf); }
bool KernelFeatures::tp_btf() { return probe("tp_btf", &KernelFeatures::probe_tp_btf); }
bool KernelFeatures::raw_tp() { return probe("raw_tp", &KernelFeatures::probe_raw_tp); }
bool KernelFeatures::tracepoint() { return probe("tracepoint", &KernelFeatures::probe_tracepoint); }
bool KernelFeatures::io_tracepoints() { return probe("io_tracepoints", &KernelFeatures::probe_io); }
bool KernelFeatures::reset_reason() {
  return probe("reset_reason", &KernelFeatures::probe_reset_reason);
}
bool KernelFeatures::bpf_stats() { return probe("bpf_stats", &KernelFeatures::probe_bpf_stats); }
bool KernelFeatures::iter_tcp() { return probe("iter_tcp", &KernelFeatures::probe_iter_tcp); }

bool KernelFeatures::supports(AttachMode m) {
  switch (m) {
    case AttachMode::TpBtf:
      return tp_btf();
    case AttachMode::RawTp:
      return raw_tp();
    case AttachMode::Tracepoint:
      return tracepoint();
  }
  return false;
}

bool KernelFeatures::tw_timers() { return probe("tw_timers", &KernelFeatures::probe_tw_timers); }

bool KernelFeatures::probe_tw_timers() {
  if (!has_btf_tracepoint("timer_start") || !has_btf_tracepoint("timer_cancel") ||
      !has_btf_tracepoint("timer_expire_entry"))
    return false;
  // The programs compare timer->function with tw_timer_handler, a static
  // function: its address must be visible (kptr_restrict hides it as 0).
  FILE* f = fopen("/proc/kallsyms", "re");
  if (!f) return false;
  char line[512];
  bool found = false;
  while (!found && fgets(line, sizeof(line), f)) {
    unsigned long long addr = 0;
    char type = 0;
    char name[256];
    if (sscanf(line, "%llx %c %255s", &addr, &type, name) == 3 && addr != 0 &&
        std::strcmp(name, "tw_timer_handler") == 0)
      found = true;
  }
  fclose(f);
  return found;
}

bool KernelFeatures::probe_iter_tcp() {
  BtfPtr b = load_vmlinux_btf();
  return b && btf__find_by_name_kind(b.get(), "bpf_iter__tcp", BTF_KIND_STRUCT) > 0;
}

bool KernelFeatures::has_btf_tracepoint(const std::string& name) {
  auto it = btf_tp_cache_.find(name);
  if (it != btf_tp_cache_.end()) return it->second;
  BtfPtr b = load_vmlinux_btf();
  const bool ok =
      b && btf__find_by_name_kind(b.get(), ("btf_trace_" + name).c_str(), BTF_KIND_TYPEDEF) > 0;
  btf_tp_cache_[name] = ok;
  return ok;
}

bool KernelFeatures::probe_btf() { return load_vmlinux_btf() != nullptr; }

bool KernelFeatures::probe_ringbuf() {
  return libbpf_probe_bpf_map_type(BPF_MAP_TYPE_RINGBUF, nullptr) == 1;
}

bool KernelFeatures::probe_tp_btf() {
  // libbpf's generic probe for BPF_PROG_TYPE_TRACING needs an attach target
  // and says no; the real test is loading, which falls back on failure.
  return btf() && has_btf_tracepoint("inet_sock_set_state");
}

bool KernelFeatures::probe_raw_tp() {
  return libbpf_probe_bpf_prog_type(BPF_PROG_TYPE_RAW_TRACEPOINT, nullptr) == 1;
}

bool KernelFeatures::probe_tracepoint() {
  const std::string events = std::string(kTracefs) + "/events/sock/inet_sock_set_state";
  if (access(events.c_str(), F_OK) == 0) return true;
  if (access("/sys/kernel/debug/tracing/events/sock/inet_sock_set_state", F_OK) == 0) return true;
  // tracefs is not always mounted; classic tracepoints need it (libbpf
  // reads the event's id there when it attaches). Mount it in a mount
  // namespace of tcpscope's own, a follower of the host's: the host never
  // sees it (no other tool finds it gone when tcpscope exits), and it goes
  // with the process. (With other threads running, only this one would
  // move: the one that attaches.)
  if (unshare(CLONE_NEWNS) != 0) return false;
  if (mount(nullptr, "/", nullptr, MS_REC | MS_SLAVE, nullptr) != 0) return false;
  if (mount("tracefs", kTracefs, "tracefs", 0, nullptr) != 0) return false;
  return access(events.c_str(), F_OK) == 0;
}

bool KernelFeatures::probe_io() {
  return has_btf_tracepoint("sock_send_length") && has_btf_tracepoint("sock_recv_length");
}

bool KernelFeatures::probe_reset_reason() {
  BtfPtr b = load_vmlinux_btf();
  return b && btf__find_by_name_kind(b.get(), "sk_rst_reason", BTF_KIND_ENUM) > 0;
}

bool KernelFeatures::probe_bpf_stats() {
  return access("/proc/sys/kernel/bpf_stats_enabled", F_OK) == 0;
}

std::map<std::string, bool> KernelFeatures::table() {
  return {{"btf", btf()},
          {"ringbuf", ringbuf()},
          {"tp_btf", tp_btf()},
          {"raw_tp", raw_tp()},
          {"tracepoint", tracepoint()},
          {"io_tracepoints", io_tracepoints()},
          {"reset_reason", reset_reason()},
          {"bpf_stats", bpf_stats()},
          {"iter_tcp", iter_tcp()},
          {"tw_timers", tw_timers()}};
}

std::string KernelFeatures::kernel_release() const {
  struct utsname u {};
  if (uname(&u) != 0) return "unknown";
  return u.release;
}

}  // namespace tcpscope
