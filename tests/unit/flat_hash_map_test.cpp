#include "tcpscope/flat_hash_map.hpp"

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
