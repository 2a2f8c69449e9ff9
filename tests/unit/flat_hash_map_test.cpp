#include "tcpscope/flat_hash_map.hpp"
#include "tcpscope/slab.hpp"

#include <gtest/gtest.h>

#include <random>
#include <unordered_map>

namespace tcpscope {
namespace {

// Random inserts, overwrites and erasures against std::unordered_map: every
// key stays findable through growth and backward-shift deletion.
TEST(FlatHashMap, MatchesUnorderedMap) {
  FlatHashMap<uint64_t, uint64_t> m;
  std::unordered_map<uint64_t, uint64_t> ref;
  std::mt19937_64 rng(11);
  for (int step = 0; step < 200'000; ++step) {
    const uint64_t key = rng() % 3000;  // small key space: long probe runs
    switch (rng() % 3) {
      case 0:
      case 1:
        m[key] = step;
        ref[key] = step;
        break;
      case 2:
        EXPECT_EQ(m.erase(key), ref.erase(key)) << "step " << step;
        break;
    }
    ASSERT_EQ(m.size(), ref.size()) << "step " << step;
  }
  for (uint64_t key = 0; key < 3000; ++key) {
    auto it = m.find(key);
    auto r = ref.find(key);
    ASSERT_EQ(it != m.end(), r != ref.end()) << key;
    if (it) {
      EXPECT_EQ(it->first, key);
      EXPECT_EQ(it->second, r->second);
    }
  }
  m.clear();
  EXPECT_TRUE(m.empty());
  EXPECT_FALSE(m.contains(1));
}

TEST(FlatHashMap, EraseByIteratorAndDefaultInsert) {
  FlatHashMap<uint64_t, int> m;
  EXPECT_EQ(m.find(5), m.end());
  EXPECT_EQ(m[5], 0);  // inserted with a default value
  m[5] = 7;
  auto it = m.find(5);
  ASSERT_NE(it, m.end());
  EXPECT_EQ(it->second, 7);
  m.erase(it);
  EXPECT_EQ(m.size(), 0u);
  EXPECT_EQ(m.erase(5), 0u);
}

}  // namespace
}  // namespace tcpscope

// ---- ChunkedSlab ---------------------------------------------------------------

namespace tcpscope {
namespace {

struct Rec {
  uint64_t id;
  uint32_t n;
};

TEST(ChunkedSlab, ReusesFreedSlotsAndGivesEmptyTopChunksBack) {
  ChunkedSlab<Rec, 4> slab;
  std::vector<uint32_t> got;
  for (int i = 0; i < 10; ++i) {
    const uint32_t s = slab.acquire();
    EXPECT_EQ(slab[s].id, 0u);  // fresh slots are zeros
    slab[s].id = 100 + i;
    got.push_back(s);
  }
  EXPECT_EQ(got, (std::vector<uint32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(slab.chunks(), 3u);
  EXPECT_EQ(slab.used(), 10u);
  // Freed slots come back first, last freed first; records stay put.
  slab.release(5);
  EXPECT_EQ(slab.acquire(), 5u);
  EXPECT_EQ(slab[9].id, 109u);
  // The top chunk (8, 9) empties: it goes, and so do its free slots.
  slab.release(8);
  slab.release(9);
  slab.release(2);
  EXPECT_TRUE(slab.release_empty_top());
  EXPECT_EQ(slab.chunks(), 2u);
  EXPECT_EQ(slab.used(), 8u);
  EXPECT_FALSE(slab.release_empty_top());  // chunk 1 still has live slots
  // Slot 2 is still free; then new slots continue at 8 in a fresh chunk.
  EXPECT_EQ(slab.acquire(), 2u);
  EXPECT_EQ(slab.acquire(), 8u);
  EXPECT_EQ(slab[8].id, 0u);
  EXPECT_EQ(slab.chunks(), 3u);
  // The first chunk stays even when empty.
  slab.clear();
  EXPECT_EQ(slab.chunks(), 0u);
  EXPECT_EQ(slab.acquire(), 0u);
  slab.release(0);
  EXPECT_FALSE(slab.release_empty_top());
  EXPECT_EQ(slab.chunks(), 1u);
}

// Checked at most once a second of the time given: the chunk emptied just
// after a check waits for the next one.
TEST(ChunkedSlab, ReleaseAtMostOnceASecond) {
  ChunkedSlab<Rec, 4> slab;
  for (int i = 0; i < 8; ++i) slab.acquire();
  slab.release_empty_top_at(1'000'000'000);  // nothing empty yet
  for (uint32_t i = 4; i < 8; ++i) slab.release(i);
  slab.release_empty_top_at(1'500'000'000);
  EXPECT_EQ(slab.chunks(), 2u);
  slab.release_empty_top_at(2'000'000'000);
  EXPECT_EQ(slab.chunks(), 1u);
}

}  // namespace
}  // namespace tcpscope
