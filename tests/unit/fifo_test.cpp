#include "tcpscope/fifo.hpp"

#include <gtest/gtest.h>

#include <deque>
#include <memory>
#include <random>
#include <string>

namespace tcpscope {
namespace {

// Against std::deque: random pushes, pops and erasures, through growth,
// wrap-around and shrinking.
TEST(Fifo, BehavesLikeADeque) {
  Fifo<std::unique_ptr<int>> fifo;
  std::deque<int> model;
  std::mt19937 rng(7);
  int next = 0;
  for (int step = 0; step < 200'000; ++step) {
    const unsigned op = rng() % 100;
    // Grow for the first half, drain in the second (shrinks the buffer).
    const unsigned push_below = step < 100'000 ? 60 : 30;
    if (op < push_below) {
      fifo.push_back(std::make_unique<int>(next));
      model.push_back(next++);
    } else if (op < 97 && !model.empty()) {
      fifo.pop_front();
      model.pop_front();
    } else if (op < 99 && !model.empty()) {
      const size_t back_off = rng() % std::min<size_t>(model.size(), 4);
      const size_t i = model.size() - 1 - back_off;
      fifo.erase_at(i);
      model.erase(model.begin() + static_cast<std::ptrdiff_t>(i));
    } else if (!model.empty()) {
      const int mod = 2 + static_cast<int>(rng() % 5);
      const size_t removed = fifo.erase_if([mod](const auto& p) { return *p % mod == 0; });
      const size_t before = model.size();
      std::erase_if(model, [mod](int v) { return v % mod == 0; });
      ASSERT_EQ(removed, before - model.size());
    }
    ASSERT_EQ(fifo.size(), model.size());
    if (!model.empty()) {
      ASSERT_EQ(*fifo.front(), model.front());
      ASSERT_EQ(*fifo.back(), model.back());
      const size_t mid = model.size() / 2;
      ASSERT_EQ(*fifo[mid], model[mid]);
    }
  }
  for (size_t i = 0; i < model.size(); ++i) ASSERT_EQ(*fifo[i], model[i]);
}

// Pushing one of its own elements while full: the copy is made before the
// buffer moves.
TEST(Fifo, PushesItsOwnElementWhileGrowing) {
  Fifo<std::string> fifo;
  for (int i = 0; i < 64; ++i) fifo.push_back(std::string(40, static_cast<char>('a' + i % 26)));
  ASSERT_EQ(fifo.size(), fifo.capacity());
  fifo.push_back(fifo.front());
  fifo.emplace_back(fifo[1]);
  EXPECT_EQ(fifo[64], std::string(40, 'a'));
  EXPECT_EQ(fifo[65], std::string(40, 'b'));
}

TEST(Fifo, ReusesItsBufferAndGivesBackABurst) {
  Fifo<int> fifo;
  for (int i = 0; i < 100; ++i) fifo.push_back(i);
  const size_t steady = fifo.capacity();
  // As many in as out: the buffer is reused, never grown.
  for (int i = 0; i < 100'000; ++i) {
    fifo.push_back(i);
    fifo.pop_front();
  }
  EXPECT_EQ(fifo.capacity(), steady);
  for (int i = 0; i < 1'000'000; ++i) fifo.push_back(i);
  EXPECT_GE(fifo.capacity(), 1'000'100u);
  while (fifo.size() > 10) fifo.pop_front();
  EXPECT_LE(fifo.capacity(), 128u);
  EXPECT_EQ(fifo.front(), 999'990);
  fifo.clear();
  EXPECT_TRUE(fifo.empty());
}

}  // namespace
}  // namespace tcpscope
