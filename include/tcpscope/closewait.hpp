// CLOSE_WAIT analysis: the peer closed and the local program never called
// close(). A socket in CLOSE_WAIT longer than the threshold (CONFIG record,
// --close-wait-threshold) is stuck: a `close_wait_stuck` notice names it and
// every process holding it (HOLDER/PROC records that user/holders.cpp makes
// live by socket inode), and `close_wait_end` says how long it lasted once
// it finally closes. Pure: only records and their times drive it, so live
// tracing and a replayed capture give the same notices and report.
#pragma once

#include <array>
#include <bit>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "tcpscope/pipeline.hpp"

namespace tcpscope {

// Open-addressing map from a nonzero 64-bit key (socket cookie) to a small
// value: no allocation per insert or erase (only when it grows), for tables
// that every passively closed connection passes through.
template <typename V>
class FlatMap {
 public:
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  V* find(uint64_t key) {
    if (!size_) return nullptr;
    for (size_t i = slot(key);; i = (i + 1) & mask()) {
      if (keys_[i] == key) return &vals_[i];
      if (keys_[i] == 0) return nullptr;
    }
  }
  const V* find(uint64_t key) const { return const_cast<FlatMap*>(this)->find(key); }
  // Inserts or overwrites; key must not be 0.
  V& put(uint64_t key, const V& v) {
    if ((size_ + 1) * 2 > keys_.size()) grow();
    size_t i = slot(key);
    while (keys_[i] != 0 && keys_[i] != key) i = (i + 1) & mask();
    if (keys_[i] == 0) ++size_;
    keys_[i] = key;
    vals_[i] = v;
    return vals_[i];
  }
  bool erase(uint64_t key) {
    if (!size_) return false;
    size_t i = slot(key);
    while (keys_[i] != key) {
      if (keys_[i] == 0) return false;
      i = (i + 1) & mask();
    }
    // Backward-shift deletion: no tombstones, probes stay short.
    for (size_t j = (i + 1) & mask();; j = (j + 1) & mask()) {
      if (keys_[j] == 0) break;
      const size_t home = slot(keys_[j]);
      // Move j into the hole i unless its home lies cyclically in (i, j].
      if (((j - home) & mask()) >= ((j - i) & mask())) {
        keys_[i] = keys_[j];
        vals_[i] = vals_[j];
        i = j;
      }
    }
    keys_[i] = 0;
    vals_[i] = V{};
    --size_;
    return true;
  }
  // fn(key, value&) for every entry, in table order (deterministic for the
  // same sequence of operations).
  template <typename Fn>
  void for_each(Fn&& fn) {
    for (size_t i = 0; i < keys_.size(); ++i)
      if (keys_[i]) fn(keys_[i], vals_[i]);
  }

 private:
  size_t mask() const { return keys_.size() - 1; }
  size_t slot(uint64_t key) const {
    return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> 17) & mask();
  }
  void grow() {
    std::vector<uint64_t> keys = std::move(keys_);
    std::vector<V> vals = std::move(vals_);
    const size_t n = keys.empty() ? 64 : keys.size() * 2;
    keys_.assign(n, 0);
    vals_.assign(n, V{});
    size_ = 0;
    for (size_t i = 0; i < keys.size(); ++i)
      if (keys[i]) put(keys[i], vals[i]);
  }

  std::vector<uint64_t> keys_;
  std::vector<V> vals_;
  size_t size_ = 0;
};

// The container id in a cgroup path (docker-<id>.scope, cri-containerd-,
// crio-, libpod-, /docker/<id>...): its last run of exactly 64 hex digits;
// empty if none.
std::string_view container_id(std::string_view cgroup_path);

// "close_wait" (one entry per stuck socket and holding process),
// "close_wait_by_process", "close_wait_summary", "close_wait_scan".
class CloseWaitAnalyzer final : public Analyzer {
 public:
  static constexpr uint64_t kDefaultThresholdNs = 60'000'000'000ull;
  // How long a notice waits for the holders of a socket that crossed the
  // threshold (when holders are resolved at all), in event time.
  static constexpr uint64_t kHolderWaitNs = 10'000'000'000ull;
  static constexpr size_t kMaxRows = 1000;  // per JSON list; the rest is counted

  CloseWaitAnalyzer(int top_n, const Tracker& tracker) : top_n_(top_n), tracker_(tracker) {}
  void on_event(const Tracked& t, NoticeOut& out) override;
  void finish(uint64_t end_ns, NoticeOut& out) override;
  void write_json(JsonWriter& w, TimeFormatter& time) const override;
  void write_text(fmt::memory_buffer& out, TimeFormatter& time,
                  const TextStyle& style) const override;

  uint64_t threshold_ns() const { return threshold_ns_; }
  // Sockets past the threshold and still in CLOSE_WAIT.
  size_t stuck_open_count() const { return stuck_open_.size(); }

  struct Proc {
    uint32_t pid = 0;
    uint64_t start_ns = 0;
    uint64_t cgroup_id = 0;
    std::array<char, 16> comm{};
    std::string cmdline, cgroup;
    bool cmdline_cut = false;
  };
  struct Holder {
    uint32_t pid = 0;
    std::vector<int32_t> fds;          // ascending
    std::shared_ptr<const Proc> proc;  // null if no PROC record came
    std::array<char, 16> comm{};
  };
  struct Socket {
    uint64_t conn = 0;
    uint32_t netns = 0;
    uint8_t family = 0;
    uint16_t lport = 0, rport = 0;
    std::array<uint8_t, 16> laddr{}, raddr{};
    uint32_t owner_pid = 0;  // as the kernel side learnt it (may be stale)
    std::array<char, 16> owner_comm{};
    uint64_t entered_ns = 0;  // CLOSE_WAIT entry; for a pre-existing
                              // socket an upper bound of it
    bool preexisting = false;
    uint64_t crossed_ns = 0;  // entered + threshold
    uint32_t recv_q = 0;      // raw rx_queue: counts the FIN until EOF is read
    bool noticed = false;
    bool resolved = false;  // a HOLDER batch came
    uint64_t closed_ns = 0;
    uint8_t closed_to = 0;  // state it left CLOSE_WAIT for
    std::vector<Holder> holders;
  };

 private:
  // A socket in CLOSE_WAIT not yet past the threshold.
  struct Waiting {
    uint64_t entered_ns = 0;
    uint32_t recv_q = 0;
    bool preexisting = false;
  };

  void enter(const Event& e, const Connection* c, uint64_t entered_ns, bool preexisting);
  void leave(const Event& e, NoticeOut& out);
  void check(uint64_t now_ns, NoticeOut& out);
  void cross(uint64_t conn, const Waiting& w);
  void notify(Socket& s, NoticeOut& out);
  void on_config(const Event& e);
  void on_proc(const Event& e);
  void on_proc_text(const Event& e);
  void on_holder(const Event& e, NoticeOut& out);
  void on_scan(const Event& e);
  Socket* stuck(uint64_t conn);

  int top_n_;
  const Tracker& tracker_;
  uint64_t threshold_ns_ = kDefaultThresholdNs;
  bool holders_on_ = false;

  FlatMap<Waiting> waiting_;
  uint64_t next_due_ns_ = UINT64_MAX;  // earliest crossing in waiting_ (lazy)
  // Holder batches for sockets still below the threshold (resolved early).
  std::unordered_map<uint64_t, std::vector<Holder>> early_holders_;
  std::unordered_map<uint64_t, uint32_t> early_recv_q_;
  // Every socket that crossed the threshold, in crossing order.
  std::vector<std::unique_ptr<Socket>> stuck_list_;
  std::unordered_map<uint64_t, Socket*> stuck_open_;           // still in CLOSE_WAIT
  std::vector<Socket*> awaiting_holders_;                      // crossed, not noticed
  std::unordered_map<uint32_t, std::shared_ptr<Proc>> procs_;  // last PROC per pid
  // Holder batch being received (HOLDER records of one socket).
  uint64_t batch_conn_ = 0;
  std::vector<Holder> batch_;

  uint64_t entered_ = 0, preexisting_ = 0, closed_in_time_ = 0, closed_stuck_ = 0;
  uint64_t end_ns_ = 0;
  // Holder scan cost (HOLDER_SCAN records).
  uint64_t rounds_ = 0, steps_ = 0, scan_procs_ = 0, scan_fds_ = 0, searched_ = 0, found_ = 0,
           scan_ns_ = 0, scan_max_ns_ = 0, step_max_ns_ = 0, iter_ns_ = 0;
};

}  // namespace tcpscope
