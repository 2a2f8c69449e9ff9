// An open-addressing hash map for the analysis' hot tables (tens of
// thousands of tw socks and recent closes churned per second): one probe
// into a flat array instead of a node per entry. Linear probing at most half
// full, backward-shift deletion (no tombstones). Find/[]/erase follow
// std::unordered_map closely enough to swap it in: find() gives a slot
// pointer with .first/.second, null (== end()) if absent. Pointers stay valid
// until the next insertion or erasure.
//
// Each slot keeps its key's scrambled hash: probes compare it before the key
// (a 44-byte tuple compare is the exception, not the rule), and erasure and
// growth never hash a key again. Callers that look one key up in several
// maps with the same hasher can hash it once (hash_of) and pass the hash.
//
// The hasher must mix well into the low bits, which pick the home slot.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace tcpscope {

// Socket cookies are sequential, and the events of recent sockets come
// together (both ends of a loopback connection have neighbouring cookies):
// runs of 16 neighbouring cookies share a block of slots, keeping them in a
// few cache lines, while the blocks themselves are scattered so that a
// dense range of cookies never forms one long probe run.
struct CookieHash {
  size_t operator()(uint64_t cookie) const {
    uint64_t block = (cookie >> 4) * 0x9E3779B97F4A7C15ull;
    block ^= block >> 29;
    return static_cast<size_t>(block << 4 | (cookie & 15));
  }
};

template <typename K, typename V, typename Hash = CookieHash>
class FlatHashMap {
 public:
  struct Slot {
    uint64_t hash = 0;  // scrambled hash of first; 0: the slot is empty
    K first{};
    V second{};
  };
  using iterator = Slot*;
  using const_iterator = const Slot*;

  iterator end() { return nullptr; }
  const_iterator end() const { return nullptr; }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  // The hash this map files k under (never 0); the same for every map with
  // the same hasher.
  static uint64_t hash_of(const K& k) {
    // The top bit marks the slot used; the home slot is in the low bits.
    return static_cast<uint64_t>(Hash{}(k)) | kUsedBit;
  }

  iterator find(const K& k) { return find(k, hash_of(k)); }
  iterator find(const K& k, uint64_t h) {
    if (!size_) return nullptr;
    for (size_t i = home(h);; i = next(i)) {
      Slot& s = slots_[i];
      if (!s.hash) return nullptr;
      if (s.hash == h && s.first == k) return &s;
    }
  }
  const_iterator find(const K& k) const { return const_cast<FlatHashMap*>(this)->find(k); }
  const_iterator find(const K& k, uint64_t h) const {
    return const_cast<FlatHashMap*>(this)->find(k, h);
  }
  bool contains(const K& k) const { return find(k) != nullptr; }

  V& operator[](const K& k) { return get_or_insert(k, hash_of(k)); }
  // operator[] with the hash already known (h == hash_of(k)).
  V& get_or_insert(const K& k, uint64_t h) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    size_t i = home(h);
    for (; slots_[i].hash; i = next(i))
      if (slots_[i].hash == h && slots_[i].first == k) return slots_[i].second;
    Slot& s = slots_[i];
    s.hash = h;
    s.first = k;
    s.second = V{};
    ++size_;
    return s.second;
  }

  void erase(iterator it) { erase_at(static_cast<size_t>(it - slots_.data())); }
  size_t erase(const K& k) { return erase(k, hash_of(k)); }
  size_t erase(const K& k, uint64_t h) {
    iterator it = find(k, h);
    if (!it) return 0;
    erase(it);
    return 1;
  }
  void clear() {
    for (Slot& s : slots_) s = Slot{};
    size_ = 0;
  }

 private:
  size_t mask() const { return slots_.size() - 1; }
  size_t next(size_t i) const { return (i + 1) & mask(); }
  static constexpr uint64_t kUsedBit = 1ull << 63;
  size_t home(uint64_t h) const { return static_cast<size_t>(h) & mask(); }
  void erase_at(size_t i) {
    // Shift later members of the probe run back into the hole.
    for (size_t j = next(i); slots_[j].hash; j = next(j)) {
      const size_t h = home(slots_[j].hash);
      if (((j - h) & mask()) >= ((j - i) & mask())) {
        slots_[i] = std::move(slots_[j]);
        i = j;
      }
    }
    slots_[i] = Slot{};
    --size_;
  }
  void grow() {
    std::vector<Slot> old_slots = std::move(slots_);
    const size_t cap = old_slots.empty() ? 64 : old_slots.size() * 2;
    slots_.assign(cap, Slot{});
    for (Slot& s : old_slots) {
      if (!s.hash) continue;
      size_t i = home(s.hash);
      while (slots_[i].hash) i = next(i);
      slots_[i] = std::move(s);
    }
  }

  std::vector<Slot> slots_;
  size_t size_ = 0;
};

// An open-addressing index from hashes to handles (uint32) of records kept
// elsewhere, say in a slab: 8 bytes a slot, so that tens of thousands of
// entries stay in cache where a map holding the records would not. The
// caller's match(handle) tells whether a record has the key looked for.
class HandleIndex {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  template <typename Match>
  uint32_t find(uint64_t hash, Match&& match) const {
    if (!size_) return kNone;
    const auto tag = static_cast<uint32_t>(hash);
    for (size_t i = tag & mask();; i = next(i)) {
      const Slot s = slots_[i];
      if (s.handle == kNone) return kNone;
      if (s.tag == tag && match(s.handle)) return s.handle;
    }
  }
  // Files handle under hash; the caller made sure no record with an equal
  // key is in.
  void insert(uint64_t hash, uint32_t handle) {
    // Up to three quarters full: 8 bytes a slot, so the denser table costs
    // less memory than the longer probes cost time (100,000 connections).
    if ((size_ + 1) * 4 > slots_.size() * 3) grow();
    place(Slot{static_cast<uint32_t>(hash), handle});
    ++size_;
  }
  // Removes handle, filed under hash; false if it is not in.
  bool erase(uint64_t hash, uint32_t handle) {
    if (!size_) return false;
    const auto tag = static_cast<uint32_t>(hash);
    size_t i = tag & mask();
    for (; slots_[i].handle != handle; i = next(i))
      if (slots_[i].handle == kNone) return false;
    // Shift later members of the probe run back into the hole.
    for (size_t j = next(i); slots_[j].handle != kNone; j = next(j)) {
      const size_t home = slots_[j].tag & mask();
      if (((j - home) & mask()) >= ((j - i) & mask())) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i] = Slot{};
    --size_;
    return true;
  }

 private:
  struct Slot {
    uint32_t tag = 0;  // the hash's low bits
    uint32_t handle = kNone;
  };
  size_t mask() const { return slots_.size() - 1; }
  size_t next(size_t i) const { return (i + 1) & mask(); }
  void place(Slot s) {
    size_t i = s.tag & mask();
    while (slots_[i].handle != kNone) i = next(i);
    slots_[i] = s;
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? 64 : old.size() * 2, Slot{});
    for (const Slot& s : old)
      if (s.handle != kNone) place(s);
  }

  std::vector<Slot> slots_;
  size_t size_ = 0;
};

}  // namespace tcpscope
