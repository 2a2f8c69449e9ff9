// What the running kernel supports, probed once and cached. Any feature can
// be forced off (--disable-feature), to test the fallbacks on a kernel that
// has everything; --info prints the whole table.
#pragma once

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace tcpscope {

enum class AttachMode { TpBtf, RawTp, Tracepoint };
const char* attach_mode_name(AttachMode m);
// The attach methods, best first: the order in which they are tried.
inline constexpr AttachMode kAttachOrder[] = {AttachMode::TpBtf, AttachMode::RawTp,
                                              AttachMode::Tracepoint};

class KernelFeatures {
 public:
  // Names accepted by disable(): the keys of table().
  static const std::vector<std::string>& names();

  void disable(const std::string& name) { disabled_.insert(name); }
  static bool is_known(const std::string& name);

  bool btf();             // /sys/kernel/btf/vmlinux parses
  bool ringbuf();         // BPF_MAP_TYPE_RINGBUF (5.8)
  bool tp_btf();          // BPF_PROG_TYPE_TRACING + btf_trace_* types
  bool raw_tp();          // BPF_PROG_TYPE_RAW_TRACEPOINT
  bool tracepoint();      // classic tracepoints (tracefs, mounted if needed, for
                          // tcpscope only)
  bool io_tracepoints();  // sock_send_length/sock_recv_length (6.3)
  bool reset_reason();    // enum sk_rst_reason in tcp_send_reset (6.10)
  bool bpf_stats();       // kernel.bpf_stats_enabled sysctl exists
  bool iter_tcp();        // iter/tcp BPF iterator (5.9): tw sweep, snapshot, audit
  bool tw_timers();       // timer tracepoints + tw_timer_handler in kallsyms

  bool supports(AttachMode m);  // tp_btf(), raw_tp() or tracepoint()

  // True if the kernel has tracepoint NAME (BTF typedef btf_trace_NAME).
  bool has_btf_tracepoint(const std::string& name);
  // Name -> supported, for --info.
  std::map<std::string, bool> table();
  std::string kernel_release() const;

 private:
  bool probe(const std::string& name, bool (KernelFeatures::*fn)());
  bool probe_btf();
  bool probe_ringbuf();
  bool probe_tp_btf();
  bool probe_raw_tp();
  bool probe_tracepoint();
  bool probe_io();
  bool probe_reset_reason();
  bool probe_bpf_stats();
  bool probe_iter_tcp();
  bool probe_tw_timers();

  std::set<std::string> disabled_;
  std::map<std::string, bool> cache_;
  std::map<std::string, bool> btf_tp_cache_;
};

}  // namespace tcpscope
