// A first-in, first-out queue in one circular buffer: the analysis' time
// ordered queues (records to finalize, fates, armed timers). std::deque
// allocates a block every few hundred bytes pushed and frees it once
// popped, a malloc and a page fault now and then for every connection of
// a churn; this one reuses its buffer, which only grows when it is full
// and shrinks once it is mostly empty (after a burst).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>

namespace tcpscope {

template <typename T>
class Fifo {
  static_assert(std::is_nothrow_move_constructible_v<T>);

 public:
  Fifo() = default;
  Fifo(const Fifo&) = delete;
  Fifo& operator=(const Fifo&) = delete;
  ~Fifo() { clear(); }

  bool empty() const { return size_ == 0; }
  size_t size() const { return size_; }
  size_t capacity() const { return cap_; }

  T& operator[](size_t i) { return at(i); }
  const T& operator[](size_t i) const { return at(i); }
  T& front() { return at(0); }
  const T& front() const { return at(0); }
  T& back() { return at(size_ - 1); }
  const T& back() const { return at(size_ - 1); }

  template <typename... Args>
  T& emplace_back(Args&&... args) {
    if (size_ == cap_) {
      // Built before the buffer moves: args may refer to an element.
      T v(std::forward<Args>(args)...);
      resize(cap_ ? 2 * cap_ : kMinCapacity);
      return place_back(std::move(v));
    }
    return place_back(std::forward<Args>(args)...);
  }
  void push_back(const T& v) { emplace_back(v); }
  void push_back(T&& v) { emplace_back(std::move(v)); }

  void pop_front() {
    front().~T();
    head_ = (head_ + 1) & (cap_ - 1);
    --size_;
    if (cap_ > kMinCapacity && size_ * 8 <= cap_) resize(cap_ / 4);
  }

  // Removes element i, moving the later ones forward: meant for elements
  // near the back.
  void erase_at(size_t i) {
    for (; i + 1 < size_; ++i) at(i) = std::move(at(i + 1));
    back().~T();
    --size_;
  }

  // Removes every element pred holds for, keeping the order of the rest.
  template <typename Pred>
  size_t erase_if(Pred pred) {
    size_t kept = 0;
    for (size_t i = 0; i < size_; ++i) {
      if (pred(std::as_const(at(i)))) continue;
      if (kept != i) at(kept) = std::move(at(i));
      ++kept;
    }
    const size_t removed = size_ - kept;
    while (size_ > kept) {
      back().~T();
      --size_;
    }
    return removed;
  }

  void clear() {
    while (size_) {
      back().~T();
      --size_;
    }
    head_ = 0;
  }

 private:
  static constexpr size_t kMinCapacity = 64;
  union Cell {
    Cell() {}
    ~Cell() {}
    T value;
  };

  template <typename... Args>
  T& place_back(Args&&... args) {
    T* p = new (&buf_[(head_ + size_) & (cap_ - 1)].value) T(std::forward<Args>(args)...);
    ++size_;
    return *p;
  }
  T& at(size_t i) { return buf_[(head_ + i) & (cap_ - 1)].value; }
  const T& at(size_t i) const { return buf_[(head_ + i) & (cap_ - 1)].value; }

  void resize(size_t cap) {
    auto next = std::make_unique<Cell[]>(cap);
    for (size_t i = 0; i < size_; ++i) {
      new (&next[i].value) T(std::move(at(i)));
      at(i).~T();
    }
    buf_ = std::move(next);
    cap_ = cap;
    head_ = 0;
  }

  std::unique_ptr<Cell[]> buf_;
  size_t cap_ = 0;   // a power of two, or 0
  size_t head_ = 0;  // index of the front
  size_t size_ = 0;
};

}  // namespace tcpscope
