// Result<T>: a value or an error for recoverable failures (std::expected is
// C++23; this is the small part of it we need).
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace tcpscope {

struct Error {
  std::string message;  // one line: cause and, where known, the fix
  int exit_code = 1;    // 2 = usage error, 1 = runtime error
  int sys_errno = 0;    // the system error behind it, where there is one
};

template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Error error) : v_(std::move(error)) {}
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  T& operator*() { return value(); }
  T* operator->() { return &value(); }
  const Error& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

}  // namespace tcpscope
