#include "tcpscope/ring_consumer.hpp"

#include <gtest/gtest.h>
#include <linux/bpf.h>

#include <cstring>
#include <random>
#include <vector>

namespace tcpscope {
namespace {

// A ring buffer's memory written as the kernel's producer writes it: a
// header (length, busy and discard bits) 8-byte aligned, the record after
// it, wrapping around the end of the data area.
class FakeRing {
 public:
  explicit FakeRing(uint64_t size) : data_(size / 8), mask_(size - 1) {}

  // Reserves a record of size bytes filled from seed; returns its position.
  uint64_t reserve(uint32_t size, uint8_t seed) {
    const uint64_t at = prod_;
    put_header(at, size | BPF_RINGBUF_BUSY_BIT);
    for (uint32_t i = 0; i < size; ++i)
      bytes()[(at + BPF_RINGBUF_HDR_SZ + i) & mask_] = static_cast<uint8_t>(seed + i);
    prod_ += (size + BPF_RINGBUF_HDR_SZ + 7) & ~uint64_t{7};
    return at;
  }
  void commit(uint64_t at, uint32_t size) { put_header(at, size); }
  void discard(uint64_t at, uint32_t size) { put_header(at, size | BPF_RINGBUF_DISCARD_BIT); }
  uint64_t emit(uint32_t size, uint8_t seed) {
    const uint64_t at = reserve(size, seed);
    commit(at, size);
    return at;
  }
  uint64_t free_bytes() const { return mask_ + 1 - (prod_ - cons_); }

  uint8_t* bytes() { return reinterpret_cast<uint8_t*>(data_.data()); }

  // (Declared first: the consumer is built on them.)
  std::vector<uint64_t> data_;
  uint64_t mask_;
  uint64_t prod_ = 0, cons_ = 0;
  RingConsumer consumer{&cons_, &prod_, bytes(), mask_ + 1};

 private:
  void put_header(uint64_t at, uint32_t len) { std::memcpy(bytes() + (at & mask_), &len, 4); }
};

struct Seen {
  std::vector<std::vector<uint8_t>> records;
  bool misaligned = false;
};

void collect(void* ctx, const void* data, size_t size) {
  auto* seen = static_cast<Seen*>(ctx);
  if (reinterpret_cast<uintptr_t>(data) % 8 != 0) seen->misaligned = true;
  const auto* p = static_cast<const uint8_t*>(data);
  seen->records.emplace_back(p, p + size);
}

std::vector<uint8_t> pattern(uint32_t size, uint8_t seed) {
  std::vector<uint8_t> v(size);
  for (uint32_t i = 0; i < size; ++i) v[i] = static_cast<uint8_t>(seed + i);
  return v;
}

// Many laps of records of random sizes, drained at random points: each
// arrives once, in order, whole (those that wrap around the end included),
// 8-byte aligned, and the consumer position ends at the producer's.
TEST(RingConsumer, HandsEveryRecordWholeAcrossTheEnd) {
  FakeRing ring(4096);
  std::mt19937 rng(11);
  std::vector<std::vector<uint8_t>> sent;
  Seen seen;
  uint64_t wrapped = 0;
  for (int i = 0; i < 20'000; ++i) {
    const uint32_t size = 1 + rng() % 300;
    if (ring.free_bytes() < size + 16) ring.consumer.drain(&collect, &seen);
    const uint64_t off = (ring.prod_ & 4095) + BPF_RINGBUF_HDR_SZ;
    if (off + size > 4096) ++wrapped;
    const auto seed = static_cast<uint8_t>(rng());
    ring.emit(size, seed);
    sent.push_back(pattern(size, seed));
    if (rng() % 8 == 0) ring.consumer.drain(&collect, &seen);
  }
  ring.consumer.drain(&collect, &seen);
  EXPECT_GT(wrapped, 100u);
  EXPECT_FALSE(seen.misaligned);
  EXPECT_EQ(ring.cons_, ring.prod_);
  ASSERT_EQ(seen.records.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) ASSERT_EQ(seen.records[i], sent[i]) << "record " << i;
}

// A record reserved but not committed stops the drain there: it and what
// follows come with the drain after its commit. Discarded records are
// passed over.
TEST(RingConsumer, StopsAtBusyAndSkipsDiscarded) {
  FakeRing ring(4096);
  Seen seen;
  ring.emit(128, 1);
  const uint64_t busy = ring.reserve(128, 2);
  ring.emit(128, 3);
  EXPECT_EQ(ring.consumer.drain(&collect, &seen), 1u);
  EXPECT_EQ(ring.cons_, busy);
  ring.discard(busy, 128);
  EXPECT_EQ(ring.consumer.drain(&collect, &seen), 1u);
  ASSERT_EQ(seen.records.size(), 2u);
  EXPECT_EQ(seen.records[0], pattern(128, 1));
  EXPECT_EQ(seen.records[1], pattern(128, 3));
  EXPECT_EQ(ring.cons_, ring.prod_);
}

// The peak is the most bytes found waiting at the start of a drain.
TEST(RingConsumer, RemembersThePeakBacklog) {
  FakeRing ring(4096);
  Seen seen;
  for (int i = 0; i < 3; ++i) ring.emit(128, 0);
  ring.consumer.drain(&collect, &seen);
  ring.emit(128, 0);
  ring.consumer.drain(&collect, &seen);
  EXPECT_EQ(ring.consumer.peak_pending_bytes(), 3u * 136);
  EXPECT_EQ(ring.consumer.size_bytes(), 4096u);
}

}  // namespace
}  // namespace tcpscope
