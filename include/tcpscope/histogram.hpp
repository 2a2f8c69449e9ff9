// Log-linear histogram for durations: 64 sub-buckets per power of two, so a
// reported percentile is within 1% of the true value; exact count, min, max.
// Fixed size, no allocation per sample.
#pragma once

#include <array>
#include <bit>
#include <cstdint>

namespace tcpscope {

class LogHistogram {
 public:
  static constexpr int kSub = 64;
  static constexpr int kBuckets = kSub * 40;  // up to 2^45 units

  void add(uint64_t v) {
    ++counts_[index(v)];
    if (count_ == 0 || v < min_) min_ = v;
    if (v > max_) max_ = v;
    ++count_;
  }
  uint64_t count() const { return count_; }
  uint64_t min() const { return min_; }
  uint64_t max() const { return max_; }

  // Value at quantile q (0..1): the middle of the bucket holding it, clamped
  // to the exact min and max.
  uint64_t quantile(double q) const {
    if (count_ == 0) return 0;
    uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(count_ - 1));
    uint64_t seen = 0;
    for (int i = 0; i < kBuckets; ++i) {
      seen += counts_[i];
      if (seen > rank) {
        const uint64_t lo = lower(i), hi = lower(i + 1);
        uint64_t mid = lo + (hi - lo) / 2;
        if (mid < min_) mid = min_;
        if (mid > max_) mid = max_;
        return mid;
      }
    }
    return max_;
  }

 private:
  static int index(uint64_t v) {
    if (v < kSub) return static_cast<int>(v);
    const int shift = std::bit_width(v) - 7;  // keep 7 significant bits
    const int i = (shift + 1) * kSub + static_cast<int>((v >> shift) - kSub);
    return i < kBuckets ? i : kBuckets - 1;
  }
  static uint64_t lower(int i) {
    if (i < kSub) return static_cast<uint64_t>(i);
    const int shift = i / kSub - 1;
    return (static_cast<uint64_t>(kSub + i % kSub)) << shift;
  }

  std::array<uint32_t, kBuckets> counts_{};
  uint64_t count_ = 0, min_ = 0, max_ = 0;
};

}  // namespace tcpscope
