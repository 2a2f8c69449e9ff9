// An open-addressing hash map for the analysis' hot tables (tens of
// thousands of tw socks and recent closes churned per second): one probe
// into a flat array instead of a node per entry. Linear probing at most half
// full, backward-shift deletion (no tombstones). Find/[]/erase follow
// std::unordered_map closely enough to swap it in: find() gives a slot
// pointer with .first/.second, null (== end()) if absent. Pointers stay valid
// until the next insertion or erasure.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace tcpscope {

template <typename K, typename V, typename Hash = std::hash<K>>
class FlatHashMap {
 public:
  struct Slot {
    K first{};
    V second{};
  };
  using iterator = Slot*;
  using const_iterator = const Slot*;

  iterator end() { return nullptr; }
  const_iterator end() const { return nullptr; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  iterator find(const K& k) {
    if (!size_) return nullptr;
    for (size_t i = home(k);; i = next(i)) {
      if (!used_[i]) return nullptr;
      if (slots_[i].first == k) return &slots_[i];
    }
  }
  const_iterator find(const K& k) const { return const_cast<FlatHashMap*>(this)->find(k); }
  bool contains(const K& k) const { return find(k) != nullptr; }

  V& operator[](const K& k) {
    if ((size_ + 1) * 2 > used_.size()) grow();
    size_t i = home(k);
    for (; used_[i]; i = next(i))
      if (slots_[i].first == k) return slots_[i].second;
    used_[i] = 1;
    slots_[i].first = k;
    slots_[i].second = V{};
    ++size_;
    return slots_[i].second;
  }

  void erase(iterator it) { erase_at(static_cast<size_t>(it - slots_.data())); }
  size_t erase(const K& k) {
    iterator it = find(k);
    if (!it) return 0;
    erase(it);
    return 1;
  }
  void clear() {
    used_.assign(used_.size(), 0);
    size_ = 0;
  }

 private:
  size_t mask() const { return used_.size() - 1; }
  size_t next(size_t i) const { return (i + 1) & mask(); }
  size_t home(const K& k) const {
    // Fibonacci scrambling: the hashes of cookies are sequential numbers.
    return static_cast<size_t>((static_cast<uint64_t>(Hash{}(k)) * 0x9E3779B97F4A7C15ull) >>
                               shift_);
  }
  void erase_at(size_t i) {
    // Shift later members of the probe run back into the hole.
    for (size_t j = next(i); used_[j]; j = next(j)) {
      const size_t h = home(slots_[j].first);
      if (((j - h) & mask()) >= ((j - i) & mask())) {
        slots_[i] = std::move(slots_[j]);
        i = j;
      }
    }
    used_[i] = 0;
    slots_[i] = Slot{};
    --size_;
  }
  void grow() {
    std::vector<Slot> old_slots = std::move(slots_);
    std::vector<uint8_t> old_used = std::move(used_);
    const size_t cap = old_used.empty() ? 64 : old_used.size() * 2;
    slots_.assign(cap, Slot{});
    used_.assign(cap, 0);
    shift_ = 64;
    for (size_t c = cap; c > 1; c >>= 1) --shift_;
    size_ = 0;
    for (size_t i = 0; i < old_used.size(); ++i)
      if (old_used[i]) (*this)[old_slots[i].first] = std::move(old_slots[i].second);
  }

  std::vector<Slot> slots_;
  std::vector<uint8_t> used_;
  size_t size_ = 0;
  unsigned shift_ = 64;
};

}  // namespace tcpscope
